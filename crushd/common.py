"""Names and small helpers every layer shares: run statuses, ids, timestamps
and the text of a message.

This module imports nothing from crushd, so the store, the event hub, the
permission broker, the providers and the command-line client can all use it
without depending on one another.
"""

from __future__ import annotations

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


def utcnow() -> str:
    """The current time as an RFC 3339 UTC string with microseconds (sortable)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id() -> str:
    """A new random identifier (a UUID4 string) for a record or a run."""
    return str(uuid.uuid4())


def text_of(parts: Iterable[Mapping[str, Any]]) -> str:
    """The concatenated ``text`` parts of a message, in order."""
    return "".join(p.get("text", "") for p in parts if p.get("type") == "text")
