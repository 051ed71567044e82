"""A small HTTP client for a running crushd, used by the ``crushd`` commands.

Where the daemon is: ``url`` (``--url``), else ``unix_socket``
(``--unix-socket``), else ``$CRUSHD_URL``, else ``$CRUSHD_UNIX_SOCKET``, else
``http://127.0.0.1:7433`` — the address ``crushd serve`` uses by default, so
no flag is needed for a local daemon.  The bearer token comes from
``--token-file`` (surrounding whitespace ignored, as the server does), else
``$CRUSHD_TOKEN``, else the file named by ``$CRUSHD_TOKEN_FILE``.

Every failure is a :class:`ClientError` whose message can be shown to a user
as is: :class:`ApiError` carries the API's ``{"error": {"code", "message"}}``,
:class:`DaemonUnreachable` says how to start the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from crushd import __version__
from crushd.events import EventType

DEFAULT_URL = "http://127.0.0.1:7433"

#: How long a request may take when it is not a long poll or a stream.
DEFAULT_TIMEOUT = 30.0

#: The server pings an idle stream every 15 s; three missed pings mean the
#: stream is dead even if the connection looks open.
STREAM_READ_TIMEOUT = 45.0

#: Base URL used over a unix socket; only the path matters there.
UNIX_BASE_URL = "http://crushd"


class ClientError(Exception):
    """A request to the daemon failed; ``message`` is meant for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DaemonUnreachable(ClientError):
    """Nothing answered at the daemon's address (refused, no socket, timeout)."""


class StreamBroken(ClientError):
    """An event stream ended or failed before the caller was done with it."""


