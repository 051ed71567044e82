"""The ``bash`` sandbox: commands run under bubblewrap (``bwrap``).

What a sandboxed command sees, in the order the mounts are made (later
mounts cover earlier ones):

1. the whole file system read-only (``--ro-bind / /``), a minimal ``/dev``,
   a ``/proc`` of its own pid namespace (so no other process, crushd
   included, can be seen or signalled) and a private, writable ``/tmp``;
2. every hidden directory — ``/root``, ``/home``, ``/run/user``, the service
   user's home — covered by an empty tmpfs, and crushd's data directory too;
3. the ``sandbox_read`` paths bound back read-only;
4. the workspace bound read-write (``workspace-write``) or read-only;
5. crushd's own secrets (token file, config file, unix socket) covered by
   ``/dev/null``, and the hidden tmpfs mounts made read-only, so a write
   there fails with EROFS instead of vanishing silently.

A workspace below ``/tmp`` would otherwise sit in the private ``/tmp`` with
writable empty directories around it; the first directory below ``/tmp`` on
its way is hidden like a home, so its siblings are neither visible nor
writable.  ``--die-with-parent`` plus the pid namespace mean the whole tree
dies with the ``bwrap`` process, which is the leader of the process group
the bash tool kills: no ``setsid`` escapes it.

What the sandbox's processes may do, for any uid crushd runs as: nothing
that needs a capability.  They run in a user namespace of their own with
every capability dropped (:data:`ISOLATION_LEVELS`), so root inside cannot
``umount`` or remount a bind, nor make a namespace of its own.  And they
cannot reach crushd's API: the sandbox always has a network namespace of
its own — only a loopback of its own with ``network = false``, and with
``network = true`` a slirp4netns network that leads everywhere but to the
host's loopback (:mod:`crushd.netns`); the unix socket is covered by
``/dev/null``.

:func:`detect` finds out once per server how far ``bwrap`` can isolate here
(it cannot at all inside some containers) and logs once if not.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crushd import netns

logger = logging.getLogger(__name__)

MODES = ("workspace-write", "read-only", "off")
PROBE_TIMEOUT = 10.0  # seconds for the startup check of bwrap
HOME_ROOTS = ("/root", "/home", "/run/user")
SECRET_ENV = ("CRUSHD_TOKEN", "CRUSHD_TOKEN_FILE", "CRUSHD_CONFIG")  # plus the model keys
#: The only variables of crushd's environment a command sees, with the
#: workspace's ``sandbox_env`` names; ``NAME*`` is a prefix.
BASE_ENV = ("PATH", "HOME", "LANG", "LC_*", "TERM", "TZ", "USER", "SHELL")

_EROFS = re.compile(r"read-only file system", re.IGNORECASE)
_MISSING = re.compile(r"no such file or directory|permission denied", re.IGNORECASE)
_PATHISH = re.compile(r"[^\s:'\"`]+")
_NO_NETWORK = re.compile(
    r"network is unreachable|could not resolve|temporary failure in name resolution|"
    r"name or service not known|connection refused",
    re.IGNORECASE,
)


#: What the sandbox's processes may not do, strongest first: the first set
#: of ``bwrap`` flags that works here is used.  A user namespace of its own
#: with every capability dropped is what makes the sandbox hold against a
#: command run as root: bwrap run by uid 0 otherwise keeps the caller's
#: capabilities, and ``umount``/``mount -o remount`` undo every bind.
#: ``--disable-userns`` (bwrap 0.8) stops the command from making a user
#: namespace of its own, where it would get capabilities back;
#: ``--new-session`` keeps it off crushd's terminal.  Without user
#: namespaces (some containers) root can still drop its capabilities.
ISOLATION_LEVELS: tuple[tuple[str, ...], ...] = (
    ("--unshare-user", "--disable-userns", "--cap-drop", "ALL", "--new-session"),
    ("--unshare-user", "--cap-drop", "ALL", "--new-session"),
    ("--cap-drop", "ALL", "--new-session"),
)


@dataclass(frozen=True)
class Bubblewrap:
    """Whether ``bwrap`` works on this machine: ``executable`` is its path
    when it does, else None and ``reason`` says why.  ``isolation`` is the
    set of :data:`ISOLATION_LEVELS` flags that works here; ``slirp4netns``
    the program that gives a sandbox with ``network = true`` a network of
    its own (None: not found, so such a sandbox gets no network at all)."""

    executable: str | None
    reason: str = ""
    isolation: tuple[str, ...] = ISOLATION_LEVELS[0]
    slirp4netns: str | None = None

    @property
    def available(self) -> bool:
        return self.executable is not None

    def describe(self) -> dict[str, Any] | None:
        """What is in force, for the health check; None when unavailable."""
        if self.executable is None:
            return None
        return {
            "user_namespace": "--unshare-user" in self.isolation,
            "capabilities": "none",
            "nested_user_namespaces": "--disable-userns" not in self.isolation,
            "new_session": "--new-session" in self.isolation,
            # How a workspace with network = true reaches the network: through
            # slirp4netns, without the host's loopback (crushd's API), or not at all.
            "network": "slirp4netns" if self.slirp4netns else "none",
        }


def detect(path: str | None = None) -> Bubblewrap:
    """Find ``bwrap`` (and ``slirp4netns``) on ``path`` (default ``$PATH``)
    and check that bwrap can build a sandbox here whose processes hold no
    capability.  Blocks up to :data:`PROBE_TIMEOUT` per level tried; logs
    once (a warning) when the sandbox is unavailable or has no network."""
    executable = shutil.which("bwrap", path=path)
    if executable is None:
        found = Bubblewrap(None, "bwrap not found on PATH (install the bubblewrap package)")
    else:
        found = _probe(executable, shutil.which("slirp4netns", path=path))
    if found.available:
        logger.info(
            "event=sandbox_ready bwrap=%s isolation=%s slirp4netns=%s",
            found.executable,
            ",".join(found.isolation),
            found.slirp4netns,
        )
        if found.slirp4netns is None:
            logger.warning(
                "event=sandbox_network_off reason=%r",
                "slirp4netns not found on PATH (install the slirp4netns package): sandboxed "
                "commands get no network, even where network = true",
            )
    else:
        logger.warning("event=sandbox_unavailable reason=%r bash=unsandboxed", found.reason)
    return found


def _probe(executable: str, slirp4netns: str | None) -> Bubblewrap:
    """Try the isolation levels in order; the first under which a sandboxed
    process has no effective capability wins."""
    reason = ""
    for isolation in ISOLATION_LEVELS:
        # Without --unshare-net: where only the network namespace is refused
        # (Ubuntu 24.04's AppArmor default), network = false then fails closed
        # with bwrap's own message on every command.
        argv = [
            executable,
            *_base_args(isolation, network=True),
            "--",
            "/bin/cat",
            "/proc/self/status",
        ]
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=PROBE_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Bubblewrap(None, f"{executable} did not run: {exc}")
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip().splitlines()
            detail = message[-1] if message else f"exit code {done.returncode}"
            reason = f"{executable} cannot create a sandbox here: {detail}"
            continue
        caps = re.search(rb"^CapEff:\s*([0-9a-f]+)", done.stdout, re.MULTILINE)
        if caps is None or int(caps.group(1), 16) != 0:
            reason = f"{executable} leaves the sandbox capabilities here ({' '.join(isolation)})"
            continue
        return Bubblewrap(executable, isolation=isolation, slirp4netns=slirp4netns)
    return Bubblewrap(None, reason)


def _base_args(isolation: tuple[str, ...], network: bool) -> list[str]:
    """``network``: share the host's network namespace (only the probe
    does; a sandbox always has a namespace of its own)."""
    args = [
        *isolation,
        "--die-with-parent",
        "--unshare-pid",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
    ]
    if not network:
        args.append("--unshare-net")
    return args


def command_env(
    names: Iterable[str] = (), environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a command started for the model: the variables of
    ``environ`` (default ``os.environ``) named by :data:`BASE_ENV` or
    ``names``, never crushd's own (:data:`SECRET_ENV`).  An allowlist, so a
    secret crushd was started with (``AWS_SECRET_ACCESS_KEY``,
    ``GITHUB_TOKEN``) reaches no command unless the user names it."""
    environ = os.environ if environ is None else environ
    exact = {n for n in (*BASE_ENV, *names) if not n.endswith("*")}
    prefixes = tuple(n[:-1] for n in (*BASE_ENV, *names) if n.endswith("*"))
    return {
        key: value
        for key, value in environ.items()
        if (key in exact or key.startswith(prefixes)) and key not in SECRET_ENV
    }


