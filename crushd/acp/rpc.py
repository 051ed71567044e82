"""JSON-RPC 2.0 over newline-delimited JSON: ACP's stdio transport.

One :class:`Connection` owns both directions of one pair of byte streams.
:meth:`Connection.serve` reads on the calling thread until end of input and
hands every request and notification to the handler *in arrival order, on
the reading thread*, so the handler can do its bookkeeping (a prompt is
registered before the cancel that follows it is read) and then give the
slow part to :meth:`Connection.answer_in_thread`.  Responses to the
requests this side sent settle their :class:`Outgoing`.

Every thread this module starts is tracked and joined by
:meth:`Connection.close`, with a deadline; what is still running after it
is logged by name.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from crushd.common import load_json

logger = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
AUTH_REQUIRED = -32000
RESOURCE_NOT_FOUND = -32002
REQUEST_CANCELLED = -32800

#: ACP messages nest a few levels; this only stops a hostile peer's
#: ten-thousand-deep array from costing a RecursionError.
MAX_DEPTH = 256


class RpcError(Exception):
    """An error response: raised by handlers, carried by :class:`Outgoing`."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class Outgoing:
    """A request this side sent.  Settled once: by the peer's response, by
    :meth:`Connection.close` (an :class:`RpcError`), never twice."""

    def __init__(self, request_id: int, method: str) -> None:
        self.id = request_id
        self.method = method
        self.result: Any = None
        self.error: RpcError | None = None
        self._done = threading.Event()
        self._callbacks_lock = threading.Lock()
        self._callbacks: list[Callable[[Outgoing], None]] = []  # guarded by _callbacks_lock

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def on_done(self, callback: Callable[[Outgoing], None]) -> None:
        """Call ``callback(self)`` once settled (at once if it is already),
        on the settling thread: it must not block."""
        with self._callbacks_lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def settle(self, result: Any = None, error: RpcError | None = None) -> bool:
        """Record the outcome; False if it was already settled."""
        with self._callbacks_lock:
            if self._done.is_set():
                return False
            self.result, self.error = result, error
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # one broken callback must not stop the reader
                logger.exception("event=acp_callback_failed method=%s", self.method)
        return True


class Reply:
    """The one answer owed to one incoming request.  Thread-safe; a second
    answer is ignored (and logged), so a handler racing a shutdown is harmless."""

    def __init__(self, connection: Connection, request_id: Any, method: str) -> None:
        self._connection = connection
        self.id = request_id
        self.method = method
        self._sent_lock = threading.Lock()
        self._sent = False  # guarded by _sent_lock

    def result(self, value: Any) -> None:
        self._send({"jsonrpc": "2.0", "id": self.id, "result": value})

    def error(self, error: RpcError) -> None:
        self._send({"jsonrpc": "2.0", "id": self.id, "error": error.to_json()})

    def _send(self, message: dict[str, Any]) -> None:
        with self._sent_lock:
            if self._sent:
                logger.debug("event=acp_second_reply method=%s id=%r", self.method, self.id)
                return
            self._sent = True
        self._connection.send(message)


#: ``handler(method, params, reply)``; ``reply`` is None for a notification.
Handler = Callable[[str, Any, "Reply | None"], None]


