"""``crushd acp`` driven as an editor drives it: the official ACP SDK's client
side (``agent-client-protocol``) spawns the adapter, which forwards to a real
``crushd serve`` whose model is the fake model server.

Every ``session/update`` the adapter writes must pass the SDK's schema: the
editor here counts the raw notifications and the ones the SDK delivered, and
a difference (an update the SDK dropped as invalid) fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from acp import (
    PROTOCOL_VERSION,
    RequestError,
    image_block,
    resource_link_block,
    spawn_agent_process,
    text_block,
)
from acp.schema import (
    AgentMessageChunk,
    AgentThoughtChunk,
    AllowedOutcome,
    DeniedOutcome,
    RequestPermissionResponse,
    SessionInfoUpdate,
    ToolCallProgress,
    ToolCallStart,
    UserMessageChunk,
)
from fakeprovider import Finish, Hang, Pause, Reasoning, Text, ToolCall
from helpers import event_stream, free_port, register

from crushd.acp import updates

#: A whole scenario's bound; each test's own waits are far shorter.
SCENARIO_TIMEOUT = 40


@pytest.fixture(autouse=True)
def no_crushd_env(monkeypatch):
    """The developer's own CRUSHD_* settings must not reach the daemons or the adapter."""
    for key in list(os.environ):
        if key.startswith("CRUSHD_"):
            monkeypatch.delenv(key)


def openai_daemon(daemon_factory, fake, *extra: str, **kwargs: Any):
    args = ("--provider", "openai", "--base-url", fake.openai_base_url, "--model", "m", *extra)
    return daemon_factory(*args, env={"OPENAI_API_KEY": "sk-acp-test"}, **kwargs)


class Editor:
    """The editor's side of the connection: records updates, answers
    permission requests with the option ids queued in ``answers`` (``None``
    holds the question open until :meth:`answer_held_cancelled`)."""

    def __init__(self) -> None:
        self.updates: list[Any] = []
        self.raw_updates = 0  # session/update notifications on the wire
        self.asked: list[tuple[Any, list[Any]]] = []
        self.answers: list[str | None] = []
        self.held: list[asyncio.Future] = []

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        self.updates.append(update)

    async def request_permission(
        self, session_id: str, tool_call: Any, options: list[Any], **kwargs: Any
    ) -> RequestPermissionResponse:
        self.asked.append((tool_call, options))
        answer = self.answers.pop(0) if self.answers else None
        if answer is None:
            held = asyncio.get_running_loop().create_future()
            self.held.append(held)
            return await held
        return RequestPermissionResponse(
            outcome=AllowedOutcome(outcome="selected", option_id=answer)
        )

    def answer_held_cancelled(self) -> None:
        """What ACP requires of the editor after ``session/cancel``."""
        for held in self.held:
            held.set_result(RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled")))
        self.held = []

    def observe(self, event: Any) -> None:
        if event.message.get("method") == "session/update":
            self.raw_updates += 1

    def text(self, since: int = 0) -> str:
        return "".join(
            u.content.text for u in self.updates[since:] if isinstance(u, AgentMessageChunk)
        )

    def of(self, kind: type, since: int = 0) -> list[Any]:
        return [u for u in self.updates[since:] if isinstance(u, kind)]


@contextlib.asynccontextmanager
async def editor_for(
    address: str, tmp_path: Path, editor: Editor | None = None, *extra: str
) -> AsyncIterator[tuple[Any, Editor, Any]]:
    """``crushd acp`` for ``address`` (a URL or ``unix:PATH``), initialized."""
    editor = editor or Editor()
    where = ["--socket", address[5:]] if address.startswith("unix:") else ["--url", address]
    log = (tmp_path / "acp.log").open("ab")
    try:
        async with spawn_agent_process(
            editor,
            sys.executable,
            "-m",
            "crushd",
            "acp",
            *where,
            "--log-level",
            "info",
            *extra,
            env=dict(os.environ),
            transport_kwargs={"stderr": log},
            observers=[editor.observe],
        ) as (conn, process):
            init = await conn.initialize(protocol_version=PROTOCOL_VERSION)
            assert init.protocol_version == PROTOCOL_VERSION
            yield conn, editor, process
            assert editor.raw_updates == len(editor.updates), "an update failed the schema"
    finally:
        log.close()


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)
    return value


def scenario(coroutine) -> None:
    asyncio.run(asyncio.wait_for(coroutine, SCENARIO_TIMEOUT))


def prompt_texts(request) -> str:
    """Every text the model got in one request, joined (OpenAI messages)."""
    return "\n".join(
        m["content"] if isinstance(m.get("content"), str) else json.dumps(m)
        for m in request.body["messages"]
    )


