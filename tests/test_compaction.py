"""Compaction: a session that outgrows its model's window is summarized, and
later requests carry the summary instead of the history before it.

Everything runs for real: a crushd on a waitress socket, a model that is
:class:`FakeProvider` over HTTP reporting the token usage each test scripts,
and a model configured with a small ``context_window``.  The tests assert on
the request bodies the fake received, the stored messages, the events and
the run records.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import wait_for
from fakeprovider import Hang, HTTPError, Pause, Text, ToolCall, Usage
from helpers import is_type, messages, register, run_events, wait_terminal

from crushd.context import COMPACT_INSTRUCTION, compaction_threshold

KEY_ENV = "CRUSHD_TEST_COMPACTION_KEY"
BOTH = pytest.mark.parametrize("protocol", ["openai", "anthropic"])
WINDOW = 100_000  # threshold 80000: the reserve is max(20000, 20 %)
TOO_LONG = {
    "openai": "This model's maximum context length is 128000 tokens. However, your "
    "messages resulted in 130512 tokens. Please reduce the length of the messages.",
    "anthropic": "prompt is too long: 210457 tokens > 200000 maximum",
}


@pytest.fixture
def daemon(fake, live_factory, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-compaction-test")

    def start(protocol: str = "openai", window: int = WINDOW, **overrides: Any):
        base = fake.openai_base_url if protocol == "openai" else fake.anthropic_base_url
        model = {
            "provider": protocol,
            "model": f"{protocol}-small",
            "base_url": base,
            "api_key_env": KEY_ENV,
            "context_window": window,
        }
        return live_factory(models={"small": model}, **overrides)

    return start


def texts(request: Any) -> list[tuple[str, str]]:
    """``(role, text)`` of every message a request carried, system prompt left out."""
    result = []
    for message in request.body["messages"]:
        content = message.get("content")
        if message["role"] == "system":
            continue
        if isinstance(content, str):
            result.append((message["role"], content))
            continue
        for block in content or []:
            if block.get("type") == "text":
                result.append((message["role"], block["text"]))
            elif block.get("type") == "tool_result":
                result.append(("tool", block["content"]))
            elif block.get("type") == "tool_use":
                result.append(("tool_call", block["name"]))
        for call in message.get("tool_calls") or []:
            result.append(("tool_call", call["function"]["name"]))
        if message["role"] == "tool":
            result[-1] = ("tool", content)
    return result


def flat(request: Any) -> str:
    return "\n".join(text for _, text in texts(request))


def ask(http: httpx.Client, wid: str, text: str, sid: str | None = None) -> dict[str, Any]:
    body = {"prompt": text, **({"session_id": sid} if sid else {})}
    response = http.post(f"/v1/workspaces/{wid}/agent", json=body)
    assert response.status_code == 202, response.text
    return wait_terminal(http, wid, response.json()["id"])


def compact(http: httpx.Client, wid: str, sid: str, **body: Any) -> httpx.Response:
    return http.post(f"/v1/workspaces/{wid}/sessions/{sid}/compact", json=body)


def summaries(stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in stored if any(p["type"] == "summary" for p in m["parts"])]


def test_the_threshold_follows_the_contract():
    assert compaction_threshold(100_000) == 80_000
    assert compaction_threshold(200_000) == 160_000
    assert compaction_threshold(30_000) == 10_000  # the 20000 floor of the reserve


@BOTH
def test_usage_over_the_threshold_compacts_before_the_next_step(daemon, fake, project, protocol):
    live = daemon(protocol)
    fake.script([Text("first answer"), Usage(80_001, 10)])
    fake.script([Text("SUMMARY "), Text("of the first turn"), Usage(70_000, 50)])
    fake.script([Text("second answer"), Usage(1_200, 5)])
    fake.script([Text("third answer"), Usage(1_400, 5)])
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        first = ask(http, wid, "first question")
        sid = first["session_id"]
        second = ask(http, wid, "second question", sid)
        third = ask(http, wid, "third question", sid)
        stored = messages(http, wid, sid)
        events = run_events(live.url, wid, sid, third["id"])
    assert [r["status"] for r in (first, second, third)] == ["completed"] * 3
    assert len(fake.requests) == 4  # one compaction, no second one
    summarize, after, later = fake.requests[1:]
    # The compaction: no tools, the history before this run, the instruction last.
    assert "tools" not in summarize.body
    assert texts(summarize)[-1] == ("user", COMPACT_INSTRUCTION)
    assert "first question" in flat(summarize) and "first answer" in flat(summarize)
    assert "second question" not in flat(summarize)
    # The next request: the summary as the first user message, then the new prompt only.
    assert "tools" in after.body
    sent = texts(after)
    assert sent[0][0] == "user" and "SUMMARY of the first turn" in sent[0][1]
    assert sent[1:] == [("user", "second question")]
    assert "first answer" not in flat(after) and "first question" not in flat(after)
    # The compaction's own usage (70000) does not count: the third run compacts nothing.
    assert [t for _, t in texts(later)][1:] == [
        "second question",
        "second answer",
        "third question",
    ]
    # Nothing is deleted; the summary is an assistant message of the second run.
    assert [(m["role"], m["run_id"]) for m in stored] == [
        ("user", first["id"]),
        ("assistant", first["id"]),
        ("user", second["id"]),
        ("assistant", second["id"]),
        ("assistant", second["id"]),
        ("user", third["id"]),
        ("assistant", third["id"]),
    ]
    summary = stored[3]
    assert summary["parts"][0] == {"type": "summary", "text": "SUMMARY of the first turn"}
    assert [p["type"] for p in summary["parts"]] == ["summary", "finish"]
    assert summary["parts"][1]["reason"] == "end_turn"
    assert second["text"] == "second answer" and second["message_id"] == stored[4]["id"]
    assert second["usage"]["prompt_tokens"] == 71_200  # the compaction is paid for
    compacted = [e for e in events if e["type"] == "session.compacted"]
    assert [e["payload"] for e in compacted] == [{"session_id": sid, "message_id": summary["id"]}]
    deltas = [e["payload"] for e in events if is_type("message.delta", message_id=summary["id"])(e)]
    assert {d["kind"] for d in deltas} == {"summary"}
    deltas = [d["delta"] for d in deltas]
    assert "".join(deltas) == "SUMMARY of the first turn"


@pytest.mark.parametrize("used,overrides", [(80_000, {}), (99_000, {"auto_compact": False})])
def test_no_compaction_at_the_threshold_or_when_turned_off(daemon, fake, project, used, overrides):
    live = daemon(**overrides)
    fake.script([Text("one"), Usage(used, 10)])
    fake.script([Text("two"), Usage(used, 10)])
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        sid = ask(http, wid, "first")["session_id"]
        assert ask(http, wid, "second", sid)["status"] == "completed"
        assert summaries(messages(http, wid, sid)) == []
    assert len(fake.requests) == 2
    assert [t for _, t in texts(fake.requests[1])] == ["first", "one", "second"]


def test_a_step_after_a_big_tool_result_compacts_the_run_so_far(daemon, fake, project):
    (project / "big.txt").write_text("line\n" * 50)
    live = daemon()
    fake.script([ToolCall("view", {"path": "big.txt"}), Usage(85_000, 20)])
    fake.script([Text("The run so far: viewed big.txt."), Usage(60_000, 30)])
    fake.script([Text("done viewing"), Usage(2_000, 5)])
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        run = ask(http, wid, "look at big.txt")
        stored = messages(http, wid, run["session_id"])
    assert run["status"] == "completed" and run["text"] == "done viewing"
    summarize, after = fake.requests[1:]
    sent = flat(summarize)
    assert "look at big.txt" in sent and "[tool call view:" in sent and "[tool result view:" in sent
    assert "tools" not in summarize.body
    # The run's own prompt was summarized too: the step gets the summary alone.
    (only,) = texts(after)
    assert only[0] == "user" and "The run so far: viewed big.txt." in only[1]
    roles = [m["role"] for m in stored]
    assert roles == ["user", "assistant", "tool", "assistant", "assistant"]
    assert summaries(stored) == [stored[3]]


@BOTH
def test_prompt_too_long_compacts_once_and_retries_the_step(daemon, fake, project, protocol):
    live = daemon(protocol)
    fake.script([Text("short answer"), Usage(500, 5)])
    fake.script([HTTPError(400, TOO_LONG[protocol])])
    fake.script([Text("SUMMARY after too long"), Usage(400, 20)])
    fake.script([Text("answered after compaction"), Usage(600, 5)])
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        sid = ask(http, wid, "one")["session_id"]
        run = ask(http, wid, "two", sid)
        stored = messages(http, wid, sid)
        events = run_events(live.url, wid, sid, run["id"])
    assert run["status"] == "completed" and run["text"] == "answered after compaction"
    assert len(fake.requests) == 4
    refused, summarize, retried = fake.requests[1:]
    assert [t for _, t in texts(refused)] == ["one", "short answer", "two"]
    assert "one" in flat(summarize) and "two" not in flat(summarize)
    sent = texts(retried)
    assert "SUMMARY after too long" in sent[0][1] and sent[1:] == [("user", "two")]
    # The refused step's message became the summary; the answer is a new one.
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant", "assistant"]
    assert summaries(stored) == [stored[3]]
    assert any(is_type("session.compacted", message_id=stored[3]["id"])(e) for e in events)


@BOTH
def test_still_too_long_after_compacting_fails_with_the_providers_message(
    daemon, fake, project, protocol
):
    live = daemon(protocol)
    fake.script([Text("short answer"), Usage(500, 5)])
    fake.script([HTTPError(400, TOO_LONG[protocol])])
    fake.script([Text("a summary"), Usage(400, 20)])
    fake.script([HTTPError(400, TOO_LONG[protocol])])
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        sid = ask(http, wid, "one")["session_id"]
        run = ask(http, wid, "an enormous prompt", sid)
    assert run["status"] == "failed"
    assert TOO_LONG[protocol] in run["error"]
    assert len(fake.requests) == 4  # compacted once, not again


def test_too_long_with_nothing_to_compact_fails_at_once(daemon, fake, project):
    live = daemon("anthropic")
    fake.script([HTTPError(400, TOO_LONG["anthropic"])])
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        run = ask(http, wid, "a first prompt that is already too long")
        assert summaries(messages(http, wid, run["session_id"])) == []
    assert run["status"] == "failed" and TOO_LONG["anthropic"] in run["error"]
    assert len(fake.requests) == 1


def test_manual_compaction_is_a_queued_run_whose_text_is_the_summary(daemon, fake, project):
    live = daemon(auto_compact=False)  # the explicit one works without the automatic one
    fake.script([Text("slow "), Pause(0.5), Text("answer"), Usage(1_000, 5)])
    fake.script([Text("SUMMARY ONE"), Usage(95_000, 30)])
    fake.script([Text("after the summary"), Usage(1_000, 5)])
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        first = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "hello"}).json()
        sid = first["session_id"]
        response = compact(http, wid, sid)
        assert response.status_code == 202, response.text
        queued = response.json()
        assert (queued["kind"], queued["status"], queued["model"]) == ("compact", "queued", "small")
        assert queued["session_id"] == sid and queued["prompt"] == ""
        queue = http.get(f"/v1/workspaces/{wid}/sessions/{sid}/queue").json()
        assert [r["id"] for r in queue] == [queued["id"]]  # behind the running prompt
        done = wait_terminal(http, wid, queued["id"])
        assert wait_terminal(http, wid, first["id"])["status"] == "completed"
        listed = http.get(f"/v1/workspaces/{wid}/runs", params={"session_id": sid}).json()
        third = ask(http, wid, "next", sid)
        stored = messages(http, wid, sid)
    assert done["status"] == "completed" and done["text"] == "SUMMARY ONE"
    assert [r["kind"] for r in listed] == ["compact", "prompt"]
    assert [m["role"] for m in stored] == ["user", "assistant", "assistant", "user", "assistant"]
    assert done["message_id"] == stored[2]["id"] == summaries(stored)[0]["id"]
    assert done["usage"]["prompt_tokens"] == 95_000
    assert third["status"] == "completed"
    assert len(fake.requests) == 3  # the compaction's 95000 tokens did not trigger another
    sent = texts(fake.requests[2])
    assert "SUMMARY ONE" in sent[0][1] and sent[1:] == [("user", "next")]


def test_manual_compaction_errors(daemon, fake, project):
    live = daemon()
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        missing = compact(http, wid, "no-such-session")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        sid = http.post(f"/v1/workspaces/{wid}/sessions", json={"title": "empty"}).json()["id"]
        bad = compact(http, wid, sid, model="nope")
        assert bad.status_code == 400 and "unknown model 'nope'" in bad.json()["error"]["message"]
        wrong = compact(http, wid, sid, model=3)
        assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "invalid_request"
        assert http.get(f"/v1/workspaces/{wid}/runs").json() == []
        empty = compact(http, wid, sid)
        assert empty.status_code == 202
        run = wait_terminal(http, wid, empty.json()["id"])
    assert run["status"] == "failed" and "no messages" in run["error"]
    assert fake.requests == []


def test_a_cancelled_compaction_leaves_the_old_cut_in_force(daemon, fake, project):
    live = daemon()
    fake.script([Text("answer one"), Usage(1_000, 5)])
    fake.script([Text("SUMMARY ONE"), Usage(900, 20)])
    fake.script([Text("answer two"), Usage(1_000, 5)])
    fake.script([Text("PARTIAL SUMMARY "), Hang()])
    fake.script([Text("answer three"), Usage(1_000, 5)])
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        sid = ask(http, wid, "one")["session_id"]
        assert wait_terminal(http, wid, compact(http, wid, sid).json()["id"])["status"] == (
            "completed"
        )
        ask(http, wid, "two", sid)
        second = compact(http, wid, sid).json()
        wait_for(
            lambda: any("PARTIAL" in str(m["parts"]) for m in messages(http, wid, sid)),
            message="the partial summary never arrived",
        )
        cancelled = http.post(f"/v1/workspaces/{wid}/runs/{second['id']}/cancel")
        assert cancelled.status_code == 202
        run = wait_terminal(http, wid, second["id"])
        third = ask(http, wid, "three", sid)
        stored = messages(http, wid, sid)
        events = run_events(live.url, wid, sid, third["id"])
    assert run["status"] == "cancelled"
    # The second compaction summarized the first summary and what followed it.
    second_request = flat(fake.requests[3])
    assert "SUMMARY ONE" in second_request and "two" in second_request
    assert "answer one" not in second_request
    partial = summaries(stored)[-1]
    assert partial["run_id"] == second["id"]
    assert partial["parts"][0] == {"type": "summary", "text": "PARTIAL SUMMARY "}
    assert partial["parts"][-1]["reason"] == "canceled"
    # Still the first summary, and everything after it.
    sent = texts(fake.requests[4])
    assert "SUMMARY ONE" in sent[0][1] and "PARTIAL" not in flat(fake.requests[4])
    assert [t for _, t in sent[1:]] == ["two", "answer two", "three"]
    assert third["text"] == "answer three"
    compacted = [e["payload"]["message_id"] for e in events if e["type"] == "session.compacted"]
    assert partial["id"] not in compacted and len(compacted) == 1


def test_auto_compact_is_a_flag_a_file_key_and_an_environment_variable(tmp_path):
    from crushd.cli import serve
    from crushd.config import Config

    assert serve.make_context("serve", ["--no-auto-compact"]).params["auto_compact"] is False
    assert serve.make_context("serve", []).params["auto_compact"] is None  # not given
    assert Config.load({"auto_compact": None}, env={}).auto_compact is True
    assert Config.load({"auto_compact": False}, env={}).auto_compact is False
    assert Config.load({}, env={"CRUSHD_AUTO_COMPACT": "false"}).auto_compact is False
    toml = tmp_path / "c.toml"
    toml.write_text("auto_compact = false\n")
    assert Config.load({}, env={}, config_file=str(toml)).auto_compact is False


def test_a_crash_during_compaction_seals_the_partial_summary_and_keeps_no_cut(
    fake, daemon_factory, project
):
    fake.script([Text("answer one"), Usage(1_000, 5)])
    fake.script([Text("PARTIAL SUMMARY "), Hang()])
    fake.script([Text("answer two"), Usage(1_000, 5)])
    args = f"--provider openai --base-url {fake.openai_base_url} --model m".split()
    daemon = daemon_factory(*args, env={"OPENAI_API_KEY": "sk-test"})
    with daemon.client() as http:
        wid = register(http, project)
        sid = ask(http, wid, "one")["session_id"]
        run = compact(http, wid, sid).json()
        wait_for(
            lambda: any("PARTIAL" in str(m["parts"]) for m in messages(http, wid, sid)),
            message="the partial summary never arrived",
        )
    daemon.kill()
    restarted = daemon_factory(*args, env={"OPENAI_API_KEY": "sk-test"})
    with restarted.client() as http:
        crashed = http.get(f"/v1/workspaces/{wid}/runs/{run['id']}").json()
        after = ask(http, wid, "two", sid)
        stored = messages(http, wid, sid)
    assert crashed["status"] == "interrupted"
    partial = summaries(stored)[0]
    assert partial["parts"][0] == {"type": "summary", "text": "PARTIAL SUMMARY "}
    assert partial["parts"][-1]["reason"] == "error"
    assert after["status"] == "completed"
    # No summary in force: the whole history, the partial summary left out.
    assert [t for _, t in texts(fake.requests[2])] == ["one", "answer one", "two"]


def test_closing_the_workspace_during_compaction_keeps_the_old_cut(daemon, fake, project):
    live = daemon()
    fake.script([Text("answer one"), Usage(1_000, 5)])
    fake.script([Text("SUMMARY ONE"), Usage(900, 20)])
    fake.script([Text("answer middle"), Usage(1_000, 5)])
    fake.script([Text("PARTIAL "), Hang()])
    fake.script([Text("answer two"), Usage(1_000, 5)])
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        sid = ask(http, wid, "one")["session_id"]
        first = wait_terminal(http, wid, compact(http, wid, sid).json()["id"])
        ask(http, wid, "middle", sid)
        second = compact(http, wid, sid).json()
        wait_for(lambda: len(summaries(messages(http, wid, sid))) == 2)
        assert http.delete(f"/v1/workspaces/{wid}").status_code == 204
        assert register(http, project) == wid  # the same id and history come back
        closed = http.get(f"/v1/workspaces/{wid}/runs/{second['id']}").json()
        after = ask(http, wid, "two", sid)
        stored = messages(http, wid, sid)
    assert first["status"] == "completed" and closed["status"] == "cancelled"
    assert summaries(stored)[-1]["parts"][-1]["reason"] == "canceled"
    assert after["status"] == "completed"
    sent = texts(fake.requests[4])
    assert "SUMMARY ONE" in sent[0][1] and "PARTIAL" not in flat(fake.requests[4])
    assert sent[1:] == [("user", "middle"), ("assistant", "answer middle"), ("user", "two")]
