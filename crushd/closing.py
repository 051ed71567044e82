"""The end of a run: its closing records, then ``run.completed``; and what it owes.

Whatever ends a run (:mod:`crushd.runs`), :meth:`RunClosing.finalize` writes
the same records, under a *detached* cleanup deadline so a cancel stops the
model but not the bookkeeping: the usage still unwritten, the last step's
message closed, its tool results, every stored message sealed as the
:class:`~crushd.sealing.Outcome` says, the run's terminal status — and
only once that is stored, ``run.completed`` with it
(:meth:`EventHub.publish_stored <crushd.events.EventHub.publish_stored>`).

A write the database refuses is retried until the deadline; past it the
records are *owed*: :attr:`RunClosing.owed` holds them, and the workspace's
storage keeper writes them with :meth:`RunClosing.settle` once the database
accepts writes again.  Any other error in them (a bug, a record they
cannot handle) falls back to the least that still ends the run: it becomes
``failed``.  Not thread-safe: the run's thread owns it, then the keeper's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from crushd.cancel import Deadline
from crushd.errors import StorageUnavailable
from crushd.events import EventType
from crushd.sealing import Outcome, seal_run_messages
from crushd.sqlite import lock_budget

if TYPE_CHECKING:
    from crushd.runs import RunEnv
    from crushd.toolcalls import StepCalls, ToolCalls
    from crushd.writer import MessageWriter

logger = logging.getLogger("crushd.runs")  # operators' filters match the run's events

# Backoff between attempts of a write the database refused.
STORE_RETRY_FIRST = 0.05
STORE_RETRY_MAX = 1.0
CLOSE_FAILED_TITLE = "Closing records failed"

T = TypeVar("T")
Terminal = dict[str, Any] | None  # the terminal run, or None when nothing was stored


class OpenStep(Protocol):
    """The step a run was in when it ended: its message and its tool calls."""

    writer: MessageWriter
    tools: StepCalls


class RunClosing:
    """The closing records of one run.

    Takes what the records are written with: the run's ``env`` (store,
    hub, cleanup timeout), its ids, ``kind`` (``summary`` for a compaction:
    the part its text is read from, else ``text``), its ``tool_calls``
    (which write a step's results) and ``write_usage`` (which stores the
    usage reported and not written yet, raising what the store raises).
    """

    def __init__(
        self,
        env: RunEnv,
        run_id: str,
        session_id: str,
        *,
        kind: str,
        tool_calls: ToolCalls,
        write_usage: Callable[[], None],
    ) -> None:
        self.env = env
        self.run_id = run_id
        self.session_id = session_id
        self.kind = kind
        self.tool_calls = tool_calls
        self.write_usage = write_usage
        # The closing records the database refused past the cleanup
        # deadline; the workspace calls settle() to write them later.
        self.owed: Callable[[], Terminal] | None = None

    def finalize(self, outcome: Outcome, step: OpenStep | None) -> Terminal:
        """Write the closing records under a detached deadline, then publish
        ``run.completed``.  Runs even though the run's token is cancelled.
        Returns the terminal run; None if its records are owed (or could
        not be written at all, see :meth:`_close`)."""
        return self._completed(lambda: self._close(outcome, step))

    def settle(self, budget: float) -> Terminal:
        """Write the owed closing records and publish ``run.completed``.

        Called by the workspace once the database may accept writes again;
        raises StorageUnavailable (the records stay owed) if it still refuses.
        """
        owed = self.owed
        if owed is None:
            return None

        def write() -> Terminal:
            with lock_budget(budget):
                terminal = owed()
            self.owed = None
            logger.info("event=run_records_written run=%s", self.run_id)
            return terminal

        return self._completed(write)

    def _completed(self, close: Callable[[], Terminal]) -> Terminal:
        """The one place a run publishes ``run.completed``: once ``close``
        stored its terminal record, with that record."""
        return self.env.hub.publish_stored(EventType.RUN_COMPLETED, close)

    def _close(self, outcome: Outcome, step: OpenStep | None) -> Terminal:
        """The closing records, written; returns the terminal run.

        Writes the database refuses are retried until the deadline; after
        it the records are left in :attr:`owed` and None is returned.  Any
        other error in them falls back to :meth:`_close_anyway`.
        """
        deadline = Deadline(self.env.cleanup_timeout)
        status = outcome.status

        def close() -> Terminal:
            return self._records(outcome, step)

        delay = STORE_RETRY_FIRST
        while True:
            try:
                with lock_budget(max(deadline.remaining(), 0.01)):
                    terminal = close()
                break
            except StorageUnavailable as exc:
                if deadline.expired:
                    logger.warning(
                        "event=run_records_owed run=%s status=%s error=%r",
                        self.run_id,
                        status,
                        exc.message,
                    )
                    self.owed = close
                    return None
                # Wakes up as soon as another write gets through.
                self.env.store.wait_available(min(delay, deadline.remaining()))
                delay = min(delay * 2, STORE_RETRY_MAX)
            except Exception as exc:  # thread boundary: a bug, or the database closed
                logger.exception("event=run_cleanup_failed run=%s status=%s", self.run_id, status)
                return self._close_anyway(exc, deadline, step)
        if deadline.expired:
            logger.warning("event=run_cleanup_slow run=%s", self.run_id)
        return terminal

    def _records(self, outcome: Outcome, step: OpenStep | None) -> Terminal:
        """Every closing write, in order; each is idempotent, so after a
        refused write the whole sequence is simply tried again."""
        self.write_usage()
        text, message_id = "", None
        if step is not None:
            writer = step.writer
            self.env.hub.publish_stored(EventType.MESSAGE_UPDATED, writer.close)
            self.tool_calls.write_results(step.tools, outcome.result_text)
            text = writer.text(self.kind)
            message_id = writer.id
        if outcome.reason is not None:
            seal_run_messages(self.env, self.run_id, self.session_id, outcome)
        return self.env.store.finish_run(
            self.run_id, outcome.status, error=outcome.error, text=text, message_id=message_id
        )

    def _close_anyway(
        self, error: Exception, deadline: Deadline, step: OpenStep | None
    ) -> Terminal:
        """The closing records raised ``error``: write the least that still
        ends the run, each write on its own, so one that raises does not
        stop the others.

        A run whose final writes crashed once stayed ``running`` for good: no
        cancel reached it, its session could not be deleted, and every
        start sealed it again and crashed the same way.  So it becomes
        ``failed`` with ``error`` saying why, whatever else could not be
        sealed.  Returns the terminal run; None if even that write raised
        (logged; a refused one is owed, like any closing record).
        """
        if self.env.store.closed:  # the workspace closed under a stuck run: nothing can be written
            return None
        outcome = Outcome.failed(
            CLOSE_FAILED_TITLE, f"the run's closing records could not be written: {error!r}"
        )
        text, message_id = "", None
        with lock_budget(max(deadline.remaining(), 1.0)):
            if step is not None:
                writer = step.writer
                message_id = writer.id
                self._attempt("message", writer.close)
                writer.abandon()
                self._attempt(
                    "results",
                    lambda: self.tool_calls.write_results(step.tools, outcome.result_text),
                )
                text = self._attempt("text", lambda: writer.text(self.kind)) or ""
            self._attempt(
                "seal",
                lambda: seal_run_messages(self.env, self.run_id, self.session_id, outcome),
            )

            def finish() -> Terminal:
                return self.env.store.finish_run(
                    self.run_id, "failed", error=outcome.error, text=text, message_id=message_id
                )

            try:
                terminal = finish()
            except StorageUnavailable as exc:
                logger.warning(
                    "event=run_records_owed run=%s status=failed error=%r",
                    self.run_id,
                    exc.message,
                )
                self.owed = finish
                return None
            except Exception:  # thread boundary: nothing is left to try
                logger.exception("event=run_close_failed run=%s", self.run_id)
                return None
        logger.warning("event=run_closed_anyway run=%s error=%r", self.run_id, outcome.error)
        return terminal

    def _attempt(self, what: str, write: Callable[[], T]) -> T | None:
        """One write of :meth:`_close_anyway`; what raises is logged and skipped."""
        try:
            return write()
        except Exception:  # thread boundary: the next write may still get through
            logger.exception("event=run_close_step_failed run=%s step=%s", self.run_id, what)
            return None
