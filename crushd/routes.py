"""HTTP views: parse and validate, call the server or a workspace, shape JSON.

No Flask object crosses into a worker thread; everything handed to a
workspace is a plain value.  Bodies are read as JSON whatever the content
type says (``curl -d`` sends a form content type).
"""

from __future__ import annotations

import importlib.resources
import json
import re
from typing import Any

from flask import Blueprint, Response, current_app, request

from crushd import __version__, reverts
from crushd.common import RUN_STATUSES, load_json
from crushd.errors import InvalidRequest, ShuttingDown, TooManyStreams
from crushd.events import sse_stream
from crushd.server import Server

api = Blueprint("api", __name__, url_prefix="/v1")

# A character that is not white space, as the OpenAPI document's "\S"
# pattern means it (ECMAScript, which clients validate with): Python's
# str.isspace also counts the separators U+001C-U+001F and U+0085.
NOT_BLANK = re.compile(
    "[^\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
)

# What a run_id may not contain: C0, DEL and C1, as the OpenAPI pattern says.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")

MAX_WAIT = 300.0


def server() -> Server:
    return current_app.extensions["crushd"]


def body(optional: bool = False) -> dict[str, Any]:
    raw = request.get_data(cache=False)
    if not raw.strip():
        if optional:
            return {}
        raise InvalidRequest("request body must be a JSON object")
    try:
        value = load_json(raw)
    except ValueError as exc:  # not JSON, huge ints, bad UTF-8, or nested too deep
        raise InvalidRequest(f"request body is {exc}") from None
    if not isinstance(value, dict):
        raise InvalidRequest("request body must be a JSON object")
    # JSON may escape a lone UTF-16 surrogate ("\ud800"); Python decodes it
    # into a string that is not Unicode, which nothing downstream can store.
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            "request body holds a lone UTF-16 surrogate escape (such as \\ud800), "
            "which is not a Unicode character"
        ) from None
    return value


def no_content() -> Response:
    """204 with no body and so no Content-Type."""
    response = Response(status=204)
    response.headers.remove("Content-Type")
    return response


def text_field(data: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"field {name!r} is required")
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"field {name!r} must be a string")
    if not NOT_BLANK.search(value):
        raise InvalidRequest(f"field {name!r} must not be empty")
    return value


def event_position(name: str, raw: str | None) -> int | None:
    """A ``since`` / ``Last-Event-ID`` value: absent, or a seq of 0 or more."""
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer") from None
    if value < 0:
        raise InvalidRequest(f"{name} must not be negative")
    return value


def bool_field(data: dict[str, Any], name: str) -> bool | None:
    value = data.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"field {name!r} must be true or false")
    return value


def number_arg(name: str, low: float, high: float, kind: type = float) -> Any:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter {name!r} must be a number") from None
    if not low <= value <= high:
        raise InvalidRequest(f"query parameter {name!r} must be between {low:g} and {high:g}")
    return value


def bool_arg(name: str) -> bool:
    raw = request.args.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidRequest(f"query parameter {name!r} must be true or false")
    return raw in ("true", "1", "yes")


# -- server ------------------------------------------------------------------


@api.get("/health")
def health() -> Any:
    state = server().health()
    return state, 503 if state["status"] != "ok" else 200


@api.get("/version")
def version() -> Any:
    return {"version": __version__}


@api.get("/models")
def list_models() -> Any:
    return server().models.describe()


@api.get("/openapi.json")
def openapi() -> Any:
    document = (importlib.resources.files("crushd") / "openapi.json").read_text()
    return Response(document, mimetype="application/json")


# -- workspaces --------------------------------------------------------------


@api.post("/workspaces")
def create_workspace() -> Any:
    data = body()
    path = text_field(data, "path")
    workspace, created = server().register(path, bool_field(data, "yolo"))
    return workspace, 201 if created else 200


@api.get("/workspaces")
def list_workspaces() -> Any:
    return server().describe()


@api.get("/workspaces/<wid>")
def get_workspace(wid: str) -> Any:
    return server().describe(wid)