# ---------------------------------------------------------------- prompting


def test_a_prompt_streams_its_answer_and_stops_as_the_run_did(
    daemon_factory, fake, project, tmp_path
):
    daemon = openai_daemon(daemon_factory, fake, "--max-steps", "1")
    (project / "a.py").write_text("print('a')\n")
    fake.script(
        [Reasoning("mull it over"), Pause(0.05), Text("Hel"), Pause(0.05), Text("lo "), Pause(0.05)]
        + [Text("there"), Finish("stop")]
    )
    fake.script([Text("cut sh"), Finish("length")])
    fake.script([ToolCall("ls", {})])  # a second step would pass --max-steps

    async def run() -> str:
        async with editor_for(daemon.url, tmp_path) as (conn, editor, _):
            created = await conn.new_session(cwd=str(project), mcp_servers=[])
            sid = created.session_id
            [models] = created.config_options
            assert (models.id, models.category, models.current_value) == (
                "model",
                "model",
                "m",
            )
            link = resource_link_block(name="a.py", uri=(project / "a.py").as_uri())
            answer = await conn.prompt(
                session_id=sid, prompt=[text_block("look at"), link, text_block("please")]
            )
            assert answer.stop_reason == "end_turn"
            chunks = editor.of(AgentMessageChunk)
            assert [c.content.text for c in chunks] == ["Hel", "lo ", "there"]  # as streamed
            assert editor.text() == "Hello there"
            assert [t.content.text for t in editor.of(AgentThoughtChunk)] == ["mull it over"]
            [titled] = editor.of(SessionInfoUpdate)
            assert titled.title.startswith("look at @")  # from the prompt's first line
            assert f"look at @{project / 'a.py'} please" in prompt_texts(fake.requests[0])

            # The finish reason says why a completed run stopped.
            before = len(editor.updates)
            answer = await conn.prompt(session_id=sid, prompt=[text_block("more")])
            assert answer.stop_reason == "max_tokens"
            assert editor.text(before) == "cut sh"
            assert "Hello there" in prompt_texts(fake.requests[1])  # the same session
            answer = await conn.prompt(session_id=sid, prompt=[text_block("list")])
            assert answer.stop_reason == "max_turn_requests"

            # The daemon's models are the session's model option.
            chosen = await conn.set_config_option(config_id="model", session_id=sid, value="m")
            assert chosen.config_options[0].current_value == "m"
            with pytest.raises(RequestError) as refused:
                await conn.set_config_option(config_id="model", session_id=sid, value="nope")
            assert refused.value.code == -32602

            # No attachments yet: images are not offered, and refused.
            with pytest.raises(RequestError) as refused:
                await conn.prompt(session_id=sid, prompt=[image_block("aGk=", "image/png")])
            assert refused.value.code == -32602 and "image" in str(refused.value)

            listed = await conn.list_sessions(cwd=str(project))
            assert [(s.session_id, s.title) for s in listed.sessions] == [(sid, titled.title)]
            return sid

    sid = asyncio.run(asyncio.wait_for(run(), SCENARIO_TIMEOUT))
    with daemon.client() as http:
        [workspace] = http.get("/v1/workspaces").json()
        assert workspace["path"] == str(project.resolve())
        runs = http.get(f"/v1/workspaces/{workspace['id']}/runs").json()
        statuses = [(r["session_id"], r["status"]) for r in runs]
        assert statuses == [(sid, "failed"), (sid, "completed"), (sid, "completed")]


