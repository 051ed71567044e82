"""systemd integration without dependencies: sd_notify, the watchdog, socket activation.

The notify protocol is one ``AF_UNIX``/``SOCK_DGRAM`` datagram of newline-separated
``KEY=VALUE`` assignments sent to ``$NOTIFY_SOCKET``; an address starting with ``@``
lives in the abstract namespace (the ``@`` stands for a leading NUL byte).  The
protocol is stable and documented to be reimplemented, so crushd speaks it itself
instead of depending on ``systemd-python`` (needs libsystemd headers) or
``sdnotify`` (swallows every error silently).

Socket activation follows ``sd_listen_fds(3)``: when ``$LISTEN_PID`` is our pid,
``$LISTEN_FDS`` descriptors starting at fd 3 were passed to us, in the order of the
``.socket`` unit.

Nothing here raises on a missing or broken service manager: outside systemd every
function is a cheap no-op, and a failed send is logged, never fatal.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping, MutableMapping

logger = logging.getLogger(__name__)

#: First descriptor passed by socket activation (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3

#: Bound on one send: a wedged service manager must not block a daemon thread.
NOTIFY_SEND_TIMEOUT = 1.0


def _notify_address(raw: str) -> str | None:
    """Translate ``$NOTIFY_SOCKET`` into a Python ``AF_UNIX`` address, or None if unusable."""
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # systemd >= 254 may also hand out "vsock:CID:PORT"; crushd only runs under a local
    # manager, so any other form is reported instead of guessed at.
    return None


def notify(*lines: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send ``lines`` as one notification datagram to ``$NOTIFY_SOCKET``.

    Returns True when the datagram was sent, False when ``NOTIFY_SOCKET`` is unset or
    empty (not running under a ``Type=notify`` unit) and False, after logging a
    warning, when the address is unusable or the send failed.  Never raises for
    socket errors.  Thread-safe (one short-lived socket per call); blocks at most
    :data:`NOTIFY_SEND_TIMEOUT`.

    Raises ValueError for a malformed message (no lines, a line without ``=`` or
    with a newline): that is a programming error, not an environment problem.
    """
    if not lines:
        raise ValueError("notify() needs at least one KEY=VALUE line")
    for line in lines:
        if "=" not in line or "\n" in line:
            raise ValueError(f"not a single KEY=VALUE line: {line!r}")
    raw = env.get("NOTIFY_SOCKET", "")
    if not raw:
        return False
    address = _notify_address(raw)
    if address is None:
        logger.warning("event=systemd_notify_failed socket=%s error=unsupported_address", raw)
        return False
    payload = "\n".join(lines).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(NOTIFY_SEND_TIMEOUT)
            sock.sendto(payload, address)
    except OSError as exc:  # gone, refused or full manager socket: log, the daemon goes on
        logger.warning(
            "event=systemd_notify_failed socket=%s error=%s message=%r",
            raw,
            exc,
            lines[0],
        )
        return False
    logger.debug("event=systemd_notify message=%r", "|".join(lines))
    return True


def ready(status: str | None = None, *, env: Mapping[str, str] = os.environ) -> bool:
    """Tell the manager start-up is complete (send once the socket listens)."""
    lines = ["READY=1"] + ([f"STATUS={status}"] if status else [])
    return notify(*lines, env=env)


def stopping(status: str | None = None, *, env: Mapping[str, str] = os.environ) -> bool:
    """Tell the manager the service is shutting down (sent on SIGTERM/SIGINT)."""
    lines = ["STOPPING=1"] + ([f"STATUS={status}"] if status else [])
    return notify(*lines, env=env)


