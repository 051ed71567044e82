"""A fake model server for tests, speaking the real streaming wire protocols.

One local HTTP server answers both ``POST .../chat/completions`` (OpenAI
``chat.completion.chunk`` server-sent events ending in ``data: [DONE]``) and
``POST /v1/messages`` (Anthropic Messages events from ``message_start`` to
``message_stop``).  Tests queue *scripts*; each request plays the next one::

    with FakeProvider() as fake:
        fake.script([Text("hel"), Text("lo"), Usage(3, 2), Finish("stop")])
        provider = OpenAIProvider("m", fake.openai_base_url, "key")
        ...
        assert fake.requests[0].body["stream"] is True

A script is a list of steps played in order: :class:`Text`,
:class:`Reasoning` and :class:`ToolCall` stream deltas; :class:`Finish`
sends the finish reason (with the usage); :class:`Pause` waits; the end of
the script sends the protocol's end marker.  :class:`Usage` only sets the
token counts wherever it appears.  Without a :class:`Finish` the reason is
inferred (``tool_calls``/``tool_use`` if the script has tool calls, else
``stop``/``end_turn``). :class:`HTTPError` answers with an error status, the
provider's real error body and any headers (``Retry-After``); :class:`Hang`
stops sending (optionally before the response headers) until the client
disconnects or the server stops; :class:`Drop` closes the connection abruptly;
:class:`Close` ends the response cleanly but without the end marker;
:class:`StreamError` sends an in-stream error event. Finish reasons may be
written in either protocol's words (``stop`` or ``end_turn``); each side gets its own.

Responses use chunked transfer encoding and ``Connection: close``; every
event is written (and so flushed) on its own.  Closing the server wakes
every hanging handler and joins all threads.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- script steps


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Reasoning:
    """A reasoning chunk; OpenAI-compatible servers put it in ``delta.reasoning_content``
    (DeepSeek, vLLM) or ``delta.reasoning`` (OpenRouter, Ollama): ``openai_field``."""

    text: str
    openai_field: str = "reasoning_content"


@dataclass(frozen=True)
class ToolCall:
    """One tool call; ``arguments`` (JSON text, a dict, or the exact list of
    fragments) is sent in ``split`` fragments.  Without ``id`` one is made up
    (``call_fake<n>`` / ``toolu_fake<n>``); ``omit_id`` leaves it out of the
    OpenAI chunks, as some compatible servers do."""

    name: str
    arguments: str | dict[str, Any] | list[str] = "{}"
    id: str | None = None
    split: int = 3
    omit_id: bool = False

    def fragments(self) -> list[str]:
        if isinstance(self.arguments, list):
            return list(self.arguments)
        text = self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)
        size = max(1, -(-len(text) // max(1, self.split)))
        return [text[i : i + size] for i in range(0, len(text), size)] or [""]


@dataclass(frozen=True)
class Usage:
    """Token counts; ``prompt_tokens`` includes the cached ones, as OpenAI
    counts them (Anthropic's ``input_tokens`` is sent without them)."""

    prompt_tokens: int
    completion_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True)
class Finish:
    reason: str


@dataclass(frozen=True)
class HTTPError:
    """Answer with ``status`` and the provider's error JSON; must be the only step.

    ``headers`` go out with it, e.g. ``{"Retry-After": "1"}`` or
    ``{"retry-after-ms": "150"}``.
    """

    status: int
    message: str = "fake provider error"
    type: str | None = None
    headers: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class StreamError:
    """An error inside a 200 stream: Anthropic ``event: error``, OpenAI ``data: {"error"}``."""

    message: str = "Overloaded"
    type: str = "overloaded_error"


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class Together:
    """Text and reasoning chunks sent in one socket write, each still its own
    event and HTTP chunk: how a busy server's chunks reach a client."""

    steps: tuple[Text | Reasoning, ...]


@dataclass(frozen=True)
class Hang:
    """Send nothing more until the client goes away or the server stops.
    ``headers=False`` hangs before the response headers (must be the only step)."""

    headers: bool = True


@dataclass(frozen=True)
class Drop:
    """Close the connection abruptly, mid-response."""


@dataclass(frozen=True)
class Close:
    """End the response cleanly (last chunk sent) without ``[DONE]`` / ``message_stop``."""