def test_a_tool_call_asks_the_editor_and_its_answer_reaches_the_daemon(
    daemon_factory, fake, project, tmp_path
):
    daemon = openai_daemon(daemon_factory, fake)
    fake.script([ToolCall("bash", {"command": "echo from-bash > made.txt"})])
    fake.script([Text("made it")])
    fake.script([ToolCall("write", {"path": "notes.txt", "content": "hi"})])
    fake.script([ToolCall("write", {"path": "a.txt", "content": "1"})])
    fake.script([ToolCall("write", {"path": "b.txt", "content": "2"})])
    fake.script([Text("both")])

    async def run() -> None:
        editor = Editor()
        editor.answers = ["allow", "deny", "allow_session"]
        async with editor_for(daemon.url, tmp_path, editor) as (conn, _, _):
            sid = (await conn.new_session(cwd=str(project), mcp_servers=[])).session_id

            # Allowed once: announced, asked, run, reported.
            answer = await conn.prompt(session_id=sid, prompt=[text_block("make a file")])
            assert answer.stop_reason == "end_turn"
            [started] = editor.of(ToolCallStart)
            assert started.kind == "execute" and "echo from-bash > made.txt" in started.title
            assert started.status == "pending"
            [(call, options)] = editor.asked
            assert call.tool_call_id == started.tool_call_id
            assert [o.kind for o in options] == ["allow_once", "allow_always", "reject_once"]
            progress = editor.of(ToolCallProgress)
            assert [p.status for p in progress] == ["in_progress", "completed"]
            assert (project / "made.txt").read_text() == "from-bash\n"
            assert editor.text() == "made it"

            # Rejected: the call fails and the turn ends there.
            before = len(editor.updates)
            answer = await conn.prompt(session_id=sid, prompt=[text_block("write notes")])
            assert answer.stop_reason == "end_turn"
            [started] = editor.of(ToolCallStart, before)
            assert started.kind == "edit"
            assert [loc.path for loc in started.locations] == [str(project / "notes.txt")]
            assert started.content[0].new_text == "hi"
            assert editor.asked[1][0].locations[0].path == str(project / "notes.txt")
            assert [p.status for p in editor.of(ToolCallProgress, before)] == ["failed"]
            assert not (project / "notes.txt").exists()

            # Allowed always: the next write in this session does not ask.
            answer = await conn.prompt(session_id=sid, prompt=[text_block("two files")])
            assert answer.stop_reason == "end_turn"
            assert len(editor.asked) == 3
            assert (project / "a.txt").read_text() == "1"
            assert (project / "b.txt").read_text() == "2"

    scenario(run())
    assert fake.pending == 0


def test_cancel_mid_stream_and_while_a_question_is_open(daemon_factory, fake, project, tmp_path):
    daemon = openai_daemon(daemon_factory, fake)
    fake.script([Text("partial "), Hang()])
    fake.script([ToolCall("bash", {"command": "echo never > never.txt"})])
    fake.script([Text("after")])

    async def run() -> None:
        async with editor_for(daemon.url, tmp_path) as (conn, editor, _):
            sid = (await conn.new_session(cwd=str(project), mcp_servers=[])).session_id

            turn = asyncio.create_task(conn.prompt(session_id=sid, prompt=[text_block("go")]))
            await until(lambda: editor.text() == "partial ", what="the first chunk")
            asked_at = time.monotonic()
            await conn.cancel(session_id=sid)
            assert (await turn).stop_reason == "cancelled"
            assert time.monotonic() - asked_at < 3

            # Cancelled while the editor is asking: the editor answers its
            # open question "cancelled", the prompt stops "cancelled".
            turn = asyncio.create_task(conn.prompt(session_id=sid, prompt=[text_block("run")]))
            await until(lambda: editor.held, what="the permission request")
            await conn.cancel(session_id=sid)
            editor.answer_held_cancelled()
            assert (await turn).stop_reason == "cancelled"

            # The session is not wedged.
            before = len(editor.updates)
            answer = await conn.prompt(session_id=sid, prompt=[text_block("again")])
            assert (answer.stop_reason, editor.text(before)) == ("end_turn", "after")

    scenario(run())
    assert not (project / "never.txt").exists()
    with daemon.client() as http:
        [workspace] = http.get("/v1/workspaces").json()
        wid = workspace["id"]
        runs = http.get(f"/v1/workspaces/{wid}/runs").json()
        assert [r["status"] for r in runs] == ["completed", "cancelled", "cancelled"]
        assert runs[-1]["text"] == "partial "  # what was streamed is what was kept
        assert http.get(f"/v1/workspaces/{wid}/permissions").json() == []


def test_without_a_stream_slot_the_run_is_polled_and_caught_up(
    daemon_factory, fake, project, tmp_path
):
    daemon = openai_daemon(daemon_factory, fake, "--threads", "4")  # two stream slots
    fake.script([Text("let me write "), ToolCall("write", {"path": "p.txt", "content": "polled"})])
    fake.script([Text("written")])

    async def run() -> None:
        editor = Editor()
        editor.answers = ["allow"]
        async with editor_for(daemon.url, tmp_path, editor) as (conn, _, _):
            sid = (await conn.new_session(cwd=str(project), mcp_servers=[])).session_id
            answer = await conn.prompt(session_id=sid, prompt=[text_block("write it")])
            assert answer.stop_reason == "end_turn"
            assert editor.text() == "let me write written"
            [started] = editor.of(ToolCallStart)
            assert started.kind == "edit" and len(editor.asked) == 1
            assert [p.status for p in editor.of(ToolCallProgress)] == ["in_progress", "completed"]

    with daemon.client() as http:
        wid = register(http, project)
    with event_stream(daemon.url, wid), event_stream(daemon.url, wid):  # both slots
        scenario(run())
    assert (project / "p.txt").read_text() == "polled"


