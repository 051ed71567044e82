"""MCP tools in agent turns: a live crushd whose model is :class:`FakeProvider`
calls real MCP servers through the real run loop, permissions and
cancellation; and no MCP process outlives a workspace or crushd itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import AGENT_KEY_ENV, wait_for
from fakeprovider import Text, ToolCall
from helpers import (
    EVERYTHING,
    PYTHON_DIRS,
    TEST_SERVER,
    TIME_SERVER,
    alive,
    api,
    assert_sealed,
    decide,
    descendants,
    event_stream,
    finish_of,
    is_type,
    messages,
    parts,
    register,
    submit,
    wait_terminal,
)

KEY_ENV = AGENT_KEY_ENV


@pytest.fixture
def agent(agent):
    """The shared live-crushd starter with these MCP server tables."""

    def start(mcp: dict, **overrides):
        overrides.setdefault("sandbox_read", PYTHON_DIRS)
        return agent(mcp=mcp, **overrides)

    return start


def servers(http: httpx.Client, wid: str) -> dict[str, dict]:
    response = http.get(f"/v1/workspaces/{wid}/mcp")
    assert response.status_code == 200, response.text
    return {s["name"]: s for s in response.json()}


def settled(http: httpx.Client, wid: str, timeout: float = 30) -> dict[str, dict]:
    return wait_for(
        lambda: (
            (s := servers(http, wid)) and all(e["status"] != "starting" for e in s.values()) and s
        ),
        timeout,
        message="MCP servers still starting",
    )


def offered(request) -> dict[str, dict]:
    return {t["function"]["name"]: t["function"] for t in request.body.get("tools", [])}


def tool_message_of(request) -> list[dict]:
    return [m for m in request.body["messages"] if m["role"] == "tool"]


def test_a_real_server_tool_asks_then_answers_the_model(fake, agent, project):
    live = agent(
        {
            "everything": {"command": EVERYTHING, "args": ["stdio"], "allow": ["get-tiny-image"]},
            "time": {"command": TIME_SERVER, "allow": ["get_current_time"]},
        }
    )
    fake.script([ToolCall("mcp_everything_get-sum", {"a": 2, "b": 40}, id="call_sum")])
    fake.script(
        [
            ToolCall("mcp_time_get_current_time", {"timezone": "Asia/Tokyo"}, id="call_time"),
            ToolCall("mcp_everything_get-tiny-image", {}, id="call_image"),
        ]
    )
    fake.script([Text("42, and the time in Tokyo")])
    with api(live.url) as http:
        wid = register(http, project, yolo=False)
        with event_stream(live.url, wid, since=0) as events:
            events.until(is_type("mcp.status", name="everything", status="connected"), 30)
            events.until(is_type("mcp.status", name="time", status="connected"), 30)
            entries = settled(http, wid)
            assert entries["time"]["tools"] == ["get_current_time", "convert_time"]
            run = submit(http, wid, "add 2 and 40, then the time in Tokyo")
            asked = events.until(is_type("permission.requested"))["payload"]
            assert asked["tool"] == "mcp_everything_get-sum"
            assert asked["params"] == {"a": 2, "b": 40}
            assert asked["action"].startswith("mcp everything: get-sum")
            assert asked["tool_call_id"] == "call_sum"
            assert decide(http, wid, asked["id"], "allow").status_code == 200
            done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed", done
        assert done["text"] == "42, and the time in Tokyo"
        # Only get-sum asked: the other two are in their servers' allow lists.
        assert [e["type"] for e in events.seen].count("permission.requested") == 1
        stored = messages(http, wid, run["session_id"])
        assert_sealed(stored)
        assert [m["role"] for m in stored] == [
            "user",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant",
        ]
        (sum_result,) = parts(stored[2], "tool_result")
        assert sum_result["content"] == "The sum of 2 and 40 is 42."
        assert sum_result["is_error"] is False and sum_result["name"] == "mcp_everything_get-sum"
        time_result, image_result = parts(stored[4], "tool_result")
        assert json.loads(time_result["content"])["timezone"] == "Asia/Tokyo"
        assert "[image content: image/png, about" in image_result["content"]

    first = offered(fake.requests[0])
    assert {"mcp_everything_get-sum", "mcp_time_get_current_time", "bash", "view"} <= set(first)
    schema = first["mcp_everything_get-sum"]["parameters"]
    assert schema["required"] == ["a", "b"] and schema["properties"]["a"]["type"] == "number"
    assert "MCP server everything" in first["mcp_everything_get-sum"]["description"]
    # The model got the real results back.
    assert tool_message_of(fake.requests[1])[0]["content"] == "The sum of 2 and 40 is 42."
    assert "Asia/Tokyo" in tool_message_of(fake.requests[2])[1]["content"]


def test_denied_error_and_timeout_results_reach_the_model(fake, agent, project):
    marks = project / "marks"  # in the workspace: all a sandboxed server may write
    marks.mkdir()
    live = agent(
        {
            "time": {"command": TIME_SERVER},
            "test": {
                "command": sys.executable,
                "args": [TEST_SERVER],
                "timeout": 0.5,
                "env": {"MCP_TEST_MARKS": str(marks)},
            },
        }
    )
    fake.script([ToolCall("mcp_test_hang", {}, id="call_hang")])
    fake.script([ToolCall("mcp_time_get_current_time", {"timezone": "Nowhere/Void"})])
    fake.script([Text("gave up")])
    fake.script([ToolCall("mcp_time_get_current_time", {"timezone": "UTC"}, id="call_denied")])
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        settled(http, wid)
        run = submit(http, wid, "hang, then a bad zone")
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed" and done["text"] == "gave up"
        stored = messages(http, wid, run["session_id"])
        (timed_out,) = parts(stored[2], "tool_result")
        assert timed_out["is_error"] is True
        assert timed_out["content"] == "MCP server test: hang timed out after 0.5 s"
        assert (marks / "cancelled.mark").exists()  # the server was told
        (bad_zone,) = parts(stored[4], "tool_result")
        assert bad_zone["is_error"] is True and "Nowhere/Void" in bad_zone["content"]

        # A workspace that is not yolo asks; a denial is an error result.
        other = project / "strict"
        other.mkdir()
        strict = register(http, other, yolo=False)
        settled(http, strict)
        with event_stream(live.url, strict) as events:
            run = submit(http, strict, "the time")
            asked = events.until(is_type("permission.requested"))["payload"]
            assert asked["tool"] == "mcp_time_get_current_time"
            assert decide(http, strict, asked["id"], "deny").status_code == 200
        done = wait_terminal(http, strict, run["id"])
        stored = messages(http, strict, run["session_id"])
        assert finish_of(stored[1])["reason"] == "permission_denied"
        (denied,) = parts(stored[2], "tool_result")
        assert denied["is_error"] is True and "Permission denied" in denied["content"]


def test_cancel_interrupts_a_real_server_call_within_a_second(fake, agent, project):
    # What crushd sends the server goes through tee into this file (made by
    # tee, in the workspace, which the sandbox lets the server write).
    wire = project / "mcp-wire.jsonl"
    command = 'tee -a "$0" | "$1" stdio'
    live = agent(
        {"everything": {"command": "bash", "args": ["-c", command, str(wire), EVERYTHING]}}
    )
    fake.script(
        [ToolCall("mcp_everything_trigger-long-running-operation", {"duration": 30, "steps": 3})]
    )
    fake.script([ToolCall("mcp_everything_echo", {"message": "still here"}, id="call_echo")])
    fake.script([Text("ok")])
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        settled(http, wid)
        with event_stream(live.url, wid) as events:
            run = submit(http, wid, "long operation")
            events.until(
                lambda e: (
                    e["type"] == "message.updated"
                    and any(
                        p["type"] == "tool_call" and p["finished"] for p in e["payload"]["parts"]
                    )
                )
            )
            wait_for(
                lambda: wire.exists() and "trigger-long-running-operation" in wire.read_text(),
                message="the call did not reach the server",
            )
            started = time.monotonic()
            http.post(f"/v1/workspaces/{wid}/runs/{run['id']}/cancel")
            events.until(is_type("run.completed", id=run["id"]), 5)
            elapsed = time.monotonic() - started
        assert elapsed < 1.0, f"cancel took {elapsed:.2f} s"
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "cancelled"
        stored = messages(http, wid, run["session_id"])
        (result,) = parts(stored[2], "tool_result")
        assert result["is_error"] is True and result["content"] == "Tool execution canceled"
        assert_sealed(stored)
        # The server is still usable.
        again = submit(http, wid, "echo", session_id=run["session_id"])
        done = wait_terminal(http, wid, again["id"])
        assert done["status"] == "completed" and done["text"] == "ok"
        stored = messages(http, wid, run["session_id"])
        assert parts(stored[-2], "tool_result")[0]["content"] == "Echo: still here"
        assert servers(http, wid)["everything"]["status"] == "connected"


def test_status_route_broken_servers_and_no_delay(fake, agent, project):
    live = agent(
        {
            "slow": {"command": sys.executable, "args": [TEST_SERVER, "slow-start"]},
            "missing": {"command": "no-such-mcp-binary"},
            "dies": {"command": sys.executable, "args": [TEST_SERVER, "crash-at-start"]},
            "off": {"command": TIME_SERVER, "enabled": False},
        }
    )
    fake.script([Text("no tools needed")])
    with api(live.url) as http:
        started = time.monotonic()
        wid = register(http, project, yolo=False)
        run = submit(http, wid, "hello")
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed"
        assert time.monotonic() - started < 2.5  # the slow server takes 3 s to start
        assert servers(http, wid)["slow"]["status"] == "starting"
        assert not any(name.startswith("mcp_slow") for name in offered(fake.requests[0]))
        entries = settled(http, wid)
        assert entries["slow"]["status"] == "connected" and "hang" in entries["slow"]["tools"]
        assert entries["missing"] == {
            "name": "missing",
            "transport": "stdio",
            "status": "failed",
            "tools": [],
            "error": "command not found: no-such-mcp-binary",
        }
        assert entries["dies"]["status"] == "failed"
        assert "crash-at-start" in entries["dies"]["error"]
        assert entries["off"]["status"] == "disabled"
        assert list(entries) == ["slow", "missing", "dies", "off"]  # the file's order
        missing = http.get("/v1/workspaces/no-such-workspace/mcp")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_no_mcp_process_is_left_after_delete(agent, project):
    live = agent(
        {
            "test": {"command": sys.executable, "args": [TEST_SERVER]},
            "group": {"command": "bash", "args": ["-c", f"{TIME_SERVER}; true"]},
        }
    )
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        assert {e["status"] for e in settled(http, wid).values()} == {"connected"}
        spawned = descendants(os.getpid())
        assert len(spawned) >= 5  # 2 supervisors, python server, bash, mcp-server-time
        started = time.monotonic()
        assert http.delete(f"/v1/workspaces/{wid}").status_code == 204
        assert time.monotonic() - started < 5
        wait_for(lambda: not any(alive(p) for p in spawned), 5, message="MCP processes left")


def daemon_config(tmp_path: Path) -> Path:
    config = tmp_path / "crushd.toml"
    config.write_text(
        f"""