def status(text: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """Set the free-form status line shown by ``systemctl status``."""
    return notify(f"STATUS={text}", env=env)


def watchdog_ping(*, env: Mapping[str, str] = os.environ) -> bool:
    """Send one keep-alive (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1", env=env)


def extend_timeout(seconds: float, *, env: Mapping[str, str] = os.environ) -> bool:
    """Ask for ``seconds`` more before the current start/stop timeout fires.

    Must be repeated before each extension runs out; used when a drain may outlast
    ``TimeoutStopSec=``.
    """
    if seconds <= 0:
        raise ValueError("extend_timeout() needs a positive number of seconds")
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", env=env)


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between keep-alives the manager expects, or None when it expects none.

    Half of ``$WATCHDOG_USEC``, as ``sd_watchdog_enabled(3)`` recommends, and only when
    ``$WATCHDOG_PID`` is unset or is this process (a child that inherited the variables
    must not ping for its parent).  Malformed values are logged and mean "no watchdog".
    """
    raw_usec = env.get("WATCHDOG_USEC", "")
    if not raw_usec:
        return None
    raw_pid = env.get("WATCHDOG_PID", "")
    try:
        usec = int(raw_usec)
        pid = int(raw_pid) if raw_pid else None
    except ValueError:
        logger.warning(
            "event=systemd_watchdog_env_invalid watchdog_usec=%r watchdog_pid=%r",
            raw_usec,
            raw_pid,
        )
        return None
    if usec <= 0 or (pid is not None and pid != os.getpid()):
        return None
    return usec / 2 / 1_000_000


class Watchdog:
    """Owns the thread that sends ``WATCHDOG=1`` while the daemon is healthy.

    Every ``interval`` seconds it calls ``check()`` (crushd passes a loopback HTTP
    health check, so a wedged server stops the pings and systemd restarts it) and
    pings only if it returned True; a check that raises counts as failed.
    ``check()`` runs on the watchdog thread and should bound its own duration
    below ``interval``.

    The loop ends when ``stop_event`` is set.  crushd passes its process-wide stop
    event: pings end as shutdown begins, which is fine because systemd only watches
    a unit while it is running (not while it is deactivating).  ``start()`` and
    ``stop()`` are meant for the thread that owns the server; ``stop()`` sets
    ``stop_event`` and joins.
    """

    def __init__(
        self,
        interval: float,
        check: Callable[[], bool],
        stop_event: threading.Event,
        *,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        if interval <= 0:
            raise ValueError("watchdog interval must be positive")
        self.interval = interval
        self._check = check
        self._stop_event = stop_event
        self._env = env
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the ping thread.  Does not block; raises RuntimeError if already started."""
        if self._thread is not None:
            raise RuntimeError("watchdog already started")
        # Daemon thread: a health check stuck in IO must not hold interpreter exit;
        # stop() still joins it on the orderly path.
        self._thread = threading.Thread(target=self._run, name="crushd-watchdog", daemon=True)
        self._thread.start()
        logger.info("event=watchdog_started interval=%.3f", self.interval)

    def stop(self, timeout: float = 5.0) -> None:
        """Set the stop event and join the thread (bounded by ``timeout``).  Idempotent."""
        self._stop_event.set()
        thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("event=watchdog_stop_timeout timeout=%.3f", timeout)
        else:
            logger.info("event=watchdog_stopped")

    def _run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                healthy = bool(self._check())
            except Exception:  # thread boundary: a failing check means "not healthy"
                logger.exception("event=watchdog_check_failed")
                healthy = False
            if not healthy:
                logger.warning("event=watchdog_skipped reason=unhealthy")
                continue
            watchdog_ping(env=self._env)


def listen_fds(
    env: MutableMapping[str, str] = os.environ, unset: bool = True
) -> list[socket.socket]:
    """Return the sockets passed by systemd socket activation, or [] when there are none.

    Applies only when ``$LISTEN_PID`` equals our pid; then ``$LISTEN_FDS`` descriptors
    from fd 3 on are wrapped in ``socket.socket(fileno=fd)`` (family and type are read
    from the descriptor) and made non-inheritable, so the agent's subprocesses never
    hold the listening socket.  A passed descriptor that is not a socket is logged and
    skipped.  With ``unset=True`` ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES``
    are removed from ``env`` whatever the outcome, as ``sd_listen_fds(3)`` does, so
    children do not inherit them.  Call once, early, from the main thread.
    """
    raw_pid = env.get("LISTEN_PID", "")
    raw_fds = env.get("LISTEN_FDS", "")
    names = env.get("LISTEN_FDNAMES", "")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not raw_pid or not raw_fds:
        return []
    try:
        pid = int(raw_pid)
        count = int(raw_fds)
    except ValueError:
        logger.warning(
            "event=systemd_listen_fds_invalid listen_pid=%r listen_fds=%r", raw_pid, raw_fds
        )
        return []
    if pid != os.getpid() or count <= 0:
        return []
    sockets: list[socket.socket] = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:  # not a socket (a FIFO, a closed fd): not ours to serve on
            logger.warning("event=systemd_listen_fd_skipped fd=%d error=%s", fd, exc)
            continue
        sockets.append(sock)
    logger.info(
        "event=systemd_socket_activation fds=%d names=%s",
        len(sockets),
        names or "-",
    )
    return sockets
