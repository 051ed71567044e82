"""Reading and replacing files beneath a root, atomically and without following links.

What :meth:`crushd.checkpoints.CheckpointStore.restore` writes into a
workspace goes through here, because a restore runs with crushd's rights
(often root) over a tree that an agent's bash could have rearranged:

* **No link is followed below the root.**  Every path is reached one
  component at a time with ``O_NOFOLLOW | O_DIRECTORY`` relative to the
  previous directory's descriptor, so a directory swapped for a link to
  ``/etc`` stops the walk (:class:`Blocked`) instead of redirecting it.  The
  last component is never opened for writing at all: content goes to a new
  temporary file, which is then renamed over the name, and ``rename(2)``
  replaces a link rather than writing through it.  A hard link to a file
  outside the tree is replaced the same way, never written into.
* **Every file is old or new, never half.**  The temporary file is written,
  fsync'd and renamed in its own directory (``rename`` is atomic), so a
  ``kill -9`` or a crash leaves the old content or the new one, plus at
  worst a stray temporary file that :func:`sweep` removes by its prefix.
* **The owner and the permissions stay.**  A replaced file keeps its
  permission bits (the executable bits follow the checkpoint) and, when
  crushd runs as root, its owner; a new one takes the umask, and under root
  the owner of its directory, as if the user had created it.

Paths are relative ``bytes`` (file names need not be UTF-8).  Descriptors are
close-on-exec; every function is thread-safe as far as the file system is.
Errors are :class:`OSError`s: :class:`Blocked` for a link or a file where a
directory should be, ``FileNotFoundError``, ``OSError(ENOTEMPTY)`` and so on.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# O_EXCL: the name is fresh, so nothing that was there (a link) is opened.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_SPECIAL_BITS = 0o7000  # setuid, setgid, sticky: never carried to new content


class Blocked(OSError):
    """A component on the way is a symbolic link or not a directory."""


@dataclass(frozen=True)
class Entry:
    """What a path is now.

    ``kind`` is ``absent``, ``file``, ``link``, ``dir``, ``other`` (a FIFO,
    socket or device) or ``blocked`` (a parent is a link or a file, so in
    git's view the path does not exist).  ``blob`` is the git blob id of a
    link's target, or of a file's content when its size was one asked for;
    None otherwise.
    """

    kind: str
    executable: bool = False
    size: int = -1
    blob: str | None = None
    stat: os.stat_result | None = None


def blob_id(data: bytes) -> str:
    """Git's (SHA-1) id of a blob with content ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def open_root(path: str | os.PathLike[str]) -> int:
    """A descriptor of the root directory itself (the one place links are followed)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_dir(root_fd: int, rel: bytes, *, create: bool = False) -> int:
    """A descriptor of directory ``rel`` (b"" is the root), reached without links.

    The caller closes it.  With ``create``, missing directories are made
    (mode 0777 less the umask; under root owned like their parent).  Raises
    :class:`Blocked` when a component is a link or not a directory and
    ``FileNotFoundError`` when one is missing and ``create`` is false.
    """
    fd = os.dup(root_fd)
    try:
        for name in rel.split(b"/") if rel else ():
            try:
                next_fd = _open_dir(fd, name)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o777, dir_fd=fd)
                except FileExistsError:  # made meanwhile, or a link put there: the open decides
                    pass
                else:
                    _own_like_dir(fd, name)
                next_fd = _open_dir(fd, name)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_parent(root_fd: int, rel: bytes, *, create: bool = False) -> tuple[int, bytes]:
    """The directory holding ``rel`` (see :func:`open_dir`) and the leaf name."""
    parent, _, leaf = rel.rpartition(b"/")
    return open_dir(root_fd, parent, create=create), leaf


def _open_dir(fd: int, name: bytes) -> int:
    try:
        return os.open(name, _DIR, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Blocked(exc.errno, "not a directory on the way", name) from None
        raise


def inspect(root_fd: int, rel: bytes, hash_sizes: Collection[int] = ()) -> Entry:
    """What ``rel`` is now, hashing a regular file whose size is in ``hash_sizes``.

    Hashing only at a size some checkpoint has means a file that differs in
    size from all of them costs one ``lstat``.
    """
    try:
        dir_fd, leaf = open_parent(root_fd, rel)
    except Blocked:
        return Entry("blocked")
    except FileNotFoundError:
        return Entry("absent")
    try:
        try:
            st = os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return Entry("absent")
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(leaf, dir_fd=dir_fd)
            return Entry("link", size=len(target), blob=blob_id(target), stat=st)
        if stat.S_ISDIR(st.st_mode):
            return Entry("dir", stat=st)
        if not stat.S_ISREG(st.st_mode):
            return Entry("other", stat=st)
        executable = bool(st.st_mode & stat.S_IXUSR)
        blob = _hash_file(dir_fd, leaf) if st.st_size in hash_sizes else None
        return Entry("file", executable, st.st_size, blob, st)
    finally:
        os.close(dir_fd)


def _hash_file(dir_fd: int, leaf: bytes) -> str | None:
    """The blob id of a regular file's content; None if it changed while read."""
    try:
        fd = os.open(leaf, _READ, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOENT):  # replaced by a link, or gone, since the stat
            return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        digest = hashlib.sha1(b"blob %d\0" % st.st_size)
        seen = 0
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
            seen += len(chunk)
        return digest.hexdigest() if seen == st.st_size else None
    finally:
        os.close(fd)


def write_file(
    dir_fd: int,
    name: bytes,
    fill: Callable[[int], None],
    *,
    executable: bool,
    temp: bytes,
    like: os.stat_result | None = None,
) -> None:
    """Replace ``name`` in ``dir_fd`` by a regular file that ``fill(fd)`` writes.

    ``temp`` is the temporary name (in the same directory; :func:`sweep`
    finds it by its prefix after a crash).  ``like`` is the stat of the file
    being replaced, whose permissions and owner the new one keeps.  The new
    file is fsync'd before the rename; the caller fsyncs the directory.
    """
    fd = os.open(temp, _CREATE, 0o777 if executable else 0o666, dir_fd=dir_fd)
    try:
        try:
            fill(fd)
            if like is not None and stat.S_ISREG(like.st_mode):
                os.fchmod(fd, _mode(like.st_mode, executable))
            _own(fd, dir_fd, like)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _discard(dir_fd, temp)
        raise


def write_symlink(
    dir_fd: int, name: bytes, target: bytes, *, temp: bytes, like: os.stat_result | None = None
) -> None:
    """Replace ``name`` in ``dir_fd`` by a symbolic link to ``target``."""
    os.symlink(target, temp, dir_fd=dir_fd)
    try:
        if os.geteuid() == 0:
            uid, gid = _owner(dir_fd, like)
            os.chown(temp, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _discard(dir_fd, temp)
        raise


def remove(dir_fd: int, name: bytes) -> bool:
    """Remove ``name`` (a file or link; a directory only if empty).  False if absent."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        os.rmdir(name, dir_fd=dir_fd)
    except PermissionError as exc:  # unlink(2) of a directory says EPERM on some systems
        if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise exc from None
        os.rmdir(name, dir_fd=dir_fd)
    return True


def sweep(root_fd: int, dirs: Iterable[bytes], prefix: bytes) -> int:
    """Remove the temporary files named ``prefix…`` in ``dirs`` (relative, b"" the root).

    Returns how many were removed.  Directories that are gone or blocked are
    skipped: nothing of ours can be in them.
    """
    removed = 0
    for rel in dirs:
        try:
            fd = open_dir(root_fd, rel)
        except (Blocked, FileNotFoundError, NotADirectoryError):
            continue
        try:
            found = [name for name in _names(fd) if name.startswith(prefix)]
            removed += sum(_discard(fd, name) for name in found)
            if found:
                os.fsync(fd)
        finally:
            os.close(fd)
    return removed


def fsync_dir(root_fd: int, rel: bytes) -> None:
    """fsync the directory ``rel`` (b"" for the root), so renames in it are durable."""
    try:
        fd = open_dir(root_fd, rel)
    except (Blocked, FileNotFoundError):  # gone since we wrote: nothing left to make durable
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_dir(root_fd: int, rel: bytes) -> list[bytes] | None:
    """The names in directory ``rel``, or None if it is not a reachable directory."""
    try:
        fd = open_dir(root_fd, rel)
    except (Blocked, FileNotFoundError):
        return None
    try:
        return _names(fd)
    finally:
        os.close(fd)


# -- the parts -----------------------------------------------------------------


def _mode(old: int, executable: bool) -> int:
    """``old``'s permission bits, with x wherever r is when ``executable``, else none."""
    bits = stat.S_IMODE(old) & ~_SPECIAL_BITS
    return bits | ((bits & 0o444) >> 2) if executable else bits & ~0o111


def _owner(dir_fd: int, like: os.stat_result | None) -> tuple[int, int]:
    st = like if like is not None else os.fstat(dir_fd)
    return st.st_uid, st.st_gid


def _own(fd: int, dir_fd: int, like: os.stat_result | None) -> None:
    if os.geteuid() == 0:
        uid, gid = _owner(dir_fd, like)
        os.fchown(fd, uid, gid)


def _own_like_dir(parent_fd: int, name: bytes) -> None:
    if os.geteuid() == 0:
        st = os.fstat(parent_fd)
        os.chown(name, st.st_uid, st.st_gid, dir_fd=parent_fd, follow_symlinks=False)


def _names(fd: int) -> list[bytes]:
    """The entries of an open directory, as bytes (listdir of a descriptor gives str)."""
    return [os.fsencode(name) for name in os.listdir(fd)]


def _discard(dir_fd: int, name: bytes) -> bool:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True
