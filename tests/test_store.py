"""The stores (crushd.store, crushd.registry, on crushd.sqlite) on real
SQLite files: pragmas, CRUD and ordering, the run state machine, many
databases from many threads, close, and migrations."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import peewee as pw
import pytest

from crushd.errors import NotFound, QueueFull, SessionBusy, StoreClosed
from crushd.models import WORKSPACE_MIGRATIONS, apply_migrations
from crushd.registry import RegistryStore
from crushd.store import Prompt, WorkspaceStore


@pytest.fixture
def store(tmp_path: Path):
    st = WorkspaceStore(tmp_path / "workspace.db", "ws-1")
    yield st
    st.close()


NO_USAGE = {
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "cache_read_tokens": 0,
    "cache_write_tokens": 0,
    "cost_usd": None,
}


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def columns(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


# -- pragmas -------------------------------------------------------------------


def queue_run(store: WorkspaceStore, run_id: str, session_id: str, prompt: str) -> dict:
    """Store a queued run in an existing session, as a submitted prompt is."""
    run, _ = store.accept_run(run_id, prompt, session_id, "unused", 1_000_000)
    return run


def test_workspace_store_uses_wal_and_a_busy_timeout(store):
    assert store.db.execute_sql("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    assert store.db.execute_sql("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert store.db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    # WAL is a property of the file: a second, independent connection sees it.
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"


def test_registry_store_uses_wal_and_a_busy_timeout(tmp_path):
    registry = RegistryStore(tmp_path / "registry.db")
    try:
        assert registry.db.execute_sql("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        assert registry.db.execute_sql("PRAGMA busy_timeout").fetchone()[0] >= 1000
    finally:
        registry.close()


# -- registry ------------------------------------------------------------------


def test_registry_register_unregister_restore_and_purge(tmp_path):
    path = tmp_path / "registry.db"
    registry = RegistryStore(path)
    first, how = registry.register("/srv/a", False)
    assert how == "created"
    again, how = registry.register("/srv/a", None)
    assert (how, again["id"]) == ("existing", first["id"])
    registry.unregister(first["id"], purge=False)
    assert registry.registered() == []
    restored, how = registry.register("/srv/a", True)
    assert (how, restored["id"], restored["yolo"]) == ("restored", first["id"], True)
    registry.unregister(first["id"], purge=True)
    assert registry.get(first["id"]) is None
    fresh, how = registry.register("/srv/a", None)
    assert how == "created" and fresh["id"] != first["id"]
    registry.close()

    reopened = RegistryStore(path)
    try:
        assert [w["id"] for w in reopened.registered()] == [fresh["id"]]
    finally:
        reopened.close()


# -- sessions ------------------------------------------------------------------


def test_sessions_crud_and_newest_first(store):
    created = [store.create_session(f"s{i}") for i in range(5)]
    assert created[0]["title"] == "s0"
    assert created[0]["message_count"] == 0
    assert created[0]["is_busy"] is False and created[0]["queued_runs"] == 0
    assert created[0]["prompt_tokens"] == 0 and created[0]["completion_tokens"] == 0

    assert [s["id"] for s in store.list_sessions()] == [s["id"] for s in reversed(created)]
    assert store.get_session(created[2]["id"])["title"] == "s2"
    assert store.get_session("missing") is None

    updated = store.update_session(created[2]["id"], "renamed")
    assert updated["title"] == "renamed"
    assert updated["updated_at"] >= created[2]["updated_at"]
    assert store.get_session(created[2]["id"])["title"] == "renamed"
    assert store.update_session("missing", "x") is None

    assert store.delete_session(created[2]["id"]) is True
    assert store.get_session(created[2]["id"]) is None
    assert store.delete_session(created[2]["id"]) is False
    assert len(store.list_sessions()) == 4


def test_deleting_a_session_removes_its_messages_and_runs(store):
    session = store.create_session("s")
    store.create_message(session["id"], None, "user", [{"type": "text", "text": "hi"}])
    queue_run(store, "r1", session["id"], "hi")
    store.finish_run("r1", "completed")
    assert store.delete_session(session["id"])
    assert store.list_messages(session["id"]) == []
    assert store.get_run("r1") is None


def test_busy_session_cannot_be_deleted(store):
    session = store.create_session("s")
    queue_run(store, "r1", session["id"], "hi")
    assert store.get_session(session["id"])["is_busy"] is True
    with pytest.raises(SessionBusy):
        store.delete_session(session["id"])
    assert store.get_session(session["id"]) is not None


# -- messages ------------------------------------------------------------------

PARTS = [
    {"type": "text", "text": "héllo ✓\nline two"},
    {"type": "reasoning", "text": "thinking"},
    {"type": "tool_call", "id": "c1", "name": "bash", "input": '{"cmd": "ls"}', "finished": True},
    {"type": "tool_result", "tool_call_id": "c1", "name": "bash", "content": "a\nb",
     "is_error": False},
    {"type": "finish", "reason": "end_turn", "message": None, "details": None,
     "time": "2024-01-01T00:00:00.000000Z"},
]  # fmt: skip


def test_messages_oldest_first_with_typed_parts_round_tripping(store):
    session = store.create_session("s")
    other = store.create_session("other")
    user = store.create_message(session["id"], "r1", "user", [PARTS[0]])
    store.create_message(other["id"], None, "user", [{"type": "text", "text": "elsewhere"}])
    assistant = store.create_message(
        session["id"], "r1", "assistant", PARTS, model="m", provider="echo"
    )
    tool = store.create_message(session["id"], "r1", "tool", [PARTS[3]])

    listed = store.list_messages(session["id"])
    assert [m["id"] for m in listed] == [user["id"], assistant["id"], tool["id"]]
    assert [m["role"] for m in listed] == ["user", "assistant", "tool"]
    assert listed[1]["parts"] == PARTS
    assert listed[1]["model"] == "m" and listed[1]["provider"] == "echo"
    assert listed[1]["run_id"] == "r1" and listed[1]["session_id"] == session["id"]
    assert store.get_session(session["id"])["message_count"] == 3

    changed = [*PARTS[:1], {"type": "text", "text": " more"}]
    updated = store.update_message(assistant, changed)
    assert updated["parts"] == changed
    assert store.list_messages(session["id"])[1] == updated
    assert [m["id"] for m in store.run_messages("r1")] == [user["id"], assistant["id"], tool["id"]]
    store.delete_session(session["id"])
    with pytest.raises(NotFound):
        store.update_message(assistant, PARTS)


# -- runs ----------------------------------------------------------------------


def test_runs_create_list_and_filter(store):
    a = store.create_session("a")
    b = store.create_session("b")
    run = queue_run(store, "r1", a["id"], "first")
    assert run["status"] == "queued"
    assert run["workspace_id"] == "ws-1"
    assert run["started_at"] is None and run["finished_at"] is None
    assert run["usage"] == NO_USAGE
    queue_run(store, "r2", b["id"], "second")
    queue_run(store, "r3", a["id"], "third")
    store.start_run("r3")

    assert [r["id"] for r in store.list_runs()] == ["r3", "r2", "r1"]
    assert [r["id"] for r in store.list_runs(oldest_first=True)] == ["r1", "r2", "r3"]
    assert [r["id"] for r in store.list_runs(session_id=a["id"])] == ["r3", "r1"]
    assert [r["id"] for r in store.list_runs(status="queued")] == ["r2", "r1"]
    assert [r["id"] for r in store.list_runs(session_id=a["id"], status="running")] == ["r3"]
    assert [r["id"] for r in store.list_runs(limit=1)] == ["r3"]
    assert store.count_runs("queued") == 2
    assert store.count_runs("queued", session_id=b["id"]) == 1
    assert store.get_run("r2")["prompt"] == "second"
    assert store.get_run("missing") is None

    # An id that exists already is answered with its run; nothing is written.
    assert queue_run(store, "r1", b["id"], "duplicate id")["prompt"] == "first"
    assert store.get_run("r1")["session_id"] == a["id"]
    assert store.count_runs("queued") == 2


def test_accept_runs_stores_a_batch_in_one_transaction_with_errors_apart(store):
    session = store.create_session("s")
    prompts = [
        Prompt("b1", "one", None, "one"),
        Prompt("b2", "two", session["id"], "unused"),
        Prompt("b3", "three", "no-such-session", "unused"),
        Prompt("b4", "four", session["id"], "unused"),  # over max_queue=1
        Prompt("b2", "two again", session["id"], "unused"),  # the same id, same batch
    ]
    first, second, unknown, full, again = store.accept_runs(prompts, max_queue=1)
    assert first[0]["status"] == "queued" and first[2] is True
    assert first[1]["id"] == first[0]["session_id"] and first[1]["queued_runs"] == 1
    assert second[0]["session_id"] == session["id"] and second[1:] == (None, True)
    assert isinstance(unknown, NotFound) and isinstance(full, QueueFull)
    assert again[0]["prompt"] == "two" and again[2] is False
    assert [r["id"] for r in store.list_runs(oldest_first=True)] == ["b1", "b2"]


def test_accept_run_is_all_or_nothing(store):
    run, session = store.accept_run("r1", "first line\nmore", None, "first line", 2)
    assert session["id"] == run["session_id"] and session["title"] == "first line"
    assert session["is_busy"] and session["queued_runs"] == 1
    sid = run["session_id"]
    again, none = store.accept_run("r2", "two", sid, "unused", 2)
    assert none is None and again["status"] == "queued"
    with pytest.raises(QueueFull):
        store.accept_run("r3", "three", sid, "unused", 2)
    with pytest.raises(NotFound):
        store.accept_run("r4", "four", "no-such-session", "unused", 2)
    assert store.get_run("r3") is None and store.get_run("r4") is None
    assert [s["id"] for s in store.list_sessions()] == [sid]
    assert [r["id"] for r in store.list_runs(oldest_first=True)] == ["r1", "r2"]


def test_start_run_only_from_queued(store):
    session = store.create_session("s")
    queue_run(store, "r1", session["id"], "p")
    started = store.start_run("r1").run
    assert started["status"] == "running" and started["started_at"] is not None
    assert store.start_run("r1") is None
    assert store.get_run("r1")["started_at"] == started["started_at"]

    queue_run(store, "r2", session["id"], "p")
    store.finish_run("r2", "cancelled")
    assert store.start_run("r2") is None
    assert store.get_run("r2")["status"] == "cancelled"
    assert store.start_run("missing") is None


def test_what_a_write_returns_is_what_a_read_gives_back(store):
    # Writes build their answers from what they stored instead of reading
    # it back; the two must not drift apart.
    session = store.create_session("s")
    assert store.get_session(session["id"]) == session
    run, new = store.accept_run("r1", "p", None, "title", 5, model="m")
    assert store.get_run("r1") == run and store.get_session(new["id"]) == new
    assert new["queued_runs"] == 1 and new["is_busy"]
    message = store.create_message(session["id"], None, "user", PARTS, "m", "echo")
    assert store.list_messages(session["id"]) == [message]
    start = store.start_run("r1")
    assert store.get_run("r1") == start.run
    assert store.run_messages("r1") == [start.user_message, start.message]


def test_start_run_writes_the_first_records_with_it(store):
    session = store.create_session("s")
    earlier = store.create_message(session["id"], None, "user", [{"type": "text", "text": "0"}])
    queue_run(store, "r1", session["id"], "the prompt")

    # Queued without a model (as by an older version): its workspace gives
    # it the default when it loads it, and the start stores it.
    start = store.start_run("r1", model="dflt", message_ids=("id-of-dflt", "prov"))

    assert start.run["status"] == "running"
    user, assistant = store.run_messages("r1")
    assert start.user_message == user
    assert user["role"] == "user" and user["parts"] == [{"type": "text", "text": "the prompt"}]
    assert start.message == assistant
    assert assistant["role"] == "assistant" and assistant["parts"] == []
    assert start.run["model"] == "dflt"  # queued without one
    assert (assistant["model"], assistant["provider"]) == ("id-of-dflt", "prov")
    assert store.context(session["id"]) == (None, [earlier, user, assistant])
    # What the first request needs is read in the same transaction.
    assert start.context == store.context(session["id"])
    assert start.context_tokens == 0
    store.add_usage("r1", session["id"], 1234, 5, context_tokens=1234)
    store.finish_run("r1", "completed")
    queue_run(store, "r2", session["id"], "next")
    again = store.start_run("r2")
    assert again.context_tokens == 1234
    assert again.context == (None, [earlier, user, assistant, *store.run_messages("r2")])


def test_start_run_of_a_compaction_writes_no_user_message(store):
    session = store.create_session("s")
    store.accept_run("c1", "", session["id"], "unused", 10, model="big", kind="compact")

    start = store.start_run("c1")

    assert start.user_message is None
    assert [m["role"] for m in store.run_messages("c1")] == ["assistant"]
    assert start.message["model"] == "big"


def test_finish_run_is_idempotent(store):
    session = store.create_session("s")
    queue_run(store, "r1", session["id"], "p")
    store.start_run("r1")
    first = store.finish_run("r1", "completed", text="done")
    assert first["status"] == "completed" and first["finished_at"] is not None
    assert first["text"] == "done"

    assert store.finish_run("r1", "failed", error="late") is None
    assert store.finish_run("r1", "completed") is None
    after = store.get_run("r1")
    assert after["status"] == "completed"
    assert after["error"] is None and after["finished_at"] == first["finished_at"]


def test_finish_run_only_from_respects_the_current_status(store):
    session = store.create_session("s")
    queue_run(store, "r1", session["id"], "p")
    assert store.finish_run("r1", "cancelled", only_from="running") is None
    assert store.get_run("r1")["status"] == "queued"
    assert store.finish_run("r1", "cancelled", only_from="queued")["status"] == "cancelled"


def test_usage_accumulates_on_run_and_session(store):
    session = store.create_session("s")
    queue_run(store, "r1", session["id"], "p")
    store.add_usage("r1", session["id"], 10, 3)
    assert store.get_run("r1")["usage"] == {**NO_USAGE, "prompt_tokens": 10, "completion_tokens": 3}
    store.add_usage("r1", session["id"], 5, 2, 4, 1, 0.25)
    store.add_usage("r1", session["id"], 1, 1, 0, 0, 0.5)
    queue_run(store, "r2", session["id"], "p")
    store.add_usage("r2", session["id"], 1, 1, 1, 0, 0.125)
    assert store.get_run("r1")["usage"] == {
        "prompt_tokens": 16,
        "completion_tokens": 6,
        "cache_read_tokens": 4,
        "cache_write_tokens": 1,
        "cost_usd": 0.75,
    }
    got = store.get_session(session["id"])
    assert (got["prompt_tokens"], got["completion_tokens"]) == (17, 7)
    assert (got["cache_read_tokens"], got["cache_write_tokens"]) == (5, 1)
    assert got["cost_usd"] == 0.875


# -- many databases, many threads ------------------------------------------------


def test_many_workspace_databases_from_many_threads_keep_rows_apart(tmp_path):
    stores = [WorkspaceStore(tmp_path / f"ws{i}.db", f"ws-{i}") for i in range(3)]
    sessions = [st.create_session(f"home of ws-{i}") for i, st in enumerate(stores)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(thread_no: int) -> None:
        try:
            start.wait()
            for n in range(50):
                index = (thread_no + n) % 3
                st = stores[index]
                sid = sessions[index]["id"]
                tag = f"ws-{index}/t{thread_no}/{n}"
                st.create_message(sid, None, "user", [{"type": "text", "text": tag}])
                queue_run(st, tag, sid, tag)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors

    total = 0
    for index, st in enumerate(stores):
        texts = [m["parts"][0]["text"] for m in st.list_messages(sessions[index]["id"])]
        runs = st.list_runs(limit=10_000)
        assert texts and all(t.startswith(f"ws-{index}/") for t in texts), index
        assert all(r["id"].startswith(f"ws-{index}/") for r in runs), index
        assert sorted(texts) == sorted(r["id"] for r in runs)
        total += len(texts)
        st.close()
    assert total == 8 * 50

    # What the files hold, read independently of crushd's models.
    for index in range(3):
        with sqlite3.connect(tmp_path / f"ws{index}.db") as conn:
            prompts = [row[0] for row in conn.execute("SELECT prompt FROM run")]
        assert prompts and all(p.startswith(f"ws-{index}/") for p in prompts)


# -- close ---------------------------------------------------------------------


def test_every_call_after_close_raises_store_closed(tmp_path):
    st = WorkspaceStore(tmp_path / "workspace.db", "ws-1")
    session = st.create_session("s")
    queue_run(st, "r1", session["id"], "p")
    st.close()
    st.close()  # idempotent
    assert st.closed
    calls = [
        lambda: st.create_session("x"),
        lambda: st.list_sessions(),
        lambda: st.get_session(session["id"]),
        lambda: st.update_session(session["id"], "t"),
        lambda: st.delete_session(session["id"]),
        lambda: st.create_message(session["id"], None, "user", []),
        lambda: st.list_messages(session["id"]),
        lambda: queue_run(st, "r2", session["id"], "p"),
        lambda: st.get_run("r1"),
        lambda: st.list_runs(),
        lambda: st.count_runs("queued"),
        lambda: st.start_run("r1"),
        lambda: st.finish_run("r1", "cancelled"),
        lambda: st.finish_run("r1", "failed", error="x"),
        lambda: st.add_usage("r1", session["id"], 1, 1),
        lambda: st.get_setting("k"),
        lambda: st.set_setting("k", "v"),
    ]
    for call in calls:
        with pytest.raises(StoreClosed):
            call()

    registry = RegistryStore(tmp_path / "registry.db")
    registry.close()
    with pytest.raises(StoreClosed):
        registry.registered()
    with pytest.raises(StoreClosed):
        registry.register("/srv/a", None)


def test_close_from_another_thread_stops_later_calls(tmp_path):
    st = WorkspaceStore(tmp_path / "workspace.db", "ws-1")
    closer = threading.Thread(target=st.close)
    closer.start()
    closer.join(10)
    with pytest.raises(StoreClosed):
        st.list_sessions()


# -- migrations ----------------------------------------------------------------


def build_version_one(path: Path) -> None:
    """A workspace database as the first released crushd left it."""
    db = pw.SqliteDatabase(str(path))
    db.connect()
    try:
        apply_migrations(db, WORKSPACE_MIGRATIONS[:1])
        db.execute_sql(
            "INSERT INTO session (id, title, created_at, updated_at) VALUES (?, ?, ?, ?)",
            ("s1", "old session", "2024-01-01T00:00:00.000000Z", "2024-01-01T00:00:01.000000Z"),
        )
        db.execute_sql(
            "INSERT INTO message (id, session_id, run_id, role, parts, model, provider, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("m1", "s1", "r1", "user", '[{"type": "text", "text": "old prompt"}]', None, None,
             "2024-01-01T00:00:00.000000Z", "2024-01-01T00:00:00.000000Z"),
        )  # fmt: skip
        db.execute_sql(
            "INSERT INTO run (id, session_id, prompt, status, text, created_at, started_at, "
            "finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ("r1", "s1", "old prompt", "completed", "old answer", "2024-01-01T00:00:00.000000Z",
             "2024-01-01T00:00:00.100000Z", "2024-01-01T00:00:00.200000Z"),
        )  # fmt: skip
    finally:
        db.close()


def test_older_schema_is_migrated_and_keeps_its_data(tmp_path):
    path = tmp_path / "workspace.db"
    build_version_one(path)
    assert user_version(path) == 1
    assert "prompt_tokens" not in columns(path, "run")

    st = WorkspaceStore(path, "ws-old")
    try:
        assert st.previous_version == 1
        session = st.get_session("s1")
        assert session["title"] == "old session"
        assert session["message_count"] == 1
        assert (session["prompt_tokens"], session["completion_tokens"]) == (0, 0)
        [message] = st.list_messages("s1")
        assert message["id"] == "m1"
        assert message["parts"] == [{"type": "text", "text": "old prompt"}]
        run = st.get_run("r1")
        assert run["status"] == "completed" and run["text"] == "old answer"
        assert (run["kind"], run["model"]) == ("prompt", None)
        assert run["usage"] == NO_USAGE
        # The migrated database takes new writes.
        st.add_usage("r1", "s1", 4, 2)
        assert st.get_run("r1")["usage"] == {**NO_USAGE, "prompt_tokens": 4, "completion_tokens": 2}
        st.create_message("s1", None, "user", [{"type": "text", "text": "new"}])
        assert len(st.list_messages("s1")) == 2
    finally:
        st.close()

    assert user_version(path) == len(WORKSPACE_MIGRATIONS)
    for table in ("run", "session"):
        assert set(NO_USAGE) <= columns(path, table)
    # Opening again is a no-op migration.
    again = WorkspaceStore(path, "ws-old")
    try:
        assert again.previous_version == len(WORKSPACE_MIGRATIONS)
        assert again.get_run("r1")["usage"]["prompt_tokens"] == 4
        # Foreign keys still hold after the table rebuilds: deleting cascades.
        assert again.delete_session("s1")
        assert again.list_messages("s1") == [] and again.get_run("r1") is None
    finally:
        again.close()


def test_newer_schema_refuses_to_open_with_a_clear_error(tmp_path):
    path = tmp_path / "workspace.db"
    st = WorkspaceStore(path, "ws-new")
    st.create_session("keep me")
    st.close()
    newer = len(WORKSPACE_MIGRATIONS) + 1
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")

    with pytest.raises(Exception, match=r"newer") as caught:
        WorkspaceStore(path, "ws-new")
    message = str(caught.value)
    assert str(path) in message
    assert str(newer) in message and str(len(WORKSPACE_MIGRATIONS)) in message
    # Refusing did not touch the data or the version.
    assert user_version(path) == newer
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT title FROM session").fetchall() == [("keep me",)]
