"""Storage faults, reproduced for real: another process holding the write
lock of a workspace database, and a full file system (a small tmpfs filled
with dd).  While the fault lasts prompts get 503 ``storage_unavailable`` at
once and the health check answers from memory; once it clears, every
accepted run reaches its terminal record without a restart."""

from __future__ import annotations

import logging
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import wait_for

from crushd.common import TERMINAL_STATUSES
from crushd.errors import StorageUnavailable
from crushd.store import WorkspaceStore

HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


class OutsideWriter:
    """Another process that holds ``BEGIN IMMEDIATE`` on a database until released."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        assert self.proc.wait(10) == 0
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (the tests run as root, in CI too)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Fill the file system to the last block, as ``dd`` does."""
    filler = disk / "filler"
    result = subprocess.run(
        ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, text=True
    )
    assert "No space left on device" in result.stderr, result.stderr
    return filler


def register(http: httpx.Client, project: Path) -> str:
    resp = http.post("/v1/workspaces", json={"path": str(project)})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def submit(http: httpx.Client, wid: str, prompt: str, session_id: str | None = None) -> dict:
    body: dict[str, Any] = {"prompt": prompt}
    if session_id:
        body["session_id"] = session_id
    resp = http.post(f"/v1/workspaces/{wid}/agent", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()


def start_runs(http: httpx.Client, wid: str, words: int) -> tuple[list[dict], list[dict]]:
    """Three sessions streaming, and two runs queued behind the first."""
    prompt = " ".join(f"w{i}" for i in range(words))
    streaming = [submit(http, wid, f"{n} {prompt}") for n in range(3)]
    queued = [submit(http, wid, f"q{n} {prompt}", streaming[0]["session_id"]) for n in range(2)]
    wait_for(
        lambda: all(
            http.get(f"/v1/workspaces/{wid}/runs/{r['id']}").json()["status"] == "running"
            for r in streaming
        ),
        message="runs did not start",
    )
    return streaming, queued


def health(http: httpx.Client) -> tuple[dict, float]:
    started = time.monotonic()
    resp = http.get("/v1/health")
    assert resp.status_code == 200
    return resp.json(), time.monotonic() - started


def assert_refuses_prompts(http: httpx.Client, wid: str) -> None:
    wait_for(
        lambda: health(http)[0]["storage"] == "unavailable",
        timeout=15,
        message="health never said the storage is unavailable",
    )
    # Well under the 5 s busy timeout a blocked health check or prompt would
    # wait out, and loose enough for a loaded two-core machine.
    for _ in range(5):
        state, seconds = health(http)
        assert state["storage"] == "unavailable"
        assert seconds < 2.5, f"health took {seconds:.3f}s"
    started = time.monotonic()
    resp = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "refused"})
    elapsed = time.monotonic() - started
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "storage_unavailable"
    assert int(resp.headers["Retry-After"]) > 0
    assert elapsed < 2.5, f"the refusal took {elapsed:.3f}s"


def assert_all_completed(http: httpx.Client, wid: str, runs: list[dict]) -> None:
    """Every run completed with its whole answer stored, finish part included."""

    def terminal() -> list[dict] | None:
        now = [http.get(f"/v1/workspaces/{wid}/runs/{r['id']}").json() for r in runs]
        return now if all(r["status"] in TERMINAL_STATUSES for r in now) else None

    final = wait_for(terminal, timeout=30, message="runs stayed unfinished after the fault")
    for run in final:
        assert run["status"] == "completed", run
        assert run["text"] == run["prompt"], run["id"]
        messages = http.get(f"/v1/workspaces/{wid}/sessions/{run['session_id']}/messages").json()
        mine = [m for m in messages if m["run_id"] == run["id"]]
        assert [m["role"] for m in mine] == ["user", "assistant"]
        assert mine[1]["parts"][-1]["type"] == "finish"
        assert mine[1]["parts"][-1]["reason"] == "end_turn"


def assert_logged_once(caplog: pytest.LogCaptureFixture, db: Path) -> None:
    lines = [r.getMessage() for r in caplog.records if str(db) in r.getMessage()]
    assert sum("event=storage_unavailable" in line for line in lines) == 1, lines
    assert sum("event=storage_recovered" in line for line in lines) == 1, lines


def test_outside_writer_holding_the_lock(live_factory, project, caplog):
    caplog.set_level(logging.INFO, logger="crushd")
    live = live_factory(echo_delay=0.02, cleanup_timeout=1.0)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        db = live.server.data_dir / "workspaces" / wid / "workspace.db"
        streaming, queued = start_runs(http, wid, words=100)
        writer = OutsideWriter(db)
        try:
            assert_refuses_prompts(http, wid)
            # Outlast the streams and the cleanup deadline: the closing
            # records are owed now, the runs still "running" on disk.
            wait_for(
                lambda: "event=run_records_owed" in caplog.text, timeout=15, message="not owed"
            )
            runs = [http.get(f"/v1/workspaces/{wid}/runs/{r['id']}").json() for r in streaming]
            assert {r["status"] for r in runs} == {"running"}
        finally:
            writer.release()
        assert_all_completed(http, wid, streaming + queued)
        assert health(http)[0]["storage"] == "ok"
        after = submit(http, wid, "after the fault")
        assert http.get(f"/v1/workspaces/{wid}/runs/{after['id']}?wait=10").json()["status"] == (
            "completed"
        )
    assert_logged_once(caplog, db)


