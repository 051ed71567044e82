"""The storage keeper: what the database refused is written once it accepts
writes again.

While a workspace's database refuses writes (see :mod:`crushd.sqlite`),
records that could not be written within a run's cleanup deadline — a
run's closing records, a queued run's cancellation — are *owed*.  The
:class:`StorageKeeper`, one thread per workspace, tries again with backoff
(probing the database first), writes what is owed, oldest first, and then
tells the workspace it may start its queued runs.  It wakes at once when
the store's availability changes or something new is owed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from crushd.errors import StorageUnavailable

logger = logging.getLogger(__name__)

#: The backoff between attempts while the database refuses writes: the
#: first wait and the longest.
KEEPER_FIRST = 0.1
KEEPER_MAX = 2.0
#: The store-lock budget of writing one owed record.
KEEPER_BUDGET = 2.0


@dataclass
class Owed:
    """Records the database refused: ``settle(budget)`` writes them (raising
    StorageUnavailable while it still refuses), then ``done()`` runs."""

    run_id: str
    settle: Callable[[float], Any]
    done: Callable[[], None]


class Probed(Protocol):
    """The part of a store the keeper uses."""

    @property
    def available(self) -> bool:
        """Whether the last write was accepted (read from memory)."""

    def probe(self) -> None:
        """Raise StorageUnavailable while the database refuses writes."""


class Wake(Protocol):
    """What the keeper sleeps on between attempts; a :class:`threading.Event`."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class StorageKeeper:
    """Writes the owed records of one workspace.  Thread-safe.

    ``on_writable()`` is called on the keeper's thread after every wake-up
    that finds the database accepting writes and nothing owed any more (the
    workspace starts its queued runs).  ``wake`` is what the keeper sleeps
    on; tests pass one whose timed waits end when they say.  Build, then
    :meth:`start` the thread; :meth:`stop` ends it.
    """

    def __init__(
        self,
        store: Probed,
        on_writable: Callable[[], None],
        workspace_id: str = "",
        *,
        wake: Wake | None = None,
        first: float = KEEPER_FIRST,
        longest: float = KEEPER_MAX,
        budget: float = KEEPER_BUDGET,
    ) -> None:
        self.workspace_id = workspace_id
        self.budget = budget
        self._store = store
        self._on_writable = on_writable
        self._first = first
        self._longest = longest
        # Guards _owed; a leaf: held for list operations only, never while
        # a record is written or a callback runs.
        self._owed_lock = threading.Lock()
        self._owed: list[Owed] = []  # oldest first; guarded by _owed_lock
        # Set when the store's availability changes, when something is owed
        # and on stop; the thread clears it when it wakes.
        self._wake: Wake = wake if wake is not None else threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None  # set by start()

    def start(self) -> None:
        """Start the keeper's thread; call once."""
        self._thread = threading.Thread(
            target=self._run, name=f"crushd-storage-{self.workspace_id[:8]}"
        )
        self._thread.start()

    def wake(self) -> None:
        """The store's availability changed: look again now.  Never blocks
        (the store calls it holding its lock)."""
        self._wake.set()

    def owe(self, owed: Owed) -> None:
        """Write ``owed`` as soon as the database accepts it; then call its
        ``done``.  Never blocks."""
        with self._owed_lock:
            self._owed.append(owed)
        self._wake.set()

    def owed(self) -> list[str]:
        """The runs whose records are still owed, oldest first."""
        with self._owed_lock:
            return [item.run_id for item in self._owed]

    def stop(self, timeout: float | None = None) -> list[str]:
        """End the thread: at once when it waits, else after the attempt
        under way (bounded by the busy timeout and :attr:`budget`; ``timeout``
        defaults to that plus 5 s).  Returns the runs whose records are still
        owed, and logs them: they are left to the next start, which seals
        runs left running.  Blocks; idempotent."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.budget + 5 if timeout is None else timeout)
        owed = self.owed()
        if owed:
            logger.error(
                "event=records_owed_at_close workspace=%s runs=%s",
                self.workspace_id,
                ",".join(owed),
            )
        return owed

    def _run(self) -> None:
        """While the database refuses writes or records are owed, try again
        with backoff; once it accepts them, write what is owed (oldest
        first) and call ``on_writable``."""
        delay = self._first
        while True:
            with self._owed_lock:
                trouble = bool(self._owed) or not self._store.available
            self._wake.wait(delay if trouble else None)
            self._wake.clear()
            if self._stopping.is_set():
                return
            with self._owed_lock:
                owed = list(self._owed)
            if owed or not self._store.available:
                if not self._settle(owed):
                    delay = min(delay * 2, self._longest)
                    logger.debug(
                        "event=storage_retry workspace=%s owed=%d delay=%s",
                        self.workspace_id,
                        len(owed),
                        delay,
                    )
                    continue
                delay = self._first
            self._on_writable()

    def _settle(self, owed: list[Owed]) -> bool:
        """One attempt: probe the database, then write the owed records.
        Returns True once the database accepted them all."""
        try:
            self._store.probe()
            for item in owed:
                try:
                    item.settle(self.budget)
                except StorageUnavailable:
                    raise
                except Exception:  # a bug must not hold the latch forever
                    logger.exception(
                        "event=owed_records_failed workspace=%s run=%s",
                        self.workspace_id,
                        item.run_id,
                    )
                with self._owed_lock:
                    self._owed.remove(item)
                item.done()
        except StorageUnavailable:
            return False
        return True
