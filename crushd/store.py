"""The workspace store: the sessions, messages and runs of one workspace.

One SQLite database per workspace (``workspace.db`` in its data
directory), on the one connection :class:`crushd.sqlite.SqliteStore` opens
and serializes; this module holds the records and the SQL that reads and
writes them, :mod:`crushd.sqlite` the connection, the transactions and the
storage faults.  The SQL is SQLite's (``?`` parameters, ``REPLACE INTO``,
``randomblob``): a second backend brings its own.

All public methods are thread-safe and block only on the connection lock
(bounded, see :func:`crushd.sqlite.lock_budget`); they return plain dicts
in the API's JSON shape.  A refused write raises
:class:`~crushd.errors.StorageUnavailable` and marks the store unavailable;
it becomes available again only when :meth:`WorkspaceStore.probe` gets
64 KiB through (a small write that happens to fit must not announce a
recovery that the next one denies).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crushd.checkpoint_records import CheckpointRecords
from crushd.common import ACTIVE_STATUSES, TERMINAL_STATUSES, new_id, utcnow
from crushd.errors import NotFound, QueueFull, RequestError, SessionBusy
from crushd.models import WORKSPACE_MIGRATIONS
from crushd.sqlite import SqliteStore

# The ``meta`` key :meth:`WorkspaceStore.probe` writes and deletes again.
PROBE_SETTING = "storage_probe"


def _cost(value: float | None) -> float | None:
    """A stored cost as the API shows it: rounded past float noise."""
    return None if value is None else round(value, 10)


# The columns every query of a record reads, in the order _*_dict expects.
_SESSION = (
    "id, title, created_at, updated_at, prompt_tokens, completion_tokens, "
    "cache_read_tokens, cache_write_tokens, cost_usd"
)
_MESSAGE = (
    "id, session_id, run_id, role, parts, model, provider, created_at, updated_at, reverted_by"
)
_RUN = (
    "id, session_id, kind, model, prompt, status, error, message_id, text, created_at, "
    "started_at, finished_at, prompt_tokens, completion_tokens, cache_read_tokens, "
    "cache_write_tokens, cost_usd"
)
_SESSION_VALUES = ", ".join("?" * len(_SESSION.split(",")))
_MESSAGE_VALUES = ", ".join("?" * len(_MESSAGE.split(",")))
_RUN_VALUES = ", ".join("?" * len(_RUN.split(",")))
# What finish_run may set besides the status; column names are never
# taken from anywhere else.
_FINISH_FIELDS = frozenset({"error", "text", "message_id"})
_ACTIVE = ", ".join(f"'{status}'" for status in ACTIVE_STATUSES)
_TERMINAL = ", ".join(f"'{status}'" for status in sorted(TERMINAL_STATUSES))


@dataclass(frozen=True)
class Prompt:
    """A prompt to store as a ``queued`` run (:meth:`WorkspaceStore.accept_runs`)."""

    run_id: str
    prompt: str
    session_id: str | None  # None: a new session titled ``title`` comes with it
    title: str
    model: str | None = None
    kind: str = "prompt"


@dataclass(frozen=True)
class RunStart:
    """A run as :meth:`WorkspaceStore.start_run` left it."""

    run: dict[str, Any]  # now ``running``
    user_message: dict[str, Any] | None  # None for a ``compact`` run
    message: dict[str, Any]  # the first assistant message, empty
    # What the first model request is built from, read in the same
    # transaction: :meth:`WorkspaceStore.context` and ``context_tokens``.
    context: tuple[dict[str, Any] | None, list[dict[str, Any]]]
    context_tokens: int


class WorkspaceStore(CheckpointRecords, SqliteStore):
    """Sessions, messages and runs of one workspace (and their checkpoint
    records, :class:`~crushd.checkpoint_records.CheckpointRecords`).

    Plain SQL on the one connection, not peewee's query builder: a run
    makes about a dozen of these calls, and building each query cost about
    eight times what SQLite took to run it (``update_message``: 367 µs
    built, 44 µs as SQL), all of it under the GIL and the connection lock.
    """

    recover_on_write = False  # the workspace's storage keeper probes it

    def __init__(self, path: Path, workspace_id: str) -> None:
        super().__init__(path, WORKSPACE_MIGRATIONS)
        self.workspace_id = workspace_id

    def _one(self, sql: str, *params: Any) -> tuple | None:
        """The first row of ``sql``.  Holds _connection_lock (inside ``_use``)."""
        return self.db.execute_sql(sql, params).fetchone()

    def _all(self, sql: str, *params: Any) -> list[tuple]:
        return self.db.execute_sql(sql, params).fetchall()

    def _changed(self, sql: str, *params: Any) -> int:
        """Run a write; return how many rows it changed."""
        return self.db.execute_sql(sql, params).rowcount

    # -- settings ----------------------------------------------------------

    def get_setting(self, key: str, default: str | None = None) -> str | None:
        with self._use():
            row = self._one("SELECT value FROM meta WHERE key = ?", key)
            return row[0] if row else default

    def set_setting(self, key: str, value: str) -> None:
        with self._use(write=True):
            self._changed("REPLACE INTO meta (key, value) VALUES (?, ?)", key, value)

    def probe(self, busy_timeout: float = 0.1) -> None:
        """Write and then delete 64 KiB; raises StorageUnavailable while the
        database refuses writes, marks the store available when it accepts
        them.  Two transactions, so the first really reaches the disk."""
        with self._use(write=True, busy_timeout=busy_timeout):
            self._changed(
                "REPLACE INTO meta (key, value) VALUES (?, hex(randomblob(32768)))", PROBE_SETTING
            )
        with self._use(write=True, busy_timeout=busy_timeout, probe=True):
            self._changed("DELETE FROM meta WHERE key = ?", PROBE_SETTING)

    # -- sessions ----------------------------------------------------------

    def _session(self, session_id: str) -> dict[str, Any] | None:
        """The session in the API's shape, or None.  Holds _connection_lock."""
        row = self._one(f"SELECT {_SESSION} FROM session WHERE id = ?", session_id)
        if row is None:
            return None
        (message_count,) = self._one("SELECT COUNT(*) FROM message WHERE session_id = ?", row[0])
        counts = dict(
            self._all(
                f"SELECT status, COUNT(*) FROM run WHERE session_id = ? AND status IN ({_ACTIVE}) "
                "GROUP BY status",
                row[0],
            )
        )
        return self._session_dict(row, message_count, counts)

    @staticmethod
    def _session_dict(row: tuple, message_count: int, counts: dict[str, int]) -> dict[str, Any]:
        """A session row in the API's shape; ``counts``: its active runs by status."""
        queued = counts.get("queued", 0)
        return {
            "id": row[0],
            "title": row[1],
            "created_at": row[2],
            "updated_at": row[3],
            "message_count": message_count,
            "prompt_tokens": row[4],
            "completion_tokens": row[5],
            "cache_read_tokens": row[6],
            "cache_write_tokens": row[7],
            "cost_usd": _cost(row[8]),
            "is_busy": bool(queued or counts.get("running", 0)),
            "queued_runs": queued,
        }

    def _insert_session(self, title: str, now: str) -> tuple:
        """Holds _connection_lock, in a write; returns the row (``_SESSION``) as stored."""
        row = (new_id(), title, now, now, 0, 0, 0, 0, None)
        # Every counter is given: the migrations' columns have no SQL defaults.
        self._changed(
            f"INSERT INTO session ({_SESSION}, context_tokens) VALUES ({_SESSION_VALUES}, 0)",
            *row,
        )
        return row

    def create_session(self, title: str) -> dict[str, Any]:
        with self._use(write=True):
            return self._session_dict(self._insert_session(title, utcnow()), 0, {})

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        with self._use():
            return self._session(session_id)

    def list_sessions(self) -> list[dict[str, Any]]:
        with self._use():
            rows = self._all("SELECT id FROM session ORDER BY created_at DESC, pk DESC")
            return [self._session(session_id) for (session_id,) in rows]

    def update_session(self, session_id: str, title: str) -> dict[str, Any] | None:
        with self._use(write=True):
            self._changed(
                "UPDATE session SET title = ?, updated_at = ? WHERE id = ?",
                title,
                utcnow(),
                session_id,
            )
            return self._session(session_id)

    def delete_session(self, session_id: str) -> bool:
        """Delete a session that has no queued or running run.

        Returns False if it does not exist; raises ``SessionBusy`` if busy.
        The check and the delete share one transaction.
        """
        with self._use(write=True):
            if self._one("SELECT 1 FROM session WHERE id = ?", session_id) is None:
                return False
            busy = self._one(
                f"SELECT 1 FROM run WHERE session_id = ? AND status IN ({_ACTIVE}) LIMIT 1",
                session_id,
            )
            if busy:
                raise SessionBusy("session has an active or queued run; cancel it first")
            self._changed("DELETE FROM session WHERE id = ?", session_id)
            return True

    # -- messages ----------------------------------------------------------

    @staticmethod
    def _message_dict(row: tuple) -> dict[str, Any]:
        return {
            "id": row[0],
            "session_id": row[1],
            "run_id": row[2],
            "role": row[3],
            "parts": json.loads(row[4]),
            "model": row[5],
            "provider": row[6],
            "created_at": row[7],
            "updated_at": row[8],
            "reverted": row[9] is not None,
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
        with self._use(write=True):
            return self._insert_message(session_id, run_id, role, parts, model, provider)

    def _insert_message(
        self,
        session_id: str,
        run_id: str | None,
        role: str,
        parts: list[dict[str, Any]],
        model: str | None,
        provider: str | None,
    ) -> dict[str, Any]:
        """Holds _connection_lock, in a write transaction."""
        now = utcnow()
        row = (
            *(new_id(), session_id, run_id, role, json.dumps(parts), model, provider),
            *(now, now, None),
        )
        self._changed(f"INSERT INTO message ({_MESSAGE}) VALUES ({_MESSAGE_VALUES})", *row)
        self._changed("UPDATE session SET updated_at = ? WHERE id = ?", now, session_id)
        return self._message_dict(row)  # as stored, not read back

    def update_message(
        self, message: dict[str, Any], parts: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Store new ``parts`` for ``message`` (as created); return it as
        stored now, built from ``message`` rather than read back: its other
        fields never change."""
        now, stored = utcnow(), json.dumps(parts)
        with self._use(write=True):
            if not self._changed(
                "UPDATE message SET parts = ?, updated_at = ? WHERE id = ?",
                stored,
                now,
                message["id"],
            ):
                raise NotFound(f"message {message['id']} not found")
        return {**message, "parts": json.loads(stored), "updated_at": now}

    def list_messages(self, session_id: str) -> list[dict[str, Any]]:
        with self._use():
            rows = self._all(
                f"SELECT {_MESSAGE} FROM message WHERE session_id = ? ORDER BY pk", session_id
            )
            return [self._message_dict(r) for r in rows]

    def context(
        self, session_id: str, before: str | None = None
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """What a model request of the session is built from, SPEC §4 "Context":
        ``(summary, messages)``.

        ``summary`` is the message of the completed compaction in force (or
        None); ``messages`` are the ones after the cut, oldest first, the
        summary itself left out.  With ``before`` (a message id) only those
        stored before that message.  Reverted messages are left out, and a
        summary that was reverted is not in force.  Nothing is ever deleted:
        the messages route still lists them all.
        """
        with self._use():
            session = self._one(
                "SELECT summary_id, summary_keep_pk FROM session WHERE id = ?", session_id
            )
            if session is None:
                return None, []
            summary_id, keep_pk = session
            where, params = ["session_id = ?", "reverted_by IS NULL"], [session_id]
            summary = None
            if summary_id is not None:
                summary = self._one(
                    f"SELECT pk, {_MESSAGE} FROM message WHERE id = ? AND reverted_by IS NULL",
                    summary_id,
                )
            if summary is not None:
                where.append("pk >= ? AND id != ?")
                params += [keep_pk or summary[0], summary_id]
            if before is not None:
                limit = self._one("SELECT pk FROM message WHERE id = ?", before)
                if limit is not None:
                    where.append("pk < ?")
                    params.append(limit[0])
            rows = self._all(
                f"SELECT {_MESSAGE} FROM message WHERE {' AND '.join(where)} ORDER BY pk", *params
            )
            messages = [self._message_dict(r) for r in rows]
            return (self._message_dict(summary[1:]) if summary else None), messages

    def set_summary(self, session_id: str, message_id: str, keep_from: str | None) -> None:
        """Put a completed compaction in force: from now on requests carry
        ``message_id``'s summary and the messages from ``keep_from`` on (or
        those after the summary), and the threshold waits for the next request."""
        with self._use(write=True):
            anchor = self._one("SELECT pk FROM message WHERE id = ?", keep_from or message_id)
            if anchor is None:
                raise NotFound(f"message {keep_from or message_id} not found")
            self._changed(
                "UPDATE session SET summary_id = ?, summary_keep_pk = ?, context_tokens = 0 "
                "WHERE id = ?",
                message_id,
                anchor[0],
                session_id,
            )

    def context_tokens(self, session_id: str) -> int:
        """The prompt tokens of the session's last model request (0 if none since a compaction)."""
        with self._use():
            row = self._one("SELECT context_tokens FROM session WHERE id = ?", session_id)
            return row[0] if row else 0

    def run_messages(self, run_id: str) -> list[dict[str, Any]]:
        with self._use():
            rows = self._all(f"SELECT {_MESSAGE} FROM message WHERE run_id = ? ORDER BY pk", run_id)
            return [self._message_dict(r) for r in rows]

    # -- runs --------------------------------------------------------------

    def _run_dict(self, row: tuple) -> dict[str, Any]:
        return {
            "id": row[0],
            "workspace_id": self.workspace_id,
            "session_id": row[1],
            "kind": row[2],
            "model": row[3],
            "prompt": row[4],
            "status": row[5],
            "error": row[6],
            "message_id": row[7],
            "text": row[8],
            "created_at": row[9],
            "started_at": row[10],
            "finished_at": row[11],
            "usage": {
                "prompt_tokens": row[12],
                "completion_tokens": row[13],
                "cache_read_tokens": row[14],
                "cache_write_tokens": row[15],
                "cost_usd": _cost(row[16]),
            },
        }

    def _run(self, run_id: str) -> dict[str, Any] | None:
        """Holds _connection_lock."""
        row = self._one(f"SELECT {_RUN} FROM run WHERE id = ?", run_id)
        return self._run_dict(row) if row else None

    def accept_runs(
        self, prompts: list[Prompt], max_queue: int
    ) -> list[tuple[dict[str, Any], dict[str, Any] | None, bool] | RequestError]:
        """Store prompts as ``queued`` runs, all in one transaction (a group
        commit: one lock round and one commit for a burst of prompts).

        For each prompt, in order: ``(run, new_session_or_None, True)``;
        ``(run, None, False)`` when a run with its id exists already (an
        idempotent resubmission: nothing written); or the error that refused
        it alone — NotFound for an unknown session, QueueFull when the
        session already has ``max_queue`` queued runs — and nothing of it
        was written.  A storage fault raises and writes none of them.
        """
        results: list[tuple[dict[str, Any], dict[str, Any] | None, bool] | RequestError] = []
        now = utcnow()
        with self._use(write=True):
            for prompt in prompts:
                existing = self._run(prompt.run_id)
                if existing is not None:
                    results.append((existing, None, False))
                    continue
                session_id = prompt.session_id
                new_session = None
                if session_id is None:
                    new_session = self._insert_session(prompt.title, now)
                    session_id = new_session[0]
                else:
                    if self._one("SELECT 1 FROM session WHERE id = ?", session_id) is None:
                        results.append(NotFound(f"session {session_id} not found"))
                        continue
                    (queued,) = self._one(
                        "SELECT COUNT(*) FROM run WHERE session_id = ? AND status = 'queued'",
                        session_id,
                    )
                    if queued >= max_queue:
                        results.append(
                            QueueFull(f"session {session_id} already has {max_queue} queued runs")
                        )
                        continue
                row = (
                    *(prompt.run_id, session_id, prompt.kind, prompt.model, prompt.prompt),
                    *("queued", None, None, None, now, None, None, 0, 0, 0, 0, None),
                )
                self._changed(f"INSERT INTO run ({_RUN}) VALUES ({_RUN_VALUES})", *row)
                # Built as stored, not read back: four statements fewer.
                session = None
                if new_session is not None:
                    session = self._session_dict(new_session, 0, {"queued": 1})
                results.append((self._run_dict(row), session, True))
        return results

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
        """One prompt of :meth:`accept_runs`: ``(run, new_session_or_None)``;
        raises its NotFound or QueueFull."""
        (result,) = self.accept_runs(
            [Prompt(run_id, prompt, session_id, title, model, kind)], max_queue
        )
        if isinstance(result, RequestError):
            raise result
        return result[0], result[1]

    def last_run_model(self, session_id: str) -> str | None:
        """The model of the session's latest run that names one (queued ones count)."""
        with self._use():
            row = self._one(
                "SELECT model FROM run WHERE session_id = ? AND model IS NOT NULL "
                "ORDER BY pk DESC LIMIT 1",
                session_id,
            )
            return row[0] if row else None

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with self._use():
            return self._run(run_id)

    def list_runs(
        self,
        session_id: str | None = None,
        status: str | None = None,
        limit: int = 100,
        oldest_first: bool = False,
    ) -> list[dict[str, Any]]:
        where, params = ["1"], []
        if session_id:
            where.append("session_id = ?")
            params.append(session_id)
        if status:
            where.append("status = ?")
            params.append(status)
        order = "pk" if oldest_first else "pk DESC"
        with self._use():
            rows = self._all(
                f"SELECT {_RUN} FROM run WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?",
                *params,
                limit,
            )
            return [self._run_dict(r) for r in rows]

    def count_runs(self, status: str, session_id: str | None = None) -> int:
        sql, params = "SELECT COUNT(*) FROM run WHERE status = ?", [status]
        if session_id:
            sql += " AND session_id = ?"
            params.append(session_id)
        with self._use():
            return self._one(sql, *params)[0]

    def start_run(
        self,
        run_id: str,
        *,
        model: str | None = None,
        message_ids: tuple[str | None, str | None] | None = None,
    ) -> RunStart | None:
        """``queued`` -> ``running``, with the run's first records, in one
        transaction; None if the run is no longer queued.

        ``model``, when given, is stored as the run's: the one it was
        accepted with, or for a run queued by a version before runs had a
        model, the one its workspace gave it when it loaded it.  A ``prompt``
        run gets its user message; every run gets its first, empty
        assistant message, which records ``message_ids`` (the provider's
        model id and the provider; without them, the run's model and no
        provider).  One transaction, so that no crash or refused write
        leaves a running run without the prompt it answers; it also reads
        the session's context and its size, which the run's first request
        needs (one turn at the connection lock instead of three).
        """
        model_column = ", model = ?" if model is not None else ""
        with self._use(write=True):
            updated = self._changed(
                f"UPDATE run SET status = 'running', started_at = ?{model_column} "
                "WHERE id = ? AND status = 'queued'",
                utcnow(),
                *(() if model is None else (model,)),
                run_id,
            )
            if not updated:
                return None
            run = self._run(run_id)
            session_id = run["session_id"]
            user = None
            if run["kind"] != "compact":
                prompt = [{"type": "text", "text": run["prompt"]}]
                user = self._insert_message(session_id, run_id, "user", prompt, None, None)
            ids = message_ids if message_ids is not None else (run["model"], None)
            message = self._insert_message(session_id, run_id, "assistant", [], *ids)
            context = self.context(session_id)
            return RunStart(run, user, message, context, self.context_tokens(session_id))

    def finish_run(
        self, run_id: str, status: str, *, only_from: str | None = None, **fields: Any
    ) -> dict[str, Any] | None:
        """Move a run to a terminal status unless it already has one (or,
        with ``only_from``, unless its status is something else).

        ``fields`` sets ``error``, ``text`` or ``message_id`` with it.
        Returns the terminal run, or None when nothing changed, so exactly
        one caller publishes ``run.completed``.
        """
        if unknown := set(fields) - _FINISH_FIELDS:
            raise TypeError(f"finish_run cannot set {sorted(unknown)}")
        columns = "".join(f", {name} = ?" for name in fields)
        sql = (
            f"UPDATE run SET status = ?, finished_at = ?{columns} "
            f"WHERE id = ? AND status NOT IN ({_TERMINAL})"
        )
        params = [status, utcnow(), *fields.values(), run_id]
        if only_from is not None:
            sql += " AND status = ?"
            params.append(only_from)
        with self._use(write=True):
            if not self._changed(sql, *params):
                return None
            return self._run(run_id)

    def add_usage(
        self,
        run_id: str,
        session_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        cost_usd: float | None = None,
        context_tokens: int | None = None,
    ) -> None:
        """Add one step's usage to its run and its session, in one transaction.

        ``cost_usd`` None (a model without prices) leaves the costs as they
        are; ``context_tokens``, when given, becomes the session's (the
        prompt tokens of its last model request, for the compaction threshold).
        """
        counts = (prompt_tokens, completion_tokens, cache_read_tokens, cache_write_tokens)
        sums = (
            "prompt_tokens = prompt_tokens + ?, completion_tokens = completion_tokens + ?, "
            "cache_read_tokens = cache_read_tokens + ?, cache_write_tokens = cache_write_tokens + ?"
        )
        cost = ", cost_usd = COALESCE(cost_usd, 0.0) + ?" if cost_usd is not None else ""
        extra = () if cost_usd is None else (cost_usd,)
        with self._use(write=True):
            self._changed(f"UPDATE run SET {sums}{cost} WHERE id = ?", *counts, *extra, run_id)
            context = ", context_tokens = ?" if context_tokens is not None else ""
            self._changed(
                f"UPDATE session SET {sums}{cost}{context} WHERE id = ?",
                *counts,
                *extra,
                *(() if context_tokens is None else (context_tokens,)),
                session_id,
            )
