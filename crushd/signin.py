"""Browser sign-in: ``POST /v1/login`` trades the token for a cookie.

A page cannot add ``Authorization: Bearer`` to an ``EventSource``, and it
should not keep the token in script-readable storage, so the console signs
in once and the browser sends the ``crushd_session`` cookie from then on.
The cookie holds a random id, never the token; the ids live in this
process's memory only, so a restart (or ``POST /v1/logout``) signs every
browser out.  ``HttpOnly`` keeps it from scripts, ``SameSite=Strict`` from
other sites' requests, and the browser guard in front of every route still
refuses foreign origins (a page on another port of the same host is
"same-site" to the cookie, not to the guard).
"""

from __future__ import annotations

import collections
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, current_app, request

from crushd.errors import Unauthorized
from crushd.routes import body, no_content, server, text_field

COOKIE = "crushd_session"
#: A sign-in ends after this long even if the browser keeps the cookie.
LIFETIME = 7 * 24 * 3600.0
#: The oldest sign-ins are forgotten past this many, so repeated logins
#: cannot grow memory without bound.
MAX_SIGN_INS = 1000

signin = Blueprint("signin", __name__, url_prefix="/v1")


class SignIns:
    """The cookie ids of signed-in browsers.  Thread-safe, in memory only."""

    def __init__(
        self,
        lifetime: float = LIFETIME,
        limit: int = MAX_SIGN_INS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lifetime = lifetime
        self._limit = limit
        self._clock = clock
        # Guards _ids: cookie id -> the time it was issued, oldest first.
        self._ids_lock = threading.Lock()
        self._ids: collections.OrderedDict[str, float] = collections.OrderedDict()

    def issue(self) -> str:
        session_id = secrets.token_urlsafe(32)
        with self._ids_lock:
            self._ids[session_id] = self._clock()
            while len(self._ids) > self._limit:
                self._ids.popitem(last=False)
        return session_id

    def valid(self, session_id: str | None) -> bool:
        if not session_id:
            return False
        with self._ids_lock:
            issued = self._ids.get(session_id)
            if issued is None:
                return False
            if self._clock() - issued > self._lifetime:
                del self._ids[session_id]
                return False
            return True

    def revoke(self, session_id: str | None) -> None:
        if session_id:
            with self._ids_lock:
                self._ids.pop(session_id, None)

    def __len__(self) -> int:
        with self._ids_lock:
            return len(self._ids)


def sign_ins() -> SignIns:
    return current_app.extensions["crushd.signins"]


def token_matches(given: str, token: str) -> bool:
    """Constant-time, ignoring surrounding whitespace as the token file does."""
    return hmac.compare_digest(given.strip().encode(), token.encode())


@signin.post("/login")
def login() -> Any:
    """204 with the cookie for the right token; 401 and nothing set for a
    wrong one.  With no token configured there is nothing to check: 204
    and no cookie."""
    given = text_field(body(), "token") or ""
    token = server().token
    if token is None:
        return no_content()
    if not token_matches(given, token):
        raise Unauthorized("wrong token")
    response = no_content()
    response.set_cookie(
        COOKIE,
        sign_ins().issue(),
        httponly=True,
        samesite="Strict",
        path="/",
        secure=request.scheme == "https",
    )
    return response


@signin.post("/logout")
def logout() -> Any:
    """Forget this browser's sign-in and clear its cookie; 204 either way."""
    sign_ins().revoke(request.cookies.get(COOKIE))
    response = no_content()
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict")
    return response