def test_full_disk(live_factory, project, small_disk, caplog):
    caplog.set_level(logging.INFO, logger="crushd")
    live = live_factory(data_dir=small_disk / "data", echo_delay=0.02, cleanup_timeout=1.0)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        db = live.server.data_dir / "workspaces" / wid / "workspace.db"
        streaming, queued = start_runs(http, wid, words=150)
        filler = fill(small_disk)
        try:
            assert_refuses_prompts(http, wid)
            wait_for(
                lambda: "event=run_records_owed" in caplog.text, timeout=15, message="not owed"
            )
        finally:
            filler.unlink()
        assert_all_completed(http, wid, streaming + queued)
        assert health(http)[0]["storage"] == "ok"
    assert_logged_once(caplog, db)
    check = sqlite3.connect(db)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        check.close()


def test_a_stop_writes_the_owed_records_before_it_exits(daemon_factory, project, tmp_path):
    """SIGTERM while the records are owed: the stop waits (within the shutdown
    timeout) for the database to accept them, writes them, then exits 0."""
    config = tmp_path / "crushd.toml"
    config.write_text('cleanup_timeout = 1.0\nlog_level = "debug"\n')
    daemon = daemon_factory("--config", str(config), "--echo-delay", "0.02")
    with daemon.client() as http:
        wid = register(http, project)
        db = daemon.data_dir / "workspaces" / wid / "workspace.db"
        streaming, queued = start_runs(http, wid, words=60)
        writer = OutsideWriter(db)
        try:
            wait_for(
                lambda: daemon.log().count("event=run_records_owed") == len(streaming),
                timeout=15,
                message="records were not owed",
            )
            daemon.signal(signal.SIGTERM)
            wait_for(lambda: "event=workspace_closing" in daemon.log(), message="no close")
            # The storage keeper tries again, and is refused, while the stop waits.
            wait_for(
                lambda: (
                    "event=storage_retry" in daemon.log().partition("event=workspace_closing")[2]
                ),
                message="the keeper did not try again during the stop",
            )
            assert daemon.proc.poll() is None, "the stop did not wait for the owed records"
        finally:
            writer.release()
        assert daemon.wait(30) == 0
    assert "event=records_owed_at_close" not in daemon.log()
    check = sqlite3.connect(db)
    try:
        rows = dict(check.execute("SELECT id, status FROM run").fetchall())
        texts = dict(check.execute("SELECT id, text FROM run").fetchall())
    finally:
        check.close()
    for run in streaming:
        assert rows[run["id"]] == "completed"
        assert texts[run["id"]] == run["prompt"]
    assert [rows[run["id"]] for run in queued] == ["queued", "queued"]


def test_a_refused_write_surfaces_its_own_error_and_stores_nothing(tmp_path, caplog):
    """SQLite rolls a transaction back itself on SQLITE_FULL; the store must
    report "disk is full" (not "cannot rollback"), keep nothing of it, and
    count as unavailable until a probe gets through."""
    caplog.set_level(logging.INFO, logger="crushd")
    store = WorkspaceStore(tmp_path / "workspace.db", "w")
    try:
        session = store.create_session("s")
        (pages,) = store.db.execute_sql("PRAGMA page_count").fetchone()
        store.db.execute_sql(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StorageUnavailable, match="database or disk is full"):
            store.accept_run("r1", "x" * 100_000, session["id"], "t", 64)
        assert not store.available
        assert store.get_run("r1") is None
        with pytest.raises(StorageUnavailable):
            store.probe()
        # A small write that fits does not announce a recovery; the probe does.
        store.set_setting("k", "v")
        assert not store.available
        store.db.execute_sql(f"PRAGMA max_page_count = {pages * 100}")
        store.probe()
        assert store.available
        store.accept_run("r1", "x" * 100_000, session["id"], "t", 64)
        assert store.get_run("r1")["status"] == "queued"
    finally:
        store.close()
    events = [r.getMessage().split()[0] for r in caplog.records if "storage_" in r.getMessage()]
    assert events == ["event=storage_unavailable", "event=storage_recovered"]


def test_a_run_whose_prompt_cannot_be_stored_does_not_start(tmp_path):
    """The start and the prompt's message are one transaction: refused,
    the run stays queued with no message; accepted later, it starts whole."""
    store = WorkspaceStore(tmp_path / "workspace.db", "w")
    try:
        session = store.create_session("s")
        # Three kilobytes each: the run's row changes in place, while a
        # second message of that size needs a page the file may not grow by.
        store.create_message(session["id"], None, "user", [{"type": "text", "text": "y" * 3000}])
        store.accept_run("r1", "x" * 3000, session["id"], "t", 64)
        store.db.execute_sql("VACUUM")  # no free pages left to take
        (pages,) = store.db.execute_sql("PRAGMA page_count").fetchone()
        store.db.execute_sql(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StorageUnavailable, match="database or disk is full"):
            store.start_run("r1")
        assert store.get_run("r1")["status"] == "queued"
        assert store.run_messages("r1") == []
        store.db.execute_sql(f"PRAGMA max_page_count = {pages * 100}")
        store.probe()
        start = store.start_run("r1")
        assert start.run["status"] == "running"
        assert [m["role"] for m in store.run_messages("r1")] == ["user", "assistant"]
        assert start.user_message["parts"] == [{"type": "text", "text": "x" * 3000}]
    finally:
        store.close()
