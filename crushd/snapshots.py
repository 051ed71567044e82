"""Snapshots: the workspace written as a git tree, incrementally, within bounds.

:class:`Snapshotter` does what ``git add -A && git write-tree`` would into
the store's private index, with the differences :mod:`crushd.checkpoints`
describes (size and count bounds, nested repositories, the user's exclude
file).  It is cheap when little changed because the index remembers each
file's stat data: ``ls-files -m -d`` finds the recorded files that changed
(comparing stat data, and content only for racily clean entries) and
``ls-files --others`` the new ones, both walks started together; only
those are hashed, and an unchanged index gives the last tree again without
a ``write-tree``.

Not thread-safe: the store calls it under its lock, because it writes the
index and the object database.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from crushd.gitshadow import (
    CheckpointError,
    GitFailed,
    GitRunner,
    GitStream,
    GitTimeout,
    work_budget,
)

logger = logging.getLogger(__name__)

#: From this many files (or bytes) to hash, a snapshot writes its blobs into
#: one new pack instead of one loose object file each.  Below it loose
#: objects are cheaper, and a pack per small snapshot would pile up packs
#: that every object lookup must search until the next gc.
BULK_FILES = 100
BULK_BYTES = 8 << 20
# git streams blobs larger than core.bigFileThreshold straight into a pack;
# only for this call, so gc still looks for deltas with the default.
_BULK = ("-c", "core.bigFileThreshold=1")


@dataclass(frozen=True)
class Skipped:
    """A path a snapshot left out: ``too_large``, ``nested_repository`` or ``special_file``."""

    path: str
    reason: str
    size: int | None = None


@dataclass(frozen=True)
class Pin:
    """A ref that keeps a tree: ``ref`` is relative to ``refs/crushd/``."""

    ref: str
    commit: str
    tree: str
    time: float

    @property
    def group(self) -> str:
        """The ref without its last part (``runs/<run_id>``): what retention drops as one."""
        return self.ref.rpartition("/")[0] or self.ref


@dataclass(frozen=True)
class Snapshot:
    """One written tree and what it is not.

    ``files`` is the number of files in it, ``updated`` how many paths this
    snapshot had to hash or drop (0 when nothing changed), ``truncated``
    whether new files were left out at ``max_files``; ``pin`` the pin made
    with it, if one was asked for.
    """

    tree: str
    skipped: tuple[Skipped, ...] = ()
    truncated: bool = False
    files: int = 0
    updated: int = 0
    seconds: float = 0.0
    pin: Pin | None = None

    def note(self, limit: int = 20) -> str:
        """A short text of what was left out ("" if nothing), for a record or a log."""
        lines = [f"{s.reason}: {s.path}" for s in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"... {len(self.skipped) - limit} more left out")
        if self.truncated:
            lines.append(f"truncated: new files past the limit of {self.files} were left out")
        return "\n".join(lines)


class Snapshotter:
    """Writes snapshots of ``work_tree`` through ``git``'s index ``index``."""

    def __init__(
        self,
        git: GitRunner,
        work_tree: Path,
        index: Path,
        *,
        max_file_bytes: int,
        max_files: int,
        exclude: Iterable[bytes] = (),
    ) -> None:
        self._git = git
        self.work_tree = work_tree
        self._index = index
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        # Paths never recorded, with everything below them (crushd's hidden
        # list): dropped from the index even if recorded before.
        self.exclude = tuple(sorted(set(exclude)))
        self._excluded_dropped = not self.exclude  # recorded ones are dropped by the first write
        self._last_tree: tuple[tuple[int, int, int], str] | None = None

    def write(self) -> Snapshot:
        """One snapshot; a file that turns into something git cannot add
        while it runs (a FIFO, a directory) makes it retry once."""
        try:
            return self._write()
        except GitFailed as exc:
            if isinstance(exc, GitTimeout) or "update-index" not in exc.args_run:
                raise
            logger.info("event=checkpoint_snapshot_retry error=%r", exc.stderr[:200])
            return self._write()

    def forget_tree(self) -> None:
        """Write the tree again next time (after a gc, which may have dropped it)."""
        self._last_tree = None

    def _write(self) -> Snapshot:
        started = time.monotonic()
        root = os.fsencode(self.work_tree)
        dirs: dict[bytes, bool] = {}  # parent directory -> is a real directory (no link)
        skipped: list[Skipped] = []
        update: list[bytes] = []  # add or refresh (a new file that vanished is skipped by git)
        drop: list[bytes] = []  # in the index, but gone, beneath a link, or not recordable
        if not self._excluded_dropped:  # recorded before they were excluded, unchanged since
            listed = self._records(["ls-files", "-z", "--", *map(os.fsdecode, self.exclude)])
            drop += [p for p in listed if self._excluded(p)]
        nbytes = 0  # what update-index will hash
        # Both listings walk the tree; started together they use two cores.
        with self._git.stream(self._others_args()) as others:
            for path in dict.fromkeys(self._records(["ls-files", "-z", "-m", "-d"])):
                if self._excluded(path):
                    if path not in drop:
                        drop.append(path)
                    continue
                st = _lstat(root, path, dirs)
                if st is not None and _recordable(st) and st.st_size <= self.max_file_bytes:
                    update.append(path)
                    nbytes += st.st_size
                    continue
                drop.append(path)  # forced: git refuses a plain --remove beneath a link
                if st is not None and not stat.S_ISDIR(st.st_mode):  # a directory's files are new
                    skipped.append(_skip(path, st))
            room = max(0, self.max_files - (_index_entries(self._index) - len(drop)))
            new, truncated, more = self._untracked(others, root, dirs, room, skipped)
        if drop:
            self._git.run(["update-index", "-z", "--force-remove", "--stdin"], input=_z(drop))
        if update or new:
            # Many blobs at once go into one pack rather than a file each:
            # a first snapshot of 5,000 files took 0.34 s this way, 1.4 s loose.
            bulk = len(update) + len(new) >= BULK_FILES or nbytes + more >= BULK_BYTES
            self._git.run(
                [*(_BULK if bulk else ()), "update-index", "-z", "--add", "--remove", "--stdin"],
                input=_z(update + new),
                timeout=self._budget(nbytes + more),
            )
        tree = self._write_tree()
        self._excluded_dropped = True
        snap = Snapshot(
            tree=tree,
            skipped=tuple(skipped),
            truncated=truncated,
            files=_index_entries(self._index),
            updated=len(update) + len(new) + len(drop),
            seconds=time.monotonic() - started,
        )
        logger.debug(
            "event=checkpoint_snapshot tree=%s files=%d updated=%d skipped=%d truncated=%s ms=%.1f",
            tree[:12],
            snap.files,
            snap.updated,
            len(skipped),
            truncated,
            snap.seconds * 1000,
        )
        return snap

    def _others_args(self) -> list[str]:
        args = ["ls-files", "-z", "--others", "--exclude-standard"]
        user_exclude = self.work_tree / ".git" / "info" / "exclude"
        if user_exclude.is_file() and not user_exclude.is_symlink():
            args.append(f"--exclude-from={user_exclude}")
        # So that git does not even list a large hidden directory; the
        # check in _untracked is what holds.
        args += [f"--exclude={_literal_pattern(p)}" for p in self.exclude]
        return args

    def _excluded(self, path: bytes) -> bool:
        """Whether ``path`` is an excluded path or lies beneath one."""
        return any(path == e or path.startswith(e + b"/") for e in self.exclude)

    def _untracked(
        self,
        others: GitStream,
        root: bytes,
        dirs: dict[bytes, bool],
        room: int,
        skipped: list[Skipped],
    ) -> tuple[list[bytes], bool, int]:
        """New files to add (at most ``room``), whether more were left out, their bytes.

        Reads ``ls-files --others`` as it comes and stops (git is killed when
        the stream closes) at the first file past ``room``, so a tree of a
        million new files costs what ``max_files`` of them cost.
        """
        new: list[bytes] = []
        nbytes = 0
        while (path := others.record()) is not None:
            if self._excluded(path.rstrip(b"/")):
                continue
            if path.endswith(b"/"):  # git lists a nested repository as its directory
                skipped.append(Skipped(os.fsdecode(path[:-1]), "nested_repository"))
                continue
            st = _lstat(root, path, dirs)
            if st is None:
                continue  # gone since git saw it
            if not _recordable(st) or st.st_size > self.max_file_bytes:
                skipped.append(_skip(path, st))
                continue
            if len(new) == room:
                return new, True, nbytes
            new.append(path)
            nbytes += st.st_size
        others.finish()
        return new, False, nbytes

    def _budget(self, nbytes: int) -> float:
        return work_budget(self._git.timeout, nbytes)

    def _write_tree(self) -> str:
        """``git write-tree``, skipped when the index is the file it was last time.

        Only this store writes the index, always through a new file renamed
        into place, so the same inode, size and mtime mean the same entries.
        """
        try:
            st = os.stat(self._index)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            key = None
        if key is not None and self._last_tree is not None and self._last_tree[0] == key:
            return self._last_tree[1]
        tree = self._git.run(["write-tree"]).decode().strip()
        self._last_tree = None if key is None else (key, tree)
        return tree

    def _records(self, args: Sequence[str]) -> list[bytes]:
        return [p for p in self._git.run(args).split(b"\0") if p]


