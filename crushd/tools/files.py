"""File tools: ``view`` reads, ``write`` replaces a whole file, ``edit``
replaces an exact string.

Each tool resolves its one path with :func:`crushd.tools.paths.resolve` and
reports it from :meth:`paths`; whether a path outside the workspace may be
touched is the run loop's decision, not the tool's.  ``run`` then opens
that same path (``ToolContext.paths``) through :mod:`crushd.tools.safeopen`:
never a path on the hidden list, never through a symbolic link, never
resolved by name a second time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

from crushd.tools.base import PermissionAsk, Tool, ToolContext, ToolError, ToolResult
from crushd.tools.common import (
    BINARY_SNIFF_BYTES,
    check_params,
    cut_line,
    is_binary,
    iter_lines,
    truncate,
)
from crushd.tools.paths import display, resolve
from crushd.tools.safeopen import create_file, open_file

DEFAULT_VIEW_LIMIT = 2000
_NOTE_ROOM = 120  # characters kept free for the "more lines" note

_PATH_PROPERTY = {
    "type": "string",
    "description": "File path, relative to the workspace root or absolute.",
}


class _FileTool(Tool):
    """A tool about one file named by the ``path`` argument."""

    action = ""

    def _check(self, params: Any) -> dict[str, Any]:
        return check_params(self.name, params, self.parameters)

    def paths(self, params: dict[str, Any], ctx: ToolContext) -> list[Path]:
        return [resolve(self._check(params)["path"], ctx.root)]

    def _path(self, params: dict[str, Any], ctx: ToolContext) -> Path:
        """The path to touch: the one the run loop checked, else resolved now."""
        return self.checked_paths(params, ctx)[0]

    def describe(self, params: dict[str, Any], ctx: ToolContext) -> PermissionAsk:
        return PermissionAsk(action=self.action, path=str(self._path(params, ctx)))


class ViewTool(_FileTool):
    name = "view"
    action = "read file"
    description = (
        "Read a text file. Lines come back numbered from 1, as `     7\\tline text` (the "
        "number and the tab are not part of the file; leave them out of edit's "
        "old_string). Reads up to `limit` lines (default 2000) starting after `offset` "
        "lines; the result says when more lines remain and which offset to use next. "
        "Lines longer than 2000 characters are cut. Binary files are refused; use ls "
        "for directories."
    )
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {
            "path": _PATH_PROPERTY,
            "offset": {
                "type": "integer",
                "minimum": 0,
                "default": 0,
                "description": "Number of lines to skip (0-based line to start at).",
            },
            "limit": {
                "type": "integer",
                "minimum": 1,
                "default": DEFAULT_VIEW_LIMIT,
                "description": "Maximum number of lines to return (default 2000).",
            },
        },
        "required": ["path"],
        "additionalProperties": False,
    }

    def run(self, params: dict[str, Any], ctx: ToolContext) -> ToolResult:
        checked = self._check(params)
        path = self._path(params, ctx)
        offset: int = checked["offset"]
        limit: int = checked["limit"]
        shown = display(path, ctx.root)
        ctx.token.raise_if_cancelled()
        try:
            f = open_file(self.name, path, ctx.root, ctx.hidden)
        except (FileNotFoundError, NotADirectoryError):
            raise ToolError(f"view: file not found: {shown}") from None
        except IsADirectoryError:
            raise ToolError(f"view: {shown} is a directory; use the ls tool to list it") from None
        except OSError as exc:
            raise ToolError(f"view: cannot read {shown}: {exc.strerror or exc}") from exc
        with f:
            try:
                if is_binary(f):
                    raise ToolError(f"view: {shown} is a binary file; it cannot be shown as text")
                return ToolResult(_numbered(f, offset, limit, ctx.max_output))
            except OSError as exc:
                raise ToolError(f"view: cannot read {shown}: {exc.strerror or exc}") from exc


def _numbered(f: BinaryIO, offset: int, limit: int, max_output: int) -> str:
    out: list[str] = []
    size = 0
    count = 0  # lines seen so far
    end = offset + limit
    for line in iter_lines(f):
        count += 1
        if count <= offset:
            continue
        if count > end:
            out.append(f"[more lines after line {end}; use offset={end} to read on]")
            break
        entry = f"{count:6d}\t{cut_line(line)}"
        if size + len(entry) + 1 > max_output - _NOTE_ROOM and out:
            last = count - 1
            out.append(
                f"[output truncated at line {last} to stay under {max_output} characters; "
                f"use offset={last} to read on]"
            )
            break
        out.append(entry)
        size += len(entry) + 1
    if count == 0:
        return "(empty file)"
    if not out:
        return f"(offset {offset} is past the end: the file has {count} lines)"
    return truncate("\n".join(out), max_output)


class WriteTool(_FileTool):
    name = "write"
    action = "write file"
    mutating = True
    changes_files = True
    description = (
        "Create a file or replace its whole content with `content`, written exactly as "
        "given (UTF-8). Missing parent directories are created. To change part of an "
        "existing file prefer the edit tool; view a file before overwriting it."
    )
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {
            "path": _PATH_PROPERTY,
            "content": {"type": "string", "description": "The complete new file content."},
        },
        "required": ["path", "content"],
        "additionalProperties": False,
    }

    def run(self, params: dict[str, Any], ctx: ToolContext) -> ToolResult:
        checked = self._check(params)
        path = self._path(params, ctx)
        data = checked["content"].encode("utf-8")
        ctx.token.raise_if_cancelled()
        _write(self.name, path, data, ctx)
        return ToolResult(f"wrote {len(data)} bytes to {display(path, ctx.root)}")


class EditTool(_FileTool):
    name = "edit"
    action = "edit file"
    mutating = True
    changes_files = True
    description = (
        "Replace an exact piece of text in a file. `old_string` must match the file "
        "character for character, indentation and line breaks included (copy it from "
        "view output without the line-number prefix), and must occur exactly once unless "
        "`replace_all` is true; include a few surrounding lines to make it unique. "
        "With an empty `old_string` and a file that does not exist yet, the file is "
        "created with `new_string` as its content."
    )
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {
            "path": _PATH_PROPERTY,
            "old_string": {"type": "string", "description": "The exact text to replace."},
            "new_string": {"type": "string", "description": "The text to put in its place."},
            "replace_all": {
                "type": "boolean",
                "default": False,
                "description": "Replace every occurrence instead of requiring exactly one.",
            },
        },
        "required": ["path", "old_string", "new_string"],
        "additionalProperties": False,
    }

    def run(self, params: dict[str, Any], ctx: ToolContext) -> ToolResult:
        checked = self._check(params)
        path = self._path(params, ctx)
        old: str = checked["old_string"]
        new: str = checked["new_string"]
        shown = display(path, ctx.root)
        ctx.token.raise_if_cancelled()
        try:
            f = open_file(self.name, path, ctx.root, ctx.hidden)
        except (FileNotFoundError, NotADirectoryError):
            if old:
                raise ToolError(f"edit: file not found: {shown}") from None
            data = new.encode("utf-8")
            _write(self.name, path, data, ctx)
            return ToolResult(f"created {shown} ({len(data)} bytes)")
        except IsADirectoryError:
            raise ToolError(f"edit: {shown} is a directory") from None
        except OSError as exc:
            raise ToolError(f"edit: cannot read {shown}: {exc.strerror or exc}") from exc
        with f:
            text = _read_text(f, shown)
        if not old:
            if text:
                raise ToolError(
                    f"edit: {shown} already exists and is not empty; give old_string "
                    "(or use write to replace the whole file)"
                )
            _write(self.name, path, new.encode("utf-8"), ctx)
            return ToolResult(f"wrote {shown}")
        if old == new:
            raise ToolError("edit: old_string and new_string are identical; nothing to change")
        count = text.count(old)
        if count == 0 and "\r\n" in text and "\r\n" not in old and "\n" in old:
            # The model writes "\n"; the file uses CRLF. Match its line endings.
            old, new = old.replace("\n", "\r\n"), new.replace("\n", "\r\n")
            count = text.count(old)
        if count == 0:
            raise ToolError(
                f"edit: old_string not found in {shown}; view the file and copy the text "
                "exactly, whitespace included"
            )
        if count > 1 and not checked["replace_all"]:
            raise ToolError(
                f"edit: old_string occurs {count} times in {shown}; add surrounding context "
                "to make it unique, or set replace_all to true"
            )
        _write(self.name, path, text.replace(old, new).encode("utf-8"), ctx)
        noun = "occurrence" if count == 1 else "occurrences"
        return ToolResult(f"edited {shown}: replaced {count} {noun}")


def _read_text(f: BinaryIO, shown: str) -> str:
    try:
        data = f.read()
    except OSError as exc:
        raise ToolError(f"edit: cannot read {shown}: {exc.strerror or exc}") from exc
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        raise ToolError(f"edit: {shown} is a binary file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ToolError(f"edit: {shown} is not valid UTF-8 text") from exc


def _write(tool: str, path: Path, data: bytes, ctx: ToolContext) -> None:
    shown = display(path, ctx.root)
    try:
        with create_file(tool, path, ctx.root, ctx.hidden) as f:
            f.write(data)
    except IsADirectoryError:
        raise ToolError(f"{tool}: {shown} is a directory") from None
    except OSError as exc:
        raise ToolError(f"{tool}: cannot write {shown}: {exc.strerror or exc}") from exc