Step = (
    Text
    | Reasoning
    | ToolCall
    | Usage
    | Finish
    | HTTPError
    | StreamError
    | Pause
    | Together
    | Hang
    | Drop
    | Close
)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: Any  # parsed JSON, or None
    protocol: str  # "openai", "anthropic", or "" for an unknown route
    raw: bytes = field(repr=False, default=b"")
    time: float = field(default_factory=time.monotonic)  # when it arrived


_TO_OPENAI = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}
_TO_ANTHROPIC = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


# ---------------------------------------------------------------- the server


class FakeProvider:
    """A scripted OpenAI + Anthropic streaming server on 127.0.0.1, port 0.

    Thread-safe.  Use as a context manager (or :meth:`start` / :meth:`close`).
    A request with no script queued gets the default script if one is set
    (:meth:`set_default`), else an HTTP 500 whose message says so.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._scripts: deque[list[Step]] = deque()  # guarded by _lock
        self._default: list[Step] | None = None  # guarded by _lock
        self._requests: list[RecordedRequest] = []  # guarded by _lock
        self.stopping = threading.Event()  # set by close(): wakes hanging handlers
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> FakeProvider:
        if self._server is not None:
            return self
        self._server = _Server((self._host, 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fakeprovider",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, wake hanging handlers, join every thread.  Idempotent."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self.stopping.set()
        server.shutdown()
        server.server_close()  # joins the handler threads
        thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- addresses

    @property
    def port(self) -> int:
        assert self._server is not None, "FakeProvider is not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    # -- scripts and records

    def script(self, steps: Iterable[Step]) -> None:
        """Queue the response for the next request that has none yet."""
        steps = _validate(steps)
        with self._lock:
            self._scripts.append(steps)

    def set_default(self, steps: Iterable[Step] | None) -> None:
        """The response played whenever the queue is empty (None: an HTTP 500)."""
        steps = None if steps is None else _validate(steps)
        with self._lock:
            self._default = steps

    @property
    def pending(self) -> int:
        """How many queued scripts no request has played yet."""
        with self._lock:
            return len(self._scripts)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def last_request(self) -> RecordedRequest:
        with self._lock:
            return self._requests[-1]

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until ``count`` requests arrived; raise TimeoutError otherwise."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(f"{len(self._requests)} of {count} requests arrived")
            return list(self._requests)

    def _record(self, request: RecordedRequest) -> tuple[int, list[Step] | None]:
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()
            steps = self._scripts.popleft() if self._scripts else self._default
            return len(self._requests), steps


def _validate(steps: Iterable[Step]) -> list[Step]:
    steps = list(steps)
    for index, step in enumerate(steps):
        last = index == len(steps) - 1
        if isinstance(step, HTTPError) and len(steps) != 1:
            raise ValueError("HTTPError must be the only step of a script")
        if isinstance(step, Hang) and not step.headers and len(steps) != 1:
            raise ValueError("Hang(headers=False) must be the only step of a script")
        if isinstance(step, Hang | Drop | Close | StreamError) and not last:
            raise ValueError(f"{type(step).__name__} must be the last step of a script")
    if sum(isinstance(step, Finish) for step in steps) > 1:
        raise ValueError("a script has at most one Finish")
    return steps


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops connections when a hundred
    # runs call the model at once; a dropped SYN costs a 1 s retransmit.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], handler: type, fake: FakeProvider) -> None:
        self.fake = fake
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (socket.getfqdn), which
        # can stall on a machine without working reverse DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("event=fake_handler_error client=%s", client_address, exc_info=True)


class _ClientGone(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # a client that stalls mid-request cannot block close() forever
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("event=fake_request " + format, *args)

    def do_GET(self) -> None:
        self._record(b"", None, "")
        self._send_json(404, {"error": {"message": f"no route GET {self.path}"}})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path = urlsplit(self.path).path
        if path.endswith("/chat/completions"):
            protocol = "openai"
        elif path == "/v1/messages":
            protocol = "anthropic"
        else:
            protocol = ""
        number, steps = self._record(raw, body, protocol)
        if not protocol:
            self._send_json(404, {"error": {"message": f"no route POST {path}"}})
            return
        if steps is None:
            steps = [HTTPError(500, "fake provider: no script queued for this request")]
        try:
            self._play(protocol, number, body if isinstance(body, dict) else {}, steps)
        except _ClientGone:
            pass
        except OSError:  # the client went away while we wrote
            pass

    def _record(self, raw: bytes, body: Any, protocol: str) -> tuple[int, list[Step] | None]:
        self.close_connection = True
        headers = {name.lower(): value for name, value in self.headers.items()}
        request = RecordedRequest(
            self.command, urlsplit(self.path).path, headers, body, protocol, raw
        )
        return self.server.fake._record(request)

    # -- responses

    def _send_json(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _play(self, protocol: str, number: int, body: dict[str, Any], steps: list[Step]) -> None:
        first = steps[0] if steps else None
        if isinstance(first, HTTPError):
            self._send_json(first.status, _error_body(protocol, first, number), first.headers)
            return
        if isinstance(first, Hang) and not first.headers:
            self._hang()
            return
        usage = next((s for s in steps if isinstance(s, Usage)), Usage(0, 0))
        has_calls = any(isinstance(s, ToolCall) for s in steps)
        encoder: _Encoder
        if protocol == "openai":
            encoder = _OpenAIEncoder(body, usage, number)
        else:
            encoder = _AnthropicEncoder(body, usage, number)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self._write(encoder.start())
        finished = False
        for step in steps:
            if isinstance(step, Pause):
                if self.server.fake.stopping.wait(step.seconds):
                    return
            elif isinstance(step, Hang):
                self._hang()
                return
            elif isinstance(step, Close):
                self._write_raw(b"0\r\n\r\n")
                return
            elif isinstance(step, Drop):
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            elif isinstance(step, StreamError):
                self._write(encoder.error(step))
                self._write_raw(b"0\r\n\r\n")
                return
            elif isinstance(step, Finish):
                self._write(encoder.finish(step.reason))
                finished = True
            elif isinstance(step, Text | Reasoning | ToolCall):
                self._write(encoder.delta(step))
            elif isinstance(step, Together):
                self._write([event for part in step.steps for event in encoder.delta(part)])
        if not finished:
            self._write(encoder.finish("tool_calls" if has_calls else "stop"))
        self._write(encoder.end())
        self._write_raw(b"0\r\n\r\n")

    def _write(self, events: list[bytes]) -> None:
        """One write (and flush) of ``events``, an HTTP chunk each."""
        self._write_raw(b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events))

    def _write_raw(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def _hang(self) -> None:
        """Wait for the server to stop; return early once the client hung up."""
        while not self.server.fake.stopping.wait(0.05):
            if _peer_closed(self.connection):
                raise _ClientGone


def _peer_closed(sock: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _error_body(protocol: str, error: HTTPError, number: int) -> dict[str, Any]:
    if protocol == "anthropic":
        kind = error.type or _ANTHROPIC_ERROR_TYPES.get(error.status, "api_error")
        return {
            "type": "error",
            "error": {"type": kind, "message": error.message},
            "request_id": f"req_fake{number}",
        }
    kind = error.type or ("server_error" if error.status >= 500 else "invalid_request_error")
    code = "invalid_api_key" if error.status == 401 else None
    return {"error": {"message": error.message, "type": kind, "param": None, "code": code}}


# ---------------------------------------------------------------- wire encoders


class _Encoder:
    def start(self) -> list[bytes]:
        raise NotImplementedError

    def delta(self, step: Text | Reasoning | ToolCall) -> list[bytes]:
        raise NotImplementedError

    def finish(self, reason: str) -> list[bytes]:
        raise NotImplementedError

    def end(self) -> list[bytes]:
        raise NotImplementedError

    def error(self, step: StreamError) -> list[bytes]:
        raise NotImplementedError


class _OpenAIEncoder(_Encoder):
    """``chat.completion.chunk`` objects as ``data:`` events, then ``data: [DONE]``."""

    def __init__(self, body: dict[str, Any], usage: Usage, number: int) -> None:
        self.id = f"chatcmpl-fake{number}"
        self.model = body.get("model") or "fake-model"
        self.created = int(time.time())
        self.usage = usage
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.next_tool_index = 0
        self.number = number

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def _delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._chunk([choice])

    def start(self) -> list[bytes]:
        return [self._delta({"role": "assistant", "content": "", "refusal": None})]

    def delta(self, step: Text | Reasoning | ToolCall) -> list[bytes]:
        if isinstance(step, Text):
            return [self._delta({"content": step.text})]
        if isinstance(step, Reasoning):
            return [self._delta({step.openai_field: step.text})]
        index = self.next_tool_index
        self.next_tool_index += 1
        first: dict[str, Any] = {"index": index}
        if not step.omit_id:
            first["id"] = step.id or f"call_fake{self.number}_{index}"
        first["type"] = "function"
        first["function"] = {"name": step.name, "arguments": ""}
        events = [self._delta({"tool_calls": [first]})]
        for fragment in step.fragments():
            call = {"index": index, "function": {"arguments": fragment}}
            events.append(self._delta({"tool_calls": [call]}))
        return events

    def finish(self, reason: str) -> list[bytes]:
        events = [self._delta({}, _TO_OPENAI.get(reason, reason))]
        if self.include_usage:
            usage = {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
                "total_tokens": self.usage.prompt_tokens + self.usage.completion_tokens,
                "prompt_tokens_details": {
                    "cached_tokens": self.usage.cache_read_tokens,
                    "audio_tokens": 0,
                },
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            }
            events.append(self._chunk([], usage=usage))
        return events

    def end(self) -> list[bytes]:
        return [b"data: [DONE]\n\n"]

    def error(self, step: StreamError) -> list[bytes]:
        body = {"error": {"message": step.message, "type": step.type, "param": None, "code": None}}
        return [b"data: " + json.dumps(body).encode() + b"\n\n"]


class _AnthropicEncoder(_Encoder):
    """Messages API events from ``message_start`` to ``message_stop``.

    The real API sends a ``ping`` after ``message_start`` and a ``signature_delta`` before a
    thinking block stops; so does this one.
    """

    def __init__(self, body: dict[str, Any], usage: Usage, number: int) -> None:
        self.model = body.get("model") or "fake-model"
        self.usage = usage
        self.number = number
        self.index = -1  # index of the last content block opened
        self.open: str | None = None  # type of the open content block

    @staticmethod
    def _event(kind: str, data: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

    def _open(self, block: dict[str, Any]) -> list[bytes]:
        events = self._close()
        self.index += 1
        self.open = block["type"]
        events.append(
            self._event("content_block_start", {"index": self.index, "content_block": block})
        )
        return events

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":
            delta = {"type": "signature_delta", "signature": f"fakesig{self.number}"}
            events.append(self._event("content_block_delta", {"index": self.index, "delta": delta}))
        events.append(self._event("content_block_stop", {"index": self.index}))
        self.open = None
        return events

    def _block_delta(self, delta: dict[str, Any]) -> bytes:
        return self._event("content_block_delta", {"index": self.index, "delta": delta})

    def start(self) -> list[bytes]:
        message = {
            "id": f"msg_fake{self.number}",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self.usage.prompt_tokens
                - self.usage.cache_read_tokens
                - self.usage.cache_write_tokens,
                "cache_creation_input_tokens": self.usage.cache_write_tokens,
                "cache_read_input_tokens": self.usage.cache_read_tokens,
                "output_tokens": 1,
            },
        }
        return [self._event("message_start", {"message": message}), self._event("ping", {})]

    def delta(self, step: Text | Reasoning | ToolCall) -> list[bytes]:
        events: list[bytes] = []
        if isinstance(step, Text):
            if self.open != "text":
                events += self._open({"type": "text", "text": ""})
            events.append(self._block_delta({"type": "text_delta", "text": step.text}))
            return events
        if isinstance(step, Reasoning):
            if self.open != "thinking":
                events += self._open({"type": "thinking", "thinking": "", "signature": ""})
            events.append(self._block_delta({"type": "thinking_delta", "thinking": step.text}))
            return events
        call_id = step.id or f"toolu_fake{self.number}_{self.index + 1}"
        events += self._open({"type": "tool_use", "id": call_id, "name": step.name, "input": {}})
        for fragment in step.fragments():
            events.append(self._block_delta({"type": "input_json_delta", "partial_json": fragment}))
        events += self._close()
        return events

    def finish(self, reason: str) -> list[bytes]:
        events = self._close()
        delta = {"stop_reason": _TO_ANTHROPIC.get(reason, reason), "stop_sequence": None}
        usage = {"output_tokens": self.usage.completion_tokens}
        events.append(self._event("message_delta", {"delta": delta, "usage": usage}))
        return events

    def end(self) -> list[bytes]:
        return [self._event("message_stop", {})]

    def error(self, step: StreamError) -> list[bytes]:
        return [self._event("error", {"error": {"type": step.type, "message": step.message}})]
