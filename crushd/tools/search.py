"""Read-only tools that walk directories: ``ls``, ``glob`` and ``grep``.

Walks go from directory descriptor to directory descriptor
(:func:`crushd.tools.safeopen.walk`): they never follow a symbolic link (no
cycles, no escaping the tree unnoticed, and a directory swapped for a link
mid-walk is skipped, not entered), leave out what is on the hidden list,
skip ``.git``, check ``ctx.token`` once per directory so a cancel stops a
long walk promptly, and stop at a fixed number of results, saying so.

``grep`` matches in a child process (:mod:`crushd.tools.grepchild`): Python's
``re`` holds the GIL for a whole match, so one slow pattern in this process
would stall every thread of the daemon.
"""

from __future__ import annotations

import heapq
import os
import re
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from crushd.tools import grepchild
from crushd.tools.base import PermissionAsk, Tool, ToolContext, ToolError, ToolResult
from crushd.tools.common import SKIP_DIRS, check_params, truncate
from crushd.tools.globs import compile_glob, split_glob
from crushd.tools.paths import display, resolve
from crushd.tools.safeopen import Listing, hidden_entry, open_dir, open_subdir, walk

LS_DEFAULT_DEPTH = 2
LS_MAX_ENTRIES = 1000
GLOB_MAX_RESULTS = 100
GREP_MAX_MATCHES = 200
GREP_LINE_CHARS = 500
GREP_TIMEOUT = 30.0  # seconds a grep's child may match before it is killed

_DIR_PROPERTY = {
    "type": "string",
    "description": "Directory to search, relative to the workspace root or absolute "
    "(default: the workspace root).",
}


class _WalkTool(Tool):
    action = ""

    def _check(self, params: Any) -> dict[str, Any]:
        return check_params(self.name, params, self.parameters)

    def _base(self, checked: dict[str, Any], ctx: ToolContext) -> Path:
        return resolve(checked.get("path") or ".", ctx.root)

    def paths(self, params: dict[str, Any], ctx: ToolContext) -> list[Path]:
        return [self._base(self._check(params), ctx)]

    def _checked_base(self, params: dict[str, Any], ctx: ToolContext) -> Path:
        """The directory to walk: the one the run loop checked, else resolved now."""
        return self.checked_paths(params, ctx)[0]

    def describe(self, params: dict[str, Any], ctx: ToolContext) -> PermissionAsk:
        return PermissionAsk(action=self.action, path=str(self._checked_base(params, ctx)))


def _walk(
    top_fd: int, top: Path, ctx: ToolContext, max_depth: int | None = None
) -> Iterator[Listing]:
    """The directories below the open ``top_fd`` (real path ``top``), top
    first, with ``.git`` and hidden entries left out.

    Raises :class:`Cancelled` between directories once ``ctx.token`` is cancelled.
    """
    with closing(walk(top_fd, str(top), ctx.hidden, SKIP_DIRS)) as listings:
        for listing in listings:
            ctx.token.raise_if_cancelled()
            if max_depth is not None:
                depth = 1 if listing.rel == "." else listing.rel.count("/") + 2
                if depth >= max_depth:
                    listing.dirnames[:] = []
            yield listing


# -- ls ------------------------------------------------------------------------


class LsTool(_WalkTool):
    name = "ls"
    action = "list directory"
    description = (
        "List a directory as an indented tree: directories end with `/`, symlinks show "
        "`name -> target` and are not followed, `.git` is skipped. `depth` sets how many "
        f"levels are shown (default {LS_DEFAULT_DEPTH}); at most {LS_MAX_ENTRIES} entries. "
        "Use glob to find files by name and grep to search their content."
    )
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {
            "path": {
                "type": "string",
                "description": "Directory to list, relative to the workspace root or "
                "absolute (default: the workspace root).",
            },
            "depth": {
                "type": "integer",
                "minimum": 1,
                "default": LS_DEFAULT_DEPTH,
                "description": f"Levels to show (default {LS_DEFAULT_DEPTH}).",
            },
        },
        "required": [],
        "additionalProperties": False,
    }

    def run(self, params: dict[str, Any], ctx: ToolContext) -> ToolResult:
        checked = self._check(params)
        base = self._checked_base(params, ctx)
        shown = display(base, ctx.root)
        ctx.token.raise_if_cancelled()
        try:
            fd = open_dir(self.name, base, ctx.root, ctx.hidden)
        except FileNotFoundError:
            raise ToolError(f"ls: no such file or directory: {shown}") from None
        except NotADirectoryError:
            if not os.path.lexists(base):  # a file on the way, not at the end
                raise ToolError(f"ls: no such file or directory: {shown}") from None
            return ToolResult(shown)
        except OSError as exc:
            raise ToolError(f"ls: cannot list {shown}: {exc.strerror or exc}") from exc
        lines = [shown.rstrip("/") + "/"]
        try:
            full = _list_tree(fd, str(base), checked["depth"], 1, lines, ctx)
        finally:
            os.close(fd)
        if full:
            lines.append(
                f"[listing truncated at {LS_MAX_ENTRIES} entries; list a subdirectory or "
                "use a smaller depth]"
            )
        return ToolResult(truncate("\n".join(lines), ctx.max_output))


