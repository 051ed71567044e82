"""Reverts, unreverts and forks: undoing a session's runs, file by file.

A *revert* of a session to a point (a run: its user message; or a message)
undoes everything from there on:

* **Messages.**  Every message from the point on that is not reverted
  already is marked reverted by it: kept and listed (``"reverted": true``),
  left out of the next requests to the model.
* **Files.**  Only the paths the tool calls of those messages changed (as
  recorded, :mod:`crushd.checkpointing`) are written, each back to what it
  was before the first of those calls; nothing else, no hidden path.  It
  is refused with 409 ``workspace_changed``, listing the files, when one of
  them is not what those calls left: crushd recorded another change since
  (a later run of another session, a person's edit a snapshot saw), or the
  file differs from what crushd recorded last (an edit no snapshot saw) —
  unless ``force``.  The revert is itself checkpointed (a snapshot before
  and after, pinned), so :func:`unrevert` can undo it, with the same checks.
* **Safety.**  The session must be idle (409 ``session_busy``) and no run
  of it starts while the revert runs (``hold_session``).  The record is
  written ``applying`` before a file changes; each file is written whole
  and renamed into place (:mod:`crushd.restore`); after a crash
  :func:`recover` finishes the files and the record, or, when no file had
  changed, marks it ``failed``.

A *fork* copies the conversation up to a message into a new session; with
``restore_files`` the files the session's later tool calls changed are
reverted as above, recorded as a revert of the new session.

Every function here runs its work as a job of the workspace's checkpoint
worker (:meth:`~crushd.checkpointing.WorkspaceCheckpoints.call`), so it is
ordered with the snapshots and the latest recorded tree is exact.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from crushd.checkpointing import WorkspaceCheckpoints
from crushd.checkpoints import EMPTY_TREE, Interrupted, Restored
from crushd.common import new_id
from crushd.errors import (
    CheckpointError,
    CheckpointExpired,
    InvalidRequest,
    NotFound,
    NothingToRevert,
    RestoreBlocked,
    WorkspaceChanged,
)
from crushd.events import EventType

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """One revert, decided before anything is written."""

    message_ids: list[str]
    steps: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    target: str = EMPTY_TREE  # the tree the paths go back to
    conflicts: list[str] = field(default_factory=list)
    preview: Restored = field(default_factory=Restored)


# -- the routes' entry points --------------------------------------------------


def revert(
    owner: WorkspaceCheckpoints,
    session_id: str,
    *,
    run_id: str | None = None,
    message_id: str | None = None,
    dry_run: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Revert the session to before ``run_id`` (or ``message_id``); the
    revert as JSON (a preview with ``dry_run``).  Blocks."""
    owner.require()
    if (run_id is None) == (message_id is None):
        raise InvalidRequest("give either run_id or message_id")
    _session(owner, session_id)
    with owner.hold_session(session_id):
        return owner.call(
            lambda: _revert(owner, session_id, run_id, message_id, dry_run=dry_run, force=force)
        )


def unrevert(
    owner: WorkspaceCheckpoints, session_id: str, *, dry_run: bool = False, force: bool = False
) -> dict[str, Any]:
    """Undo the session's latest revert in force; the revert as JSON.  Blocks."""
    owner.require()
    _session(owner, session_id)
    with owner.hold_session(session_id):
        return owner.call(lambda: _unrevert(owner, session_id, dry_run=dry_run, force=force))


