"""Opening paths for the file tools without following symbolic links.

:func:`crushd.tools.paths.resolve` turns what the model wrote into a real
path, and that path is what the run loop checks (and shows the user when it
lies outside the workspace).  Opening it again by name would follow whatever
symbolic links another process put on the way since, so a directory swapped
for a link to ``/`` would redirect the write.  Every open here therefore:

1. refuses a path that is, or lies below, an entry of the hidden list
   (:attr:`crushd.tools.base.ToolContext.hidden`);
2. opens the path anchored and link-free: beneath a descriptor of the
   workspace root for a path inside it, from ``/`` for one outside it (the
   user allowed that exact path), with ``openat2(RESOLVE_BENEATH |
   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` where the kernel has it,
   else one component at a time with ``O_NOFOLLOW`` relative to the
   previous directory's descriptor;
3. reads the real path of the opened descriptor back from
   ``/proc/self/fd`` and refuses it unless it is the path asked for and not
   hidden, so a rename on the way cannot bring another file in either.

The path was resolved already, so a symbolic link met on the way means the
tree changed under us: that is refused with a :class:`ToolError`, never
followed.  Walks (:func:`walk`, :func:`open_subdir`, :func:`open_entry`)
work relative to directory descriptors in the same way and skip what is
hidden, replaced or moved instead of failing.

Public functions raise :class:`ToolError` for refusals (hidden, changed
under us, not a regular file) and :class:`OSError` for what the callers
word themselves (``FileNotFoundError``, ``IsADirectoryError``,
``NotADirectoryError``, permissions).  All are thread-safe; descriptors are
close-on-exec.  Linux only, like the rest of crushd.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from crushd.tools.base import ToolError
from crushd.tools.paths import display

logger = logging.getLogger(__name__)

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine())

#: Whether ``openat2`` is used: None until first probed.  Tests set False to
#: exercise the component-by-component walk.
USE_OPENAT2: bool | None = None

_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # a directory on the way
_DIR_LIST = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC  # one to scandir
# O_NONBLOCK: opening a FIFO must not wait for a writer (nor, with O_WRONLY,
# for a reader); it changes nothing for regular files.
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_FILE_MODE = 0o666  # the umask applies, as with open()
_DIR_MODE = 0o777


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class _SymlinkMet(Exception):
    """A symbolic link was met on the way: the tree changed since resolve()."""


_libc: ctypes.CDLL | None = None


def _syscall() -> Callable[..., int]:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        _libc = libc
    return _libc.syscall


def _openat2(dir_fd: int, rel: str, flags: int, mode: int) -> int:
    """``openat2(dir_fd, rel, {flags, mode, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
    RESOLVE_NO_MAGICLINKS})``; raises :class:`_SymlinkMet` for ELOOP (a link
    on the way), OSError otherwise."""
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, _RESOLVE)
    path = ctypes.c_char_p(os.fsencode(rel))
    while True:
        fd = _syscall()(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dir_fd),
            path,
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        if code == errno.ELOOP:
            raise _SymlinkMet(rel)
        if code != errno.EINTR:  # a signal: try again, as os.open does
            raise OSError(code, os.strerror(code), rel)


def openat2_supported() -> bool:
    """True if this kernel (and its seccomp policy) lets us call ``openat2``;
    probed once, the answer kept in :data:`USE_OPENAT2`."""
    global USE_OPENAT2
    if USE_OPENAT2 is None:
        if _SYS_OPENAT2 is None:
            USE_OPENAT2 = False
            logger.info("event=openat2_unavailable machine=%s", platform.machine())
        else:
            slash = os.open("/", _DIR_PATH)
            try:
                os.close(_openat2(slash, ".", _DIR_PATH, 0))
                USE_OPENAT2 = True
            except OSError as exc:  # ENOSYS: old kernel; EPERM: a seccomp filter
                USE_OPENAT2 = False
                logger.info("event=openat2_unavailable errno=%s", errno.errorcode.get(exc.errno))
            finally:
                os.close(slash)
    return USE_OPENAT2


# -- the hidden list -----------------------------------------------------------


def hidden_entry(path: str, hidden: Iterable[str]) -> str | None:
    """The entry of ``hidden`` that ``path`` (a real, absolute path) is or
    lies below, or None."""
    for entry in hidden:
        if path == entry or path.startswith(entry.rstrip("/") + "/"):
            return entry
    return None


def check_hidden(tool: str, path: Path, root: Path, hidden: Sequence[str]) -> None:
    """Raise :class:`ToolError` if ``path`` is hidden from the agent."""
    if hidden_entry(str(path), hidden) is not None:
        raise ToolError(
            f"{tool}: {display(path, root)} is hidden from the agent (crushd keeps it secret)"
        )


def fd_path(fd: int) -> str:
    """The real path the kernel has for the open descriptor ``fd``."""
    return os.readlink(f"/proc/self/fd/{fd}")


# -- opening one path ----------------------------------------------------------


def _changed_kind(dir_fd: int, name: str) -> bool:
    """After ENOTDIR from an ``O_DIRECTORY | O_NOFOLLOW`` open: True unless
    ``name`` is a plain non-directory (the open met a link, or a link that
    has since become a directory again)."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:  # gone meanwhile: the open's own error says enough
        return False
    return stat.S_ISLNK(mode) or stat.S_ISDIR(mode)


