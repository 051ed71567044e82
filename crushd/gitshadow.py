"""The shadow repository: its settings, and git processes with one environment and an owner.

A checkpoint store (:mod:`crushd.checkpoints`) is a git repository of
crushd's own whose work tree is the user's workspace.
:func:`prepare_repository` creates it and rewrites its whole configuration
each start (no hooks, no automatic gc, no line-ending or filter conversion,
a fixed identity).  Every git call goes through :class:`GitRunner`, never
through a shell, because three things must hold for all of them:

* **Nothing of the host leaks in.**  The environment is built from scratch
  (:func:`git_environment`): ``GIT_DIR``, ``GIT_WORK_TREE`` and
  ``GIT_INDEX_FILE`` name crushd's repository, so a ``GIT_DIR`` in crushd's
  own environment (or a repository found by walking up from the workspace,
  the user's ``.git``) can never be the one written; no system or global
  configuration is read, ``HOME`` points at the shadow repository, so no
  alias, hook path, filter, pager or credential helper of the user's runs.
* **Every child has an owner.**  Each process runs in a process group of
  its own with a deadline; on timeout, or when :meth:`GitRunner.close` is
  called from another thread (workspace shutdown), the whole group is
  killed (``git gc`` starts ``pack-objects`` and ``repack`` children) and
  reaped.
* **Failures say what git said.**  A non-zero exit raises :class:`GitFailed`
  with git's stderr, so a log line or an API error shows the real cause.

The store's errors live in :mod:`crushd.errors` with every other error
(:class:`~crushd.errors.CheckpointError` and those a request can end with);
the two that only git raises, :class:`GitFailed` and :class:`GitTimeout`,
are declared here and re-exported with them.
"""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from crushd.errors import CheckpointClosed, CheckpointError
from crushd.procgroup import signal_group

__all__ = [
    "CheckpointClosed",
    "CheckpointError",
    "GitFailed",
    "GitRunner",
    "GitStream",
    "GitTimeout",
]

logger = logging.getLogger(__name__)

#: The id of the empty tree: what :meth:`CheckpointStore.snapshot` writes
#: for a workspace with no recordable file, and a valid ``before`` for a
#: diff from nothing.
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"

DEFAULT_TIMEOUT = 60.0
#: The slowest rate (bytes per second) a deadline for hashing or writing
#: content allows for: a first snapshot of a large tree must not be killed.
MIN_BYTES_PER_SECOND = 4 << 20

_OID = re.compile(r"[0-9a-f]{40}")
_STALE_LOCKS = ("index.lock", "packed-refs.lock", "config.lock", "HEAD.lock", "shallow.lock")
_STDERR_KEEP = 4000  # characters of git's stderr an error carries
_READ_CHUNK = 1 << 16


#: The shadow repository's whole configuration, rewritten by every
#: :func:`prepare_repository` so an upgrade of crushd applies at once.
_CONFIG = """\
[core]
\trepositoryformatversion = 0
\tbare = false
\tfilemode = true
\tsymlinks = true
\tignorecase = false
\tprecomposeunicode = false
\tautocrlf = false
\tsafecrlf = false
\tquotePath = false
\tlogAllRefUpdates = false
\texcludesFile = /dev/null
\tattributesFile = /dev/null
\thooksPath = /dev/null
\tfsmonitor = false
\tuntrackedCache = false
\tsparseCheckout = false
[gc]
\tauto = 0
\tautoDetach = false
[maintenance]
\tauto = false
[commit]
\tgpgSign = false
[user]
\tname = crushd
\temail = crushd@localhost
"""
# Highest-precedence attributes: no conversion on the way in or out, so a
# tree holds the file's bytes whatever the workspace's .gitattributes say.
_ATTRIBUTES = "* -text !eol -ident -filter !working-tree-encoding\n"


class GitFailed(CheckpointError):
    """A git command exited non-zero; ``stderr`` is what it said."""

    code = "git_failed"

    def __init__(self, args: Sequence[str], returncode: int, stderr: str) -> None:
        self.args_run = list(args)
        self.returncode = returncode
        self.stderr = stderr[-_STDERR_KEEP:]
        detail = self.stderr.strip() or f"exit status {returncode}"
        command = next((a for a in args if not a.startswith("-") and "=" not in a), "")
        super().__init__(f"git {command} failed: {detail}")


class GitTimeout(GitFailed):
    """A git command ran past its deadline and was killed."""

    code = "git_timeout"

    def __init__(self, args: Sequence[str], timeout: float) -> None:
        super().__init__(args, -signal.SIGKILL, f"killed after {timeout:g}s")


def check_oid(value: str) -> str:
    """An object id as git wants it; anything else (an option, a ref name) is refused."""
    if not isinstance(value, str) or not _OID.fullmatch(value):
        raise CheckpointError(f"not a checkpoint id: {value!r}")
    return value


