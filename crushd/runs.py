"""One agent turn: user message, model steps, tools, and the final records.

A :class:`Run` executes on a workspace executor thread.  Whatever ends it
(the model finishing, a cancel, a provider error, a bug) it leaves the same
records behind, written under a *detached* cleanup deadline so a cancel stops
the model but not the bookkeeping:

* every assistant message ends with a ``finish`` part;
* every ``tool_call`` part is ``finished`` with valid JSON ``input``;
* every tool call has a ``tool_result``;
* the run has its terminal status and ``finished_at``;
* then, and only then, ``run.completed`` is published.

A write the database refuses (:class:`~crushd.errors.StorageUnavailable`) is
retried with backoff — on the run's token while the turn runs, within the
cleanup deadline either way.  A turn whose writes stay refused ends
``failed``; closing records that still cannot be written are *owed*:
:attr:`Run.owed` holds them and the workspace writes them with
:meth:`Run.settle` once the database accepts writes again.

The run owns the parts it works with: the streaming message of each step
(:class:`~crushd.writer.MessageWriter`), the tool calls and their
permissions (:class:`~crushd.toolcalls.ToolCalls`), the compaction
(:class:`~crushd.context.Compactor`) and its end
(:class:`~crushd.closing.RunClosing`: the closing records and what is
owed); the closing parts are :mod:`crushd.sealing`'s.  A Run takes no lock
of its own.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from crushd.cancel import Cancelled, CancelToken, Deadline
from crushd.checkpointing import RunCheckpoint, WorkspaceCheckpoints
from crushd.closing import STORE_RETRY_FIRST, STORE_RETRY_MAX, RunClosing
from crushd.config import DEFAULT_MAX_MESSAGE_BYTES
from crushd.context import (
    DEFAULT_MAX_INSTRUCTIONS_BYTES,
    Compactor,
    compaction_threshold,
    read_instructions,
    summary_message,
)
from crushd.errors import StorageUnavailable
from crushd.events import EventHub, EventType
from crushd.providers.base import (
    EventTooLarge,
    Provider,
    ProviderError,
    ReasoningDelta,
    Retrying,
    StepFinish,
    StepRequest,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    ToolSpec,
    Usage,
)
from crushd.providers.catalog import ModelCatalog, ModelSpec
from crushd.providers.retry import NO_RETRIES, RetryPolicy, stream_with_retries
from crushd.sealing import Outcome, tool_result_part
from crushd.store import RunStart, WorkspaceStore
from crushd.toolcalls import StepCalls, ToolCalls
from crushd.tools.base import Tool, ToolContext
from crushd.tools.sandbox import Sandbox
from crushd.writer import MessageWriter

if TYPE_CHECKING:
    from crushd.permissions import PermissionBroker

logger = logging.getLogger(__name__)

STORAGE_TITLE = "Storage unavailable"

T = TypeVar("T")

SYSTEM_PROMPT = """\
You are crushd, an AI coding agent working in the project directory {root}.
You help with software engineering tasks: reading, writing and changing code,
running commands and explaining what you find. Use the tools to inspect the
project before you change it; paths are relative to the project directory.
Tools available: {tools}.
Some tools ask the user for permission first; if a call is denied, stop and
explain what you wanted to do. Be concise, and say what you changed.
"""


@dataclass
class RunEnv:
    """Everything a run needs from its workspace: plain values, no Flask."""

    workspace_id: str
    root: Path
    yolo: bool
    store: WorkspaceStore
    hub: EventHub
    models: ModelCatalog
    tools: dict[str, Tool]
    permissions: PermissionBroker
    max_steps: int = 50
    retry: RetryPolicy = NO_RETRIES
    cleanup_timeout: float = 5.0
    bash_timeout: float = 120.0
    sandbox: Sandbox | None = None  # how bash commands are confined; None: not at all
    hidden: tuple[str, ...] = ()  # real paths no tool may touch (ToolContext.hidden)
    tool_env: dict[str, str] | None = None  # the environment of commands (ToolContext.env)
    # UTF-8 bytes one assistant message may stream (MessageWriter.max_bytes).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    allowed_tools: frozenset[str] = frozenset()
    clock: Callable[[], float] = time.monotonic
    # Tools that come and go (the MCP servers' tools), read once as a run starts.
    extra_tools: Callable[[], Mapping[str, Tool]] = dict
    # Instruction files (crushd.context): the user's own, and the bound on all of them.
    user_instructions: Path | None = None
    max_instructions_bytes: int = DEFAULT_MAX_INSTRUCTIONS_BYTES
    auto_compact: bool = True  # compact a session that outgrows its model's window
    # Records the files each run changes (crushd.checkpointing); None: not at all.
    checkpoints: WorkspaceCheckpoints | None = None


# -- the run ---------------------------------------------------------------


@dataclass
class _Step:
    """One model step: its assistant message, then its tool calls."""

    writer: MessageWriter
    tools: StepCalls = field(default_factory=StepCalls)


class Run:
    """Executes one accepted run.  Not thread-safe: one executor thread owns it;
    only :attr:`writer` is touched from outside (the shutdown flush)."""

    def __init__(self, env: RunEnv, start: RunStart, token: CancelToken) -> None:
        self.env = env
        self.record = start.run  # the run as stored when it started
        self._first_message = start.message
        self.token = token
        self.step: _Step | None = None
        self.provider: Provider | None = None  # the run's model, known once it started
        self.spec: ModelSpec | None = None  # its configuration (prices, context window)
        self.system = ""  # the system prompt of every request, read as the run starts
        self.user_message = start.user_message
        # The session's context and its size as the run started, for the
        # first request; None once used, or once a compaction changed them.
        self._start_context: RunStart | None = start
        # Reported, not stored yet; each with whether its prompt tokens are
        # the session's context (a summary's request does not count).
        self._usage: list[tuple[Usage, bool]] = []
        # The provider's model id and the provider's name, for messages: as
        # the first one recorded them.
        self._model_ids = (start.message["model"], start.message["provider"])
        self.tools: dict[str, Tool] = {**env.extra_tools(), **env.tools}
        context = ToolContext(
            root=env.root,
            token=token,
            bash_timeout=env.bash_timeout,
            sandbox=env.sandbox,
            hidden=env.hidden,
            env=env.tool_env,
        )
        self.checkpoint = RunCheckpoint(env.checkpoints, self.id, self.session_id, token)
        self.tool_calls = ToolCalls(
            self.tools,
            context,
            session_id=self.session_id,
            run_id=self.id,
            yolo=env.yolo,
            allowed_tools=env.allowed_tools,
            permissions=env.permissions,
            store=env.store,
            hub=env.hub,
            model_ids=self._model_ids,
            checkpoint=self.checkpoint,
        )
        self.compactor = Compactor(
            env.store,
            session_id=self.session_id,
            run_id=self.id,
            stream=self._stream_summary,
            stored=self._stored,
            flush=self._flush_step,
            publish=self.publish,
        )

        self.closing = RunClosing(
            env,
            self.id,
            self.session_id,
            kind="summary" if self.compact else "text",
            tool_calls=self.tool_calls,
            write_usage=self._write_usage,
        )

    @property
    def writer(self) -> MessageWriter | None:
        return self.step.writer if self.step else None

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def session_id(self) -> str:
        return self.record["session_id"]

    @property
    def compact(self) -> bool:
        """A run of kind ``compact``: no user message, one summary."""
        return self.record["kind"] == "compact"

    def publish(self, type: str, payload: dict[str, Any]) -> None:
        self.env.hub.publish(type, self.session_id, payload)

    def execute(self) -> dict[str, Any] | None:
        """Run the turn to a terminal record; returns the terminal run.

        ``WorkspaceStore.start_run`` stored the run as ``running`` with its
        user message and its first assistant message.
        """
        env = self.env
        try:
            self.publish(EventType.RUN_STARTED, self.record)
            if self.user_message is not None:
                self.publish(EventType.MESSAGE_CREATED, self.user_message)
            self.publish(EventType.MESSAGE_CREATED, self._first_message)
            self._open_step(self._first_message)
            # An unknown model (configuration changed while it was queued)
            # or a missing key fails the run here, with a message that says so.
            # The assistant message came first, so such a failure still
            # leaves one with its finish part.
            name = self.record["model"]  # decided at accept, stored with the run
            self.spec = env.models.spec(name)
            self.provider = env.models.provider(name)
            self.system = self._system_prompt()
            if self.compact:
                if self._compact(keep_from=None, why="requested") is None:
                    raise ProviderError(
                        "Nothing to compact", "the session has no messages since its last summary"
                    )
                denied = None
            else:
                denied = self._loop()
        except Cancelled:
            return self._finalize(Outcome.cancelled())
        except StorageUnavailable as exc:
            logger.warning("event=run_storage_failed run=%s error=%r", self.id, exc.message)
            return self._finalize(
                Outcome.failed(STORAGE_TITLE, exc.message, f"storage unavailable: {exc.message}")
            )
        except ProviderError as exc:
            logger.warning(
                "event=provider_error run=%s title=%s details=%s",
                self.id,
                exc.title,
                exc.details[:500],
            )
            return self._finalize(Outcome.failed(exc.title, exc.details))
        except Exception as exc:  # thread boundary: a bug still ends in a terminal record
            logger.exception("event=run_crashed run=%s", self.id)
            return self._finalize(Outcome.failed("Internal error", repr(exc)))
        return self._finalize(Outcome.completed(denied))

    def _stored(self, write: Callable[[], T]) -> T:
        """Call ``write`` (a store write); a refused write is retried with
        backoff, waiting on the run's token, for up to the cleanup timeout.
        Raises StorageUnavailable after that, Cancelled on a cancel."""
        deadline = Deadline(self.env.cleanup_timeout)
        delay = STORE_RETRY_FIRST
        while True:
            try:
                return write()
            except StorageUnavailable:
                if deadline.expired:
                    raise
            if self.token.wait(min(delay, deadline.remaining())):
                self.token.raise_if_cancelled()
            delay = min(delay * 2, STORE_RETRY_MAX)

    def _write_usage(self, required: bool = True) -> None:
        """Store the reported usage.  Not ``required`` (as it streams in),
        a refused write leaves it for the closing records."""
        while self._usage:
            if not required and not self.env.store.available:
                return
            usage, counts_context = self._usage[0]
            try:
                self.env.store.add_usage(
                    self.id,
                    self.session_id,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.cache_read_tokens,
                    usage.cache_write_tokens,
                    self.spec.cost(usage) if self.spec is not None else None,
                    context_tokens=usage.prompt_tokens if counts_context else None,
                )
            except StorageUnavailable:
                if required:
                    raise
                return
            self._usage.pop(0)

    def _new_step(self) -> None:
        message = self.env.hub.publish_stored(
            EventType.MESSAGE_CREATED,
            lambda: self._stored(
                lambda: self.env.store.create_message(
                    self.session_id, self.id, "assistant", [], *self._model_ids
                )
            ),
        )
        self._open_step(message)

    def _open_step(self, message: dict[str, Any]) -> None:
        """Stream the next step into ``message``, stored and announced."""
        self.step = _Step(
            MessageWriter(self.env, message, self.id, max_bytes=self.env.max_message_bytes)
        )

    def _loop(self) -> str | None:
        """Model steps until the model stops; returns a denial error or None.

        Before a step, a session over its model's threshold is compacted
        first; a step the provider refuses as too long is compacted once and
        sent again.  Until this run's first step is answered, its own user
        message stays out of the summary (it is the request to answer).
        """
        env = self.env
        specs = [ToolSpec(t.name, t.description, t.parameters) for t in self.tools.values()]
        steps = 0
        while True:
            steps += 1
            self.token.raise_if_cancelled()
            if steps > 1:
                self._new_step()
            keep = self.user_message["id"] if steps == 1 and self.user_message else None
            reason = self._answer(specs, keep)
            step = self.step
            step.tools.calls = step.writer.finish_tool_calls()
            if step.writer.full:
                self._cut_short(step)
                return None
            if not step.tools.calls:
                step.writer.add_finish(reason if reason != "tool_use" else "unknown")
                # The answer is complete in memory; a refused write here is
                # left to the closing records, which retry and, failing, owe it.
                self._flush_step(required=False)
                return None
            self._flush_step()
            denied = self.tool_calls.run(step.tools)
            step.writer.add_finish(
                "permission_denied" if denied else "tool_use",
                "Permission denied" if denied else "",
                denied or "",
            )
            self._flush_step()
            self._stored(functools.partial(self.tool_calls.write_results, step.tools))
            if denied:
                return denied
            if steps >= env.max_steps:
                raise ProviderError(
                    "Too many steps", f"stopped after --max-steps={env.max_steps} model steps"
                )

    def _answer(self, specs: list[ToolSpec], keep: str | None) -> str:
        """Stream the model's answer to the conversation into the step's
        message, compacting first where needed; return its finish reason.

        ``keep`` (this run's user message, until its first step is
        answered) stays out of a summary.  When a compaction completes, the
        answer goes into a new step's message: the old one holds the summary.
        """
        # The step's message is still empty: a compaction writes into it.
        if self._over_threshold() and self._compact(keep, "threshold") is not None:
            self._new_step()
        try:
            reason = self._stream(self._request(self._history(), specs))
        except ProviderError as exc:
            if not (exc.context_too_long and self.env.auto_compact):
                raise
            logger.info("event=prompt_too_long run=%s details=%r", self.id, exc.details[:200])
            self.step.writer.reset()  # the step's message becomes the summary
            if self._compact(keep, "prompt_too_long") is None:
                raise
            self._new_step()
            reason = self._stream(self._request(self._history(), specs))
        self.token.raise_if_cancelled()
        return reason

    def _stream(self, request: StepRequest, kind: str = "text") -> str:
        """Stream one model request into the current step's message; return
        its finish reason.  ``kind`` is the part the text goes to: ``summary``
        for a compaction, whose request (without tools) does not count
        towards the compaction threshold either."""
        writer = self.step.writer
        reason = "unknown"
        merging = writer.merging() if self.provider.announces_waits else contextlib.nullcontext()
        events = stream_with_retries(self.provider, request, self.token, self.env.retry)
        # Closing the generator closes the provider's HTTP response (its
        # ``finally``), so a message that is full stops the stream itself.
        try:
            with merging, contextlib.closing(events):
                for event in events:
                    reason = self._take(writer, event, kind, reason)
                    if writer.full:
                        break
                else:
                    return reason
        except EventTooLarge as exc:  # one event more than the message could hold
            writer.fill()
            logger.warning("event=provider_event_too_large run=%s limit=%d", self.id, exc.limit)
        logger.warning(
            "event=message_too_long run=%s message=%s max_bytes=%d",
            self.id,
            writer.id,
            writer.max_bytes,
        )
        return "max_bytes"

    def _request(self, messages: list[dict[str, Any]], tools: list[ToolSpec]) -> StepRequest:
        """One model request of this run: its system prompt, and the bound
        on what one message keeps (so the provider refuses an event larger
        than that instead of reading all of it)."""
        return StepRequest(self.system, messages, tools, max_bytes=self.env.max_message_bytes)

    def _cut_short(self, step: _Step) -> None:
        """End a step whose message reached ``max_message_bytes``: its tool
        calls are not run (their input was cut, or came after the cut), the
        message gets a ``max_bytes`` finish, and the turn ends there, as
        after ``max_tokens``.  The closing records write the results."""
        limit = step.writer.max_bytes
        for call in step.tools.calls:
            step.tools.results[call["id"]] = tool_result_part(
                call,
                f"Not run: the message reached its limit of {limit} bytes "
                "(--max-message-bytes) and this call's input was cut",
                True,
            )
        step.writer.add_cut_finish()
        self._flush_step(required=False)

    def _take(self, writer: MessageWriter, event: StreamEvent, kind: str, reason: str) -> str:
        """Apply one stream event; return the step's finish reason so far."""
        if isinstance(event, TextDelta):
            writer.delta(kind, event.text)
            if kind == "text":  # the tree before the run, once its first delta is out
                self.checkpoint.begin()
            return reason
        if isinstance(event, ReasoningDelta):
            writer.delta("reasoning", event.text)
            if kind == "text":
                self.checkpoint.begin()
            return reason
        writer.release()  # text read before this event is published before it
        if isinstance(event, ToolCallStart):
            if kind == "text":  # a summary offers no tools; a call is noise
                writer.tool_call_start(event.id, event.name)
        elif isinstance(event, ToolCallDelta):
            if kind == "text":
                writer.tool_call_input(event.id, event.input_delta)
        elif isinstance(event, Usage):
            self._usage.append((event, kind == "text"))
            self._write_usage(required=False)
        elif isinstance(event, StepFinish):
            reason = event.reason
        elif isinstance(event, Retrying):
            reason = "unknown"
            self._retrying(event)
        return reason

    def _history(self) -> list[dict[str, Any]]:
        """The messages of the next request: the summary in force (as the
        first user message), then only what came after it."""
        if self._start_context is not None:
            summary, messages = self._start_context.context
            self._start_context = None
        else:
            summary, messages = self.env.store.context(self.session_id)
        current = self.step.writer.id if self.step else None
        history = [m for m in messages if m["id"] != current]
        return [summary_message(summary), *history] if summary else history

    def _over_threshold(self) -> bool:
        if not self.env.auto_compact or self.spec is None:
            return False
        if self._start_context is not None:
            used = self._start_context.context_tokens
        else:
            used = self.env.store.context_tokens(self.session_id)
        return used > compaction_threshold(self.spec.context_window)

    def _compact(self, keep_from: str | None, why: str) -> str | None:
        """Compact the session into the current step's message (an empty
        assistant message of this run); see :meth:`Compactor.compact
        <crushd.context.Compactor.compact>`."""
        self._start_context = None  # a summary in force changes both
        return self.compactor.compact(self.step.writer, keep_from, why)

    def _stream_summary(self, messages: list[dict[str, Any]]) -> str:
        """Stream a compaction's request (no tools) into the step's message
        as ``summary`` parts; return its finish reason."""
        reason = self._stream(self._request(messages, []), kind="summary")
        self.token.raise_if_cancelled()
        return reason

    def _system_prompt(self) -> str:
        """The system prompt of every request of this run: crushd's own, then
        the instruction files as they are now (read once per run)."""
        env = self.env
        system = SYSTEM_PROMPT.format(root=env.root, tools=", ".join(self.tools) or "none")
        instructions = read_instructions(
            env.root, env.user_instructions, env.max_instructions_bytes
        )
        if instructions.files:
            logger.info(
                "event=instructions_read run=%s files=%s truncated=%s",
                self.id,
                ",".join(instructions.files),
                instructions.truncated,
            )
            system = f"{system}\n{instructions.text}\n"
        return system

    def _retrying(self, event: Retrying) -> None:
        """Announce a retry before its wait; the failed attempt's parts go.

        Retries are not steps: the same request is sent again, so nothing of
        the failed attempt reaches the model either.
        """
        reset = self.step.writer.reset()
        logger.info(
            "event=run_retrying run=%s attempt=%d delay_s=%.3f reset=%s",
            self.id,
            event.attempt,
            event.delay,
            reset,
        )
        self.publish(
            EventType.RUN_RETRYING,
            {
                "run_id": self.id,
                "attempt": event.attempt,
                "delay_s": round(event.delay, 3),
                "error": event.error.details or event.error.title,
            },
        )

    def _flush_step(self, required: bool = True) -> None:
        if not required and not self.env.store.available:
            return
        try:
            self.env.hub.publish_stored(
                EventType.MESSAGE_UPDATED, lambda: self._stored(self.step.writer.flush)
            )
        except StorageUnavailable:
            if required:
                raise

    # -- the end -----------------------------------------------------------

    def _finalize(self, outcome: Outcome) -> dict[str, Any] | None:
        """Close the run as ``outcome`` says: its records, then
        ``run.completed`` (:meth:`RunClosing.finalize
        <crushd.closing.RunClosing.finalize>`).  Returns the terminal run."""
        return self.closing.finalize(outcome, self.step)

    @property
    def owed(self) -> Callable[[], dict[str, Any] | None] | None:
        """The closing records the database refused past the cleanup deadline."""
        return self.closing.owed

    def settle(self, budget: float) -> dict[str, Any] | None:
        """Write the owed closing records, then publish ``run.completed``
        (:meth:`RunClosing.settle <crushd.closing.RunClosing.settle>`)."""
        return self.closing.settle(budget)
