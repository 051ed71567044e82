"""Helpers shared by the workspace tools: argument checking, output bounds,
text-file reading.

Tools receive the model's arguments as a plain ``dict``; :func:`check_params`
holds it against the tool's JSON schema (the small subset the tools use) so a
bad call becomes a :class:`ToolError` the model can read and correct.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

from crushd.tools.base import ToolError

BINARY_SNIFF_BYTES = 8192
MAX_LINE_CHARS = 2000
SKIP_DIRS = frozenset({".git"})  # directories the walking tools never enter

_JSON_TYPES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
}


def check_params(tool: str, params: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """Return ``params`` with defaults filled in, or raise :class:`ToolError`.

    Understands ``type`` (string, integer, number, boolean), ``required``,
    ``additionalProperties: false``, ``default``, ``minimum`` and
    ``exclusiveMinimum``.  An integral float (``10.0``) counts as an integer
    because some JSON encoders produce them.
    """
    if not isinstance(params, dict):
        raise ToolError(f"{tool}: arguments must be a JSON object")
    properties: dict[str, dict[str, Any]] = schema.get("properties", {})
    unknown = sorted(set(params) - set(properties))
    if unknown and schema.get("additionalProperties") is False:
        raise ToolError(
            f"{tool}: unknown argument(s) {', '.join(unknown)}; "
            f"expected {', '.join(properties) or 'none'}"
        )
    missing = [name for name in schema.get("required", []) if params.get(name) is None]
    if missing:
        raise ToolError(f"{tool}: missing required argument(s) {', '.join(missing)}")
    checked: dict[str, Any] = {}
    for name, prop in properties.items():
        value = params.get(name)
        if value is None:
            if "default" in prop:
                checked[name] = prop["default"]
            continue
        checked[name] = _check_value(tool, name, value, prop)
    return checked


def _check_value(tool: str, name: str, value: Any, prop: dict[str, Any]) -> Any:
    kind = prop.get("type")
    wrong = ToolError(f"{tool}: argument {name} must be {_JSON_TYPES.get(kind, kind)}")
    if kind == "string":
        if not isinstance(value, str):
            raise wrong
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise wrong
    elif kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        if isinstance(value, float) and not math.isfinite(value):
            raise wrong
        if kind == "integer" and isinstance(value, float):
            if not value.is_integer():
                raise wrong
            value = int(value)
        if "minimum" in prop and value < prop["minimum"]:
            raise ToolError(f"{tool}: argument {name} must be >= {prop['minimum']}")
        if "exclusiveMinimum" in prop and value <= prop["exclusiveMinimum"]:
            raise ToolError(f"{tool}: argument {name} must be > {prop['exclusiveMinimum']}")
    return value


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters and say how much was dropped."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[output truncated: {len(text) - limit} more characters]"


def is_binary(f: BinaryIO) -> bool:
    """True if the first 8 KiB of the open file ``f`` hold a NUL byte (the test
    git and grep use).  Reads with ``pread``, so ``f``'s position is kept."""
    return b"\0" in os.pread(f.fileno(), BINARY_SNIFF_BYTES, 0)


def iter_lines(f: BinaryIO) -> Iterator[str]:
    """Yield the lines of the open binary file ``f`` without their ending
    (``\\n`` or ``\\r\\n``).  ``f`` stays open: the caller owns it.

    Lines are split on ``\\n`` only so :mod:`view` and :mod:`grep` number them
    the same way; undecodable bytes become U+FFFD rather than failing (a
    UTF-8 sequence never holds a newline byte, so decoding line by line
    gives what decoding the whole file would).
    """
    for raw in f:
        line = raw.decode("utf-8", errors="replace")
        if line.endswith("\n"):
            line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
        yield line


def cut_line(line: str, limit: int = MAX_LINE_CHARS) -> str:
    if len(line) <= limit:
        return line
    return f"{line[:limit]} [line truncated: {len(line) - limit} more characters]"