def _list_tree(
    fd: int, path: str, depth: int, level: int, lines: list[str], ctx: ToolContext
) -> bool:
    """Append the entries of the directory open as ``fd`` (real path ``path``)
    to ``lines``, hidden ones left out; True once the entry limit is hit."""
    ctx.token.raise_if_cancelled()
    indent = "  " * level
    try:
        with os.scandir(fd) as it:
            entries = [
                e
                for e in it
                if e.name not in SKIP_DIRS
                and hidden_entry(os.path.join(path, e.name), ctx.hidden) is None
            ]
    except OSError as exc:
        lines.append(f"{indent}[cannot list: {exc.strerror or exc}]")
        return False

    def is_dir(entry: os.DirEntry[str]) -> bool:
        try:
            return entry.is_dir(follow_symlinks=False)
        except OSError:
            return False

    entries.sort(key=lambda e: (not is_dir(e), e.name))
    for entry in entries:
        if len(lines) > LS_MAX_ENTRIES:
            return True
        if entry.is_symlink():
            try:
                target = os.readlink(entry.name, dir_fd=fd)
            except OSError:
                target = "?"
            lines.append(f"{indent}{entry.name} -> {target}")
        elif is_dir(entry):
            lines.append(f"{indent}{entry.name}/")
            if level < depth and _list_subtree(fd, entry.name, path, depth, level, lines, ctx):
                return True
        else:
            lines.append(f"{indent}{entry.name}")
    return False


def _list_subtree(
    fd: int, name: str, parent: str, depth: int, level: int, lines: list[str], ctx: ToolContext
) -> bool:
    """List the directory ``name`` of ``fd`` one level deeper, opened without
    following a link; one replaced by a link or moved since it was listed
    shows as empty."""
    path = os.path.join(parent, name)
    try:
        sub = open_subdir(fd, name, path, ctx.hidden)
    except OSError as exc:
        lines.append(f"{'  ' * (level + 1)}[cannot list: {exc.strerror or exc}]")
        return False
    if sub is None:
        return False
    try:
        return _list_tree(sub, path, depth, level + 1, lines, ctx)
    finally:
        os.close(sub)


# -- glob ----------------------------------------------------------------------


class GlobTool(_WalkTool):
    name = "glob"
    action = "find files"
    description = (
        "Find files whose path matches a glob pattern, newest first (by modification "
        "time). The pattern is matched against paths relative to `path`: `*` and `?` do "
        "not cross `/`, `**` matches any number of directories, `{a,b}` and `[abc]` work "
        "as in bash. So `*.py` matches only the top level and `**/*.py` every depth; "
        f"`src/**/*.{{ts,tsx}}` is fine. `.git` is skipped; at most {GLOB_MAX_RESULTS} "
        "results."
    )
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {
            "pattern": {"type": "string", "description": "Glob pattern, e.g. `**/*.py`."},
            "path": _DIR_PROPERTY,
        },
        "required": ["pattern"],
        "additionalProperties": False,
    }

    @staticmethod
    def _split(checked: dict[str, Any]) -> tuple[str, str]:
        """The pattern's leading directories without wildcards, and the rest."""
        pattern: str = checked["pattern"]
        if not pattern.strip():
            raise ToolError("glob: pattern must not be empty")
        return split_glob(pattern)

    def _base(self, checked: dict[str, Any], ctx: ToolContext) -> Path:
        prefix, _ = self._split(checked)
        return resolve(os.path.join(checked.get("path") or ".", prefix or "."), ctx.root)

    def run(self, params: dict[str, Any], ctx: ToolContext) -> ToolResult:
        checked = self._check(params)
        _, rest = self._split(checked)
        base = self._checked_base(params, ctx)
        matcher = compile_glob(rest)
        ctx.token.raise_if_cancelled()
        try:
            fd = open_dir(self.name, base, ctx.root, ctx.hidden)
        except FileNotFoundError:
            return ToolResult("no files found")
        except NotADirectoryError:
            if not os.path.lexists(base):  # a file on the way, not at the end
                return ToolResult("no files found")
            raise ToolError(f"glob: {display(base, ctx.root)} is not a directory") from None
        except OSError as exc:
            raise ToolError(
                f"glob: cannot list {display(base, ctx.root)}: {exc.strerror or exc}"
            ) from exc
        try:
            newest, total = _newest(fd, base, matcher, rest, ctx)
        finally:
            os.close(fd)
        if not total:
            return ToolResult("no files found")
        ordered = sorted(newest, key=lambda item: (-item[0], item[1]))
        lines = [display(Path(full), ctx.root) for _, full in ordered]
        if total > len(lines):
            lines.append(
                f"[{total - len(lines)} more matching files not shown; narrow the pattern]"
            )
        return ToolResult(truncate("\n".join(lines), ctx.max_output))


