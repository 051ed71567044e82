"""Cancellation tokens, deadlines and the countdown latch.

A :class:`CancelToken` is cancelled when its own event is set or when any
ancestor is cancelled.  Cooperative code waits with :meth:`CancelToken.wait`
instead of ``time.sleep``; code blocked in IO that cannot poll an event
registers :meth:`CancelToken.on_cancel` callbacks (close the HTTP stream, kill
the process group, wake the permission wait) so a cancel interrupts it at once.

:class:`Deadline` bounds cleanup work that must happen *after* a cancel (the
final writes of a run): it is detached from any token on purpose.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised by cooperative code when its token was cancelled."""

    def __init__(self, reason: str = "cancelled") -> None:
        super().__init__(reason)
        self.reason = reason


class CancelToken:
    """A thread-safe, hierarchical cancellation flag.

    Cancelling is idempotent and never raises: callbacks that fail are
    logged.  Children register with their parent and must be :meth:`release`-d
    when their work ends so a long-lived parent (the workspace token) does not
    accumulate dead children.
    """

    def __init__(self, parent: CancelToken | None = None, name: str = "") -> None:
        self.name = name
        self._event = threading.Event()
        self._callbacks_lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}  # guarded by _callbacks_lock
        self._next_handle = 0  # guarded by _callbacks_lock
        self._reason: str | None = None  # guarded by _callbacks_lock
        self._parent = parent
        self._parent_handle: int | None = None
        if parent is not None:
            self._parent_handle = parent.on_cancel(
                lambda: self.cancel(parent.reason or "cancelled")
            )

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def reason(self) -> str | None:
        return self._reason

    def child(self, name: str = "") -> CancelToken:
        return CancelToken(self, name=name)

    def cancel(self, reason: str = "cancelled") -> bool:
        """Cancel this token and its descendants; return False if it already was."""
        with self._callbacks_lock:
            if self._event.is_set():
                return False
            self._reason = reason
            self._event.set()
            callbacks = list(self._callbacks.values())
            self._callbacks.clear()
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a failing callback must not stop the others
                logger.exception("event=cancel_callback_failed token=%s", self.name)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block up to ``timeout`` seconds; return True if cancelled."""
        return self._event.wait(timeout)

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled(self._reason or "cancelled")

    def on_cancel(self, callback: Callable[[], None]) -> int:
        """Run ``callback`` (on the cancelling thread) once this token is cancelled.

        If the token is already cancelled the callback runs now, on the
        calling thread.  Returns a handle for :meth:`remove_callback`.
        """
        with self._callbacks_lock:
            if not self._event.is_set():
                handle = self._next_handle
                self._next_handle += 1
                self._callbacks[handle] = callback
                return handle
        callback()
        return -1

    def remove_callback(self, handle: int) -> None:
        with self._callbacks_lock:
            self._callbacks.pop(handle, None)

    def release(self) -> None:
        """Detach from the parent; the token keeps its own state."""
        if self._parent is not None and self._parent_handle is not None:
            self._parent.remove_callback(self._parent_handle)
            self._parent_handle = None


class Deadline:
    """A point in monotonic time; ``remaining()`` never goes below zero."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self._at - self._clock())

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0


class CountdownLatch:
    """Counts dispatched work; :meth:`wait` returns once the count is zero."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0  # guarded by _cond

    @property
    def count(self) -> int:
        with self._cond:
            return self._count

    def count_up(self) -> None:
        with self._cond:
            self._count += 1

    def count_down(self) -> None:
        with self._cond:
            if self._count <= 0:
                raise RuntimeError("latch counted below zero")
            self._count -= 1
            if self._count == 0:
                self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the count is zero or ``timeout`` passes; return True
        if the count is zero."""
        with self._cond:
            return self._cond.wait_for(lambda: self._count == 0, timeout)
