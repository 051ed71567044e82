"""The console: the web page at ``GET /`` and its two assets.

The files ship inside the package (``crushd/web``) and are served as they
are: no build step, nothing from other hosts.  The page talks to the API of
the same origin, so the browser guard lets it in; its Content-Security-Policy
lets it load nothing from anywhere else and no other site frame it.  The
page and its assets need no token: a signed-out browser must see the
sign-in form, and they hold nothing secret.

The page learns the event types it listens for from the server: the one
list, :class:`crushd.events.EventType`, is written into ``index.html``'s
``event-types`` element as it is served.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib.resources import files
from typing import Any

from flask import Blueprint, Response, request

from crushd.errors import NotFound
from crushd.events import EventType

console = Blueprint("console", __name__)

#: What the console may be served as: URL name -> (file, content type).
ASSETS = {
    "": ("index.html", "text/html; charset=utf-8"),
    "console.js": ("console.js", "text/javascript; charset=utf-8"),
    "console.css": ("console.css", "text/css; charset=utf-8"),
}
ASSET_PREFIX = "/console/"
#: The element of ``index.html`` the event types are written into, as shipped.
EVENT_TYPES_ELEMENT = b'<script type="application/json" id="event-types">[]</script>'

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_public(path: str) -> bool:
    """The page and its assets, which a signed-out browser must load."""
    return path == "/" or path.startswith(ASSET_PREFIX)


@functools.cache
def _asset(name: str) -> tuple[bytes, str, str]:
    """The file's bytes, content type and ETag, read once per process."""
    filename, content_type = ASSETS[name]
    data = (files("crushd") / "web" / filename).read_bytes()
    if filename == "index.html":
        data = _with_event_types(data)
    return data, content_type, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _with_event_types(page: bytes) -> bytes:
    """``page`` with the event types in its ``event-types`` element."""
    if page.count(EVENT_TYPES_ELEMENT) != 1:
        raise RuntimeError("index.html must hold the event-types element once, as shipped")
    listed = json.dumps([t.value for t in EventType]).replace("</", "<\\/").encode()
    return page.replace(EVENT_TYPES_ELEMENT, EVENT_TYPES_ELEMENT.replace(b"[]", listed))


def _serve(name: str) -> Any:
    if name not in ASSETS:
        raise NotFound(f"no console file {name!r}")
    data, content_type, etag = _asset(name)
    headers = {**SECURITY_HEADERS, "ETag": etag}
    if etag in request.headers.get("If-None-Match", ""):
        return Response(status=304, headers=headers)
    return Response(data, content_type=content_type, headers=headers)


@console.get("/")
def index() -> Any:
    return _serve("")


@console.get(ASSET_PREFIX + "<name>")
def asset(name: str) -> Any:
    return _serve(name)
