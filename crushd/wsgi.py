"""crushd for any WSGI host: ``application``, configured from the environment.

::

    CRUSHD_THREADS=16 waitress-serve --listen=127.0.0.1:7433 --threads=16 crushd.wsgi:application
    CRUSHD_THREADS=16 gunicorn -w 1 --threads 16 -b 127.0.0.1:7433 crushd.wsgi:application

Configuration comes from ``CRUSHD_*`` variables and the TOML file named by
``CRUSHD_CONFIG`` (see :meth:`crushd.config.Config.load`); logging follows
``CRUSHD_LOG_LEVEL``.  Importing this module opens the data directory, takes
its lock and reopens every registered workspace (re-queueing their queued
runs), so the host must import it in exactly one process: a second process
on the same data directory fails here with
:class:`crushd.errors.AlreadyRunning` and its message.  For gunicorn that
means one worker (``-w 1 --threads N``) and no ``--preload`` (the server, its
lock and its run threads must live in the worker, not in the master that
forks it).  Nor a ``HUP`` reload: its new worker races the old one for the
lock and, losing, makes gunicorn exit — restart instead.  And no
``--max-requests``, as every worker exit stops crushd and cancels its turns.

Set ``CRUSHD_THREADS`` to the host's thread count: crushd keeps event
streams (and ``?wait=`` long polls) below it so that open streams can never
take every thread, but it cannot ask the host how many threads it has.

The host owns the listening socket, so ``crushd serve``'s own checks (a
token for non-loopback addresses, sd_notify, socket activation) are the
host's business here.

Shutdown: the server's stop (the workspace shutdown order for every
workspace; running turns are cancelled and finish their records, queued
runs stay queued on disk) starts as soon as SIGTERM arrives, while the host
still serves, and runs again (a no-op by then) when the process exits.
"""

from __future__ import annotations

import _thread
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from flask import Flask

from crushd import logs
from crushd.app import create_app
from crushd.config import Config
from crushd.server import Server

logger = logging.getLogger(__name__)


class _SigtermStop:
    """Starts crushd's stop on SIGTERM, as ``crushd serve`` does.

    The first SIGTERM sets ``stopping`` (prompts get 503) and runs the
    server's stop on a thread while the host still serves: event streams
    end, running turns are cancelled and write their records.  A second
    SIGTERM skips the drain.  Then, depending on the host:

    * ``previous`` is None — SIGTERM would have killed the process
      (``waitress-serve``): once the stop is done, the handler runs again on
      the main thread through ``interrupt_main`` and raises
      ``KeyboardInterrupt``, which waitress's ``run()`` catches and returns
      from.  Stopping crushd first matters: waitress gives its busy threads
      5 s before returning, and an open event stream only ends when its
      workspace closes.
    * ``previous`` is the host's own handler (gunicorn's worker): it is
      called too, unchanged, and the host stops the way it always does.
      Starting our stop at the same moment matters there: gunicorn's worker
      waits up to ``--graceful-timeout`` for open connections — an event
      stream or a ``?wait=`` long poll never ends by itself — and its
      master kills the worker with SIGKILL at the very same deadline, so a
      stop that only began at exit would race that SIGKILL and leave runs
      ``running`` (``interrupted`` at the next start).
    """

    def __init__(self, server: Server, previous: Callable[[int, Any], Any] | None) -> None:
        self.control = server.stop_control
        self.previous = previous
        self._raised = False  # only touched on the main thread

    def __call__(self, signum: int, frame: Any) -> None:
        if self.control.done.is_set() and self.previous is None:
            if not self._raised:  # once: a later signal must not break the host's exit
                self._raised = True
                raise KeyboardInterrupt
            return
        self.control.signal("SIGTERM", after=self._stopped)
        if self.previous is not None:
            self.previous(signum, frame)

    def _stopped(self) -> None:
        if self.previous is None:  # hand the exit back to the host's main loop
            _thread.interrupt_main(signal.SIGTERM)


def install_sigterm(server: Server) -> bool:
    """Hook SIGTERM as :class:`_SigtermStop` describes; returns whether it did.

    Only from the main thread (where handlers live), and only over the
    default action or a Python handler of the host, which is kept and
    called.  An ignored SIGTERM, or one handled outside Python (``None``),
    is left alone: crushd then stops at exit.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGTERM)
    if current is signal.SIG_DFL:
        previous = None
    elif callable(current) and not isinstance(current, _SigtermStop):
        previous = current
    else:
        return False
    signal.signal(signal.SIGTERM, _SigtermStop(server, previous))
    return True


def build() -> Flask:
    """Create the app from the environment and tie its stop to the process."""
    config = Config.load()
    logs.configure(config.log_level)
    app = create_app(config)
    server: Server = app.extensions["crushd"]
    # threading._register_atexit, not atexit.register: at interpreter exit
    # threading._shutdown() first runs these callbacks, then joins every
    # non-daemon thread — including the workspaces' ThreadPoolExecutor
    # workers, which concurrent.futures also joins through this very hook.
    # atexit callbacks run only after that join, i.e. after every running
    # turn had finished on its own: the exit would wait for the model, and
    # the cancellation that ends runs promptly would come too late.
    # Registered after concurrent.futures' hook, ours runs before it.
    threading._register_atexit(server.stop)  # type: ignore[attr-defined]
    hooked = install_sigterm(server)
    if server.token is None:
        logger.warning(
            "event=wsgi_no_token hint=%s",
            "every request is allowed: bind the host to 127.0.0.1 or set CRUSHD_TOKEN_FILE",
        )
    logger.info("event=wsgi_ready data_dir=%s sigterm_hook=%s", server.data_dir, hooked)
    return app


application = build()
