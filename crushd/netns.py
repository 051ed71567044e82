"""A sandbox's own network, with the internet but without the host's loopback.

A sandbox that shares the host's network namespace can reach every port
listening on ``127.0.0.1`` — crushd's own API among them, where a script
the model wrote could answer its own permission requests.  So a sandbox
with ``network = true`` still gets a network namespace of its own
(``bwrap --unshare-net``), and `slirp4netns`_ connects it to the outside
with ``--disable-host-loopback``: the sandbox's ``10.0.2.2`` does not lead
to the host's loopback, and its own ``127.0.0.1`` is its own.

The order matters: bwrap creates the namespaces and waits (``--block-fd``)
before it runs the command; its ``--info-fd`` names the sandbox's first
process, whose namespaces slirp4netns joins; slirp4netns says on
``--ready-fd`` when the tap device is configured; only then is the command
let go, so it never starts without its network.

Lifetime: slirp4netns runs in a session of its own (the group kills that
end a command do not reach it) and exits when its ``--exit-fd`` closes —
when :meth:`Network.close` closes it, or when the process holding it dies,
even by ``kill -9``.  Nothing of it outlives its owner.

Standard library only, because :mod:`crushd.mcp_child` (run with
``python -I``, outside the package) starts sandboxed MCP servers with it.

.. _slirp4netns: https://github.com/rootless-containers/slirp4netns
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import subprocess
import time
from typing import Any

#: How long the sandbox may take to say which process it is, and
#: slirp4netns to configure its network.
SETUP_TIMEOUT = 10.0
LOOPBACK_POLL = 0.0005  # seconds between looks at the sandbox's loopback
STOP_TIMEOUT = 2.0  # seconds slirp4netns gets to exit after its exit fd closes
#: What the sandbox's /etc/resolv.conf says: slirp4netns's DNS forwarder.
RESOLV_CONF = b"nameserver 10.0.2.3\n"
TAP = "tap0"
NS_GET_USERNS = 0xB701  # ioctl: the user namespace owning a namespace (linux/nsfs.h)


class NetworkError(OSError):
    """The sandbox's network could not be set up; nothing was run."""


def _read_json(fd: int, deadline: float) -> dict[str, Any]:
    """Read a JSON object from ``fd`` until it parses; NetworkError on
    end of file or when ``deadline`` (monotonic) passes."""
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise NetworkError("the sandbox did not start in time")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise NetworkError("the sandbox exited before it started")
        data += chunk
        try:
            value = json.loads(data)
        except ValueError:  # not all of it yet
            continue
        if isinstance(value, dict):
            return value
        raise NetworkError(f"the sandbox said something unexpected: {data[:200]!r}")


class Network:
    """The slirp4netns process serving one sandbox.  :meth:`close` stops it;
    idempotent."""

    def __init__(self, proc: subprocess.Popen[bytes], exit_fd: int) -> None:
        self.proc = proc
        self._exit_fd = exit_fd

    def close(self) -> None:
        if self._exit_fd < 0:
            return
        os.close(self._exit_fd)
        self._exit_fd = -1
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def spawn(
    argv: list[str], slirp4netns: str, own_userns: bool, **popen: Any
) -> tuple[subprocess.Popen[bytes], Network]:
    """Start ``argv`` — a ``bwrap`` command line with ``--unshare-net`` —
    with a network of its own; return the bwrap process and its network.

    ``own_userns``: the sandbox has a user namespace of its own
    (``--unshare-user``), which slirp4netns must join first.  ``popen``
    goes to :class:`subprocess.Popen` for bwrap (``pass_fds`` included).
    Blocks until the network is up, at most :data:`SETUP_TIMEOUT`; raises
    :class:`NetworkError` (bwrap killed, nothing run) if it does not come up.
    """
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    resolv_r, resolv_w = os.pipe()
    os.write(resolv_w, RESOLV_CONF)  # a few bytes: the pipe buffer holds them
    os.close(resolv_w)
    extra = ["--info-fd", str(info_w), "--block-fd", str(block_r)]
    if os.path.exists("/etc/resolv.conf"):
        extra += ["--ro-bind-data", str(resolv_r), "/etc/resolv.conf"]
    # After the other mounts, which --ro-bind / / would otherwise cover.
    end = argv.index("--")
    pass_fds = (*popen.pop("pass_fds", ()), info_w, block_r, resolv_r)
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen([*argv[:end], *extra, *argv[end:]], pass_fds=pass_fds, **popen)
        for fd in (info_w, block_r, resolv_r):
            os.close(fd)
        info_w = block_r = resolv_r = -1
        deadline = time.monotonic() + SETUP_TIMEOUT
        pid = _read_json(info_r, deadline).get("child-pid")
        if not isinstance(pid, int):
            raise NetworkError("the sandbox did not say which process it is")
        _wait_for_loopback(pid, deadline)
        network = _start_slirp(slirp4netns, pid, own_userns, deadline)
        os.write(block_w, b"1")  # the network is up: let the command run
        return proc, network
    except BaseException:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        raise
    finally:
        for fd in (info_r, info_w, block_r, block_w, resolv_r):
            if fd >= 0:
                os.close(fd)