def _open_one(dir_fd: int, name: str, flags: int, mode: int = _FILE_MODE) -> int:
    """Open the single component ``name`` below ``dir_fd``, not following it.

    ``O_NOFOLLOW`` answers ELOOP for a link, or ENOTDIR with ``O_DIRECTORY``
    (as a plain file does): a link, then, unless it is a plain file now.
    """
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and _changed_kind(dir_fd, name)):
            raise _SymlinkMet(name) from exc
        raise


def _open_below(dir_fd: int, parts: Sequence[str], flags: int, mode: int = _FILE_MODE) -> int:
    """Open ``parts`` (names, no ``..``) below ``dir_fd`` following no link."""
    if openat2_supported():
        return _openat2(dir_fd, "/".join(parts) or ".", flags, mode)
    if not parts:
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=dir_fd)
    fd = dir_fd
    try:
        for name in parts[:-1]:
            step = _open_one(fd, name, _DIR_PATH)
            if fd != dir_fd:
                os.close(fd)
            fd = step
        return _open_one(fd, parts[-1], flags, mode)
    finally:
        if fd != dir_fd:
            os.close(fd)


def _make_dirs(dir_fd: int, parts: Sequence[str]) -> int:
    """Open ``parts`` below ``dir_fd`` as a directory, creating what is missing
    (``mkdir`` relative to the parent's descriptor, so never through a link)."""
    fd = os.dup(dir_fd)
    try:
        for name in parts:
            try:
                step = _open_one(fd, name, _DIR_PATH)
            except FileNotFoundError:
                try:
                    os.mkdir(name, _DIR_MODE, dir_fd=fd)
                except FileExistsError:  # made by someone else meanwhile: open theirs
                    pass
                step = _open_one(fd, name, _DIR_PATH)
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


def _parts(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):  # resolve() never leaves one
        raise ValueError(f"path is not normalised: {path!r}")
    return parts


def _anchor(target: str, root: str) -> tuple[int, list[str]]:
    """A descriptor to open ``target`` from, and the names below it: the
    workspace root (itself opened from ``/`` link-free) when ``target`` lies
    inside it, else ``/``.  The caller closes the descriptor."""
    slash = os.open("/", _DIR_PATH)
    inside = target == root or target.startswith(root.rstrip("/") + "/")
    if not inside or root == "/":
        return slash, _parts(target)
    try:
        root_fd = _open_below(slash, _parts(root), _DIR_PATH)
    finally:
        os.close(slash)
    return root_fd, _parts(target[len(root) :])


