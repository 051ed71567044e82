"""One ``session/prompt``: submit a run to the daemon, follow it, tell the
editor what happens, and say why it stopped.

The run is the daemon's.  This side subscribes to the session's events
before submitting (so no delta is missed), turns them into
``session/update`` notifications and ``session/request_permission``
requests, and answers the prompt when ``run.completed`` arrives.  A
broken stream is resumed with ``since``; when that fails too the run is
long-polled, and what the events would have shown is caught up from the
stored messages.  When the daemon cannot be reached at all the prompt
gets a JSON-RPC error that says so; the run itself goes on (or is found
``interrupted``) in the daemon.

Stop reasons (ACP ``StopReason``) from the terminal run:

=========================  ==============================================
run                        ``stopReason``
=========================  ==============================================
completed                  ``end_turn``; ``max_tokens`` when the last
                           message finished ``max_tokens`` or ``max_bytes``
cancelled                  ``cancelled`` (also a run that failed or was
                           interrupted after the editor asked to cancel)
failed: ``--max-steps``    ``max_turn_requests``
failed, interrupted        a JSON-RPC error (-32603) with the run's error
=========================  ==============================================

A denied permission ends the run ``completed``: ``end_turn``, with the
denied call shown ``failed``.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from crushd.acp import updates
from crushd.acp.rpc import INTERNAL_ERROR, Outgoing, RpcError
from crushd.common import TERMINAL_STATUSES, new_id
from crushd.events import EventType
from crushd.follow import follow_events

if TYPE_CHECKING:
    from crushd.acp.agent import Agent, Session

logger = logging.getLogger(__name__)

#: Each long poll once the event stream is gone: short, so that a stopping
#: adapter is never held longer than this by a poll.
POLL_WAIT = 2.0

#: Failed polls in a row before the prompt gives up on the daemon.
POLL_ATTEMPTS = 3

#: The pause between failed polls.
POLL_RETRY_PAUSE = 0.5

#: Shown when a retry discards what the model had streamed: ACP cannot take
#: streamed text back, so the editor is told the answer starts again.
RESTART_NOTE = "\n\n*(the model's answer was cut off; crushd retries it from the start)*\n\n"

#: A crushd finish reason whose turn stopped at a limit the editor knows.
MAX_TOKENS_REASONS = ("max_tokens", "max_bytes")

#: How the error of a run stopped by ``--max-steps`` begins (crushd.runs).
TOO_MANY_STEPS = "stopped after --max-steps="

#: The permission options offered for a request, as crushd decisions.
DECISIONS = ("allow", "allow_session", "deny")


class Stopping(Exception):
    """The adapter is shutting down (the editor closed our input)."""


class Turn:
    """One prompt turn of one session.  ``run()`` is called on the prompt's
    thread; :meth:`cancel` from the reading thread; permission answers
    arrive on threads of their own.  Shared state says what guards it."""

    def __init__(self, agent: Agent, session: Session, text: str, request_id: Any) -> None:
        self.agent = agent
        self.session = session
        self.text = text
        self.request_id = request_id
        self.run_id = new_id()  # chosen here so events match before the 202 arrives
        self.cancel_requested = threading.Event()
        self._requests_lock = threading.Lock()
        self._submitted = False  # guarded by _requests_lock
        self._asked: dict[str, Outgoing] = {}  # permission id -> our request; under _requests_lock
        # Below: touched only by the prompt's thread (and the permission
        # threads' in_progress, which only reads _kinds).
        self._announced: set[str] = set()  # tool call ids shown to the editor
        self._kinds: dict[str, str] = {}  # tool call id -> ACP kind
        self._reported: set[str] = set()  # tool call ids whose result was shown
        self._sent: dict[str, dict[str, int]] = {}  # message id -> kind -> chars shown
        self._finishes: dict[str, dict[str, Any]] = {}  # message id -> its finish part

    # -- control ---------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the daemon to cancel the run (``session/cancel``).  Does not
        block: the request goes from a thread of its own."""
        with self._requests_lock:
            self.cancel_requested.set()
            submitted = self._submitted
        if submitted:
            self.agent.conn.spawn("acp-cancel", self._post_cancel)

    def _post_cancel(self, client: Any = None) -> None:
        from crushd.client import ClientError

        try:
            if client is not None:
                client.cancel(self.session.workspace_id, self.run_id)
                return
            with self.agent.connect() as fresh:
                fresh.cancel(self.session.workspace_id, self.run_id)
        except ClientError as exc:
            logger.warning("event=acp_cancel_failed run=%s error=%r", self.run_id, exc.message)

    # -- the turn --------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Submit, follow to the end, return the ``session/prompt`` result.
        Raises RpcError (the daemon failed the run or cannot be reached)."""
        from crushd.client import ApiError, ClientError

        session = self.session
        with self.agent.connect() as client:
            stream = None  # without one (every stream slot taken) the run is polled
            try:
                try:
                    stream = client.events(session.workspace_id, session.id)
                except ApiError as exc:
                    if exc.code != "too_many_streams":
                        raise
                client.submit(
                    session.workspace_id,
                    self.text,
                    session_id=session.id,
                    run_id=self.run_id,
                    model=session.model or None,
                )
            except ClientError as exc:
                if stream is not None:
                    stream.close()
                raise self.agent.rpc_error(exc) from None
            logger.info("event=acp_prompt session=%s run=%s", session.id, self.run_id)
            with self._requests_lock:
                self._submitted = True
                cancel = self.cancel_requested.is_set()
            if cancel:
                self._post_cancel(client)
            self.agent.title_session(client, session, self.text)
            try:
                run = self._follow(client, stream)
            finally:
                self._withdraw_questions()
        return {"stopReason": self._stop_reason(run)}

    def _follow(self, client: Any, stream: Any) -> dict[str, Any]:
        terminal = follow_events(
            client,
            stream,
            self.session.workspace_id,
            self.session.id,
            self._handle,
            watch=self.agent.watching,
            between=self._raise_if_stopping,
        )
        return terminal if terminal is not None else self._poll(client)

    def _poll(self, client: Any) -> dict[str, Any]:
        """Follow the run without events; then show what they would have."""
        from crushd.client import ClientError

        wid, failures = self.session.workspace_id, 0
        while True:
            self._raise_if_stopping()
            try:
                for request in client.request("GET", f"/v1/workspaces/{wid}/permissions"):
                    if request.get("run_id") == self.run_id:
                        self._ask(request)
                run = client.run(wid, self.run_id, wait=POLL_WAIT)
                if run["status"] in TERMINAL_STATUSES:
                    path = f"/v1/workspaces/{wid}/sessions/{self.session.id}/messages"
                    self._catch_up(client.request("GET", path))
                    return run
                failures = 0
            except ClientError as exc:
                failures += 1
                if failures >= POLL_ATTEMPTS:
                    raise RpcError(
                        INTERNAL_ERROR,
                        f"{exc.message}; lost track of run {self.run_id}, which is the "
                        "daemon's: load the session again once crushd is back to see how it ended",
                        {"runId": self.run_id, "sessionId": self.session.id},
                    ) from None
                if self.agent.stopping.wait(POLL_RETRY_PAUSE):
                    raise Stopping from None

    def _raise_if_stopping(self) -> None:
        if self.agent.stopping.is_set():
            raise Stopping

    def _stop_reason(self, run: dict[str, Any]) -> str:
        status = run["status"]
        finish = self._finishes.get(run.get("message_id") or "") or {}
        if status == "cancelled" or (self.cancel_requested.is_set() and status != "completed"):
            return "cancelled"
        if status == "completed":
            return "max_tokens" if finish.get("reason") in MAX_TOKENS_REASONS else "end_turn"
        if status == "failed" and (run.get("error") or "").startswith(TOO_MANY_STEPS):
            return "max_turn_requests"
        error = run.get("error") or "no error was recorded"
        raise RpcError(
            INTERNAL_ERROR,
            f"crushd run {status}: {error}",
            {"runId": self.run_id, "status": status, "error": run.get("error")},
        )

    # -- events ----------------------------------------------------------------

    def _update(self, update: dict[str, Any]) -> None:
        self.agent.conn.notify("session/update", {"sessionId": self.session.id, "update": update})

    def _handle(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Show one event of the session; return the run once it is terminal."""
        kind = event.get("type")
        payload = event.get("payload") or {}
        if not isinstance(payload, dict):
            return None
        if kind == EventType.RUN_COMPLETED:
            return payload if payload.get("id") == self.run_id else None
        if payload.get("run_id") != self.run_id:
            return None
        if kind == EventType.MESSAGE_DELTA and payload.get("kind") in ("text", "reasoning"):
            self._text(payload["message_id"], payload["kind"], payload.get("delta") or "")
        elif kind in (EventType.MESSAGE_CREATED, EventType.MESSAGE_UPDATED):
            self._message(payload)
        elif kind == EventType.MESSAGE_RESET:
            self._reset(payload.get("message_id") or "")
        elif kind == EventType.PERMISSION_REQUESTED:
            self._ask(payload)
        elif kind == EventType.PERMISSION_RESOLVED:
            self._resolved(payload)
        return None

    def _text(self, message_id: str, kind: str, text: str) -> None:
        if not text:
            return
        sent = self._sent.setdefault(message_id, {})
        sent[kind] = sent.get(kind, 0) + len(text)
        self._update(updates.chunk(kind, text, message_id))

    def _reset(self, message_id: str) -> None:
        if any(self._sent.pop(message_id, {}).values()):
            self._update(updates.chunk("text", RESTART_NOTE, message_id))

    def _message(self, message: dict[str, Any]) -> None:
        """A stored message of the run: announce its finished tool calls,
        report tool results, remember how it finished."""
        role = message.get("role")
        for part in message.get("parts") or []:
            kind = part.get("type")
            if role == "assistant" and kind == "tool_call" and part.get("finished"):
                self._announce(part)
            elif role == "assistant" and kind == "finish":
                self._finishes[message["id"]] = part
            elif role == "tool" and kind == "tool_result":
                call_id = part.get("tool_call_id")
                if call_id and call_id not in self._reported:
                    self._reported.add(call_id)
                    self._update(updates.tool_result(part, self._kinds.get(call_id, "other")))

    def _announce(self, part: dict[str, Any]) -> None:
        call_id = part.get("id")
        if not call_id or call_id in self._announced:
            return
        self._announced.add(call_id)
        self._kinds[call_id] = updates.tool_kind(part.get("name") or "")
        self._update(updates.tool_call(part, self.session.root))

    def _catch_up(self, messages: list[dict[str, Any]]) -> None:
        """Show what of the run's stored messages the events did not."""
        for message in messages:
            if message.get("run_id") != self.run_id or message.get("role") == "user":
                continue
            if message.get("role") == "assistant":
                for kind in ("reasoning", "text"):
                    stored = "".join(
                        p.get("text") or "" for p in message.get("parts") or [] if p["type"] == kind
                    )
                    shown = self._sent.get(message["id"], {}).get(kind, 0)
                    self._text(message["id"], kind, stored[shown:])
            self._message(message)

    # -- permissions -----------------------------------------------------------

    def _ask(self, request: dict[str, Any]) -> None:
        """Put a ``permission.requested`` to the editor; its answer goes back
        to the daemon from a thread of its own."""
        pid = request.get("id")
        if not pid:
            return
        with self._requests_lock:
            if pid in self._asked:
                return
        call = updates.permission_tool_call(request, self.session.root)
        call_id = call["toolCallId"]
        if call_id not in self._announced:  # the events that announce it were missed
            self._announced.add(call_id)
            self._kinds[call_id] = call["kind"]
            self._update({"sessionUpdate": "tool_call", **call})
        options = _options(request, self.session.root)
        params = {"sessionId": self.session.id, "toolCall": call, "options": options}
        outgoing = self.agent.conn.request("session/request_permission", params)
        with self._requests_lock:
            self._asked[pid] = outgoing
        outgoing.on_done(
            lambda answered: self.agent.conn.spawn(
                "acp-permission", lambda: self._decide(request, call_id, answered)
            )
        )

    def _decide(self, request: dict[str, Any], call_id: str, answered: Outgoing) -> None:
        from crushd.client import ApiError, ClientError

        if self.agent.conn.closed.is_set():
            return  # the editor went away: the daemon's timeout denies it
        decision = _decision(answered)
        if decision is None:
            if self.cancel_requested.is_set():
                return  # the turn is being cancelled; the run's cancel ends the wait
            decision = "deny"  # dismissed: ACP says the call must not go ahead
        if decision != "deny":
            # Before the daemon hears it: the result can only come after.
            self._update(updates.status_update(call_id, "in_progress"))
        path = f"/v1/workspaces/{self.session.workspace_id}/permissions/{request['id']}"
        try:
            with self.agent.connect() as client:
                client.request("POST", path, json_body={"decision": decision})
        except ApiError as exc:
            if exc.status != 404:  # 404: no longer pending (decided elsewhere, run ended)
                logger.warning(
                    "event=acp_decision_failed id=%s error=%r", request["id"], exc.message
                )
        except ClientError as exc:
            logger.warning("event=acp_decision_failed id=%s error=%r", request["id"], exc.message)

    def _resolved(self, payload: dict[str, Any]) -> None:
        """The daemon settled a request (a decision from elsewhere, its
        timeout, the run's end): withdraw the editor's question if open."""
        with self._requests_lock:
            outgoing = self._asked.get(payload.get("id") or "")
        if outgoing is not None and not outgoing.done and not self.cancel_requested.is_set():
            self.agent.conn.withdraw(outgoing)

    def _withdraw_questions(self) -> None:
        """At the turn's end no question of it needs an answer any more.
        After ``session/cancel`` the editor answers them itself (ACP says
        it must), so they are not withdrawn then."""
        if self.cancel_requested.is_set():
            return
        with self._requests_lock:
            open_ = [o for o in self._asked.values() if not o.done]
        for outgoing in open_:
            self.agent.conn.withdraw(outgoing)


