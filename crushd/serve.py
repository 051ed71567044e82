"""``crushd serve``: the server under waitress, with signals and systemd.

Stop sequence (SIGTERM or SIGINT), through the server's
:class:`~crushd.stopping.StopController`:

1. The signal handler only sets flags and starts the stop thread: prompts
   get 503 from now on and systemd hears ``STOPPING=1``.
2. The stop thread runs :meth:`Server.stop` — every workspace's shutdown
   order, in parallel, with the drain; their SSE streams end.
3. It then asks waitress's loop (through its trigger, on the loop's own
   thread) to close every channel, so ``run()`` returns on the main thread.
4. The main thread stops waitress's worker threads and exits 0.

A second signal cuts the drain short.  waitress has no graceful-stop API and
closing its server from another thread breaks its ``select()``; the trigger
runs our thunk inside the loop instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import threading
from typing import Any

import httpx
from waitress import wasyncore
from waitress.server import create_server
from waitress.trigger import trigger as WaitressTrigger

from crushd import systemd
from crushd.app import create_app
from crushd.config import Config
from crushd.connections import guard_connections, raise_open_files_limit
from crushd.errors import StartupError
from crushd.server import Server
from crushd.workspace import close_budget

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# File descriptors kept for everything but connections: databases, logs,
# provider sockets, bash pipes, MCP servers.
SPARE_FILES = 256


def waitress_options(config: Config) -> dict[str, Any]:
    return {
        "threads": config.threads,
        # Connections that are only being read cost a few kilobytes and no
        # thread; the header and stall deadlines (crushd.connections) keep
        # slow clients from filling them.
        "connection_limit": config.connection_limit,
        # select() cannot watch file descriptors past 1024.
        "asyncore_use_poll": True,
        # Idle keep-alive connections are closed after this.
        "channel_timeout": 60,
        # Per connection, at most this much output is buffered before the
        # writing thread waits for the reader (waitress's default is 16 MiB).
        "outbuf_high_watermark": 1024 * 1024,
        # Lets an SSE generator see a vanished client at once.
        "channel_request_lookahead": 1,
        # waitress buffers a body before the app sees it: it refuses one over
        # --max-body itself, from Content-Length before reading it (in the JSON
        # error shape, crushd.connections.JsonErrorTask).  Its check is ">=".
        "max_request_body_size": config.max_body + 1,
        "ident": "crushd",
        "clear_untrusted_proxy_headers": True,
    }


class Runner:
    """Owns the waitress server, the stop thread and the watchdog.

    Build, then start: ``Runner(config)`` checks the configuration and
    opens nothing; :meth:`start` starts the :class:`Server` and listens;
    :meth:`run` serves until stopped.
    """

    def __init__(self, config: Config) -> None:
        self._inherited = systemd.listen_fds()
        if (
            not self._inherited
            and not config.unix_socket
            and not is_loopback(config.host)
            and not (config.token or config.token_file)
        ):
            raise StartupError(
                f"refusing to listen on {config.host} without a token: anyone who can reach "
                "it could run commands in your workspaces. Set --token-file FILE (or "
                "CRUSHD_TOKEN), or listen on 127.0.0.1"
            )
        self.config = config
        # Absolute, so the logged address and the watchdog's self-check can
        # tell a socket path from host:port.  None when systemd gave sockets.
        self._unix_socket = (
            os.path.abspath(config.unix_socket)
            if config.unix_socket and not self._inherited
            else None
        )
        self.server: Server | None = None  # started by start()
        self._watchdog: systemd.Watchdog | None = None

    def start(self) -> Runner:
        """Start the server (recovering every workspace) and listen; returns
        self.  Raises StartupError (the server stopped again) when it cannot."""
        config = self.config
        files = raise_open_files_limit(config.connection_limit + config.threads + SPARE_FILES)
        if files < config.connection_limit + SPARE_FILES:
            limit = max(100, files - SPARE_FILES)
            logger.warning(
                "event=connection_limit_lowered wanted=%d limit=%d open_files=%d",
                config.connection_limit,
                limit,
                files,
            )
            config = self.config = dataclasses.replace(config, connection_limit=limit)
        self.server = Server(config).start()
        inherited = self._inherited
        try:
            self.app = create_app(server=self.server)
            options = waitress_options(config)
            where = self._unix_socket or f"{config.host}:{config.port}"
            try:
                if inherited:
                    self.wsgi = create_server(self.app, sockets=inherited, **options)
                elif self._unix_socket:
                    self.wsgi = create_server(
                        self.app, unix_socket=self._unix_socket, unix_socket_perms="600", **options
                    )
                else:
                    self.wsgi = create_server(
                        self.app, host=config.host, port=config.port, **options
                    )
            except OSError as exc:  # in use, not permitted, no such directory
                raise StartupError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
        except BaseException:
            self.server.stop()
            raise
        guard_connections(self.wsgi, config.header_timeout, config.stall_timeout)
        self.app.extensions["crushd.guard"].add_listen_hosts(self._listen_hosts())
        return self

    @property
    def addresses(self) -> list[str]:
        names = []
        for dispatcher in list(self._map().values()):
            sock = getattr(dispatcher, "socket", None)
            if getattr(dispatcher, "accepting", False) and sock is not None:
                name = sock.getsockname()
                names.append(name if isinstance(name, str) else f"{name[0]}:{name[1]}")
        return names

    def _listen_hosts(self) -> list[str]:
        """The TCP addresses listened on, as Host names (IPv6 in brackets)."""
        hosts = []
        for dispatcher in list(self._map().values()):
            sock = getattr(dispatcher, "socket", None)
            if getattr(dispatcher, "accepting", False) and sock is not None:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    hosts.append(f"[{name[0]}]" if ":" in name[0] else name[0])
        return hosts

    def _map(self) -> dict[int, Any]:
        # A single-socket server keeps its channel map in ``_map``; the
        # multi-socket one (several inherited sockets) in ``map``.
        return self.wsgi._map if hasattr(self.wsgi, "_map") else self.wsgi.map

    # -- signals ---------------------------------------------------------------

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.server.stop_control.signal(
            signal.Signals(signum).name, before=self._notify_stopping, after=self._close_listeners
        )

    def begin_stop(self, reason: str) -> None:
        """Start the stop sequence on its own thread; idempotent."""
        self.server.stop_control.request(
            reason, before=self._notify_stopping, after=self._close_listeners
        )

    def _notify_stopping(self) -> None:
        systemd.stopping(self._status_text("stopping"))
        config = self.config
        if config.drain_timeout > 0:
            # A drain may outlast TimeoutStopSec=: ask for the whole stop's budget.
            budget = close_budget(config, config.drain_timeout, config.shutdown_timeout)
            systemd.extend_timeout(budget)

    def _close_listeners(self) -> None:
        channels = self._map()
        trigger = next((d for d in list(channels.values()) if isinstance(d, WaitressTrigger)), None)
        if trigger is None:  # the loop is already gone
            return
        trigger.pull_trigger(lambda: wasyncore.close_all(channels))

    # -- systemd -------------------------------------------------------------

    def _status_text(self, state: str) -> str:
        health = self.server.health()
        return f"{state}: {health['workspaces']} workspaces, {health['active_runs']} active runs"

    def _self_check(self) -> bool:
        """A real request to our own listener: proves the loop and a worker thread serve."""
        addresses = self.addresses
        if not addresses:
            return False
        address = addresses[0]
        try:
            if address.startswith("/"):
                transport = httpx.HTTPTransport(uds=address)
                with httpx.Client(transport=transport, timeout=5) as client:
                    ok = client.get("http://crushd/v1/health").status_code == 200
            else:
                host, _, port = address.rpartition(":")
                host = "127.0.0.1" if host in ("0.0.0.0", "") else host
                host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
                with httpx.Client(timeout=5) as client:
                    ok = client.get(f"http://{host}:{port}/v1/health").status_code == 200
        except httpx.HTTPError:
            return False
        if ok:
            systemd.status(self._status_text("serving"))
        return ok

    # -- main ----------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; blocks the calling (main) thread."""
        logger.info(
            "event=listening addresses=%s threads=%d max_streams=%d",
            ",".join(self.addresses),
            self.config.threads,
            self.config.max_streams,
        )
        systemd.ready(self._status_text("serving"))
        interval = systemd.watchdog_interval()
        if interval:
            self._watchdog = systemd.Watchdog(interval, self._self_check, threading.Event())
            self._watchdog.start()
        try:
            self.wsgi.run()
        finally:
            if self._watchdog is not None:
                self._watchdog.stop()
            self.begin_stop("loop ended")
            self.server.stop_control.join()
            self.wsgi.task_dispatcher.shutdown(timeout=5)
            wasyncore.close_all(self._map())
            if self._unix_socket:  # clients should see "no such socket", not "refused"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._unix_socket)
        logger.info("event=exit status=0")
        return 0


def serve(config: Config) -> int:
    runner = Runner(config).start()
    runner.install_signals()
    return runner.run()