def _real(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _outermost(paths: Iterable[str]) -> list[str]:
    """The paths not lying inside another one of them, sorted, unique."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(_inside(path, other) for other in kept):
            kept.append(path)
    return kept


@dataclass(frozen=True)
class Sandbox:
    """How one workspace's ``bash`` commands are sandboxed.  Immutable, so
    any number of runs may share it."""

    executable: str
    root: str  # the workspace, resolved
    mode: str  # "workspace-write" or "read-only"
    network: bool
    read: tuple[str, ...] = ()  # sandbox_read paths, resolved
    homes: tuple[str, ...] = HOME_ROOTS  # hidden unless they hold the workspace
    private: tuple[str, ...] = ()  # always hidden: crushd's data directory
    masked: tuple[str, ...] = ()  # files covered by /dev/null: token, config, socket
    unset_env: tuple[str, ...] = SECRET_ENV
    isolation: tuple[str, ...] = ISOLATION_LEVELS[0]  # see Bubblewrap.isolation
    slirp4netns: str | None = None  # None: network = true gets no network either

    @property
    def online(self) -> bool:
        """Whether commands reach the network (never the host's loopback)."""
        return self.network and self.slirp4netns is not None

    def popen(
        self, command: list[str], **popen: Any
    ) -> tuple[subprocess.Popen[bytes], netns.Network | None]:
        """Start ``command`` sandboxed; ``popen`` goes to :class:`subprocess.Popen`
        (``cwd``, ``env``, pipes, ``start_new_session``).  Returns the bwrap
        process and, when :attr:`online`, the network serving it, which the
        caller closes once the process has ended.  Blocks while the network
        is set up (a few ms); raises OSError when nothing could be started."""
        argv = self.argv(command)
        if not self.online:
            return subprocess.Popen(argv, **popen), None
        assert self.slirp4netns is not None
        own_userns = "--unshare-user" in self.isolation
        return netns.spawn(argv, self.slirp4netns, own_userns, **popen)

    def _mounts(self) -> list[tuple[str, str]]:
        """``(path, kind)`` in mount order; ``kind`` is ``host`` (the host's
        files show through), ``tmp`` (the private /tmp) or ``hidden`` (an
        empty read-only tmpfs).  A later mount covers the earlier ones it
        lies in.  Reads the file system: only existing directories are hidden."""
        homes = [h for h in self.homes if not _inside(h, self.root)]  # the workspace wins
        below_tmp = os.path.relpath(self.root, "/tmp")
        if _inside(self.root, "/tmp") and os.sep in below_tmp:
            homes.append(os.path.join("/tmp", below_tmp.split(os.sep)[0]))
        private = [p for p in self.private if os.path.isdir(p)]
        early = _outermost([h for h in homes if os.path.isdir(h)] + private)
        shown = [*self.read, self.root]
        # crushd's own data stays hidden even inside the workspace or a sandbox_read path.
        late = _outermost([p for p in private if any(_inside(p, s) for s in shown)])
        return [
            ("/", "host"),
            ("/tmp", "tmp"),
            *[(h, "hidden") for h in early],
            *[(r, "host") for r in self.read],
            (self.root, "host"),
            *[(p, "hidden") for p in late],
        ]

    @staticmethod
    def _kind(path: str, mounts: list[tuple[str, str]]) -> str:
        return next(kind for where, kind in reversed(mounts) if _inside(path, where))

    def hidden(self) -> list[str]:
        """Directories covered by an empty, read-only tmpfs."""
        return sorted({path for path, kind in self._mounts() if kind == "hidden"})

    def argv(self, command: list[str], chdir: str | None = None) -> list[str]:
        """The ``bwrap`` command line that runs ``command`` sandboxed, in
        ``chdir`` (default the workspace).  Reads the file system (which
        hidden paths exist).  The sandbox always has a network namespace of
        its own: only :meth:`popen` connects it, when :attr:`online`."""
        mounts = self._mounts()
        args = [self.executable, *_base_args(self.isolation, network=False)]
        for path, kind in mounts[2:]:
            if kind == "hidden":
                args += ["--tmpfs", path]
            elif path == self.root:
                bind = "--bind" if self.mode == "workspace-write" else "--ro-bind"
                args += [bind, path, path]
            else:
                args += ["--ro-bind-try", path, path]
        for path in self.masked:  # a hidden directory got its tmpfs above
            if (
                os.path.exists(path)
                and not os.path.isdir(path)
                and self._kind(path, mounts) == "host"
            ):
                args += ["--ro-bind", "/dev/null", path]
        for path, kind in mounts:
            if kind == "hidden":
                args += ["--remount-ro", path]
        for name in self.unset_env:
            args += ["--unsetenv", name]
        args += [
            "--setenv",
            "TMPDIR",
            "/tmp",
            "--setenv",
            "XDG_CACHE_HOME",
            "/tmp/.cache",
            "--chdir",
            chdir or self.root,
            "--",
            *command,
        ]
        return args

    def explain(self, output: str) -> str:
        """Lines to append to a command's output when it looks refused by
        the sandbox (a write outside the workspace, a hidden path, no
        network), or ``""``.  Says how to get the command through."""
        reasons = []
        if _EROFS.search(output):
            where = "outside /tmp" if self.mode == "read-only" else "outside the workspace and /tmp"
            reasons.append(f"it refuses writes {where} (read-only file system)")
        mounts = self._mounts()
        hidden = any(self._names_hidden(line, mounts) for line in output.splitlines())
        if hidden:
            reasons.append(
                "it hides home directories, crushd's data and the surroundings of a "
                f"workspace in /tmp ({', '.join(self.hidden())})"
            )
        if not self.online and _NO_NETWORK.search(output):
            why = "network = false" if not self.network else "slirp4netns is not installed"
            reasons.append(f"it has no network ({why})")
        if not reasons:
            return ""
        other_way = (
            ", or ask the user to add the path to sandbox_read (readable, not writable)"
            if hidden
            else ""
        )
        return (
            "[sandbox: this command ran in crushd's sandbox and may have been refused: "
            + "; ".join(reasons)
            + '. If the command really needs this, call bash again with "unsandboxed": true '
            f"(the user is asked to allow it){other_way}.]"
        )

    def _names_hidden(self, line: str, mounts: list[tuple[str, str]]) -> bool:
        """True if ``line`` is a not-found or permission error naming a path
        the sandbox hides (relative paths are taken from the workspace)."""
        if not _MISSING.search(line):
            return False
        for token in _PATHISH.findall(line):
            if "/" not in token and not token.startswith("~"):
                continue
            path = os.path.normpath(os.path.join(self.root, os.path.expanduser(token)))
            if self._kind(path, mounts) == "hidden":
                return True
        return False


def sandbox_for(
    bubblewrap: Bubblewrap,
    root: str | os.PathLike[str],
    mode: str,
    network: bool,
    read: Iterable[str] = (),
    private: Iterable[str] = (),
    masked: Iterable[str] = (),
    unset_env: Iterable[str] = (),
) -> Sandbox | None:
    """The sandbox of a workspace, or None when its commands run unsandboxed
    (``mode`` is ``off`` or bwrap does not work here)."""
    if mode not in MODES:
        raise ValueError(f"sandbox must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off" or bubblewrap.executable is None:
        return None
    home = _real(Path.home())
    homes = list(HOME_ROOTS)
    if home != "/" and not any(_inside(home, h) for h in homes):
        homes.append(home)
    return Sandbox(
        isolation=bubblewrap.isolation,
        slirp4netns=bubblewrap.slirp4netns,
        executable=bubblewrap.executable,
        root=_real(root),
        mode=mode,
        network=network,
        read=tuple(_real(p) for p in read),
        homes=tuple(_real(h) for h in homes),
        private=tuple(_real(p) for p in private),
        masked=tuple(_real(p) for p in masked),
        unset_env=tuple(dict.fromkeys([*SECRET_ENV, *unset_env])),
    )
