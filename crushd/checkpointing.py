"""Checkpoints of a workspace: recording each run's file changes, diffs, retention.

:class:`WorkspaceCheckpoints` puts one :class:`~crushd.checkpoints.CheckpointStore`
(the shadow git repository under the data directory) behind a workspace:

* **Recording.**  A run hands a snapshot of the work tree to the
  checkpoint worker once its first delta is out (or at its first tool
  call, whichever comes first) and does not wait for it.  Handed over as
  the run starts, the first snapshot of a large tree (its Python side
  competing for the GIL) delayed that run's first delta by 15 ms in
  ``scripts/bench.py checkpoint``; after the first delta nothing waits for
  it, and no tool of the run has run yet, so the tree is still the one
  before the run.
  Before a tool call that can change files (``bash``, ``write``, ``edit``,
  MCP tools: :attr:`crushd.tools.base.Tool.changes_files`) it waits until
  the worker has done everything handed to it so far (the run's first
  snapshot included) and takes the tree the worker recorded last as the
  call's *before*; after the call — also a failed or cancelled one — the
  worker snapshots again, records the call (its trees, the paths it
  changed) and publishes ``run.diff`` when it changed anything.  Taking
  the latest tree rather than the run's own previous one keeps what other
  sessions and people changed in between out of this call's diff.
* **One worker per workspace.**  Every snapshot, pin, restore and prune
  runs on one thread, in the order handed in: the latest recorded tree
  (the ``expected`` of every restore) is then exactly the tree of the last
  job, and nothing that writes the store waits on the workspace lock or
  holds it.  Diffs read the repository from the calling thread.
* **Retention.**  Trees are pinned per run (``runs/<run>/<n>``) and per
  revert (``reverts/<id>/...``); a prune at start and about daily when no
  run is active drops groups past ``--checkpoint-keep-days`` and, past
  ``--checkpoint-max-bytes``, the oldest, then gc's; the runs and reverts
  it dropped are marked expired (their diffs and reverts answer 410).
* **Reverts** are :mod:`crushd.reverts`'s; they run as jobs of this worker.
* **Secrets stay out.**  crushd's hidden paths inside the workspace (data
  directory, token, config file, socket, ``sandbox_hide``) are never
  recorded, diffed or restored.

A workspace with checkpoints off (``--no-checkpoints``, ``checkpoints =
false``, or a work tree the store refuses: ``/``, a home directory, one
containing the data directory) records nothing; its diff and revert routes
answer 409 ``checkpoints_disabled`` with the reason.

Thread-safety: public methods are thread-safe.  The ``_worker``'s state
(``_latest``, ``_latest_group``, the runs' trees) is written only on the
worker thread; other threads read single references.  ``_lock`` guards
``_closed`` and the queue's admission, and is taken holding nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from crushd.cancel import Cancelled, CancelToken
from crushd.checkpoints import CheckpointStore, UnsafeWorkTree
from crushd.errors import (
    CheckpointClosed,
    CheckpointError,
    CheckpointExpired,
    CheckpointsDisabled,
    NotFound,
    RequestError,
    StorageUnavailable,
)
from crushd.events import EventHub, EventType

if TYPE_CHECKING:
    from crushd.store import WorkspaceStore
    from crushd.tools.base import Tool

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest a tool call waits for the worker before it runs (the run's first
#: snapshot of a large new tree, a prune's gc); past it the call runs and
#: its changes are recorded with the next call.
READY_WAIT = 60.0
#: Longest a tool call's result waits for its snapshot.
STEP_WAIT = 60.0
#: How often the idle worker looks whether a prune is due, and how often one is.
PRUNE_CHECK = 600.0
PRUNE_INTERVAL = 86400.0
#: The disk use health and /metrics show is measured once the worker has
#: been idle this long after a job (a walk of the repository's files).
SIZE_INTERVAL = 1.0

#: The pin that keeps the latest recorded tree through every prune.
LATEST_PIN = "latest/tree"
LATEST_GROUP = "latest"
_REF_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,99}")
_STOP = object()


def pin_group(run_id: str) -> str:
    """The pin group of a run: ``runs/<run id>``, or a hash of an id that is
    not a valid ref name (a client may choose any run id)."""
    if _REF_SAFE.fullmatch(run_id):
        return f"runs/{run_id}"
    return "runs/h" + hashlib.sha256(run_id.encode()).hexdigest()[:40]


@dataclass
class _Job:
    work: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)
    # A run's first snapshot: jobs of this kind queued one after another
    # share one snapshot (see WorkspaceCheckpoints._work).
    starts: RunTrees | None = None


@dataclass
class RunTrees:
    """What the worker knows of one run: held by its :class:`RunCheckpoint`,
    read and written only by the worker's jobs."""

    run_id: str
    session_id: str
    group: str
    recorded: bool = False  # its checkpoint_run row exists
    trees: set[str] = field(default_factory=set)  # trees pinned in its group


