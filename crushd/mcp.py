"""MCP servers: the user's own tools, behind crushd's permissions,
cancellation and shutdown.

Shape (why it is built this way):

* The official ``mcp`` SDK is asyncio (anyio) only, and crushd is threads.
  One :class:`McpLoop` per process owns the only event loop, on one thread;
  every connection of every workspace lives on it as an asyncio task.  Run
  threads never touch asyncio: they call the synchronous :meth:`McpClient.call`,
  which submits a coroutine with ``run_coroutine_threadsafe`` and registers
  ``future.cancel`` with the run's token.  A cancel therefore cancels the
  asyncio task at once; the SDK answers a cancelled request by sending
  ``notifications/cancelled`` to the server, and the run thread is free
  within milliseconds.  No loop per call, no loop per workspace, nothing
  for a thread to forget to close.
* anyio context managers must be entered and left by the same task, so a
  connection is one long task (:meth:`McpClient._connection`) that opens the
  transport, initializes, lists the tools, then waits for "stop" or "the
  server went away".  Calls are separate tasks using its session.
* A local server is started through :mod:`crushd.mcp_child`, a tiny
  supervisor that sets ``PR_SET_PDEATHSIG`` and kills the server's whole
  process group when crushd dies, even by ``kill -9``; the SDK spawns the
  process itself and offers no ``preexec_fn``, so a wrapper is the only way
  in.  Its pid (the group id) comes back through a pid file, so a stop that
  overruns its deadline can SIGKILL the group itself.

The ``[mcp.NAME]`` tables are read by :mod:`crushd.mcp_config`; what a
tool call looks like to the run loop is :mod:`crushd.tools.mcp`.

Thread-safety: :class:`McpLoop`, :class:`McpClient` and :class:`WorkspaceMcp`
public methods may be called from any thread.  Attributes marked "loop only"
are touched only by coroutines running on the loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from crushd.cancel import Cancelled, CancelToken
from crushd.mcp_config import WORKSPACE_CWD, McpServerConfig, safe_name
from crushd.procgroup import live_members, signal_group
from crushd.tools.base import Tool, ToolResult
from crushd.tools.common import truncate
from crushd.tools.mcp import McpTool, result_text
from crushd.tools.sandbox import Sandbox

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0  # seconds for a server to start, initialize and list its tools
STOP_TIMEOUT = 5.0  # seconds a workspace close gives its servers before killing them
STDERR_TAIL = 2000  # characters of a server's stderr quoted in its error
RETRY_INTERVAL = 30.0  # seconds before a run start tries a server that never connected again
STATUSES = ("starting", "connected", "failed", "disabled")
_CHILD = Path(__file__).with_name("mcp_child.py")


# -- the event loop ----------------------------------------------------------


class McpLoop:
    """The process's one asyncio event loop, on a thread of its own, started
    at the first :meth:`submit` and ended by :meth:`stop`.  Thread-safe."""

    def __init__(self) -> None:
        self._loop_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # guarded by _loop_lock
        self._thread: threading.Thread | None = None  # guarded by _loop_lock
        self._stopped = False  # guarded by _loop_lock

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Schedule ``coro`` on the loop; never blocks.  Raises RuntimeError once stopped."""
        with self._loop_lock:
            if self._stopped:
                coro.close()
                raise RuntimeError("the MCP event loop has stopped")
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._run, args=(self._loop,), name="crushd-mcp-loop", daemon=True
                )
                self._thread.start()
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(coro, loop)

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop (its tasks are cancelled) and join its thread.  Blocks
        up to ``timeout``; idempotent.  Stop the workspaces' servers first."""
        with self._loop_lock:
            self._stopped = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("event=mcp_loop_stuck timeout=%s", timeout)


# -- one server --------------------------------------------------------------


