"""Server-sent event streams from model providers.

Both HTTP providers do the same thing around their protocol: POST a JSON body,
turn HTTP and network failures into :class:`ProviderError`, read the
``text/event-stream`` body as ``(event, data)`` pairs, and make the whole
request interruptible by a :class:`CancelToken`.  That shared part lives here.

Why cancellation shuts the socket down instead of closing the response: a
thread blocked in ``recv``/``poll`` is not woken on Linux when another thread
closes the file descriptor, and closing an httpx response from a foreign
thread races with the reader.  ``shutdown(SHUT_RDWR)`` wakes the blocked read
at once (it returns EOF); the reading thread then sees a broken stream, finds
the token cancelled, raises :class:`Cancelled` and closes the response itself.
The socket is captured through httpcore's ``trace`` extension as soon as it is
connected, so a cancel also interrupts the wait for response headers (a model
server that is still loading the model).  The clients built here keep no idle
connections: every request opens its own connection, so the socket of the
request in flight is always the one just connected.

Reads are paced when many streams are in flight.  Each streamed chunk costs
a wake-up of the reading thread, a socket read and a turn at the GIL, and
with a hundred streams at once the process has only its one GIL for all of
them.  So once the run has shown some of a stream's text, every read of it
waits first: :data:`PACE_PER_STREAM` per stream in flight in the process, at
most :data:`PACE_MAX`, none below :data:`PACE_FROM` streams.  A read then
takes what arrived meanwhile, several chunks at once, and the run publishes
their text as one delta (:func:`crushd.providers.base.waiting` is called
before every read).  The wait is on the token: a cancel ends it at once.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import logging
import socket
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import httpx

from crushd.cancel import Cancelled, CancelToken, CountdownLatch
from crushd.common import MAX_JSON_DEPTH, load_json
from crushd.providers.base import EventTooLarge, Provider, ProviderError, stopping, waiting
from crushd.providers.retry import RETRYABLE_STATUSES, is_context_too_long, parse_retry_after

logger = logging.getLogger(__name__)

MAX_ERROR_BODY = 64 * 1024  # bytes of an error response read for its message
MAX_DETAILS = 2000  # characters of raw error text kept in ProviderError.details
# How deep one event may nest: a tool's arguments (MAX_JSON_DEPTH, checked
# again where they are used) plus the protocol's own objects around them.
EVENT_DEPTH = MAX_JSON_DEPTH + 4
# How long one event may be, for a step whose output is bounded (see
# event_limit): JSON escapes take up to 6 characters per byte of text
# (``\u0000``), and the protocol's envelope comes around it.
EVENT_ESCAPE = 6
EVENT_SLACK = 64 * 1024

# Read pacing (see the module docstring).  On the 2-core machine of the
# README's "Performance", with 100 runs streaming at once the daemon spent
# 12-21 % less CPU and the last run ended 15-20 % sooner.
PACE_FROM = 4  # streams in flight from which reads are paced
PACE_PER_STREAM = 0.001  # seconds of wait per stream in flight
PACE_MAX = 0.1  # seconds: the longest wait before one read


def event_limit(max_bytes: int | None) -> int | None:
    """The most characters one event may have when the step keeps at most
    ``max_bytes`` bytes of output (None: no bound).  An event longer than
    that carries more than the message could hold, whatever its escapes."""
    return None if max_bytes is None else EVENT_ESCAPE * max_bytes + EVENT_SLACK


def sse_lines(chunks: Iterable[str], limit: int | None = None) -> Iterator[str]:
    """Split the decoded chunks of a ``text/event-stream`` body into lines.

    Lines end with CRLF, LF or CR, as the SSE specification says, and with
    nothing else: ``str.splitlines`` (and httpx's ``iter_lines``) also
    split at U+2028, U+2029 and U+0085, which JSON carries unescaped inside
    strings, and so broke such an event in two.  A line longer than
    ``limit`` characters raises :class:`EventTooLarge` as soon as that many
    arrived: a stream that never sends a newline cannot grow memory.
    """
    pending: list[str] = []  # the start of a line that has not ended yet
    size = 0  # its length
    after_cr = False  # the last chunk ended with CR: a LF opening this one is its pair
    for text in chunks:
        if after_cr and text.startswith("\n"):
            text = text[1:]
        after_cr = text.endswith("\r")
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        tail = lines.pop()
        # Only a chunk longer than the limit can hold a whole line that is.
        if limit is not None and len(text) > limit and lines and max(map(len, lines)) > limit:
            raise EventTooLarge(limit)
        if lines:
            if pending:
                size += len(lines[0])
                if limit is not None and size > limit:
                    raise EventTooLarge(limit)
                lines[0] = "".join(pending) + lines[0]
                pending = []
            yield from lines
            size = 0
        if tail:
            size += len(tail)
            if limit is not None and size > limit:
                raise EventTooLarge(limit)
            pending.append(tail)
    if pending:
        yield "".join(pending)


def iter_sse(lines: Iterable[str], limit: int | None = None) -> Iterator[tuple[str, str]]:
    """Parse ``text/event-stream`` lines into ``(event, data)`` pairs.

    ``event`` is ``""`` when the server named none; several ``data:`` lines of
    one event are joined with ``\\n``; comments (``: ping``) and ``id:`` /
    ``retry:`` fields are ignored.  An event not terminated by a blank line
    before the stream ends is dropped, as the SSE specification says.  An
    event whose data grows past ``limit`` characters raises :class:`EventTooLarge`.
    """
    event = ""
    data: list[str] = []
    size = 0
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data, size = "", [], 0
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            size += len(value) + 1
            if limit is not None and size > limit:
                raise EventTooLarge(limit)
            data.append(value)


class Clients:
    """httpx clients for streaming steps, one lent to each request.

    Every request opens its own connection (no idle ones are kept), and a
    client shared by a hundred streams at once scans all of their
    connections under its pool lock when a request starts and again when
    it ends: with one client per request in flight that scan has one
    entry.  A client goes back to be lent again once its request is over,
    so there are as many as streams were ever in flight at once.  They
    share one TLS context (built once, not per client) and one cookie jar.

    httpx's read timeout bounds each socket read, so it is an idle timeout:
    a stream that sends no byte for ``idle_timeout`` seconds (headers
    included) fails with ``ReadTimeout`` and its connection is closed.
    """

    def __init__(
        self, connect_timeout: float, idle_timeout: float, extra_headers: dict[str, str] | None
    ) -> None:
        self.timeout = httpx.Timeout(idle_timeout, connect=connect_timeout)
        self._headers = extra_headers or {}
        self._ssl = httpx.create_ssl_context()
        self._cookies = http.cookiejar.CookieJar()
        self._pool_lock = threading.Lock()
        self._idle: list[httpx.Client] = []  # guarded by _pool_lock
        self._all: list[httpx.Client] = []  # guarded by _pool_lock
        self._closed = False  # guarded by _pool_lock

    @contextlib.contextmanager
    def lease(self) -> Iterator[httpx.Client]:
        """A client for one request; ProviderError once :meth:`close` was called."""
        with self._pool_lock:
            if self._closed:
                raise stopping()
            client = self._idle.pop() if self._idle else None
        if client is None:
            client = httpx.Client(
                timeout=self.timeout,
                limits=httpx.Limits(max_keepalive_connections=0),
                headers=self._headers,
                cookies=self._cookies,
                verify=self._ssl,
            )
            with self._pool_lock:
                closed = self._closed
                if not closed:
                    self._all.append(client)
            if closed:
                client.close()
                raise stopping()
        try:
            yield client
        finally:
            with self._pool_lock:
                if not self._closed:
                    self._idle.append(client)

    @property
    def count(self) -> int:
        """How many clients there are: the most requests ever in flight at once."""
        with self._pool_lock:
            return len(self._all)

    def close(self) -> None:
        """Close every client, those lent out too; idempotent."""
        with self._pool_lock:
            self._closed = True
            clients, self._all, self._idle = self._all, [], []
        for client in clients:
            client.close()


def decode_json(data: str) -> dict[str, Any]:
    """One event's ``data`` as a JSON object, or ProviderError (also for
    one nested too deep to be handled safely, see :func:`crushd.common.load_json`)."""
    try:
        value = load_json(data, EVENT_DEPTH)
    except ValueError as exc:
        raise ProviderError("Provider sent invalid data", f"{exc}: {data[:200]}") from None
    if not isinstance(value, dict):
        raise ProviderError("Provider sent invalid data", data[:200])
    return value


class HTTPProvider(Provider):
    """What both HTTP providers share: configuration and its clients.

    Thread-safe: all runs share its :class:`Clients`.
    """

    announces_waits = True  # stream_events() calls waiting() before each read

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key: str | None = None,
        *,
        connect_timeout: float = 10.0,
        idle_timeout: float = 120.0,
        max_tokens: int | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.max_tokens = max_tokens
        self._api_key = api_key
        self.idle_timeout = idle_timeout
        self.clients = Clients(connect_timeout, idle_timeout, extra_headers)

    def close(self) -> None:
        self.clients.close()


# The provider streams the process is reading.
IN_FLIGHT = CountdownLatch()


def read_pace(streams: int) -> float:
    """The wait before one read of a streaming body, with ``streams`` in flight."""
    return min(PACE_MAX, PACE_PER_STREAM * streams) if streams >= PACE_FROM else 0.0


class _PacedReads:
    """Announces and paces the socket reads of one request.

    httpcore reads through a network stream's ``read(max_bytes, timeout)``,
    its documented interface, and calls it only when it has no buffered
    bytes left: just the moment to announce a wait.  httpx offers no way to
    hand httpcore a network backend of our own, so ``attach`` (called from
    the request's trace hook) wraps ``read`` on each stream object as it is
    connected, and again on the TLS stream that replaces it.
    """

    def __init__(self, token: CancelToken) -> None:
        self._token = token

    def attach(self, stream: Any) -> None:
        if stream is not None and callable(getattr(stream, "read", None)):
            stream.read = self._wrap(stream.read)

    def _wrap(self, read: Callable[..., bytes]) -> Callable[..., bytes]:
        def paced_read(max_bytes: int, timeout: float | None = None) -> bytes:
            if waiting() and (pace := read_pace(IN_FLIGHT.count)):
                self._token.wait(pace)  # a cancel ends it; the read then sees EOF
            return read(max_bytes, timeout)

        return paced_read


class _SocketBreaker:
    """Shuts down the socket of one request when its token is cancelled.

    ``attach`` runs on the requesting thread (from httpcore's trace hook),
    ``fire`` on the cancelling thread; whichever comes second does the
    shutdown, so a cancel that races with the connect is not lost.
    """

    def __init__(self) -> None:
        self._socket_lock = threading.Lock()
        self._sock: socket.socket | None = None  # guarded by _socket_lock
        self._fired = False  # guarded by _socket_lock

    def attach(self, stream: Any) -> None:
        sock = stream.get_extra_info("socket") if stream is not None else None
        if not isinstance(sock, socket.socket):
            return
        with self._socket_lock:
            self._sock = sock
            fired = self._fired
        if fired:
            _shutdown(sock)

    def fire(self) -> None:
        with self._socket_lock:
            self._fired = True
            sock = self._sock
        if sock is not None:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        # The plain socket method, not SSLSocket.shutdown: that one also drops
        # the SSL object under the feet of the thread reading from it.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed or never connected: nothing to wake
        pass


def stream_events(
    clients: Clients,
    url: str,
    *,
    headers: dict[str, str],
    body: dict[str, Any],
    token: CancelToken,
    provider: str,
    max_event: int | None = None,
) -> Generator[tuple[str, str], None, None]:
    """POST ``body`` to ``url`` and yield the SSE ``(event, data)`` pairs of the reply.

    Blocks while reading; safe to run on several threads at once with one
    ``clients``.  Raises :class:`Cancelled` within about a second of ``token``
    being cancelled, whatever the server does, and :class:`ProviderError` for
    an HTTP status >= 400, an unreachable server, a timeout or a broken
    stream, classified for :mod:`crushd.providers.retry`.  A stream that
    simply ends is returned normally: only the caller knows whether its
    protocol's end marker came.  An event (or line) longer than
    ``max_event`` characters raises :class:`EventTooLarge` (see :func:`event_limit`).
    """
    token.raise_if_cancelled()
    breaker = _SocketBreaker()
    reads = _PacedReads(token)

    def trace(name: str, info: dict[str, Any]) -> None:
        # httpcore's hook: each connection (and the TLS stream that may
        # replace it) as soon as it exists, even before the headers came.
        if name in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            stream = info.get("return_value")
            breaker.attach(stream)
            reads.attach(stream)

    handle = token.on_cancel(breaker.fire)
    received = False
    IN_FLIGHT.count_up()
    try:
        with (
            clients.lease() as client,
            client.stream(
                "POST", url, json=body, headers=headers, extensions={"trace": trace}
            ) as response,
        ):
            breaker.attach(response.extensions.get("network_stream"))
            if response.status_code >= 400:
                raise _http_error(response, provider)
            received = True
            for pair in iter_sse(sse_lines(response.iter_text(), max_event), max_event):
                token.raise_if_cancelled()
                yield pair
        token.raise_if_cancelled()
    except httpx.HTTPError as exc:
        if token.cancelled:
            raise Cancelled(token.reason or "cancelled") from None
        raise _transport_error(exc, url, received, clients.timeout.read, provider) from exc
    finally:
        IN_FLIGHT.count_down()
        token.remove_callback(handle)


def _transport_error(
    exc: httpx.HTTPError, url: str, received: bool, read_timeout: float | None, provider: str
) -> ProviderError:
    """Every transport failure may pass (a restarting server, a dropped
    connection, a silent stream), so all are retryable but a bad URL."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.UnsupportedProtocol):
        logger.warning("event=provider_bad_url provider=%s url=%s error=%r", provider, url, detail)
        return ProviderError("Cannot reach provider", f"{url}: {detail}")
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        logger.warning(
            "event=provider_unreachable provider=%s url=%s error=%r", provider, url, detail
        )
        return ProviderError("Cannot reach provider", f"{url}: {detail}", retryable=True)
    if isinstance(exc, httpx.TimeoutException):
        logger.warning(
            "event=provider_idle provider=%s received=%s idle_s=%s",
            provider,
            received,
            read_timeout,
        )
        return ProviderError(
            "Provider stream idle",
            f"no data for {read_timeout:g} s (--stream-idle-timeout)",
            retryable=True,
        )
    logger.warning(
        "event=provider_stream_broken provider=%s received=%s error=%r", provider, received, detail
    )
    if received:
        return ProviderError("Provider stream ended early", detail, retryable=True)
    return ProviderError("Provider request failed", detail, retryable=True)


def _http_error(response: httpx.Response, provider: str) -> ProviderError:
    """Read a bounded part of an error response and pull out the provider's message."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_ERROR_BODY:
            break
    text = b"".join(chunks)[:MAX_ERROR_BODY].decode("utf-8", "replace")
    details = error_message(text) or response.reason_phrase or ""
    status = response.status_code
    retry_after = parse_retry_after(response.headers)
    logger.warning(
        "event=provider_http_error provider=%s status=%d retry_after=%s details=%r",
        provider,
        status,
        retry_after,
        details[:200],
    )
    return ProviderError(
        f"Provider returned HTTP {status}",
        details,
        status=status,
        retryable=status in RETRYABLE_STATUSES,
        retry_after=retry_after,
        context_too_long=is_context_too_long(details, text[:MAX_DETAILS]),
    )


def error_message(text: str) -> str:
    """The human message of a provider's error body, else the raw text (bounded).

    Understands ``{"error": {"message": ...}}`` (OpenAI, Anthropic and most
    compatible servers), ``{"error": "..."}`` (Ollama) and ``{"message": ...}``.
    """
    try:
        body = load_json(text)
    except ValueError:  # not JSON (an HTML error page, say), or absurdly nested
        return text.strip()[:MAX_DETAILS]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return body["message"]
    return text.strip()[:MAX_DETAILS]
