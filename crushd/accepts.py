"""Group commit of the prompts being accepted.

A burst of prompts used to cost one transaction each, behind the same
lock, where every holder the GIL paused held up all the others (measured:
97% of an accept's time in a burst of 100 was that wait).  The
:class:`AcceptBatcher` stores whatever is pending together instead: the
first caller to find no batch being written writes the pending ones; those
that arrive meanwhile wait, and the first of them writes the next batch.
A burst thus costs a few transactions.

The batcher knows nothing of prompts or runs: the workspace gives it the
function that writes a batch and the one that takes the results in (queues
the new runs) before their callers wake up.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class AcceptsClosed(Exception):
    """The batcher is closed: the item was not stored."""


@dataclass
class _Pending(Generic[Item, Result]):
    """One caller of :meth:`AcceptBatcher.accept` waiting for its batch."""

    item: Item
    # What the write gave for it (or the error), once written; set before
    # ``turn`` is.
    result: Result | Exception | None = None
    # Set when the item is written, or when it is this caller's turn to
    # write the next batch.
    turn: threading.Event = field(default_factory=threading.Event)


class AcceptBatcher(Generic[Item, Result]):
    """Stores concurrent items in shared batches.  Thread-safe.

    ``write(items)`` stores one batch in one transaction and returns one
    result per item, in order: the item's result, or the exception that
    refused that item alone.  If it raises, nothing was stored and every
    item of the batch gets (a copy of) that error.  ``stored(items,
    results)`` is called once per batch, after the write and before any of
    its callers returns, on the thread that wrote it.  Both are called with
    no lock of the batcher held, so they may take the caller's locks.

    Building a batcher starts nothing; it writes on its callers' threads.
    """

    def __init__(
        self,
        write: Callable[[list[Item]], list[Result | Exception]],
        stored: Callable[[list[Item], list[Result | Exception]], None] = lambda i, r: None,
    ) -> None:
        self._write = write
        self._stored = stored
        # Guards the three fields below; a leaf: nothing is taken while it
        # is held, and it is never taken holding another lock.
        self._batch_lock = threading.Lock()
        self._pending: list[_Pending[Item, Result]] = []  # not yet in a batch
        self._writing = False  # whether a batch is being written (or about to be)
        self._closed = False  # set by close(): accept() refuses from then on
        self._written = threading.Condition(self._batch_lock)  # notified when writing stops

    @property
    def waiting(self) -> int:
        """How many items are in no batch yet (they wait for the one being written)."""
        with self._batch_lock:
            return len(self._pending)

    def accept(self, item: Item) -> Result:
        """Store ``item`` together with whatever else is pending; return its
        result or raise the error that refused it.  Blocks until it is
        stored (behind at most the batch being written).  Raises
        :class:`AcceptsClosed`, storing nothing, once :meth:`close` began."""
        request: _Pending[Item, Result] = _Pending(item)
        with self._batch_lock:
            if self._closed:
                raise AcceptsClosed("closed")
            self._pending.append(request)
            lead = not self._writing
            self._writing = True
        if not lead:
            request.turn.wait()  # written, or its turn to write the next batch
        if request.result is None:
            self._write_batch()
        assert request.result is not None
        if isinstance(request.result, Exception):
            raise request.result
        return request.result

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new items, then wait until those accepted before are
        stored and taken in.  Blocks up to ``timeout`` seconds; returns False
        if a batch is still being written then.  Idempotent."""
        with self._batch_lock:
            self._closed = True
            return self._written.wait_for(lambda: not self._writing, timeout)

    def _write_batch(self) -> None:
        """Write every pending item as one batch, hand the results back,
        then wake the batch's callers and the first caller of the next."""
        with self._batch_lock:
            batch, self._pending = self._pending, []
        items = [pending.item for pending in batch]
        results: list[Result | Exception] = []
        try:
            results = list(self._write(items))
        except Exception as exc:  # a storage fault: none of them was written
            results = [copy.copy(exc) for _ in batch]
        finally:
            # Only if something worse than an Exception escaped: every
            # caller still needs an answer.
            results += [RuntimeError("the item was not stored")] * (len(batch) - len(results))
            try:
                self._stored(items, results)
            finally:
                self._hand_back(batch, results)

    def _hand_back(
        self, batch: list[_Pending[Item, Result]], results: list[Result | Exception]
    ) -> None:
        with self._batch_lock:
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
            following = self._pending[0] if self._pending else None
            if following is None:
                self._writing = False
                self._written.notify_all()
        for pending in batch:
            pending.turn.set()
        if following is not None:
            following.turn.set()
