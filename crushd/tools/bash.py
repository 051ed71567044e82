"""The ``bash`` tool: run a shell command in the workspace.

The command runs as ``/bin/bash -c`` in a new session, so the shell and
everything it starts share one process group whose id is the shell's pid.
That group is the unit of cleanup: on cancel, on timeout, and after the shell
exits (a ``cmd &`` it left behind), the whole group gets SIGTERM and, if any
member is still alive a second later, SIGKILL.  A command that wants to
outlive the call must leave the group itself (``setsid``).

Output is read on the calling thread with :mod:`selectors` and short waits,
never a blocking ``read``: a background child that inherited the pipe keeps
it open after the shell exits, so end-of-file cannot be what ends the call.
Only the first and last halves of ``ctx.max_output`` bytes are kept.

With ``ctx.sandbox`` set the shell runs inside bubblewrap (see
:mod:`crushd.tools.sandbox`); ``bwrap`` is then the group leader, and its
pid namespace takes down with it anything the command started, even what
left the group.  ``"unsandboxed": true`` runs the command as without a
sandbox, and :meth:`BashTool.escapes` makes that always ask permission.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import selectors
import signal
import subprocess
import threading
from enum import Enum
from typing import Any

from crushd.cancel import Cancelled, CancelToken, Deadline
from crushd.procgroup import live_members, signal_group
from crushd.tools.base import PermissionAsk, Tool, ToolContext, ToolError, ToolResult
from crushd.tools.common import check_params
from crushd.tools.sandbox import command_env

logger = logging.getLogger(__name__)

MAX_TIMEOUT = 600.0  # seconds; a longer request is capped, not refused
KILL_GRACE = 1.0  # seconds between SIGTERM and SIGKILL for the process group
# Once bwrap has exited, the sandbox's own init is being killed by the kernel
# (--die-with-parent): give it this long to go before signalling the group.
SANDBOX_SETTLE = 0.5
REAP_TIMEOUT = 5.0  # seconds to wait for the shell after SIGKILL before giving up
_POLL = 0.1  # how often the read loop looks at the token and the shell
_READ_CHUNK = 65536
_READ_BURST = 1 << 20  # bytes read per wake-up, so a flood cannot starve the clock
_DESCRIBE_CHARS = 80


class _Outcome(Enum):
    EXITED = "exited"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


class BoundedOutput:
    """Collects a byte stream keeping only its first and last ``limit // 2``
    bytes (roughly), so memory stays bounded however much a command prints.
    Not thread-safe: fed and read by the calling thread only."""

    def __init__(self, limit: int) -> None:
        self._head_limit = max(limit, 0) // 2
        self._tail_limit = max(limit, 0) - self._head_limit
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data or self._tail_limit == 0:
            return
        self._tail += data
        if len(self._tail) > 2 * self._tail_limit:
            del self._tail[: -self._tail_limit]

    def text(self) -> str:
        tail = bytes(self._tail[-self._tail_limit :]) if self._tail_limit else b""
        dropped = self.total - len(self._head) - len(tail)
        head = self._head.decode("utf-8", errors="replace")
        if dropped == 0:
            return (bytes(self._head) + tail).decode("utf-8", errors="replace")
        # Start the tail on a character boundary rather than mid UTF-8 sequence.
        skip = 0
        while skip < min(len(tail), 3) and (tail[skip] & 0xC0) == 0x80:
            skip += 1
        dropped += skip
        tail_text = tail[skip:].decode("utf-8", errors="replace")
        return f"{head}\n[output truncated: {dropped} more bytes]\n{tail_text}"


class BashTool(Tool):
    name = "bash"
    description = (
        "Run a shell command with /bin/bash -c in the workspace root and return its "
        "combined stdout and stderr. Each call starts a fresh shell: `cd` and "
        "variables do not carry over, so chain steps with `&&`. stdin is closed, so "
        "interactive programs fail; pass flags such as `-y` or `--no-pager`. The "
        "command is killed after `timeout` seconds (default 120, at most 600) and "
        "background jobs (`cmd &`) are killed when the command ends. Long output is "
        "cut in the middle. Prefer the view, ls, glob and grep tools for reading and "
        "searching files, and write/edit for changing them. Commands may run in a "
        "sandbox that allows writes only inside the workspace and /tmp and hides home "
        "directories; when it refuses something the output says so, and you may call "
        'again with "unsandboxed": true, which asks the user first.'
    )
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {
            "command": {"type": "string", "description": "The command line to run."},
            "timeout": {
                "type": "number",
                "exclusiveMinimum": 0,
                "description": "Seconds before the command is killed (default 120, max 600).",
            },
            "unsandboxed": {
                "type": "boolean",
                "description": (
                    "Run outside the sandbox. Always asks the user; use it only after the "
                    "sandbox refused a command that must reach outside the workspace."
                ),
            },
        },
        "required": ["command"],
        "additionalProperties": False,
    }
    mutating = True
    changes_files = True

    def _check(self, params: Any) -> dict[str, Any]:
        checked = check_params(self.name, params, self.parameters)
        if not checked["command"].strip():
            raise ToolError("bash: command must not be empty")
        return checked

    def describe(self, params: dict[str, Any], ctx: ToolContext) -> PermissionAsk:
        command = self._check(params)["command"].strip()
        lines = command.splitlines()
        first = lines[0]
        if len(first) > _DESCRIBE_CHARS:
            first = first[: _DESCRIBE_CHARS - 1] + "…"
        elif len(lines) > 1:
            first += " …"
        if self.escapes(params, ctx):
            return PermissionAsk(action="unsandboxed", path=str(ctx.root))
        return PermissionAsk(action=f"run: {first}", path=str(ctx.root))

    def escapes(self, params: dict[str, Any], ctx: ToolContext) -> bool:
        return ctx.sandbox is not None and bool(self._check(params).get("unsandboxed"))

    def run(self, params: dict[str, Any], ctx: ToolContext) -> ToolResult:
        """Run the command; blocks until it ends, times out or ``ctx.token``
        is cancelled (then raises :class:`Cancelled` within about a second)."""
        checked = self._check(params)
        command: str = checked["command"]
        timeout = min(float(checked.get("timeout", ctx.bash_timeout)), MAX_TIMEOUT)
        sandbox = None if checked.get("unsandboxed") else ctx.sandbox
        argv = ["/bin/bash", "-c", command]
        ctx.token.raise_if_cancelled()
        popen: dict[str, Any] = {
            "cwd": ctx.root,
            "env": ctx.env if ctx.env is not None else command_env(),
            "start_new_session": True,
            "stdin": subprocess.DEVNULL,
            "stdout": subprocess.PIPE,
            "stderr": subprocess.STDOUT,
        }
        network = None
        try:
            if sandbox is not None:
                proc, network = sandbox.popen(argv, **popen)
            else:
                proc = subprocess.Popen(argv, **popen)
        except OSError as exc:
            raise ToolError(f"bash: cannot start the command in {ctx.root}: {exc}") from exc
        pgid = proc.pid  # start_new_session makes the shell its group's leader
        assert proc.stdout is not None
        output = BoundedOutput(ctx.max_output)
        handle = ctx.token.on_cancel(lambda: signal_group(pgid, signal.SIGTERM, "cancel"))
        try:
            outcome = _pump(proc, output, ctx.token, Deadline(timeout))
        finally:
            ctx.token.remove_callback(handle)
            settle = SANDBOX_SETTLE if sandbox is not None and outcome is _Outcome.EXITED else 0
            _stop_group(proc, pgid, settle)
            proc.stdout.close()
            if network is not None:
                network.close()
        if outcome is _Outcome.CANCELLED:
            raise Cancelled(ctx.token.reason or "cancelled")
        text = output.text().rstrip("\n") or "(no output)"
        note = sandbox.explain(text) if sandbox is not None else ""
        if note:
            text = f"{text}\n{note}"
        if outcome is _Outcome.TIMED_OUT:
            return ToolResult(
                f"{text}\n[command timed out after {timeout:g} s; its process group was killed]",
                is_error=True,
            )
        code = proc.returncode
        if code == 0:
            return ToolResult(text)
        return ToolResult(f"{text}\nexit code {code}{_signal_note(code)}", is_error=True)


def _pump(
    proc: subprocess.Popen[bytes], output: BoundedOutput, token: CancelToken, deadline: Deadline
) -> _Outcome:
    """Read the pipe until the shell exits, the deadline passes or the token
    is cancelled.  Returns as soon as the shell has exited, whoever else still
    holds the pipe."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        eof = False
        while True:
            if token.cancelled:
                return _Outcome.CANCELLED
            if proc.poll() is not None:
                if not eof:
                    _read_available(fd, output)
                return _Outcome.EXITED
            remaining = deadline.remaining()
            if remaining <= 0:
                return _Outcome.TIMED_OUT
            wait = min(remaining, _POLL)
            if eof:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)
            elif sel.select(wait) and not _read_available(fd, output):
                eof = True
                sel.unregister(fd)


