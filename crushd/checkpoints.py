"""Checkpoints: a workspace's files recorded as git trees in a repository of crushd's own.

One :class:`CheckpointStore` per workspace.  Its repository lives under
crushd's data directory (``GIT_DIR`` there, ``GIT_WORK_TREE`` the workspace,
its own index), so the user's ``.git``, index and configuration are never
read for state nor written (:mod:`crushd.gitshadow` builds the environment).
What it offers, and why each piece is shaped so:

* :meth:`~CheckpointStore.snapshot` writes the workspace as a tree and says
  what it left out (:mod:`crushd.snapshots`).  It is incremental: a
  snapshot with nothing changed hashes nothing.  It records what
  ``git add -A`` would, with these differences, all on purpose:
  files over ``max_file_bytes`` are left out and listed (a model's build
  output must not fill the disk); new files stop at ``max_files``
  (``truncated``); nested repositories (a ``git clone`` inside the
  workspace) are left out and listed, as git itself would only store a
  link to them; the workspace's ``.gitignore`` files and its
  ``.git/info/exclude`` are honoured, global and system ones are not.  As
  in git, an ignore rule keeps new files out but does not drop a file
  already recorded, so adding a rule never shows up as deleted files.
  ``.gitattributes`` conversions (``eol``, ``text``, filters) are switched
  off: a tree holds the bytes on disk, so a restore writes them back.
* :meth:`~CheckpointStore.pin` names a tree by a ref under ``refs/crushd/``
  (a commit dated by the injected clock), which keeps it from ``git gc``;
  :meth:`~CheckpointStore.prune` drops pins older than ``keep_days`` and,
  past ``max_bytes``, the oldest runs, then runs ``git gc --prune=now``.
* :meth:`~CheckpointStore.diff`, :meth:`~CheckpointStore.stat` and
  :meth:`~CheckpointStore.changed_paths` compare two trees
  (:mod:`crushd.treediff`).
* :meth:`~CheckpointStore.restore` writes exactly the given paths back to a
  tree (see :mod:`crushd.restore` for how safely), and
  :meth:`~CheckpointStore.revert` wraps it between two snapshots so the
  revert itself can be undone.

All public methods are thread-safe and blocking; none is cheap enough to
call under a lock of the workspace.  ``_lock`` serializes everything that
writes (snapshots, pins, prunes, restores: they share one index, one set of
refs and the work tree); the comparisons take only ``_gc_gate``, which a
prune holds while ``git gc --prune=now`` repacks, so a diff the console asks
for never delays a run's snapshot.  :meth:`~CheckpointStore.close` (from any
thread) kills the git running and refuses new calls.

The store assumes it is the only writer of its repository: crushd's data
directory lock guarantees that, and :meth:`~CheckpointStore.init` relies on
it to clear the lock files a killed git left.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pwd
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crushd import restore as restoring
from crushd import treediff
from crushd.errors import (
    CheckpointClosed,
    CheckpointError,
    DiffTooLarge,
    RestoreBlocked,
    WorkspaceChanged,
)
from crushd.gitshadow import (
    EMPTY_TREE,
    GitFailed,
    GitRunner,
    GitTimeout,
    check_oid,
    git_environment,
    prepare_repository,
)
from crushd.restore import Interrupted, Restored
from crushd.snapshots import Pin, Skipped, Snapshot, Snapshotter
from crushd.treediff import DEFAULT_MAX_DIFF_BYTES, FileStat

__all__ = [
    "EMPTY_TREE",
    "CheckpointClosed",
    "CheckpointError",
    "CheckpointStore",
    "DiffTooLarge",
    "FileStat",
    "GitFailed",
    "GitTimeout",
    "Interrupted",
    "Pin",
    "Pruned",
    "RestoreBlocked",
    "Restored",
    "Revert",
    "Skipped",
    "Snapshot",
    "UnsafeWorkTree",
    "WorkspaceChanged",
]

logger = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_MAX_FILE_BYTES = 2 * MIB
DEFAULT_MAX_FILES = 100_000
DEFAULT_KEEP_DAYS = 7.0
DEFAULT_MAX_BYTES = 1024 * MIB
DEFAULT_GC_TIMEOUT = 600.0
REF_ROOT = "refs/crushd/"

_REF_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
_PRUNE_ROUNDS = 6  # gc passes the size cap may take before it gives up


class UnsafeWorkTree(CheckpointError):
    """The work tree is ``/``, a home directory, or holds the store itself."""

    code = "unsafe_work_tree"


@dataclass(frozen=True)
class Revert:
    """A restore between two snapshots: restore ``before`` to undo it.

    ``unrecorded`` are paths the restore overwrote whose content just before
    could not be recorded (too large; only possible with force): undoing
    the revert cannot bring them back.
    """

    restored: Restored
    before: Snapshot | None
    after: Snapshot | None
    unrecorded: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pruned:
    """What :meth:`CheckpointStore.prune` dropped, and the store's size around it."""

    removed: tuple[str, ...] = field(default=())
    bytes_before: int = 0
    bytes_after: int = 0


