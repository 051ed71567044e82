"""The closing parts of a run's messages: how a run ended, and sealing what it stored.

Whatever ends a run, its stored messages end the same way (SPEC §3, what a
cancelled or failed run leaves behind): every assistant message has a
``finish`` part, every ``tool_call`` part is ``finished`` with JSON
``input``, and every tool call has a ``tool_result``.  :class:`Outcome` says
what those closing parts say; :func:`seal_run_messages` writes them from
what is stored, so it works for a run that just ended (:mod:`crushd.runs`)
and for one a crash left ``running`` (:mod:`crushd.workspace`, at start).
This module holds no state and takes no lock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from crushd.common import load_json, utcnow
from crushd.events import EventType

if TYPE_CHECKING:
    from crushd.events import EventHub
    from crushd.store import WorkspaceStore

CANCELED_MESSAGE = "Request canceled"
TOOL_CANCELED = "Tool execution canceled"


class Records(Protocol):
    """Where a run's records are: the workspace's store and event hub (a
    :class:`~crushd.runs.RunEnv` is one)."""

    store: WorkspaceStore
    hub: EventHub


def finish_part(reason: str, message: str = "", details: str = "") -> dict[str, Any]:
    return {
        "type": "finish",
        "reason": reason,
        "message": message,
        "details": details,
        "time": utcnow(),
    }


def tool_result_part(call: dict[str, Any], content: str, is_error: bool) -> dict[str, Any]:
    return {
        "type": "tool_result",
        "tool_call_id": call["id"],
        "name": call["name"],
        "content": content,
        "is_error": is_error,
    }


def closed_input(text: str) -> str:
    """A tool call's ``input`` as stored once the call is finished: the
    model's text if it is JSON that is safe to handle again (it is sent back
    to the model), else ``"{}"``."""
    try:
        load_json(text)
    except ValueError:
        return "{}"
    return text if text.strip() else "{}"


@dataclass(frozen=True)
class Outcome:
    """How a run ended and what its closing records say.

    ``status`` is the run's terminal status and ``error`` its ``error``
    field.  ``reason`` is the finish reason for assistant messages still
    open, None when the turn closed its own (it completed); ``message`` and
    ``details`` go into that finish part, ``result_text`` into the error
    result of a tool call that never got one.  Build one with the class
    methods, which say which ending is which.
    """

    status: str
    error: str | None = None
    reason: str | None = None
    message: str = ""
    details: str = ""
    result_text: str = TOOL_CANCELED

    @classmethod
    def completed(cls, denied: str | None = None) -> Outcome:
        """The model finished.  A denied permission ends the turn there, and
        the run still completes, with ``error`` saying which tool it was."""
        return cls("completed", error=denied)

    @classmethod
    def cancelled(cls) -> Outcome:
        return cls("cancelled", reason="canceled", message=CANCELED_MESSAGE)

    @classmethod
    def failed(cls, title: str, details: str = "", error: str | None = None) -> Outcome:
        """A provider error, a database that refuses writes or a bug:
        ``error`` defaults to the details, else the title."""
        return cls(
            "failed",
            error=error or details or title,
            reason="error",
            message=title,
            details=details,
            result_text=details or title or TOOL_CANCELED,
        )

    @classmethod
    def interrupted(cls) -> Outcome:
        """Found ``running`` at start: the process that ran it is gone."""
        return cls(
            "interrupted",
            error="interrupted",
            reason="error",
            message="interrupted",
            details="the server stopped while this run was active",
            result_text="Tool execution interrupted",
        )


def seal_run_messages(
    env: Records, run_id: str, session_id: str, outcome: Outcome
) -> dict[str, Any] | None:
    """Give every stored message of a run its closing parts, as ``outcome`` says.

    Assistant messages without a ``finish`` get one with its ``reason``; their
    tool calls are marked finished (unparsable input becomes ``"{}"``); tool
    calls without a result get a ``tool`` message of error results.  Used on
    every exit path of a run and for runs a crash left ``running``.
    Returns the run's last assistant message as stored, or None.  Blocks on
    the store; raises what its writes raise (StorageUnavailable among them).
    """
    messages = env.store.run_messages(run_id)
    answered = {
        p["tool_call_id"]
        for m in messages
        if m["role"] == "tool"
        for p in m["parts"]
        if p["type"] == "tool_result"
    }
    unanswered: list[dict[str, Any]] = []
    last = None
    for msg in messages:
        if msg["role"] != "assistant":
            continue
        last = msg
        parts = msg["parts"]
        changed = False
        for part in parts:
            if part["type"] == "tool_call":
                if part["id"] not in answered:
                    unanswered.append(part)
                closed = closed_input(part["input"])
                if not part["finished"] or closed != part["input"]:
                    part.update(finished=True, input=closed)
                    changed = True
        if not any(p["type"] == "finish" for p in parts):
            parts.append(finish_part(outcome.reason or "error", outcome.message, outcome.details))
            changed = True
        if changed:
            last = env.hub.publish_stored(
                EventType.MESSAGE_UPDATED,
                lambda msg=msg, parts=parts: env.store.update_message(msg, parts),
            )
    if unanswered:
        results = [tool_result_part(p, outcome.result_text, True) for p in unanswered]
        model = last["model"] if last else None
        provider = last["provider"] if last else None
        env.hub.publish_stored(
            EventType.MESSAGE_CREATED,
            lambda: env.store.create_message(session_id, run_id, "tool", results, model, provider),
        )
    return last
