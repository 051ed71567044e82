"""The run lifecycle over real HTTP: prompts, queue, cancel, wait, delete."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import make_config, sse_events, wait_for
from helpers import LONG, finish_of, messages, prompt, register, wait_terminal

from crushd.common import text_of
from crushd.errors import WorkspaceClosing
from crushd.server import Server
from crushd.store import WorkspaceStore


@pytest.fixture
def slow(live_factory):
    """A live server whose echo model takes ~50 ms per word."""
    return live_factory(echo_delay=0.05, workers=4, max_queue=3)


def test_prompt_is_accepted_before_the_model_runs_and_completes(live, project):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        response = prompt(http, wid, "hello there\nsecond line")
        assert response.status_code == 202
        run = response.json()
        assert run["status"] == "queued" and run["workspace_id"] == wid
        session = http.get(f"/v1/workspaces/{wid}/sessions/{run['session_id']}").json()
        assert session["title"] == "hello there"
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed"
        assert done["text"] == "hello there\nsecond line"
        assert done["usage"]["completion_tokens"] > 0
        assert done["started_at"] and done["finished_at"]
        stored = messages(http, wid, run["session_id"])
        assert [m["role"] for m in stored] == ["user", "assistant"]
        assert stored[0]["run_id"] == run["id"]
        assert stored[1]["id"] == done["message_id"]
        assert stored[1]["provider"] == "echo" and stored[1]["model"] == "echo"
        assert finish_of(stored[1])["reason"] == "end_turn"


def test_run_id_is_an_idempotency_key(live, project):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        first = prompt(http, wid, "same", run_id="client-key-1")
        assert first.status_code == 202 and first.json()["id"] == "client-key-1"
        again = prompt(http, wid, "same", run_id="client-key-1")
        assert again.status_code == 200 and again.json()["id"] == "client-key-1"
        conflict = prompt(http, wid, "different", run_id="client-key-1")
        assert conflict.status_code == 409
        assert conflict.json()["error"]["code"] == "run_id_conflict"
        runs = http.get(f"/v1/workspaces/{wid}/runs").json()
        assert [r["id"] for r in runs] == ["client-key-1"]
        # What the OpenAPI pattern allows is accepted; control characters are not.
        astral = prompt(http, wid, "any text", run_id="key-\u00ad-\U000f0000-é")
        assert astral.status_code == 202, astral.text
        for bad in ("tab\there", "bell\x07", "c1\x85", "x" * 129):
            refused = prompt(http, wid, "refused", run_id=bad)
            assert (
                refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_request"
            )
        runs = http.get(f"/v1/workspaces/{wid}/runs").json()
        assert len(runs) == 2


def test_session_runs_are_fifo_and_queue_is_bounded(slow, project):
    with httpx.Client(base_url=slow.url, timeout=30) as http:
        wid = register(http, project)
        first = prompt(http, wid, LONG).json()
        sid = first["session_id"]
        queued = [prompt(http, wid, f"next {i}", session_id=sid).json() for i in range(3)]
        assert all(r["status"] == "queued" for r in queued)
        full = prompt(http, wid, "one too many", session_id=sid)
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        queue = http.get(f"/v1/workspaces/{wid}/sessions/{sid}/queue").json()
        assert [r["id"] for r in queue] == [r["id"] for r in queued]
        session = http.get(f"/v1/workspaces/{wid}/sessions/{sid}").json()
        assert session["is_busy"] and session["queued_runs"] == 3
        busy = http.delete(f"/v1/workspaces/{wid}/sessions/{sid}")
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"
        workspace = http.get(f"/v1/workspaces/{wid}").json()
        assert workspace["active_runs"] == 1 and workspace["queued_runs"] == 3
        # Another session runs in parallel with the busy one.
        other = prompt(http, wid, "parallel").json()
        assert wait_terminal(http, wid, other["id"])["status"] == "completed"
        assert http.get(f"/v1/workspaces/{wid}/runs/{first['id']}").json()["status"] == "running"
        http.post(f"/v1/workspaces/{wid}/runs/{first['id']}/cancel")
        finished = [wait_terminal(http, wid, r["id"]) for r in queued]
        assert [r["status"] for r in finished] == ["completed"] * 3
        starts = [r["started_at"] for r in finished]
        assert starts == sorted(starts)
        # No run was refused-but-recorded: exactly the accepted runs exist.
        assert len(http.get(f"/v1/workspaces/{wid}/runs").json()) == 5
        assert http.delete(f"/v1/workspaces/{wid}/sessions/{sid}").status_code == 204


def test_cancel_mid_stream_keeps_exactly_the_streamed_text(slow, project):
    with httpx.Client(base_url=slow.url, timeout=30) as http:
        wid = register(http, project)
        with http.stream("GET", f"/v1/workspaces/{wid}/events") as stream:
            lines = stream.iter_lines()
            run = prompt(http, wid, LONG).json()
            deltas: list[str] = []
            events = []
            while len(deltas) < 5:
                (event,) = sse_events(lines, 1)
                events.append(event)
                if event["event"] == "message.delta":
                    deltas.append(event["data"]["payload"]["delta"])
            cancel = http.post(f"/v1/workspaces/{wid}/runs/{run['id']}/cancel")
            assert cancel.status_code == 202
            started = time.monotonic()
            while True:
                (event,) = sse_events(lines, 1)
                events.append(event)
                if event["event"] == "message.delta":
                    deltas.append(event["data"]["payload"]["delta"])
                if event["event"] == "run.completed":
                    break
            assert time.monotonic() - started < 2.0
        terminal = event["data"]["payload"]
        assert terminal["status"] == "cancelled" and terminal["finished_at"]
        seqs = [int(e["id"]) for e in events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        stored = messages(http, wid, run["session_id"])
        assistant = stored[-1]
        text = text_of(assistant["parts"])
        assert text == "".join(deltas)
        assert 5 <= len(deltas) < 200
        finish = finish_of(assistant)
        assert (finish["reason"], finish["message"]) == ("canceled", "Request canceled")
        assert terminal["text"] == text
        # Cancelling a finished run is a no-op with 200.
        again = http.post(f"/v1/workspaces/{wid}/runs/{run['id']}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_cancel_queued_and_session(slow, project):
    with httpx.Client(base_url=slow.url, timeout=30) as http:
        wid = register(http, project)
        first = prompt(http, wid, LONG).json()
        sid = first["session_id"]
        second = prompt(http, wid, "second", session_id=sid).json()
        third = prompt(http, wid, "third", session_id=sid).json()
        # Cancelling a queued run is immediate and leaves no messages.
        cancelled = http.post(f"/v1/workspaces/{wid}/runs/{second['id']}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
        result = http.post(f"/v1/workspaces/{wid}/sessions/{sid}/cancel").json()
        assert result == {"cancelled": [first["id"], third["id"]]}
        assert wait_terminal(http, wid, first["id"])["status"] == "cancelled"
        assert http.get(f"/v1/workspaces/{wid}/runs/{third['id']}").json()["status"] == (
            "cancelled"
        )
        run_ids = {m["run_id"] for m in messages(http, wid, sid)}
        assert run_ids == {first["id"]}
        assert http.get(f"/v1/workspaces/{wid}/sessions/{sid}/queue").json() == []


def test_cancel_covers_only_the_runs_it_names(slow, project):
    with httpx.Client(base_url=slow.url, timeout=30) as http:
        wid = register(http, project)
        first = prompt(http, wid, LONG).json()
        sid = first["session_id"]
        later = prompt(http, wid, "later prompt", session_id=sid).json()
        http.post(f"/v1/workspaces/{wid}/runs/{first['id']}/cancel")
        assert wait_terminal(http, wid, first["id"])["status"] == "cancelled"
        done = wait_terminal(http, wid, later["id"])
        assert done["status"] == "completed" and done["text"] == "later prompt"
        # DELETE queue cancels only queued runs, not the active one.
        active = prompt(http, wid, LONG, session_id=sid).json()
        queued = prompt(http, wid, "queued", session_id=sid).json()
        cleared = http.delete(f"/v1/workspaces/{wid}/sessions/{sid}/queue").json()
        assert cleared == {"cancelled": [queued["id"]]}
        assert http.get(f"/v1/workspaces/{wid}/runs/{active['id']}").json()["status"] == "running"
        http.post(f"/v1/workspaces/{wid}/runs/{active['id']}/cancel")
        wait_terminal(http, wid, active["id"])


def test_wait_returns_when_the_run_ends_and_is_bounded(slow, project):
    with httpx.Client(base_url=slow.url, timeout=30) as http:
        wid = register(http, project)
        run = prompt(http, wid, "a b c d e").json()
        started = time.monotonic()
        done = http.get(f"/v1/workspaces/{wid}/runs/{run['id']}", params={"wait": 60}).json()
        assert done["status"] == "completed" and time.monotonic() - started < 10
        long = prompt(http, wid, LONG).json()
        started = time.monotonic()
        still = http.get(f"/v1/workspaces/{wid}/runs/{long['id']}", params={"wait": 0.5}).json()
        assert still["status"] == "running"
        assert 0.4 < time.monotonic() - started < 5
        bad = http.get(f"/v1/workspaces/{wid}/runs/{long['id']}", params={"wait": 301})
        assert bad.status_code == 400
        assert http.get(f"/v1/workspaces/{wid}/runs/nope").status_code == 404
        http.post(f"/v1/workspaces/{wid}/runs/{long['id']}/cancel")
        wait_terminal(http, wid, long["id"])


def test_a_dropped_client_does_not_drop_the_run(slow, project):
    with httpx.Client(base_url=slow.url, timeout=30) as http:
        wid = register(http, project)
        run = prompt(http, wid, "a b c d e f g h").json()
    # The waiting client goes away mid-wait.
    with (
        httpx.Client(base_url=slow.url, timeout=0.2) as impatient,
        pytest.raises(httpx.TimeoutException),
    ):
        impatient.get(f"/v1/workspaces/{wid}/runs/{run['id']}", params={"wait": 30})
    with httpx.Client(base_url=slow.url, timeout=30) as http:
        assert wait_terminal(http, wid, run["id"])["status"] == "completed"


def test_delete_during_a_hammer_of_prompts_loses_nothing(live_factory, project):
    live = live_factory(echo_delay=0.01, workers=2, max_queue=1000)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        sessions = [
            http.post(f"/v1/workspaces/{wid}/sessions", json={}).json()["id"] for _ in range(4)
        ]
    accepted: list[str] = []
    refused: list[tuple[int, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def hammer(n: int) -> None:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            i = 0
            while not stop.is_set() and i < 400:
                i += 1
                response = prompt(
                    http,
                    wid,
                    f"prompt {n}-{i} " * 3,
                    session_id=sessions[n % 4],
                    run_id=f"r-{n}-{i}",
                )
                with lock:
                    if response.status_code == 202:
                        accepted.append(response.json()["id"])
                    else:
                        refused.append((response.status_code, f"r-{n}-{i}"))
                        if response.status_code in (404, 409):
                            return

    with ThreadPoolExecutor(6, thread_name_prefix="test-hammer") as pool:
        futures = [pool.submit(hammer, n) for n in range(6)]
        wait_for(lambda: len(accepted) >= 40, 20)
        with httpx.Client(base_url=live.url, timeout=60) as http:
            deleted = http.delete(f"/v1/workspaces/{wid}")
        stop.set()
        for future in futures:
            future.result()
    assert deleted.status_code == 204
    assert refused, "the delete happened after the hammer ended"
    assert {code for code, _ in refused} <= {404, 409}
    # History stays on disk: register the path again and read every run.
    with httpx.Client(base_url=live.url, timeout=30) as http:
        assert register(http, project) == wid
        runs = {
            r["id"]: r
            for r in http.get(f"/v1/workspaces/{wid}/runs", params={"limit": 1000}).json()
        }
    assert set(runs) == set(accepted)
    assert all(r["status"] in {"completed", "cancelled"} for r in runs.values())
    assert not {rid for _, rid in refused} & set(runs)
    for run in runs.values():
        if run["status"] == "cancelled" and run["started_at"]:
            assert run["message_id"] and run["finished_at"]


def test_prompts_at_once_are_all_stored_and_run_in_order(live_factory, project):
    """A burst is stored in batches (one transaction for whatever is pending):
    every prompt gets its own answer, a session runs its prompts in the
    order they were stored, and an id submitted many times at once makes
    one run."""
    live = live_factory(echo_delay=0.001, workers=16, threads=48)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        sid = prompt(http, wid, "first").json()["session_id"]
    barrier = threading.Barrier(40)

    def submit(n: int) -> httpx.Response:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            barrier.wait()
            if n < 10:
                return prompt(http, wid, "same key", run_id="burst-key")
            if n < 25:
                return prompt(http, wid, f"queued {n}", session_id=sid)
            return prompt(http, wid, f"alone {n}")

    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(submit, range(40)))
    assert sorted(a.status_code for a in answers[:10]) == [200] * 9 + [202]
    assert {a.json()["id"] for a in answers[:10]} == {"burst-key"}
    assert all(a.status_code == 202 for a in answers[10:]), [a.text for a in answers]
    with httpx.Client(base_url=live.url, timeout=30) as http:
        for answer in answers:
            assert wait_terminal(http, wid, answer.json()["id"])["status"] == "completed"
        runs = http.get(f"/v1/workspaces/{wid}/runs", params={"limit": 100}).json()
        assert len(runs) == 1 + 1 + 15 + 15
        in_session = sorted(
            (r for r in runs if r["session_id"] == sid), key=lambda r: r["created_at"]
        )
        stored_order = [r["id"] for r in reversed(runs) if r["session_id"] == sid]
        started_order = [r["id"] for r in sorted(in_session, key=lambda r: r["started_at"])]
        assert started_order == stored_order
        users = [m for m in messages(http, wid, sid) if m["role"] == "user"]
        assert [m["run_id"] for m in users] == stored_order


def test_a_run_starts_once_no_prompt_is_being_accepted(live, project):
    """Accepting prompts goes first: a run is held while a prompt (of any
    workspace: the server's one gate) is being accepted, up to the gate's
    bound; a cancel ends it at once."""
    gate = live.server.gate
    gate.bound = 30.0
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        with gate.accept():  # another submitter still in the middle of its accept
            waiting = prompt(http, wid, "waits").json()
            cancelled = prompt(http, wid, "cancelled while it waits").json()
            # Each was dispatched (in its own session) before its 202 and
            # is held: neither has reached the executor.
            assert gate.held == 2
            runs = {r["id"]: r["status"] for r in http.get(f"/v1/workspaces/{wid}/runs").json()}
            assert runs == {waiting["id"]: "queued", cancelled["id"]: "queued"}
            http.post(f"/v1/workspaces/{wid}/runs/{cancelled['id']}/cancel")
            done = wait_terminal(http, wid, cancelled["id"], timeout=5)
            assert done["status"] == "cancelled" and done["started_at"] is None
        assert wait_terminal(http, wid, waiting["id"], timeout=10)["status"] == "completed"
        assert {m["run_id"] for m in messages(http, wid, cancelled["session_id"])} == set()
        # The hold is bounded: a run starts after the bound whatever comes.
        gate.bound = 0.2
        with gate.accept():
            bounded = prompt(http, wid, "bounded").json()
            assert wait_terminal(http, wid, bounded["id"], timeout=10)["status"] == "completed"


def test_a_close_during_a_burst_ends_every_accepted_prompt(tmp_path, project):
    """Prompts racing a workspace close are either refused (WorkspaceClosing) or stored
    and brought to a terminal record: none is accepted and then lost."""
    server = Server(make_config(tmp_path, echo_delay=0.01, workers=8)).start()
    try:
        record, _ = server.register(str(project), None)
        workspace = server.get(record["id"])
        barrier = threading.Barrier(31)
        first_stored = threading.Event()

        def submit(n: int) -> str | None:
            barrier.wait()
            try:
                run_id = workspace.submit(f"prompt {n}")[0]["id"]
            except WorkspaceClosing:
                return None
            first_stored.set()
            return run_id

        with ThreadPoolExecutor(30) as pool:
            futures = [pool.submit(submit, n) for n in range(30)]
            barrier.wait()
            assert first_stored.wait(10)  # the close starts with the burst under way
            server.unregister(record["id"])
            accepted = [f.result() for f in futures if f.result() is not None]
    finally:
        server.stop()
    store = WorkspaceStore(workspace.directory / "workspace.db", record["id"])
    try:
        stored = {r["id"]: r["status"] for r in store.list_runs(limit=1000)}
    finally:
        store.close()
    assert set(stored) == set(accepted)
    assert all(status in ("completed", "cancelled") for status in stored.values()), stored
