"""Restoring paths of a workspace to a checkpoint: planned, journaled, one atomic file at a time.

:meth:`crushd.checkpoints.CheckpointStore.restore` calls this module under
its lock.  A restore is done in two steps, so that whatever can be refused
is refused before anything is written:

1. :func:`plan` reads the trees' entries at the paths from git, looks at
   every path as it is now (without following links,
   :mod:`crushd.atomicfs`), compares it with the tree crushd last recorded
   (a difference is a *conflict*, :class:`~crushd.checkpoints.WorkspaceChanged`
   unless forced) and with the target, and checks that every write has a
   way in: a link or a file standing where a directory must be is refused
   unless the restore itself removes it, a directory standing where a file
   must be only if it would be empty.
   The store reports conflicts first (the user may force them), then
   blocked writes (force does not help: nothing is written through a link).
2. :func:`execute` writes a journal (the token naming its temporary files,
   the tree and the paths) into the repository, removes files deepest
   first, then writes files shallowest first, each into a temporary file
   renamed over its name, then fsyncs the directories and drops the
   journal.  After a crash :func:`recover` finds the journal, removes the
   temporary files (by their token, so nothing of the user's) and says
   what was interrupted: every file is its old or its new content.

Only the given paths are ever written or removed, and the directories a
write needs; directories are never removed except an empty one standing
where a file is restored, so a restore that deletes a file leaves its
directory (possibly empty) in place, as ``git checkout`` would not.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crushd import atomicfs
from crushd.errors import CheckpointError, RestoreBlocked
from crushd.gitshadow import GitRunner, GitStream, check_oid, work_budget

logger = logging.getLogger(__name__)

TEMP_PREFIX = b".crushd-restore-"
JOURNAL = "restore-journal.json"
_LINK = "120000"
_EXECUTABLE = "100755"
_GITLINK = "160000"


@dataclass(frozen=True)
class TreeEntry:
    """One file of a tree: its git mode (``100644``, ``100755``, ``120000``), type and blob."""

    mode: str
    kind: str
    oid: str


@dataclass(frozen=True)
class Restored:
    """What a restore wrote, removed, found already right, and overrode (force)."""

    written: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    overridden: tuple[str, ...] = ()
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.written or self.deleted)


@dataclass(frozen=True)
class Interrupted:
    """A restore a crash cut short: restore ``tree`` at ``paths`` again to finish it."""

    token: str
    tree: str
    paths: tuple[str, ...]
    started: float


@dataclass
class Plan:
    """The work of one restore, decided before anything is written."""

    writes: list[tuple[bytes, TreeEntry, atomicfs.Entry]] = field(default_factory=list)
    deletes: list[bytes] = field(default_factory=list)
    clears: list[bytes] = field(default_factory=list)  # empty directories where files go
    unchanged: list[bytes] = field(default_factory=list)
    conflicts: list[bytes] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # why a write has no way in
    bytes: int = 0  # content to write

    def result(self, *, dry_run: bool) -> Restored:
        return Restored(
            written=_names(p for p, _, _ in self.writes),
            deleted=_names(self.deletes),
            unchanged=_names(self.unchanged),
            overridden=_names(self.conflicts),
            dry_run=dry_run,
        )


def normalize(paths: Iterable[str | bytes]) -> list[bytes]:
    """Sorted, unique relative paths; refuse anything that could leave the work tree.

    Refused (``CheckpointError``): empty, absolute, ``.``/``..`` or empty
    components, a NUL, or a ``.git`` component in any case (git never
    records one, and writing there would touch a repository).
    """
    found = set()
    for path in paths:
        raw = os.fsencode(path)
        parts = raw.split(b"/")
        if (
            not raw
            or b"\0" in raw
            or any(p in (b"", b".", b"..") or p.lower() == b".git" for p in parts)
        ):
            raise CheckpointError(f"not a path inside the workspace: {path!r}")
        found.add(raw)
    return sorted(found)


def matches(entry: atomicfs.Entry, tree: TreeEntry | None) -> bool:
    """Whether the path as it is now is what ``tree`` says (None: no file there).

    A directory, or a path beneath a link, counts as no file: git records
    neither, and a restore does not remove directories.
    """
    if tree is None:
        return entry.kind in ("absent", "dir", "blocked")
    if tree.mode == _LINK:
        return entry.kind == "link" and entry.blob == tree.oid
    if tree.mode == _GITLINK:
        return entry.kind == "dir"
    return (
        entry.kind == "file"
        and entry.blob == tree.oid
        and entry.executable == (tree.mode == _EXECUTABLE)
    )


def plan(
    git: GitRunner,
    work_tree: Path,
    tree: str,
    paths: Sequence[bytes],
    expected: str | None,
) -> Plan:
    """Decide a restore of ``paths`` (normalized) to ``tree``; see the module docstring.

    ``expected`` is the tree crushd last recorded (None: no conflict check).
    Only files of a size some entry has are hashed.  Writes that cannot be
    done are in ``blocked``, conflicts in ``conflicts``: the caller decides
    which to raise.
    """
    target = tree_entries(git, check_oid(tree), paths)
    recorded = None if expected is None else tree_entries(git, check_oid(expected), paths)
    entries = [e for e in (*target.values(), *(recorded or {}).values()) if e.kind == "blob"]
    sizes = blob_sizes(git, {e.oid for e in entries})
    result = Plan()
    root = atomicfs.open_root(work_tree)
    try:
        for path in paths:
            want = target.get(path)
            known = None if recorded is None else recorded.get(path)
            hash_at = {sizes[e.oid] for e in (want, known) if e is not None and e.oid in sizes}
            now = atomicfs.inspect(root, path, hash_at)
            if recorded is not None and not matches(now, known):
                result.conflicts.append(path)
            if matches(now, want):
                result.unchanged.append(path)
            elif want is None:
                result.deletes.append(path)
            elif want.mode == _GITLINK or want.kind != "blob":
                result.blocked.append(f"{os.fsdecode(path)} is a nested repository, not a file")
            else:
                if now.kind == "dir":
                    result.clears.append(path)
                result.writes.append((path, want, now))
                result.bytes += sizes.get(want.oid, 0)
        _check_ways(root, result)
    finally:
        os.close(root)
    return result


def _check_ways(root: int, work: Plan) -> None:
    """Note each write whose directory is a link or a file the restore keeps,
    or which needs a directory removed that would not be empty."""
    removed = set(work.deletes) | set(work.clears)
    for path, _, now in work.writes:
        if now.kind == "blocked" and not any(p in removed for p in _parents(path)):
            work.blocked.append(
                f"cannot restore {os.fsdecode(path)}: a link or a file stands where its"
                " directory should be (remove it, or include it in the restore)"
            )
    for folder in work.clears:
        left = [
            n for n in atomicfs.list_dir(root, folder) or () if folder + b"/" + n not in removed
        ]
        if left:
            work.blocked.append(
                f"cannot restore {os.fsdecode(folder)}: a directory with other files"
                f" ({os.fsdecode(left[0])}, ...) stands in its place"
            )


def execute(git_dir: Path, work_tree: Path, work: Plan, tree: str, git: GitRunner) -> Restored:
    """Carry out a plan; blocks for the writes.

    Raises :class:`RestoreBlocked` or another ``CheckpointError`` if the
    workspace changed under it so that a path cannot be written or removed:
    the paths done so far stay done, each file whole, and the message says
    how far it got.
    """
    token = secrets.token_hex(8)
    temp_prefix = TEMP_PREFIX + token.encode() + b"-"
    journal = git_dir / JOURNAL
    touched = [p for p, _, _ in work.writes] + work.deletes
    _write_journal(journal, token, tree, touched)
    dirs: set[bytes] = set()
    done = 0
    root = atomicfs.open_root(work_tree)
    path = b""
    try:
        for path in sorted(work.deletes + work.clears, key=_depth, reverse=True):
            try:
                parent, leaf = atomicfs.open_parent(root, path)
            except (atomicfs.Blocked, FileNotFoundError):
                continue  # beneath a link or gone: nothing of the work tree's is there
            try:
                atomicfs.remove(parent, leaf)
            finally:
                os.close(parent)
            dirs.add(path.rpartition(b"/")[0])
            done += 1
        budget = work_budget(git.timeout, work.bytes)
        with git.stream(["cat-file", "--batch"], stdin=True, timeout=budget) as blobs:
            for n, (path, want, now) in enumerate(sorted(work.writes, key=lambda w: _depth(w[0]))):
                parent, leaf = atomicfs.open_parent(root, path, create=True)
                try:
                    _write_one(blobs, parent, leaf, want, now, temp_prefix + b"%d.tmp" % n)
                finally:
                    os.close(parent)
                dirs.update(_parents(path))
                dirs.add(b"")
                done += 1
            blobs.finish()
        for folder in sorted(dirs, key=_depth, reverse=True):
            atomicfs.fsync_dir(root, folder)
    except OSError as exc:  # the workspace changed under the restore (a link, a full directory)
        kind = RestoreBlocked if isinstance(exc, atomicfs.Blocked) else CheckpointError
        raise kind(
            f"restore stopped at {os.fsdecode(path)} ({done} of {len(touched)} paths done,"
            f" each whole): {exc}"
        ) from exc
    finally:
        os.close(root)
        _drop_journal(journal)
    logger.info(
        "event=checkpoint_restored tree=%s written=%d deleted=%d forced=%d",
        tree[:12],
        len(work.writes),
        len(work.deletes),
        len(work.conflicts),
    )
    return work.result(dry_run=False)


def _write_one(
    blobs: GitStream, parent: int, leaf: bytes, want: TreeEntry, now: atomicfs.Entry, temp: bytes
) -> None:
    blobs.write(want.oid.encode() + b"\n")
    header = (blobs.record(b"\n") or b"").split(b" ")
    if len(header) != 3 or header[1] != b"blob":
        raise CheckpointError(f"checkpoint object {want.oid} is missing: {header!r}")
    size = int(header[2])
    if want.mode == _LINK:
        target = blobs.exactly(size)
        blobs.exactly(1)
        like = now.stat if now.kind == "link" else None
        atomicfs.write_symlink(parent, leaf, target, temp=temp, like=like)
        return
    like = now.stat if now.kind == "file" else None
    atomicfs.write_file(
        parent,
        leaf,
        lambda fd: blobs.copy(size, fd),
        executable=want.mode == _EXECUTABLE,
        temp=temp,
        like=like,
    )
    blobs.exactly(1)


def recover(git_dir: Path, work_tree: Path) -> Interrupted | None:
    """After a crash: remove an interrupted restore's temporary files, say what it was."""
    journal = git_dir / JOURNAL
    try:
        data = json.loads(journal.read_text(encoding="utf-8"))
        token = str(data["token"])
        paths = tuple(str(p) for p in data["paths"])
        found = Interrupted(token, str(data["tree"]), paths, float(data["started"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:  # not ours or damaged: it names no files
        logger.warning("event=checkpoint_journal_unreadable path=%s error=%r", journal, exc)
        _drop_journal(journal)
        return None
    removed = 0
    if token.isalnum():
        dirs = {os.fsencode(p).rpartition(b"/")[0] for p in paths}
        try:
            root = atomicfs.open_root(work_tree)
        except FileNotFoundError:  # the workspace is gone, and its temporary files with it
            root = None
        if root is not None:
            try:
                removed = atomicfs.sweep(root, dirs, TEMP_PREFIX + token.encode() + b"-")
            finally:
                os.close(root)
    _drop_journal(journal)
    logger.warning(
        "event=checkpoint_restore_interrupted tree=%s paths=%d temp_removed=%d",
        found.tree[:12],
        len(paths),
        removed,
    )
    return found


def tree_entries(git: GitRunner, tree: str, paths: Sequence[bytes]) -> dict[bytes, TreeEntry]:
    """The entries of ``tree`` at exactly ``paths`` (a directory there is no entry)."""
    found: dict[bytes, TreeEntry] = {}
    wanted = set(paths)
    for chunk in _chunks(paths):
        out = git.run(["ls-tree", "-r", "-z", "--full-tree", tree, "--", *map(os.fsdecode, chunk)])
        for record in out.split(b"\0"):
            if not record:
                continue
            meta, _, path = record.partition(b"\t")
            mode, kind, oid = meta.split(b" ")
            if path in wanted:
                found[path] = TreeEntry(mode.decode(), kind.decode(), oid.decode())
    return found


def blob_sizes(git: GitRunner, oids: Collection[str]) -> dict[str, int]:
    """The sizes of the blobs ``oids`` (missing ones are left out)."""
    if not oids:
        return {}
    request = "".join(f"{oid}\n" for oid in oids).encode()
    sizes = {}
    for line in git.run(["cat-file", "--batch-check"], input=request).decode().splitlines():
        oid, kind, size = line.split(" ")
        if kind == "blob":
            sizes[oid] = int(size)
    return sizes


def _chunks(paths: Sequence[bytes], budget: int = 64 * 1024) -> Iterable[Sequence[bytes]]:
    """``paths`` in pieces whose command lines stay far below ARG_MAX."""
    start, size = 0, 0
    for i, path in enumerate(paths):
        size += len(path) + 1
        if size > budget:
            yield paths[start:i]
            start, size = i, len(path) + 1
    if start < len(paths):
        yield paths[start:]


def _write_journal(journal: Path, token: str, tree: str, paths: Iterable[bytes]) -> None:
    data = {"token": token, "tree": tree, "paths": _names(paths), "started": time.time()}
    temp = journal.with_name(journal.name + ".tmp")
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, journal)
    fd = os.open(journal.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_journal(journal: Path) -> None:
    try:
        journal.unlink()
    except FileNotFoundError:
        pass


def _names(paths: Iterable[bytes]) -> tuple[str, ...]:
    return tuple(os.fsdecode(p) for p in paths)


def _depth(path: bytes) -> int:
    return path.count(b"/")


def _parents(path: bytes) -> list[bytes]:
    """``a/b/c`` -> ``[a, a/b]``."""
    parts = path.split(b"/")[:-1]
    return [b"/".join(parts[: i + 1]) for i in range(len(parts))]