def _options(request: dict[str, Any], root: str) -> list[dict[str, Any]]:
    """Allow once / allow always / reject.  "Always" is crushd's
    ``allow_session`` (the tool, for the rest of the session); it is not
    offered where crushd asks every time anyway (a command outside the
    sandbox, a path outside the workspace), since it would not stop the
    next question."""
    tool = request.get("tool") or "this tool"
    path = request.get("path")
    inside = not isinstance(path, str) or not path or updates.is_inside(path, root)
    options = [{"optionId": "allow", "name": "Allow", "kind": "allow_once"}]
    if request.get("action") != "unsandboxed" and inside:
        options.append(
            {
                "optionId": "allow_session",
                "name": f"Always allow {tool} in this session",
                "kind": "allow_always",
            }
        )
    options.append({"optionId": "deny", "name": "Reject", "kind": "reject_once"})
    return options


def _decision(answered: Outgoing) -> str | None:
    """The crushd decision an answer selects; None for ``cancelled``.  An
    error answer, or an option that was not offered, is a denial (ACP: an
    unknown option MUST be treated as not approved)."""
    if answered.error is not None:
        logger.info("event=acp_permission_error error=%r", answered.error.message)
        return "deny"
    result = answered.result if isinstance(answered.result, dict) else {}
    outcome = result.get("outcome") if isinstance(result.get("outcome"), dict) else {}
    if outcome.get("outcome") == "cancelled":
        return None
    option = outcome.get("optionId")
    return option if outcome.get("outcome") == "selected" and option in DECISIONS else "deny"