@api.delete("/workspaces/<wid>")
def delete_workspace(wid: str) -> Any:
    server().unregister(wid, purge=bool_arg("purge"))
    return no_content()


# -- sessions and messages ---------------------------------------------------


@api.post("/workspaces/<wid>/sessions")
def create_session(wid: str) -> Any:
    workspace = server().get(wid)
    title = text_field(body(optional=True), "title", required=False) or "New session"
    return workspace.create_session(title), 201


@api.get("/workspaces/<wid>/sessions")
def list_sessions(wid: str) -> Any:
    return server().get(wid).list_sessions()


@api.get("/workspaces/<wid>/sessions/<sid>")
def get_session(wid: str, sid: str) -> Any:
    return server().get(wid).get_session(sid)


@api.put("/workspaces/<wid>/sessions/<sid>")
def update_session(wid: str, sid: str) -> Any:
    workspace = server().get(wid)
    title = text_field(body(), "title")
    return workspace.update_session(sid, title)


@api.delete("/workspaces/<wid>/sessions/<sid>")
def delete_session(wid: str, sid: str) -> Any:
    server().get(wid).delete_session(sid)
    return no_content()


@api.get("/workspaces/<wid>/sessions/<sid>/messages")
def list_messages(wid: str, sid: str) -> Any:
    return server().get(wid).list_messages(sid)


# -- prompts and runs --------------------------------------------------------


@api.post("/workspaces/<wid>/agent")
def submit_prompt(wid: str) -> Any:
    srv = server()
    if srv.stopping.is_set():
        raise ShuttingDown("the server is stopping; prompts are not accepted")
    workspace = srv.get(wid)
    data = body()
    prompt = text_field(data, "prompt")
    session_id = text_field(data, "session_id", required=False)
    run_id = text_field(data, "run_id", required=False)
    if run_id is not None and (len(run_id) > 128 or CONTROL_CHARACTERS.search(run_id)):
        raise InvalidRequest(
            "run_id must be at most 128 characters, none of them a control character"
        )
    model = text_field(data, "model", required=False)
    run, created = workspace.submit(prompt, session_id, run_id, model)
    return run, 202 if created else 200


@api.post("/workspaces/<wid>/sessions/<sid>/compact")
def compact_session(wid: str, sid: str) -> Any:
    srv = server()
    if srv.stopping.is_set():
        raise ShuttingDown("the server is stopping; compactions are not accepted")
    workspace = srv.get(wid)
    model = text_field(body(optional=True), "model", required=False)
    return workspace.compact(sid, model), 202


@api.get("/workspaces/<wid>/runs")
def list_runs(wid: str) -> Any:
    workspace = server().get(wid)
    status = request.args.get("status") or None
    if status is not None and status not in RUN_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(RUN_STATUSES)}")
    limit = number_arg("limit", 1, 1000, int) or 100
    return workspace.list_runs(request.args.get("session_id") or None, status, limit)


@api.get("/workspaces/<wid>/runs/<run_id>")
def get_run(wid: str, run_id: str) -> Any:
    srv = server()
    workspace = srv.get(wid)
    wait = number_arg("wait", 0, MAX_WAIT)
    if not wait:
        return workspace.get_run(run_id)
    # A long poll holds a server thread like a stream does, so it takes a
    # stream slot; with none free it answers at once instead of starving others.
    if not srv.acquire_stream():
        return workspace.get_run(run_id)
    try:
        return workspace.wait_run(run_id, wait)
    finally:
        srv.release_stream()


@api.post("/workspaces/<wid>/runs/<run_id>/cancel")
def cancel_run(wid: str, run_id: str) -> Any:
    run, changed = server().get(wid).cancel_run(run_id)
    return run, 202 if changed else 200


@api.post("/workspaces/<wid>/sessions/<sid>/cancel")
def cancel_session(wid: str, sid: str) -> Any:
    return {"cancelled": server().get(wid).cancel_session(sid)}