def _wait_for_loopback(pid: int, deadline: float) -> None:
    """Wait until the sandbox has set up its own loopback.

    bwrap adds ``127.0.0.1`` to ``lo`` and brings it up after it has said
    which process it is; slirp4netns brings ``lo`` up too, which makes the
    kernel add that address first, and bwrap then fails
    (``loopback: Failed RTM_NEWADDR``).  The address's local route shows in
    the namespace's ``fib_trie`` once ``lo`` is up with it.
    """
    path = f"/proc/{pid}/net/fib_trie"
    while True:
        try:
            with open(path, "rb") as f:
                if b"127.0.0.1" in f.read():
                    return
        except OSError as exc:  # the sandbox already exited
            raise NetworkError(f"the sandbox exited while it started: {exc}") from exc
        if time.monotonic() >= deadline:
            raise NetworkError("the sandbox did not set up its loopback in time")
        select.select([], [], [], LOOPBACK_POLL)


def _owner_of_netns(pid: int) -> int:
    """An fd of the user namespace that owns ``pid``'s network namespace.

    Not ``/proc/PID/ns/user``: with ``--disable-userns`` bwrap moves the
    sandbox into a nested user namespace while it sets up, and one that
    joined that one could not configure the network (it belongs to the
    outer one) — a race measured at about one start in three.
    """
    netns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(netns_fd, NS_GET_USERNS)
    finally:
        os.close(netns_fd)


def _start_slirp(slirp4netns: str, pid: int, own_userns: bool, deadline: float) -> Network:
    userns_fd = _owner_of_netns(pid) if own_userns else -1
    try:
        return _run_slirp(slirp4netns, pid, userns_fd, deadline)
    finally:
        if userns_fd >= 0:
            os.close(userns_fd)


def _run_slirp(slirp4netns: str, pid: int, userns_fd: int, deadline: float) -> Network:
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    argv = [
        slirp4netns,
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        f"--ready-fd={ready_w}",
        f"--exit-fd={exit_r}",
    ]
    pass_fds = [ready_w, exit_r]
    if userns_fd >= 0:
        argv.append(f"--userns-path=/proc/self/fd/{userns_fd}")
        pass_fds.append(userns_fd)
    argv += [str(pid), TAP]
    try:
        proc = subprocess.Popen(
            argv,
            pass_fds=pass_fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={"PATH": os.environ.get("PATH", os.defpath)},
        )
    except OSError as exc:
        for fd in (ready_r, ready_w, exit_r, exit_w):
            os.close(fd)
        raise NetworkError(f"cannot run {slirp4netns}: {exc.strerror or exc}") from exc
    os.close(ready_w)
    os.close(exit_r)
    # Its stderr stays open, unread, while it runs: it writes a few lines
    # at start and exit, far less than a pipe holds.
    network = Network(proc, exit_w)
    try:
        remaining = max(deadline - time.monotonic(), 0)
        ready = select.select([ready_r], [], [], remaining)[0] and os.read(ready_r, 1) == b"1"
        if not ready:
            proc.kill()
            proc.wait()
            assert proc.stderr is not None
            detail = proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise NetworkError(
                "slirp4netns did not set up the sandbox's network"
                + (f": {detail[-1]}" if detail else "")
            )
    except BaseException:
        network.close()
        raise
    finally:
        os.close(ready_r)
    return network
