"""The Flask application factory and the one place errors become JSON."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, g, request
from werkzeug.exceptions import HTTPException

from crushd.browser import BrowserGuard, over_unix_socket
from crushd.config import Config
from crushd.console import is_public
from crushd.errors import Forbidden, RequestError, Unauthorized
from crushd.server import Server
from crushd.signin import COOKIE, SignIns, token_matches

#: Routes that never need the token: the health check, the console page
#: (a signed-out browser must see its sign-in form), signing in and out.
OPEN_ROUTES = frozenset({"/v1/health", "/v1/login", "/v1/logout"})

logger = logging.getLogger("crushd.http")

HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON of every error; ``details`` (a request error's own fields,
    such as the ``files`` of ``workspace_changed``) go beside the two."""
    return {"error": {"code": code, "message": message, **(details or {})}}


def create_app(config: Config | None = None, server: Server | None = None) -> Flask:
    """Build the WSGI app.  With no ``server`` one is created for ``config``
    and started — taking the data directory's lock and opening every
    registered workspace; the caller stops it with
    ``app.extensions["crushd"].stop()``.  A ``server`` passed in is used as
    it is: its owner starts and stops it."""
    if server is None:
        server = Server(config or Config.load()).start()
    config = server.config
    app = Flask("crushd")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.json.sort_keys = False
    app.extensions["crushd"] = server
    # The serve command adds the addresses it listens on before serving.
    guard = BrowserGuard(config.allow_origins, config.allow_hosts, [config.host])
    app.extensions["crushd.guard"] = guard

    # Browsers signed in with POST /v1/login; in memory, so a restart signs them out.
    sign_ins = SignIns()
    app.extensions["crushd.signins"] = sign_ins

    from crushd.console import console
    from crushd.metrics import metrics_routes
    from crushd.routes import api
    from crushd.signin import signin

    app.register_blueprint(api)
    app.register_blueprint(signin)
    app.register_blueprint(console)
    app.register_blueprint(metrics_routes)

    @app.before_request
    def _guard_browsers() -> Any:
        """Runs first, before auth, any view or reading the body: a request a
        web page made without being allowed to changes nothing."""
        g.started = time.monotonic()
        refusal = guard.check(
            request.headers, request.scheme, unix_socket=over_unix_socket(request.environ)
        )
        if refusal is not None:
            logger.warning(
                "event=request_forbidden reason=%s method=%s path=%s origin=%s host=%s",
                refusal.reason,
                request.method,
                request.path,
                request.headers.get("Origin", ""),
                request.headers.get("Host", ""),
            )
            raise Forbidden(refusal.message)
        # Kept for _cors: the allowed origin is parsed once per request.
        origin = g.cors_origin = guard.cors_origin(request.headers)
        if (
            origin is not None
            and request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
        ):
            return "", 204, guard.cors_headers(origin, preflight=True)
        return None

    @app.before_request
    def _authenticate() -> None:
        if server.token is None or request.path in OPEN_ROUTES or is_public(request.path):
            return
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and token_matches(given, server.token):
            return
        if not header and sign_ins.valid(request.cookies.get(COOKIE)):
            return
        raise Unauthorized("missing or wrong bearer token")

    @app.after_request
    def _cors(response: Any) -> Any:
        origin = g.get("cors_origin")  # unset when the guard refused the request
        if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
            response.headers.update(guard.cors_headers(origin))
        return response

    @app.after_request
    def _log(response: Any) -> Any:
        elapsed = time.monotonic() - g.get("started", time.monotonic())
        server.metrics.count_request(request.method, response.status_code)
        logger.info(
            "event=request method=%s path=%s status=%d ms=%.1f",
            request.method,
            request.path,
            response.status_code,
            elapsed * 1000,
        )
        return response

    @app.errorhandler(RequestError)
    def _request_error(exc: RequestError) -> Any:
        headers = exc.headers()
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return error_body(exc.code, exc.message, exc.details()), exc.status, headers

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        code = HTTP_CODES.get(status, "internal_error" if status >= 500 else "invalid_request")
        message = {
            404: "no such route",
            405: f"method {request.method} not allowed here",
            413: f"request body is larger than {config.max_body} bytes",
        }.get(status, exc.description or exc.name)
        headers = dict(exc.get_headers())
        headers.pop("Content-Type", None)
        return error_body(code, message), status, headers

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        logger.exception("event=request_failed method=%s path=%s", request.method, request.path)
        return error_body("internal_error", "internal server error"), 500

    return app
