"""grep's matching, run in a child process with a deadline.

Python's ``re`` holds the GIL for the whole of one match, and a pattern
such as ``(a+)+$`` on a line of 34 ``a`` and a ``!`` takes hours: matched
in the daemon it froze every thread (health checks, cancels, SIGTERM).  So
:func:`run` starts ``python -I`` on this module's :func:`main`, hands it a
:class:`Job` as JSON on stdin and reads matching lines back as JSON lines
on stdout while it works, waiting in short slices so that

* a cancel of ``token`` kills the child within :data:`POLL` seconds and
  raises :class:`Cancelled`;
* past ``timeout`` seconds the child is killed and the lines found so far
  come back with ``timed_out`` set;
* the child is killed and reaped in a ``finally`` whatever happens, and it
  asks the kernel (``PR_SET_PDEATHSIG``) to kill it should the thread that
  started it die first, so no grep outlives its call.

The child walks and opens files with :mod:`crushd.tools.safeopen` (hidden
list, no symbolic links), as the other tools do.  It gets an environment
of ``PATH``, ``LANG`` and ``LC_ALL`` only, and ``-I`` keeps ``PYTHON*``
variables, the user's site directory and the current directory out of it.

Wire format, one JSON object a line: ``{"match": "path:3: text"}`` per
matching line, then ``{"end": {"full": bool}}`` (``full``: more matches
than ``max_matches``), or ``{"error": "message"}`` for a refusal the model
should read (bad pattern, hidden or missing path).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

from crushd.cancel import Cancelled, CancelToken
from crushd.tools.base import ToolError
from crushd.tools.common import SKIP_DIRS, cut_line, is_binary, iter_lines
from crushd.tools.globs import compile_glob
from crushd.tools.paths import display
from crushd.tools.safeopen import open_dir, open_entry, open_file, walk

logger = logging.getLogger(__name__)

POLL = 0.1  # seconds between looks at the token, the deadline and the child
REAP_TIMEOUT = 5.0  # seconds to wait for the child after SIGKILL
MAX_REPLY_BYTES = 16 << 20  # the child's stdout kept at most (matches are bounded far below)
_STDERR_KEEP = 4096  # bytes of the child's stderr kept for the log
_PR_SET_PDEATHSIG = 1
# The directory holding the crushd package: -I leaves the current directory
# and PYTHONPATH out of sys.path, so the child is told where crushd is.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); from crushd.tools.grepchild import main; main()"
)


@dataclass(frozen=True)
class Job:
    """One grep call: ``base`` is the resolved path to search (what the run
    loop checked), ``root`` the workspace root, ``hidden`` the paths no tool
    may read."""

    pattern: str
    base: str
    root: str
    hidden: list[str]
    include: str | None
    max_matches: int
    line_chars: int


@dataclass
class Found:
    """What a grep found: formatted matching lines, whether it stopped at
    ``max_matches`` (``full``) or at the deadline (``timed_out``)."""

    lines: list[str]
    full: bool = False
    timed_out: bool = False


# -- the parent side -----------------------------------------------------------


def child_env() -> dict[str, str]:
    """The child's whole environment: nothing of crushd's secrets."""
    return {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def run(job: Job, token: CancelToken, timeout: float) -> Found:
    """Run ``job`` in a child process and return what it found.

    Blocks until the child ends, ``timeout`` seconds pass (``timed_out``) or
    ``token`` is cancelled (raises :class:`Cancelled`).  Raises
    :class:`ToolError` with the child's message for a refused call, or when
    the child failed.  Thread-safe: each call has its own child.
    """
    request = json.dumps(asdict(job)).encode()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOT, _PACKAGE_PARENT, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            cwd="/",
            start_new_session=True,  # a terminal's Ctrl-C is the daemon's to handle
        )
    except OSError as exc:  # out of processes, memory or descriptors
        raise ToolError(f"grep: cannot start the search: {exc.strerror or exc}") from exc
    try:
        replies, stderr, timed_out = _exchange(proc, request, token, timeout)
    finally:
        _reap(proc)
    found = Found([], timed_out=timed_out)
    for reply in replies:
        if "match" in reply:
            found.lines.append(reply["match"])
        elif "error" in reply:
            raise ToolError(reply["error"])
        elif "end" in reply:
            found.full = bool(reply["end"]["full"])
            return found
    if timed_out:
        logger.info(
            "event=grep_timeout pid=%s seconds=%g matches=%d", proc.pid, timeout, len(found.lines)
        )
        return found
    tail = stderr.decode(errors="replace").strip().splitlines()
    logger.error(
        "event=grep_child_failed pid=%s returncode=%s stderr=%r",
        proc.pid,
        proc.returncode,
        tail[-1] if tail else "",
    )
    raise ToolError(f"grep: the search failed (its process ended with code {proc.returncode})")


def _exchange(
    proc: subprocess.Popen[bytes], request: bytes, token: CancelToken, timeout: float
) -> tuple[list[dict], bytes, bool]:
    """Write ``request`` to the child and read its replies until it closes
    stdout or the deadline passes; return the parsed replies, the tail of
    its stderr and whether the deadline passed.  Raises Cancelled."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout
    replies: list[dict] = []
    buffer = b""
    stderr = b""
    received = 0
    with selectors.DefaultSelector() as selector:
        os.set_blocking(proc.stdin.fileno(), False)
        selector.register(proc.stdin, selectors.EVENT_WRITE)
        selector.register(proc.stdout, selectors.EVENT_READ)
        selector.register(proc.stderr, selectors.EVENT_READ)
        pending = memoryview(request)
        reading = 2
        while reading:
            if token.cancelled:
                raise Cancelled(token.reason or "cancelled")
            left = deadline - time.monotonic()
            if left <= 0:
                return replies, stderr, True
            for key, _ in selector.select(min(POLL, left)):
                if key.fileobj is proc.stdin:
                    try:
                        pending = pending[os.write(proc.stdin.fileno(), pending[:65536]) :]
                    except BrokenPipeError:  # the child died; its exit says why
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                data = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                if not data:
                    selector.unregister(key.fileobj)
                    reading -= 1
                elif key.fileobj is proc.stderr:
                    stderr = (stderr + data)[-_STDERR_KEEP:]
                else:
                    received += len(data)
                    if received > MAX_REPLY_BYTES:
                        raise ToolError("grep: the search sent more output than it may")
                    *lines, buffer = (buffer + data).split(b"\n")
                    replies.extend(json.loads(line) for line in lines if line)
    return replies, stderr, False


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill the child unless it ended, wait for it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(REAP_TIMEOUT)
    except subprocess.TimeoutExpired:
        logger.error("event=grep_child_stuck pid=%s seconds=%g", proc.pid, REAP_TIMEOUT)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