def open_path(
    tool: str,
    path: Path,
    root: Path,
    hidden: Sequence[str],
    flags: int,
    *,
    create_parents: bool = False,
) -> int:
    """Open the resolved ``path`` with ``flags``, following no symbolic link
    on the way, and return the descriptor (the caller closes it).

    ``path`` is what :func:`crushd.tools.paths.resolve` returned; anchored as
    the module docstring says.  ``create_parents`` makes missing directories
    above ``path`` first.  Raises :class:`ToolError` when ``path`` is hidden
    or changed while it was being opened, :class:`OSError` otherwise.
    """
    target = os.fspath(path)
    real_root = os.path.realpath(root)
    shown = display(path, root)
    writing = bool(flags & (os.O_WRONLY | os.O_RDWR))
    check_hidden(tool, path, root, hidden)
    try:
        anchor, parts = _anchor(target, real_root)
        try:
            if create_parents and parts:
                parent = _make_dirs(anchor, parts[:-1])
                try:
                    fd = _open_one(parent, parts[-1], flags)
                finally:
                    os.close(parent)
            else:
                fd = _open_below(anchor, parts, flags)
        finally:
            os.close(anchor)
    except _SymlinkMet:
        done = "nothing was written" if writing else "nothing was read"
        raise ToolError(
            f"{tool}: {shown} changed while it was being opened (a symbolic link appeared); {done}"
        ) from None
    try:
        real = fd_path(fd)
        if hidden_entry(real, hidden) is not None:
            raise ToolError(f"{tool}: {shown} is hidden from the agent (crushd keeps it secret)")
        if real != target:
            done = "nothing was written" if writing else "nothing was read"
            raise ToolError(
                f"{tool}: {shown} changed while it was being opened (it was moved or "
                f"replaced); {done}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _regular(tool: str, fd: int, path: Path, root: Path) -> None:
    """Raise unless ``fd`` is a regular file (IsADirectoryError for a directory)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(mode):
        raise ToolError(f"{tool}: {display(path, root)} is not a regular file")


def open_file(tool: str, path: Path, root: Path, hidden: Sequence[str]) -> BinaryIO:
    """Open the regular file ``path`` for reading, as :func:`open_path` does.

    Raises IsADirectoryError for a directory and :class:`ToolError` for
    anything else that is not a regular file (a FIFO, a device).
    """
    fd = open_path(tool, path, root, hidden, _READ)
    try:
        _regular(tool, fd, path, root)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def create_file(tool: str, path: Path, root: Path, hidden: Sequence[str]) -> BinaryIO:
    """Open ``path`` for writing from its start, creating it and its missing
    parent directories, as :func:`open_path` does.

    The file is emptied only once the descriptor is known to be the regular
    file asked for (no ``O_TRUNC`` at open), so a refused open leaves an
    existing file as it was.  Raises IsADirectoryError for a directory and
    :class:`ToolError` for what is not a regular file.
    """
    try:
        fd = open_path(tool, path, root, hidden, _WRITE, create_parents=True)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads (O_NONBLOCK)
            raise ToolError(f"{tool}: {display(path, root)} is not a regular file") from None
        raise
    try:
        _regular(tool, fd, path, root)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")


def open_dir(tool: str, path: Path, root: Path, hidden: Sequence[str]) -> int:
    """Open the directory ``path`` for listing, as :func:`open_path` does;
    NotADirectoryError when it is something else."""
    return open_path(tool, path, root, hidden, _DIR_LIST)


# -- walking -------------------------------------------------------------------


def open_subdir(dir_fd: int, name: str, path: str, hidden: Sequence[str]) -> int | None:
    """Open the directory ``name`` of ``dir_fd`` (whose real path is
    ``path``'s parent) for listing; the caller closes it.

    None if it is hidden, or is no longer the directory ``path`` (replaced by
    a link, moved): a walk skips it.  Raises OSError when it cannot be opened.
    """
    if hidden_entry(path, hidden) is not None:
        return None
    try:
        fd = _open_one(dir_fd, name, _DIR_LIST)
    except _SymlinkMet:
        return None
    if fd_path(fd) != path:
        os.close(fd)
        return None
    return fd


def open_entry(dir_fd: int, name: str, path: str, hidden: Sequence[str]) -> BinaryIO | None:
    """Open the file ``name`` of ``dir_fd`` (real path ``path``) for reading,
    or None when it is hidden, a link, not a regular file, unreadable or no
    longer at ``path``: a search skips it, as ``grep -s`` would."""
    if hidden_entry(path, hidden) is not None:
        return None
    try:
        fd = _open_one(dir_fd, name, _READ)
    except (OSError, _SymlinkMet):
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode) and fd_path(fd) == path:
            return os.fdopen(fd, "rb")
    except OSError:  # the descriptor vanished from /proc: treat it as moved
        pass
    os.close(fd)
    return None


@dataclass
class Listing:
    """One directory met by :func:`walk`.  ``rel`` is its path below the top
    (``.`` for the top), ``path`` its real path, ``fd`` its descriptor (open
    until the walk moves on).  Names are sorted; removing names from
    ``dirnames`` keeps the walk out of them."""

    rel: str
    path: str
    fd: int
    dirnames: list[str]
    filenames: list[str]


def _list(fd: int, path: str, rel: str, hidden: Sequence[str], skip: frozenset[str]) -> Listing:
    dirnames: list[str] = []
    filenames: list[str] = []
    try:
        with os.scandir(fd) as it:
            entries = list(it)
    except OSError:  # unreadable: list it as empty, as os.walk does
        entries = []
    for entry in entries:
        if hidden_entry(os.path.join(path, entry.name), hidden) is not None:
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            # A link to a directory is neither descended nor listed, as in os.walk.
            is_dir_link = not is_dir and entry.is_symlink() and entry.is_dir()
        except OSError:  # vanished meanwhile
            continue
        if is_dir:
            if entry.name not in skip:
                dirnames.append(entry.name)
        elif not is_dir_link:
            filenames.append(entry.name)
    return Listing(rel, path, fd, sorted(dirnames), sorted(filenames))


def walk(
    top_fd: int, top: str, hidden: Sequence[str], skip: frozenset[str] = frozenset()
) -> Iterator[Listing]:
    """Walk the directory open as ``top_fd`` (real path ``top``) top-down,
    depth first, in name order, like ``os.walk(top)`` but relative to
    directory descriptors: no link is followed, a directory replaced or moved
    during the walk is skipped, hidden entries are left out, and directories
    named in ``skip`` are not entered.  ``top_fd`` stays the caller's."""
    first = _list(top_fd, top, ".", hidden, skip)
    yield first
    stack: list[tuple[Listing, Iterator[str]]] = [(first, iter(first.dirnames))]
    try:
        while stack:
            parent, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                if parent.fd != top_fd:
                    os.close(parent.fd)
                continue
            path = os.path.join(parent.path, name)
            try:
                fd = open_subdir(parent.fd, name, path, hidden)
            except OSError:  # unreadable or removed: skip it as os.walk does
                continue
            if fd is None:
                continue
            rel = name if parent.rel == "." else f"{parent.rel}/{name}"
            listing = _list(fd, path, rel, hidden, skip)
            stack.append((listing, iter(listing.dirnames)))
            yield listing
    finally:
        for listing, _ in stack:
            if listing.fd != top_fd:
                os.close(listing.fd)
