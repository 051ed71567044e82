"""Runs yield to prompts being accepted.

Accepting a prompt and starting a run compete for the process's one GIL,
and a client is waiting for its 202.  So a run dispatched while prompts are
being accepted, in any workspace, is held until none are (and, when several
runs are held, until none has been for :data:`QUIET`), for at most
:attr:`StartGate.bound` seconds, and only then handed to its executor.

Holding it *before* it has a thread matters as much as the wait: a run that
waited in its own thread cost each accept the thread's creation and the new
thread's turns at the GIL, and when the accepts ended all of those threads
woke at once and competed for the GIL and the store's lock.  Held runs are
instead handed back in order, together, once.  With 100 prompts at once
(README "Performance"): accept p50 104 -> 67 ms, p99 147 -> 134 ms, first
delta p50 270 -> 252 ms.

One gate serves the whole process: the :class:`~crushd.server.Server`
builds it and passes it to each workspace, since a prompt accepted in one
workspace competes with the runs of all of them.  Its time is injectable:
a ``clock`` and a ``timer`` that waits by that clock, so tests move time
themselves instead of sleeping.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

logger = logging.getLogger(__name__)

#: How long a run may be held while prompts keep being accepted.
START_YIELD = 0.2
#: How long the accepts must have stopped before several held runs go.  In
#: a burst, the count of accepts falls to zero for a moment whenever the
#: requests being handled end before waitress has handed out the ones still
#: queued (a hundred prompts on 64 threads): released then, sixty runs
#: started while the last forty prompts were accepted, and those waited
#: 180-330 ms instead of about 130.  A lone held run (one prompt at a time)
#: goes at once.
QUIET = 0.005

Launch = Callable[[list[Any]], None]


class Timer(Protocol):
    """A one-shot timer, as :class:`threading.Timer` is one."""

    def start(self) -> None: ...

    def cancel(self) -> None:
        """Never call the function, if it has not been called yet."""


#: ``timer(delay, function)``: a timer that, once started, calls
#: ``function`` (on any thread, holding no lock) ``delay`` seconds later by
#: the gate's clock, unless it was cancelled first.
TimerFactory = Callable[[float, Callable[[], None]], Timer]


def thread_timer(delay: float, function: Callable[[], None]) -> Timer:
    """The real timer: a short-lived thread that waits ``delay`` seconds."""
    timer = threading.Timer(delay, function)
    timer.name = "crushd-start-gate"
    return timer


class StartGate:
    """Counts the prompts being accepted and holds runs while there are any.

    Thread-safe.  Held items are handed to their ``launch`` callback, in
    the order they were held, on the thread of the accept that ended last
    (a lone run), or of a timer once the accepts have been quiet for
    :attr:`quiet` seconds or the oldest has waited :attr:`bound` seconds.
    The timer is made by ``timer`` (by default a short-lived thread), only
    while something is held; ``clock`` and ``timer`` must keep the same time.
    Building a gate starts nothing.
    """

    def __init__(
        self,
        bound: float = START_YIELD,
        quiet: float = QUIET,
        clock: Callable[[], float] = time.monotonic,
        timer: TimerFactory = thread_timer,
    ) -> None:
        self.bound = bound
        self.quiet = quiet
        self._clock = clock
        self._new_timer = timer
        # Guards the count, the held items and the timer; a leaf: nothing
        # is taken while it is held (launches and timer starts come after).
        self._held_lock = threading.Lock()
        self._accepting = 0  # guarded by _held_lock
        self._quiet_since = float("-inf")  # when the last accept ended; guarded by _held_lock
        # launch -> [(launch by, item)], oldest first; guarded by _held_lock.
        self._held: dict[Launch, list[tuple[float, Any]]] = {}
        self._timer: Timer | None = None  # guarded by _held_lock
        self._timer_at = 0.0  # when _timer fires; guarded by _held_lock
        # Counts the timers made, so a cancelled or replaced one that fires
        # anyway knows it is stale; guarded by _held_lock.
        self._timer_serial = 0

    @property
    def accepting(self) -> int:
        """How many prompts are being accepted now."""
        with self._held_lock:
            return self._accepting

    @property
    def held(self) -> int:
        """How many items are held now."""
        with self._held_lock:
            return sum(len(held) for held in self._held.values())

    @contextlib.contextmanager
    def accept(self) -> Iterator[None]:
        """Around accepting one prompt; never blocks."""
        with self._held_lock:
            self._accepting += 1
        try:
            yield
        finally:
            with self._held_lock:
                self._accepting -= 1
                if self._accepting == 0:
                    self._quiet_since = self._clock()
                due = self._take_due()
                timer = self._arm()
            self._go(timer, due)

    def hold(self, launch: Launch, items: list[Any]) -> None:
        """Hand ``items`` to ``launch`` once the accepts allow it (see the
        class): at once, on this thread, when they already do, after
        whatever was held before them for the same ``launch``."""
        if not items:
            return
        with self._held_lock:
            by = self._clock() + self.bound
            self._held.setdefault(launch, []).extend((by, item) for item in items)
            due = self._take_due()
            timer = self._arm()
        self._go(timer, due)

    def release(self, launch: Launch) -> None:
        """Hand what is held for ``launch`` to it now (its owner is closing)."""
        with self._held_lock:
            held = self._held.pop(launch, [])
            timer = self._arm()
        self._go(timer, {launch: [item for _, item in held]} if held else {})

    def _release_at(self) -> float:
        """When everything held may go, as far as the accepts say: never
        while one is under way; once they have been quiet for
        :attr:`quiet`, or at once for a lone held run.  Holds _held_lock."""
        if self._accepting:
            return float("inf")
        if sum(len(held) for held in self._held.values()) <= 1:
            return float("-inf")
        return self._quiet_since + self.quiet

    def _take_due(self) -> dict[Launch, list[Any]]:
        """Everything held once the accepts allow it (:meth:`_release_at`),
        else what has waited its bound.  Holds _held_lock."""
        now = self._clock()
        if self._release_at() <= now:
            due = {launch: [item for _, item in held] for launch, held in self._held.items()}
            self._held.clear()
            return due
        due = {}
        for launch, held in list(self._held.items()):
            count = next((i for i, (by, _) in enumerate(held) if by > now), len(held))
            if count:
                due[launch] = [item for _, item in held[:count]]
                del held[:count]
                if not held:
                    del self._held[launch]
        return due

    def _arm(self) -> Timer | None:
        """Keep a timer set for the oldest held item, none when nothing is
        held; returns a new timer for the caller to start once it let go
        of _held_lock.  Holds _held_lock."""
        if not self._held:
            if self._timer is not None:
                self._timer.cancel()  # its thread ends at once
                self._timer = None
            return None
        first = min(self._release_at(), *(held[0][0] for held in self._held.values()))
        if self._timer is not None and self._timer_at <= first:
            return None
        if self._timer is not None:  # the bound was made shorter
            self._timer.cancel()
        self._timer_serial += 1
        serial = self._timer_serial
        self._timer = self._new_timer(max(0.0, first - self._clock()), lambda: self._expire(serial))
        self._timer_at = first
        return self._timer

    def _expire(self, serial: int) -> None:
        with self._held_lock:
            if self._timer is None or serial != self._timer_serial:
                return  # cancelled, or replaced by a sooner one
            self._timer = None
            due = self._take_due()
            timer = self._arm()
        self._go(timer, due)

    def _go(self, timer: Timer | None, due: dict[Launch, list[Any]]) -> None:
        """After a decision taken under _held_lock, with the lock let go: start
        the timer :meth:`_arm` returned, then hand back what is due."""
        if timer is not None:
            timer.start()
        self._launch(due)

    @staticmethod
    def _launch(due: dict[Launch, list[Any]]) -> None:
        for launch, items in due.items():
            try:
                launch(items)
            except Exception:  # one owner's failure must not break an accept or the others
                logger.exception("event=launch_failed items=%d", len(items))
