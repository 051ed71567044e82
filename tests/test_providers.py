"""The HTTP providers against a local fake server that speaks the real protocols."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from fakeprovider import (
    Close,
    Drop,
    FakeProvider,
    Finish,
    Hang,
    HTTPError,
    Pause,
    Reasoning,
    StreamError,
    Text,
    Together,
    ToolCall,
    Usage,
)

from crushd.cancel import Cancelled, CancelToken
from crushd.providers import (
    Provider,
    ProviderError,
    ReasoningDelta,
    StepFinish,
    StepRequest,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    ToolSpec,
    create_provider,
    sse,
)
from crushd.providers import Usage as UsageEvent
from crushd.providers.anthropic import AnthropicProvider
from crushd.providers.base import on_wait
from crushd.providers.echo import EchoProvider
from crushd.providers.openai import OpenAIProvider
from crushd.providers.sse import iter_sse

PROMPT = StepRequest(
    system="be brief", messages=[{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]
)
VIEW = ToolSpec(
    name="view",
    description="Read a file",
    parameters={"type": "object", "properties": {"path": {"type": "string"}}},
)


def make(kind: str, fake: FakeProvider, api_key: str | None = "sk-test", **kw) -> Provider:
    if kind == "openai":
        return OpenAIProvider("gpt-test", fake.openai_base_url + "/", api_key, **kw)
    return AnthropicProvider("claude-test", fake.anthropic_base_url, api_key, **kw)


def collect(provider: Provider, request: StepRequest = PROMPT, token: CancelToken | None = None):
    try:
        return list(provider.stream(request, token or CancelToken()))
    finally:
        provider.close()


def collect_until_error(provider: Provider, token: CancelToken | None = None):
    """The events yielded before the stream raised, and the exception."""
    events = []
    try:
        with pytest.raises((ProviderError, Cancelled)) as info:
            for event in provider.stream(PROMPT, token or CancelToken()):
                events.append(event)
    finally:
        provider.close()
    return events, info.value


def streamed_text(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


BOTH = pytest.mark.parametrize("kind", ["openai", "anthropic"])


# ---------------------------------------------------------------- streaming


@BOTH
def test_streams_text_usage_and_finish(fake, kind):
    fake.script([Text("hel"), Text("lo "), Text("world"), Usage(12, 3), Finish("stop")])
    events = collect(make(kind, fake))
    assert events == [
        TextDelta("hel"),
        TextDelta("lo "),
        TextDelta("world"),
        UsageEvent(prompt_tokens=12, completion_tokens=3),
        StepFinish("end_turn"),
    ]


@BOTH
def test_streams_reasoning_before_text(fake, kind):
    fake.script([Reasoning("think"), Reasoning("ing"), Text("answer")])
    events = collect(make(kind, fake))
    assert events[:3] == [ReasoningDelta("think"), ReasoningDelta("ing"), TextDelta("answer")]
    assert events[-1] == StepFinish("end_turn")


def test_openai_reads_the_reasoning_field_too(fake):
    fake.script([Reasoning("a", openai_field="reasoning"), Text("b")])
    events = collect(make("openai", fake))
    assert events[:2] == [ReasoningDelta("a"), TextDelta("b")]


@BOTH
def test_two_tool_calls_split_across_chunks(fake, kind):
    fake.script(
        [
            Text("Let me look."),
            ToolCall("view", ['{"pa', 'th": "a', '.txt"}'], id="call_a"),
            ToolCall("ls", {"path": "src", "depth": 2}, id="call_b", split=4),
            Usage(30, 20),
        ]
    )
    events = collect(make(kind, fake))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert starts == [ToolCallStart("call_a", "view"), ToolCallStart("call_b", "ls")]
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert len(deltas) >= 5  # the arguments really arrived in fragments
    args = {s.id: "".join(d.input_delta for d in deltas if d.id == s.id) for s in starts}
    assert json.loads(args["call_a"]) == {"path": "a.txt"}
    assert json.loads(args["call_b"]) == {"path": "src", "depth": 2}
    # every delta of a call comes after its start
    assert events.index(starts[1]) > max(
        i for i, e in enumerate(events) if isinstance(e, ToolCallDelta) and e.id == "call_a"
    )
    assert streamed_text(events) == "Let me look."
    assert events[-2:] == [UsageEvent(30, 20), StepFinish("tool_use")]


def test_openai_generates_ids_a_server_omits(fake):
    fake.script(
        [ToolCall("view", '{"path": "x"}', omit_id=True), ToolCall("ls", "{}", omit_id=True)]
    )
    events = collect(make("openai", fake))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.name for s in starts] == ["view", "ls"]
    assert all(s.id for s in starts) and starts[0].id != starts[1].id
    view_args = "".join(
        e.input_delta for e in events if isinstance(e, ToolCallDelta) and e.id == starts[0].id
    )
    assert view_args == '{"path": "x"}'


@pytest.mark.parametrize(
    ("kind", "wire", "expected"),
    [
        ("openai", "stop", "end_turn"),
        ("openai", "length", "max_tokens"),
        ("openai", "tool_calls", "tool_use"),
        ("openai", "function_call", "tool_use"),
        ("openai", "content_filter", "unknown"),
        ("anthropic", "end_turn", "end_turn"),
        ("anthropic", "stop_sequence", "end_turn"),
        ("anthropic", "max_tokens", "max_tokens"),
        ("anthropic", "tool_use", "tool_use"),
        ("anthropic", "refusal", "unknown"),
    ],
)
def test_finish_reasons(fake, kind, wire, expected):
    fake.script([Text("x"), Finish(wire)])
    assert collect(make(kind, fake))[-1] == StepFinish(expected)


# ---------------------------------------------------------------- failures


@BOTH
@pytest.mark.parametrize("status", [401, 500])
def test_http_errors_carry_the_provider_message(fake, kind, status):
    fake.script([HTTPError(status, f"nope {status}: check your key")])
    events, error = collect_until_error(make(kind, fake))
    assert events == []
    assert isinstance(error, ProviderError)
    assert error.title == f"Provider returned HTTP {status}"
    assert error.details == f"nope {status}: check your key"


def test_http_error_without_json_keeps_the_raw_text():
    from crushd.providers.sse import error_message

    assert error_message("<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert error_message('{"error": "model \\"x\\" not found"}') == 'model "x" not found'


@BOTH
def test_unreachable_endpoint_fails_fast(kind):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if kind == "openai":
        provider = OpenAIProvider("m", f"http://127.0.0.1:{port}/v1", None)
    else:
        provider = AnthropicProvider("m", f"http://127.0.0.1:{port}", None)
    started = time.monotonic()
    events, error = collect_until_error(provider)
    assert time.monotonic() - started < 5
    assert isinstance(error, ProviderError)
    assert error.title == "Cannot reach provider"
    assert str(port) in error.details


@BOTH
@pytest.mark.parametrize("headers", [True, False], ids=["mid-stream", "before-headers"])
def test_cancel_interrupts_a_hung_stream(fake, kind, headers):
    if headers:
        fake.script([Text("partial"), Hang()])
    else:
        fake.script([Hang(headers=False)])
    token = CancelToken(name="test")
    cancelled_at: list[float] = []

    def cancel() -> None:
        cancelled_at.append(time.monotonic())
        token.cancel("user")

    timer = threading.Timer(0.3, cancel)
    timer.start()
    try:
        events, error = collect_until_error(make(kind, fake), token)
        returned_at = time.monotonic()
    finally:
        timer.cancel()
        timer.join()
    assert isinstance(error, Cancelled)
    assert error.reason == "user"
    assert returned_at - cancelled_at[0] < 1.0
    assert streamed_text(events) == ("partial" if headers else "")


@BOTH
def test_cancelled_token_makes_no_request(fake, kind):
    token = CancelToken()
    token.cancel()
    _, error = collect_until_error(make(kind, fake), token)
    assert isinstance(error, Cancelled)
    assert fake.requests == []


@BOTH
def test_dropped_connection_keeps_earlier_deltas(fake, kind):
    fake.script([Text("one "), Pause(0.05), Text("two"), Drop()])
    events, error = collect_until_error(make(kind, fake))
    assert streamed_text(events) == "one two"
    assert isinstance(error, ProviderError)
    assert error.title == "Provider stream ended early"


@BOTH
def test_clean_end_without_end_marker(fake, kind):
    fake.script([Text("cut"), Close()])
    events, error = collect_until_error(make(kind, fake))
    assert streamed_text(events) == "cut"
    assert isinstance(error, ProviderError)
    assert error.title == "Provider stream ended early"


@BOTH
def test_missing_end_marker_after_the_finish_is_tolerated(fake, kind):
    # Some OpenAI-compatible servers end the body without "data: [DONE]".
    fake.script([Text("done"), Usage(4, 1), Finish("stop"), Close()])
    events = collect(make(kind, fake))
    assert events == [TextDelta("done"), UsageEvent(4, 1), StepFinish("end_turn")]


def test_openai_parallel_calls_reusing_one_index():
    # Ollama sends every parallel call with index 0 and a new id.
    from crushd.providers.openai import _StepState

    state = _StepState()
    chunks = [
        {"index": 0, "id": "a", "function": {"name": "view", "arguments": '{"path":'}},
        {"index": 0, "id": "a", "function": {"arguments": '"x"}'}},
        {"index": 0, "id": "b", "function": {"name": "ls", "arguments": "{}"}},
    ]
    events = []
    for call in chunks:
        events += state.feed({"choices": [{"delta": {"tool_calls": [call]}}]})
    assert events == [
        ToolCallStart("a", "view"),
        ToolCallDelta("a", '{"path":'),
        ToolCallDelta("a", '"x"}'),
        ToolCallStart("b", "ls"),
        ToolCallDelta("b", "{}"),
    ]


@BOTH
def test_error_event_in_the_stream(fake, kind):
    fake.script([Text("a"), StreamError("Overloaded", "overloaded_error")])
    events, error = collect_until_error(make(kind, fake))
    assert streamed_text(events) == "a"
    assert isinstance(error, ProviderError)
    assert error.details == "Overloaded"


@BOTH
def test_no_script_is_an_error_not_a_hang(fake, kind):
    _, error = collect_until_error(make(kind, fake))
    assert isinstance(error, ProviderError)
    assert "no script queued" in error.details


# ---------------------------------------------------------------- waits and pacing


def stream_logging_waits(provider: Provider, shown: bool, token: CancelToken | None = None):
    """The stream's events with ``"wait"`` where a read was announced; the
    consumer lets reads be paced once it has a delta (when ``shown``)."""
    log: list = []

    def hook() -> bool:
        log.append("wait")
        return shown and any(isinstance(e, TextDelta) for e in log)

    with on_wait(hook):
        try:
            for event in provider.stream(PROMPT, token or CancelToken()):
                log.append(event)
        finally:
            provider.close()
    return log


@BOTH
def test_a_wait_is_announced_before_every_read_and_only_then(fake, kind):
    fake.script([Together((Text("one "), Text("two "))), Pause(0.3), Text("three")])
    log = stream_logging_waits(make(kind, fake), shown=False)
    texts = [
        e.text if isinstance(e, TextDelta) else e
        for e in log
        if e == "wait" or isinstance(e, TextDelta)
    ]
    first = texts.index("one ")
    # Chunks that came in one write are read at once; the pause is a read.
    assert texts[first : first + 4] == ["one ", "two ", "wait", "three"]
    assert texts[0] == "wait"


@pytest.fixture
def paced(monkeypatch):
    """Pace every stream, even one alone, by ``seconds`` per read."""

    def pace(seconds: float) -> None:
        monkeypatch.setattr(sse, "PACE_FROM", 1)
        monkeypatch.setattr(sse, "PACE_PER_STREAM", seconds)
        monkeypatch.setattr(sse, "PACE_MAX", seconds)

    return pace


def trickle(count: int, gap: float) -> list:
    steps: list = [Text("w0 ")]
    for i in range(1, count):
        steps += [Pause(gap), Text(f"w{i} ")]
    return steps


@BOTH
def test_paced_reads_take_several_chunks_at_once(fake, kind, paced):
    words = "".join(f"w{i} " for i in range(12))
    fake.script(trickle(12, 0.03))
    unpaced = stream_logging_waits(make(kind, fake), shown=True)  # one stream: no pacing
    paced(0.15)
    fake.script(trickle(12, 0.03))
    started = time.monotonic()
    log = stream_logging_waits(make(kind, fake), shown=True)
    took = time.monotonic() - started
    assert streamed_text(unpaced) == streamed_text(log) == words
    # 12 chunks over 0.33 s: read one by one unpaced, a few at a time paced.
    assert unpaced.count("wait") >= 10
    assert log.count("wait") <= 6
    assert took < 2.0


@BOTH
def test_no_pacing_before_the_consumer_has_shown_text(fake, kind, paced):
    paced(1.0)
    fake.script([Pause(0.1), Text("first"), Pause(0.1), Text(" second")])
    started = time.monotonic()
    log = stream_logging_waits(make(kind, fake), shown=False)
    assert streamed_text(log) == "first second"
    assert time.monotonic() - started < 0.9  # no read waited its second


@BOTH
def test_a_cancel_ends_a_paced_wait_at_once(fake, kind, paced):
    paced(30.0)
    fake.script([Text("first"), Pause(0.2), Text(" second")])
    token = CancelToken()
    log: list = []

    def hook() -> bool:
        if log:  # the first delta was shown: this read waits 30 s
            threading.Timer(0.1, token.cancel).start()
        return bool(log)

    provider = make(kind, fake)
    started = time.monotonic()
    with on_wait(hook), pytest.raises(Cancelled):
        for event in provider.stream(PROMPT, token):
            if isinstance(event, TextDelta):
                log.append(event)
    provider.close()
    assert time.monotonic() - started < 2.0
    assert [e.text for e in log] == ["first"]


def test_read_pace_grows_with_the_streams_in_flight():
    assert sse.read_pace(1) == sse.read_pace(sse.PACE_FROM - 1) == 0.0
    assert sse.read_pace(sse.PACE_FROM) == pytest.approx(sse.PACE_FROM * sse.PACE_PER_STREAM)
    assert sse.read_pace(10_000) == sse.PACE_MAX


@BOTH
def test_one_provider_serves_parallel_steps(fake, kind):
    """Each step in flight has a client of its own (sharing one, it would
    scan the others' connections), and there are never more clients than
    steps were in flight at once."""
    fake.set_default([Text("a"), Pause(0.2), Text("b")])
    provider = make(kind, fake)
    in_flight = threading.Barrier(4, timeout=5)
    results: list[str] = []

    def step() -> None:
        text = ""
        for event in provider.stream(PROMPT, CancelToken()):
            if isinstance(event, TextDelta):
                text += event.text
                if event.text == "a":
                    in_flight.wait()  # all four streams are open now
        results.append(text)

    try:
        threads = [threading.Thread(target=step) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        assert results == ["ab"] * 4
        assert provider.clients.count == 4
        for _ in range(3):
            assert streamed_text(provider.stream(PROMPT, CancelToken())) == "ab"
        assert provider.clients.count == 4
    finally:
        provider.close()


def test_clients_are_lent_one_at_a_time_and_all_closed_at_the_end():
    clients = sse.Clients(5, 5, None)
    with clients.lease() as first, clients.lease() as second:
        assert first is not second
    with clients.lease() as again:
        assert again in (first, second)
    with clients.lease() as lent:
        clients.close()  # a request still in flight is closed too
        assert lent.is_closed
    assert first.is_closed and second.is_closed
    with pytest.raises(ProviderError, match="Model unavailable"), clients.lease():
        pass
    clients.close()  # idempotent


def test_a_step_after_close_fails_with_a_clear_error(fake):
    provider = make("openai", fake)
    provider.close()
    with pytest.raises(ProviderError) as info:
        list(provider.stream(PROMPT, CancelToken()))
    assert info.value.title == "Model unavailable"
    assert not info.value.retryable
    assert fake.requests == []


def test_the_clients_share_one_cookie_jar(fake):
    """A cookie a provider sets (a load balancer's, say) goes out on later
    requests whichever client sends them, as with one shared client."""
    fake.script([HTTPError(429, headers={"Set-Cookie": "route=node-2; Path=/"})])
    fake.script([Text("ok")])
    clients = sse.Clients(5, 5, None)
    url = fake.openai_base_url + "/chat/completions"
    try:
        with clients.lease() as first, clients.lease() as second:
            assert first.post(url, json={"stream": True}).status_code == 429
            assert second.post(url, json={"stream": True}).status_code == 200
    finally:
        clients.close()
    assert "cookie" not in fake.requests[0].headers
    assert fake.requests[1].headers["cookie"] == "route=node-2"


# ---------------------------------------------------------------- request shape

HISTORY = StepRequest(
    system="You are crushd.",
    messages=[
        {"role": "user", "parts": [{"type": "text", "text": "read a.txt"}]},
        {
            "role": "assistant",
            "parts": [
                {"type": "reasoning", "text": "need to read it"},
                {"type": "text", "text": "Reading."},
                {
                    "type": "tool_call",
                    "id": "c1",
                    "name": "view",
                    "input": '{"path": "a.txt"}',
                    "finished": True,
                },
                {
                    "type": "tool_call",
                    "id": "c2",
                    "name": "ls",
                    "input": "{broken",
                    "finished": True,
                },
                {"type": "finish", "reason": "tool_use", "message": "", "details": "", "time": 1},
            ],
        },
        {
            "role": "tool",
            "parts": [
                {
                    "type": "tool_result",
                    "tool_call_id": "c1",
                    "name": "view",
                    "content": "1|hi",
                    "is_error": False,
                },
                {
                    "type": "tool_result",
                    "tool_call_id": "c2",
                    "name": "ls",
                    "content": "Tool execution canceled",
                    "is_error": True,
                },
            ],
        },
        {"role": "assistant", "parts": [{"type": "finish", "reason": "canceled"}]},
        {"role": "user", "parts": [{"type": "text", "text": "go on"}]},
    ],
    tools=[VIEW],
)


def test_openai_request_shape(fake):
    fake.script([Text("ok")])
    collect(make("openai", fake, max_tokens=100), HISTORY)
    (request,) = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    body = request.body
    assert body["model"] == "gpt-test"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 100
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "view",
                "description": "Read a file",
                "parameters": VIEW.parameters,
            },
        }
    ]
    assert body["messages"] == [
        {"role": "system", "content": "You are crushd."},
        {"role": "user", "content": "read a.txt"},
        {
            "role": "assistant",
            "content": "Reading.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "view", "arguments": '{"path": "a.txt"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "ls", "arguments": "{broken"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "1|hi"},
        {"role": "tool", "tool_call_id": "c2", "content": "Tool execution canceled"},
        {"role": "user", "content": "go on"},
    ]


def test_openai_sends_no_authorization_without_key(fake):
    fake.script([Text("ok")])
    collect(make("openai", fake, api_key=None, extra_headers={"X-Title": "crushd"}))
    headers = fake.last_request.headers
    assert "authorization" not in headers
    assert headers["x-title"] == "crushd"
    assert "tools" not in fake.last_request.body


def test_anthropic_request_shape(fake):
    fake.script([Text("ok")])
    collect(make("anthropic", fake, max_tokens=512), HISTORY)
    (request,) = fake.requests
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == "sk-test"
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["content-type"] == "application/json"
    body = request.body
    assert body["model"] == "claude-test"
    assert body["max_tokens"] == 512
    assert body["stream"] is True
    ephemeral = {"type": "ephemeral"}
    assert body["system"] == [
        {"type": "text", "text": "You are crushd.", "cache_control": ephemeral}
    ]
    assert body["tools"] == [
        {
            "name": "view",
            "description": "Read a file",
            "input_schema": VIEW.parameters,
            "cache_control": ephemeral,
        }
    ]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "read a.txt"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Reading."},
                {"type": "tool_use", "id": "c1", "name": "view", "input": {"path": "a.txt"}},
                {
                    "type": "tool_use",
                    "id": "c2",
                    "name": "ls",
                    "input": {},
                    "cache_control": ephemeral,
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "c1", "content": "1|hi", "is_error": False},
                {
                    "type": "tool_result",
                    "tool_use_id": "c2",
                    "content": "Tool execution canceled",
                    "is_error": True,
                },
                {"type": "text", "text": "go on", "cache_control": ephemeral},
            ],
        },
    ]


def test_anthropic_sends_no_key_header_without_key(fake):
    fake.script([Text("ok")])
    collect(make("anthropic", fake, api_key=None))
    assert "x-api-key" not in fake.last_request.headers
    assert "system" in fake.last_request.body and "tools" not in fake.last_request.body


# ---------------------------------------------------------------- wire format via the SDKs


def test_fake_speaks_openai_to_the_official_sdk(fake):
    import openai

    fake.script(
        [
            Text("Hello"),
            Text(" there"),
            ToolCall("view", {"path": "a.txt"}, id="call_1"),
            ToolCall("ls", {"path": "."}, id="call_2"),
            Usage(11, 7, cache_read_tokens=5),
        ]
    )
    with openai.OpenAI(base_url=fake.openai_base_url, api_key="x", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, calls, usage, finish = "", {}, None, None
        with stream:
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    finish = choice.finish_reason or finish
                    for call in choice.delta.tool_calls or []:
                        entry = calls.setdefault(call.index, {"id": None, "name": "", "args": ""})
                        if call.id:
                            entry["id"] = call.id
                        if call.function and call.function.name:
                            entry["name"] = call.function.name
                        if call.function and call.function.arguments:
                            entry["args"] += call.function.arguments
    assert text == "Hello there"
    assert finish == "tool_calls"
    assert [(c["id"], c["name"], json.loads(c["args"])) for c in calls.values()] == [
        ("call_1", "view", {"path": "a.txt"}),
        ("call_2", "ls", {"path": "."}),
    ]
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 7, 18)
    assert usage.prompt_tokens_details.cached_tokens == 5


def test_fake_speaks_anthropic_to_the_official_sdk(fake):
    import anthropic

    fake.script(
        [
            Reasoning("hmm"),
            Text("Hello"),
            Text(" there"),
            ToolCall("view", {"path": "a.txt"}, id="toolu_1"),
            ToolCall("ls", {"path": "."}, id="toolu_2"),
            Usage(11, 7, cache_read_tokens=4, cache_write_tokens=2),
        ]
    )
    fake.script([Text("raw "), Text("events"), Finish("end_turn")])
    with anthropic.Anthropic(
        base_url=fake.anthropic_base_url, api_key="x", max_retries=0
    ) as client:
        with client.messages.stream(
            model="claude-test", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            message = stream.get_final_message()
        raw = client.messages.create(
            model="claude-test",
            max_tokens=100,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
        with raw:
            types = [event.type for event in raw]
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert message.content[0].thinking == "hmm"
    assert message.content[1].text == "Hello there"
    assert [(b.id, b.name, b.input) for b in message.content[2:]] == [
        ("toolu_1", "view", {"path": "a.txt"}),
        ("toolu_2", "ls", {"path": "."}),
    ]
    assert message.stop_reason == "tool_use"
    # input_tokens counts only what neither came from nor went to the cache.
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 7)
    assert message.usage.cache_read_input_tokens == 4
    assert message.usage.cache_creation_input_tokens == 2
    assert [r.path for r in fake.requests] == ["/v1/messages", "/v1/messages"]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert types.count("content_block_delta") == 2


# ---------------------------------------------------------------- factory and parser


def test_create_provider():
    echo = create_provider("echo", model=None, base_url=None, api_key=None, echo_delay=0)
    assert isinstance(echo, EchoProvider) and echo.model == "echo" and echo.delay == 0
    openai = create_provider("openai", model="llama3.2", base_url=None, api_key=None)
    assert isinstance(openai, OpenAIProvider)
    assert openai.url == "https://api.openai.com/v1/chat/completions"
    anthropic = create_provider("anthropic", model="claude-x", base_url="http://h:1/", api_key="k")
    assert isinstance(anthropic, AnthropicProvider) and anthropic.url == "http://h:1/v1/messages"
    default = create_provider("anthropic", model="claude-x", base_url=None, api_key=None)
    assert default.url == "https://api.anthropic.com/v1/messages"
    for provider in (echo, openai, anthropic, default):
        provider.close()
    with pytest.raises(ValueError, match="needs a model"):
        create_provider("openai", model=None, base_url=None, api_key=None)
    with pytest.raises(ValueError, match="unknown provider 'gpt'"):
        create_provider("gpt", model="x", base_url=None, api_key=None)


def test_iter_sse():
    lines = [
        ": comment",
        "event: message_start",
        "data: {}",
        "",
        "data: line one",
        "data:line two",
        "id: 7",
        "",
        "",
        "event: x",
        "data: unterminated",
    ]
    assert list(iter_sse(lines)) == [("message_start", "{}"), ("", "line one\nline two")]
