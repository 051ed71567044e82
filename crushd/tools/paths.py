"""Path resolution for tools.

Every path a tool touches goes through :func:`resolve`: relative paths are
taken against the workspace root, ``~`` is expanded, and ``..`` and symlinks
are resolved with :func:`os.path.realpath` so that a link pointing out of the
workspace is seen for what it is.  Tools never refuse a path themselves;
:meth:`Tool.paths` hands the resolved paths to the run loop, which asks for
permission when :func:`is_inside` is false.

The run loop calls :meth:`Tool.paths` and then :meth:`Tool.run` with the
same arguments object; a symbolic link changed in between would make a
second :func:`resolve` in ``run`` name another path than the one checked.
:class:`CheckedPaths` keeps what ``paths`` reported for ``run`` to use, and
:mod:`crushd.tools.safeopen` opens exactly that path, following no link.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crushd.tools.base import ToolError

_RESOLVE_ATTEMPTS = 5


def resolve(path: str, root: Path) -> Path:
    """Return the real, absolute path ``path`` names, relative to ``root``.

    Does not require the path to exist (a ``write`` target may not yet).
    Raises :class:`ToolError` for an empty path or one holding a NUL byte,
    and for one whose links keep changing while it is resolved.
    """
    if not path.strip():
        raise ToolError("path must not be empty")
    if "\0" in path:
        raise ToolError("path must not contain a NUL byte")
    expanded = os.path.expanduser(path)
    try:
        return Path(_realpath(os.path.join(_realpath(root), expanded)))
    except OSError as exc:
        raise ToolError(
            f"{path} kept changing while it was being resolved: {exc.strerror or exc}"
        ) from exc


def _realpath(path: str | os.PathLike[str]) -> str:
    """:func:`os.path.realpath`, tried again when the tree changes under it.

    realpath lstat()s a name and then readlink()s it; a link replaced by a
    directory in between fails the readlink (EINVAL).  Raises that OSError
    if the path keeps changing.
    """
    for attempt in range(_RESOLVE_ATTEMPTS):
        try:
            return os.path.realpath(path)
        except OSError:
            if attempt == _RESOLVE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def is_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """True if ``path`` is ``root`` or lies below it, after resolving both.
    False, so permission is asked, when the path keeps changing meanwhile."""
    try:
        real_path = _realpath(path)
        real_root = _realpath(root)
    except OSError:
        return False
    try:
        return os.path.commonpath([real_path, real_root]) == real_root
    except ValueError:  # mixes absolute and relative, or different drives
        return False


def display(path: Path, root: Path) -> str:
    """How tool output names ``path``: relative to the workspace root when it
    lies below it (shorter, and valid input for the next tool call), else
    absolute.  ``path`` is compared as written, links not followed, so an
    entry found while walking the workspace keeps its workspace name."""
    real_root = os.path.realpath(root)
    abs_path = os.path.abspath(path)
    try:
        below = os.path.commonpath([abs_path, real_root]) == real_root
    except ValueError:
        below = False
    if not below:
        return abs_path
    return os.path.relpath(abs_path, real_root)


class CheckedPaths:
    """What a tool's :meth:`paths` reported for one call, kept for its
    :meth:`run`, so ``run`` touches the paths the permission check saw.

    A call is one arguments object with one context (compared by identity,
    and held, so neither id can be reused while an entry lives).  Entries
    of calls that never run (denied) fall out after ``size`` newer ones.
    Thread-safe; never blocks beyond its lock.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._lock = threading.Lock()
        # id(params) -> (params, ctx, paths); guarded by _lock
        self._calls: OrderedDict[int, tuple[Any, Any, list[Path]]] = OrderedDict()

    def report(self, params: Any, ctx: Any, compute: Callable[[], list[Path]]) -> list[Path]:
        """The paths already reported for this call, or ``compute()``'s,
        remembered.  ``compute`` runs outside the lock (it reads the disk)."""
        with self._lock:
            entry = self._calls.get(id(params))
            if entry is not None and entry[0] is params and entry[1] is ctx:
                return list(entry[2])
        paths = compute()
        with self._lock:
            self._calls[id(params)] = (params, ctx, list(paths))
            self._calls.move_to_end(id(params))
            while len(self._calls) > self._size:
                self._calls.popitem(last=False)
        return paths

    def take(self, params: Any, ctx: Any) -> list[Path] | None:
        """The paths reported for this call, forgotten; None if there were none
        (``run`` called directly: it resolves the paths itself)."""
        with self._lock:
            entry = self._calls.get(id(params))
            if entry is None or entry[0] is not params or entry[1] is not ctx:
                return None
            del self._calls[id(params)]
            return list(entry[2])
