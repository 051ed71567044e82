"""End-to-end agent turns: the real HTTP API, the real run loop and tools, and
a model that is :class:`FakeProvider` speaking the real wire protocols over a
real socket.

Each test drives one turn through ``POST /agent`` and then checks what the
contract promises it leaves behind: the stored messages, the run record, the
events, the files in the workspace and the requests the model received.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

import pytest
from conftest import AGENT_KEY_ENV, wait_for
from fakeprovider import Drop, Hang, HTTPError, Pause, Reasoning, Text, Together, ToolCall, Usage
from helpers import (
    api,
    assert_sealed,
    decide,
    event_stream,
    finish_of,
    is_type,
    messages,
    parts,
    pending_permission,
    processes_with,
    register,
    run_events,
    submit,
    wait_terminal,
)

from crushd.common import text_of

KEY_ENV = AGENT_KEY_ENV
NO_CACHE = {"cache_read_tokens": 0, "cache_write_tokens": 0, "cost_usd": None}
TOOL_NAMES = {"bash", "view", "write", "edit", "ls", "glob", "grep"}
BOTH = pytest.mark.parametrize("protocol", ["openai", "anthropic"])


# ---------------------------------------------------------------- fixtures


# ---------------------------------------------------------------- events


# ---------------------------------------------------------------- checks


def uncached(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic messages without their ``cache_control`` marks."""
    return [
        {
            **m,
            "content": [
                {k: v for k, v in block.items() if k != "cache_control"} for block in m["content"]
            ],
        }
        for m in messages
    ]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- multi-step tool use


def test_openai_multi_step_tool_use_sends_results_back(fake, agent, project):
    write_args = {"path": "notes/hello.txt", "content": "hello from the model\n"}
    fake.script(
        [
            Text("I'll create "),
            Text("the file."),
            ToolCall("write", write_args, id="call_write_1", split=5),
            Usage(100, 20),
        ]
    )
    fake.script([Text("Created "), Text("notes/hello.txt."), Usage(150, 8)])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = submit(http, wid, "write a hello file")
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed", done
        assert done["error"] is None
        assert (project / "notes" / "hello.txt").read_text() == "hello from the model\n"

        stored = messages(http, wid, run["session_id"])
        assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
        user, first, tool, last = stored
        assert user["run_id"] == run["id"] and text_of(user["parts"]) == "write a hello file"
        assert all(m["run_id"] == run["id"] for m in stored)
        assert all((m["provider"], m["model"]) == ("openai", "m") for m in stored[1:])
        assert text_of(first["parts"]) == "I'll create the file."
        (call,) = parts(first, "tool_call")
        assert call["id"] == "call_write_1" and call["name"] == "write"
        assert call["finished"] is True and json.loads(call["input"]) == write_args
        assert finish_of(first)["reason"] == "tool_use"
        (result,) = parts(tool, "tool_result")
        assert result["tool_call_id"] == "call_write_1" and result["name"] == "write"
        assert result["is_error"] is False and "notes/hello.txt" in result["content"]
        assert text_of(last["parts"]) == "Created notes/hello.txt."
        assert finish_of(last)["reason"] == "end_turn"
        assert_sealed(stored)

        assert done["text"] == "Created notes/hello.txt."
        assert done["message_id"] == last["id"]
        assert done["usage"] == {**{"prompt_tokens": 250, "completion_tokens": 28}, **NO_CACHE}
        session = http.get(f"/v1/workspaces/{wid}/sessions/{run['session_id']}").json()
        assert (session["prompt_tokens"], session["completion_tokens"]) == (250, 28)

        events = run_events(live.url, wid, run["session_id"], run["id"])
    deltas = [e["payload"] for e in events if e["type"] == "message.delta"]
    assert "".join(d["delta"] for d in deltas if d["message_id"] == first["id"]) == (
        "I'll create the file."
    )
    assert "".join(d["delta"] for d in deltas if d["message_id"] == last["id"]) == (
        "Created notes/hello.txt."
    )
    assert events[-1]["payload"]["status"] == "completed"

    # One model request per step, and the second one carried the results back.
    assert len(fake.requests) == 2
    first_req, second_req = (r.body for r in fake.requests)
    assert fake.requests[0].headers["authorization"] == "Bearer sk-agent-test"
    assert first_req["model"] == "m" and first_req["stream"] is True
    assert {t["function"]["name"] for t in first_req["tools"]} == TOOL_NAMES
    assert [m["role"] for m in first_req["messages"]] == ["system", "user"]
    chat = second_req["messages"]
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "tool"]
    assert chat[1]["content"] == "write a hello file"
    assert chat[2]["content"] == "I'll create the file."
    (sent_call,) = chat[2]["tool_calls"]
    assert sent_call["id"] == "call_write_1"
    assert sent_call["function"]["name"] == "write"
    assert json.loads(sent_call["function"]["arguments"]) == write_args
    assert chat[3]["tool_call_id"] == "call_write_1"
    assert chat[3]["content"] == result["content"]