class Connection:
    """One JSON-RPC peer on ``reader``/``writer`` (binary streams).

    Thread-safe: any thread may :meth:`send`, :meth:`notify` or
    :meth:`request`; writes are whole lines under one lock.  Once the
    writer fails (the peer closed it) later writes are dropped.
    """

    def __init__(self, reader: IO[bytes], writer: IO[bytes], handler: Handler) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._write_lock = threading.Lock()  # guards _writer and _broken
        self._broken = False
        # Guards the three fields below.  A leaf lock: nothing is called under it.
        self._outgoing_lock = threading.Lock()
        self._next_id = 0
        self._outgoing: dict[int, Outgoing] = {}
        self._threads: set[threading.Thread] = set()
        self.closed = threading.Event()

    # -- reading -------------------------------------------------------------

    def serve(self) -> None:
        """Read and dispatch until end of input.  Blocks the calling thread."""
        while True:
            try:
                line = self._reader.readline()
            except (OSError, ValueError) as exc:  # the input was closed under us
                logger.info("event=acp_read_failed error=%r", exc)
                break
            if not line:
                break
            if line.strip():
                self._receive(line)
        logger.info("event=acp_input_closed")

    def _receive(self, line: bytes) -> None:
        try:
            message = load_json(line, max_depth=MAX_DEPTH)
        except ValueError as exc:
            self.send(_error(None, RpcError(PARSE_ERROR, f"Parse error: {exc}")))
            return
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            self.send(_error(None, RpcError(INVALID_REQUEST, "Invalid request: not JSON-RPC 2.0")))
            return
        method = message.get("method")
        if method is None:
            self._settle(message)
            return
        has_id = "id" in message
        if not isinstance(method, str) or (has_id and not _valid_id(message["id"])):
            error = RpcError(INVALID_REQUEST, "Invalid request: bad method or id")
            self.send(_error(message.get("id") if has_id else None, error))
            return
        reply = Reply(self, message["id"], method) if has_id else None
        try:
            self._handler(method, message.get("params"), reply)
        except RpcError as exc:
            if reply is not None:
                reply.error(exc)
        except Exception as exc:  # a handler bug answers the request, never ends the reader
            logger.exception("event=acp_handler_crashed method=%s", method)
            if reply is not None:
                reply.error(RpcError(INTERNAL_ERROR, f"Internal error: {exc!r}"))

    def _settle(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        with self._outgoing_lock:
            outgoing = self._outgoing.pop(request_id, None) if isinstance(request_id, int) else None
        if outgoing is None:
            logger.debug("event=acp_unexpected_response id=%r", request_id)
            return
        error = message.get("error")
        if isinstance(error, dict):
            outgoing.settle(
                error=RpcError(
                    int(error.get("code") or INTERNAL_ERROR),
                    str(error.get("message") or "error"),
                    error.get("data"),
                )
            )
        else:
            outgoing.settle(result=message.get("result"))

    # -- writing -------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Write one message as one line.  Never raises."""
        data = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        with self._write_lock:
            if self._broken:
                return
            try:
                self._writer.write(data)
                self._writer.flush()
            except (OSError, ValueError) as exc:  # the peer closed our output
                self._broken = True
                logger.info("event=acp_write_failed error=%r", exc)

    def notify(self, method: str, params: Any) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def request(self, method: str, params: Any) -> Outgoing:
        """Send a request; the returned :class:`Outgoing` settles with the
        response.  After :meth:`close` it is settled at once with an error."""
        with self._outgoing_lock:
            request_id = self._next_id
            self._next_id += 1
            outgoing = Outgoing(request_id, method)
            if not self.closed.is_set():
                self._outgoing[request_id] = outgoing
        if self.closed.is_set():
            outgoing.settle(error=_closed_error())
            return outgoing
        self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        return outgoing

    def withdraw(self, outgoing: Outgoing) -> None:
        """Tell the peer a request of ours no longer needs an answer
        (``$/cancel_request``); its eventual answer is still accepted."""
        if not outgoing.done:
            self.notify("$/cancel_request", {"requestId": outgoing.id})

    # -- threads -------------------------------------------------------------

    def spawn(self, name: str, target: Callable[[], None]) -> None:
        """Run ``target`` on a thread :meth:`close` joins.  After close,
        nothing is started."""

        def run() -> None:
            try:
                target()
            except Exception:  # thread boundary
                logger.exception("event=acp_thread_crashed thread=%s", name)
            finally:
                with self._outgoing_lock:
                    self._threads.discard(threading.current_thread())

        # Daemon threads: a call stuck on a daemon that stopped answering
        # must not hold the process after close() has given up on it.
        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._outgoing_lock:
            if self.closed.is_set():
                return
            self._threads.add(thread)
        thread.start()

    def answer_in_thread(self, reply: Reply, work: Callable[[], Any]) -> None:
        """Answer ``reply`` with what ``work()`` returns or raises, on a thread."""

        def run() -> None:
            try:
                result = work()
            except RpcError as exc:
                reply.error(exc)
            except Exception as exc:  # thread boundary: the request still gets its answer
                logger.exception("event=acp_request_crashed method=%s", reply.method)
                reply.error(RpcError(INTERNAL_ERROR, f"Internal error: {exc!r}"))
            else:
                reply.result(result)

        self.spawn(f"acp-{reply.method}", run)

    def close(self, timeout: float = 5.0) -> list[str]:
        """Settle our pending requests with an error, join every thread
        (within ``timeout`` in all); return the names of those still running.
        Idempotent."""
        with self._outgoing_lock:
            self.closed.set()
            outgoing, self._outgoing = list(self._outgoing.values()), {}
        for pending in outgoing:
            pending.settle(error=_closed_error())
        deadline = time.monotonic() + timeout
        while True:
            with self._outgoing_lock:
                threads = [t for t in self._threads if t.is_alive()]
            if not threads or time.monotonic() >= deadline:
                break
            threads[0].join(max(0.0, deadline - time.monotonic()))
        stuck = sorted(t.name for t in threads)
        if stuck:
            logger.warning("event=acp_threads_still_running threads=%s", ",".join(stuck))
        return stuck


def _valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, str | int) and not isinstance(value, bool))


def _error(request_id: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_json()}


def _closed_error() -> RpcError:
    return RpcError(INTERNAL_ERROR, "the connection to the client is closed")
