"""The workspace runtime: prompt queue, executor, cancellation and shutdown.

A run belongs to its workspace, not to the HTTP request that submitted it.
The workspace accepts a prompt only while it is open, writes it as
``queued`` before answering, and — however it later closes — brings every
accepted run to a terminal record (or, on a server stop, leaves the queued
ones on disk for the next start).  :meth:`Workspace.close` is the shutdown
order of the contract, written out step by step.

Locks, and the only ways they nest (a thread holding one takes no lock
but those named under it):

1. ``MessageWriter._output_lock`` (:mod:`crushd.writer`) — the output of one
   streaming message.  Taken holding no other lock, but for a try under
   that message's ``_parts_lock`` that never waits.  Its events are
   published and its parts written under it, so it is held across 2 and 3
   and across the blinker receivers ``publish`` calls, which take only
   leaves (``Metrics._started_lock``) and must never call a writer.
2. ``EventHub._events_lock`` (:mod:`crushd.events`) — numbering, buffer,
   subscribers.  Taken holding nothing or 1; held while ``reserve`` writes
   the store (so across 3), never while ``on_event`` runs.
3. ``SqliteStore._connection_lock`` (:mod:`crushd.sqlite`) — the one SQLite
   connection.  Taken holding nothing, 1 or 2; while it is held only the
   leaf inside the event ``on_change`` sets is taken.

``Workspace._runs_lock`` — the closing flag and where each run is: queued,
being announced (``_announced`` is a condition on it), active.  Taken
holding no other lock; while it is held only a run token's lock
(:class:`~crushd.cancel.CancelToken`) and the latch's are taken, when it
dispatches a run or a cancel counts one up.  ``Server._register_lock``
(:mod:`crushd.server`), held while a registration opens a workspace, comes
before all of these.

Leaves, with nothing taken while they are held: those two;
``Workspace._finished``; ``MessageWriter._parts_lock``, one message's parts
in memory (but for the try above); ``PermissionBroker._pending_lock``;
``Server._workspaces_lock``; and three that are never taken holding any
other lock either, since their owners call back (launch runs, queue them,
write records) only after they let go: ``StartGate._held_lock``
(:mod:`crushd.gate`), ``AcceptBatcher._batch_lock`` (:mod:`crushd.accepts`)
and ``StorageKeeper._owed_lock`` (:mod:`crushd.keeper`).

The workspace lock is held for decisions only, never across a database
call or a thread start: the runs finishing and starting take it too, and
a hundred prompts at once queued behind whichever holder the GIL had
paused.  Events are published, tokens cancelled and terminal records
written after it is released, so a blinker receiver (which runs inside
``publish``) may call back into the workspace or the server without
deadlocking.

Prompts are stored in shared batches (:mod:`crushd.accepts`), and runs wait
to be started while prompts are being accepted (:mod:`crushd.gate`: one
gate for the process, built by the server and passed to each workspace).

Storage faults.  While the database refuses writes (see :mod:`crushd.sqlite`)
prompts get 503 ``storage_unavailable`` at once and no queued run starts.
Records that could not be written within a run's cleanup deadline — a run's
closing records, a queued run's cancellation — are *owed*: the run stays
active (its session busy, the latch counted up) and the storage keeper
(:mod:`crushd.keeper`, one thread per workspace) writes them with backoff
as soon as the database accepts writes again, then starts the queued runs.
A close waits for them within its shutdown timeout, like for any other run.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crushd.accepts import AcceptBatcher, AcceptsClosed
from crushd.cancel import CancelToken, CountdownLatch
from crushd.checkpointing import WorkspaceCheckpoints
from crushd.common import TERMINAL_STATUSES, new_id, text_of
from crushd.config import Config
from crushd.errors import (
    InvalidRequest,
    NotFound,
    RunIdConflict,
    SessionBusy,
    StorageUnavailable,
    WorkspaceClosing,
)
from crushd.events import Event, EventHub, EventType
from crushd.gate import StartGate
from crushd.keeper import KEEPER_BUDGET, Owed, StorageKeeper
from crushd.mcp import McpLoop, WorkspaceMcp
from crushd.permissions import PermissionBroker
from crushd.providers.catalog import ModelCatalog
from crushd.runs import Run, RunEnv
from crushd.sealing import CANCELED_MESSAGE, Outcome, seal_run_messages
from crushd.signals import Signals, send
from crushd.store import Prompt, WorkspaceStore
from crushd.tools.base import Tool
from crushd.tools.sandbox import Sandbox

logger = logging.getLogger(__name__)

SEQ_SETTING = "event_seq_reserved"

#: Seconds step 5 of the close waits for the threads of runs still stuck
#: after the shutdown timeout, before it logs them and closes the database.
JOIN_TIMEOUT = 1.0


def close_budget(config: Config, drain_timeout: float, shutdown_timeout: float) -> float:
    """The longest a whole close may take: what a second closer waits for."""
    steps = drain_timeout + shutdown_timeout + 2 * config.cleanup_timeout
    return steps + KEEPER_BUDGET + JOIN_TIMEOUT + 10


def title_from_prompt(prompt: str, limit: int = 80) -> str:
    first = next((line.strip() for line in prompt.splitlines() if line.strip()), "")
    if len(first) > limit:
        first = first[: limit - 1].rstrip() + "…"
    return first or "New session"


@dataclass
class ActiveRun:
    """A run handed to the executor: running, or about to start."""

    run_id: str
    session_id: str
    model: str  # the configured model it runs with, as stored at accept
    token: CancelToken
    user_cancelled: bool = False
    run: Run | None = None
    started: threading.Event = field(default_factory=threading.Event)
    future: Future[None] | None = None  # set by _launch
    thread: str = ""  # the executor thread running it, once it runs


#: What the store gives for one accepted prompt: ``(run, new session or
#: None, created)``, or the error that refused it alone.
Accepted = tuple[dict[str, Any], dict[str, Any] | None, bool]


class Workspace:
    """One open workspace.  Public methods are thread-safe; those that block
    say so.  A prompt the batcher took in before a close closed it is stored
    and queued before that close looks at the queues (it waits for the
    batch being written), so a prompt is never accepted and then dropped.

    ``gate`` is the process's start gate (the server passes its own); a
    workspace built alone gets a fresh one.  ``clock`` (monotonic seconds)
    times the coalescing of streamed writes and the MCP servers' retries.
    Build, then :meth:`start`; :meth:`close` undoes it.
    """

    def __init__(
        self,
        record: dict[str, Any],
        data_dir: Path,
        config: Config,
        models: ModelCatalog,
        tools: dict[str, Tool],
        signals: Signals,
        clock: Callable[[], float] = time.monotonic,
        mcp_loop: McpLoop | None = None,
        sandbox: Sandbox | None = None,
        hidden: tuple[str, ...] = (),
        tool_env: dict[str, str] | None = None,
        gate: StartGate | None = None,
    ) -> None:
        self.id: str = record["id"]
        self.path = Path(record["path"])
        self.yolo: bool = record["yolo"]
        self.created_at: str = record["created_at"]
        self.config = config
        self.models = models
        self.sandbox = sandbox  # how bash runs here; None: unsandboxed
        self._tools = tools
        self._signals = signals
        directory = data_dir / "workspaces" / self.id
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.store = WorkspaceStore(directory / "workspace.db", self.id)
        first_seq = int(self.store.get_setting(SEQ_SETTING, "0") or 0) + 1
        self.hub = EventHub(
            self.id,
            first_seq,
            config.event_buffer,
            reserve=lambda n: self.store.set_setting(SEQ_SETTING, str(n)),
            on_event=self._event_published,
        )
        self.permissions = PermissionBroker(self.hub, config.permission_timeout)
        # The MCP servers publish from the loop thread; the hub is thread-safe.
        self.mcp = WorkspaceMcp(
            config.mcp if mcp_loop is not None else {},
            self.path,
            mcp_loop or McpLoop(),
            publish=lambda entry: self.hub.publish(EventType.MCP_STATUS, None, entry),
            workspace_id=self.id,
            sandbox=sandbox,
            clock=clock,
        )
        # Runs dispatched while prompts are being accepted wait here.
        self._gate = gate if gate is not None else StartGate()
        # Guards the flags, queues and maps below; first in the lock order.
        self._runs_lock = threading.Lock()
        self._closing = False  # guarded by _runs_lock
        self._keep_queued = False  # guarded by _runs_lock; True on a server stop
        # Session id -> its queued runs, oldest first: run id -> the model
        # it was accepted with.  Guarded by _runs_lock.
        self._queues: dict[str, collections.OrderedDict[str, str]] = {}
        self._active: dict[str, ActiveRun] = {}  # session id -> run; guarded by _runs_lock
        # Runs stored and queued whose ``run.queued`` is not published yet;
        # nothing starts or cancels them until it is.  Guarded by _runs_lock.
        self._announcing: set[str] = set()
        self._announced = threading.Condition(self._runs_lock)  # notified when it shrinks
        # Sessions a revert or fork holds (hold_session): none of their runs
        # starts until it ends.  Guarded by _runs_lock.
        self._held: set[str] = set()
        # Stores the prompts being accepted in shared transactions and
        # queues the new runs (under _runs_lock) before their submitters return.
        self._accepts: AcceptBatcher[Prompt, Accepted] = AcceptBatcher(
            lambda prompts: self.store.accept_runs(prompts, self.config.max_queue),
            self._queue_stored,
        )
        self._token = CancelToken(name=f"workspace:{self.id}")
        self._latch = CountdownLatch()
        self._executor = ThreadPoolExecutor(
            max_workers=config.workers, thread_name_prefix=f"crushd-run-{self.id[:8]}"
        )
        self._finished = threading.Condition()  # notified on every run.completed
        self._closed = threading.Event()
        # Writes the records the database refused once it accepts writes
        # again, then starts the queued runs; its thread starts in start().
        self._keeper = StorageKeeper(self.store, self._dispatch_all, self.id)
        self.store.on_change = self._keeper.wake
        # Records each run's file changes (crushd.checkpointing); its worker
        # thread starts in start(), after it repaired the repository.
        self.checkpoints = WorkspaceCheckpoints(
            workspace_id=self.id,
            root=self.path,
            git_dir=directory / "checkpoints.git",
            records=self.store,
            hub=self.hub,
            enabled=config.checkpoints_for(self.path),
            max_file_bytes=config.checkpoint_max_file_bytes,
            max_files=config.checkpoint_max_files,
            keep_days=config.checkpoint_keep_days,
            max_bytes=config.checkpoint_max_bytes,
            hidden=hidden,
            active_runs=self.active_run_count,
            hold_session=self.hold_session,
            close_timeout=config.cleanup_timeout,
        )
        self._env = RunEnv(
            workspace_id=self.id,
            root=self.path,
            yolo=self.yolo,
            store=self.store,
            hub=self.hub,
            models=models,
            tools=tools,
            permissions=self.permissions,
            max_steps=config.max_steps,
            retry=config.retry_policy(),
            cleanup_timeout=config.cleanup_timeout,
            bash_timeout=config.bash_timeout,
            sandbox=sandbox,
            hidden=hidden,
            tool_env=tool_env,
            max_message_bytes=config.max_message_bytes,
            allowed_tools=frozenset(config.allowed_tools),
            clock=clock,
            extra_tools=self.mcp.tools,
            user_instructions=config.user_instructions,
            max_instructions_bytes=config.max_instructions_bytes,
            auto_compact=config.auto_compact,
            checkpoints=self.checkpoints,
        )

    # -- state ---------------------------------------------------------------

    @property
    def closing(self) -> bool:
        with self._runs_lock:
            return self._closing

    def to_dict(self) -> dict[str, Any]:
        with self._runs_lock:
            closing = self._closing
        active = queued = 0
        if not self.store.closed:
            active = self.store.count_runs("running")
            queued = self.store.count_runs("queued")
        return {
            "id": self.id,
            "path": str(self.path),
            "yolo": self.yolo,
            "sandbox": self.sandbox.mode if self.sandbox else "off",
            "created_at": self.created_at,
            "closing": closing,
            "active_runs": active,
            "queued_runs": queued,
            "open": True,
            "closed_reason": None,
        }

    def active_run_count(self) -> int:
        """Read without the lock (``len`` of a dict is atomic): the health
        check must answer while a prompt's insert waits on the database."""
        return len(self._active)

    @property
    def storage_available(self) -> bool:
        """Whether the database accepted the last write; from memory."""
        return self.store.available

    def queued_run_count(self) -> int:
        """Runs waiting behind their session's active run (from memory)."""
        with self._runs_lock:
            return sum(len(queue) for queue in self._queues.values())

    # -- startup -------------------------------------------------------------

    def start(self) -> None:
        """Finish what a previous process left and start dispatching: runs
        found ``running`` become ``interrupted`` (``failed`` if their records
        cannot be sealed); ``queued`` runs are queued again in their order.
        Call once, after construction; blocks while it recovers; the MCP
        servers start in the background."""
        self._keeper.start()
        self.mcp.start()
        self.checkpoints.start()  # a revert a crash cut short is finished first
        for run in self.store.list_runs(status="running", limit=1_000_000, oldest_first=True):
            try:
                self._interrupt(run)
            except Exception as exc:  # one bad record must not stop the daemon
                logger.exception(
                    "event=run_recovery_failed workspace=%s run=%s error=%r",
                    self.id,
                    run["id"],
                    exc,
                )
                self._fail_unsealed(run, exc)
        queued = self.store.list_runs(status="queued", limit=1_000_000, oldest_first=True)
        with self._runs_lock:
            for run in queued:
                queue = self._queues.setdefault(run["session_id"], collections.OrderedDict())
                # A run queued by a version before runs had a model gets the
                # default here, once; its start stores it.
                queue[run["id"]] = run["model"] or self.models.default
        self._dispatch_all()
        if queued:
            logger.info("event=queue_restored workspace=%s runs=%d", self.id, len(queued))

    def _interrupt(self, run: dict[str, Any]) -> None:
        """Seal a run a previous process left ``running`` and make it
        ``interrupted``; publishes ``run.completed``."""
        outcome = Outcome.interrupted()

        def interrupted() -> dict[str, Any] | None:
            last = seal_run_messages(self._env, run["id"], run["session_id"], outcome)
            return self.store.finish_run(
                run["id"],
                outcome.status,
                error=outcome.error,
                text=text_of(last["parts"]) if last else "",
                message_id=last["id"] if last else None,
            )

        if self.hub.publish_stored(EventType.RUN_COMPLETED, interrupted) is not None:
            logger.info("event=run_interrupted workspace=%s run=%s", self.id, run["id"])

    def _fail_unsealed(self, run: dict[str, Any], error: Exception) -> None:
        """A run left ``running`` whose records could not be sealed: it
        becomes ``failed`` anyway, so a record no code can handle never
        makes every start crash (it once did, for good); the start goes on."""
        try:
            self.hub.publish_stored(
                EventType.RUN_COMPLETED,
                lambda: self.store.finish_run(
                    run["id"],
                    "failed",
                    error=f"recovery could not seal this run's records: {error!r}",
                ),
            )
        except Exception:  # the next start tries again; this one goes on
            logger.exception(
                "event=run_recovery_unfinished workspace=%s run=%s", self.id, run["id"]
            )

    # -- prompts -------------------------------------------------------------

    def submit(
        self,
        prompt: str,
        session_id: str | None = None,
        run_id: str | None = None,
        model: str | None = None,
        kind: str = "prompt",
    ) -> tuple[dict[str, Any], bool]:
        """Accept a prompt: the run is stored ``queued`` before this returns.

        ``kind="compact"`` accepts a compaction of ``session_id`` instead
        (``prompt`` empty), queued in the session's FIFO like a prompt.

        ``model`` names a configured model for this run; without it the
        session keeps the model of its previous run, else the default.
        Returns ``(run, created)``; ``created`` is False for an idempotent
        resubmission of an existing ``run_id``.  Never blocks on the model.
        Raises InvalidRequest for an unknown model, before storing anything.
        """
        with self._gate.accept():
            return self._submit(prompt, session_id, run_id, model, kind)

    def _submit(
        self, prompt: str, session_id: str | None, run_id: str | None, model: str | None, kind: str
    ) -> tuple[dict[str, Any], bool]:
        if model is not None and self.models.spec(model) is None:
            raise InvalidRequest(
                f"unknown model {model!r}; configured models: {', '.join(self.models.names)}"
            )
        if not self.store.available:
            raise StorageUnavailable(
                f"workspace {self.id}: the database refuses writes ({self.store.fault}); "
                "prompts are accepted again once it recovers"
            )
        # The run's model is decided here, once, and stored with it.
        model = model if model is not None else self._session_model(session_id)
        run, session, created = self._store_prompt(
            Prompt(run_id or new_id(), prompt, session_id, title_from_prompt(prompt), model, kind)
        )
        if not created:  # the run_id exists: an idempotent resubmission, or a conflict
            return self._replay(run, prompt, session_id)
        session_id = run["session_id"]
        try:
            if session is not None:
                self.hub.publish(EventType.SESSION_CREATED, session_id, session)
            self.hub.publish(EventType.RUN_QUEUED, session_id, run)
        finally:
            with self._runs_lock:
                self._announcing.discard(run["id"])
                self._announced.notify_all()
                starting = self._dispatch(session_id)
            self._launch(starting)
        logger.info(
            "event=run_accepted workspace=%s session=%s run=%s kind=%s",
            self.id,
            session_id,
            run["id"],
            kind,
        )
        return run, True

    def _session_model(self, session_id: str | None) -> str:
        """The model of a prompt that names none: the session's previous
        run's, if it is still configured, else the default."""
        previous = self.store.last_run_model(session_id) if session_id else None
        return previous if previous and self.models.spec(previous) else self.models.default

    def _store_prompt(self, prompt: Prompt) -> Accepted:
        """Store ``prompt`` as a queued run, in one transaction with the
        other prompts being accepted (:mod:`crushd.accepts`), and queue it.
        Raises WorkspaceClosing once a close began, or what refused it.

        The run is announcing from before its insert (a cancel that reads
        the new row waits until it is queued and announced) and is queued
        in insert order before this returns.
        """
        with self._runs_lock:
            self._announcing.add(prompt.run_id)
        try:
            return self._accepts.accept(prompt)
        except AcceptsClosed:
            with self._runs_lock:
                self._announcing.discard(prompt.run_id)
                self._announced.notify_all()
            raise WorkspaceClosing(f"workspace {self.id} is closing") from None

    def _queue_stored(self, prompts: list[Prompt], results: list[Accepted | Exception]) -> None:
        """The batcher's hand-back, before the submitters wake: each new run
        joins its session's queue, in insert order; the others (refused, or
        an id that existed) are not announcing any more."""
        with self._runs_lock:
            for prompt, result in zip(prompts, results, strict=True):
                if isinstance(result, Exception) or not result[2]:
                    self._announcing.discard(prompt.run_id)
                else:
                    queue = self._queues.setdefault(
                        result[0]["session_id"], collections.OrderedDict()
                    )
                    queue[prompt.run_id] = result[0]["model"]
            self._announced.notify_all()

    def compact(self, session_id: str, model: str | None = None) -> dict[str, Any]:
        """Accept a compaction of the session: a run of kind ``compact``,
        queued in its FIFO like a prompt.  NotFound for an unknown session,
        InvalidRequest for an unknown model; never blocks on the model."""
        self.get_session(session_id)
        run, _ = self.submit("", session_id, model=model, kind="compact")
        return run

    @staticmethod
    def _replay(
        existing: dict[str, Any], prompt: str, session_id: str | None
    ) -> tuple[dict[str, Any], bool]:
        """A prompt whose ``run_id`` the store found taken (in the accept's
        own transaction, the one place that checks): the same prompt gets
        the existing run, another RunIdConflict."""
        if existing["prompt"] != prompt or (session_id and existing["session_id"] != session_id):
            raise RunIdConflict(f"run {existing['id']} exists with a different prompt")
        return existing, False

    def _dispatch(self, session_id: str) -> ActiveRun | None:
        """Take the session's next queued run if it has none active; the
        caller hands it to :meth:`_launch` once it let go of the lock.
        Holds _runs_lock.

        A run not announced yet waits: its submitter dispatches it after
        publishing ``run.queued``, so ``run.started`` never comes first.
        Nothing starts while the database refuses writes; the storage
        keeper dispatches every session once it accepts them again.
        """
        if self._closing or session_id in self._active or not self.store.available:
            return None
        if session_id in self._held:
            return None
        queue = self._queues.get(session_id)
        if not queue:
            self._queues.pop(session_id, None)
            return None
        if next(iter(queue)) in self._announcing:
            return None
        run_id, model = queue.popitem(last=False)
        active = ActiveRun(run_id, session_id, model, self._token.child(f"run:{run_id}"))
        self._active[session_id] = active
        self._latch.count_up()
        return active

    def _launch(self, *runs: ActiveRun | None) -> None:
        """Hand dispatched runs to the executor once no prompt is being
        accepted (the start gate).  Never under _runs_lock: the executor may
        start a thread, and that waits for the new thread to get the GIL,
        which with a hundred runs streaming takes milliseconds that every
        other taker of the lock would wait too."""
        self._gate.hold(self._launch_held, [active for active in runs if active is not None])

    def _launch_held(self, runs: list[ActiveRun]) -> None:
        """The start gate hands runs back here: a lone run on the thread
        of an accept whose 202 is not sent yet, several on the gate's timer
        or a closing thread.  Several are started from one executor task, so
        that the thread handing them back starts one thread, not one a run."""
        if len(runs) == 1:
            self._submit_runs(runs)
            return
        try:
            self._executor.submit(self._submit_runs, runs)
        except RuntimeError:  # the executor is shut down
            self._submit_runs(runs)

    def _submit_runs(self, runs: list[ActiveRun]) -> None:
        """Dispatched runs are counted in the latch, so a closing workspace
        waits for them before it shuts the executor down; one that still
        comes too late (after a close gave up waiting) runs its cancelled
        path here, on the caller's thread."""
        for active in runs:
            try:
                active.future = self._executor.submit(self._execute, active)
            except RuntimeError:  # the executor is shut down: the token is cancelled
                self._execute(active)

    def _execute(self, active: ActiveRun) -> None:
        """Executor entry point: the thread boundary of a run."""
        owed = False
        active.thread = threading.current_thread().name
        try:
            if active.token.cancelled:
                with self._runs_lock:
                    keep = self._keep_queued and not active.user_cancelled
                if not keep:  # never started: a cancelled record, no messages
                    self._cancel_queued(active.run_id)
                return
            try:
                start = self.store.start_run(
                    active.run_id,
                    model=active.model,
                    message_ids=self.models.message_ids(active.model),
                )
            except StorageUnavailable:
                self._requeue(active)
                return
            if start is None:  # cancelled while it waited for a worker
                return
            active.run = Run(self._env, start, active.token)
            active.started.set()
            active.run.execute()
            if active.run.owed is not None:
                owed = True
                self._keeper.owe(
                    Owed(active.run_id, active.run.settle, lambda: self._release(active))
                )
        except Exception:
            logger.exception("event=run_thread_failed workspace=%s run=%s", self.id, active.run_id)
        finally:
            if not owed:
                self._release(active)

    def _release(self, active: ActiveRun) -> None:
        """The run is over and its records are written: free its session."""
        active.token.release()
        with self._runs_lock:
            if self._active.get(active.session_id) is active:
                del self._active[active.session_id]
            starting = self._dispatch(active.session_id)
        self._launch(starting)
        self._latch.count_down()

    def _requeue(self, active: ActiveRun) -> None:
        """A run whose start the database refused goes back to the head of
        its session's queue (it is still ``queued`` on disk)."""
        with self._runs_lock:
            closing, keep = self._closing, self._keep_queued and not active.user_cancelled
            if not closing and not active.token.cancelled:
                queue = self._queues.setdefault(active.session_id, collections.OrderedDict())
                queue[active.run_id] = active.model
                queue.move_to_end(active.run_id, last=False)
        logger.info("event=run_start_deferred workspace=%s run=%s", self.id, active.run_id)
        if (closing or active.token.cancelled) and not keep:
            self._cancel_queued(active.run_id)

    def _dispatch_all(self) -> None:
        """Start the next queued run of every session that can start one
        (at startup, and whenever the storage keeper finds the database
        accepting writes)."""
        with self._runs_lock:
            starting = [self._dispatch(session_id) for session_id in list(self._queues)]
        self._launch(*starting)

    def _await_announced(self, run_ids: Callable[[], Iterable[str]]) -> None:
        """Wait until ``run.queued`` is out for every id ``run_ids()`` gives.

        Holds _runs_lock (the wait releases it, so ``run_ids`` is asked again on
        every wake-up).  Publishing takes microseconds; the bound only keeps
        a broken receiver from hanging a cancel or a close.
        """
        if not self._announced.wait_for(lambda: self._announcing.isdisjoint(run_ids()), 5.0):
            logger.warning("event=announce_slow workspace=%s", self.id)

    def _cancel_queued(self, run_id: str) -> dict[str, Any] | None:
        """Make a run that never started ``cancelled`` and announce it.
        Writes and publishes: never call it holding _runs_lock.  If the database
        refuses the write, the cancellation is owed (and counted on the latch)."""
        try:
            return self._write_cancelled(run_id)
        except StorageUnavailable as exc:
            logger.warning(
                "event=run_cancel_owed workspace=%s run=%s error=%r", self.id, run_id, exc.message
            )
        self._latch.count_up()
        self._keeper.owe(
            Owed(run_id, lambda budget: self._write_cancelled(run_id), self._latch.count_down)
        )
        return None

    def _write_cancelled(self, run_id: str) -> dict[str, Any] | None:
        return self.hub.publish_stored(
            EventType.RUN_COMPLETED,
            lambda: self.store.finish_run(
                run_id, "cancelled", only_from="queued", error=CANCELED_MESSAGE
            ),
        )

    def _event_published(self, event: Event) -> None:
        """Every event of the workspace, once the hub let go of its lock:
        the app's signal first (metrics count a run before its waiters
        wake), then a ``run.completed`` wakes :meth:`wait_run`."""
        send(self._signals.event_published, self.id, event=event)
        if event.type == EventType.RUN_COMPLETED:
            run = event.data["payload"]
            logger.info(
                "event=run_completed workspace=%s run=%s status=%s",
                self.id,
                run["id"],
                run["status"],
            )
            with self._finished:
                self._finished.notify_all()

    @contextlib.contextmanager
    def hold_session(self, session_id: str) -> Iterator[None]:
        """Keep the session's runs from starting while the block runs (a
        revert changing its files); raises SessionBusy at once if it has a
        queued or running run, or another hold.  Prompts are still accepted
        meanwhile: they queue, and start when the hold ends."""
        with self._runs_lock:
            if self._closing:
                raise WorkspaceClosing(f"workspace {self.id} is closing")
            busy = (
                session_id in self._active
                or session_id in self._held
                or bool(self._queues.get(session_id))
            )
            if busy:
                raise SessionBusy(
                    f"session {session_id} has a queued or running run (or is being "
                    "reverted); cancel it or wait until it ends"
                )
            self._held.add(session_id)
        try:
            yield
        finally:
            with self._runs_lock:
                self._held.discard(session_id)
                starting = self._dispatch(session_id)
            self._launch(starting)

    # -- sessions API ----------------------------------------------------------
    #
    # Each change is written, then announced; the views only parse and shape.

    def create_session(self, title: str) -> dict[str, Any]:
        """Create an empty session; publishes ``session.created``."""
        return self.hub.publish_stored(
            EventType.SESSION_CREATED, lambda: self.store.create_session(title)
        )

    def get_session(self, session_id: str) -> dict[str, Any]:
        session = self.store.get_session(session_id)
        if session is None:
            raise NotFound(f"session {session_id} not found")
        return session

    def list_sessions(self) -> list[dict[str, Any]]:
        return self.store.list_sessions()

    def update_session(self, session_id: str, title: str) -> dict[str, Any]:
        """Rename a session; publishes ``session.updated``."""
        session = self.hub.publish_stored(
            EventType.SESSION_UPDATED, lambda: self.store.update_session(session_id, title)
        )
        if session is None:
            raise NotFound(f"session {session_id} not found")
        return session

    def delete_session(self, session_id: str) -> None:
        """Delete a session with no queued or running run (else SessionBusy);
        publishes ``session.deleted``."""

        def delete() -> dict[str, Any] | None:
            return {"id": session_id} if self.store.delete_session(session_id) else None

        if self.hub.publish_stored(EventType.SESSION_DELETED, delete) is None:
            raise NotFound(f"session {session_id} not found")

    def list_messages(self, session_id: str) -> list[dict[str, Any]]:
        self.get_session(session_id)
        return self.store.list_messages(session_id)

    # -- runs API ------------------------------------------------------------

    def get_run(self, run_id: str) -> dict[str, Any]:
        run = self.store.get_run(run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        return run

    def wait_run(self, run_id: str, timeout: float) -> dict[str, Any]:
        """Block up to ``timeout`` seconds for the run to end; return it.

        Waiting never holds the run: the caller may vanish at any time.
        """
        deadline = time.monotonic() + timeout
        run = self.get_run(run_id)
        while run["status"] not in TERMINAL_STATUSES:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed.is_set():
                break
            with self._finished:
                self._finished.wait(min(remaining, 1.0))
            if self.store.closed:
                break
            run = self.get_run(run_id)
        return run

    def cancel_run(self, run_id: str) -> tuple[dict[str, Any], bool]:
        """Cancel one run; returns ``(run, changed)``.  A queued run is
        cancelled at once; a running one stops within a second."""
        run = self.get_run(run_id)
        if run["status"] in TERMINAL_STATUSES:
            return run, False
        session_id = run["session_id"]
        with self._runs_lock:
            self._await_announced(lambda: (run_id,))
            queue = self._queues.get(session_id)
            dequeued = queue is not None and run_id in queue
            if dequeued:
                del queue[run_id]
            active = self._active.get(session_id)
            if dequeued or active is None or active.run_id != run_id:
                active = None
            else:
                active.user_cancelled = True
            if dequeued or active is not None:
                self._latch.count_up()  # a close waits for the records written below
        if not dequeued and active is None:  # it ended, or another cancel took it
            return self.get_run(run_id), True
        try:
            if dequeued:
                return self._cancel_queued(run_id) or self.get_run(run_id), True
            active.token.cancel("cancelled by request")
            if not active.started.is_set():  # still waiting for a worker
                self._cancel_queued(run_id)
        finally:
            self._latch.count_down()
        return self.get_run(run_id), True

    def cancel_session(self, session_id: str, queued_only: bool = False) -> list[str]:
        """Cancel the session's queued runs (and its active one unless
        ``queued_only``); return their ids, active first."""
        self.get_session(session_id)
        cancelled: list[str] = []
        with self._runs_lock:
            active = self._active.get(session_id)
            if active is not None and not queued_only:
                active.user_cancelled = True
            else:
                active = None
            self._await_announced(lambda: self._queues.get(session_id, ()))
            queue = self._queues.pop(session_id, collections.OrderedDict())
            self._latch.count_up()  # the close must wait for the records written below
        try:
            if active is not None:
                active.token.cancel("cancelled by request")
                if not active.started.is_set():
                    self._cancel_queued(active.run_id)
                cancelled.append(active.run_id)
            for run_id in queue:
                if self._cancel_queued(run_id) is not None:
                    cancelled.append(run_id)
        finally:
            self._latch.count_down()
        return cancelled

    def list_runs(
        self, session_id: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The workspace's runs, newest first, optionally of one session or status."""
        return self.store.list_runs(session_id=session_id, status=status, limit=limit)

    def queued_runs(self, session_id: str) -> list[dict[str, Any]]:
        self.get_session(session_id)
        return self.store.list_runs(
            session_id=session_id, status="queued", limit=1_000_000, oldest_first=True
        )

    # -- shutdown --------------------------------------------------------------

    def close(
        self,
        *,
        keep_queued: bool = False,
        drain_timeout: float = 0.0,
        skip_drain: threading.Event | None = None,
        shutdown_timeout: float | None = None,
    ) -> bool:
        """Close the workspace in the contract's order.  Blocks; idempotent.

        ``keep_queued`` and ``drain_timeout`` are for a server stop: running
        turns first get ``drain_timeout`` seconds to finish on their own
        (cut short when ``skip_drain`` is set), and queued runs stay queued
        on disk for the next start.

        Returns True once the workspace is closed.  A second caller waits
        for the first (as long as a whole close may take) and gets False if
        that close has not finished by then.
        """
        timeout = self.config.shutdown_timeout if shutdown_timeout is None else shutdown_timeout
        # 1. Refuse new prompts: once the batcher is closed submit() raises
        #    WorkspaceClosing; a prompt it took in before is stored and
        #    queued before the snapshot.
        with self._runs_lock:
            already = self._closing
            self._closing = True
            if not already:
                self._keep_queued = keep_queued
        if already:
            return self._closed.wait(close_budget(self.config, drain_timeout, timeout))
        # Bounded like every store call; past it a batch still being
        # written stays queued on disk, for the next start.
        if not self._accepts.close(timeout):
            logger.warning("event=accept_batch_slow workspace=%s", self.id)
        with self._runs_lock:
            never_started = [rid for q in self._queues.values() for rid in q]
            self._queues.clear()
        started = time.monotonic()
        logger.info(
            "event=workspace_closing workspace=%s active=%d queued=%d keep_queued=%s",
            self.id,
            self._latch.count,
            len(never_started),
            keep_queued,
        )
        self.hub.publish(
            EventType.WORKSPACE_CLOSING, None, {"workspace_id": self.id, "keep_queued": keep_queued}
        )
        # 1b. On a server stop, running turns first get the drain to finish
        #     on their own (a second signal cuts it short).
        if drain_timeout > 0 and self._latch.count:
            self._drain(drain_timeout, skip_drain)
        # 2. Cancel the workspace token; every run token descends from it.
        #    Runs held while prompts are being accepted go to the executor
        #    now, to end through their cancelled path.
        self._token.cancel("workspace closing")
        self._gate.release(self._launch_held)
        # 3. Queued runs that never started become cancelled (not on a server stop),
        #    each once its submitter has announced it.
        if not keep_queued:
            with self._runs_lock:
                self._await_announced(lambda: never_started)
            for run_id in never_started:
                self._cancel_queued(run_id)
        # 4. Wait for every dispatched run to return, bounded.
        if not self._latch.wait(timeout):
            with self._runs_lock:
                stuck = [a.run_id for a in self._active.values()]
            logger.warning(
                "event=workspace_runs_stuck workspace=%s runs=%s timeout=%s",
                self.id,
                ",".join(stuck),
                timeout,
            )
        # 5. Stop the storage keeper (records still owed now are left to the
        #    next start, which seals runs left running), flush what stuck runs
        #    buffered, stop the MCP servers (whole process groups, bounded;
        #    stragglers are killed and logged), let the checkpoint worker
        #    finish the snapshots the runs left it (bounded; the git still
        #    running after it is killed), stop the executor and join its
        #    threads (bounded; what is still alive is logged), end the streams
        #    and close the database — nothing touches it after this.
        self._keeper.stop()
        with self._runs_lock:
            leftovers = list(self._active.values())
        self._flush(leftovers)
        self.mcp.close(self.config.cleanup_timeout)
        self.checkpoints.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._join(leftovers)
        self.hub.close()
        self.store.close()
        self._closed.set()
        with self._finished:
            self._finished.notify_all()
        logger.info(
            "event=workspace_closed workspace=%s seconds=%.3f", self.id, time.monotonic() - started
        )
        return True

    def _join(self, leftovers: list[ActiveRun]) -> None:
        """Give the threads of stuck runs :data:`JOIN_TIMEOUT` more seconds to
        return, then name those still alive.  A thread cannot be killed: a
        stuck one finds its database closed and its writes refused."""
        futures = {a.future: a for a in leftovers if a.future is not None}
        if not futures:
            return
        _, alive = wait_futures(futures, timeout=JOIN_TIMEOUT)
        if alive:
            logger.warning(
                "event=workspace_threads_alive workspace=%s count=%d runs=%s threads=%s",
                self.id,
                len(alive),
                ",".join(futures[f].run_id for f in alive),
                ",".join(futures[f].thread or "-" for f in alive),
            )

    @staticmethod
    def _flush(leftovers: list[ActiveRun]) -> None:
        """Write what the runs still stuck after the wait buffered."""
        for active in leftovers:
            if active.run is not None and active.run.writer is not None:
                try:
                    active.run.writer.flush()
                except Exception:  # one stuck run's fault must not stop the close
                    logger.exception("event=flush_failed run=%s", active.run_id)

    def _drain(self, drain_timeout: float, skip: threading.Event | None) -> None:
        deadline = time.monotonic() + drain_timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if self._latch.wait(min(remaining, 0.1)):
                return
            if skip is not None and skip.is_set():
                logger.info("event=drain_skipped workspace=%s", self.id)
                return