def test_anthropic_daemon_multi_step_and_history_across_prompts(fake, daemon_factory, project):
    fake.script(
        [
            Text("Writing it."),
            ToolCall("write", {"path": "a.txt", "content": "A\n"}, id="toolu_1", split=4),
            Usage(40, 10),
        ]
    )
    fake.script([Text("Done: a.txt"), Usage(60, 5)])
    fake.script([Text("It contains A."), Usage(80, 4)])
    args = f"--provider anthropic --base-url {fake.anthropic_base_url} --model claude-x"
    daemon = daemon_factory(*args.split(), env={"ANTHROPIC_API_KEY": "sk-ant-test"})
    with daemon.client() as http:
        wid = register(http, project, yolo=True)
        run = submit(http, wid, "create a.txt")
        sid = run["session_id"]
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed", done
        assert done["text"] == "Done: a.txt"
        assert done["usage"] == {**{"prompt_tokens": 100, "completion_tokens": 15}, **NO_CACHE}
        assert (project / "a.txt").read_text() == "A\n"
        stored = messages(http, wid, sid)
        assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
        reasons = [finish_of(m)["reason"] for m in stored if m["role"] == "assistant"]
        assert reasons == ["tool_use", "end_turn"]
        assert stored[1]["provider"] == "anthropic" and stored[1]["model"] == "claude-x"
        assert_sealed(stored)

        again = submit(http, wid, "what is in it?", session_id=sid)
        second = wait_terminal(http, wid, again["id"])
        assert second["status"] == "completed" and second["text"] == "It contains A."
        roles = [m["role"] for m in messages(http, wid, sid)]
        assert roles == ["user", "assistant", "tool", "assistant", "user", "assistant"]

    assert len(fake.requests) == 3
    first_req = fake.requests[0]
    assert first_req.path == "/v1/messages"
    assert first_req.headers["x-api-key"] == "sk-ant-test"
    assert first_req.headers["anthropic-version"]
    assert first_req.body["model"] == "claude-x" and first_req.body["system"]
    assert {t["name"] for t in first_req.body["tools"]} >= {"bash", "write", "view"}
    # Step 2 of the first prompt got the tool result back.
    # (Cache breakpoints move with the newest messages: tests/test_caching.py.)
    step2 = uncached(fake.requests[1].body["messages"])
    assert [m["role"] for m in step2] == ["user", "assistant", "user"]
    write_use = {"id": "toolu_1", "name": "write", "input": {"path": "a.txt", "content": "A\n"}}
    assert step2[1]["content"] == [
        {"type": "text", "text": "Writing it."},
        {"type": "tool_use", **write_use},
    ]
    (result,) = step2[2]["content"]
    assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_1"
    assert result["is_error"] is False
    # The second prompt's request holds the whole earlier conversation.
    history = uncached(fake.requests[2].body["messages"])
    assert history[:3] == step2
    assert history[3:] == [
        {"role": "assistant", "content": [{"type": "text", "text": "Done: a.txt"}]},
        {"role": "user", "content": [{"type": "text", "text": "what is in it?"}]},
    ]


# ---------------------------------------------------------------- permissions