class WorkspaceCheckpoints:
    """The checkpoints of one workspace; see the module docstring.

    Build, then :meth:`start` (which recovers and starts the worker), then
    :meth:`close`.  ``settings`` is the workspace's :class:`Config`;
    ``enabled`` whether this workspace records checkpoints; ``hidden`` the
    real paths no tool may touch; ``active_runs`` how many runs are active
    (a daily prune waits for none); ``hold_session`` a context manager that
    raises SessionBusy unless the session is idle and keeps new runs of it
    from starting while held (the workspace's).
    """

    def __init__(
        self,
        *,
        workspace_id: str,
        root: Path,
        git_dir: Path,
        records: WorkspaceStore,
        hub: EventHub,
        enabled: bool,
        max_file_bytes: int,
        max_files: int,
        keep_days: float,
        max_bytes: int,
        hidden: Iterable[str] = (),
        active_runs: Callable[[], int] = lambda: 0,
        hold_session: Callable[[str], contextlib.AbstractContextManager[None]] | None = None,
        close_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workspace_id = workspace_id
        self.root = Path(os.path.realpath(root))
        self.records = records
        self.hub = hub
        self.active_runs = active_runs
        self.hold_session = hold_session or (lambda session_id: contextlib.nullcontext())
        self.close_timeout = close_timeout
        self._clock = clock
        self.hidden = _inside(self.root, hidden)
        self.store: CheckpointStore | None = None
        self.disabled_reason = "" if enabled else "checkpoints are off for this workspace"
        if enabled:
            try:
                self.store = CheckpointStore(
                    git_dir,
                    self.root,
                    max_file_bytes=max_file_bytes,
                    max_files=max_files,
                    keep_days=keep_days,
                    max_bytes=max_bytes,
                    exclude=self.hidden,
                )
            except (UnsafeWorkTree, CheckpointError) as exc:
                self.disabled_reason = exc.message
                logger.warning(
                    "event=checkpoints_disabled workspace=%s reason=%r", workspace_id, exc.message
                )
        self._lock = threading.Lock()
        self._closed = False  # guarded by _lock
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Worker state: written on the worker thread (or by start(), before it runs).
        self.latest: str | None = None  # the tree recorded last
        self._last_prune = 0.0
        self.size = 0  # bytes the repository takes, measured now and then

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def require(self) -> CheckpointStore:
        """The store, or CheckpointsDisabled saying why there is none."""
        if self.store is None:
            raise CheckpointsDisabled(
                f"workspace {self.workspace_id} records no checkpoints: {self.disabled_reason}"
            )
        return self.store

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        """Create or repair the repository, finish a revert a crash
        interrupted (files and records), start the worker and queue the
        start's prune.  Blocks for the repair; never raises for a fault of
        the store (it is logged and checkpoints are off until the next start)."""
        if self.store is None:
            return
        from crushd.reverts import recover  # the reverts module builds on this one

        try:
            interrupted = self.store.init()
            self.latest = self.records.latest_checkpoint_tree()
            recover(self, interrupted)
        except Exception as exc:  # recovery never stops the daemon: off until the next start
            logger.exception(
                "event=checkpoints_start_failed workspace=%s error=%r", self.workspace_id, exc
            )
            self.disabled_reason = f"the checkpoint store failed to start: {exc}"
            self.store.close()
            self.store = None
            return
        self._thread = threading.Thread(
            target=self._work, name=f"crushd-checkpoints-{self.workspace_id[:8]}", daemon=True
        )
        self._thread.start()
        self.submit(self._prune)

    def close(self) -> None:
        """Refuse new jobs, let the queued ones finish within the close
        timeout, then kill the git in flight and join the worker.  Blocks;
        idempotent.  Call after the runs drained, before the database closes."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread is None:
            if self.store is not None:
                self.store.close()
            return
        self._jobs.put(_STOP)
        self._thread.join(self.close_timeout)
        if self.store is not None:
            self.store.close()  # kills a git still running; its job fails
        self._thread.join(1.0)
        if self._thread.is_alive():
            logger.warning("event=checkpoint_worker_alive workspace=%s", self.workspace_id)

    def submit(self, work: Callable[[], T]) -> Future[T]:
        """Queue ``work`` for the worker; its future has the result.  Raises
        CheckpointClosed once closing (or when checkpoints are off)."""
        return self._queue(_Job(work))

    def submit_start(self, run: RunTrees) -> Future[None]:
        """Queue a run's first snapshot (the tree before it)."""
        return self._queue(_Job(lambda: self._record_starts([run]), starts=run))

    def _queue(self, job: _Job) -> Future[Any]:
        with self._lock:
            if self._closed or self._thread is None:
                raise CheckpointClosed("the checkpoint worker is stopped")
            self._jobs.put(job)
        return job.future

    def call(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the worker and wait for its result (or its error).

        Unbounded on purpose: its git calls are bounded, and a close kills them."""
        return self.submit(work).result()

    def _work(self) -> None:
        """The worker thread: jobs in order; once idle, the disk use is
        measured (if a job ran since) and now and then a prune runs."""
        measured = True
        while True:
            try:
                job = self._jobs.get(timeout=PRUNE_CHECK if measured else SIZE_INTERVAL)
            except queue.Empty:
                if not measured:
                    self._measure()
                    measured = True
                if self._clock() - self._last_prune >= PRUNE_INTERVAL and not self.active_runs():
                    self._run(_Job(self._prune))
                continue
            while job is not None:
                if job is _STOP:
                    return
                job = self._run_next(job)
            measured = False

    def _run_next(self, job: _Job) -> _Job | object | None:
        """Run ``job``; return the next one already taken from the queue, if any.

        First snapshots queued one after another (a burst of runs starting)
        are taken as one: nothing of crushd's ran between them, so one tree
        is every one's "before", and a hundred runs starting at once cost
        one snapshot instead of a hundred git processes.
        """
        if job.starts is None:
            self._run(job)
            return None
        jobs, following = [job], None
        while following is None:
            try:
                following = self._jobs.get_nowait()
            except queue.Empty:
                break
            if isinstance(following, _Job) and following.starts is not None:
                jobs.append(following)
                following = None
        runs = [j.starts for j in jobs if j.future.set_running_or_notify_cancel()]
        if runs:
            together = _Job(lambda: self._record_starts(runs))
            together.future.set_running_or_notify_cancel()
            self._run_started(together, jobs)
        return following

    def _run_started(self, together: _Job, jobs: list[_Job]) -> None:
        """Run the shared first snapshot; every job it stands for gets its outcome."""
        try:
            together.work()
        except Exception as exc:  # thread boundary: the waiters get it
            logger.warning(
                "event=checkpoint_job_failed workspace=%s runs=%d error=%r",
                self.workspace_id,
                len(jobs),
                exc,
            )
            for job in jobs:
                if job.future.running():
                    job.future.set_exception(exc)
            return
        for job in jobs:
            if job.future.running():
                job.future.set_result(None)

    def _run(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            result = job.work()
        except Exception as exc:  # thread boundary: the waiter gets it
            if isinstance(exc, CheckpointError | StorageUnavailable) and not _answer(exc):
                # A fault of the store or the database: a run's snapshot, which
                # nobody may wait for, is only ever reported here.
                logger.warning(
                    "event=checkpoint_job_failed workspace=%s error=%r", self.workspace_id, exc
                )
            elif not _answer(exc):
                logger.exception("event=checkpoint_job_failed workspace=%s", self.workspace_id)
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    def _measure(self) -> None:
        if self.store is not None:
            self.size = self.store.size_bytes()

    # -- recording (worker jobs) ---------------------------------------------

    def _record_starts(self, runs: list[RunTrees]) -> None:
        """One snapshot, the tree before each of ``runs``, pinned and recorded for each."""
        store = self.require()
        first, *others = runs
        snap = store.snapshot(pin=f"{first.group}/0", note=f"before run {first.run_id}")
        self.latest = snap.tree
        for run in runs:
            if run is not first:
                store.pin(f"{run.group}/0", snap.tree, note=f"before run {run.run_id}")
            run.trees.add(snap.tree)
            self.records.record_checkpoint_run(
                run.run_id, run.session_id, run.group, snap.tree, snap.note(), snap.truncated
            )
            run.recorded = True
        if snap.truncated or snap.skipped:
            logger.info(
                "event=checkpoint_left_out workspace=%s runs=%s skipped=%d truncated=%s",
                self.workspace_id,
                ",".join(run.run_id for run in runs),
                len(snap.skipped),
                snap.truncated,
            )

    def _record_step(
        self, run: RunTrees, call_id: str, tool: str, before: str | None, n: int
    ) -> None:
        """Snapshot after a tool call, record it, publish ``run.diff`` if it changed files."""
        store = self.require()
        run_id, session_id = run.run_id, run.session_id
        snap = store.snapshot(pin=f"{run.group}/{n}", note=f"after {tool} call {call_id}")
        self.latest = snap.tree
        run.trees.add(snap.tree)
        if before is None:  # nothing recorded before it: its changes have no base
            return
        if before not in run.trees:  # another run's tree: keep it as long as this run's
            store.pin(f"{run.group}/{n}b", before, note=f"before {tool} call {call_id}")
            run.trees.add(before)
        if not run.recorded:  # the run's first snapshot failed: this call's before stands in
            self.records.record_checkpoint_run(
                run_id, session_id, run.group, before, snap.note(), snap.truncated
            )
            run.recorded = True
        paths = self.visible(store.changed_paths(before, snap.tree))
        self.records.record_checkpoint_step(
            run_id, session_id, call_id, tool, before, snap.tree, paths, snap.note(), snap.truncated
        )
        if not paths:
            return
        files = [s.to_json() for s in store.stat(before, snap.tree, paths)]
        self.hub.publish(
            EventType.RUN_DIFF,
            session_id,
            {
                "run_id": run_id,
                "tool_call_id": call_id,
                "tool": tool,
                "files": files,
                "note": snap.note(),
            },
        )

    def _barrier(self) -> str | None:
        """A job that returns the latest tree once every job before it is done."""
        return self.latest

    def _prune(self) -> None:
        """Retention (see the module docstring).  The latest recorded tree is
        pinned first, as ``latest/tree``, and kept: it is what the next
        restore compares the workspace with, whatever run recorded it."""
        store = self.require()
        if self.latest is not None:
            try:
                store.pin(LATEST_PIN, self.latest, note="the tree crushd recorded last")
            except CheckpointError as exc:  # its objects are gone: record the workspace anew
                logger.warning(
                    "event=checkpoint_latest_lost workspace=%s error=%r", self.workspace_id, exc
                )
                snap = store.snapshot(pin=LATEST_PIN, note="the tree crushd recorded last")
                self.latest = snap.tree
        # The store keeps its newest group, which is the pin just made (pins
        # are dated to the second): the newest run's is kept by name.
        newest = self.records.newest_checkpoint_group()
        pruned = store.prune(protect={LATEST_GROUP, *([newest] if newest else [])})
        groups = {ref.rpartition("/")[0] for ref in pruned.removed}
        if groups:
            self.records.expire_checkpoint_groups(groups)
        self._last_prune = self._clock()
        self.size = pruned.bytes_after
        logger.info(
            "event=checkpoint_retention workspace=%s groups_removed=%d bytes=%d",
            self.workspace_id,
            len(groups),
            pruned.bytes_after,
        )

    def prune_now(self) -> None:
        """Apply retention now, on the worker; blocks until it is done."""
        self.call(self._prune)

    # -- reading ---------------------------------------------------------------

    def visible(self, paths: Iterable[str]) -> list[str]:
        """``paths`` without those on crushd's hidden list (nor below them)."""
        return [p for p in paths if not any(p == h or p.startswith(h + "/") for h in self.hidden)]

    def diff(
        self, run_id: str, tool_call_id: str | None = None, *, stat: bool = False
    ) -> str | dict[str, Any]:
        """What a run (or one of its tool calls) changed: the unified diff,
        or with ``stat`` ``{"run_id", "tool_call_id", "files", "note"}``.

        A run without a checkpoint (queued, or one that streamed nothing
        and called no tool) changed nothing recorded: empty; for one that
        started, what the worker still has to do is waited for first (its
        first snapshot may be under way).  NotFound for an unknown
        run or tool call, CheckpointExpired once retention dropped its trees.
        """
        store = self.require()
        run = self.records.get_run(run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        record = self.records.checkpoint_run(run_id)
        if record is None and run["status"] != "queued":
            # Its first snapshot may still be the worker's: wait for what it has.
            with contextlib.suppress(CheckpointClosed):
                self.call(self._barrier)
            record = self.records.checkpoint_run(run_id)
        if record is None:  # it recorded nothing: queued, no delta nor tool call, checkpoints off
            if tool_call_id is not None:
                raise NotFound(f"run {run_id} recorded no tool call {tool_call_id}")
            return _diff_answer(run_id, tool_call_id, [], "", stat)
        if record["expired"]:
            raise CheckpointExpired(f"the checkpoints of run {run_id} were pruned")
        steps = self.records.checkpoint_steps(run_id=run_id)
        if tool_call_id is not None:
            step = next((s for s in steps if s["tool_call_id"] == tool_call_id), None)
            if step is None:
                raise NotFound(f"run {run_id} recorded no tool call {tool_call_id}")
            before, after, paths = step["before_tree"], step["after_tree"], step["paths"]
        else:
            before, after = record["before_tree"], record["after_tree"]
            paths = sorted({p for s in steps for p in s["paths"]})
        paths = self.visible(paths)
        if not paths:
            return _diff_answer(run_id, tool_call_id, [], record["note"], stat)
        if stat:
            files = [s.to_json() for s in store.stat(before, after, paths)]
            return _diff_answer(run_id, tool_call_id, files, record["note"], stat)
        return store.diff(before, after, paths)


def _diff_answer(
    run_id: str, tool_call_id: str | None, files: list[dict[str, Any]], note: str, stat: bool
) -> str | dict[str, Any]:
    if not stat:
        return ""
    return {"run_id": run_id, "tool_call_id": tool_call_id, "files": files, "note": note}


def _answer(exc: Exception) -> bool:
    """Whether ``exc`` is a refusal its request answers (a revert refused
    for a busy session, files changed since, nothing to revert), not a fault."""
    return isinstance(exc, RequestError) and not isinstance(exc, StorageUnavailable)


def _inside(root: Path, paths: Iterable[str]) -> tuple[str, ...]:
    """The real ``paths`` that lie inside ``root``, relative to it."""
    found = []
    for path in paths:
        real = Path(os.path.realpath(path))
        if real != root and real.is_relative_to(root):
            found.append(real.relative_to(root).as_posix())
    return tuple(sorted(set(found)))


class RunCheckpoint:
    """Records one run's checkpoints: its first snapshot and, around every
    tool call that can change files, the call's trees.  Belongs to the run's
    thread; the work is the workspace's checkpoint worker's.  Without an
    owner, or with one whose checkpoints are off, it records nothing.  Never raises a fault of the
    store into the run: a failed snapshot is logged, and the call's changes
    are recorded with the next one."""

    def __init__(
        self,
        owner: WorkspaceCheckpoints | None,
        run_id: str,
        session_id: str,
        token: CancelToken,
    ) -> None:
        self.owner = owner if owner is not None and owner.enabled else None
        self.run_id = run_id
        self.token = token
        self._trees = RunTrees(run_id, session_id, pin_group(run_id))
        self._calls = 0
        self._begun = False

    def begin(self) -> None:
        """Hand the run's first snapshot to the worker, once; does not wait.
        The run calls it after its first delta (see the module docstring)."""
        if self.owner is None or self._begun:
            return
        self._begun = True
        try:
            self.owner.submit_start(self._trees)
        except CheckpointClosed:  # the workspace is closing: nothing more is recorded
            logger.debug("event=checkpoint_skipped_closed run=%s", self.run_id)

    @contextlib.contextmanager
    def around(self, tool: Tool, call_id: str) -> Iterator[None]:
        """Wrap one tool call: wait for the worker first, snapshot after.

        A call whose tool cannot change files is not touched.  Raises
        Cancelled if the run is cancelled while it waits (the call does not
        run); after a cancel the snapshot is still taken, but not waited for.
        """
        owner = self.owner
        if owner is None or not getattr(tool, "changes_files", False):
            yield
            return
        self.begin()
        before = self._wait(self._submit(owner._barrier), READY_WAIT, "ready")
        if before is None:
            before = owner.latest
        self._calls += 1
        n = self._calls
        try:
            yield
        finally:
            trees = self._trees
            future = self._submit(lambda: owner._record_step(trees, call_id, tool.name, before, n))
            if not self.token.cancelled:
                with contextlib.suppress(Cancelled):
                    self._wait(future, STEP_WAIT, "step")

    def _submit(self, work: Callable[[], T]) -> Future[T] | None:
        try:
            return self.owner.submit(work)
        except CheckpointClosed:  # the workspace is closing: nothing more is recorded
            logger.debug("event=checkpoint_skipped_closed run=%s", self.run_id)
            return None

    def _wait(self, future: Future[T] | None, timeout: float, what: str) -> T | None:
        """The job's result (None if it failed or took too long); raises
        Cancelled when the run is cancelled first."""
        if future is None:
            return None
        done = threading.Event()
        future.add_done_callback(lambda f: done.set())
        handle = self.token.on_cancel(done.set)
        try:
            if not done.wait(timeout):
                logger.warning(
                    "event=checkpoint_wait_slow run=%s what=%s seconds=%s",
                    self.run_id,
                    what,
                    timeout,
                )
                return None
        finally:
            self.token.remove_callback(handle)
        self.token.raise_if_cancelled()
        try:
            return future.result(0)
        except (CheckpointError, StorageUnavailable) as exc:
            logger.warning(
                "event=checkpoint_failed run=%s what=%s error=%r", self.run_id, what, exc
            )
            return None
