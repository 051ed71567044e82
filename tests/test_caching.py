"""Anthropic prompt caching: where the ``cache_control`` breakpoints go, as the
model server receives them over a real turn, and that OpenAI requests carry none."""

from __future__ import annotations

import json
from typing import Any

import httpx
from fakeprovider import Text, ToolCall, Usage

from crushd.providers.anthropic import MAX_BREAKPOINTS, add_cache_breakpoints

KEY_ENV = "CRUSHD_TEST_CACHE_KEY"
EPHEMERAL = {"type": "ephemeral"}


def marked(body: dict[str, Any]) -> list[str]:
    """Where the request's breakpoints are: ``tool:NAME``, ``system`` or
    ``message:INDEX:BLOCK`` (negative indexes count from the end)."""
    found = []
    for tool in body.get("tools", []):
        if tool.get("cache_control") == EPHEMERAL:
            found.append(f"tool:{tool['name']}")
    system = body.get("system")
    if isinstance(system, list):
        found += ["system" for block in system if block.get("cache_control") == EPHEMERAL]
    messages = body.get("messages", [])
    for index, message in enumerate(messages):
        for position, block in enumerate(message["content"]):
            if block.get("cache_control") == EPHEMERAL:
                found.append(
                    f"message:{index - len(messages)}:{position - len(message['content'])}"
                )
    return found


def test_breakpoints_without_tools_or_system():
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert add_cache_breakpoints(body) == 1
    assert marked(body) == ["message:-1:-1"]
    assert add_cache_breakpoints({"messages": []}) == 0


def test_a_long_session_marks_the_prefix_and_the_newest_messages(
    fake, live_factory, project, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, "sk")
    (project / "a.txt").write_text("A\n")
    # Prompt 1: a tool step, then the answer.  Prompt 2: one more answer.
    fake.script([Text("Looking."), ToolCall("view", {"path": "a.txt"}), Usage(3000, 20)])
    fake.script([Text("It says A."), Usage(3100, 10, cache_read_tokens=2900)])
    fake.script([Text("Yes."), Usage(3200, 5, cache_read_tokens=3050, cache_write_tokens=100)])
    live = live_factory(
        provider="anthropic",
        model="claude-c",
        base_url=fake.anthropic_base_url,
        api_key_env=KEY_ENV,
    )
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = http.post("/v1/workspaces", json={"path": str(project), "yolo": True}).json()["id"]
        first = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "read a.txt"}).json()
        done1 = http.get(f"/v1/workspaces/{wid}/runs/{first['id']}", params={"wait": 20}).json()
        second = http.post(
            f"/v1/workspaces/{wid}/agent",
            json={"prompt": "sure?", "session_id": first["session_id"]},
        ).json()
        done2 = http.get(f"/v1/workspaces/{wid}/runs/{second['id']}", params={"wait": 20}).json()
    assert done1["status"] == done2["status"] == "completed"
    bodies = [r.body for r in fake.requests]
    assert len(bodies) == 3
    last_tool = f"tool:{bodies[0]['tools'][-1]['name']}"
    # The first request has one message; later ones mark the two newest.
    assert marked(bodies[0]) == [last_tool, "system", "message:-1:-1"]
    for body in bodies[1:]:
        assert marked(body) == [last_tool, "system", "message:-2:-1", "message:-1:-1"]
    for body in bodies:
        assert len(marked(body)) <= MAX_BREAKPOINTS
        assert body["system"][0]["text"].startswith("You are crushd")
    # Request 2 ends with the tool result, request 3 with the new prompt.
    assert bodies[1]["messages"][-1]["content"][-1]["type"] == "tool_result"
    assert bodies[2]["messages"][-1]["content"][-1] == {
        "type": "text",
        "text": "sure?",
        "cache_control": EPHEMERAL,
    }
    # What the provider said it served from the cache is what the runs count.
    assert done1["usage"]["cache_read_tokens"] == 2900
    assert (done2["usage"]["cache_read_tokens"], done2["usage"]["cache_write_tokens"]) == (
        3050,
        100,
    )


def test_openai_requests_carry_no_cache_marks(fake, live_factory, project, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk")
    fake.script([Text("plain")])
    live = live_factory(
        provider="openai", model="gpt-c", base_url=fake.openai_base_url, api_key_env=KEY_ENV
    )
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
        run = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "hi"}).json()
        done = http.get(f"/v1/workspaces/{wid}/runs/{run['id']}", params={"wait": 20}).json()
    assert done["status"] == "completed"
    (request,) = fake.requests
    assert "cache_control" not in json.dumps(request.body)