# -- the child side ------------------------------------------------------------


def search(job: Job, emit: Callable[[str], None]) -> bool:
    """Call ``emit`` with each matching line, formatted ``path:line: text``,
    up to ``job.max_matches``; return True if there were more.

    Walks and opens as :mod:`crushd.tools.safeopen` does: hidden entries
    and ``.git`` are skipped, links are not followed, binary and unreadable
    files are skipped.  Raises :class:`ToolError` for a bad pattern or base.
    """
    try:
        regex = re.compile(job.pattern)
    except (re.error, OverflowError, RecursionError) as exc:  # all mean: not a usable pattern
        raise ToolError(f"grep: invalid regular expression {job.pattern!r}: {exc}") from exc
    include_re = compile_glob(job.include) if job.include else None
    by_path = job.include is not None and "/" in job.include
    base, root = Path(job.base), Path(job.root)
    count = 0

    def grep_file(f, shown: str) -> bool:
        nonlocal count
        with f:
            try:
                if is_binary(f):
                    return False
                for number, line in enumerate(iter_lines(f), 1):
                    if regex.search(line):
                        if count >= job.max_matches:
                            return True
                        count += 1
                        emit(f"{shown}:{number}: {cut_line(line, job.line_chars)}")
            except OSError:  # unreadable or vanished: skip it as grep -s would
                pass
        return False

    try:
        top = open_dir("grep", base, root, job.hidden)
    except NotADirectoryError:  # one file, or a file on the way
        try:
            f = open_file("grep", base, root, job.hidden)
        except (FileNotFoundError, NotADirectoryError):
            raise ToolError(f"grep: no such file or directory: {display(base, root)}") from None
        except OSError:  # unreadable: nothing to match, as grep -s
            return False
        return grep_file(f, display(base, root))
    except FileNotFoundError:
        raise ToolError(f"grep: no such file or directory: {display(base, root)}") from None
    except OSError:  # an unreadable directory has nothing to match
        return False
    try:
        with closing(walk(top, job.base, job.hidden, SKIP_DIRS)) as listings:
            for listing in listings:
                for filename in listing.filenames:
                    if include_re is not None:
                        subject = filename
                        if by_path and listing.rel != ".":
                            subject = f"{listing.rel}/{filename}"
                        if not include_re.fullmatch(subject):
                            continue
                    path = os.path.join(listing.path, filename)
                    f = open_entry(listing.fd, filename, path, job.hidden)
                    if f is not None and grep_file(f, display(Path(path), root)):
                        return True
    finally:
        os.close(top)
    return False


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when the thread that started it
    ends; exit at once if the parent is gone already."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        sys.exit(1)


def main() -> None:
    """The child: ``sys.argv[2]`` is the parent's pid, the job is on stdin."""
    _die_with_parent(int(sys.argv[2]))
    job = Job(**json.loads(sys.stdin.buffer.read()))
    out = sys.stdout.buffer

    def send(message: dict) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    try:
        full = search(job, lambda line: send({"match": line}))
    except ToolError as exc:
        send({"error": str(exc)})
        return
    send({"end": {"full": full}})