def _lstat(root: bytes, path: bytes, dirs: dict[bytes, bool]) -> os.stat_result | None:
    """lstat of ``path`` in the work tree; None if gone or beneath a link.

    Git does not record what lies beneath a symbolic link and refuses to
    add it; ``dirs`` caches the parents checked during one snapshot.
    """
    parent = b""
    for part in path.split(b"/")[:-1]:
        parent = parent + b"/" + part if parent else part
        real = dirs.get(parent)
        if real is None:
            try:
                real = stat.S_ISDIR(os.lstat(root + b"/" + parent).st_mode)
            except OSError:  # gone or unreadable: git cannot add what is below either
                real = False
            dirs[parent] = real
        if not real:
            return None
    try:
        return os.lstat(root + b"/" + path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _recordable(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)


def _skip(path: bytes, st: os.stat_result) -> Skipped:
    reason = "too_large" if _recordable(st) else "special_file"
    return Skipped(os.fsdecode(path), reason, st.st_size if _recordable(st) else None)


def _index_entries(index: Path) -> int:
    """The entry count in an index file's header (``DIRC``, version, count)."""
    try:
        with open(index, "rb") as f:
            header = f.read(12)
    except FileNotFoundError:
        return 0
    if len(header) < 12 or header[:4] != b"DIRC":
        raise CheckpointError(f"{index} is not a git index")
    return int.from_bytes(header[8:12], "big")


def _literal_pattern(path: bytes) -> str:
    """An ignore pattern matching exactly ``path`` (relative to the work tree)
    and what lies below it: anchored, every wildcard and special character
    escaped."""
    text = os.fsdecode(path)
    return "/" + "".join("\\" + c if c in "\\*?[]!# " else c for c in text)


def _z(paths: Iterable[bytes]) -> bytes:
    return b"".join(p + b"\0" for p in paths)
