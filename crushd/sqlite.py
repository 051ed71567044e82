"""SQLite: opening a database, and the one connection a store shares.

Everything here knows it is talking to SQLite — the pragmas, the busy
timeout, ``BEGIN IMMEDIATE``, which of sqlite3's result codes are storage
faults — and nothing here knows a table.  The stores built on it,
:class:`crushd.registry.RegistryStore` and
:class:`crushd.store.WorkspaceStore`, hold the queries.  That is the seam a
second backend plugs into: a counterpart of this module (its own opening,
transaction and fault classification behind the same :class:`SqliteStore`
contract: ``_use``, ``available``, ``wait_available``, ``on_change``,
``close``) and, for the workspace store, its own SQL.

One connection per database, shared by every thread and serialized by the
store's connection lock.  That trades concurrent readers (which SQLite
barely gives a single process anyway, since writes are serialized) for
three properties the shutdown order relies on: no "database is locked"
between our own threads, a ``close()`` that closes the only connection
there is, and a ``closed`` flag checked under the same lock as every query,
so nothing touches the database after it is closed.  Waiting for that lock
is bounded (:data:`DEFAULT_LOCK_WAIT`, or :func:`lock_budget`).

Storage faults.  A write the database refuses — the disk is full, another
process holds the write lock past :data:`BUSY_TIMEOUT`, an I/O error — is
rolled back and raised as :class:`~crushd.errors.StorageUnavailable`, and the
store is marked unavailable.  That flag is read from memory (``available``),
so the health check and the prompt route know at once; the two transitions
are logged once each.  A store with ``recover_on_write`` (the registry,
which nothing probes) becomes available again with any write that succeeds;
the workspace store only through a probe (:meth:`WorkspaceStore.probe
<crushd.store.WorkspaceStore.probe>`).  Retrying is the caller's business
(:mod:`crushd.runs`, :mod:`crushd.workspace`).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import peewee as pw

from crushd.errors import StorageUnavailable, StoreBusy, StoreClosed
from crushd.models import Migration, apply_migrations

# Named for the module these lines came from: operators' filters match
# ``logger=crushd.store`` on event=storage_unavailable and storage_recovered.
logger = logging.getLogger("crushd.store")

# How long a store call waits for the connection lock unless a
# :func:`lock_budget` says otherwise.
DEFAULT_LOCK_WAIT = 30.0
# How long a write waits for another process's write lock before the store
# counts as unavailable.  crushd's own threads share one connection and never
# wait on each other here; only an outside writer (a backup, the sqlite3
# shell) does, and a prompt should hear 503 about it within a second.
BUSY_TIMEOUT = 1.0
# SQLite primary result codes that mean "the database refuses writes now and
# may accept them later": BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL.
_FAULT_CODES = {5, 6, 8, 10, 13, 14, 15}

# Per thread: the ``seconds`` of the innermost lock_budget, if any.
_budget = threading.local()


@contextlib.contextmanager
def lock_budget(seconds: float) -> Iterator[None]:
    """Bound how long store calls on this thread wait for the connection lock.

    Cleanup after a cancel runs under its own detached deadline; this makes
    its writes give up (``StoreBusy``) instead of hanging past it.
    """
    previous = getattr(_budget, "seconds", None)
    _budget.seconds = seconds
    try:
        yield
    finally:
        _budget.seconds = previous


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
        thread_safe=False,  # one shared connection, serialized by the connection lock
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


class SqliteStore:
    """One SQLite database on one connection, migrated at open, with its
    availability tracked; subclasses add the queries.

    The public methods are thread-safe.  ``wait_available`` blocks up to its
    timeout; ``close`` blocks on the connection lock.
    """

    # Whether any accepted write marks the store available again (else
    # only a probe does, see the module docstring).
    recover_on_write = True

    def __init__(self, path: Path, migrations: list[Migration]) -> None:
        self.path = path
        # Serializes every use of ``db`` and guards ``_closed``, ``fault``,
        # ``_fault_since`` and the writes of ``available``.  Reentrant: a
        # write transaction reads through the store's own readers
        # (``WorkspaceStore.start_run`` calls ``context``).  Lock order: last
        # of crushd's locks (the list is in :mod:`crushd.workspace`): while
        # holding it a thread takes no other lock of crushd's, nor may what
        # it calls (``on_change``); only the leaf locks inside the events it
        # sets and logging's.
        self._connection_lock = threading.RLock()
        self._closed = False  # guarded by _connection_lock
        # Whether the last write was accepted.  Written under
        # _connection_lock, read without it: the health check must never
        # wait on a database call.
        self.available = True
        # The refusal while unavailable; guarded by _connection_lock.
        self.fault: str | None = None
        self._fault_since = 0.0  # monotonic; guarded by _connection_lock
        self._recovered = threading.Event()  # set while available
        self._recovered.set()
        # Called when ``available`` changes, with the connection lock held:
        # it must only set a flag or an event.
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
        transaction.  A storage fault becomes :class:`StorageUnavailable`.
        With ``probe``, an accepted write marks the store available even
        without ``recover_on_write``."""
        timeout = getattr(_budget, "seconds", None)
        if not self._connection_lock.acquire(
            timeout=DEFAULT_LOCK_WAIT if timeout is None else timeout
        ):
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
            self._connection_lock.release()

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
        """Holds _connection_lock."""
        self.fault = fault
        if not self.available:
            return
        self.available = False
        self._recovered.clear()
        self._fault_since = time.monotonic()
        logger.error("event=storage_unavailable db=%s error=%r", self.path, fault)
        self.on_change()

    def _mark_available(self) -> None:
        """Holds _connection_lock."""
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
        with self._connection_lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(pw.OperationalError):
                self.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.close()