def check_work_tree(path: str | os.PathLike[str]) -> Path:
    """The real path of a work tree a store may record; raise UnsafeWorkTree if not.

    ``/`` and home directories themselves are refused: a snapshot of them
    would copy every secret and cache on the machine into the data
    directory.  A home directory is ``$HOME``, crushd's user's, root's, any
    directory right under ``/home``, or the home of an account with uid 0 or
    uid >= 1000 (Debian's first human account; system accounts' "homes" such
    as ``/bin`` or ``/var/www`` stay usable as workspaces).
    """
    real = Path(os.path.realpath(path))
    if real == Path("/"):
        raise UnsafeWorkTree("refusing to record checkpoints of / (choose a project directory)")
    if real.parent == Path("/home") or real in _home_dirs():
        raise UnsafeWorkTree(f"refusing to record checkpoints of the home directory {real}")
    return real


def _home_dirs() -> set[Path]:
    homes = {os.environ.get("HOME", ""), os.path.expanduser("~"), "/root"}
    try:
        homes.update(e.pw_dir for e in pwd.getpwall() if e.pw_uid == 0 or e.pw_uid >= 1000)
    except OSError:  # no readable passwd database: the other sources still count
        pass
    return {Path(os.path.realpath(h)) for h in homes if h and h != "/"}


