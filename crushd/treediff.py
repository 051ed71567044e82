"""Comparing two checkpoint trees: the changed paths, a unified diff, a stat.

The functions take the store's :class:`~crushd.gitshadow.GitRunner` and two
tree ids and call ``git diff-tree``, which compares trees without a work
tree or an index, so none of them touches the workspace or the store's
index and they may run beside a snapshot.  Rename detection is on for
what people read (:func:`diff`, :func:`stat`) and off for
:func:`changed_paths`, whose answer is what a revert must restore: both
sides of a rename.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from crushd.errors import DiffTooLarge
from crushd.gitshadow import GitRunner, check_oid
from crushd.restore import normalize

DEFAULT_MAX_DIFF_BYTES = 16 << 20


@dataclass(frozen=True)
class FileStat:
    """One file of a diff stat; ``added``/``removed`` are None for binary files."""

    path: str
    status: str  # added, deleted, modified, renamed, copied, type_changed
    added: int | None
    removed: int | None
    old_path: str | None = None
    old_mode: str | None = None
    new_mode: str | None = None

    @property
    def binary(self) -> bool:
        return self.added is None

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "status": self.status,
            "added": self.added,
            "removed": self.removed,
            "binary": self.binary,
            "old_path": self.old_path,
            "old_mode": self.old_mode,
            "new_mode": self.new_mode,
        }


def changed_paths(git: GitRunner, before: str, after: str) -> list[str]:
    """Every path whose entry differs between the trees; a rename is both its paths."""
    args = ["diff-tree", "-r", "-z", "--no-renames", "--name-only"]
    out = git.run([*args, check_oid(before), check_oid(after)])
    return [os.fsdecode(p) for p in out.split(b"\0") if p]


def diff(
    git: GitRunner,
    before: str,
    after: str,
    paths: Iterable[str] | None = None,
    *,
    context: int = 3,
    max_bytes: int = DEFAULT_MAX_DIFF_BYTES,
) -> str:
    """The unified diff from ``before`` to ``after`` (renames found), for ``paths`` if given.

    Binary files show as ``Binary files a/x and b/x differ``; bytes that are
    not UTF-8 are replaced.  Raises :class:`DiffTooLarge` past ``max_bytes``
    (git is stopped there; a :func:`stat` still works).
    """
    args = ["diff-tree", "-r", "-p", "-M", "--no-color", "--no-ext-diff", "--no-textconv"]
    args += [f"-U{int(context)}", check_oid(before), check_oid(after), "--"]
    args += [os.fsdecode(p) for p in normalize(paths or ())]
    with git.stream(args) as out:
        text = out.rest(max_bytes)
        if text is None:
            raise DiffTooLarge(f"the diff is larger than {max_bytes} bytes")
        out.finish()
    return text.decode("utf-8", "replace")


def stat(
    git: GitRunner, before: str, after: str, paths: Iterable[str] | None = None
) -> list[FileStat]:
    """Per file: status, lines added and removed (None when binary), renames found."""
    args = ["diff-tree", "-r", "-z", "-M", "--raw", "--numstat", check_oid(before)]
    args += [check_oid(after), "--", *(os.fsdecode(p) for p in normalize(paths or ()))]
    return _parse_stat(git.run(args))


_STATUS = {
    "A": "added",
    "D": "deleted",
    "M": "modified",
    "R": "renamed",
    "C": "copied",
    "T": "type_changed",
}


def _parse_stat(out: bytes) -> list[FileStat]:
    """Parse ``diff-tree -z --raw --numstat``: the raw records, then the counts, in order."""
    tokens = out.split(b"\0")
    raw: list[tuple[str, str, str, str | None, str]] = []
    counts: list[tuple[int | None, int | None]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token:
            i += 1
            continue
        if token.startswith(b":"):
            old_mode, new_mode, _, _, status = token[1:].decode().split(" ")
            letter = status[0]
            if letter in "RC":
                old, new = tokens[i + 1], tokens[i + 2]
                raw.append((letter, old_mode, new_mode, os.fsdecode(old), os.fsdecode(new)))
                i += 3
            else:
                path = os.fsdecode(tokens[i + 1])
                raw.append((letter, old_mode, new_mode, None, path))
                i += 2
            continue
        added, removed, path = token.split(b"\t", 2)
        counts.append((None, None) if added == b"-" else (int(added), int(removed)))
        i += 1 if path else 3
    stats = []
    for (letter, old_mode, new_mode, old_path, path), (added, removed) in zip(
        raw, counts, strict=True
    ):
        stats.append(
            FileStat(
                path=path,
                status=_STATUS.get(letter, "modified"),
                added=added,
                removed=removed,
                old_path=old_path,
                old_mode=None if old_mode == "000000" else old_mode,
                new_mode=None if new_mode == "000000" else new_mode,
            )
        )
    return stats
