"""Read-only tools that walk directories: ``ls``, ``glob`` and ``grep``.

Walks never follow symlinked directories (no cycles, no escaping the tree
unnoticed), skip ``.git``, check ``ctx.token`` once per directory or file so a
cancel stops a long walk promptly, and stop at a fixed number of results,
saying so.
"""

from __future__ import annotations

import heapq
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crushd.cancel import CancelToken
from crushd.tools.base import PermissionAsk, Tool, ToolContext, ToolError, ToolResult
from crushd.tools.common import check_params, cut_line, is_binary, iter_lines, truncate
from crushd.tools.globs import compile_glob, split_glob
from crushd.tools.paths import display, resolve

SKIP_DIRS = frozenset({".git"})
LS_DEFAULT_DEPTH = 2
LS_MAX_ENTRIES = 1000
GLOB_MAX_RESULTS = 100
GREP_MAX_MATCHES = 200
GREP_LINE_CHARS = 500

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

    def describe(self, params: dict[str, Any], ctx: ToolContext) -> PermissionAsk:
        return PermissionAsk(action=self.action, path=str(self.paths(params, ctx)[0]))


def _walk(
    top: Path, token: CancelToken, max_depth: int | None = None
) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(dirpath, sorted file names)`` below ``top``, top first.

    Raises :class:`Cancelled` between directories once ``token`` is cancelled.
    """
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        token.raise_if_cancelled()
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        if max_depth is not None:
            rel = os.path.relpath(dirpath, top)
            depth = 1 if rel == "." else rel.count(os.sep) + 2
            if depth >= max_depth:
                dirnames[:] = []
        yield dirpath, sorted(filenames)


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
        base = self._base(checked, ctx)
        shown = display(base, ctx.root)
        if not base.exists():
            raise ToolError(f"ls: no such file or directory: {shown}")
        if not base.is_dir():
            return ToolResult(shown)
        lines = [shown.rstrip("/") + "/"]
        full = _list_tree(base, checked["depth"], 1, lines, ctx.token)
        if full:
            lines.append(
                f"[listing truncated at {LS_MAX_ENTRIES} entries; list a subdirectory or "
                "use a smaller depth]"
            )
        return ToolResult(truncate("\n".join(lines), ctx.max_output))


def _list_tree(
    directory: Path, depth: int, level: int, lines: list[str], token: CancelToken
) -> bool:
    """Append ``directory``'s entries to ``lines``; True once the entry limit is hit."""
    token.raise_if_cancelled()
    indent = "  " * level
    try:
        with os.scandir(directory) as it:
            entries = [e for e in it if e.name not in SKIP_DIRS]
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
                target = os.readlink(entry.path)
            except OSError:
                target = "?"
            lines.append(f"{indent}{entry.name} -> {target}")
        elif is_dir(entry):
            lines.append(f"{indent}{entry.name}/")
            if level < depth and _list_tree(Path(entry.path), depth, level + 1, lines, token):
                return True
        else:
            lines.append(f"{indent}{entry.name}")
    return False


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

    def _parts(self, checked: dict[str, Any], ctx: ToolContext) -> tuple[Path, str]:
        pattern: str = checked["pattern"]
        if not pattern.strip():
            raise ToolError("glob: pattern must not be empty")
        prefix, rest = split_glob(pattern)
        base = resolve(os.path.join(checked.get("path") or ".", prefix or "."), ctx.root)
        return base, rest

    def _base(self, checked: dict[str, Any], ctx: ToolContext) -> Path:
        return self._parts(checked, ctx)[0]

    def run(self, params: dict[str, Any], ctx: ToolContext) -> ToolResult:
        checked = self._check(params)
        base, rest = self._parts(checked, ctx)
        matcher = compile_glob(rest)
        if not base.is_dir():
            if base.exists():
                raise ToolError(f"glob: {display(base, ctx.root)} is not a directory")
            return ToolResult("no files found")
        max_depth = None if "**" in rest else rest.count("/") + 1
        newest: list[tuple[float, str]] = []  # min-heap of the newest matches
        total = 0
        for dirpath, filenames in _walk(base, ctx.token, max_depth):
            rel_dir = os.path.relpath(dirpath, base)
            for filename in filenames:
                rel = filename if rel_dir == "." else f"{rel_dir}/{filename}"
                if os.sep != "/":
                    rel = rel.replace(os.sep, "/")
                if not matcher.fullmatch(rel):
                    continue
                full = os.path.join(dirpath, filename)
                try:
                    mtime = os.stat(full).st_mtime
                except OSError:  # dangling symlink, or removed meanwhile
                    mtime = 0.0
                total += 1
                item = (mtime, full)
                if len(newest) < GLOB_MAX_RESULTS:
                    heapq.heappush(newest, item)
                else:
                    heapq.heappushpop(newest, item)
        if not total:
            return ToolResult("no files found")
        ordered = sorted(newest, key=lambda item: (-item[0], item[1]))
        lines = [display(Path(full), ctx.root) for _, full in ordered]
        if total > len(lines):
            lines.append(
                f"[{total - len(lines)} more matching files not shown; narrow the pattern]"
            )
        return ToolResult(truncate("\n".join(lines), ctx.max_output))


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
        checked = self._check(params)
        base = self._base(checked, ctx)
        try:
            regex = re.compile(checked["pattern"])
        except re.error as exc:
            raise ToolError(
                f"grep: invalid regular expression {checked['pattern']!r}: {exc}"
            ) from exc
        include: str | None = checked.get("include")
        include_re = compile_glob(include) if include else None
        if not base.exists():
            raise ToolError(f"grep: no such file or directory: {display(base, ctx.root)}")
        if not base.is_dir() and not base.is_file():
            raise ToolError(f"grep: {display(base, ctx.root)} is not a regular file")
        files: Iterator[Path] = iter([base])
        if base.is_dir():
            files = self._files(base, include, include_re, ctx.token)
        out: list[str] = []
        full = False
        for path in files:
            ctx.token.raise_if_cancelled()
            try:
                if is_binary(path):
                    continue
                shown = display(path, ctx.root)
                for number, line in enumerate(iter_lines(path), 1):
                    if regex.search(line):
                        if len(out) >= GREP_MAX_MATCHES:
                            full = True
                            break
                        out.append(f"{shown}:{number}: {cut_line(line, GREP_LINE_CHARS)}")
            except OSError:  # unreadable or vanished: skip it as grep -s would
                continue
            if full:
                break
        if not out:
            return ToolResult("no matches found")
        if full:
            out.append(
                f"[stopped after {GREP_MAX_MATCHES} matching lines; narrow the pattern, "
                "path or include]"
            )
        return ToolResult(truncate("\n".join(out), ctx.max_output))

    @staticmethod
    def _files(
        base: Path, include: str | None, include_re: re.Pattern[str] | None, token: CancelToken
    ) -> Iterator[Path]:
        by_path = include is not None and "/" in include
        for dirpath, filenames in _walk(base, token):
            rel_dir = os.path.relpath(dirpath, base).replace(os.sep, "/")
            for filename in filenames:
                if include_re is not None:
                    subject = filename
                    if by_path:
                        subject = filename if rel_dir == "." else f"{rel_dir}/{filename}"
                    if not include_re.fullmatch(subject):
                        continue
                path = Path(dirpath, filename)
                # Like ripgrep, do not follow symlinks met on the walk: one may
                # point out of the workspace, which paths() could not report.
                if not path.is_symlink() and path.is_file():
                    yield path
