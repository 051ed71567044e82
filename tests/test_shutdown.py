"""Server stop and crash recovery with real processes and signals, and the
workspace shutdown order in-process with a provider that ignores cancels."""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator

import httpx
from conftest import make_config, sse_events, wait_for
from helpers import LONG, finish_of, messages, prompt, register, wait_terminal

from crushd.cancel import CancelToken
from crushd.common import text_of
from crushd.providers.base import Provider, StepFinish, StepRequest, StreamEvent, TextDelta
from crushd.server import Server


def _running(http: httpx.Client, wid: str, rid: str) -> bool:
    return http.get(f"/v1/workspaces/{wid}/runs/{rid}").json()["status"] == "running"


def _has_text(http: httpx.Client, wid: str, sid: str) -> bool:
    stored = messages(http, wid, sid)
    return any(p["type"] == "text" for m in stored if m["role"] == "assistant" for p in m["parts"])


def test_sigterm_mid_run_then_restart(daemon_factory, project):
    daemon = daemon_factory("--echo-delay", "0.05")
    with daemon.client() as http:
        wid = register(http, project)
        active = prompt(http, wid, LONG).json()
        sid = active["session_id"]
        queued = [prompt(http, wid, f"queued {i}", session_id=sid).json() for i in range(3)]
        wait_for(lambda: _has_text(http, wid, sid), 10)
        daemon.signal(signal.SIGTERM)
        started = time.monotonic()
        # Prompts are refused (never accepted-then-dropped) while it stops.
        refused = wait_for(lambda: _try_prompt(http, wid), 5)
        assert refused in (503, "gone")
    assert daemon.wait(20) == 0
    assert time.monotonic() - started < 10
    assert "event=server_stopped" in daemon.log()

    restarted = daemon_factory("--echo-delay", "0.001")
    with restarted.client() as http:
        stopped = http.get(f"/v1/workspaces/{wid}/runs/{active['id']}").json()
        assert stopped["status"] == "cancelled" and stopped["finished_at"]
        done = [wait_terminal(http, wid, r["id"]) for r in queued]
        assert [r["status"] for r in done] == ["completed"] * 3
        assert [r["text"] for r in done] == ["queued 0", "queued 1", "queued 2"]
        assert [r["started_at"] for r in done] == sorted(r["started_at"] for r in done)
        stored = messages(http, wid, sid)
        first_answer = next(m for m in stored if m["role"] == "assistant")
        assert finish_of(first_answer)["reason"] == "canceled"
        assert stopped["text"] == text_of(first_answer["parts"])


def _try_prompt(http: httpx.Client, wid: str):
    try:
        response = prompt(http, wid, "late")
    except httpx.TransportError:
        return "gone"
    if response.status_code == 503:
        assert response.json()["error"]["code"] == "shutting_down"
        return 503
    assert response.status_code == 202
    return None


def test_kill_9_mid_run_then_restart_interrupts_and_requeues(daemon_factory, project):
    daemon = daemon_factory("--echo-delay", "0.05")
    with daemon.client() as http:
        wid = register(http, project)
        active = prompt(http, wid, LONG).json()
        sid = active["session_id"]
        queued = prompt(http, wid, "after the crash", session_id=sid).json()
        wait_for(lambda: _running(http, wid, active["id"]), 10)
        # A coalesced write of the streaming message has landed.
        wait_for(lambda: _has_text(http, wid, sid), 10)
    daemon.signal(signal.SIGKILL)
    daemon.wait(10)

    restarted = daemon_factory()
    with restarted.client() as http:
        crashed = http.get(f"/v1/workspaces/{wid}/runs/{active['id']}").json()
        assert crashed["status"] == "interrupted" and crashed["error"] == "interrupted"
        assert crashed["finished_at"]
        assistant = [
            m
            for m in messages(http, wid, sid)
            if m["run_id"] == active["id"] and m["role"] == "assistant"
        ][0]
        finish = finish_of(assistant)
        assert (finish["reason"], finish["message"]) == ("error", "interrupted")
        assert wait_terminal(http, wid, queued["id"])["text"] == "after the crash"
        # The recovery was announced: a client that replays from the start of
        # the buffer (after the reset that tells it to) sees run.completed.
        with http.stream("GET", f"/v1/workspaces/{wid}/events", params={"since": 0}) as s:
            (reset,) = sse_events(s.iter_lines(), 1)
        assert reset["event"] == "reset"
        oldest = reset["data"]["payload"]["oldest"]
        with http.stream(
            "GET", f"/v1/workspaces/{wid}/events", params={"since": oldest - 1}
        ) as stream:
            lines = stream.iter_lines()
            replayed = sse_events(lines, 1, timeout=5)
            while replayed[-1]["event"] != "run.completed":
                replayed.extend(sse_events(lines, 1, timeout=5))
        assert replayed[0]["event"] == "message.updated"
        assert finish_of(replayed[0]["data"]["payload"])["message"] == "interrupted"
        completed = replayed[-1]["data"]["payload"]
        assert (completed["id"], completed["status"]) == (active["id"], "interrupted")