# ---------------------------------------------------------------- the daemon's lifetime


def test_a_session_loads_after_a_daemon_restart(daemon_factory, fake, project, tmp_path):
    daemon = openai_daemon(daemon_factory, fake, "--port", str(free_port()))
    fake.script([ToolCall("write", {"path": "kept.txt", "content": "kept"})])
    fake.script([Text("done")])

    async def first() -> str:
        editor = Editor()
        editor.answers = ["allow"]
        async with editor_for(daemon.url, tmp_path, editor) as (conn, _, _):
            sid = (await conn.new_session(cwd=str(project), mcp_servers=[])).session_id
            answer = await conn.prompt(session_id=sid, prompt=[text_block("keep a file")])
            assert answer.stop_reason == "end_turn"
            return sid

    sid = asyncio.run(asyncio.wait_for(first(), SCENARIO_TIMEOUT))
    daemon.signal()
    assert daemon.wait() == 0
    daemon.start()
    fake.script([Text("again")])

    async def second() -> None:
        async with editor_for(daemon.url, tmp_path) as (conn, editor, _):
            # A session this process never saw must be loaded first.
            with pytest.raises(RequestError) as unknown:
                await conn.prompt(session_id=sid, prompt=[text_block("hi")])
            assert unknown.value.code == -32002 and "session/load" in str(unknown.value)
            with pytest.raises(RequestError) as missing:
                await conn.load_session(cwd=str(project), session_id="nope", mcp_servers=[])
            assert missing.value.code == -32002

            loaded = await conn.load_session(cwd=str(project), session_id=sid, mcp_servers=[])
            assert loaded.config_options[0].current_value == "m"
            kinds = [type(u).__name__ for u in editor.updates]
            assert kinds == [
                "UserMessageChunk",
                "ToolCallStart",
                "ToolCallProgress",
                "AgentMessageChunk",
            ]
            user, started, result, text = editor.updates
            assert isinstance(user, UserMessageChunk) and user.content.text == "keep a file"
            assert started.kind == "edit" and started.locations[0].path.endswith("kept.txt")
            assert (result.tool_call_id, result.status) == (started.tool_call_id, "completed")
            assert text.content.text == "done"

            before = len(editor.updates)
            answer = await conn.prompt(session_id=sid, prompt=[text_block("and now?")])
            assert (answer.stop_reason, editor.text(before)) == ("end_turn", "again")
            assert "done" in prompt_texts(fake.last_request)  # the history went with it

    scenario(second())


def test_the_daemon_going_away_is_a_clear_error_and_the_session_survives(
    daemon_factory, fake, project, tmp_path
):
    daemon = openai_daemon(daemon_factory, fake, "--port", str(free_port()))
    fake.script([Text("before "), Hang()])

    async def run() -> None:
        async with editor_for(daemon.url, tmp_path) as (conn, editor, _):
            sid = (await conn.new_session(cwd=str(project), mcp_servers=[])).session_id
            turn = asyncio.create_task(conn.prompt(session_id=sid, prompt=[text_block("go")]))
            await until(lambda: editor.text() == "before ", what="the first chunk")
            gone_at = time.monotonic()
            daemon.kill()
            with pytest.raises(RequestError) as lost:
                await turn
            assert time.monotonic() - gone_at < 10
            assert lost.value.code == -32603
            assert "is crushd running?" in str(lost.value)
            assert lost.value.data["runId"]

            with pytest.raises(RequestError) as down:
                await conn.new_session(cwd=str(project), mcp_servers=[])
            assert "cannot connect to crushd" in str(down.value)

            await asyncio.to_thread(daemon.start)
            fake.script([Text("back")])
            before = len(editor.updates)
            answer = await conn.prompt(session_id=sid, prompt=[text_block("still there?")])
            assert (answer.stop_reason, editor.text(before)) == ("end_turn", "back")

    scenario(run())
    with daemon.client() as http:
        [workspace] = http.get("/v1/workspaces").json()
        runs = http.get(f"/v1/workspaces/{workspace['id']}/runs").json()
        assert [r["status"] for r in runs] == ["completed", "interrupted"]