def installation_of(executable: str) -> tuple[str, ...]:
    """The directories a server's program is installed in, which its
    sandbox must show even where it hides them (a virtualenv, or the Python
    it was made from, in a home directory): a virtualenv's root and its base
    Python's prefix, else the program's own directory."""
    venv = os.path.dirname(os.path.dirname(os.path.abspath(executable)))
    try:
        with open(os.path.join(venv, "pyvenv.cfg"), encoding="utf-8") as f:
            pairs = [line.partition("=") for line in f]
    except OSError:  # not a virtualenv
        return (os.path.dirname(os.path.realpath(executable)),)
    home = next((v.strip() for k, eq, v in pairs if eq and k.strip() == "home"), "")
    base = [os.path.dirname(os.path.realpath(home))] if home else []
    return tuple(dict.fromkeys([venv, os.path.realpath(venv), *base]))


class McpUnavailable(Exception):
    """The server cannot take calls now; the message says why."""


class McpClient:
    """One configured server of one workspace: its connection on the loop,
    its status and tools, and the synchronous :meth:`call` run threads use."""

    def __init__(
        self,
        config: McpServerConfig,
        root: Path,
        loop: McpLoop,
        on_status: Callable[[dict[str, Any]], None],
        run_dir: Path | None = None,
        workspace_id: str = "",
        retry_interval: float = RETRY_INTERVAL,
        sandbox: Sandbox | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._root = root
        # How a local server is confined: the workspace's bash sandbox,
        # unless its table says sandbox = false.  None: unsandboxed.
        self._sandbox = sandbox if config.sandbox else None
        self._loop = loop
        self._on_status = on_status
        self._run_dir = run_dir
        self._workspace_id = workspace_id
        self._status_lock = threading.Lock()
        self._status = "starting" if config.enabled else "disabled"  # guarded by _status_lock
        self._error: str | None = None  # guarded by _status_lock
        self._tools: list[Any] = []  # mcp Tool models; guarded by _status_lock
        self._pgid: int | None = None  # the supervisor's pid; guarded by _status_lock
        self._attempted_at: float | None = None  # by _clock; guarded by _status_lock
        self._retry_interval = retry_interval
        self._clock = clock  # monotonic seconds, for the retry interval
        self._closed = False  # loop only
        self._task: asyncio.Task[None] | None = None  # loop only
        self._ready: asyncio.Future[None] | None = None  # loop only
        self._stop: asyncio.Event | None = None  # loop only
        self._lost: asyncio.Event | None = None  # loop only
        self._session: Any = None  # loop only

    @property
    def name(self) -> str:
        return self.config.name

    def entry(self) -> dict[str, Any]:
        """The server's entry of ``GET /v1/workspaces/{id}/mcp``."""
        with self._status_lock:
            return {
                "name": self.config.name,
                "transport": self.config.transport,
                "status": self._status,
                "tools": [t.name for t in self._tools],
                "error": self._error,
            }

    def offered_tools(self) -> list[McpTool]:
        """Tools to offer the model: those of the last successful connection,
        minus ``disabled_tools``.  A server that crashed keeps offering them,
        so the next call can restart it.  One that never connected (down, or
        not installed yet) is tried again in the background, at most once per
        ``retry_interval``: this run goes without it, a later one may not."""
        now = self._clock()
        with self._status_lock:
            tools = list(self._tools)
            retry = (
                self._status == "failed"
                and not tools
                and self._attempted_at is not None
                and now - self._attempted_at >= self._retry_interval
            )
            if retry:
                self._attempted_at = now
        if retry:
            logger.info("event=mcp_retry server=%s workspace=%s", self.name, self._workspace_id)
            with contextlib.suppress(RuntimeError):  # the loop stopped: crushd is stopping
                self.start()
        offered = []
        for tool in tools:
            if not self.config.lists(self.config.disabled_tools, tool.name):
                offered.append(McpTool(self, tool))
        return offered

    def start(self) -> None:
        """Begin connecting in the background; never blocks."""
        if self.config.enabled:
            self._loop.submit(self._begin())

    # -- the synchronous facade --------------------------------------------

    def call(
        self, tool: str, arguments: dict[str, Any], token: CancelToken, max_output: int
    ) -> ToolResult:
        """Call ``tool`` and wait for its result.  Blocks at most the server's
        ``timeout`` plus a restart; a cancel of ``token`` raises
        :class:`Cancelled` at once (the server is sent ``notifications/cancelled``).
        Thread-safe."""
        token.raise_if_cancelled()
        try:
            future = self._loop.submit(self._call(tool, arguments))
        except RuntimeError:  # the loop has stopped: crushd is stopping
            return ToolResult(f"MCP server {self.name} is unavailable: crushd is stopping", True)
        handle = token.on_cancel(future.cancel)
        try:
            result = future.result(self.config.timeout + CONNECT_TIMEOUT + 5)
        except concurrent.futures.CancelledError:
            raise Cancelled(token.reason or "cancelled") from None
        except concurrent.futures.TimeoutError:
            future.cancel()
            return ToolResult(f"MCP server {self.name}: no answer", True)
        finally:
            token.remove_callback(handle)
        return ToolResult(truncate(result.content, max_output), result.is_error)

    # -- on the loop ---------------------------------------------------------

    async def _begin(self) -> None:
        if self._closed or (self._task is not None and not self._task.done()):
            return
        with self._status_lock:
            self._attempted_at = self._clock()
        self._ready = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._lost = asyncio.Event()
        self._task = asyncio.create_task(self._connection(), name=f"mcp-{self.name}")

    async def _call(self, tool: str, arguments: dict[str, Any]) -> ToolResult:
        timeout = self.config.timeout
        try:
            async with asyncio.timeout(timeout):
                session = await self._connected()
                result = await session.call_tool(tool, arguments)
        except TimeoutError:
            logger.info(
                "event=mcp_call_timeout server=%s tool=%s timeout=%s", self.name, tool, timeout
            )
            return ToolResult(f"MCP server {self.name}: {tool} timed out after {timeout:g} s", True)
        except McpUnavailable as exc:
            return ToolResult(f"MCP server {self.name} is unavailable: {exc}", True)
        except Exception as exc:  # protocol or transport error; the model should hear it
            message = describe_error(exc)
            if _connection_lost(exc) and self._lost is not None:
                self._lost.set()
                message += " (the server will be restarted at the next call)"
            return ToolResult(f"MCP server {self.name}: {tool} failed: {message}", True)
        return ToolResult(result_text(result), bool(result.is_error))

    async def _connected(self) -> Any:
        if self._task is None or self._task.done():
            if self._closed:
                raise McpUnavailable("the workspace is closing")
            logger.info("event=mcp_restart server=%s workspace=%s", self.name, self._workspace_id)
            await self._begin()
        assert self._ready is not None
        await asyncio.shield(self._ready)
        if self._session is None:
            with self._status_lock:
                raise McpUnavailable(self._error or "not connected")
        return self._session

    async def _connection(self) -> None:
        """Open, initialize, list tools, then hold the connection until stop
        or loss.  Every exit sets the status; none raises."""
        assert self._ready is not None and self._stop is not None and self._lost is not None
        self._set_status("starting", None)
        stderr = StderrTail(self.name)
        error: str | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await self._open(stack, stderr)
                read = await _watch(stack, read, self._lost)
                from mcp.client.session import ClientSession

                session = await stack.enter_async_context(ClientSession(read, write))
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await session.initialize()
                    tools = await _list_tools(session)
                self._session = session
                with self._status_lock:
                    self._tools = tools
                self._set_status("connected", None)
                logger.info(
                    "event=mcp_connected server=%s workspace=%s tools=%d",
                    self.name,
                    self._workspace_id,
                    len(tools),
                )
                self._ready.set_result(None)
                await _first(self._stop.wait(), self._lost.wait())
                self._session = None
                if not self._stop.is_set():
                    error = "the server closed the connection; it restarts at the next call"
        except TimeoutError:
            error = f"no answer to initialize within {CONNECT_TIMEOUT:g} s"
        except Exception as exc:  # anything the server or transport did: the status says it
            error = describe_error(exc)
        finally:
            self._session = None
            if not self._ready.done():
                self._ready.set_result(None)
            if error is not None:
                stderr.close()
                error = f"{error}; stderr: {stderr.tail}" if stderr.tail else error
                logger.warning(
                    "event=mcp_failed server=%s workspace=%s error=%s",
                    self.name,
                    self._workspace_id,
                    json.dumps(error),
                )
                self._set_status("failed", error)
            stderr.close()
            await self._kill_leftovers()

    async def _open(self, stack: contextlib.AsyncExitStack, stderr: StderrTail) -> tuple[Any, Any]:
        config = self.config
        if config.transport == "stdio":
            from mcp.client.stdio import StdioServerParameters, stdio_client

            assert config.command is not None
            env_path = config.env.get("PATH", os.environ.get("PATH", os.defpath))
            cwd = self._cwd()
            executable = shutil.which(config.command, path=env_path)
            if executable is None and os.sep in config.command:
                candidate = os.path.join(cwd, config.command)
                executable = candidate if os.access(candidate, os.X_OK) else None
            if executable is None:
                raise McpUnavailable(f"command not found: {config.command}")
            env = dict(config.env)
            if (pidfile := self._pidfile) is not None:
                pidfile.unlink(missing_ok=True)
                env["CRUSHD_MCP_PIDFILE"] = str(pidfile)
            params = StdioServerParameters(
                command=sys.executable,
                args=["-I", str(_CHILD), str(os.getpid()), *self._launch(executable)],
                env=env,
                cwd=cwd,
            )
            with stderr.pipe() as errlog:
                streams = await stack.enter_async_context(stdio_client(params, errlog=errlog))
            self._read_pgid()
            return streams
        import httpx2

        if config.transport == "sse":
            from mcp.client.sse import sse_client

            return await stack.enter_async_context(sse_client(config.url, headers=config.headers))
        from mcp.client.streamable_http import streamable_http_client

        client = await stack.enter_async_context(
            httpx2.AsyncClient(headers=config.headers, timeout=httpx2.Timeout(30, read=300))
        )
        return await stack.enter_async_context(
            streamable_http_client(config.url, http_client=client)
        )

    def _cwd(self) -> str:
        """Where a local server starts: the workspace only when its table
        says ``cwd = "workspace"``.  By default ``/``, where nothing the
        model writes can be: run in the workspace, ``python3 -m json.tool``
        would import a ``json/__init__.py`` the model wrote, and ``npx`` or
        ``./server`` run what it put there — outside the sandbox, at the
        next start."""
        if self.config.cwd == WORKSPACE_CWD:
            return str(self._root)
        return self.config.cwd or "/"

    def _launch(self, executable: str) -> list[str]:
        """The supervisor's arguments after its parent pid: the server's
        command line, in the sandbox when there is one."""
        config = self.config
        assert config.command is not None
        command = [config.command, *config.args]
        sandbox = self._sandbox
        if sandbox is None:
            return ["--", *command]
        # Inside, the private /tmp is the empty directory to start in.
        chdir = self._cwd() if config.cwd else "/tmp"
        # What the user's own table names must work: the program's
        # installation, and files or directories given by absolute path.
        named = [a for a in config.args if os.path.isabs(a) and os.path.exists(a)]
        shown = [p for p in (*installation_of(executable), *named) if p not in sandbox.read]
        if shown:
            sandbox = dataclasses.replace(sandbox, read=(*sandbox.read, *shown))
        network: list[str] = []
        if sandbox.online:
            assert sandbox.slirp4netns is not None
            network = ["--slirp4netns", sandbox.slirp4netns]
            if "--unshare-user" in sandbox.isolation:
                network.append("--own-userns")
        return [*network, "--", *sandbox.argv(command, chdir=chdir)]

    @property
    def _pidfile(self) -> Path | None:
        return self._run_dir / f"{safe_name(self.name)}.pid" if self._run_dir else None

    def _read_pgid(self) -> None:
        if (path := self._pidfile) is None:
            return
        try:
            pgid = int(path.read_text())
        except (OSError, ValueError):  # the supervisor had not written it yet, or failed
            return
        with self._status_lock:
            self._pgid = pgid

    async def _kill_leftovers(self) -> None:
        """After the SDK's own shutdown (stdin closed, SIGTERM, SIGKILL to the
        group if the server lingers), kill what the server left in its group."""
        if self._pgid is None:
            self._read_pgid()
        with self._status_lock:
            pgid, self._pgid = self._pgid, None
        if pgid is not None and live_members(pgid):
            signal_group(pgid, signal.SIGKILL, "leftovers", who="mcp")
        if (pidfile := self._pidfile) is not None:
            # The group is gone: a file naming it would only keep the run
            # directory alive after a kill -9 (each supervisor removes its
            # own then, and the last one the directory).
            pidfile.unlink(missing_ok=True)

    async def _shutdown(self) -> None:
        self._closed = True
        if self._task is not None and not self._task.done():
            assert self._stop is not None
            self._stop.set()
            await asyncio.shield(self._task)

    def kill(self) -> bool:
        """SIGKILL the server's process group now; True if there was one.  Thread-safe."""
        if self._pgid is None:
            self._read_pgid()
        with self._status_lock:
            pgid = self._pgid
        return pgid is not None and signal_group(pgid, signal.SIGKILL, "stop_overran", who="mcp")

    def _set_status(self, status: str, error: str | None) -> None:
        with self._status_lock:
            changed = (status, error) != (self._status, self._error)
            self._status, self._error = status, error
        if changed:
            self._on_status(self.entry())


async def _watch(stack: contextlib.AsyncExitStack, read: Any, lost: asyncio.Event) -> Any:
    """Relay the transport's read stream so the end of it (the server exited
    or the connection dropped) sets ``lost`` even when no call is waiting."""
    import anyio

    send, receive = anyio.create_memory_object_stream[Any](0)
    group = await stack.enter_async_context(anyio.create_task_group())
    stack.callback(group.cancel_scope.cancel)

    async def relay() -> None:
        async with send:
            with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
                async for item in read:
                    await send.send(item)
        lost.set()

    group.start_soon(relay)
    stack.push_async_callback(receive.aclose)
    return receive


async def _first(*aws: Coroutine[Any, Any, Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _list_tools(session: Any) -> list[Any]:
    import mcp_types

    tools: list[Any] = []
    cursor: str | None = None
    for _ in range(100):  # a paginator that never ends cannot hang the connection
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def _connection_lost(exc: BaseException) -> bool:
    from mcp.shared.exceptions import MCPError
    from mcp_types.jsonrpc import CONNECTION_CLOSED

    leaf = _leaf(exc)
    return (
        (isinstance(leaf, MCPError) and leaf.code == CONNECTION_CLOSED)
        or isinstance(leaf, OSError | EOFError)
        or type(leaf).__module__.startswith(("httpx", "httpcore", "anyio"))
    )


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def describe_error(exc: BaseException) -> str:
    """A one-line message for an error, looking inside exception groups."""
    leaf = _leaf(exc)
    text = str(leaf).strip()
    from mcp.shared.exceptions import MCPError

    if isinstance(leaf, MCPError):
        text = leaf.message
    elif isinstance(leaf, McpUnavailable):
        return text
    return f"{type(leaf).__name__}: {text}" if text else type(leaf).__name__


class StderrTail:
    """A local server's stderr: a pipe read on the loop, each line logged at
    debug level, only the last :data:`STDERR_TAIL` characters kept (quoted in
    the error of a server that fails).  Loop only."""

    def __init__(self, server: str) -> None:
        self._server = server
        self._fd: int | None = None
        self._partial = b""
        self.tail = ""

    @contextlib.contextmanager
    def pipe(self) -> Iterator[Any]:
        """The write end, as a file for the SDK to hand the child; our copy
        is closed once the child has its own."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        self._fd = read_fd
        asyncio.get_running_loop().add_reader(read_fd, self._read)
        with os.fdopen(write_fd, "w") as errlog:
            yield errlog

    def _read(self) -> None:
        if self._fd is None:
            return
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._stop_reading()
                self._line(self._partial)
                return
            *lines, self._partial = (self._partial + data).split(b"\n")
            for line in lines:
                self._line(line)
            if len(self._partial) > STDERR_TAIL:
                self._line(self._partial)
                self._partial = b""

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip()
        if not line:
            return
        logger.debug("event=mcp_stderr server=%s line=%s", self._server, json.dumps(line))
        self.tail = f"{self.tail}\n{line}".strip()[-STDERR_TAIL:]

    def _stop_reading(self) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Take what the pipe still holds, then close it.  Idempotent."""
        self._read()
        self._stop_reading()


# -- a workspace's servers ---------------------------------------------------


class WorkspaceMcp:
    """The MCP servers of one workspace.  :meth:`start` connects them in the
    background; :meth:`close` stops them all, bounded.  Thread-safe.
    ``clock`` (monotonic seconds) times the retries of a server that never
    connected, once per ``retry_interval``."""

    def __init__(
        self,
        configs: dict[str, McpServerConfig],
        root: Path,
        loop: McpLoop,
        publish: Callable[[dict[str, Any]], None] = lambda entry: None,
        workspace_id: str = "",
        retry_interval: float = RETRY_INTERVAL,
        sandbox: Sandbox | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._publish = publish
        self._workspace_id = workspace_id
        self._closing_lock = threading.Lock()
        self._closing = False  # guarded by _closing_lock
        self._loop = loop
        local = any(c.transport == "stdio" and c.enabled for c in configs.values())
        self._run_dir = tempfile.TemporaryDirectory(prefix="crushd-mcp-") if local else None
        run_dir = Path(self._run_dir.name) if self._run_dir else None
        self.clients = [
            McpClient(
                c,
                root,
                loop,
                self._status_changed,
                run_dir,
                workspace_id,
                retry_interval,
                sandbox,
                clock,
            )
            for c in configs.values()
        ]

    def start(self) -> None:
        """Connect every enabled server in the background; never blocks."""
        for client in self.clients:
            client.start()

    def entries(self) -> list[dict[str, Any]]:
        return [client.entry() for client in self.clients]

    def tools(self) -> dict[str, Tool]:
        """The MCP tools to offer a run now, keyed by offered name."""
        offered: dict[str, Tool] = {}
        for client in self.clients:
            for tool in client.offered_tools():
                if tool.name in offered:
                    logger.warning(
                        "event=mcp_tool_name_clash tool=%s server=%s", tool.name, client.name
                    )
                    continue
                offered[tool.name] = tool
        return offered

    def _status_changed(self, entry: dict[str, Any]) -> None:
        with self._closing_lock:
            if self._closing:
                return
        self._publish(entry)

    def close(self, timeout: float = STOP_TIMEOUT) -> list[str]:
        """Stop every server (whole process groups) within ``timeout`` seconds,
        SIGKILL those still running then, and return their names (also
        logged).  Blocks; idempotent."""
        with self._closing_lock:
            if self._closing:
                return []
            self._closing = True
        started = [c for c in self.clients if c.config.enabled]
        stragglers: list[str] = []
        if started:
            try:
                future = self._loop.submit(self._stop_all(started, timeout))
                stragglers = future.result(timeout + 5)
            except (RuntimeError, concurrent.futures.TimeoutError) as exc:
                logger.error("event=mcp_stop_failed workspace=%s error=%s", self._workspace_id, exc)
                stragglers = [c.name for c in started if c.kill()]
        if stragglers:
            logger.warning(
                "event=mcp_stop_stragglers workspace=%s servers=%s timeout=%s",
                self._workspace_id,
                ",".join(stragglers),
                timeout,
            )
        if self._run_dir is not None:
            self._run_dir.cleanup()
        return stragglers

    async def _stop_all(self, clients: list[McpClient], timeout: float) -> list[str]:
        tasks = {asyncio.ensure_future(c._shutdown()): c for c in clients}
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        stragglers = [tasks[t].name for t in pending]
        for task in pending:
            tasks[task].kill()
        if pending:
            _, still = await asyncio.wait(pending, timeout=2.0)
            for task in still:
                task.cancel()
        return stragglers