def prepare_repository(git: GitRunner, git_dir: Path) -> None:
    """Create the shadow repository if needed and (re)write its settings.

    Idempotent.  Also removes the lock files a killed git left behind,
    which is only right because crushd's data directory lock makes this
    process the repository's only user.
    """
    git_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (git_dir / "HEAD").exists():
        git.run(["init", "--quiet", "--template=", "--object-format=sha1"])
    _replace_text(git_dir / "config", _CONFIG)
    (git_dir / "info").mkdir(exist_ok=True)
    _replace_text(git_dir / "info" / "attributes", _ATTRIBUTES)
    _replace_text(git_dir / "info" / "exclude", "")
    stale = [git_dir / name for name in _STALE_LOCKS]
    stale += (git_dir / "refs").rglob("*.lock")
    for lock in stale:
        try:
            lock.unlink()
        except FileNotFoundError:
            continue
        logger.warning("event=checkpoint_stale_lock path=%s", lock)


def _replace_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a crash leaves the old config)."""
    temp = path.with_name(path.name + ".crushd-tmp")
    with open(temp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def work_budget(timeout: float, nbytes: int) -> float:
    """A deadline for git work over ``nbytes`` of content: the per-call
    timeout, plus the bytes at a rate even a slow disk keeps up."""
    return timeout + nbytes / MIN_BYTES_PER_SECOND


def git_environment(
    git_dir: Path, work_tree: Path, index_file: Path, *, path: str | None = None
) -> dict[str, str]:
    """The complete environment every git of a store runs with.

    Built from nothing but ``PATH`` (to find git's own helpers), so no
    ``GIT_*`` variable of crushd's environment (``GIT_DIR``,
    ``GIT_OBJECT_DIRECTORY``, ``GIT_CONFIG_PARAMETERS``, ``GIT_TRACE`` …)
    can redirect or change a call.  Messages are in the C locale so errors
    read the same everywhere; pathspecs are literal, so a file named
    ``:(glob)*`` is that file.
    """
    return {
        "PATH": path if path is not None else os.environ.get("PATH", os.defpath),
        "LC_ALL": "C",
        "LANG": "C",
        "TZ": "UTC",
        "HOME": str(git_dir),
        "GIT_DIR": str(git_dir),
        "GIT_WORK_TREE": str(work_tree),
        "GIT_INDEX_FILE": str(index_file),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_ATTR_NOSYSTEM": "1",
        "GIT_OPTIONAL_LOCKS": "0",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_NO_REPLACE_OBJECTS": "1",
        "GIT_LITERAL_PATHSPECS": "1",
        "GIT_PAGER": "cat",
    }


class GitRunner:
    """Runs git for one store: ``run`` to completion, or ``stream`` its output.

    Thread-safe; the calls themselves block.  :meth:`close` may be called from
    any thread: it kills every process still running (their callers get
    :class:`CheckpointClosed`) and refuses new ones.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        cwd: Path,
        *,
        git: str = "git",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.env = dict(env)
        self.cwd = cwd
        self.git = git
        self.timeout = timeout
        self._lock = threading.Lock()
        self._children: set[subprocess.Popen[bytes]] = set()  # guarded by _lock
        self._closed = False  # guarded by _lock

    def run(
        self,
        args: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        ok: Sequence[int] = (0,),
    ) -> bytes:
        """Run ``git args``, feed it ``input``, return its stdout.

        Raises :class:`GitFailed` (exit status not in ``ok``),
        :class:`GitTimeout` (killed at the deadline, default the runner's
        ``timeout``) or :class:`CheckpointClosed`.
        """
        limit = self.timeout if timeout is None else timeout
        proc = self._start(args, env, stdin=subprocess.PIPE if input is not None else None)
        try:
            out, err = proc.communicate(input, timeout=limit)
        except subprocess.TimeoutExpired:
            self._kill(proc, "timeout")
            proc.communicate()
            raise GitTimeout(args, limit) from None
        finally:
            self._forget(proc)
        self._check(args, proc.returncode, err, ok)
        return out

    def stream(
        self,
        args: Sequence[str],
        *,
        stdin: bool = False,
        timeout: float | None = None,
    ) -> GitStream:
        """Start ``git args`` and hand back its output to read as it comes.

        Use it as a context manager: leaving the block kills the process if it
        is still running (a reader that has seen enough simply stops).
        """
        limit = self.timeout if timeout is None else timeout
        # A file, not a pipe, so git never blocks on stderr; the stream owns and closes it.
        err = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            proc = self._start(args, None, stdin=subprocess.PIPE if stdin else None, stderr=err)
        except BaseException:
            err.close()
            raise
        return GitStream(self, args, proc, err, time.monotonic() + limit, limit)

    def close(self) -> None:
        """Kill every git still running and refuse new ones.  Idempotent."""
        with self._lock:
            self._closed = True
            children = list(self._children)
        for proc in children:
            self._kill(proc, "closing")

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    # -- the parts -------------------------------------------------------------

    def _start(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None,
        *,
        stdin: int | None,
        stderr: int | IO[bytes] = subprocess.PIPE,
    ) -> subprocess.Popen[bytes]:
        full_env = self.env if env is None else {**self.env, **env}
        with self._lock:
            if self._closed:
                raise CheckpointClosed("the checkpoint store is closed")
            proc = subprocess.Popen(
                [self.git, *args],
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=full_env,
                cwd=self.cwd,
                start_new_session=True,
                close_fds=True,
            )
            self._children.add(proc)
        return proc

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._children.discard(proc)

    def _kill(self, proc: subprocess.Popen[bytes], reason: str) -> None:
        if proc.poll() is None:
            signal_group(proc.pid, signal.SIGKILL, reason, who="git")

    def _check(self, args: Sequence[str], returncode: int, err: bytes, ok: Sequence[int]) -> None:
        if returncode in ok:
            return
        if returncode < 0 and self.closed:
            raise CheckpointClosed("the checkpoint store was closed while git ran")
        raise GitFailed(args, returncode, err.decode("utf-8", "replace"))


