"""The process-wide server: workspace registry, data-directory lock, stop.

:class:`Server` owns every open :class:`~crushd.workspace.Workspace`, the
registry database, the provider and the SSE stream slots.  It knows nothing
about HTTP; :mod:`crushd.app` puts Flask in front of it and
:mod:`crushd.serve` runs it under waitress with signals and systemd.

Build, then start: ``Server(config)`` only wires its parts (the provider,
the tools and the clock can be passed in); :meth:`Server.start` takes the
data directory, opens the registry and every registered workspace and
dispatches their recovered runs; :meth:`Server.stop` undoes it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from crushd import __version__
from crushd.config import Config, SandboxSettings
from crushd.errors import (
    AlreadyRunning,
    InvalidRequest,
    NotFound,
    ShuttingDown,
    StartupError,
    WorkspaceClosing,
)
from crushd.gate import StartGate
from crushd.mcp import McpLoop
from crushd.metrics import Metrics
from crushd.providers import PROVIDERS, Provider
from crushd.providers.base import ProviderError
from crushd.providers.catalog import ModelCatalog
from crushd.registry import RegistryStore
from crushd.signals import Signals
from crushd.stopping import StopController
from crushd.tools import Tool, default_tools
from crushd.tools.sandbox import Bubblewrap, Sandbox, command_env, detect, sandbox_for
from crushd.workspace import Workspace, close_budget

logger = logging.getLogger(__name__)

LOCK_NAME = "crushd.lock"


def _log_event(workspace_id: str, event: Any) -> None:
    """With --log-level debug, every published event is one log line."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "event=published type=%s seq=%d workspace=%s session=%s",
            event.type,
            event.seq,
            workspace_id,
            event.session_id,
        )


