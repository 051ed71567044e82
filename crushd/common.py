"""Names and small helpers every layer shares: run statuses, ids, timestamps
and the text of a message.

This module imports nothing from crushd, so the store, the event hub, the
permission broker, the providers and the command-line client can all use it
without depending on one another.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

#: Every status a run can have, in lifecycle order (the API's ``Run.status`` enum).
RUN_STATUSES = ("queued", "running", "completed", "cancelled", "failed", "interrupted")

#: Accepted runs that have not ended: they keep their session busy.
ACTIVE_STATUSES = ("queued", "running")

#: A run in one of these never changes again.
TERMINAL_STATUSES = frozenset({"completed", "cancelled", "failed", "interrupted"})

#: How deep JSON from a model or a provider may nest (objects and arrays).
#: Tool arguments need a few levels; a thousand make ``json.loads`` raise
#: RecursionError, and even a few hundred break ``json.dumps`` and the
#: provider encoders that send them back to the model.
MAX_JSON_DEPTH = 64


def utcnow() -> str:
    """The current time as an RFC 3339 UTC string with microseconds (sortable)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id() -> str:
    """A new random identifier (a UUID4 string) for a record or a run."""
    return str(uuid.uuid4())


def text_of(parts: Iterable[Mapping[str, Any]]) -> str:
    """The concatenated ``text`` parts of a message, in order."""
    return "".join(p.get("text", "") for p in parts if p.get("type") == "text")


def load_json(text: str | bytes | bytearray, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON that came from outside (a model, a provider); ValueError
    for anything that is not JSON nested at most ``max_depth`` deep.

    ``json.loads`` raises RecursionError, not ValueError, for arguments
    nested about a thousand deep: a 2 KB tool call once crashed a run and
    every later attempt to close it.  Everything it raises becomes
    ValueError here, and the depth is checked without recursion, since a
    value that parses may still be too deep for ``json.dumps`` later.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    except (TypeError, ValueError) as exc:  # not text, or not JSON
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict | list):
        return value
    # The hot path (a provider's stream is one small object per event): a
    # text with few brackets cannot nest deeply, and counting them is much
    # cheaper than walking the value.
    if isinstance(text, str):
        brackets = text.count("{") + text.count("[")
    else:
        brackets = text.count(b"{") + text.count(b"[")
    if brackets > max_depth and json_depth(value, max_depth) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return value


def json_depth(value: Any, limit: int | None = None) -> int:
    """How deep objects and arrays nest in ``value`` (a scalar is 0, ``{}`` 1).

    Iterative, so any depth is safe to measure; with ``limit`` it stops as
    soon as it found a level deeper than that (and returns that level).
    """
    if not isinstance(value, dict | list):
        return 0
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if limit is not None and depth > limit:
                return depth
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return deepest
