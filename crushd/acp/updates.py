"""crushd's records as ACP shapes: ``session/update`` payloads, tool call
kinds, titles and locations, and ACP prompt blocks as one crushd prompt.

Pure functions of the API's JSON (messages, parts, permission requests);
nothing here talks to the daemon or the editor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

from crushd.common import load_json

#: ACP ``ToolKind`` of crushd's tools; MCP tools and anything else are ``other``.
TOOL_KINDS = {
    "bash": "execute",
    "view": "read",
    "ls": "read",
    "glob": "search",
    "grep": "search",
    "write": "edit",
    "edit": "edit",
}

#: A title stays on one line of an editor's tool card.
TITLE_LIMIT = 120


def tool_kind(name: str) -> str:
    return TOOL_KINDS.get(name, "other")


def arguments(part: dict[str, Any]) -> dict[str, Any]:
    """A ``tool_call`` part's arguments; {} for anything that is not an object."""
    try:
        value = load_json(part.get("input") or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= TITLE_LIMIT else flat[: TITLE_LIMIT - 1] + "…"


def tool_title(name: str, args: dict[str, Any]) -> str:
    """What an editor shows on the call: the command, the path, the pattern."""
    if name == "bash" and isinstance(args.get("command"), str):
        prefix = "Run (unsandboxed)" if args.get("unsandboxed") else "Run"
        return _short(f"{prefix} `{args['command']}`")
    verbs = {"view": "Read", "ls": "List", "write": "Write", "edit": "Edit"}
    if name in verbs:
        return _short(f"{verbs[name]} {args.get('path') or '.'}")
    if name in ("glob", "grep") and isinstance(args.get("pattern"), str):
        where = f" in {args['path']}" if isinstance(args.get("path"), str) else ""
        return _short(f"{'Find' if name == 'glob' else 'Search'} {args['pattern']}{where}")
    return name


def absolute(path: str, root: str) -> str:
    """``path`` as the tools resolve it: relative ones from the workspace root."""
    return os.path.normpath(os.path.join(root, os.path.expanduser(path)))


def is_inside(path: str, root: str) -> bool:
    """Whether ``path`` (resolved against ``root``) is ``root`` or below it."""
    full = absolute(path, root)
    return os.path.commonpath([full, os.path.normpath(root)]) == os.path.normpath(root)


def tool_locations(name: str, args: dict[str, Any], root: str) -> list[dict[str, Any]]:
    """The file a call touches, from its ``path`` argument (absolute, as ACP
    wants), with the first line ``view`` reads when it skips some."""
    path = args.get("path")
    if not isinstance(path, str) or not path:
        return []
    location: dict[str, Any] = {"path": absolute(path, root)}
    offset = args.get("offset")
    if name == "view" and isinstance(offset, int) and not isinstance(offset, bool) and offset > 0:
        location["line"] = offset  # 0-based, as ``offset`` is
    return [location]


def _diff(name: str, args: dict[str, Any], root: str) -> list[dict[str, Any]]:
    """The change a ``write``/``edit`` makes, as ACP ``diff`` content.
    ``edit`` shows the replaced fragment; ``write`` the new content."""
    path = args.get("path")
    if not isinstance(path, str) or not path:
        return []
    if name == "edit" and isinstance(args.get("new_string"), str):
        old = args.get("old_string")
        return [
            {
                "type": "diff",
                "path": absolute(path, root),
                "oldText": old if isinstance(old, str) else None,
                "newText": args["new_string"],
            }
        ]
    if name == "write" and isinstance(args.get("content"), str):
        return [{"type": "diff", "path": absolute(path, root), "newText": args["content"]}]
    return []


def tool_call(part: dict[str, Any], root: str, status: str = "pending") -> dict[str, Any]:
    """The ``tool_call`` update announcing a ``tool_call`` part."""
    name = part.get("name") or "tool"
    args = arguments(part)
    update: dict[str, Any] = {
        "sessionUpdate": "tool_call",
        "toolCallId": part["id"],
        "title": tool_title(name, args),
        "kind": tool_kind(name),
        "status": status,
        "locations": tool_locations(name, args, root),
        "rawInput": args,
    }
    content = _diff(name, args, root)
    if content:
        update["content"] = content
    return update


def permission_tool_call(request: dict[str, Any], root: str) -> dict[str, Any]:
    """The ``toolCall`` of a ``session/request_permission`` for a crushd
    ``permission.requested`` payload."""
    name = request.get("tool") or "tool"
    params = request.get("params") if isinstance(request.get("params"), dict) else {}
    title = tool_title(name, params)
    if request.get("action") == "unsandboxed" and not params.get("unsandboxed"):
        title = f"{title} (unsandboxed)"
    call: dict[str, Any] = {
        "toolCallId": request.get("tool_call_id") or request["id"],
        "title": title,
        "kind": tool_kind(name),
        "status": "pending",
        "rawInput": params,
    }
    locations = tool_locations(name, params, root)
    path = request.get("path")
    if not locations and isinstance(path, str) and path and path != root:
        locations = [{"path": absolute(path, root)}]
    if locations:
        call["locations"] = locations
    content = _diff(name, params, root)
    if content:
        call["content"] = content
    return call


def tool_result(part: dict[str, Any], kind: str) -> dict[str, Any]:
    """The ``tool_call_update`` closing a call with its ``tool_result`` part."""
    text = str(part.get("content") or "")
    if kind == "execute" and text and not part.get("is_error"):
        text = f"```\n{text.rstrip()}\n```"
    update: dict[str, Any] = {
        "sessionUpdate": "tool_call_update",
        "toolCallId": part["tool_call_id"],
        "status": "failed" if part.get("is_error") else "completed",
    }
    if text:
        update["content"] = [{"type": "content", "content": {"type": "text", "text": text}}]
    return update


def status_update(tool_call_id: str, status: str) -> dict[str, Any]:
    return {"sessionUpdate": "tool_call_update", "toolCallId": tool_call_id, "status": status}


def chunk(kind: str, text: str, message_id: str | None = None) -> dict[str, Any]:
    """A text chunk: the user's, the agent's answer, or its reasoning."""
    names = {"user": "user_message_chunk", "reasoning": "agent_thought_chunk"}
    update: dict[str, Any] = {
        "sessionUpdate": names.get(kind, "agent_message_chunk"),
        "content": {"type": "text", "text": text},
    }
    if message_id:
        update["messageId"] = message_id
    return update


def replay(messages: list[dict[str, Any]], root: str) -> Iterator[dict[str, Any]]:
    """Every stored message as the updates a live turn would have sent:
    the user's text, reasoning, answer text, tool calls and their results.
    Summaries (compaction) and finish parts are not part of the conversation
    an editor shows."""
    kinds: dict[str, str] = {}
    for message in messages:
        role = message.get("role")
        for part in message.get("parts") or []:
            kind = part.get("type")
            if role == "user" and kind == "text" and part.get("text"):
                yield chunk("user", part["text"], message.get("id"))
            elif role == "assistant" and kind in ("text", "reasoning") and part.get("text"):
                yield chunk(kind, part["text"], message.get("id"))
            elif role == "assistant" and kind == "tool_call" and part.get("id"):
                kinds[part["id"]] = tool_kind(part.get("name") or "")
                yield tool_call(part, root)
            elif role == "tool" and kind == "tool_result" and part.get("tool_call_id"):
                yield tool_result(part, kinds.get(part["tool_call_id"], "other"))


def prompt_text(blocks: Any) -> str:
    """An ACP prompt (a list of content blocks) as crushd's prompt text.

    Text is taken as is; a ``resource_link`` becomes ``@path`` (a file) or
    its URI, which the model can open with its tools; an embedded text
    ``resource`` is included in full under its path.  Images and audio are
    refused (``ValueError``): crushd takes no attachments yet, and says so
    in ``initialize``.
    """
    if not isinstance(blocks, list):
        raise ValueError("prompt must be a list of content blocks")
    pieces: list[str] = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            pieces.append(str(block.get("text") or ""))
        elif kind == "resource_link":
            pieces.append(_reference(str(block.get("uri") or block.get("name") or "")))
        elif kind == "resource":
            resource = block.get("resource") if isinstance(block.get("resource"), dict) else {}
            uri = str(resource.get("uri") or "")
            if isinstance(resource.get("text"), str):
                pieces.append(
                    f'\n<context ref="{_reference(uri)}">\n{resource["text"]}\n</context>\n'
                )
            else:
                pieces.append(f"{_reference(uri)} (binary content not included)")
        elif kind in ("image", "audio"):
            raise ValueError(f"crushd does not take {kind} prompts yet")
        else:
            raise ValueError(f"unknown content block type {kind!r}")
    return "".join(_spaced(pieces))


def _reference(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return "@" + unquote(parts.path)
    return uri


def _spaced(pieces: list[str]) -> Iterator[str]:
    """Join blocks the way an editor shows them: a mention between words
    keeps a space on either side."""
    previous = ""
    for piece in pieces:
        if previous and piece and not previous[-1].isspace() and not piece[0].isspace():
            yield " "
        yield piece
        previous = piece or previous