def _read_available(fd: int, output: BoundedOutput) -> bool:
    """Read what the pipe holds now, up to a burst; False at end of file."""
    got = 0
    while got < _READ_BURST:
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return True
        if not data:
            return False
        output.feed(data)
        got += len(data)
    return True


def _stop_group(proc: subprocess.Popen[bytes], pgid: int, settle: float = 0) -> None:
    """Make sure nothing of the group survives, then reap the shell; first
    wait up to ``settle`` seconds for the group to empty by itself.

    Blocks up to ``settle`` plus twice :data:`KILL_GRACE` plus
    :data:`REAP_TIMEOUT` seconds.  SIGKILL takes effect asynchronously, so after it the group is
    waited for too: when this returns, its members are gone.
    """
    members = live_members(pgid)
    if members and settle:
        members = _wait_for_group(proc, pgid, members, settle)
    if members:
        signal_group(pgid, signal.SIGTERM, "cleanup")
        members = _wait_for_group(proc, pgid, members, KILL_GRACE)
        if members:
            signal_group(pgid, signal.SIGKILL, "grace_expired")
            if _wait_for_group(proc, pgid, members, KILL_GRACE):
                logger.error("event=tool_kill_incomplete pgid=%s", pgid)
    try:
        proc.wait(REAP_TIMEOUT)
    except subprocess.TimeoutExpired:
        logger.error("event=tool_unreaped pgid=%s", pgid)


def _wait_for_group(
    proc: subprocess.Popen[bytes], pgid: int, members: list[int], timeout: float
) -> list[int]:
    """Wait up to ``timeout`` for the group to empty; return who is left."""
    deadline = Deadline(timeout)
    while members and not deadline.expired:
        _wait_for_exit(proc, members, deadline.remaining())
        members = live_members(pgid)
    return members


def _wait_for_exit(proc: subprocess.Popen[bytes], pids: list[int], timeout: float) -> None:
    """Block until one of ``pids`` exits or ``timeout`` passes.

    Uses pidfds, which become readable when their process exits, so no
    polling is needed for grandchildren we cannot ``waitpid``.
    """
    fds = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                return  # already gone: let the caller look again
            except (AttributeError, OSError):  # no pidfd support (old kernel or Python)
                break
        else:
            select.select(fds, [], [], timeout)
            return
    finally:
        for fd in fds:
            os.close(fd)
    if proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(min(timeout, _POLL))
    else:
        threading.Event().wait(min(timeout, _POLL))  # fallback only: no pidfd to wait on


def _signal_note(code: int) -> str:
    if code >= 0:
        return ""
    try:
        return f" (killed by {signal.Signals(-code).name})"
    except ValueError:
        return ""
