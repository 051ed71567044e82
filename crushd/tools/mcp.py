"""MCP tools as the run loop sees them: :class:`McpTool` and the text a
``CallToolResult`` becomes.  The connection behind them is any
:class:`McpServer` — :class:`crushd.mcp.McpClient` in crushd — so this
module needs nothing of :mod:`crushd.mcp` and the SDK behind it."""

from __future__ import annotations

import json
from typing import Any, Protocol

from crushd.cancel import CancelToken
from crushd.common import load_json
from crushd.mcp_config import McpServerConfig
from crushd.tools.base import PermissionAsk, Tool, ToolContext, ToolResult


class McpServer(Protocol):
    """What an MCP tool needs of its server's connection."""

    @property
    def name(self) -> str: ...

    config: McpServerConfig

    def call(
        self, tool: str, arguments: dict[str, Any], token: CancelToken, max_output: int
    ) -> ToolResult:
        """Call ``tool``; blocks until it answers, and raises
        :class:`crushd.cancel.Cancelled` promptly on a cancel of ``token``."""
        ...


def result_text(result: Any) -> str:
    """The model's view of a ``CallToolResult``: text as is, every other
    content block described (kind, type, size, URI) rather than dropped."""
    parts: list[str] = []
    texts: list[str] = []
    for block in result.content:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
            texts.append(block.text)
        elif kind in ("image", "audio"):
            size = len(block.data) * 3 // 4
            parts.append(f"[{kind} content: {block.mime_type}, about {size} bytes]")
        elif kind == "resource_link":
            mime = f", {block.mime_type}" if block.mime_type else ""
            about = f": {block.description}" if block.description else ""
            parts.append(f"[resource link {block.name} <{block.uri}>{mime}{about}]")
        elif kind == "resource":
            res = block.resource
            mime = f", {res.mime_type}" if getattr(res, "mime_type", None) else ""
            if hasattr(res, "text"):
                parts.append(f"[resource <{res.uri}>{mime}]\n{res.text}")
            else:
                size = len(res.blob) * 3 // 4
                parts.append(f"[resource <{res.uri}>{mime}, about {size} bytes of binary data]")
        else:
            parts.append(f"[{kind or 'unknown'} content]")
    structured = result.structured_content
    if structured is not None and not _mirrors(texts, structured):
        parts.append(f"[structured content]\n{json.dumps(structured, ensure_ascii=False)}")
    return "\n".join(parts) if parts else "(no output)"


def _mirrors(texts: list[str], structured: Any) -> bool:
    """True if the text blocks already say what the structured content says
    (servers are asked to send both; ``{"result": text}`` is how Python
    servers wrap a plain return value)."""
    joined = "\n".join(texts)
    if isinstance(structured, dict) and list(structured) == ["result"]:
        return structured["result"] == joined
    for text in texts:
        try:
            if load_json(text) == structured:
                return True
        except ValueError:  # not JSON, or nested too deep to compare safely
            continue
    return False


class McpTool(Tool):
    """An MCP server's tool as crushd offers it: asks permission unless the
    workspace is yolo, the tool is in the server's ``allow`` or it was
    allowed for the session.  A server's tool may change any file, so every
    call is checkpointed."""

    changes_files = True

    def __init__(self, client: McpServer, tool: Any) -> None:
        self.client = client
        self.server_tool = tool.name
        self.name = client.config.offered_name(tool.name)
        about = tool.description or tool.title or tool.name
        self.description = f"{about} (tool {tool.name} of MCP server {client.name})"
        schema = dict(tool.input_schema or {})
        schema.setdefault("type", "object")
        self.parameters = schema
        self.mutating = not client.config.lists(client.config.allow, tool.name)

    def describe(self, params: dict[str, Any], ctx: ToolContext) -> PermissionAsk:
        shown = json.dumps(params, ensure_ascii=False)
        if len(shown) > 80:
            shown = shown[:79] + "…"
        return PermissionAsk(
            action=f"mcp {self.client.name}: {self.server_tool} {shown}", path=str(ctx.root)
        )

    def run(self, params: dict[str, Any], ctx: ToolContext) -> ToolResult:
        return self.client.call(self.server_tool, params, ctx.token, ctx.max_output)
