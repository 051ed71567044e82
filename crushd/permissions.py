"""Permission requests: a run asks, a person answers over HTTP.

A request waits on an event that three things can set: a decision, the
run's token being cancelled (registered with ``on_cancel``, so the wake-up
is immediate) and the permission timeout.  A request nobody answers is
denied and recorded as such: a run never waits on an absent client forever.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from crushd.cancel import Cancelled, CancelToken
from crushd.common import new_id, utcnow
from crushd.errors import InvalidRequest, NotFound
from crushd.events import EventHub, EventType

logger = logging.getLogger(__name__)

DECISIONS = ("allow", "allow_session", "deny")


@dataclass
class _Pending:
    request: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    decision: str | None = None


class PermissionBroker:
    """Pending requests and per-session allowances of one workspace.  Thread-safe."""

    def __init__(self, hub: EventHub, timeout: float) -> None:
        self._hub = hub
        self._timeout = timeout
        # Guards the two maps below; a leaf lock (events are published after it).
        self._pending_lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}  # guarded by _pending_lock
        self._session_allowed: dict[str, set[str]] = {}  # guarded by _pending_lock

    def is_allowed(self, session_id: str, tool: str) -> bool:
        with self._pending_lock:
            return tool in self._session_allowed.get(session_id, ())

    def pending(self) -> list[dict[str, Any]]:
        with self._pending_lock:
            return [p.request for p in self._pending.values()]

    def request(
        self,
        *,
        session_id: str,
        run_id: str,
        tool_call_id: str,
        tool: str,
        action: str,
        path: str,
        params: dict[str, Any],
        token: CancelToken,
    ) -> str:
        """Ask and block until answered; return ``allow``, ``allow_session``,
        ``deny`` or ``timeout``.  Raises Cancelled if the run is cancelled.
        """
        pid = new_id()
        request = {
            "id": pid,
            "session_id": session_id,
            "run_id": run_id,
            "tool_call_id": tool_call_id,
            "tool": tool,
            "action": action,
            "path": path,
            "params": params,
            "created_at": utcnow(),
        }
        pending = _Pending(request)
        with self._pending_lock:
            self._pending[pid] = pending
        handle = token.on_cancel(pending.done.set)
        self._hub.publish(EventType.PERMISSION_REQUESTED, session_id, request)
        try:
            pending.done.wait(self._timeout)
        finally:
            token.remove_callback(handle)
            with self._pending_lock:
                self._pending.pop(pid, None)
                decision = pending.decision
        if decision is None:
            outcome = "canceled" if token.cancelled else "timeout"
            self._resolved(request, outcome)
            if token.cancelled:
                raise Cancelled(token.reason or "cancelled")
            logger.info("event=permission_timeout id=%s tool=%s run=%s", pid, tool, run_id)
            return "timeout"
        return decision

    def decide(self, pid: str, decision: str) -> dict[str, Any]:
        if decision not in DECISIONS:
            raise InvalidRequest(f"decision must be one of {', '.join(DECISIONS)}")
        with self._pending_lock:
            pending = self._pending.pop(pid, None)
            if pending is None or pending.done.is_set():
                raise NotFound(f"permission request {pid} is not pending")
            pending.decision = decision
            request = pending.request
            if decision == "allow_session":
                self._session_allowed.setdefault(request["session_id"], set()).add(request["tool"])
            pending.done.set()
        self._resolved(request, decision)
        return {**request, "decision": decision}

    def _resolved(self, request: dict[str, Any], decision: str) -> None:
        self._hub.publish(
            EventType.PERMISSION_RESOLVED,
            request["session_id"],
            {
                "id": request["id"],
                "run_id": request["run_id"],
                "tool_call_id": request["tool_call_id"],
                "tool": request["tool"],
                "decision": decision,
            },
        )
