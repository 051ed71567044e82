"""Path resolution for tools.

Every path a tool touches goes through :func:`resolve`: relative paths are
taken against the workspace root, ``~`` is expanded, and ``..`` and symlinks
are resolved with :func:`os.path.realpath` so that a link pointing out of the
workspace is seen for what it is.  Tools never refuse a path themselves;
:meth:`Tool.paths` hands the resolved paths to the run loop, which asks for
permission when :func:`is_inside` is false.

The run loop resolves a call's paths once (:func:`crushd.toolcalls.call_context`)
and hands the ones it checked to :meth:`Tool.run` in ``ToolContext.paths``:
a symbolic link changed in between would make a second :func:`resolve` in
``run`` name another path than the one checked.
:mod:`crushd.tools.safeopen` then opens exactly that path, following no link.
"""

from __future__ import annotations

import os
from pathlib import Path

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