class GitStream:
    """One running git whose stdout is read piecewise, under one deadline.

    Not thread-safe: one caller reads it.  Reads raise :class:`GitTimeout`
    once the deadline passes (the process is killed first) and
    :class:`GitFailed` when git's output ends before what was asked for.
    """

    def __init__(
        self,
        runner: GitRunner,
        args: Sequence[str],
        proc: subprocess.Popen[bytes],
        stderr: IO[bytes],
        deadline: float,
        timeout: float,
    ) -> None:
        self._runner = runner
        self._args = list(args)
        self._proc = proc
        self._stderr = stderr
        self._deadline = deadline
        self._timeout = timeout
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()
        self._poll = select.poll()  # not select(): a daemon's descriptors pass 1024
        self._poll.register(self._fd, select.POLLIN)
        self._buffer = bytearray()
        self._eof = False
        self._stderr_text = ""  # what git said, kept once the stream is closed

    def __enter__(self) -> GitStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, data: bytes) -> None:
        """Send ``data`` to git's stdin (small requests such as ``cat-file --batch``'s)."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
        except BrokenPipeError:  # git exited; finish() reports why
            self._eof = True

    def record(self, sep: bytes = b"\0") -> bytes | None:
        """The next ``sep``-terminated record without ``sep``; None at the end."""
        while True:
            end = self._buffer.find(sep)
            if end >= 0:
                data = bytes(self._buffer[:end])
                del self._buffer[: end + len(sep)]
                return data
            if not self._fill():
                if self._buffer:
                    data = bytes(self._buffer)
                    self._buffer.clear()
                    return data
                return None

    def exactly(self, size: int) -> bytes:
        """The next ``size`` bytes; raises GitFailed if output ends first."""
        while len(self._buffer) < size:
            if not self._fill():
                self._ended_early(f"output ended after {len(self._buffer)} of {size} bytes")
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def copy(self, size: int, fd: int) -> None:
        """Write the next ``size`` bytes to ``fd`` without holding them all."""
        left = size
        while left:
            if not self._buffer and not self._fill():
                self._ended_early(f"output ended {left} bytes early")
            piece = memoryview(self._buffer)[: min(left, len(self._buffer))]
            written = 0
            while written < len(piece):
                written += os.write(fd, piece[written:])
            piece.release()
            del self._buffer[:written]
            left -= written

    def rest(self, limit: int) -> bytes | None:
        """All the remaining output, or None (git killed) once it passes ``limit`` bytes."""
        while self._fill():
            if len(self._buffer) > limit:
                self.close()
                return None
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def finish(self, ok: Sequence[int] = (0,)) -> None:
        """Wait for git to exit (within the deadline) and raise if it failed."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:  # git is gone already; its status says why
                pass
        while self._fill():  # drain, so git is never stuck writing to us
            self._buffer.clear()
        try:
            self._proc.wait(timeout=max(0.0, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.close()
            raise GitTimeout(self._args, self._timeout) from None
        self._stderr.seek(0)
        err = self._stderr.read()
        self._runner._forget(self._proc)
        self._runner._check(self._args, self._proc.returncode, err, ok)

    def _ended_early(self, what: str) -> None:
        """Raise GitFailed with what git said on its way out."""
        self.close()
        self._stderr_text = self._stderr_text or what
        raise GitFailed(self._args, self._proc.returncode, self._stderr_text)

    def close(self) -> None:
        """Kill git if it still runs, reap it and release the pipes.  Idempotent."""
        self._runner._kill(self._proc, "reader_done")
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except BrokenPipeError:  # flushing stdin to a dead git; nothing to deliver
                    pass
        self._proc.wait()
        self._runner._forget(self._proc)
        if not self._stderr.closed:
            self._stderr.seek(0)
            self._stderr_text = self._stderr.read()[-_STDERR_KEEP:].decode("utf-8", "replace")
            self._stderr.close()

    def _fill(self) -> bool:
        """Read what git has written so far; False at the end of its output."""
        if self._eof:
            return False
        left = self._deadline - time.monotonic()
        if not self._poll.poll(max(0, int(left * 1000) + 1)) or left <= 0:
            self.close()
            raise GitTimeout(self._args, self._timeout)
        chunk = os.read(self._fd, _READ_CHUNK)
        if not chunk:
            self._eof = True
            if self._runner.closed:
                raise CheckpointClosed("the checkpoint store was closed while git ran")
            return False
        self._buffer += chunk
        return True