def test_permission_allow_over_http(fake, agent, project):
    fake.script([ToolCall("bash", {"command": "echo hi > out.txt"}, id="call_bash")])
    fake.script([Text("ran it")])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=False)
        with event_stream(live.url, wid) as events:
            run = submit(http, wid, "make out.txt")
            asked = events.until(is_type("permission.requested"))["payload"]
            assert asked["tool"] == "bash" and asked["action"] == "run: echo hi > out.txt"
            assert asked["params"] == {"command": "echo hi > out.txt"}
            assert asked["run_id"] == run["id"] and asked["session_id"] == run["session_id"]
            assert asked["tool_call_id"] == "call_bash"
            assert asked["path"] == str(project.resolve())
            assert not (project / "out.txt").exists()
            listed = http.get(f"/v1/workspaces/{wid}/permissions").json()
            assert [p["id"] for p in listed] == [asked["id"]]

            bad = decide(http, wid, asked["id"], "maybe")
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
            assert decide(http, wid, asked["id"], 1).status_code == 400
            unknown = decide(http, wid, "no-such-request", "allow")
            assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
            # A bad answer does not consume the request.
            listed = http.get(f"/v1/workspaces/{wid}/permissions").json()
            assert [p["id"] for p in listed] == [asked["id"]]

            allowed = decide(http, wid, asked["id"], "allow")
            assert allowed.status_code == 200, allowed.text
            assert allowed.json()["decision"] == "allow"
            resolved = events.until(is_type("permission.resolved", id=asked["id"]))["payload"]
            assert resolved["decision"] == "allow"
            again = decide(http, wid, asked["id"], "allow")
            assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"

        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed" and done["text"] == "ran it"
        assert (project / "out.txt").read_text() == "hi\n"
        assert http.get(f"/v1/workspaces/{wid}/permissions").json() == []
        stored = messages(http, wid, run["session_id"])
        (result,) = parts(stored[2], "tool_result")
        assert result["is_error"] is False
        assert_sealed(stored)


def test_permission_deny_ends_the_turn(fake, agent, project):
    fake.script(
        [
            Text("Running two things."),
            ToolCall("bash", {"command": "echo no > denied.txt"}, id="call_1"),
            ToolCall("write", {"path": "skipped.txt", "content": "x"}, id="call_2"),
        ]
    )
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=False)
        run = submit(http, wid, "try it")
        asked = pending_permission(http, wid)
        assert asked["tool_call_id"] == "call_1"
        assert decide(http, wid, asked["id"], "deny").status_code == 200
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed", done
        assert "Permission denied" in done["error"]
        assert done["text"] == "Running two things."
        stored = messages(http, wid, run["session_id"])
        assert [m["role"] for m in stored] == ["user", "assistant", "tool"]
        finish = finish_of(stored[1])
        assert finish["reason"] == "permission_denied"
        denied, skipped = parts(stored[2], "tool_result")
        assert denied["tool_call_id"] == "call_1" and denied["is_error"] is True
        assert "denied" in denied["content"].lower()
        # The second call is not asked about and not run after a denial.
        assert skipped["tool_call_id"] == "call_2" and skipped["is_error"] is True
        assert_sealed(stored)
        events = run_events(live.url, wid, run["session_id"], run["id"])
    assert not (project / "denied.txt").exists() and not (project / "skipped.txt").exists()
    assert [e["payload"]["decision"] for e in events if e["type"] == "permission.resolved"] == [
        "deny"
    ]
    assert sum(e["type"] == "permission.requested" for e in events) == 1
    assert len(fake.requests) == 1  # no further model request after a denial


def test_permission_allow_session_and_cancel_while_waiting(fake, agent, project):
    fake.script([ToolCall("bash", {"command": "echo one > one.txt"})])
    fake.script([ToolCall("bash", {"command": "echo two > two.txt"})])
    fake.script([Text("two done")])
    fake.script([ToolCall("bash", {"command": "echo three > three.txt"})])
    fake.script([Text("three done")])
    fake.script([ToolCall("bash", {"command": "echo four > four.txt"})])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=False)
        run = submit(http, wid, "first")
        sid = run["session_id"]
        asked = pending_permission(http, wid)
        assert decide(http, wid, asked["id"], "allow_session").status_code == 200
        assert wait_terminal(http, wid, run["id"])["status"] == "completed"
        # A later prompt of the same session runs bash without asking.
        later = submit(http, wid, "second", session_id=sid)
        assert wait_terminal(http, wid, later["id"])["status"] == "completed"
        for name in ("one", "two", "three"):
            assert (project / f"{name}.txt").read_text() == f"{name}\n"
        events = run_events(live.url, wid, sid, later["id"])
        requested = [e for e in events if e["type"] == "permission.requested"]
        assert [e["payload"]["id"] for e in requested] == [asked["id"]]

        # The allowance belongs to that session: another one is asked again.
        other = submit(http, wid, "other session")
        assert other["session_id"] != sid
        asked_again = pending_permission(http, wid)
        assert asked_again["session_id"] == other["session_id"]
        started = time.monotonic()
        assert http.post(f"/v1/workspaces/{wid}/runs/{other['id']}/cancel").status_code == 202
        done = wait_terminal(http, wid, other["id"])
        assert time.monotonic() - started < 2
        assert done["status"] == "cancelled"
        assert http.get(f"/v1/workspaces/{wid}/permissions").json() == []
        assert decide(http, wid, asked_again["id"], "allow").status_code == 404
        stored = messages(http, wid, other["session_id"])
        assert finish_of(stored[1])["reason"] == "canceled"
        (result,) = parts(stored[2], "tool_result")
        assert result["is_error"] is True and result["content"] == "Tool execution canceled"
        assert_sealed(stored)
        events = run_events(live.url, wid, other["session_id"], other["id"])
    assert not (project / "four.txt").exists()
    resolved = [e["payload"] for e in events if e["type"] == "permission.resolved"]
    assert [(r["id"], r["decision"]) for r in resolved] == [(asked_again["id"], "canceled")]


