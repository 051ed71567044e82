"""Persistence: the registry database and one database per workspace.

Each database is one SQLite file with one connection, shared by every
thread and serialized by the store's lock.  That trades concurrent readers
(which SQLite barely gives a single process anyway, since writes are
serialized) for three properties the shutdown order relies on: no
"database is locked" between our own threads, a ``close()`` that closes the
only connection there is, and a ``closed`` flag checked under the same lock
as every query, so nothing touches the database after it is closed.

All public methods are thread-safe and block only on the lock (bounded, see
:func:`lock_budget`); they return plain dicts in the API's JSON shape.

Storage faults.  A write the database refuses — the disk is full, another
process holds the write lock past :data:`BUSY_TIMEOUT`, an I/O error — is
rolled back and raised as :class:`~crushd.errors.StorageUnavailable`, and the
store is marked unavailable.  That flag is read from memory (``available``),
so the health check and the prompt route know at once; the two transitions
are logged once each.  A workspace store becomes available again only when
:meth:`WorkspaceStore.probe` gets 64 KiB through (a small write that happens
to fit must not announce a recovery that the next one denies); the registry,
which nothing probes, with any write that succeeds.  Retrying is the
caller's business (:mod:`crushd.runs`, :mod:`crushd.workspace`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peewee as pw

from crushd.common import ACTIVE_STATUSES, TERMINAL_STATUSES, new_id, utcnow
from crushd.errors import (
    NotFound,
    QueueFull,
    SessionBusy,
    StorageUnavailable,
    StoreBusy,
    StoreClosed,
)
from crushd.models import (
    REGISTRY_MIGRATIONS,
    WORKSPACE_MIGRATIONS,
    apply_migrations,
    registry_models,
    workspace_models,
)

logger = logging.getLogger(__name__)

DEFAULT_LOCK_WAIT = 30.0
# How long a write waits for another process's write lock before the store
# counts as unavailable.  crushd's own threads share one connection and never
# wait on each other here; only an outside writer (a backup, the sqlite3
# shell) does, and a prompt should hear 503 about it within a second.
BUSY_TIMEOUT = 1.0
# SQLite primary result codes that mean "the database refuses writes now and
# may accept them later": BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL.
_FAULT_CODES = {5, 6, 8, 10, 13, 14, 15}

PROBE_SETTING = "storage_probe"

_budget = threading.local()


@contextlib.contextmanager
def lock_budget(seconds: float) -> Iterator[None]:
    """Bound how long store calls on this thread wait for the database lock.

    Cleanup after a cancel runs under its own detached deadline; this makes
    its writes give up (``StoreBusy``) instead of hanging past it.
    """
    previous = getattr(_budget, "seconds", None)
    _budget.seconds = seconds
    try:
        yield
    finally:
        _budget.seconds = previous


def _cost(value: float | None) -> float | None:
    """A stored cost as the API shows it: rounded past float noise."""
    return None if value is None else round(value, 10)


def storage_fault(exc: BaseException) -> str | None:
    """The SQLite message if ``exc`` is a storage fault (see the module
    docstring), else None.  peewee re-raises sqlite3's error with the
    original as ``__context__``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlite3.Error):
            code = getattr(seen, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in _FAULT_CODES:
                return str(seen)
            return None
        seen = seen.__cause__ or seen.__context__
    return None


def open_sqlite(path: Path) -> pw.SqliteDatabase:
    db = pw.SqliteDatabase(
        str(path),
        thread_safe=False,  # one shared connection, serialized by the store lock
        check_same_thread=False,
        autoconnect=False,
        timeout=BUSY_TIMEOUT,
        pragmas={
            "journal_mode": "wal",
            "foreign_keys": 1,
            "synchronous": "normal",
            "busy_timeout": int(BUSY_TIMEOUT * 1000),
        },
    )
    db.connect()
    return db


class _Store:
    # Whether any accepted write marks the store available again (else
    # only a probe does, see the module docstring).
    recover_on_write = True

    def __init__(self, path: Path, migrations: list) -> None:
        self.path = path
        # Serializes every use of the one connection and guards the closed
        # flag; last in the lock order (nothing is taken while holding it).
        self._lock = threading.RLock()
        self._closed = False  # guarded by _lock
        # Whether the last write was accepted.  Written under _lock, read
        # without it: the health check must never wait on a database call.
        self.available = True
        self.fault: str | None = None  # the refusal while unavailable; under _lock
        self._fault_since = 0.0  # guarded by _lock
        self._recovered = threading.Event()  # set while available
        self._recovered.set()
        # Called when ``available`` changes, with the store lock held: it
        # must only set a flag or an event.
        self.on_change: Callable[[], None] = lambda: None
        self.db = open_sqlite(path)
        try:
            with self._use():
                self.previous_version = apply_migrations(self.db, migrations)
        except BaseException:
            self.db.close()
            raise

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_available(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until a write succeeds; True if it did."""
        return self._recovered.wait(timeout)

    @contextlib.contextmanager
    def _use(
        self, write: bool = False, busy_timeout: float | None = None, probe: bool = False
    ) -> Iterator[None]:
        """Hold the connection; with ``write``, inside one ``BEGIN IMMEDIATE``
        transaction.  A storage fault becomes :class:`StorageUnavailable`."""
        timeout = getattr(_budget, "seconds", None)
        if not self._lock.acquire(timeout=DEFAULT_LOCK_WAIT if timeout is None else timeout):
            raise StoreBusy(f"database {self.path.name} is busy")
        try:
            if self._closed:
                raise StoreClosed(f"database {self.path} is closed")
            if not write:
                try:
                    yield
                except pw.DatabaseError as exc:
                    if (fault := storage_fault(exc)) is None:
                        raise
                    raise StorageUnavailable(f"the database cannot be read: {fault}") from exc
                return
            try:
                with self._busy_timeout(busy_timeout):
                    self._transaction_begin()
                    yield
                    self.db.execute_sql("COMMIT")
            except BaseException as exc:
                self._rollback()
                fault = storage_fault(exc)
                if fault is None:
                    raise
                self._mark_unavailable(fault)
                raise StorageUnavailable(f"the database refuses writes: {fault}") from exc
            if probe or self.recover_on_write:
                self._mark_available()
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _busy_timeout(self, seconds: float | None) -> Iterator[None]:
        if seconds is None:
            yield
            return
        self.db.execute_sql(f"PRAGMA busy_timeout = {int(seconds * 1000)}")
        try:
            yield
        finally:
            self.db.execute_sql(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")

    def _transaction_begin(self) -> None:
        # IMMEDIATE takes the write lock first, so a transaction that reads
        # before it writes cannot fail halfway on an outside writer's commit.
        # Not peewee's atomic(): after SQLITE_FULL SQLite has already rolled
        # back, and atomic()'s own rollback then fails with "cannot rollback",
        # hiding the real error.
        self.db.execute_sql("BEGIN IMMEDIATE")

    def _rollback(self) -> None:
        connection = self.db.connection()
        if connection.in_transaction:
            # The original error is what matters; a failing rollback adds nothing.
            with contextlib.suppress(sqlite3.Error):
                connection.rollback()

    def _mark_unavailable(self, fault: str) -> None:
        """Holds _lock."""
        self.fault = fault
        if not self.available:
            return
        self.available = False
        self._recovered.clear()
        self._fault_since = time.monotonic()
        logger.error("event=storage_unavailable db=%s error=%r", self.path, fault)
        self.on_change()

    def _mark_available(self) -> None:
        """Holds _lock."""
        if self.available:
            return
        self.available = True
        self.fault = None
        self._recovered.set()
        logger.warning(
            "event=storage_recovered db=%s seconds=%.3f",
            self.path,
            time.monotonic() - self._fault_since,
        )
        self.on_change()

    def close(self) -> None:
        """Close the connection; idempotent.  Later calls raise StoreClosed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(pw.OperationalError):
                self.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.close()


class RegistryStore(_Store):
    """The list of registered workspaces (``registry.db``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, REGISTRY_MIGRATIONS)
        self.m = registry_models(self.db)

    @staticmethod
    def _dict(row: Any) -> dict[str, Any]:
        return {
            "id": row.id,
            "path": row.path,
            "yolo": bool(row.yolo),
            "created_at": row.created_at,
            "registered": bool(row.registered),
        }

    def registered(self) -> list[dict[str, Any]]:
        W = self.m.Workspace
        with self._use():
            return [self._dict(r) for r in W.select().where(W.registered == True).order_by(W.pk)]  # noqa: E712

    def get(self, workspace_id: str) -> dict[str, Any] | None:
        W = self.m.Workspace
        with self._use():
            row = W.get_or_none(W.id == workspace_id)
            return self._dict(row) if row else None

    def register(self, path: str, yolo: bool | None) -> tuple[dict[str, Any], str]:
        """Register ``path``; return the record and one of ``created``,
        ``restored`` (known but unregistered: same id) or ``existing``."""
        W = self.m.Workspace
        with self._use(write=True):
            row = W.get_or_none(W.path == path)
            if row is None:
                row = W.create(
                    id=new_id(), path=path, yolo=bool(yolo), registered=True, created_at=utcnow()
                )
                return self._dict(row), "created"
            if row.registered:
                return self._dict(row), "existing"
            row.registered = True
            if yolo is not None:
                row.yolo = yolo
            row.save()
            return self._dict(row), "restored"

    def unregister(self, workspace_id: str, purge: bool) -> None:
        W = self.m.Workspace
        with self._use(write=True):
            if purge:
                W.delete().where(W.id == workspace_id).execute()
            else:
                W.update(registered=False).where(W.id == workspace_id).execute()


class WorkspaceStore(_Store):
    """Sessions, messages and runs of one workspace."""

    recover_on_write = False  # the workspace's storage keeper probes it

    def __init__(self, path: Path, workspace_id: str) -> None:
        super().__init__(path, WORKSPACE_MIGRATIONS)
        self.workspace_id = workspace_id
        self.m = workspace_models(self.db)

    # -- settings ----------------------------------------------------------

    def get_setting(self, key: str, default: str | None = None) -> str | None:
        S = self.m.Setting
        with self._use():
            row = S.get_or_none(S.key == key)
            return row.value if row else default

    def set_setting(self, key: str, value: str) -> None:
        S = self.m.Setting
        with self._use(write=True):
            S.replace(key=key, value=value).execute()

    def probe(self, busy_timeout: float = 0.1) -> None:
        """Write and then delete 64 KiB; raises StorageUnavailable while the
        database refuses writes, marks the store available when it accepts
        them.  Two transactions, so the first really reaches the disk."""
        S = self.m.Setting
        with self._use(write=True, busy_timeout=busy_timeout):
            S.replace(key=PROBE_SETTING, value=pw.fn.hex(pw.fn.randomblob(32768))).execute()
        with self._use(write=True, busy_timeout=busy_timeout, probe=True):
            S.delete().where(S.key == PROBE_SETTING).execute()

    # -- sessions ----------------------------------------------------------

    def _session_dict(self, row: Any) -> dict[str, Any]:
        M, R = self.m.Message, self.m.Run
        message_count = M.select().where(M.session_id == row.id).count()
        counts = dict(
            R.select(R.status, pw.fn.COUNT(R.pk))
            .where((R.session_id == row.id) & (R.status.in_(ACTIVE_STATUSES)))
            .group_by(R.status)
            .tuples()
        )
        queued = counts.get("queued", 0)
        return {
            "id": row.id,
            "title": row.title,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "message_count": message_count,
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "cache_read_tokens": row.cache_read_tokens,
            "cache_write_tokens": row.cache_write_tokens,
            "cost_usd": _cost(row.cost_usd),
            "is_busy": bool(queued or counts.get("running", 0)),
            "queued_runs": queued,
        }

    def create_session(self, title: str) -> dict[str, Any]:
        now = utcnow()
        with self._use(write=True):
            row = self.m.Session.create(id=new_id(), title=title, created_at=now, updated_at=now)
            return self._session_dict(row)

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        S = self.m.Session
        with self._use():
            row = S.get_or_none(S.id == session_id)
            return self._session_dict(row) if row else None

    def list_sessions(self) -> list[dict[str, Any]]:
        S = self.m.Session
        with self._use():
            return [
                self._session_dict(r) for r in S.select().order_by(S.created_at.desc(), S.pk.desc())
            ]

    def update_session(self, session_id: str, title: str) -> dict[str, Any] | None:
        S = self.m.Session
        with self._use(write=True):
            S.update(title=title, updated_at=utcnow()).where(S.id == session_id).execute()
            row = S.get_or_none(S.id == session_id)
            return self._session_dict(row) if row else None

    def delete_session(self, session_id: str) -> bool:
        """Delete a session that has no queued or running run.

        Returns False if it does not exist; raises ``SessionBusy`` if busy.
        The check and the delete share one transaction.
        """
        S, R = self.m.Session, self.m.Run
        with self._use(write=True):
            if S.get_or_none(S.id == session_id) is None:
                return False
            busy = (
                R.select()
                .where((R.session_id == session_id) & R.status.in_(ACTIVE_STATUSES))
                .exists()
            )
            if busy:
                raise SessionBusy("session has an active or queued run; cancel it first")
            S.delete().where(S.id == session_id).execute()
            return True

    # -- messages ----------------------------------------------------------

    @staticmethod
    def _message_dict(row: Any) -> dict[str, Any]:
        return {
            "id": row.id,
            "session_id": row.session_id,
            "run_id": row.run_id,
            "role": row.role,
            "parts": json.loads(row.parts),
            "model": row.model,
            "provider": row.provider,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
        }

    def create_message(
        self,
        session_id: str,
        run_id: str | None,
        role: str,
        parts: list[dict[str, Any]],
        model: str | None = None,
        provider: str | None = None,
    ) -> dict[str, Any]:
        now = utcnow()
        with self._use(write=True):
            row = self.m.Message.create(
                id=new_id(),
                session_id=session_id,
                run_id=run_id,
                role=role,
                parts=json.dumps(parts),
                model=model,
                provider=provider,
                created_at=now,
                updated_at=now,
            )
            self.m.Session.update(updated_at=now).where(self.m.Session.id == session_id).execute()
            return self._message_dict(row)

    def update_message(self, message_id: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
        M = self.m.Message
        now = utcnow()
        with self._use(write=True):
            M.update(parts=json.dumps(parts), updated_at=now).where(M.id == message_id).execute()
            return self._message_dict(M.get(M.id == message_id))

    def list_messages(self, session_id: str) -> list[dict[str, Any]]:
        M = self.m.Message
        with self._use():
            query = M.select().where(M.session_id == session_id).order_by(M.pk)
            return [self._message_dict(r) for r in query]

    def context(
        self, session_id: str, before: str | None = None
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """What a model request of the session is built from, SPEC §4 "Context":
        ``(summary, messages)``.

        ``summary`` is the message of the completed compaction in force (or
        None); ``messages`` are the ones after the cut, oldest first, the
        summary itself left out.  With ``before`` (a message id) only those
        stored before that message.  Nothing is ever deleted: the messages
        route still lists them all.
        """
        S, M = self.m.Session, self.m.Message
        with self._use():
            session = S.get_or_none(S.id == session_id)
            if session is None:
                return None, []
            query = M.select().where(M.session_id == session_id)
            summary = None
            if session.summary_id is not None:
                summary = M.get_or_none(M.id == session.summary_id)
            if summary is not None:
                query = query.where(
                    (M.pk >= (session.summary_keep_pk or summary.pk)) & (M.id != summary.id)
                )
            if before is not None:
                limit = M.get_or_none(M.id == before)
                if limit is not None:
                    query = query.where(M.pk < limit.pk)
            rows = [self._message_dict(r) for r in query.order_by(M.pk)]
            return (self._message_dict(summary) if summary else None), rows

    def set_summary(self, session_id: str, message_id: str, keep_from: str | None) -> None:
        """Put a completed compaction in force: from now on requests carry
        ``message_id``'s summary and the messages from ``keep_from`` on (or
        those after the summary), and the threshold waits for the next request."""
        S, M = self.m.Session, self.m.Message
        with self._use(write=True):
            anchor = M.get(M.id == (keep_from or message_id))
            S.update(summary_id=message_id, summary_keep_pk=anchor.pk, context_tokens=0).where(
                S.id == session_id
            ).execute()

    def context_tokens(self, session_id: str) -> int:
        """The prompt tokens of the session's last model request (0 if none since a compaction)."""
        S = self.m.Session
        with self._use():
            row = S.select(S.context_tokens).where(S.id == session_id).first()
            return row.context_tokens if row else 0

    def set_context_tokens(self, session_id: str, tokens: int) -> None:
        S = self.m.Session
        with self._use(write=True):
            S.update(context_tokens=tokens).where(S.id == session_id).execute()

    def run_messages(self, run_id: str) -> list[dict[str, Any]]:
        M = self.m.Message
        with self._use():
            return [
                self._message_dict(r) for r in M.select().where(M.run_id == run_id).order_by(M.pk)
            ]

    # -- runs --------------------------------------------------------------

    def _run_dict(self, row: Any) -> dict[str, Any]:
        return {
            "id": row.id,
            "workspace_id": self.workspace_id,
            "session_id": row.session_id,
            "kind": row.kind,
            "model": row.model,
            "prompt": row.prompt,
            "status": row.status,
            "error": row.error,
            "message_id": row.message_id,
            "text": row.text,
            "created_at": row.created_at,
            "started_at": row.started_at,
            "finished_at": row.finished_at,
            "usage": {
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
                "cache_read_tokens": row.cache_read_tokens,
                "cache_write_tokens": row.cache_write_tokens,
                "cost_usd": _cost(row.cost_usd),
            },
        }

    def accept_run(
        self,
        run_id: str,
        prompt: str,
        session_id: str | None,
        title: str,
        max_queue: int,
        *,
        model: str | None = None,
        kind: str = "prompt",
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Store a prompt as a ``queued`` run of ``model`` in one transaction.

        Without ``session_id`` a session titled ``title`` is created with it.
        Returns ``(run, new_session_or_None)``.  Raises NotFound for an
        unknown session and QueueFull when it already has ``max_queue``
        queued runs; then nothing was written.
        """
        S, R = self.m.Session, self.m.Run
        now = utcnow()
        with self._use(write=True):
            new_session = None
            if session_id is None:
                new_session = S.create(id=new_id(), title=title, created_at=now, updated_at=now)
                session_id = new_session.id
            else:
                if not S.select().where(S.id == session_id).exists():
                    raise NotFound(f"session {session_id} not found")
                queued = R.select().where((R.session_id == session_id) & (R.status == "queued"))
                if queued.count() >= max_queue:
                    raise QueueFull(f"session {session_id} already has {max_queue} queued runs")
            run = R.create(
                id=run_id,
                session_id=session_id,
                prompt=prompt,
                kind=kind,
                model=model,
                status="queued",
                created_at=now,
            )
            session = self._session_dict(new_session) if new_session is not None else None
            return self._run_dict(run), session

    def last_run_model(self, session_id: str) -> str | None:
        """The model of the session's latest run that names one (queued ones count)."""
        R = self.m.Run
        with self._use():
            row = (
                R.select(R.model)
                .where((R.session_id == session_id) & R.model.is_null(False))
                .order_by(R.pk.desc())
                .first()
            )
            return row.model if row else None

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        R = self.m.Run
        with self._use():
            row = R.get_or_none(R.id == run_id)
            return self._run_dict(row) if row else None

    def list_runs(
        self,
        session_id: str | None = None,
        status: str | None = None,
        limit: int = 100,
        oldest_first: bool = False,
    ) -> list[dict[str, Any]]:
        R = self.m.Run
        query = R.select()
        if session_id:
            query = query.where(R.session_id == session_id)
        if status:
            query = query.where(R.status == status)
        query = query.order_by(R.pk if oldest_first else R.pk.desc()).limit(limit)
        with self._use():
            return [self._run_dict(r) for r in query]

    def count_runs(self, status: str, session_id: str | None = None) -> int:
        R = self.m.Run
        query = R.select().where(R.status == status)
        if session_id:
            query = query.where(R.session_id == session_id)
        with self._use():
            return query.count()

    def start_run(self, run_id: str, default_model: str | None = None) -> dict[str, Any] | None:
        """``queued`` -> ``running``; None if the run is no longer queued.

        A run queued before runs had a model gets ``default_model``.
        """
        R = self.m.Run
        with self._use(write=True):
            updated = (
                R.update(
                    status="running",
                    started_at=utcnow(),
                    model=pw.fn.COALESCE(R.model, default_model),
                )
                .where((R.id == run_id) & (R.status == "queued"))
                .execute()
            )
            return self._run_dict(R.get(R.id == run_id)) if updated else None

    def finish_run(
        self, run_id: str, status: str, *, only_from: str | None = None, **fields: Any
    ) -> dict[str, Any] | None:
        """Move a run to a terminal status unless it already has one (or,
        with ``only_from``, unless its status is something else).

        Returns the terminal run, or None when nothing changed, so exactly
        one caller publishes ``run.completed``.
        """
        R = self.m.Run
        condition = (R.id == run_id) & R.status.not_in(tuple(TERMINAL_STATUSES))
        if only_from is not None:
            condition &= R.status == only_from
        with self._use(write=True):
            updated = (
                R.update(status=status, finished_at=utcnow(), **fields).where(condition).execute()
            )
            if not updated:
                return None
            return self._run_dict(R.get(R.id == run_id))

    def add_usage(
        self,
        run_id: str,
        session_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        cost_usd: float | None = None,
    ) -> None:
        """Add one step's usage to its run and its session, in one transaction.

        ``cost_usd`` None (a model without prices) leaves the costs as they are.
        """
        with self._use(write=True):
            for M, key in ((self.m.Run, run_id), (self.m.Session, session_id)):
                fields: dict[Any, Any] = {
                    M.prompt_tokens: M.prompt_tokens + prompt_tokens,
                    M.completion_tokens: M.completion_tokens + completion_tokens,
                    M.cache_read_tokens: M.cache_read_tokens + cache_read_tokens,
                    M.cache_write_tokens: M.cache_write_tokens + cache_write_tokens,
                }
                if cost_usd is not None:
                    fields[M.cost_usd] = pw.fn.COALESCE(M.cost_usd, 0.0) + cost_usd
                M.update(fields).where(M.id == key).execute()