def _not_open(record: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a registered workspace that was not opened."""
    return {
        "id": record["id"],
        "path": record["path"],
        "yolo": record["yolo"],
        "sandbox": "off",
        "created_at": record["created_at"],
        "closing": False,
        "active_runs": 0,
        "queued_runs": 0,
        "open": False,
        "closed_reason": record["closed_reason"],
    }


class DataDirLock:
    """An exclusive ``flock`` on ``<data dir>/crushd.lock``, held for the
    process lifetime; the kernel drops it if the process dies."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise AlreadyRunning(
                f"another crushd process (pid {holder}) is already using the data directory "
                f"{data_dir}; stop it or choose another --data-dir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class Server:
    """Registry of open workspaces.  Thread-safe once started.

    ``provider``, when given, serves the default model (the other models
    build their clients from the configuration as usual).  ``tools`` (one
    mapping shared by every workspace) defaults to a fresh
    :func:`default_tools` set per workspace, ``clock`` (monotonic seconds, for the uptime and the
    coalescing of streamed writes) to :func:`time.monotonic`, ``bubblewrap``
    (whether the bash sandbox works here) to what :func:`detect` finds at
    :meth:`start`.  Constructing opens no file and starts no thread or
    process; the provider is the server's from here on and :meth:`stop`
    closes it.
    """

    def __init__(
        self,
        config: Config,
        *,
        provider: Provider | None = None,
        tools: Mapping[str, Tool] | None = None,
        clock: Callable[[], float] | None = None,
        bubblewrap: Bubblewrap | None = None,
    ) -> None:
        self.config = config
        self.version = __version__
        self.data_dir = config.resolved_data_dir()
        self.token: str | None = None  # the API token, read from its file by start()
        self.models = ModelCatalog(
            config.models,
            config.default_model or "",
            echo_delay=config.echo_delay,
            idle_timeout=config.stream_idle_timeout,
            providers={config.default_model or "": provider} if provider is not None else None,
        )
        self._tools = tools
        self.bubblewrap = bubblewrap  # detected by start() unless given
        self.clock = clock or time.monotonic
        self.signals = Signals()
        # One permanent receiver, connected before any workspace opens.
        self.signals.event_published.connect(_log_event, weak=False)
        self.metrics = Metrics(
            self.signals,
            runs_active=lambda: sum(w.active_run_count() for w in self.workspaces()),
            runs_queued=lambda: sum(w.queued_run_count() for w in self.workspaces()),
            event_streams=lambda: sum(w.hub.subscriber_count for w in self.workspaces()),
            checkpoint_bytes=lambda: sum(w.checkpoints.size for w in self.workspaces()),
        )
        self.started = self.clock()
        # The one owner of "stop requested" and "stop now" (crushd.stopping).
        self.stop_control = StopController(self.stop)
        self.registry: RegistryStore | None = None  # opened by start()
        self._dir_lock: DataDirLock | None = None  # taken by start()
        # Guards the workspace map and the started/closed flags; a leaf: held
        # only for dict and flag updates, never while a workspace opens,
        # closes or answers.
        self._workspaces_lock = threading.Lock()
        self._workspaces: dict[str, Workspace] = {}  # guarded by _workspaces_lock
        # Registered workspaces start() did not open (outside --allow-root),
        # id -> registry record with its "closed_reason"; guarded by _workspaces_lock.
        self._refused: dict[str, dict[str, Any]] = {}
        self._started = False  # guarded by _workspaces_lock
        self._closed = False  # guarded by _workspaces_lock; True once stop() began
        self._stopped = threading.Event()  # set when stop() has finished
        # Serializes registrations, so two POSTs of one path open it once.
        self._register_lock = threading.Lock()
        self._streams = threading.BoundedSemaphore(config.max_streams)
        # The one asyncio loop of the process, for every workspace's MCP
        # servers; its thread starts with the first server and ends in stop().
        self.mcp_loop = McpLoop()
        # The prompts being accepted by any workspace, and the runs held
        # while there are any (crushd.gate): one for the process, as they all
        # share the GIL.  A run is held until the count reaches zero (and
        # stays there a moment), not only until the prompts in flight when
        # it came are accepted: in a burst most are still queued in waitress
        # then, and that variant lost the gain.  It keeps real time, not
        # ``clock``: its timer waits in real seconds.
        self.gate = StartGate()

    @property
    def stopping(self) -> threading.Event:
        """Set once a stop began: prompts and registrations get 503."""
        return self.stop_control.requested

    @property
    def skip_drain(self) -> threading.Event:
        """Set by a second stop signal: running turns stop waiting out the drain."""
        return self.stop_control.now

    def _build_default_model(self) -> None:
        """Build the default model's client now rather than in the first run:
        the first build imports the HTTP stack and loads the CA bundle
        (about 200 ms measured), which the first prompt after a start would
        otherwise wait for.  One that cannot be built (its key is missing)
        is left to fail its runs with the reason, as any model does."""
        try:
            self.models.provider(self.models.default)
        except ProviderError:
            pass

    def start(self) -> Server:
        """Read the token file, take the data directory's lock, open the
        registry and every registered workspace, and dispatch their
        recovered runs.

        Blocks while the workspaces recover; returns the server.  Idempotent.
        Raises :class:`AlreadyRunning` when another process holds the data
        directory; a failed start closes what it opened (and the provider):
        the server cannot be started again.
        """
        with self._workspaces_lock:
            if self._closed:
                raise RuntimeError("a stopped server cannot be started again")
            if self._started:
                return self
            self._started = True
        try:
            self.token = self.config.resolved_token()
            try:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                self._dir_lock = DataDirLock(self.data_dir)
            except OSError as exc:  # not permitted, read-only, not a directory
                raise StartupError(
                    f"cannot use the data directory {self.data_dir}: {exc.strerror or exc}"
                ) from exc
            if self.bubblewrap is None:
                self.bubblewrap = detect()
            self._build_default_model()
            self.registry = RegistryStore(self.data_dir / "registry.db")
            for record in self.registry.registered():
                reason = self._outside_roots(record["path"])
                if reason is None:
                    self._open(record)
                    continue
                # Registered under a wider --allow-root: kept, not opened.
                with self._workspaces_lock:
                    self._refused[record["id"]] = {**record, "closed_reason": reason}
                logger.warning(
                    "event=workspace_not_opened workspace=%s path=%s reason=%r",
                    record["id"],
                    record["path"],
                    reason,
                )
        except BaseException:
            self.stop()
            raise
        logger.info(
            "event=server_ready data_dir=%s workspaces=%d models=%s default_model=%s version=%s",
            self.data_dir,
            len(self.workspaces()),
            ",".join(self.models.names),
            self.models.default,
            __version__,
        )
        for model, variable in self.models.missing_keys():
            logger.warning(
                "event=model_key_missing model=%s variable=%s "
                "message='runs on model %s will fail until %s is set'",
                model,
                variable,
                model,
                variable,
            )
        return self

    def _open(self, record: dict[str, Any]) -> Workspace:
        tools = dict(self._tools) if self._tools is not None else default_tools()
        settings = self.config.sandbox_settings(record["path"])
        hidden = self._hidden(settings)
        workspace = Workspace(
            record,
            self.data_dir,
            self.config,
            self.models,
            tools,
            self.signals,
            self.clock,
            mcp_loop=self.mcp_loop,
            sandbox=self._sandbox_for(record["path"], settings, hidden),
            hidden=hidden,
            tool_env=command_env(settings.env),
            gate=self.gate,
        )
        with self._workspaces_lock:
            self._workspaces[workspace.id] = workspace
        workspace.start()
        logger.info("event=workspace_opened workspace=%s path=%s", workspace.id, workspace.path)
        return workspace

    def _hidden(self, settings: SandboxSettings) -> tuple[str, ...]:
        """What no tool of the workspace may see: crushd's own data, token,
        config file and socket, and the workspace's ``sandbox_hide`` paths,
        resolved."""
        paths = [
            str(self.data_dir),
            self.config.token_file,
            self.config.source_file,
            self.config.unix_socket,
            *settings.hide,
        ]
        return tuple(dict.fromkeys(os.path.realpath(os.path.expanduser(p)) for p in paths if p))

    def _sandbox_for(
        self, path: str, settings: SandboxSettings, hidden: tuple[str, ...]
    ) -> Sandbox | None:
        """How bash runs in the workspace at ``path``: None when unsandboxed.
        What crushd itself keeps secret (``hidden``, the model keys) stays
        out of the sandbox."""
        if self.bubblewrap is None:
            return None
        keys = [facts.api_key_env for facts in PROVIDERS.values()]
        for spec in self.config.models.values():
            keys.append(spec.api_key_env or PROVIDERS[spec.provider].api_key_env)
        return sandbox_for(
            self.bubblewrap,
            path,
            settings.mode,
            settings.network,
            read=settings.read,
            private=hidden,
            masked=hidden,
            unset_env=[k for k in keys if k],
        )

    def _registry(self) -> RegistryStore:
        if self.registry is None:
            raise RuntimeError("the server is not started")
        return self.registry

    # -- workspaces ------------------------------------------------------------

    def resolve_path(self, raw: str) -> str:
        if not raw or "\0" in raw:
            raise InvalidRequest("path must be a non-empty string")
        try:
            path = Path(raw).expanduser()
        except RuntimeError:  # "~user/..." naming no user
            raise InvalidRequest(f"path names an unknown user's home: {raw[:200]}") from None
        if not path.is_absolute():
            raise InvalidRequest(f"path must be absolute: {raw[:200]}")
        real = Path(os.path.realpath(path))
        try:
            is_dir = real.is_dir()
        except OSError as exc:  # a name too long, a permission denied on the way
            raise InvalidRequest(f"path cannot be used: {exc.strerror}: {raw[:200]}") from None
        if not is_dir:
            raise InvalidRequest(f"path is not an existing directory: {raw[:200]}")
        reason = self._outside_roots(str(real))
        if reason is not None:
            raise InvalidRequest(reason)
        return str(real)

    def _outside_roots(self, path: str) -> str | None:
        """Why ``path`` may not be a workspace under ``--allow-root``, or None."""
        roots = [Path(os.path.realpath(Path(r).expanduser())) for r in self.config.allow_roots]
        real = Path(os.path.realpath(path))
        if roots and not any(real == r or real.is_relative_to(r) for r in roots):
            return f"path {real} is outside the allowed roots ({', '.join(map(str, roots))})"
        return None

    def register(self, raw_path: str, yolo: bool | None) -> tuple[dict[str, Any], bool]:
        """Register a directory; returns ``(workspace, created)``."""
        if self.stopping.is_set():
            raise ShuttingDown("the server is stopping")
        path = self.resolve_path(raw_path)
        with self._register_lock:
            known = next((w for w in self.workspaces() if str(w.path) == path), None)
            if known is not None:
                if known.closing:
                    raise WorkspaceClosing(f"workspace {known.id} is closing")
                return known.to_dict(), False
            record, how = self._registry().register(path, yolo)
            workspace = self._open(record)
        logger.info("event=workspace_registered workspace=%s how=%s", workspace.id, how)
        return workspace.to_dict(), how != "existing"

    def get(self, workspace_id: str) -> Workspace:
        """The open workspace; 404 if unknown, 409 if registered but not open."""
        with self._workspaces_lock:
            workspace = self._workspaces.get(workspace_id)
            refused = self._refused.get(workspace_id)
        if refused is not None:
            raise WorkspaceClosing(
                f"workspace {workspace_id} is not open: {refused['closed_reason']}"
            )
        if workspace is None:
            raise NotFound(f"workspace {workspace_id} not found")
        return workspace

    def describe(self, workspace_id: str | None = None) -> Any:
        """The JSON of one workspace (or, without an id, of all of them),
        those registered but not opened included, with their reason."""
        with self._workspaces_lock:
            if workspace_id is None:
                open_ones = list(self._workspaces.values())
                refused = list(self._refused.values())
            else:
                found = self._workspaces.get(workspace_id)
                open_ones = [found] if found is not None else []
                refused = [self._refused[workspace_id]] if workspace_id in self._refused else []
        described = [w.to_dict() for w in open_ones] + [_not_open(r) for r in refused]
        if workspace_id is None:
            return described
        if not described:
            raise NotFound(f"workspace {workspace_id} not found")
        return described[0]

    def workspaces(self) -> list[Workspace]:
        with self._workspaces_lock:
            return list(self._workspaces.values())

    def unregister(self, workspace_id: str, purge: bool = False) -> None:
        """Close a workspace in the contract's order, then forget it.  Blocks."""
        with self._workspaces_lock:
            refused = self._refused.pop(workspace_id, None)
        if refused is not None:  # never opened: nothing to close
            self._registry().unregister(workspace_id, purge)
            if purge:
                shutil.rmtree(self.data_dir / "workspaces" / workspace_id, ignore_errors=True)
            logger.info("event=workspace_unregistered workspace=%s purge=%s", workspace_id, purge)
            return
        workspace = self.get(workspace_id)
        if not workspace.close():  # a concurrent DELETE's close has not finished
            raise WorkspaceClosing(f"workspace {workspace_id} is still closing")
        with self._workspaces_lock:
            if self._workspaces.get(workspace_id) is not workspace:
                return  # a concurrent DELETE finished first
            del self._workspaces[workspace_id]
        self._registry().unregister(workspace_id, purge)
        if purge:
            shutil.rmtree(workspace.directory, ignore_errors=True)
        logger.info("event=workspace_unregistered workspace=%s purge=%s", workspace_id, purge)

    # -- streams -------------------------------------------------------------

    def acquire_stream(self) -> bool:
        return self._streams.acquire(blocking=False)

    def release_stream(self) -> None:
        self._streams.release()

    # -- health --------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """From memory only, taking no lock a database call may hold: it
        answers in milliseconds whatever the databases are doing.
        ``storage`` is ``unavailable`` while any workspace's database
        refuses writes; ``checkpoint_bytes`` is the checkpoint stores' disk
        use as last measured."""
        workspaces = self.workspaces()
        return {
            "status": "stopping" if self.stopping.is_set() else "ok",
            "version": __version__,
            "workspaces": len(workspaces),
            "active_runs": sum(w.active_run_count() for w in workspaces),
            "uptime_s": round(self.clock() - self.started, 3),
            "sandbox": "bwrap" if self.bubblewrap and self.bubblewrap.available else "unavailable",
            "sandbox_isolation": self.bubblewrap.describe() if self.bubblewrap else None,
            "storage": "ok" if all(w.storage_available for w in workspaces) else "unavailable",
            "checkpoint_bytes": sum(w.checkpoints.size for w in workspaces),
        }

    # -- stop ----------------------------------------------------------------

    def stop(self) -> bool:
        """Server stop: every workspace runs the shutdown order in parallel,
        with the drain, keeping queued runs for the next start.  Then the
        registry and the data-directory lock are released.  Blocks;
        idempotent: a second caller waits for the first (as long as a whole
        stop may take) and learns whether it finished.  Returns True once
        the server is stopped."""
        with self._workspaces_lock:
            first = not self._closed
            self._closed = True
        if not first:
            config = self.config
            return self._stopped.wait(
                close_budget(config, config.drain_timeout, config.shutdown_timeout)
            )
        self.stop_control.mark()
        workspaces = self.workspaces()
        logger.info(
            "event=server_stopping workspaces=%d drain_timeout=%s",
            len(workspaces),
            self.config.drain_timeout,
        )
        threads = [
            threading.Thread(target=self._close_quietly, args=(w,), name=f"crushd-close-{w.id[:8]}")
            for w in workspaces
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with self._workspaces_lock:
            self._workspaces.clear()
        self.mcp_loop.stop()
        self.models.close()
        if self.registry is not None:
            self.registry.close()
        if self._dir_lock is not None:
            self._dir_lock.release()
        self._stopped.set()
        logger.info("event=server_stopped")
        return True

    def _close_quietly(self, workspace: Workspace) -> None:
        try:
            workspace.close(
                keep_queued=True,
                drain_timeout=self.config.drain_timeout,
                skip_drain=self.skip_drain,
            )
        except Exception:  # one workspace must not keep the others open
            logger.exception("event=workspace_close_failed workspace=%s", workspace.id)
