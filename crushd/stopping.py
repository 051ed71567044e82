"""Stopping a server: one controller owns "stop requested" and "stop now".

Every way a crushd process stops goes through the server's
:class:`StopController`: ``crushd serve``'s SIGTERM/SIGINT handlers and the
end of waitress's loop (:mod:`crushd.serve`), the SIGTERM hook of the WSGI
module (:mod:`crushd.wsgi`), and a direct :meth:`crushd.server.Server.stop`.

* The first request sets :attr:`StopController.requested` at once —
  prompts and registrations get 503, health says ``stopping`` — and runs
  the server's stop on its own thread, so a signal handler only sets flags
  and starts a thread (the rq and huey pattern: first signal warm, second
  cold).
* A later signal sets :attr:`StopController.now`: running turns stop
  waiting out the drain and are cancelled.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class StopController:
    """Owns the stop flags of one server and the thread that stops it.

    :meth:`request` and :meth:`signal` may be called from signal handlers:
    they never block (the "first request" check is a non-blocking acquire
    of a lock that is never released, so a handler that interrupts a
    request on the same thread cannot deadlock).
    """

    def __init__(self, stop: Callable[[], object], thread_name: str = "crushd-stop") -> None:
        self._stop = stop
        self._thread_name = thread_name
        self.requested = threading.Event()  # a stop began: prompts get 503
        self.now = threading.Event()  # a second signal: stop waiting for turns
        self.done = threading.Event()  # the stop thread finished its work
        self._once = threading.Lock()  # acquired by the first request, never released
        self._thread: threading.Thread | None = None  # set once, by the first request

    def mark(self) -> None:
        """Record that a stop began without starting a thread (a direct,
        blocking :meth:`Server.stop <crushd.server.Server.stop>`)."""
        self.requested.set()

    def request(
        self,
        reason: str,
        *,
        before: Callable[[], None] | None = None,
        after: Callable[[], None] | None = None,
    ) -> bool:
        """Start the stop on its own thread unless a request already did;
        return whether this call started it.  Never blocks.

        On the stop thread ``before`` runs first, then the server's stop,
        then ``after`` (even when the stop failed).
        """
        if not self._once.acquire(blocking=False):
            return False
        self.requested.set()
        self._thread = threading.Thread(
            target=self._run, args=(reason, before, after), name=self._thread_name
        )
        self._thread.start()
        return True

    def signal(
        self,
        reason: str,
        *,
        before: Callable[[], None] | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        """A stop signal: the first requests the stop, every later one sets :attr:`now`."""
        if not self.request(reason, before=before, after=after):
            self.now.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the stop thread; True when it is done (or never started)."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _run(
        self, reason: str, before: Callable[[], None] | None, after: Callable[[], None] | None
    ) -> None:
        logger.info("event=stop_requested reason=%s", reason)
        try:
            if before is not None:
                before()
            self._stop()
        except Exception:  # thread boundary: the process must still get to exit
            logger.exception("event=stop_failed reason=%s", reason)
        finally:
            self.done.set()
            if after is not None:
                after()