class ApiError(ClientError):
    """The daemon answered with an error status and its JSON error body;
    ``files`` are those a ``workspace_changed`` error lists."""

    def __init__(
        self, status: int, code: str, message: str, files: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.files = files or []

    def __str__(self) -> str:
        return f"{self.message} ({self.status} {self.code})"


def resolve_address(
    url: str | None = None,
    unix_socket: str | None = None,
    env: Mapping[str, str] = os.environ,
) -> tuple[str, str | None]:
    """Return ``(base_url, unix_socket_path_or_None)`` from flags, then env."""
    if url and unix_socket:
        raise ClientError("give either --url or --unix-socket, not both")
    if url:
        return url.rstrip("/"), None
    if unix_socket:
        return UNIX_BASE_URL, unix_socket
    if env.get("CRUSHD_URL"):
        return env["CRUSHD_URL"].rstrip("/"), None
    if env.get("CRUSHD_UNIX_SOCKET"):
        return UNIX_BASE_URL, env["CRUSHD_UNIX_SOCKET"]
    return DEFAULT_URL, None


def resolve_token(token_file: str | None = None, env: Mapping[str, str] = os.environ) -> str | None:
    """The bearer token from ``token_file``, ``$CRUSHD_TOKEN`` or ``$CRUSHD_TOKEN_FILE``."""
    path = token_file or (None if env.get("CRUSHD_TOKEN") else env.get("CRUSHD_TOKEN_FILE"))
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise ClientError(f"cannot read token file {path}: {exc.strerror or exc}") from None
        if not token:
            raise ClientError(f"token file {path} is empty")
        return token
    return env.get("CRUSHD_TOKEN", "").strip() or None


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Decode Server-Sent Events into crushd's event objects (the ``data`` JSON).

    Comments (``: open``, ``: ping``) are skipped; an event whose data is not
    JSON is returned as ``{"type": <event>, "payload": {"raw": data}}``.
    """
    name = ""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                raw = "\n".join(data)
                try:
                    event = json.loads(raw)
                except json.JSONDecodeError:
                    event = {"type": name or "message", "payload": {"raw": raw}}
                yield event
            name, data = "", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field == "event":
                name = value


class Client:
    """Blocking client for one daemon.  Not thread-safe (one ``httpx.Client``).

    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        url: str | None = None,
        unix_socket: str | None = None,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        self.base_url, self.unix_socket = resolve_address(url, unix_socket, env)
        transport = httpx.HTTPTransport(uds=self.unix_socket) if self.unix_socket else None
        headers = {"User-Agent": f"crushd-cli/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url,
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    @property
    def address(self) -> str:
        """Where the daemon is, for messages."""
        return f"unix:{self.unix_socket}" if self.unix_socket else self.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------

    def _unreachable(self, exc: httpx.TransportError) -> ClientError:
        if isinstance(exc, httpx.ConnectError):
            return DaemonUnreachable(
                f"cannot connect to crushd at {self.address} ({_reason(exc)}): "
                "is crushd running? start it with `crushd serve`"
            )
        if isinstance(exc, httpx.TimeoutException):
            return DaemonUnreachable(f"crushd at {self.address} did not answer in time")
        return DaemonUnreachable(f"lost the connection to crushd at {self.address}: {exc}")

    def _error(self, response: httpx.Response) -> ApiError:
        files: list[str] = []
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
            files = [str(f) for f in error.get("files") or []]
        except (ValueError, KeyError, TypeError):  # not crushd, or a proxy's error page
            code = "http_error"
            message = f"HTTP {response.status_code} from {self.address}"
        if response.status_code == 401:
            message += "; set CRUSHD_TOKEN or pass --token-file FILE"
        return ApiError(response.status_code, code, message, files)

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        text: bool = False,
    ) -> Any:
        """One API call; returns the decoded JSON (None for an empty body),
        or with ``text`` the body as text."""
        kwargs: dict[str, Any] = {"json": json_body, "params": _clean(params)}
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=5.0)
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise self._error(response)
        if text:
            return response.text
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ClientError(f"{self.address} answered {path} with something not JSON") from None

    # -- API -----------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/v1/health")

    def workspaces(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/workspaces")

    def register(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Register a directory (idempotent: an existing one is returned)."""
        return self.request("POST", "/v1/workspaces", json_body={"path": os.fspath(path)})

    def find_workspace(self, path: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The registered workspace of ``path`` (compared after resolving links)."""
        real = os.path.realpath(path)
        return next((w for w in self.workspaces() if w["path"] == real), None)

    def sessions(self, workspace_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/workspaces/{workspace_id}/sessions")

    def mcp_servers(self, workspace_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/workspaces/{workspace_id}/mcp")

    def runs(
        self,
        workspace_id: str,
        session_id: str | None = None,
        status: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        params = {"session_id": session_id, "status": status, "limit": limit}
        return self.request("GET", f"/v1/workspaces/{workspace_id}/runs", params=params)

    def run(self, workspace_id: str, run_id: str, wait: float | None = None) -> dict[str, Any]:
        """A run; with ``wait`` the call blocks until it is terminal or ``wait`` ends."""
        path = f"/v1/workspaces/{workspace_id}/runs/{run_id}"
        if not wait:
            return self.request("GET", path)
        return self.request("GET", path, params={"wait": f"{wait:g}"}, timeout=wait + 15)

    def submit(
        self,
        workspace_id: str,
        prompt: str,
        session_id: str | None = None,
        run_id: str | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        body = {"prompt": prompt, "session_id": session_id, "run_id": run_id, "model": model}
        return self.request("POST", f"/v1/workspaces/{workspace_id}/agent", json_body=_clean(body))

    def compact(
        self, workspace_id: str, session_id: str, model: str | None = None
    ) -> dict[str, Any]:
        path = f"/v1/workspaces/{workspace_id}/sessions/{session_id}/compact"
        return self.request("POST", path, json_body=_clean({"model": model}))

    def cancel(self, workspace_id: str, run_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/workspaces/{workspace_id}/runs/{run_id}/cancel")

    def diff(
        self,
        workspace_id: str,
        run_id: str,
        tool_call_id: str | None = None,
        stat: bool = False,
    ) -> Any:
        """What the run changed: the unified diff as text, or with ``stat`` the files (JSON)."""
        params = {"tool_call_id": tool_call_id, "stat": "1" if stat else None}
        path = f"/v1/workspaces/{workspace_id}/runs/{run_id}/diff"
        return self.request("GET", path, params=params, text=not stat)

    def revert(
        self, workspace_id: str, session_id: str, action: str = "revert", **body: Any
    ) -> dict[str, Any]:
        """POST ``.../sessions/{id}/<action>`` (``revert``, ``unrevert``, ``fork``)."""
        path = f"/v1/workspaces/{workspace_id}/sessions/{session_id}/{action}"
        return self.request("POST", path, json_body=_clean(body) or {}, timeout=300)

    def events(
        self,
        workspace_id: str,
        session_id: str | None = None,
        since: int | None = None,
    ) -> EventStream:
        """Open the workspace's event stream; returns once the server answered.

        Raises :class:`ApiError` (404 for an unknown session, 503 when streams
        are full) or :class:`DaemonUnreachable` before any event is read.
        """
        params = _clean({"session_id": session_id, "since": since})
        request = self._http.build_request(
            "GET",
            f"/v1/workspaces/{workspace_id}/events",
            params=params,
            headers={"Accept": "text/event-stream"},
            timeout=httpx.Timeout(DEFAULT_TIMEOUT, connect=5.0, read=STREAM_READ_TIMEOUT),
        )
        try:
            response = self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            try:
                response.read()
            except httpx.TransportError:
                pass  # the error status is what matters
            finally:
                response.close()
            raise self._error(response)
        return EventStream(response)


class EventStream:
    """An open SSE response; iterate it for event dicts, then :meth:`close`.

    Iteration ends normally when the server ends the stream (the workspace
    closed or the server stops); a transport failure raises
    :class:`StreamBroken`.  ``last_seq`` is the last ``seq`` seen, for a
    reconnect with ``since``.
    """

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.last_seq: int | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            for event in parse_sse(self._response.iter_lines()):
                if isinstance(event.get("seq"), int) and event.get("type") != EventType.RESET:
                    self.last_seq = event["seq"]
                yield event
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise StreamBroken(f"event stream broke: {_reason(exc)}") from None

    def close(self) -> None:
        self._response.close()

    def abort(self) -> None:
        """Wake a read blocked on this stream in another thread: it ends at
        once (iteration raises :class:`StreamBroken`).  Thread-safe, unlike
        :meth:`close`; closing a socket does not wake a blocked ``recv``,
        shutting it down does."""
        network = self._response.extensions.get("network_stream")
        sock = network.get_extra_info("socket") if network is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clean(values: dict[str, Any] | None) -> dict[str, Any] | None:
    if values is None:
        return None
    return {k: v for k, v in values.items() if v is not None}


def _reason(exc: BaseException) -> str:
    """The innermost useful text of a transport error ("connection refused")."""
    text = str(exc) or type(exc).__name__
    if "Connection refused" in text:
        return "connection refused"
    if "No such file" in text:
        return "no such socket"
    return text.split("] ", 1)[-1]
