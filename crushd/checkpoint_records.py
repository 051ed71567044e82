"""The checkpoint records of a workspace database: what :mod:`crushd.checkpointing` stores.

The trees themselves live in the shadow git repository
(:mod:`crushd.checkpoints`); the database says what they mean:

* ``checkpoint_run`` — per run, the tree before it and after its last
  recorded tool call, its pin group and what its snapshots left out;
* ``checkpoint_step`` — per tool call that can change files, the trees
  around it and the paths it changed (computed once, when it is recorded,
  so a revert plans from the database alone);
* ``checkpoint_revert`` — per revert: its session, point, paths and trees,
  written ``applying`` (or ``undoing``) *before* a file changes, so a start
  after a crash can finish the database side of a restore it finishes;
* ``message.reverted_by`` — the revert a message is reverted by (kept,
  listed, left out of the model's requests).

The workspace's latest recorded tree (the ``expected`` of every restore:
what crushd last saw) is the ``meta`` row ``checkpoint_latest``, written in
the same transaction as the record of the snapshot that produced it.

:class:`CheckpointRecords` is a mixin of :class:`crushd.store.WorkspaceStore`
(the queries of one concept in a module of their own, on the store's one
connection); the same thread-safety and storage-fault rules hold.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from crushd.common import new_id, utcnow

LATEST_SETTING = "checkpoint_latest"

_STEP = "pk, run_id, session_id, tool_call_id, tool, before_tree, after_tree, paths, created_at"
_REVERT = (
    "id, session_id, run_id, message_id, from_pk, paths, target_tree, expected_tree, "
    "before_tree, after_tree, undo_before_tree, undo_after_tree, message_ids, result, "
    "undo_result, forced, state, error, pin_group, expired, created_at, undone_at"
)
_REVERT_NAMES = [c.strip() for c in _REVERT.split(",")]
_JSON_COLUMNS = {"paths", "message_ids", "result", "undo_result"}
#: States of a revert whose files may be half written (see crushd.checkpointing).
IN_PROGRESS = ("applying", "undoing")


class CheckpointRecords:
    """Checkpoint queries of a workspace store; see the module docstring.

    Relies on the store's ``_use`` (:class:`crushd.sqlite.SqliteStore`) and
    ``_one``, ``_all`` and ``_changed`` (:class:`crushd.store.WorkspaceStore`),
    so it must come before them in the bases; it declares none of them.
    """

    # -- trees of runs and tool calls ----------------------------------------

    def _set_latest(self, tree: str) -> None:
        """Holds the connection, in a write."""
        self._changed("REPLACE INTO meta (key, value) VALUES (?, ?)", LATEST_SETTING, tree)

    def latest_checkpoint_tree(self) -> str | None:
        """The tree crushd recorded last (None before the first snapshot)."""
        with self._use():
            row = self._one("SELECT value FROM meta WHERE key = ?", LATEST_SETTING)
            return row[0] if row else None

    def record_checkpoint_run(
        self, run_id: str, session_id: str, group: str, tree: str, note: str, truncated: bool
    ) -> None:
        """The tree before a run; it is also its after tree until a tool call changes files."""
        with self._use(write=True):
            self._changed(
                "INSERT OR REPLACE INTO checkpoint_run (run_id, session_id, pin_group, "
                "before_tree, after_tree, note, truncated, expired, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
                run_id,
                session_id,
                group,
                tree,
                tree,
                note,
                int(truncated),
                utcnow(),
            )
            self._set_latest(tree)

    def record_checkpoint_step(
        self,
        run_id: str,
        session_id: str,
        tool_call_id: str,
        tool: str,
        before: str,
        after: str,
        paths: list[str],
        note: str,
        truncated: bool,
    ) -> None:
        """One tool call's trees and changed paths; the run's after tree moves with it."""
        with self._use(write=True):
            self._changed(
                f"INSERT INTO checkpoint_step ({_STEP}) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
                run_id,
                session_id,
                tool_call_id,
                tool,
                before,
                after,
                json.dumps(paths),
                utcnow(),
            )
            self._changed(
                "UPDATE checkpoint_run SET after_tree = ?, note = ?, truncated = ? "
                "WHERE run_id = ?",
                after,
                note,
                int(truncated),
                run_id,
            )
            self._set_latest(after)

    def checkpoint_run(self, run_id: str) -> dict[str, Any] | None:
        with self._use():
            row = self._one(
                "SELECT run_id, session_id, pin_group, before_tree, after_tree, note, "
                "truncated, expired FROM checkpoint_run WHERE run_id = ?",
                run_id,
            )
        if row is None:
            return None
        keys = ("run_id", "session_id", "group", "before_tree", "after_tree", "note")
        return {
            **dict(zip(keys, row, strict=False)),
            "truncated": bool(row[6]),
            "expired": bool(row[7]),
        }

    def checkpoint_steps(
        self, *, run_id: str | None = None, session_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Recorded tool calls in the order they ran, of one run or one
        session (or all), each with ``expired`` (its run's trees were pruned)."""
        where, params = ["1"], []
        if run_id is not None:
            where.append("s.run_id = ?")
            params.append(run_id)
        if session_id is not None:
            where.append("s.session_id = ?")
            params.append(session_id)
        columns = ", ".join(f"s.{c.strip()}" for c in _STEP.split(","))
        with self._use():
            rows = self._all(
                f"SELECT {columns}, COALESCE(r.expired, 0) FROM checkpoint_step s "
                "LEFT JOIN checkpoint_run r ON r.run_id = s.run_id "
                f"WHERE {' AND '.join(where)} ORDER BY s.pk",
                *params,
            )
        return [_step_dict(row) for row in rows]

    def steps_elsewhere(self, session_id: str, after_pk: int) -> Iterator[dict[str, Any]]:
        """Tool calls of *other* sessions recorded after step ``after_pk``."""
        columns = ", ".join(_STEP.split(", "))
        with self._use():
            rows = self._all(
                f"SELECT {columns}, 0 FROM checkpoint_step WHERE session_id != ? AND pk > ? "
                "ORDER BY pk",
                session_id,
                after_pk,
            )
        return (_step_dict(row) for row in rows)

    def newest_checkpoint_group(self) -> str | None:
        """The pin group of the run that started last (retention keeps it)."""
        with self._use():
            row = self._one("SELECT pin_group FROM checkpoint_run ORDER BY created_at DESC LIMIT 1")
            return row[0] if row else None

    def expire_checkpoint_groups(self, groups: Iterable[str]) -> int:
        """Mark the runs and reverts whose pins retention dropped; how many."""
        wanted = sorted(set(groups))
        changed = 0
        with self._use(write=True):
            for group in wanted:
                changed += self._changed(
                    "UPDATE checkpoint_run SET expired = 1 WHERE pin_group = ?", group
                )
                changed += self._changed(
                    "UPDATE checkpoint_revert SET expired = 1 WHERE pin_group = ?", group
                )
        return changed

    # -- the session's messages, as a revert sees them ------------------------

    def session_timeline(self, session_id: str) -> list[dict[str, Any]]:
        """The session's messages, oldest first: ``pk``, ``id``, ``role``,
        ``run_id``, ``reverted_by`` and the ids of the tool calls they hold."""
        with self._use():
            rows = self._all(
                "SELECT pk, id, role, run_id, reverted_by, parts FROM message "
                "WHERE session_id = ? ORDER BY pk",
                session_id,
            )
        timeline = []
        for pk, message_id, role, run_id, reverted_by, parts in rows:
            calls = [p["id"] for p in json.loads(parts) if p.get("type") == "tool_call"]
            timeline.append(
                {
                    "pk": pk,
                    "id": message_id,
                    "role": role,
                    "run_id": run_id,
                    "reverted_by": reverted_by,
                    "tool_calls": calls,
                }
            )
        return timeline

    # -- reverts ---------------------------------------------------------------

    def begin_revert(
        self,
        *,
        revert_id: str,
        session_id: str,
        run_id: str | None,
        message_id: str | None,
        from_pk: int | None,
        paths: list[str],
        target_tree: str,
        expected_tree: str | None,
        before_tree: str,
        message_ids: list[str],
        forced: bool,
        group: str,
    ) -> None:
        """Write a revert as ``applying``, before any file changes."""
        with self._use(write=True):
            self._changed(
                "INSERT INTO checkpoint_revert (id, session_id, run_id, message_id, from_pk, "
                "paths, target_tree, expected_tree, before_tree, message_ids, forced, state, "
                "pin_group, expired, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'applying', ?, 0, ?)",
                revert_id,
                session_id,
                run_id,
                message_id,
                from_pk,
                json.dumps(paths),
                target_tree,
                expected_tree,
                before_tree,
                json.dumps(message_ids),
                int(forced),
                group,
                utcnow(),
            )

    def finish_revert(
        self, revert_id: str, after_tree: str, result: dict[str, Any], error: str | None = None
    ) -> dict:
        """The revert is applied: its messages are reverted, ``after_tree`` is
        the latest recorded tree; ``error`` says what did not go as planned
        (a restore that stopped part way, one finished after a crash).
        Returns the record."""
        with self._use(write=True):
            self._changed(
                "UPDATE checkpoint_revert SET state = 'applied', after_tree = ?, result = ?, "
                "error = ? WHERE id = ?",
                after_tree,
                json.dumps(result),
                error,
                revert_id,
            )
            ids = json.loads(
                self._one("SELECT message_ids FROM checkpoint_revert WHERE id = ?", revert_id)[0]
            )
            for message_id in ids:
                self._changed(
                    "UPDATE message SET reverted_by = ? WHERE id = ? AND reverted_by IS NULL",
                    revert_id,
                    message_id,
                )
            self._context_changed(revert_id)
            self._set_latest(after_tree)
            return self._revert(revert_id)

    def _context_changed(self, revert_id: str) -> None:
        """The revert's session sends other messages now: the compaction
        threshold waits for the next request's size, as after a compaction.
        Holds the connection, in a write."""
        self._changed(
            "UPDATE session SET context_tokens = 0 WHERE id = "
            "(SELECT session_id FROM checkpoint_revert WHERE id = ?)",
            revert_id,
        )

    def fail_revert(self, revert_id: str, error: str) -> None:
        """A revert whose files were not changed after all (it stopped before,
        or a restart found them untouched): nothing of it is in force."""
        with self._use(write=True):
            self._changed(
                "UPDATE checkpoint_revert SET state = 'failed', error = ? WHERE id = ?",
                error,
                revert_id,
            )

    def begin_unrevert(self, revert_id: str, undo_before_tree: str) -> None:
        """Write that the revert is being undone, before any file changes."""
        with self._use(write=True):
            self._changed(
                "UPDATE checkpoint_revert SET state = 'undoing', undo_before_tree = ? WHERE id = ?",
                undo_before_tree,
                revert_id,
            )

    def finish_unrevert(
        self, revert_id: str, undo_after_tree: str, result: dict, error: str | None = None
    ) -> dict:
        """The revert is undone: its messages are in the conversation again."""
        with self._use(write=True):
            self._changed(
                "UPDATE checkpoint_revert SET state = 'undone', undo_after_tree = ?, "
                "undo_result = ?, undone_at = ?, error = COALESCE(?, error) WHERE id = ?",
                undo_after_tree,
                json.dumps(result),
                utcnow(),
                error,
                revert_id,
            )
            self._changed("UPDATE message SET reverted_by = NULL WHERE reverted_by = ?", revert_id)
            self._context_changed(revert_id)
            self._set_latest(undo_after_tree)
            return self._revert(revert_id)

    def abandon_unrevert(self, revert_id: str) -> None:
        """An unrevert that changed no file after all: the revert stays in force."""
        with self._use(write=True):
            self._changed(
                "UPDATE checkpoint_revert SET state = 'applied', undo_before_tree = NULL "
                "WHERE id = ? AND state = 'undoing'",
                revert_id,
            )

    def _revert(self, revert_id: str) -> dict[str, Any] | None:
        """Holds the connection."""
        row = self._one(f"SELECT {_REVERT} FROM checkpoint_revert WHERE id = ?", revert_id)
        return None if row is None else _revert_dict(row)

    def get_revert(self, revert_id: str) -> dict[str, Any] | None:
        with self._use():
            return self._revert(revert_id)

    def last_revert(self, session_id: str) -> dict[str, Any] | None:
        """The session's latest revert in force (``applied``), if any."""
        with self._use():
            row = self._one(
                f"SELECT {_REVERT} FROM checkpoint_revert WHERE session_id = ? "
                "AND state = 'applied' ORDER BY pk DESC LIMIT 1",
                session_id,
            )
        return None if row is None else _revert_dict(row)

    def reverts_in_progress(self) -> list[dict[str, Any]]:
        """Reverts and unreverts a crash interrupted, oldest first."""
        marks = ", ".join("?" * len(IN_PROGRESS))
        with self._use():
            rows = self._all(
                f"SELECT {_REVERT} FROM checkpoint_revert WHERE state IN ({marks}) ORDER BY pk",
                *IN_PROGRESS,
            )
        return [_revert_dict(row) for row in rows]

    # -- forks ---------------------------------------------------------------

    def fork_session(self, session_id: str, title: str, upto_pk: int | None) -> str:
        """A new session holding copies of ``session_id``'s messages up to
        ``upto_pk`` (all without it) that are not reverted, in order, with
        new ids; its compaction comes with it when its summary does.
        Returns the new session's id.  One transaction."""
        new_session = new_id()
        now = utcnow()
        with self._use(write=True):
            source = self._one(
                "SELECT summary_id, summary_keep_pk FROM session WHERE id = ?", session_id
            )
            self._changed(
                "INSERT INTO session (id, title, created_at, updated_at, prompt_tokens, "
                "completion_tokens, cache_read_tokens, cache_write_tokens, cost_usd, "
                "context_tokens) VALUES (?, ?, ?, ?, 0, 0, 0, 0, NULL, 0)",
                new_session,
                title,
                now,
                now,
            )
            where, params = "session_id = ? AND reverted_by IS NULL", [session_id]
            if upto_pk is not None:
                where += " AND pk <= ?"
                params.append(upto_pk)
            rows = self._all(
                f"SELECT pk, id, run_id, role, parts, model, provider, created_at, updated_at "
                f"FROM message WHERE {where} ORDER BY pk",
                *params,
            )
            copies: dict[str, str] = {}
            copied_at: dict[int, str] = {}
            for pk, old_id, run_id, role, parts, model, provider, created, updated in rows:
                copy = new_id()
                copies[old_id] = copy
                copied_at[pk] = copy
                self._changed(
                    "INSERT INTO message (id, session_id, run_id, role, parts, model, "
                    "provider, created_at, updated_at, reverted_by) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                    copy,
                    new_session,
                    run_id,
                    role,
                    parts,
                    model,
                    provider,
                    created,
                    updated,
                )
            summary_id, keep_pk = source if source else (None, None)
            if summary_id in copies:
                kept = [copied_at[pk] for pk in sorted(copied_at) if pk >= (keep_pk or 0)]
                anchor = self._one(
                    "SELECT pk FROM message WHERE id = ?", kept[0] if kept else copies[summary_id]
                )
                self._changed(
                    "UPDATE session SET summary_id = ?, summary_keep_pk = ? WHERE id = ?",
                    copies[summary_id],
                    anchor[0],
                    new_session,
                )
        return new_session


def _step_dict(row: tuple) -> dict[str, Any]:
    return {
        "pk": row[0],
        "run_id": row[1],
        "session_id": row[2],
        "tool_call_id": row[3],
        "tool": row[4],
        "before_tree": row[5],
        "after_tree": row[6],
        "paths": json.loads(row[7]),
        "created_at": row[8],
        "expired": bool(row[9]),
    }


def _revert_dict(row: tuple) -> dict[str, Any]:
    record = dict(zip(_REVERT_NAMES, row, strict=True))
    for name in _JSON_COLUMNS:
        if record[name] is not None:
            record[name] = json.loads(record[name])
    record["forced"] = bool(record["forced"])
    record["expired"] = bool(record["expired"])
    return record