def test_unanswered_permission_times_out_as_denied(fake, agent, project):
    fake.script([ToolCall("bash", {"command": "echo late > late.txt"}, id="call_late")])
    live = agent(permission_timeout=0.5)
    with api(live.url) as http:
        wid = register(http, project, yolo=False)
        started = time.monotonic()
        run = submit(http, wid, "nobody answers")
        done = wait_terminal(http, wid, run["id"])
        assert 0.4 < time.monotonic() - started < 5
        assert done["status"] == "completed" and "timed out" in done["error"]
        stored = messages(http, wid, run["session_id"])
        assert finish_of(stored[1])["reason"] == "permission_denied"
        (result,) = parts(stored[2], "tool_result")
        assert result["tool_call_id"] == "call_late" and result["is_error"] is True
        assert_sealed(stored)
        assert http.get(f"/v1/workspaces/{wid}/permissions").json() == []
        events = run_events(live.url, wid, run["session_id"], run["id"])
    assert not (project / "late.txt").exists()
    (asked,) = [e["payload"] for e in events if e["type"] == "permission.requested"]
    (resolved,) = [e["payload"] for e in events if e["type"] == "permission.resolved"]
    assert resolved["id"] == asked["id"] and resolved["decision"] == "timeout"
    assert len(fake.requests) == 1


def test_path_outside_the_workspace_asks_even_in_yolo(fake, agent, project, tmp_path):
    (project / "inside.txt").write_text("inside\n")
    outside = tmp_path / "secret.txt"
    outside.write_text("top secret\n")
    fake.script(
        [
            ToolCall("view", {"path": "inside.txt"}, id="call_in"),
            ToolCall("view", {"path": str(outside)}, id="call_out"),
        ]
    )
    fake.script([Text("read both")])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = submit(http, wid, "read them")
        asked = pending_permission(http, wid)
        # Only the outside path asks; the inside read (yolo, read-only) did not.
        assert asked["tool"] == "view" and asked["tool_call_id"] == "call_out"
        assert asked["path"] == str(outside.resolve())
        assert decide(http, wid, asked["id"], "allow").status_code == 200
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed" and done["text"] == "read both"
        stored = messages(http, wid, run["session_id"])
        inside, out = parts(stored[2], "tool_result")
        assert "inside" in inside["content"] and inside["is_error"] is False
        assert "top secret" in out["content"] and out["is_error"] is False
        events = run_events(live.url, wid, run["session_id"], run["id"])
    assert sum(e["type"] == "permission.requested" for e in events) == 1


# ---------------------------------------------------------------- deltas