def test_drain_lets_turns_finish_and_a_second_signal_cuts_it(daemon_factory, project):
    daemon = daemon_factory("--echo-delay", "0.02", "--drain-timeout", "30")
    with daemon.client() as http:
        wid = register(http, project)
        short = prompt(http, wid, " ".join(["w"] * 30)).json()
        wait_for(lambda: _running(http, wid, short["id"]), 10)
        daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    second = daemon_factory("--echo-delay", "0.05", "--drain-timeout", "60")
    with second.client() as http:
        assert http.get(f"/v1/workspaces/{wid}/runs/{short['id']}").json()["status"] == (
            "completed"
        )
        long = prompt(http, wid, LONG * 3).json()
        wait_for(lambda: _running(http, wid, long["id"]), 10)
        second.signal(signal.SIGTERM)
        wait_for(lambda: "event=workspace_closing" in second.log(), 10)
        started = time.monotonic()
        second.signal(signal.SIGINT)
    assert second.wait(20) == 0
    assert time.monotonic() - started < 10
    assert "event=drain_skipped" in second.log()
    third = daemon_factory()
    with third.client() as http:
        assert http.get(f"/v1/workspaces/{wid}/runs/{long['id']}").json()["status"] == ("cancelled")


class StubbornProvider(Provider):
    """Streams one word, then blocks ignoring its token until released."""

    name = "stubborn"
    model = "stubborn-1"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.streaming = threading.Event()

    def stream(self, request: StepRequest, token: CancelToken) -> Iterator[StreamEvent]:
        yield TextDelta("stuck ")
        self.streaming.set()
        self.release.wait(30)
        yield TextDelta("late")
        yield StepFinish("end_turn")


def test_close_is_bounded_and_never_touches_a_closed_database(tmp_path, project):
    config = make_config(tmp_path, shutdown_timeout=0.5, cleanup_timeout=0.5)
    provider = StubbornProvider()
    server = Server(config, provider=provider).start()
    try:
        record, _ = server.register(str(project), None)
        workspace = server.get(record["id"])
        run, _ = workspace.submit("go")
        assert provider.streaming.wait(10)
        started = time.monotonic()
        server.unregister(record["id"])
        assert time.monotonic() - started < 3
        assert workspace.store.closed
        db_path = workspace.directory / "workspace.db"
        before = db_path.stat().st_mtime_ns
        provider.release.set()
        wait_for(lambda: workspace.active_run_count() == 0, 10)
        assert db_path.stat().st_mtime_ns == before
        with sqlite3.connect(db_path) as db:
            parts = db.execute("SELECT parts FROM message WHERE role = 'assistant'").fetchone()
        # The shutdown flushed what the stuck run had streamed.
        assert "stuck " in parts[0]
    finally:
        provider.release.set()
        server.stop()


def test_close_joins_stuck_threads_with_a_deadline_and_names_them(tmp_path, project, caplog):
    caplog.set_level(logging.WARNING, logger="crushd.workspace")
    config = make_config(tmp_path, shutdown_timeout=0.3, cleanup_timeout=0.3)
    provider = StubbornProvider()
    server = Server(config, provider=provider).start()
    try:
        record, _ = server.register(str(project), None)
        workspace = server.get(record["id"])
        run, _ = workspace.submit("go")
        assert provider.streaming.wait(10)
        results: list[bool] = []
        first = threading.Thread(target=lambda: results.append(workspace.close()))
        started = time.monotonic()
        first.start()
        wait_for(lambda: workspace.closing, 5)
        # A second caller waits for the first close and learns that it finished.
        assert workspace.close() is True
        assert time.monotonic() - started < 3
        first.join(5)
        assert results == [True] and workspace.store.closed
        alive = [r.getMessage() for r in caplog.records if "workspace_threads_alive" in r.message]
        assert len(alive) == 1, caplog.text
        assert f"runs={run['id']}" in alive[0] and "threads=crushd-run-" in alive[0]
    finally:
        provider.release.set()
        server.stop()
