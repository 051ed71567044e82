"""What a malicious model must not do to the daemon: crash a run with a tool
call it cannot parse, leave a run ``running`` for good, stop the daemon from
starting, or grow one message (and the daemon's memory) without bound.

Each hole was found against a real ``crushd serve``; the tests plant the
attack through the fake model server, over a real socket, and check the
records the contract promises.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeprovider
import pytest
from conftest import wait_for
from fakeprovider import FakeProvider, Hang, Text, ToolCall, Usage
from helpers import (
    api,
    assert_sealed,
    event_stream,
    finish_of,
    is_type,
    messages,
    parts,
    register,
    run_events,
    submit,
    wait_terminal,
)

import crushd.store
from crushd.common import MAX_JSON_DEPTH, json_depth, load_json, text_of
from crushd.events import EventHub
from crushd.providers import sse
from crushd.providers.base import EventTooLarge
from crushd.store import WorkspaceStore
from crushd.writer import MessageWriter, utf8_prefix, utf8_size

BOTH = pytest.mark.parametrize("protocol", ["openai", "anthropic"])
#: About 2 KB of arguments nested a thousand deep: json.loads raises
#: RecursionError for it, which once crashed the run and every start after.
NESTED = '{"a":' * 1000 + "1" + "}" * 1000
SMALL_CAP = 64 * 1024


# ---------------------------------------------------------------- an endless model


@dataclass(frozen=True)
class Forever:
    """Stream ``text`` as fast as the client reads it, for up to ``seconds``,
    then finish normally: a model that does not stop on its own."""

    text: str
    seconds: float = 10.0


@dataclass(frozen=True)
class Raw:
    """Bytes of the response body exactly as given (a script of these is the
    whole body: the test writes the protocol's events itself)."""

    data: bytes


class _EndlessHandler(fakeprovider._Handler):
    """The fake's handler, plus :class:`Forever` as a script's only step and
    scripts of :class:`Raw` steps."""

    def _headers(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()

    def _play(self, protocol: str, number: int, body: dict[str, Any], steps: list[Any]) -> None:
        if steps and all(isinstance(step, Raw) for step in steps):
            self._headers()
            for step in steps:
                self._write([step.data])
            self._write_raw(b"0\r\n\r\n")
            return
        if not (steps and isinstance(steps[0], Forever)):
            super()._play(protocol, number, body, steps)
            return
        forever = steps[0]
        encoder: Any
        if protocol == "openai":
            encoder = fakeprovider._OpenAIEncoder(body, Usage(0, 0), number)
        else:
            encoder = fakeprovider._AnthropicEncoder(body, Usage(0, 0), number)
        self._headers()
        self._write(encoder.start())
        self._write(encoder.delta(Text(forever.text)))  # opens Anthropic's text block
        steady = encoder.delta(Text(forever.text)) * 64
        batch = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in steady)
        deadline = time.monotonic() + forever.seconds
        # A client that hangs up makes a write raise OSError: the handler ends.
        while time.monotonic() < deadline and not self.server.fake.stopping.is_set():
            self._write_raw(batch)
        self._write(encoder.finish("stop"))
        self._write(encoder.end())
        self._write_raw(b"0\r\n\r\n")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    """The fake model server (this module's own, for :class:`Forever`)."""
    monkeypatch.setattr(fakeprovider, "_Handler", _EndlessHandler)
    with FakeProvider() as server:
        yield server


def openai_daemon(daemon_factory, fake: FakeProvider, *extra: str):
    args = ("--provider", "openai", "--base-url", fake.openai_base_url, "--model", "m", *extra)
    return daemon_factory(*args, env={"OPENAI_API_KEY": "sk-safety-test"})


def deltas_of(events: list[dict[str, Any]], message_id: str) -> str:
    """The message's deltas as published, after its last ``message.reset``."""
    text: list[str] = []
    for event in events:
        payload = event["payload"] or {}
        if payload.get("message_id") != message_id:
            continue
        if event["type"] == "message.reset":
            text = []
        elif event["type"] == "message.delta":
            text.append(payload["delta"])
    return "".join(text)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


# ---------------------------------------------------------------- JSON from outside


def test_load_json_turns_every_failure_into_value_error():
    assert load_json('{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    assert load_json(b"[1]") == [1]
    assert load_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    too_deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    for bad, why in [
        (NESTED, "nested deeper than 64 levels"),  # json.loads: RecursionError
        (too_deep, "nested deeper than 64 levels"),  # parses, but is too deep
        (too_deep.encode(), "nested deeper than 64 levels"),
        ('{"a": ', "not valid JSON"),
        (b"\xff", "not valid JSON"),
        (None, "not valid JSON"),
    ]:
        with pytest.raises(ValueError, match=why):
            load_json(bad)
    # Brackets inside strings do not count as nesting.
    assert load_json(json.dumps(["[" * 500])) == ["[" * 500]


def test_json_depth_is_measured_without_recursion():
    deep: list[Any] = []
    node = deep
    for _ in range(100_000):  # far past the recursion limit
        node.append([])
        node = node[0]
    assert json_depth(deep) == 100_001
    assert json_depth(deep, limit=10) == 11  # stops as soon as it is past the limit
    assert json_depth({"a": [1, {"b": {}}], "c": 2}) == 4
    assert json_depth("scalar") == 0


def test_a_provider_event_nested_too_deep_is_invalid_data_not_a_crash():
    with pytest.raises(sse.ProviderError, match="nested deeper"):
        sse.decode_json('{"type": "content_block_start", "content_block": ' + NESTED + "}")
    # An error body nested absurdly deep is shown as text, not parsed.
    assert sse.error_message(NESTED) == NESTED[: sse.MAX_DETAILS]


# ---------------------------------------------------------------- stream lines and events


def test_sse_lines_end_only_where_the_sse_specification_says():
    chunks = ["data: a\u2028b\u2029c\x85d\x0be\r", "\n", "\ndata: two\r\rdata: th", "ree\n", "last"]
    assert list(sse.sse_lines(chunks)) == [
        "data: a\u2028b\u2029c\x85d\x0be",  # none of those ends a line in SSE
        "",
        "data: two",
        "",
        "data: three",
        "last",
    ]
    chunks = ['data: {"x": "', "y" * 600, '"}\n\n']
    assert list(sse.iter_sse(sse.sse_lines(chunks, 1000), 1000)) == [
        ("", '{"x": "' + "y" * 600 + '"}')
    ]


def test_a_line_or_an_event_past_the_limit_is_refused_before_it_is_whole():
    def endless():
        yield "data: "
        while True:
            yield "x" * 100

    with pytest.raises(EventTooLarge, match="more than 1000 characters"):
        list(sse.sse_lines(endless(), 1000))
    with pytest.raises(EventTooLarge):
        list(sse.sse_lines(["data: " + "x" * 2000 + "\n\n"], 1000))  # within one chunk
    many = ("data: " + "x" * 90 for _ in range(10**9))  # data lines, and never a blank one
    with pytest.raises(EventTooLarge):
        list(sse.iter_sse(many, 1000))
    assert sse.event_limit(None) is None
    assert sse.event_limit(1000) == 6 * 1000 + 64 * 1024


# ---------------------------------------------------------------- nested tool calls


def test_nested_tool_arguments_are_a_tool_error_and_recovery_never_stops_the_daemon(
    fake, daemon_factory, project
):
    fake.script([ToolCall("view", NESTED, split=4)])
    fake.script([Text("those arguments were broken")])
    daemon = openai_daemon(daemon_factory, fake)
    with daemon.client() as http:
        wid = register(http, project)
        run = submit(http, wid, "read something")
        sid = run["session_id"]
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed", done
        assert done["text"] == "those arguments were broken"
        stored = messages(http, wid, sid)
        assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
        assert_sealed(stored)
        (call,) = parts(stored[1], "tool_call")
        assert call["input"] == "{}" and call["finished"] is True
        (result,) = parts(stored[2], "tool_result")
        assert result["is_error"] is True
        assert result["content"] == "invalid tool arguments: nested deeper than 64 levels"
        # The model got the error back, and "{}" for the arguments it sent.
        sent = fake.requests[1].body["messages"]
        assert sent[-1]["role"] == "tool" and "nested deeper" in sent[-1]["content"]
        assert sent[-2]["tool_calls"][0]["function"]["arguments"] == "{}"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0, daemon.log()

    # Runs a crash left "running": one whose stored call is nested a
    # thousand deep (recovery used to crash on it at every start), one whose
    # parts no code can seal (a tool call with no id).
    store = WorkspaceStore(daemon.data_dir / "workspaces" / wid / "workspace.db", wid)
    planted = {}
    for name, tool_call in [
        (
            "nested",
            {"type": "tool_call", "id": "c1", "name": "view", "input": NESTED, "finished": False},
        ),
        ("broken", {"type": "tool_call", "name": "view"}),
    ]:
        queued, _ = store.accept_run(f"planted-{name}", name, None, name, 64)
        start = store.start_run(queued["id"])
        store.update_message(start.message, [{"type": "text", "text": "half"}, tool_call])
        planted[name] = queued
    store.close()

    restarted = openai_daemon(daemon_factory, fake)
    with restarted.client() as http:
        assert http.get("/v1/health").json()["status"] == "ok"
        nested = http.get(f"/v1/workspaces/{wid}/runs/planted-nested").json()
        assert nested["status"] == "interrupted" and nested["finished_at"]
        stored = messages(http, wid, planted["nested"]["session_id"])
        assert_sealed(stored)
        assert parts(stored[1], "tool_call")[0]["input"] == "{}"
        assert finish_of(stored[1])["message"] == "interrupted"
        broken = http.get(f"/v1/workspaces/{wid}/runs/planted-broken").json()
        assert broken["status"] == "failed" and broken["finished_at"]
        assert broken["error"].startswith("recovery could not seal this run's records")
        # The new process numbers its events above the old one's: ask for
        # everything it buffered since it started.
        with event_stream(restarted.url, wid, since=0) as events:
            oldest = events.until(lambda e: e["type"] == "reset")["payload"]["oldest"]
        with event_stream(restarted.url, wid, since=oldest - 1) as events:
            for run_id in ("planted-nested", "planted-broken"):
                events.until(is_type("run.completed", id=run_id))
        # The workspace still works.
        fake.script([Text("still here")])
        after = wait_terminal(http, wid, submit(http, wid, "again")["id"])
        assert after["status"] == "completed" and after["text"] == "still here"
    assert "event=run_recovery_failed" in restarted.log()
    assert f"run={planted['broken']['id']}" in restarted.log()


# ---------------------------------------------------------------- final writes that raise


def test_a_run_whose_final_writes_raise_still_ends_failed(live_factory, project, monkeypatch):
    live = live_factory(echo_delay=0.001)
    real = crushd.store.WorkspaceStore.finish_run
    raised: list[str] = []

    def finish_run(self, run_id: str, status: str, **fields: Any):
        if run_id == "doomed" and not raised:
            raised.append(status)
            raise RuntimeError("the closing writes broke")
        return real(self, run_id, status, **fields)

    monkeypatch.setattr(crushd.store.WorkspaceStore, "finish_run", finish_run)
    with api(live.url) as http:
        wid = register(http, project)
        run = submit(http, wid, "hello there", run_id="doomed")
        sid = run["session_id"]
        done = wait_terminal(http, wid, run["id"])
        assert raised == ["completed"]
        assert done["status"] == "failed" and done["finished_at"], done
        assert "closing records could not be written" in done["error"]
        assert "RuntimeError" in done["error"]
        events = run_events(live.url, wid, sid, run["id"])
        (completed,) = [e for e in events if e["type"] == "run.completed"]
        assert completed["payload"]["status"] == "failed"
        # The message streamed before the failure is kept and sealed.
        stored = messages(http, wid, sid)
        assert text_of(stored[1]["parts"]) == "hello there"
        assert_sealed(stored)
        # Its session is free: the next prompt in it runs.
        assert not http.get(f"/v1/workspaces/{wid}/sessions/{sid}").json()["is_busy"]
        again = wait_terminal(http, wid, submit(http, wid, "next", session_id=sid)["id"])
        assert again["status"] == "completed"


def test_a_run_whose_terminal_write_always_raises_frees_its_session(
    live_factory, project, monkeypatch, caplog
):
    """Even finish_run failing (every time) leaves no session busy: the run
    stays ``running`` on disk for the next start to recover, logged."""
    live = live_factory(echo_delay=0.001)
    real = crushd.store.WorkspaceStore.finish_run

    def finish_run(self, run_id: str, status: str, **fields: Any):
        if run_id == "doomed":
            raise RuntimeError("the database is broken for this run")
        return real(self, run_id, status, **fields)

    monkeypatch.setattr(crushd.store.WorkspaceStore, "finish_run", finish_run)
    with api(live.url) as http:
        wid = register(http, project)
        run = submit(http, wid, "hello there", run_id="doomed")
        wait_for(lambda: "event=run_close_failed run=doomed" in caplog.text, 10)
        after = submit(http, wid, "next", session_id=run["session_id"])
        assert wait_terminal(http, wid, after["id"])["status"] == "completed"
        assert http.get(f"/v1/workspaces/{wid}/runs/doomed").json()["status"] == "running"


# ---------------------------------------------------------------- message size


def test_utf8_size_and_prefix_cut_at_character_boundaries():
    text = "aé€😀\ud800b"  # 1, 2, 3, 4 and 3 (a lone surrogate) bytes, then 1
    assert utf8_size(text) == 14 and utf8_size("plain") == 5
    assert [utf8_prefix(text, n) for n in (0, 1, 2, 3, 5, 6, 9, 10, 13, 14)] == [
        "",
        "a",
        "a",
        "aé",
        "aé",
        "aé€",
        "aé€",
        "aé€😀",
        "aé€😀\ud800",
        text,
    ]


@dataclass
class _Env:
    store: WorkspaceStore
    hub: EventHub
    clock: Any = time.monotonic


def test_the_writer_takes_at_most_max_bytes_and_publishes_what_it_stores(tmp_path: Path):
    store = WorkspaceStore(tmp_path / "workspace.db", "w1")
    hub = EventHub("w1")
    try:
        sub, _, _ = hub.subscribe(None, None)
        session = store.create_session("s")
        message = store.create_message(session["id"], None, "assistant", [])
        writer = MessageWriter(_Env(store, hub), message, "r1", max_bytes=20)  # type: ignore[arg-type]
        writer.delta("reasoning", "think ")  # 6
        writer.delta("text", "héllo ")  # 7
        assert not writer.full
        writer.delta("text", "wörld€!")  # 10 bytes, 7 fit: the € would be cut in two
        assert writer.full
        writer.delta("text", "more")  # nothing more is taken
        writer.tool_call_start("c1", "bash")
        stored = writer.close()
        assert stored is not None
        assert stored["parts"] == [
            {"type": "reasoning", "text": "think "},
            {"type": "text", "text": "héllo wörld"},
        ]
        published = []
        while not sub.queue.empty():
            event = sub.queue.get_nowait()
            if event.type == "message.delta":
                published.append(event.data["payload"]["delta"])
        assert published == ["think ", "héllo ", "wörld"]
        # A retry's reset starts the count again.
        writer2 = MessageWriter(_Env(store, hub), message, "r1", max_bytes=8)  # type: ignore[arg-type]
        writer2.delta("text", "12345678")
        assert not writer2.full
        writer2.tool_call_start("c", "x")  # 2 bytes more do not fit
        assert writer2.full and writer2.finish_tool_calls() == []
        writer2.reset()
        assert not writer2.full
        writer2.tool_call_start("c", "x")
        writer2.tool_call_input("c", '{"a": 1}')  # 8 bytes; 6 fit
        assert writer2.full
        (call,) = writer2.finish_tool_calls()
        assert call["raw_input"] == '{"a": ' and call["input"] == "{}"
        hub.unsubscribe(sub)
    finally:
        hub.close()
        store.close()


@BOTH
def test_an_endless_stream_ends_the_step_at_max_message_bytes(fake, agent, project, protocol):
    live = agent(protocol, max_message_bytes=SMALL_CAP)
    fake.script([Forever("chunk of text, wörds & € signs; " * 8)])
    with api(live.url) as http:
        wid = register(http, project)
        started = time.monotonic()
        run = submit(http, wid, "never stop")
        sid = run["session_id"]
        done = wait_terminal(http, wid, run["id"])
        assert time.monotonic() - started < 5  # not the fake's 10 s: the stream was cut
        assert done["status"] == "completed" and done["error"] is None, done
        stored = messages(http, wid, sid)
        assert [m["role"] for m in stored] == ["user", "assistant"]
        finish = finish_of(stored[1])
        assert finish["reason"] == "max_bytes" and finish["message"] == "Message too long"
        assert str(SMALL_CAP) in finish["details"] and "--max-message-bytes" in finish["details"]
        text = text_of(stored[1]["parts"])
        assert SMALL_CAP - 4 < utf8_size(text) <= SMALL_CAP
        assert done["text"] == text
        events = run_events(live.url, wid, sid, run["id"])
        assert deltas_of(events, stored[1]["id"]) == text
    assert len(fake.requests) == 1  # no further step
    wait_for(lambda: sse.IN_FLIGHT.count == 0, 5, message="the provider stream stayed open")


def test_tool_calls_of_a_step_cut_by_the_cap_are_not_run(fake, agent, project):
    live = agent(max_message_bytes=SMALL_CAP)
    small = {"path": "small.txt", "content": "hi\n"}
    huge = {"path": "huge.txt", "content": "y" * (2 * SMALL_CAP)}
    fake.script([ToolCall("write", small), ToolCall("write", huge, split=200), Hang()])
    with api(live.url) as http:
        wid = register(http, project, yolo=True)  # the writes would not even ask
        run = submit(http, wid, "write two files")
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed", done
        stored = messages(http, wid, run["session_id"])
        assert [m["role"] for m in stored] == ["user", "assistant", "tool"]
        assert_sealed(stored)
        assert finish_of(stored[1])["reason"] == "max_bytes"
        calls = parts(stored[1], "tool_call")
        assert [json.loads(c["input"]) for c in calls] == [small, {}]
        results = parts(stored[2], "tool_result")
        assert [r["tool_call_id"] for r in results] == [c["id"] for c in calls]
        for result in results:
            assert result["is_error"] is True
            assert result["content"].startswith("Not run: the message reached its limit")
    assert not (project / "small.txt").exists() and not (project / "huge.txt").exists()
    assert len(fake.requests) == 1


@BOTH
def test_one_event_larger_than_a_message_ends_the_step_unread(fake, agent, project, protocol):
    live = agent(protocol, max_message_bytes=SMALL_CAP)
    limit = sse.event_limit(SMALL_CAP)
    fake.script([Text("before "), Text("z" * (limit + 1)), Hang()])
    with api(live.url) as http:
        wid = register(http, project)
        run = submit(http, wid, "one huge event")
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed" and done["text"] == "before ", done
        stored = messages(http, wid, run["session_id"])
        finish = finish_of(stored[1])
        assert finish["reason"] == "max_bytes" and finish["message"] == "Message too long"
    assert len(fake.requests) == 1
    wait_for(lambda: sse.IN_FLIGHT.count == 0, 5, message="the provider stream stayed open")


def test_a_raw_line_separator_inside_a_json_string_reaches_the_message(fake, agent, project):
    chunk = {"choices": [{"index": 0, "delta": {"content": "one\u2028two\x85three"}}]}
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    fake.script(
        [
            Raw(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"),
            Raw(b"data: " + json.dumps(finish).encode() + b"\n\ndata: [DONE]\n\n"),
        ]
    )
    live = agent()
    with api(live.url) as http:
        wid = register(http, project)
        done = wait_terminal(http, wid, submit(http, wid, "separators")["id"])
    assert done["status"] == "completed", done
    assert done["text"] == "one\u2028two\x85three"


def test_an_endless_stream_keeps_the_daemon_small(fake, daemon_factory, project):
    """A real daemon, the default cap (1 MiB), a model streaming as fast as
    it can for 5 s: the run ends at the cap, memory and database stay small."""
    fake.script([Text("warm up")])
    fake.script([Forever("token " * 40, seconds=5)])
    daemon = openai_daemon(daemon_factory, fake)
    with daemon.client() as http:
        wid = register(http, project)
        warm = submit(http, wid, "warm up")
        assert wait_terminal(http, wid, warm["id"])["status"] == "completed"
        idle = rss_kib(daemon.proc.pid)
        peak = idle
        run = submit(http, wid, "never stop")
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            peak = max(peak, rss_kib(daemon.proc.pid))
            if http.get(f"/v1/workspaces/{wid}/runs/{run['id']}").json()["status"] != "running":
                break
            time.sleep(0.05)
        done = wait_terminal(http, wid, run["id"])
        peak = max(peak, rss_kib(daemon.proc.pid))
        assert done["status"] == "completed", done
        (message,) = [m for m in messages(http, wid, run["session_id"]) if m["role"] == "assistant"]
        assert finish_of(message)["reason"] == "max_bytes"
        assert utf8_size(text_of(message["parts"])) == 1024 * 1024
    directory = daemon.data_dir / "workspaces" / wid
    db_bytes = sum(f.stat().st_size for f in directory.glob("workspace.db*"))
    assert db_bytes < 20 * 1024 * 1024, db_bytes
    assert peak - idle < 150 * 1024, (idle, peak)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0, daemon.log()