class CheckpointStore:
    """The shadow repository of one workspace.  Constructing it creates nothing.

    ``git_dir`` is the repository (made by :meth:`init`, or lazily by the
    first call), ``work_tree`` the workspace (refused when unsafe, see
    :func:`check_work_tree`).  ``clock`` dates pins and retention;
    ``timeout`` bounds each git call (plus time for the bytes it hashes or
    writes), ``gc_timeout`` each ``git gc``.  ``exclude`` are paths relative
    to the work tree that are never recorded, nor anything below them
    (crushd's hidden list: its data directory, token, config file, socket
    and ``sandbox_hide`` paths inside the workspace), so no secret reaches
    a tree or a diff; one recorded before it was excluded is dropped at the
    next snapshot.
    """

    def __init__(
        self,
        git_dir: str | os.PathLike[str],
        work_tree: str | os.PathLike[str],
        *,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_files: int = DEFAULT_MAX_FILES,
        keep_days: float = DEFAULT_KEEP_DAYS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
        git: str = "git",
        timeout: float = 60.0,
        gc_timeout: float = DEFAULT_GC_TIMEOUT,
        exclude: Iterable[str] = (),
    ) -> None:
        self.work_tree = check_work_tree(work_tree)
        self.git_dir = Path(os.path.realpath(git_dir))
        if self.git_dir.is_relative_to(self.work_tree) or self.work_tree.is_relative_to(
            self.git_dir
        ):
            raise UnsafeWorkTree(
                f"the checkpoint store {self.git_dir} and the workspace {self.work_tree}"
                " must not contain each other"
            )
        self.keep_days = keep_days
        self.max_bytes = max_bytes
        self.gc_timeout = gc_timeout
        self._clock = clock
        index = self.git_dir / "index"
        env = git_environment(self.git_dir, self.work_tree, index)
        self._git = GitRunner(env, self.git_dir.parent, git=git, timeout=timeout)
        self._snapshots = Snapshotter(
            self._git,
            self.work_tree,
            index,
            max_file_bytes=max_file_bytes,
            max_files=max_files,
            exclude=restoring.normalize(exclude),
        )
        # Lock order: _lock, then _gc_gate (then GitRunner's own).
        self._lock = threading.Lock()  # guards the index, the refs, the journal, the work tree
        self._gc_gate = threading.Lock()  # held while git gc repacks and prunes objects
        self._ready = False  # guarded by _lock; read without it once true
        self._interrupted: Interrupted | None = None  # guarded by _lock

    @property
    def max_file_bytes(self) -> int:
        return self._snapshots.max_file_bytes

    @property
    def max_files(self) -> int:
        return self._snapshots.max_files

    # -- life cycle ------------------------------------------------------------

    def init(self) -> Interrupted | None:
        """Create or repair the repository; return a restore a crash interrupted.

        Idempotent; the other methods call it on first use.  Rewrites the
        configuration, removes lock files left by a killed git and the
        temporary files of an interrupted restore.  What that restore was
        (``tree``, ``paths``) is returned, once: every one of those files is
        either its old or its new content, and restoring the same tree and
        paths again (with force) completes it.
        """
        with self._lock:
            self._init()
            found, self._interrupted = self._interrupted, None
            return found

    def close(self) -> None:
        """Kill the git call in flight and refuse new ones.  Any thread; idempotent."""
        self._git.close()

    def _init(self) -> None:
        if self._ready:
            return
        if self._git.closed:
            raise CheckpointClosed("the checkpoint store is closed")
        prepare_repository(self._git, self.git_dir)
        self._interrupted = restoring.recover(self.git_dir, self.work_tree)
        self._ready = True
        logger.info("event=checkpoint_store_ready git_dir=%s", self.git_dir)

    def _ensure_ready(self) -> None:
        if not self._ready:
            with self._lock:
                self._init()

    # -- snapshots and pins ----------------------------------------------------

    def snapshot(self, pin: str | None = None, *, note: str = "") -> Snapshot:
        """Write the work tree as a tree now (see :mod:`crushd.snapshots`).

        With ``pin``, the tree is pinned under that ref (see :meth:`pin`) in
        the same hold of the lock, so no prune can come between and take the
        tree before it is kept; the commit message is ``note`` and what the
        snapshot left out.  Blocks for the time git needs: milliseconds when
        little changed, the hashing of every new file the first time.
        """
        if pin is not None:
            _ref_name(pin)
        with self._lock:
            self._init()
            snap = self._snapshots.write()
            if pin is None:
                return snap
            text = "\n\n".join(t for t in (note, snap.note()) if t)
            return dataclasses.replace(snap, pin=self._pin(pin, snap.tree, text))

    def pin(self, ref: str, tree: str, *, note: str = "") -> Pin:
        """Keep ``tree`` under ``refs/crushd/<ref>`` (e.g. ``runs/<run_id>/<n>``).

        ``ref`` is slash-separated parts of ``[A-Za-z0-9_.-]`` not starting
        with a dot; the pin is a commit of ``tree`` dated now by the clock,
        its message ``note`` (for people reading the repository).  Pinning
        the same ref again moves it.
        """
        _ref_name(ref)
        check_oid(tree)
        with self._lock:
            self._init()
            return self._pin(ref, tree, note)

    def pins(self, prefix: str = "") -> list[Pin]:
        """The pins under ``refs/crushd/<prefix>``, oldest first."""
        with self._lock:
            self._init()
            found = self._pins_locked(prefix)
        return sorted(found, key=lambda p: (p.time, p.ref))

    def unpin(self, prefix: str) -> int:
        """Drop every pin under ``refs/crushd/<prefix>``; how many.  The space
        comes back at the next :meth:`prune`."""
        with self._lock:
            self._init()
            pins = self._pins_locked(prefix)
            self._delete_refs(p.ref for p in pins)
        return len(pins)

    def _pin(self, ref: str, tree: str, note: str) -> Pin:
        when = int(self._clock())
        dates = {"GIT_AUTHOR_DATE": f"@{when} +0000", "GIT_COMMITTER_DATE": f"@{when} +0000"}
        message = f"crushd checkpoint {ref}\n\n{note}".rstrip() + "\n"
        out = self._git.run(["commit-tree", tree], input=message.encode(), env=dates)
        commit = out.decode().strip()
        self._git.run(["update-ref", "--no-deref", _ref_name(ref), commit])
        return Pin(ref, commit, tree, float(when))

    # -- retention -------------------------------------------------------------

    def prune(self, now: float | None = None, protect: Collection[str] = ()) -> Pruned:
        """Apply retention, then ``git gc --prune=now``; blocks for the gc.

        Pins are dropped by group (:attr:`Pin.group`, one run): groups whose
        newest pin is older than ``keep_days`` go, then, while the store is
        larger than ``max_bytes``, the oldest groups.  The newest group and
        those in ``protect`` (runs still going, or the latest recorded
        state) are never dropped.  Run it when the workspace is idle: it
        holds the store's lock for the whole gc.
        """
        now = self._clock() if now is None else now
        with self._lock:
            self._init()
            before = self.size_bytes()
            groups = _groups(self._pins_locked())
            keep = set(protect) | ({max(groups, key=groups.__getitem__)} if groups else set())
            cutoff = now - self.keep_days * 86400
            old = [g for g, t in groups.items() if t < cutoff and g not in keep]
            removed = self._drop_groups(old)
            self._gc()
            size = self.size_bytes()
            for _ in range(_PRUNE_ROUNDS):
                if self.max_bytes is None or size <= self.max_bytes:
                    break
                left = sorted((t, g) for g, t in _groups(self._pins_locked()).items())
                candidates = [g for _, g in left if g not in keep]
                if not candidates:
                    logger.warning(
                        "event=checkpoint_over_cap bytes=%d max_bytes=%d", size, self.max_bytes
                    )
                    break
                share = 1 - self.max_bytes / size
                count = max(1, math.ceil(len(candidates) * share))
                removed += self._drop_groups(candidates[:count])
                self._gc()
                size = self.size_bytes()
        logger.info(
            "event=checkpoint_pruned refs=%d bytes_before=%d bytes_after=%d",
            len(removed),
            before,
            size,
        )
        return Pruned(tuple(removed), before, size)

    def size_bytes(self) -> int:
        """Disk space the repository takes (allocated blocks, not apparent sizes)."""
        total = 0
        for folder, _, files in os.walk(self.git_dir):
            for name in files:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
                except FileNotFoundError:  # a temporary file git just renamed
                    continue
        return total

    def _pins_locked(self, prefix: str = "") -> list[Pin]:
        pattern = _ref_name(prefix) if prefix else REF_ROOT.rstrip("/")
        fmt = "%(refname)%00%(objectname)%00%(tree)%00%(committerdate:unix)"
        out = self._git.run(["for-each-ref", f"--format={fmt}", pattern])
        found = []
        for line in out.decode("utf-8", "replace").splitlines():
            name, commit, tree, when = line.split("\0")
            found.append(Pin(name.removeprefix(REF_ROOT), commit, tree, float(when or 0)))
        return found

    def _drop_groups(self, groups: Iterable[str]) -> list[str]:
        wanted = set(groups)
        refs = [p.ref for p in self._pins_locked() if p.group in wanted]
        self._delete_refs(refs)
        return refs

    def _delete_refs(self, refs: Iterable[str]) -> None:
        lines = "".join(f"delete {_ref_name(ref)}\n" for ref in refs)
        if lines:
            self._git.run(["update-ref", "--no-deref", "--stdin"], input=lines.encode())

    def _gc(self) -> None:
        with self._gc_gate:
            self._git.run(["gc", "--prune=now", "--quiet"], timeout=self.gc_timeout)
        self._snapshots.forget_tree()  # its tree may have been unpinned: write it again

    # -- comparing trees -------------------------------------------------------

    def changed_paths(self, before: str, after: str) -> list[str]:
        """Every path whose entry differs between the trees; a rename is both its paths."""
        self._ensure_ready()
        with self._gc_gate:
            return treediff.changed_paths(self._git, before, after)

    def diff(
        self,
        before: str,
        after: str,
        paths: Iterable[str] | None = None,
        *,
        context: int = 3,
        max_bytes: int = DEFAULT_MAX_DIFF_BYTES,
    ) -> str:
        """The unified diff between two trees; see :func:`crushd.treediff.diff`."""
        self._ensure_ready()
        with self._gc_gate:
            return treediff.diff(
                self._git, before, after, paths, context=context, max_bytes=max_bytes
            )

    def stat(self, before: str, after: str, paths: Iterable[str] | None = None) -> list[FileStat]:
        """Per file: status, lines added and removed; see :func:`crushd.treediff.stat`."""
        self._ensure_ready()
        with self._gc_gate:
            return treediff.stat(self._git, before, after, paths)

    # -- restoring -------------------------------------------------------------

    def restore(
        self,
        tree: str,
        paths: Iterable[str],
        *,
        expected: str | None = None,
        force: bool = False,
        dry_run: bool = False,
    ) -> Restored:
        """Make exactly ``paths`` what they are in ``tree``; nothing else is written.

        A path absent from ``tree`` is deleted, a present one (re)created,
        each file atomically (see :mod:`crushd.restore`).  With ``expected``
        (the tree crushd last recorded) every path is first compared with
        it; if any differs, :class:`WorkspaceChanged` is raised and nothing
        is written, unless ``force``.  A link or a file where a directory
        must be raises :class:`RestoreBlocked`, force or not.  ``dry_run``
        answers the same (including the raises) and writes nothing.
        """
        wanted = restoring.normalize(paths)
        with self._lock:
            self._init()
            return self._restore(tree, wanted, expected, force, dry_run)

    def revert(
        self,
        tree: str,
        paths: Iterable[str],
        *,
        expected: str | None,
        force: bool = False,
        dry_run: bool = False,
    ) -> Revert:
        """:meth:`restore`, checkpointed on both sides so it can be undone.

        The work tree is snapshotted first (so even content that drifted and
        is overwritten under force is kept), then restored, then snapshotted
        again.  To undo: ``revert(result.before.tree, paths,
        expected=result.after.tree)``.  Pinning the two trees is the
        caller's (it knows the names).  A dry run takes no snapshot.
        """
        wanted = restoring.normalize(paths)
        with self._lock:
            self._init()
            if dry_run:
                return Revert(self._restore(tree, wanted, expected, force, True), None, None)
            before = self._snapshots.write()
            restored = self._restore(tree, wanted, expected, force, False)
            after = self._snapshots.write() if restored.changed else before
        lost = {s.path for s in before.skipped} & set(restored.written + restored.deleted)
        return Revert(restored, before, after, tuple(sorted(lost)))

    def _restore(
        self, tree: str, wanted: Sequence[bytes], expected: str | None, force: bool, dry_run: bool
    ) -> Restored:
        plan = restoring.plan(self._git, self.work_tree, tree, wanted, expected)
        if plan.conflicts and not force:
            raise WorkspaceChanged([os.fsdecode(p) for p in plan.conflicts])
        if plan.blocked:
            more = f" (and {len(plan.blocked) - 1} more)" if len(plan.blocked) > 1 else ""
            raise RestoreBlocked(plan.blocked[0] + more)
        if dry_run:
            return plan.result(dry_run=True)
        return restoring.execute(self.git_dir, self.work_tree, plan, tree, self._git)


# -- helpers -------------------------------------------------------------------


def _ref_name(ref: str) -> str:
    parts = ref.split("/")
    if not all(_REF_PART.fullmatch(p) and not p.endswith(".lock") and ".." not in p for p in parts):
        raise CheckpointError(f"not a valid checkpoint ref: {ref!r}")
    return REF_ROOT + ref


def _groups(pins: Iterable[Pin]) -> dict[str, float]:
    """Each group's newest pin time."""
    groups: dict[str, float] = {}
    for pin in pins:
        groups[pin.group] = max(groups.get(pin.group, pin.time), pin.time)
    return groups
