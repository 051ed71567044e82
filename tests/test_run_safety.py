"""What a malicious model must not do to the daemon: crash a run with a tool
call it cannot parse, leave a run ``running`` for good, stop the daemon from
starting.

Each hole was found against a real ``crushd serve``; the tests plant the
attack through the fake model server, over a real socket, and check the
records the contract promises.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest
from conftest import wait_for
from fakeprovider import FakeProvider, Text, ToolCall
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
from crushd.providers import sse
from crushd.store import WorkspaceStore

#: About 2 KB of arguments nested a thousand deep: json.loads raises
#: RecursionError for it, which once crashed the run and every start after.
NESTED = '{"a":' * 1000 + "1" + "}" * 1000


def openai_daemon(daemon_factory, fake: FakeProvider, *extra: str):
    args = ("--provider", "openai", "--base-url", fake.openai_base_url, "--model", "m", *extra)
    return daemon_factory(*args, env={"OPENAI_API_KEY": "sk-safety-test"})


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
