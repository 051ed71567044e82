"""The tool calls of a run: the permission policy, running them, their results.

A model step that ends with tool calls hands them to the run's
:class:`ToolCalls`, which runs them in order (SPEC §3 "Permissions", §4
"Tools").  A call that changes things asks first unless the workspace is
``yolo`` or the tool is allowed for the session; a call that reaches
outside the workspace or its sandbox asks every time.  A denial (or an
unanswered request) ends the step there: the calls after it are skipped.
Every call gets a result, an error one when the arguments are bad, the
tool is unknown or the tool fails, and the results of a step become one
``tool`` message.  Nothing here takes a lock; a ToolCalls belongs to the
run's thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from crushd.cancel import CancelToken
from crushd.common import load_json
from crushd.events import EventType
from crushd.sealing import TOOL_CANCELED, tool_result_part
from crushd.tools.base import Tool, ToolContext, ToolError, ToolResult
from crushd.tools.paths import is_inside

if TYPE_CHECKING:
    from crushd.checkpointing import RunCheckpoint
    from crushd.events import EventHub
    from crushd.permissions import PermissionBroker
    from crushd.store import WorkspaceStore

SKIPPED = "Skipped: an earlier tool call was denied"


def arguments(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call's arguments as the model sent them, or ToolError: the
    model's text is untrusted, and whatever is wrong with it (not JSON,
    nested too deep, not an object) is the call's error result, never the
    run's crash."""
    try:
        params = load_json(call.get("raw_input", call["input"]) or "{}")
    except ValueError as exc:
        raise ToolError(f"invalid tool arguments: {exc}") from None
    if not isinstance(params, dict):
        raise ToolError("tool arguments must be a JSON object")
    return params


def call_context(tool: Tool, params: dict[str, Any], context: ToolContext) -> ToolContext:
    """The context of one call: ``context`` with the paths the call touches
    (:meth:`Tool.paths`), resolved once.  The permission decision is made on
    these and the tool touches exactly these, so a symbolic link swapped in
    between cannot redirect the call; a tool resolves paths itself only
    when called without them.  Raises ToolError for bad arguments."""
    return replace(context, paths=tuple(tool.paths(params, context)))


@dataclass
class StepCalls:
    """The tool calls of one model step, the results they got so far
    (by call id) and whether those were written as the ``tool`` message."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    written: bool = False


class ToolCalls:
    """Runs the tool calls of one run and writes their results.

    Takes plain values: the run's tools and :class:`ToolContext`, the
    permission settings of its workspace, and where results go (``store``,
    and the workspace's event ``hub``).  Not
    thread-safe: the run's thread owns it.  Blocks while a tool runs and
    while a permission request waits for its answer (both end on a cancel
    of ``context.token`` with :class:`~crushd.cancel.Cancelled`).
    """

    def __init__(
        self,
        tools: Mapping[str, Tool],
        context: ToolContext,
        *,
        session_id: str,
        run_id: str,
        yolo: bool,
        allowed_tools: frozenset[str],
        permissions: PermissionBroker,
        store: WorkspaceStore,
        hub: EventHub,
        model_ids: tuple[str | None, str | None],
        checkpoint: RunCheckpoint | None = None,
    ) -> None:
        self.tools = tools
        self.context = context
        self.session_id = session_id
        self.run_id = run_id
        self.yolo = yolo
        self.allowed_tools = allowed_tools
        self.permissions = permissions
        self.store = store
        self.hub = hub
        self.model_ids = model_ids  # of the tool messages: the model id and the provider
        # Snapshots the workspace around each call that can change files.
        self.checkpoint = checkpoint

    @property
    def token(self) -> CancelToken:
        return self.context.token

    def run(self, step: StepCalls) -> str | None:
        """Run the step's calls in order, recording each result in
        ``step.results`` as it comes (a cancel keeps those already in);
        return a denial message, or None when no call was denied."""
        denied = None
        for call in step.calls:
            self.token.raise_if_cancelled()
            if denied:
                step.results[call["id"]] = tool_result_part(call, SKIPPED, True)
                continue
            try:
                denied, result = self._call(call)
            except ToolError as exc:
                result = ToolResult(str(exc), True)
            except ValueError as exc:  # a bad value a tool did not check itself
                result = ToolResult(f"{call['name']}: {exc}", True)
            step.results[call["id"]] = tool_result_part(call, result.content, result.is_error)
        return denied

    def _call(self, call: dict[str, Any]) -> tuple[str | None, ToolResult]:
        """One call, asking first if it must: its denial (None if it ran) and its result."""
        tool = self.tools.get(call["name"])
        if tool is None:
            raise ToolError(f"unknown tool {call['name']!r}")
        params = arguments(call)
        ctx = call_context(tool, params, self.context)
        outside = [p for p in ctx.paths if not is_inside(p, ctx.root)]
        escapes = tool.escapes(params, ctx)  # e.g. bash unsandboxed
        if self.needs_permission(tool, bool(outside) or escapes):
            ask = tool.describe(params, ctx)
            decision = self.permissions.request(
                session_id=self.session_id,
                run_id=self.run_id,
                tool_call_id=call["id"],
                tool=tool.name,
                action=ask.action,
                path=ask.path,
                params=params,
                token=self.token,
            )
            if decision in ("deny", "timeout"):
                denied = (
                    f"Permission denied: {tool.name}"
                    if decision == "deny"
                    else f"Permission request timed out: {tool.name}"
                )
                return denied, ToolResult(f"{denied}. The user did not allow this call.", True)
        if self.checkpoint is None:
            return None, tool.run(params, ctx)
        with self.checkpoint.around(tool, call["id"]):
            return None, tool.run(params, ctx)

    def needs_permission(self, tool: Tool, always: bool) -> bool:
        """``always``: the call reaches outside the workspace or its sandbox,
        which asks every time, whatever yolo, allowed_tools or an earlier
        "allow for the session" say."""
        if always:
            return True
        if not tool.mutating or self.yolo:
            return False
        return not (
            tool.name in self.allowed_tools
            or self.permissions.is_allowed(self.session_id, tool.name)
        )

    def write_results(self, step: StepCalls, missing: str = TOOL_CANCELED) -> None:
        """Store the step's results as one ``tool`` message, in the order of
        the calls (``missing`` is the error result of a call without one),
        and publish it; once.  Raises what the store raises (the results
        stay unwritten, to be tried again)."""
        if step.written or not step.calls:
            return
        parts = [
            step.results.get(c["id"]) or tool_result_part(c, missing, True) for c in step.calls
        ]

        def write() -> dict[str, Any]:
            created = self.store.create_message(
                self.session_id, self.run_id, "tool", parts, *self.model_ids
            )
            step.written = True
            return created

        self.hub.publish_stored(EventType.MESSAGE_CREATED, write)