@api.get("/workspaces/<wid>/sessions/<sid>/queue")
def get_queue(wid: str, sid: str) -> Any:
    return server().get(wid).queued_runs(sid)


@api.delete("/workspaces/<wid>/sessions/<sid>/queue")
def clear_queue(wid: str, sid: str) -> Any:
    return {"cancelled": server().get(wid).cancel_session(sid, queued_only=True)}


# -- checkpoints -------------------------------------------------------------


@api.get("/workspaces/<wid>/runs/<run_id>/diff")
def run_diff(wid: str, run_id: str) -> Any:
    workspace = server().get(wid)
    tool_call_id = request.args.get("tool_call_id") or None
    stat = bool_arg("stat")
    answer = workspace.checkpoints.diff(run_id, tool_call_id, stat=stat)
    if stat:
        return answer
    return Response(answer, content_type="text/x-diff; charset=utf-8")


@api.post("/workspaces/<wid>/sessions/<sid>/revert")
def revert_session(wid: str, sid: str) -> Any:
    workspace = server().get(wid)
    data = body()
    return reverts.revert(
        workspace.checkpoints,
        sid,
        run_id=text_field(data, "run_id", required=False),
        message_id=text_field(data, "message_id", required=False),
        dry_run=bool_field(data, "dry_run") or False,
        force=bool_field(data, "force") or False,
    )


@api.post("/workspaces/<wid>/sessions/<sid>/unrevert")
def unrevert_session(wid: str, sid: str) -> Any:
    workspace = server().get(wid)
    data = body(optional=True)
    return reverts.unrevert(
        workspace.checkpoints,
        sid,
        dry_run=bool_field(data, "dry_run") or False,
        force=bool_field(data, "force") or False,
    )


@api.post("/workspaces/<wid>/sessions/<sid>/fork")
def fork_session(wid: str, sid: str) -> Any:
    workspace = server().get(wid)
    data = body(optional=True)
    forked = reverts.fork(
        workspace.checkpoints,
        sid,
        message_id=text_field(data, "message_id", required=False),
        restore_files=bool_field(data, "restore_files") or False,
        force=bool_field(data, "force") or False,
    )
    return forked, 201


# -- permissions -------------------------------------------------------------


@api.get("/workspaces/<wid>/permissions")
def list_permissions(wid: str) -> Any:
    return server().get(wid).permissions.pending()


@api.post("/workspaces/<wid>/permissions/<pid>")
def decide_permission(wid: str, pid: str) -> Any:
    workspace = server().get(wid)
    decision = text_field(body(), "decision")
    return workspace.permissions.decide(pid, decision)


@api.get("/workspaces/<wid>/mcp")
def list_mcp_servers(wid: str) -> Any:
    return server().get(wid).mcp.entries()


# -- events ------------------------------------------------------------------


@api.get("/workspaces/<wid>/events")
def events(wid: str) -> Any:
    srv = server()
    workspace = srv.get(wid)
    # Both are checked; a reconnecting EventSource's Last-Event-ID wins.
    query_since = event_position("since", request.args.get("since"))
    header_since = event_position("Last-Event-ID", request.headers.get("Last-Event-ID"))
    since = header_since if header_since is not None else query_since
    session_id = request.args.get("session_id") or None
    if session_id is not None:
        workspace.get_session(session_id)
    if not srv.acquire_stream():
        raise TooManyStreams(f"at most {srv.config.max_streams} event streams at once")
    sub, backlog, reset = workspace.hub.subscribe(since, session_id)
    released = False

    def release() -> None:
        # Runs from the generator's finally or from the response close,
        # whichever comes first (a generator never started has no finally).
        nonlocal released
        if not released:
            released = True
            workspace.hub.unsubscribe(sub)
            srv.release_stream()

    client_gone = request.environ.get("waitress.client_disconnected") or (lambda: False)
    stream = sse_stream(
        workspace.hub,
        sub,
        backlog,
        reset,
        ping_interval=srv.config.ping_interval,
        client_gone=client_gone,
        on_close=release,
    )
    response = Response(
        stream,
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.call_on_close(release)
    return response