def fork(
    owner: WorkspaceCheckpoints,
    session_id: str,
    *,
    message_id: str | None = None,
    restore_files: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Copy the conversation up to ``message_id`` (all of it without one)
    into a new session; ``{"session", "revert"}``.  Blocks."""
    source = _session(owner, session_id)
    title = f"{source['title']} (fork)"
    if not restore_files:
        upto = _fork_upto(owner.records.session_timeline(session_id), message_id)
        new_session = owner.records.fork_session(session_id, title, upto)
        return {"session": _announce_session(owner, new_session), "revert": None}
    owner.require()
    with owner.hold_session(session_id):
        return owner.call(lambda: _fork(owner, session_id, title, message_id, force))


# -- worker jobs ---------------------------------------------------------------


def _revert(
    owner: WorkspaceCheckpoints,
    session_id: str,
    run_id: str | None,
    message_id: str | None,
    *,
    dry_run: bool,
    force: bool,
) -> dict[str, Any]:
    timeline = owner.records.session_timeline(session_id)
    point = _point(owner, timeline, session_id, run_id, message_id)
    later = [m for m in timeline if m["pk"] >= point["pk"] and m["reverted_by"] is None]
    if not later:
        raise NothingToRevert("everything from that point on is reverted already")
    plan = _plan(owner, session_id, later)
    _check(plan, force)
    if dry_run:
        return _preview(session_id, point["run_id"], point["id"], plan)
    record = _apply(
        owner,
        plan,
        session_id=session_id,
        run_id=run_id if run_id is not None else point["run_id"],
        message_id=point["id"],
        from_pk=point["pk"],
        force=force,
    )
    answer = revert_json(record)
    owner.hub.publish(
        EventType.SESSION_REVERTED, session_id, {"session_id": session_id, "revert": answer}
    )
    return answer


def _unrevert(
    owner: WorkspaceCheckpoints, session_id: str, *, dry_run: bool, force: bool
) -> dict[str, Any]:
    store = owner.require()
    record = owner.records.last_revert(session_id)
    if record is None:
        raise NothingToRevert(f"session {session_id} has no revert to undo")
    if record["expired"]:
        raise CheckpointExpired(f"the checkpoints of revert {record['id']} were pruned")
    unrecorded = set((record["result"] or {}).get("unrecorded", ()))
    paths = [p for p in owner.visible(record["paths"]) if p not in unrecorded]
    latest = owner.latest
    conflicts: set[str] = set()
    preview = Restored()
    if paths:
        if record["after_tree"] != latest:
            conflicts |= set(paths) & set(store.changed_paths(record["after_tree"], latest))
        preview = store.restore(
            record["before_tree"], paths, expected=latest, force=True, dry_run=True
        )
        conflicts |= set(preview.overridden)
    if conflicts and not force:
        raise WorkspaceChanged(sorted(conflicts))
    if dry_run:
        answer = revert_json(record)
        answer["dry_run"] = True
        answer["undone"] = _result(preview, sorted(conflicts))
        return answer
    group = record["pin_group"]
    error = None
    restored = Restored()
    if paths:
        undo_before = store.snapshot(pin=f"{group}/undo-before", note="before an unrevert")
        owner.latest = undo_before.tree
        owner.records.begin_unrevert(record["id"], undo_before.tree)
        try:
            restored = store.restore(record["before_tree"], paths, expected=latest, force=force)
        except (WorkspaceChanged, RestoreBlocked):
            owner.records.abandon_unrevert(record["id"])
            raise
        except CheckpointError as exc:  # stopped part way; every file is whole
            error = exc.message
        undo_after = store.snapshot(pin=f"{group}/undo-after", note="after an unrevert")
        owner.latest = after_tree = undo_after.tree
    else:
        after_tree = latest or EMPTY_TREE
        owner.records.begin_unrevert(record["id"], after_tree)
    done = owner.records.finish_unrevert(
        record["id"], after_tree, _result(restored, {*restored.overridden, *conflicts}), error
    )
    answer = revert_json(done)
    logger.info(
        "event=session_unreverted workspace=%s session=%s revert=%s files=%d",
        owner.workspace_id,
        session_id,
        record["id"],
        len(paths),
    )
    owner.hub.publish(
        EventType.SESSION_UNREVERTED, session_id, {"session_id": session_id, "revert": answer}
    )
    return answer


def _fork(
    owner: WorkspaceCheckpoints,
    session_id: str,
    title: str,
    message_id: str | None,
    force: bool,
) -> dict[str, Any]:
    timeline = owner.records.session_timeline(session_id)
    upto = _fork_upto(timeline, message_id)
    later = [
        m for m in timeline if upto is not None and m["pk"] > upto and m["reverted_by"] is None
    ]
    plan = _plan(owner, session_id, later)
    plan.message_ids = []  # the new session holds none of them
    _check(plan, force)
    new_session = owner.records.fork_session(session_id, title, upto)
    record = None
    if plan.paths:
        try:
            record = _apply(
                owner,
                plan,
                session_id=new_session,
                run_id=None,
                message_id=None,  # it reverts no message of its session
                from_pk=None,
                force=force,
            )
        except Exception:  # the fork is one thing: no session without its files
            owner.records.delete_session(new_session)
            raise
    session = _announce_session(owner, new_session)
    return {"session": session, "revert": None if record is None else revert_json(record)}


# -- planning ------------------------------------------------------------------


def _session(owner: WorkspaceCheckpoints, session_id: str) -> dict[str, Any]:
    session = owner.records.get_session(session_id)
    if session is None:
        raise NotFound(f"session {session_id} not found")
    return session


def _announce_session(owner: WorkspaceCheckpoints, session_id: str) -> dict[str, Any]:
    session = _session(owner, session_id)
    owner.hub.publish(EventType.SESSION_CREATED, session_id, session)
    return session


def _point(
    owner: WorkspaceCheckpoints,
    timeline: list[dict[str, Any]],
    session_id: str,
    run_id: str | None,
    message_id: str | None,
) -> dict[str, Any]:
    """The first message a revert undoes."""
    if run_id is not None:
        run = owner.records.get_run(run_id)
        if run is None or run["session_id"] != session_id:
            raise NotFound(f"run {run_id} not found in session {session_id}")
        first = next((m for m in timeline if m["run_id"] == run_id), None)
        if first is None:
            raise NothingToRevert(f"run {run_id} has not written anything to revert")
        return first
    found = next((m for m in timeline if m["id"] == message_id), None)
    if found is None:
        raise NotFound(f"message {message_id} not found in session {session_id}")
    if found["role"] == "tool":
        raise InvalidRequest(
            "a tool message answers the calls of the assistant message before it: "
            "revert to that message (or a later one)"
        )
    return found


def _fork_upto(timeline: list[dict[str, Any]], message_id: str | None) -> int | None:
    """The last message a fork copies: ``message_id``'s, and the tool
    results of its calls with it (a conversation never ends on calls
    without their results).  None: all of them."""
    if message_id is None:
        return None
    for i, message in enumerate(timeline):
        if message["id"] == message_id:
            following = timeline[i + 1] if i + 1 < len(timeline) else None
            if message["tool_calls"] and following is not None and following["role"] == "tool":
                return following["pk"]
            return message["pk"]
    raise NotFound(f"message {message_id} not found")


def _plan(owner: WorkspaceCheckpoints, session_id: str, messages: list[dict[str, Any]]) -> Plan:
    """What reverting ``messages`` (of ``session_id``, oldest first) writes,
    and which of its files changed since their calls changed them."""
    store = owner.require()
    plan = Plan(message_ids=[m["id"] for m in messages])
    calls = {call for m in messages for call in m["tool_calls"]}
    plan.steps = [
        s
        for s in owner.records.checkpoint_steps(session_id=session_id)
        if s["tool_call_id"] in calls
    ]
    if any(s["expired"] for s in plan.steps):
        raise CheckpointExpired("some of the checkpoints this revert needs were pruned")
    plan.paths = owner.visible(sorted({p for s in plan.steps for p in s["paths"]}))
    if not plan.paths:
        return plan
    plan.target = plan.steps[0]["before_tree"]
    latest = owner.latest
    # What each path was after the last call that changed it: it must still be that.
    last_after: dict[str, str] = {}
    for step in plan.steps:
        for path in step["paths"]:
            last_after[path] = step["after_tree"]
    by_tree: dict[str, set[str]] = defaultdict(set)
    for path in plan.paths:
        by_tree[last_after[path]].add(path)
    conflicts: set[str] = set()
    for tree, paths in by_tree.items():
        if latest is not None and tree != latest:
            conflicts |= paths & set(store.changed_paths(tree, latest))
    wanted = set(plan.paths)
    for other in owner.records.steps_elsewhere(session_id, plan.steps[0]["pk"]):
        conflicts |= wanted & set(other["paths"])
    plan.preview = store.restore(plan.target, plan.paths, expected=latest, force=True, dry_run=True)
    conflicts |= set(plan.preview.overridden)
    plan.conflicts = sorted(conflicts)
    return plan


def _check(plan: Plan, force: bool) -> None:
    if plan.conflicts and not force:
        raise WorkspaceChanged(plan.conflicts)


def _apply(
    owner: WorkspaceCheckpoints,
    plan: Plan,
    *,
    session_id: str,
    run_id: str | None,
    message_id: str | None,
    from_pk: int | None,
    force: bool,
) -> dict[str, Any]:
    """Carry a plan out: snapshot, record ``applying``, restore, snapshot,
    record ``applied`` (its messages reverted).  Returns the record."""
    store = owner.require()
    revert_id = new_id()
    group = f"reverts/{revert_id}"
    latest = owner.latest
    before = None
    if plan.paths:
        before = store.snapshot(pin=f"{group}/before", note=f"before revert {revert_id}")
        owner.latest = before.tree
    before_tree = before.tree if before else (latest or EMPTY_TREE)
    owner.records.begin_revert(
        revert_id=revert_id,
        session_id=session_id,
        run_id=run_id,
        message_id=message_id,
        from_pk=from_pk,
        paths=plan.paths,
        target_tree=plan.target,
        expected_tree=latest,
        before_tree=before_tree,
        message_ids=plan.message_ids,
        forced=force,
        group=group,
    )
    restored, error, after_tree = Restored(), None, before_tree
    if plan.paths:
        try:
            restored = store.restore(plan.target, plan.paths, expected=latest, force=force)
        except (WorkspaceChanged, RestoreBlocked) as exc:  # refused before a file changed
            owner.records.fail_revert(revert_id, exc.message)
            raise
        except CheckpointError as exc:  # stopped part way; every file is whole
            error = exc.message
        after = store.snapshot(pin=f"{group}/after", note=f"after revert {revert_id}")
        owner.latest = after_tree = after.tree
    lost = {s.path for s in before.skipped} if before else set()
    result = _result(restored, {*restored.overridden, *(plan.conflicts if force else ())}, lost)
    record = owner.records.finish_revert(revert_id, after_tree, result, error)
    logger.info(
        "event=session_reverted workspace=%s session=%s revert=%s files=%d messages=%d forced=%d",
        owner.workspace_id,
        session_id,
        revert_id,
        len(plan.paths),
        len(plan.message_ids),
        len(restored.overridden),
    )
    return record


def _result(
    restored: Restored, overridden: Any = (), lost: set[str] | None = None
) -> dict[str, list[str]]:
    changed = set(restored.written) | set(restored.deleted)
    return {
        "written": list(restored.written),
        "deleted": list(restored.deleted),
        "unchanged": list(restored.unchanged),
        "overridden": sorted(overridden),
        "unrecorded": sorted((lost or set()) & changed),
    }


def _preview(
    session_id: str, run_id: str | None, message_id: str | None, plan: Plan
) -> dict[str, Any]:
    return {
        "id": None,
        "session_id": session_id,
        "run_id": run_id,
        "message_id": message_id,
        "state": "dry_run",
        "dry_run": True,
        "files": plan.paths,
        "messages": plan.message_ids,
        "restored": _result(plan.preview, plan.conflicts),
        "undone": None,
        "error": None,
        "expired": False,
        "created_at": None,
        "undone_at": None,
    }


def revert_json(record: dict[str, Any]) -> dict[str, Any]:
    """A revert record as the API shows it."""
    return {
        "id": record["id"],
        "session_id": record["session_id"],
        "run_id": record["run_id"],
        "message_id": record["message_id"],
        "state": record["state"],
        "dry_run": False,
        "files": record["paths"],
        "messages": record["message_ids"],
        "restored": record["result"],
        "undone": record["undo_result"],
        "error": record["error"],
        "expired": record["expired"],
        "created_at": record["created_at"],
        "undone_at": record["undone_at"],
    }


# -- after a crash -------------------------------------------------------------


def recover(owner: WorkspaceCheckpoints, interrupted: Interrupted | None) -> None:
    """Finish what a crash cut short (at start, before the worker runs).

    A revert or unrevert recorded as in progress is finished when its
    restore was under way (``interrupted``, from the store's journal) or
    had already written every file; it is dropped (``failed``, or the
    revert stays in force) when no file had changed.  A restore without a
    record is completed, so every file is its new content.
    """
    store = owner.require()
    for record in owner.records.reverts_in_progress():
        undoing = record["state"] == "undoing"
        target = record["before_tree"] if undoing else record["target_tree"]
        unrecorded = set((record["result"] or {}).get("unrecorded", ())) if undoing else set()
        paths = [p for p in owner.visible(record["paths"]) if p not in unrecorded]
        if interrupted is not None and interrupted.tree == target:
            store.restore(target, interrupted.paths, force=True)
            interrupted, done = None, True
        else:
            done = not store.restore(target, paths, dry_run=True).changed
        note = "interrupted by a crash; finished at the next start"
        if not done:
            logger.warning(
                "event=revert_dropped workspace=%s revert=%s state=%s",
                owner.workspace_id,
                record["id"],
                record["state"],
            )
            if undoing:
                owner.records.abandon_unrevert(record["id"])
            else:
                owner.records.fail_revert(record["id"], "interrupted before a file changed")
            continue
        group = record["pin_group"]
        last = "undo-after" if undoing else "after"
        after = store.snapshot(pin=f"{group}/{last}", note="after a revert finished at start")
        owner.latest = after.tree
        if undoing:
            done_record = owner.records.finish_unrevert(
                record["id"], after.tree, _result(Restored()), note
            )
            kind = EventType.SESSION_UNREVERTED
        else:
            done_record = owner.records.finish_revert(
                record["id"], after.tree, _result(Restored()), note
            )
            kind = EventType.SESSION_REVERTED
        logger.warning(
            "event=revert_finished_at_start workspace=%s revert=%s state=%s",
            owner.workspace_id,
            record["id"],
            done_record["state"],
        )
        owner.hub.publish(
            kind,
            record["session_id"],
            {"session_id": record["session_id"], "revert": revert_json(done_record)},
        )
    if interrupted is not None:
        store.restore(interrupted.tree, interrupted.paths, force=True)
        logger.warning(
            "event=restore_finished_without_record workspace=%s paths=%d",
            owner.workspace_id,
            len(interrupted.paths),
        )
