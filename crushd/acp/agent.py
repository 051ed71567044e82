"""The ACP agent side of ``crushd acp``: the methods an editor calls, each
answered through the daemon's HTTP API.

ACP session ids are crushd session ids, so a session started in an editor
is the same one ``crushd prompt --session`` and the console show.  The
workspace is the session's ``cwd`` (registered on first use); this process
remembers which workspace each session it has seen belongs to, so a
session that an earlier ``crushd acp`` created must be loaded again
(``session/load`` or ``session/resume``, which carry the ``cwd``) before
it takes prompts.

Threads: the reading thread calls :meth:`Agent.handle` for every message in
order; it only does bookkeeping and hands the HTTP work to a thread of the
connection.  :meth:`Agent.stop` wakes every event stream and joins them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from crushd import __version__
from crushd.acp import updates
from crushd.acp.rpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    RESOURCE_NOT_FOUND,
    Connection,
    Reply,
    RpcError,
)
from crushd.acp.turn import Stopping, Turn

logger = logging.getLogger(__name__)

#: The ACP version spoken here (the only one there is).
PROTOCOL_VERSION = 1

#: The session config option that picks one of the daemon's models.
MODEL_OPTION = "model"


@dataclass
class Session:
    """A crushd session this process has seen (new, loaded or resumed)."""

    id: str
    workspace_id: str
    root: str  # the workspace's path, for absolute tool locations
    models: list[dict[str, Any]]
    model: str | None  # the configured model name prompts ask for
    untitled: bool = False  # created here, titled from its first prompt
    turns: list[Turn] = field(default_factory=list)  # guarded by Agent._sessions_lock


class Agent:
    """Answers one editor's ACP requests.  Build it, attach a
    :class:`~crushd.acp.rpc.Connection` with :meth:`attach`, serve, then
    :meth:`stop`."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self.connect = connect  # -> a new crushd.client.Client (not thread-safe: one per use)
        self.stopping = threading.Event()
        self.conn: Connection = None  # type: ignore[assignment]  # set by attach()
        # Guards the two fields below.  Nothing slow is done under it.
        self._sessions_lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._streams: set[Any] = set()  # open event streams, woken by stop()
        self._requests: dict[str, Callable[[Any], Any]] = {
            "initialize": self.initialize,
            "authenticate": lambda params: {},
            "session/new": self.new_session,
            "session/load": self.load_session,
            "session/resume": self.resume_session,
            "session/list": self.list_sessions,
            "session/set_config_option": self.set_config_option,
        }

    def attach(self, conn: Connection) -> None:
        self.conn = conn

    # -- dispatch (on the reading thread) --------------------------------------

    def handle(self, method: str, params: Any, reply: Reply | None) -> None:
        params = params if isinstance(params, dict) else {}
        if reply is None:
            if method == "session/cancel":
                self._cancel(lambda turn: True, _text(params, "sessionId"))
            elif method == "$/cancel_request":
                request_id = params.get("requestId")
                self._cancel(lambda turn: turn.request_id == request_id)
            else:
                logger.debug("event=acp_notification_ignored method=%s", method)
            return
        if method == "session/prompt":
            turn = self._begin_turn(params, reply.id)
            self.conn.answer_in_thread(reply, lambda: self._run_turn(turn))
            return
        handler = self._requests.get(method)
        if handler is None:
            raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method}", {"method": method})
        self.conn.answer_in_thread(reply, lambda: self._daemon_call(handler, params))

    def _daemon_call(self, handler: Callable[[Any], Any], params: dict[str, Any]) -> Any:
        from crushd.client import ClientError

        try:
            return handler(params)
        except ClientError as exc:
            raise self.rpc_error(exc) from None

    def rpc_error(self, exc: Any) -> RpcError:
        """A :class:`crushd.client.ClientError` as the editor sees it: the
        daemon's own message (which says how to start it when nothing
        answers, and how to pass a token on 401)."""
        from crushd.client import ApiError

        if isinstance(exc, ApiError):
            code = {400: INVALID_PARAMS, 404: RESOURCE_NOT_FOUND}.get(exc.status, INTERNAL_ERROR)
            return RpcError(code, exc.message, {"status": exc.status, "code": exc.code})
        return RpcError(INTERNAL_ERROR, exc.message)

    # -- lifecycle -------------------------------------------------------------

    def initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        """Capabilities: ``loadSession``, listing and resuming sessions,
        embedded context.  No images or audio: crushd has no attachments
        yet.  No MCP servers from the editor: the daemon runs those of its
        own configuration."""
        return {
            "protocolVersion": PROTOCOL_VERSION,
            "agentCapabilities": {
                "loadSession": True,
                "promptCapabilities": {"image": False, "audio": False, "embeddedContext": True},
                "mcpCapabilities": {"http": False, "sse": False},
                "sessionCapabilities": {"list": {}, "resume": {}},
            },
            "authMethods": [],
            "agentInfo": {"name": "crushd", "title": "crushd", "version": __version__},
        }

    def stop(self, timeout: float = 5.0) -> list[str]:
        """End every turn's event stream and join every thread (bounded).
        Runs are not cancelled: they are the daemon's.  Idempotent."""
        self.stopping.set()
        with self._sessions_lock:
            streams = list(self._streams)
        for stream in streams:
            stream.abort()
        return self.conn.close(timeout) if self.conn is not None else []

    @contextlib.contextmanager
    def watching(self, stream: Any) -> Iterator[None]:
        """Register an open event stream so that :meth:`stop` can end it."""
        with self._sessions_lock:
            self._streams.add(stream)
        try:
            if self.stopping.is_set():
                stream.abort()
            yield
        finally:
            with self._sessions_lock:
                self._streams.discard(stream)

    # -- sessions --------------------------------------------------------------

    def new_session(self, params: dict[str, Any]) -> dict[str, Any]:
        cwd = _cwd(params)
        _ignore_mcp_servers(params)
        with self.connect() as client:
            workspace = client.register(cwd)
            created = client.request(
                "POST", f"/v1/workspaces/{workspace['id']}/sessions", json_body={}
            )
            models = client.request("GET", "/v1/models")
        default = next((m["name"] for m in models if m.get("default")), None)
        session = Session(created["id"], workspace["id"], workspace["path"], models, default, True)
        self._remember(session)
        logger.info("event=acp_session_new session=%s workspace=%s", session.id, workspace["id"])
        return {"sessionId": session.id, "configOptions": _config_options(session)}

    def load_session(self, params: dict[str, Any]) -> dict[str, Any]:
        """Replay the stored conversation as ``session/update``s, then answer."""
        session, messages = self._open_session(params, with_messages=True)
        for update in updates.replay(messages, session.root):
            self.conn.notify("session/update", {"sessionId": session.id, "update": update})
        logger.info("event=acp_session_load session=%s messages=%d", session.id, len(messages))
        return {"configOptions": _config_options(session)}

    def resume_session(self, params: dict[str, Any]) -> dict[str, Any]:
        session, _ = self._open_session(params, with_messages=False)
        return {"configOptions": _config_options(session)}

    def _open_session(
        self, params: dict[str, Any], with_messages: bool
    ) -> tuple[Session, list[dict[str, Any]]]:
        cwd, sid = _cwd(params), _text(params, "sessionId")
        _ignore_mcp_servers(params)
        with self.connect() as client:
            workspace = client.register(cwd)
            wid = workspace["id"]
            client.request("GET", f"/v1/workspaces/{wid}/sessions/{sid}")  # 404 if unknown
            messages = (
                client.request("GET", f"/v1/workspaces/{wid}/sessions/{sid}/messages")
                if with_messages
                else []
            )
            last = client.runs(wid, session_id=sid, limit=1)
            models = client.request("GET", "/v1/models")
        names = [m["name"] for m in models]
        used = last[0].get("model") if last else None
        default = next((m["name"] for m in models if m.get("default")), None)
        session = Session(sid, wid, workspace["path"], models, used if used in names else default)
        self._remember(session)
        return session, messages

    def list_sessions(self, params: dict[str, Any]) -> dict[str, Any]:
        """The sessions of the workspace at ``cwd`` (none if it is not
        registered), else of every workspace; newest first, one page."""
        cwd = params.get("cwd")
        with self.connect() as client:
            if isinstance(cwd, str) and cwd:
                found = client.find_workspace(cwd)
                workspaces = [found] if found else []
            else:
                workspaces = client.workspaces()
            listed = [(w, s) for w in workspaces for s in client.sessions(w["id"])]
        listed.sort(key=lambda pair: pair[1]["updated_at"], reverse=True)
        return {
            "sessions": [
                {
                    "sessionId": s["id"],
                    "cwd": w["path"],
                    "title": s["title"],
                    "updatedAt": s["updated_at"],
                }
                for w, s in listed
            ]
        }

    def set_config_option(self, params: dict[str, Any]) -> dict[str, Any]:
        session = self._session(_text(params, "sessionId"))
        value = params.get("value")
        if params.get("configId") != MODEL_OPTION:
            raise RpcError(INVALID_PARAMS, f"unknown config option {params.get('configId')!r}")
        if value not in [m["name"] for m in session.models]:
            raise RpcError(INVALID_PARAMS, f"crushd has no model named {value!r}")
        session.model = value
        return {"configOptions": _config_options(session)}

    def _remember(self, session: Session) -> None:
        with self._sessions_lock:
            known = self._sessions.get(session.id)
            if known is not None:  # keep the turns in flight
                session.turns = known.turns
                session.untitled = session.untitled or known.untitled
            self._sessions[session.id] = session

    def _session(self, sid: str) -> Session:
        with self._sessions_lock:
            session = self._sessions.get(sid)
        if session is None:
            raise RpcError(
                RESOURCE_NOT_FOUND,
                f"unknown session {sid}: create it with session/new or open it with session/load",
                {"sessionId": sid},
            )
        return session

    def title_session(self, client: Any, session: Session, prompt: str) -> None:
        """Title a session created here from its first prompt, as the daemon
        titles the sessions a prompt creates, and tell the editor."""
        from crushd.client import ClientError
        from crushd.workspace import title_from_prompt

        with self._sessions_lock:
            if not session.untitled:
                return
            session.untitled = False
        title = title_from_prompt(prompt)
        try:
            path = f"/v1/workspaces/{session.workspace_id}/sessions/{session.id}"
            client.request("PUT", path, json_body={"title": title})
        except ClientError as exc:
            logger.info("event=acp_title_failed session=%s error=%r", session.id, exc.message)
            return
        update = {"sessionUpdate": "session_info_update", "title": title}
        self.conn.notify("session/update", {"sessionId": session.id, "update": update})

    # -- prompts ---------------------------------------------------------------

    def _begin_turn(self, params: dict[str, Any], request_id: Any) -> Turn:
        """Register the turn before the next message is read, so that a
        ``session/cancel`` right behind the prompt finds it."""
        session = self._session(_text(params, "sessionId"))
        try:
            text = updates.prompt_text(params.get("prompt"))
        except ValueError as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from None
        if not text.strip():
            raise RpcError(INVALID_PARAMS, "the prompt is empty")
        turn = Turn(self, session, text, request_id)
        with self._sessions_lock:
            session.turns.append(turn)
        return turn

    def _run_turn(self, turn: Turn) -> dict[str, Any]:
        try:
            return turn.run()
        except Stopping:
            raise RpcError(
                INTERNAL_ERROR,
                f"crushd acp is stopping; run {turn.run_id} goes on in the daemon",
            ) from None
        finally:
            with self._sessions_lock:
                turn.session.turns.remove(turn)

    def _cancel(self, which: Callable[[Turn], bool], sid: str | None = None) -> None:
        with self._sessions_lock:
            sessions = [self._sessions[sid]] if sid in self._sessions else []
            if sid is None:
                sessions = list(self._sessions.values())
            turns = [t for s in sessions for t in s.turns if which(t)]
        for turn in turns:
            turn.cancel()


def _config_options(session: Session) -> list[dict[str, Any]]:
    """The daemon's models as a ``select`` of category ``model`` (ACP's
    session config options, where editors put their model picker)."""
    if not session.models:
        return []
    return [
        {
            "type": "select",
            "id": MODEL_OPTION,
            "name": "Model",
            "category": "model",
            "currentValue": session.model or session.models[0]["name"],
            "options": [
                {
                    "value": m["name"],
                    "name": m["name"],
                    "description": f"{m.get('provider')}: {m.get('model')}",
                }
                for m in session.models
            ],
        }
    ]


def _text(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise RpcError(INVALID_PARAMS, f"{key} must be a non-empty string")
    return value


def _cwd(params: dict[str, Any]) -> str:
    cwd = _text(params, "cwd")
    if not os.path.isabs(cwd):
        raise RpcError(INVALID_PARAMS, f"cwd must be an absolute path, not {cwd!r}")
    return cwd


def _ignore_mcp_servers(params: dict[str, Any]) -> None:
    servers = params.get("mcpServers")
    if isinstance(servers, list) and servers:
        logger.info(
            "event=acp_mcp_servers_ignored count=%d note=%s",
            len(servers),
            "crushd runs the MCP servers of its own configuration",
        )