sandbox_read = {json.dumps(PYTHON_DIRS)}

[mcp.test]
command = {json.dumps(sys.executable)}
args = [{json.dumps(TEST_SERVER)}]

[mcp.everything]
command = {json.dumps(EVERYTHING)}
args = ["stdio"]
"""
    )
    return config


@pytest.mark.parametrize("how", ["sigterm", "kill-9"])
def test_no_mcp_process_outlives_crushd_serve(daemon_factory, project, tmp_path, how):
    daemon = daemon_factory("--config", str(daemon_config(tmp_path)))
    with daemon.client() as http:
        wid = register(http, project, yolo=True)
        assert {e["status"] for e in settled(http, wid).values()} == {"connected"}
    listed = subprocess.run(
        [sys.executable, "-m", "crushd", "mcp", "--url", daemon.url, "--workspace", str(project)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:4] == ["SERVER", "TRANSPORT", "STATUS", "TOOLS"]
    assert [r.split()[:3] for r in rows] == [
        ["test", "stdio", "connected"],
        ["everything", "stdio", "connected"],
    ]
    spawned = descendants(daemon.proc.pid)
    assert len(spawned) >= 4
    if how == "sigterm":
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    else:
        daemon.proc.kill()
        daemon.wait(10)
    wait_for(
        lambda: not any(alive(p) for p in spawned),
        5,
        message=f"left after {how}: {[p for p in spawned if alive(p)]}",
    )
