"""Launch an MCP server so that it cannot outlive crushd.

    python -I /path/to/mcp_child.py PARENT_PID -- COMMAND [ARG...]
    python -I /path/to/mcp_child.py PARENT_PID --slirp4netns PATH [--own-userns] -- BWRAP [ARG...]

The MCP SDK spawns a stdio server itself (``anyio.open_process`` with
``start_new_session=True``) and offers no ``preexec_fn``, so crushd spawns
this file instead, and this file starts the real server.  It stays behind as
a tiny supervisor, the leader of the server's process group:

* it asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``),
  and on that signal — its parent gone, so the signal is not the SDK's own
  SIGTERM to the group — it SIGKILLs the whole group, the server's own
  children included.  That is what happens after ``kill -9`` of crushd.
  It removes its pid file first, and the pid file's directory once that is
  empty, since crushd is no longer there to do it;
* the server itself gets ``PR_SET_PDEATHSIG(SIGKILL)`` towards the
  supervisor, so killing the supervisor alone cannot orphan it either;
* both check after ``prctl`` that their parent is still the expected one, so
  a parent that died before the request took effect is not missed;
* otherwise it stays out of the way: it passes its stdin/stdout to the server
  and closes its own copies, ignores the SDK's SIGTERM to the group (the
  server gets it too) and exits with the server's status once it ends.

A sandboxed server's COMMAND is a ``bwrap`` command line.  With
``--slirp4netns`` the sandbox gets its network from that program
(:mod:`crushd.netns`, imported from the package this file belongs to):
the supervisor starts bwrap itself, connects its network, and stops the
network once the server has ended; bwrap's ``--die-with-parent`` takes the
place of the server's death signal, slirp4netns's exit fd that of its own.

Only the standard library is used, and crushd runs the file with ``-I``, so a
``crushd`` directory in the server's cwd cannot shadow it.
``CRUSHD_MCP_PIDFILE``, when set, names a file that receives the supervisor's
pid (the group id crushd kills if the SDK's own shutdown overruns); the
variable is removed before the server starts.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PIDFILE_ENV = "CRUSHD_MCP_PIDFILE"


def _set_parent_death_signal(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def _kill_group(signum: int, frame: object) -> None:
    if os.getppid() != _parent:
        if _pidfile:
            _remove(_pidfile)
        os.killpg(os.getpgrp(), signal.SIGKILL)  # kills this process too


def _remove(pidfile: str) -> None:
    """The pid file, then its directory if no other supervisor's file is left."""
    for remove, path in ((os.unlink, pidfile), (os.rmdir, os.path.dirname(pidfile))):
        try:
            remove(path)
        except OSError:  # gone already, or still holding another server's file
            return


def _exec_server(command: list[str], supervisor: int) -> None:
    try:
        _set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != supervisor:
            os._exit(1)
        os.execvp(command[0], command)
    except OSError as exc:
        os.write(2, f"crushd: cannot run {command[0]!r}: {exc.strerror or exc}\n".encode())
    os._exit(127)


def _options(argv: list[str]) -> tuple[int, str | None, bool, list[str]] | None:
    """``(parent pid, slirp4netns, own user namespace, command)``, or None."""
    if "--" not in argv or len(argv) < 3:
        return None
    split = argv.index("--")
    options, command = argv[1:split], argv[split + 1 :]
    slirp4netns = None
    own_userns = "--own-userns" in options
    if own_userns:
        options.remove("--own-userns")
    if options[:1] == ["--slirp4netns"] and len(options) == 2:
        slirp4netns, options = options[1], []
    if options or not command or not argv[0].isdigit():
        return None
    return int(argv[0]), slirp4netns, own_userns, command


def _start_networked(command: list[str], slirp4netns: str, own_userns: bool) -> int:
    """Start the bwrap command line with a network of its own; its pid.
    The process stays referenced, so nothing but :func:`main` reaps it."""
    global _network, _server
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from crushd import netns

    try:
        _server, _network = netns.spawn(command, slirp4netns, own_userns)
    except OSError as exc:
        os.write(2, f"crushd: cannot start the sandbox: {exc}\n".encode())
        os._exit(127)
    return _server.pid


def main(argv: list[str]) -> int:
    global _parent, _pidfile
    parsed = _options(argv)
    if parsed is None:
        os.write(2, b"usage: mcp_child.py PARENT_PID [--slirp4netns PATH] -- COMMAND [ARG...]\n")
        return 2
    _parent, slirp4netns, own_userns, command = parsed
    signal.signal(signal.SIGTERM, _kill_group)
    _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != _parent:  # crushd died before the request took effect
        return 1
    if os.getpgrp() != os.getpid():
        os.setsid()
    _pidfile = os.environ.pop(PIDFILE_ENV, None)
    if _pidfile:
        with open(_pidfile, "w") as f:
            f.write(str(os.getpid()))
    child = _start_server(command, slirp4netns, own_userns)
    # The server holds the pipes now; our copies would keep them open after it exits.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    return _wait_for(child)


def _start_server(command: list[str], slirp4netns: str | None, own_userns: bool) -> int:
    """Start the server (a sandbox with a network, or exec'd in a fork); its pid."""
    if slirp4netns is not None:
        return _start_networked(command, slirp4netns, own_userns)
    supervisor = os.getpid()
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _exec_server(command, supervisor)
    return child


def _wait_for(child: int) -> int:
    """Wait for the server to end, stop its network; its exit status."""
    while True:
        try:
            _, status = os.waitpid(child, 0)
        except InterruptedError:  # a signal we handled; keep waiting
            continue
        except ChildProcessError:
            return 1
        if _network is not None:
            _network.close()
        code = os.waitstatus_to_exitcode(status)
        return code if code >= 0 else 128 - code


_parent = 0
_pidfile: str | None = None
_network = None  # the sandbox's crushd.netns.Network, when it has one
_server = None  # the bwrap process started with it

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