def test_a_daemon_on_a_unix_socket_with_a_token(daemon_factory, project, tmp_path):
    socket_path = tmp_path / "crushd.sock"
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    daemon_factory("--unix-socket", str(socket_path), "--token-file", str(token))

    async def run() -> None:
        async with editor_for(f"unix:{socket_path}", tmp_path) as (conn, _, _):
            with pytest.raises(RequestError) as refused:
                await conn.new_session(cwd=str(project), mcp_servers=[])
            assert "--token-file" in str(refused.value)  # says how to give the token
        with_token = ("--token-file", str(token))
        async with editor_for(f"unix:{socket_path}", tmp_path, None, *with_token) as (conn, ed, _):
            sid = (await conn.new_session(cwd=str(project), mcp_servers=[])).session_id
            answer = await conn.prompt(session_id=sid, prompt=[text_block("over the socket")])
            assert (answer.stop_reason, ed.text()) == ("end_turn", "over the socket")  # echo

    scenario(run())


# ---------------------------------------------------------------- the wire itself


@pytest.mark.parametrize(
    ("name", "args", "kind", "title", "location"),
    [
        ("bash", {"command": "make  test"}, "execute", "Run `make test`", None),
        ("view", {"path": "src/a.py", "offset": 40}, "read", "Read src/a.py", ("src/a.py", 40)),
        ("ls", {}, "read", "List .", None),
        ("glob", {"pattern": "**/*.py"}, "search", "Find **/*.py", None),
        ("grep", {"pattern": "TODO", "path": "src"}, "search", "Search TODO in src", ("src", None)),
        ("edit", {"path": "/abs/b.py", "old_string": "a", "new_string": "b"}, "edit", None, None),
        ("mcp_time_now", {"path": "x"}, "other", "mcp_time_now", ("x", None)),
    ],
)
def test_tool_calls_map_to_kinds_titles_and_locations(name, args, kind, title, location):
    part = {"id": "c1", "name": name, "input": json.dumps(args)}
    update = updates.tool_call(part, "/work/root")
    assert update["kind"] == kind
    if title:
        assert update["title"] == title
    if location:
        path, line = location
        expected = {"path": f"/work/root/{path}", **({"line": line} if line else {})}
        assert update["locations"] == [expected]
    if name == "edit":
        assert update["locations"] == [{"path": "/abs/b.py"}]
        assert update["content"] == [
            {"type": "diff", "path": "/abs/b.py", "oldText": "a", "newText": "b"}
        ]


def test_the_wire_end_of_input_leaves_the_run_to_the_daemon(daemon_factory, fake, project):
    """Raw JSON-RPC lines: errors for what is not a request, then end of
    input stops the adapter at once while the run goes on in the daemon."""
    daemon = openai_daemon(daemon_factory, fake)
    fake.script([Text("streaming "), Hang()])
    adapter = subprocess.Popen(
        [sys.executable, "-m", "crushd", "acp", "--url", daemon.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:

        def send(message: Any) -> None:
            line = message if isinstance(message, bytes) else json.dumps(message).encode()
            adapter.stdin.write(line + b"\n")
            adapter.stdin.flush()

        def read() -> dict[str, Any]:
            line = adapter.stdout.readline()
            assert line, "the adapter closed its output"
            return json.loads(line)

        send(b"not json")
        assert read()["error"]["code"] == -32700
        send({"jsonrpc": "2.0", "id": 1, "method": "no/such"})
        assert read() == {
            "jsonrpc": "2.0",
            "id": 1,
            "error": {
                "code": -32601,
                "message": "Method not found: no/such",
                "data": {"method": "no/such"},
            },
        }
        send({"jsonrpc": "2.0", "id": 2, "method": "session/new", "params": {"cwd": str(project)}})
        sid = read()["result"]["sessionId"]
        prompt = [{"type": "text", "text": "go"}]
        params = {"sessionId": sid, "prompt": prompt}
        send({"jsonrpc": "2.0", "id": "p", "method": "session/prompt", "params": params})
        while (message := read()).get("params", {}).get("update", {}).get("sessionUpdate") != (
            "agent_message_chunk"
        ):
            pass
        assert message["params"]["update"]["content"]["text"] == "streaming "

        closed_at = time.monotonic()
        adapter.stdin.close()
        assert adapter.wait(10) == 0
        assert time.monotonic() - closed_at < 3
    finally:
        if adapter.poll() is None:
            adapter.kill()
            adapter.wait(10)
        adapter.stdout.close()

    with daemon.client() as http:
        [workspace] = http.get("/v1/workspaces").json()
        wid = workspace["id"]
        [run] = http.get(f"/v1/workspaces/{wid}/runs").json()
        assert run["status"] == "running"  # the daemon's, not the editor's
        http.post(f"/v1/workspaces/{wid}/runs/{run['id']}/cancel")
        run = http.get(f"/v1/workspaces/{wid}/runs/{run['id']}", params={"wait": 10}).json()
        assert run["status"] == "cancelled"
