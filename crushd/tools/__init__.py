"""Workspace tools the model may call: ``bash``, ``view``, ``write``,
``edit``, ``ls``, ``glob`` and ``grep``.

Tools are stateless; :func:`default_tools` gives a fresh set keyed by name.
"""

from __future__ import annotations

from crushd.tools.base import PermissionAsk, Tool, ToolContext, ToolError, ToolResult
from crushd.tools.bash import BashTool
from crushd.tools.files import EditTool, ViewTool, WriteTool
from crushd.tools.search import GlobTool, GrepTool, LsTool

__all__ = [
    "BashTool",
    "EditTool",
    "GlobTool",
    "GrepTool",
    "LsTool",
    "PermissionAsk",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolResult",
    "ViewTool",
    "WriteTool",
    "default_tools",
]


def default_tools() -> dict[str, Tool]:
    """A new instance of every workspace tool, keyed by tool name."""
    tools: list[Tool] = [
        BashTool(),
        ViewTool(),
        WriteTool(),
        EditTool(),
        LsTool(),
        GlobTool(),
        GrepTool(),
    ]
    return {tool.name: tool for tool in tools}