def _newest(
    fd: int, base: Path, matcher: re.Pattern[str], rest: str, ctx: ToolContext
) -> tuple[list[tuple[float, str]], int]:
    """The newest :data:`GLOB_MAX_RESULTS` matches below the open ``fd`` as
    ``(mtime, real path)``, and how many matched in all."""
    max_depth = None if "**" in rest else rest.count("/") + 1
    newest: list[tuple[float, str]] = []  # min-heap of the newest matches
    total = 0
    for listing in _walk(fd, base, ctx, max_depth):
        for filename in listing.filenames:
            rel = filename if listing.rel == "." else f"{listing.rel}/{filename}"
            if not matcher.fullmatch(rel):
                continue
            try:
                # The entry itself: a link is named, not followed.
                mtime = os.stat(filename, dir_fd=listing.fd, follow_symlinks=False).st_mtime
            except OSError:  # removed meanwhile
                mtime = 0.0
            total += 1
            item = (mtime, os.path.join(listing.path, filename))
            if len(newest) < GLOB_MAX_RESULTS:
                heapq.heappush(newest, item)
            else:
                heapq.heappushpop(newest, item)
    return newest, total


# -- grep ----------------------------------------------------------------------


class GrepTool(_WalkTool):
    name = "grep"
    action = "search files"
    description = (
        "Search file contents with a regular expression (Python `re` syntax, case-"
        "sensitive; use `(?i)` to ignore case). Prints matching lines as "
        "`path:line: text`. `path` may be a directory (searched recursively) or one "
        "file; `include` keeps only files whose name matches a glob such as `*.py` or "
        "`*.{ts,tsx}` (a glob with `/` is matched against the path below `path`). "
        f"Binary files and `.git` are skipped; at most {GREP_MAX_MATCHES} matching lines."
    )
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {
            "pattern": {"type": "string", "description": "Regular expression to search for."},
            "path": {
                "type": "string",
                "description": "Directory or file to search, relative to the workspace "
                "root or absolute (default: the workspace root).",
            },
            "include": {
                "type": "string",
                "description": "Only search files matching this glob, e.g. `*.py`.",
            },
        },
        "required": ["pattern"],
        "additionalProperties": False,
    }

    def run(self, params: dict[str, Any], ctx: ToolContext) -> ToolResult:
        """Match in a child process (:mod:`crushd.tools.grepchild`) that walks,
        honours the hidden list and opens files exactly as this process
        would; killed after :data:`GREP_TIMEOUT` seconds or on a cancel."""
        checked = self._check(params)
        base = self._checked_base(params, ctx)
        ctx.token.raise_if_cancelled()
        job = grepchild.Job(
            pattern=checked["pattern"],
            base=str(base),
            root=str(ctx.root),
            hidden=list(ctx.hidden),
            include=checked.get("include"),
            max_matches=GREP_MAX_MATCHES,
            line_chars=GREP_LINE_CHARS,
        )
        found = grepchild.run(job, ctx.token, GREP_TIMEOUT)
        out = found.lines
        if found.timed_out:
            note = (
                f"grep: stopped after {GREP_TIMEOUT:g} s (the pattern may be too slow: nested "
                "repetition such as (a+)+ can take exponential time on a line that almost "
                "matches; simplify the pattern, or narrow path or include)"
            )
            if out:
                note += "; the matching lines found before it stopped:"
            return ToolResult(truncate("\n".join([note, *out]), ctx.max_output), is_error=True)
        if not out:
            return ToolResult("no matches found")
        if found.full:
            out.append(
                f"[stopped after {GREP_MAX_MATCHES} matching lines; narrow the pattern, "
                "path or include]"
            )
        return ToolResult(truncate("\n".join(out), ctx.max_output))
