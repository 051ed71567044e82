"""The tool interface.

A tool is a named action the model may call with a JSON object of
arguments.  Tools never raise into the run loop for ordinary failures: they
raise :class:`ToolError`, which the run loop turns into a ``tool_result``
with ``is_error: true``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crushd.cancel import CancelToken

if TYPE_CHECKING:
    from crushd.tools.sandbox import Sandbox

DEFAULT_MAX_OUTPUT = 30_000  # characters of tool output kept for the model


class ToolError(Exception):
    """A tool call failed in a way the model should hear about."""


@dataclass(frozen=True)
class ToolResult:
    content: str
    is_error: bool = False


@dataclass
class ToolContext:
    """What a tool call may use.  ``root`` is the resolved workspace path;
    ``sandbox`` is how ``bash`` commands are confined (None: not at all).
    ``hidden`` lists real paths (files or directories, with everything below
    them) that no tool may read or write, whatever the permissions say:
    crushd's data directory, token, config file and socket, and the
    ``sandbox_hide`` paths — what the sandbox hides from ``bash``.
    ``env`` is the environment a command started for the model gets.

    ``paths`` is set for one call by the run loop
    (:func:`crushd.toolcalls.call_context`): the paths :meth:`Tool.paths`
    reported for it, which the permission decision was made on.  The tool
    touches exactly those; None (a tool called directly) makes it resolve
    them itself."""

    root: Path
    token: CancelToken
    bash_timeout: float = 120.0
    max_output: int = DEFAULT_MAX_OUTPUT
    sandbox: Sandbox | None = None
    hidden: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    paths: tuple[Path, ...] | None = None


@dataclass(frozen=True)
class PermissionAsk:
    """What a permission request shows a person: ``action`` is a one-line
    summary (``run: ls -la``, ``write file``), ``path`` the main path."""

    action: str
    path: str


class Tool(ABC):
    name: str = ""
    description: str = ""
    parameters: dict[str, Any] = {}  # JSON schema of the arguments object
    mutating: bool = False  # asks permission unless the workspace is yolo
    # May change files in the workspace: checkpointed around each call (crushd.checkpointing).
    changes_files: bool = False

    def paths(self, params: dict[str, Any], ctx: ToolContext) -> list[Path]:
        """Resolved paths this call touches; any outside ``ctx.root`` needs
        permission even in yolo mode.  Raises :class:`ToolError` on bad params."""
        return []

    def checked_paths(self, params: dict[str, Any], ctx: ToolContext) -> list[Path]:
        """The paths this call touches: those the run loop checked
        (``ctx.paths``), else, for a direct call, :meth:`paths` now."""
        return list(ctx.paths) if ctx.paths is not None else self.paths(params, ctx)

    def escapes(self, params: dict[str, Any], ctx: ToolContext) -> bool:
        """True if this call leaves the protection the workspace relies on
        (``bash`` run outside its sandbox): it asks permission even in yolo
        mode, whatever ``allowed_tools`` says."""
        return False

    def describe(self, params: dict[str, Any], ctx: ToolContext) -> PermissionAsk:
        paths = self.checked_paths(params, ctx)
        return PermissionAsk(action=self.name, path=str(paths[0]) if paths else str(ctx.root))

    @abstractmethod
    def run(self, params: dict[str, Any], ctx: ToolContext) -> ToolResult:
        """Carry the call out.  Blocking work must stop promptly when
        ``ctx.token`` is cancelled (raise :class:`crushd.cancel.Cancelled`)."""