def deltas_of(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    deltas = [e["payload"] for e in events if e["type"] == "message.delta"]
    return [(d["kind"], d["delta"]) for d in deltas]


@BOTH
def test_chunks_read_together_are_published_as_one_delta(fake, agent, project, protocol):
    fake.script(
        [
            Together((Reasoning("let me "), Reasoning("think"), Text("one "), Text("two "))),
            Pause(0.3),
            Together((Text("three "), Text("four"))),
            Pause(0.3),
            Text("."),
        ]
    )
    live = agent(protocol)
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = submit(http, wid, "count")
        done = wait_terminal(http, wid, run["id"])
        events = run_events(live.url, wid, run["session_id"], run["id"])
        stored = messages(http, wid, run["session_id"])
    assert done["status"] == "completed", done
    # The order of kinds is kept; text read at once becomes one delta.
    assert deltas_of(events) == [
        ("reasoning", "let me think"),
        ("text", "one two "),
        ("text", "three four"),
        ("text", "."),
    ]
    assert text_of(stored[1]["parts"]) == "one two three four." == done["text"]
    (reasoning,) = parts(stored[1], "reasoning")
    assert reasoning["text"] == "let me think"


def test_the_echo_provider_still_streams_one_word_per_delta(live_factory, project):
    live = live_factory(provider="echo", echo_delay=0.0)
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = submit(http, wid, "one two three")
        wait_terminal(http, wid, run["id"])
        events = run_events(live.url, wid, run["session_id"], run["id"])
    assert deltas_of(events) == [("text", "one "), ("text", "two "), ("text", "three")]


# ---------------------------------------------------------------- cancellation


@BOTH
def test_cancel_during_a_hanging_stream(fake, agent, project, protocol):
    fake.script([Text("partial "), Text("answer"), Hang()])
    live = agent(protocol)
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        with event_stream(live.url, wid) as events:
            run = submit(http, wid, "hang please")
            deltas: list[str] = []
            while "".join(deltas) != "partial answer":
                event = events.until(is_type("message.delta"))
                deltas.append(event["payload"]["delta"])
            started = time.monotonic()
            cancel = http.post(f"/v1/workspaces/{wid}/runs/{run['id']}/cancel")
            assert cancel.status_code == 202
            done = wait_terminal(http, wid, run["id"], timeout=5)
            elapsed = time.monotonic() - started
            assert done["status"] == "cancelled"
            assert elapsed < 1.0, f"cancel took {elapsed:.2f} s"
            completed = events.until(is_type("run.completed", id=run["id"]))
        streamed = [e["payload"]["delta"] for e in events.seen if e["type"] == "message.delta"]
        assert completed["payload"]["status"] == "cancelled"
        stored = messages(http, wid, run["session_id"])
        assert [m["role"] for m in stored] == ["user", "assistant"]
        assert text_of(stored[1]["parts"]) == "".join(streamed) == "partial answer"
        finish = finish_of(stored[1])
        assert (finish["reason"], finish["message"]) == ("canceled", "Request canceled")
        assert done["text"] == "partial answer" and done["finished_at"]
        assert done["message_id"] == stored[1]["id"]


def test_cancel_during_bash_kills_the_command(fake, agent, project):
    marker = f"sleep 31.{os.getpid()}{uuid.uuid4().int % 10**6:06d}"
    fake.script([ToolCall("bash", {"command": marker}, id="call_sleep")])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = submit(http, wid, "sleep")
        wait_for(lambda: processes_with(marker), 10, message="the command never started")
        started = time.monotonic()
        http.post(f"/v1/workspaces/{wid}/runs/{run['id']}/cancel")
        done = wait_terminal(http, wid, run["id"], timeout=10)
        elapsed = time.monotonic() - started
        assert done["status"] == "cancelled"
        assert elapsed < 2.0, f"cancel took {elapsed:.2f} s"
        assert processes_with(marker) == []
        stored = messages(http, wid, run["session_id"])
        assert [m["role"] for m in stored] == ["user", "assistant", "tool"]
        assert finish_of(stored[1])["reason"] == "canceled"
        (result,) = parts(stored[2], "tool_result")
        assert result["tool_call_id"] == "call_sleep" and result["is_error"] is True
        assert result["content"] == "Tool execution canceled"
        assert_sealed(stored)
    assert len(fake.requests) == 1


@BOTH
def test_cancel_while_tool_arguments_are_half_streamed(fake, agent, project, protocol):
    fake.script(
        [
            Text("Writing."),
            Pause(0.3),  # so the tool call's start reaches the database (coalesced writes)
            ToolCall("write", ['{"path": "half.txt", ', '"content": "unfini'], id="call_half"),
            Hang(),
        ]
    )
    live = agent(protocol)
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = submit(http, wid, "half")
        sid = run["session_id"]

        def streaming_call():
            stored = messages(http, wid, sid)
            return len(stored) > 1 and parts(stored[1], "tool_call")

        (call,) = wait_for(streaming_call, 10, message="the tool call never started")
        assert call["finished"] is False
        http.post(f"/v1/workspaces/{wid}/runs/{run['id']}/cancel")
        done = wait_terminal(http, wid, run["id"], timeout=5)
        assert done["status"] == "cancelled" and done["text"] == "Writing."
        stored = messages(http, wid, sid)
        assert [m["role"] for m in stored] == ["user", "assistant", "tool"]
        (call,) = parts(stored[1], "tool_call")
        assert call["id"] == "call_half" and call["finished"] is True
        assert call["input"] == "{}"
        assert finish_of(stored[1])["reason"] == "canceled"
        (result,) = parts(stored[2], "tool_result")
        assert result["tool_call_id"] == "call_half" and result["is_error"] is True
        assert result["content"] == "Tool execution canceled"
        assert_sealed(stored)
    assert not (project / "half.txt").exists()


# ---------------------------------------------------------------- limits and failures


def test_max_steps_stops_a_model_that_never_ends(fake, agent, project):
    fake.set_default([ToolCall("ls", {})])
    live = agent(max_steps=2)
    with api(live.url) as http:
        wid = register(http, project, yolo=False)  # ls is read-only: never asks
        run = submit(http, wid, "loop forever")
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "failed", done
        assert "max-steps" in done["error"] or "max steps" in done["error"].lower()
        assert done["finished_at"]
        stored = messages(http, wid, run["session_id"])
        assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant", "tool"]
        assert all(not r["is_error"] for m in stored[2::2] for r in parts(m, "tool_result"))
        assert_sealed(stored)
        events = run_events(live.url, wid, run["session_id"], run["id"])
    assert events[-1]["payload"]["status"] == "failed"
    assert len(fake.requests) == 2


@BOTH
def test_provider_http_error_fails_the_run_with_its_message(fake, agent, project, protocol):
    message = "Incorrect API key provided: sk-agen***test."
    fake.script([HTTPError(401, message)])
    live = agent(protocol)
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = submit(http, wid, "hello")
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "failed"
        assert message in done["error"]
        stored = messages(http, wid, run["session_id"])
        assert [m["role"] for m in stored] == ["user", "assistant"]
        finish = finish_of(stored[1])
        assert finish["reason"] == "error" and "401" in finish["message"]
        assert finish["details"] == message
        events = run_events(live.url, wid, run["session_id"], run["id"])
    assert events[-1]["payload"]["status"] == "failed"


@BOTH
def test_dropped_stream_fails_and_keeps_the_partial_text(fake, agent, project, protocol):
    # With retries off; tests/test_retries.py covers the retry that resets the text.
    fake.script([Text("partial "), Text("text"), Drop()])
    live = agent(protocol, max_retries=0)
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = submit(http, wid, "hello")
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "failed" and done["error"]
        assert done["text"] == "partial text"
        stored = messages(http, wid, run["session_id"])
        assert text_of(stored[1]["parts"]) == "partial text"
        finish = finish_of(stored[1])
        assert finish["reason"] == "error" and finish["message"]
        assert_sealed(stored)


def test_unreachable_provider_fails_quickly(agent, project):
    port = closed_port()
    live = agent(base_url=f"http://127.0.0.1:{port}/v1", retry_base_delay=0.01)
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        started = time.monotonic()
        run = submit(http, wid, "hello")
        done = wait_terminal(http, wid, run["id"], timeout=10)
        assert time.monotonic() - started < 5
        assert done["status"] == "failed"
        assert f"127.0.0.1:{port}" in done["error"]
        assert "gave up after 4 retries" in done["error"]
        stored = messages(http, wid, run["session_id"])
        finish = finish_of(stored[1])
        assert finish["reason"] == "error"
        assert finish["message"] == "Cannot reach provider"
        assert finish["details"] == done["error"]


def test_bad_tool_calls_become_error_results_and_the_turn_goes_on(fake, agent, project):
    (project / "sub").mkdir()
    fake.script(
        [
            ToolCall("frobnicate", {"x": 1}, id="call_unknown"),
            ToolCall("ls", ['{"path": ', '"sub'], id="call_badjson"),
            ToolCall("view", {"nope": 1}, id="call_badparams"),
        ]
    )
    fake.script([Text("sorry, "), Text("recovered")])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = submit(http, wid, "do odd things")
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed", done
        assert done["text"] == "sorry, recovered"
        stored = messages(http, wid, run["session_id"])
        assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
        calls = {c["id"]: c for c in parts(stored[1], "tool_call")}
        assert calls["call_badjson"]["input"] == "{}"  # stored input is always valid JSON
        results = {r["tool_call_id"]: r for r in parts(stored[2], "tool_result")}
        assert all(r["is_error"] is True for r in results.values()), results
        assert "frobnicate" in results["call_unknown"]["content"]
        assert "invalid" in results["call_badjson"]["content"].lower()
        assert "nope" in results["call_badparams"]["content"]
        assert_sealed(stored)
    chat = fake.requests[1].body["messages"]
    sent = {m["tool_call_id"]: m["content"] for m in chat if m["role"] == "tool"}
    assert sent == {cid: r["content"] for cid, r in results.items()}
