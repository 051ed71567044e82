"""MCP servers against real servers written by others (``mcp-server-time``
from PyPI, the reference ``@modelcontextprotocol/server-everything`` from
npm, both installed by .ci/run) and ``tests/mcpserver.py`` for what they
cannot script: hangs, crashes, grandchildren, a server that ignores SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import mcp_types
import pytest
from conftest import wait_for
from helpers import EVERYTHING, TEST_SERVER, TIME_SERVER, alive, descendants, free_port

from crushd.cancel import Cancelled, CancelToken
from crushd.config import Config, ConfigError
from crushd.mcp import STDERR_TAIL, WorkspaceMcp
from crushd.mcp_config import McpConfigError, offered_name, parse_mcp_tables
from crushd.tools.base import ToolContext, ToolResult
from crushd.tools.mcp import result_text


def test_real_servers_are_installed():
    assert shutil.which("mcp-server-everything"), (
        "npm install -g @modelcontextprotocol/server-everything"
    )
    assert os.access(TIME_SERVER, os.X_OK), "pip install mcp-server-time (the test extra)"


# -- helpers -------------------------------------------------------------------


@pytest.fixture
def open_mcp(mcp_loop, tmp_path):
    opened: list[WorkspaceMcp] = []

    def open_(tables, root: Path | None = None) -> tuple[WorkspaceMcp, list[dict]]:
        events: list[dict] = []
        ws = WorkspaceMcp(parse_mcp_tables(tables), root or tmp_path, mcp_loop, events.append, "w")
        opened.append(ws)
        ws.start()
        return ws, events

    yield open_
    for ws in opened:
        ws.close()


def settle(ws: WorkspaceMcp, timeout: float = 30) -> dict[str, dict]:
    wait_for(
        lambda: all(e["status"] != "starting" for e in ws.entries()),
        timeout,
        message=f"servers still starting: {ws.entries()}",
    )
    return {e["name"]: e for e in ws.entries()}


def ctx(root: Path, token: CancelToken | None = None) -> ToolContext:
    return ToolContext(root=root, token=token or CancelToken())


def server_table(marks: Path, **extra) -> dict:
    return {
        "command": sys.executable,
        "args": [TEST_SERVER],
        "env": {"MCP_TEST_MARKS": str(marks)},
        **extra,
    }


# -- configuration -------------------------------------------------------------


def test_tables_are_parsed_with_defaults():
    servers = parse_mcp_tables(
        {
            "fs": {"command": "mcp-fs", "args": ["--root", "."], "env": {"A": "1"}},
            "web": {"url": "https://example.com/mcp", "headers": {"Authorization": "Bearer x"}},
            "old": {"url": "http://localhost:9/sse", "transport": "sse", "timeout": 5},
            "off": {"command": "x", "enabled": False, "allow": ["read"], "disabled_tools": ["rm"]},
        }
    )
    fs, web, old, off = servers["fs"], servers["web"], servers["old"], servers["off"]
    assert (fs.transport, fs.command, fs.args, fs.env) == (
        "stdio",
        "mcp-fs",
        ("--root", "."),
        {"A": "1"},
    )
    assert (fs.timeout, fs.enabled, fs.allow) == (60.0, True, frozenset())
    assert (web.transport, web.headers) == ("http", {"Authorization": "Bearer x"})
    assert (old.transport, old.timeout) == ("sse", 5.0)
    assert (off.enabled, off.allow, off.disabled_tools) == (False, {"read"}, {"rm"})
    assert parse_mcp_tables(None) == {}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("not a table", "mcp.s must be a table"),
        ({}, "exactly one of command"),
        ({"command": "a", "url": "http://x"}, "exactly one of command"),
        ({"command": ""}, "command must be a non-empty string"),
        ({"command": "a", "args": "-v"}, "args must be a list of strings"),
        ({"command": "a", "args": [1]}, "args must be a list of strings"),
        ({"command": "a", "env": {"A": 1}}, "env must be a table of strings"),
        ({"command": "a", "transport": "sse"}, "a command server speaks stdio"),
        ({"command": "a", "headers": {}}, "headers is for remote servers"),
        ({"url": "ftp://x"}, "url must be an http:// or https:// URL"),
        ({"url": "http://x", "args": []}, "args is for local servers"),
        ({"url": "http://x", "transport": "websocket"}, "transport must be stdio, http or sse"),
        ({"command": "a", "timeout": 0}, "timeout must be a positive number"),
        ({"command": "a", "timeout": "60"}, "timeout must be a positive number"),
        ({"command": "a", "enabled": "yes"}, "enabled must be true or false"),
        ({"command": "a", "allow": "all"}, "allow must be a list of strings"),
        ({"command": "a", "comand": "b"}, "unknown key(s) comand"),
    ],
)
def test_bad_tables_are_refused_by_name(table, message):
    with pytest.raises(McpConfigError) as info:
        parse_mcp_tables({"s": table})
    assert message in str(info.value)
    assert info.value.code == "invalid_config"


def test_names_that_would_clash_are_refused():
    with pytest.raises(McpConfigError, match="like those of mcp.a.b"):
        parse_mcp_tables({"a.b": {"command": "x"}, "a_b": {"command": "y"}})


def test_offered_names():
    assert offered_name("my.server", "get time") == "mcp_my_server_get_time"
    assert offered_name("e", "get-sum") == "mcp_e_get-sum"
    long = offered_name("server", "t" * 100)
    assert len(long) == 64 and long.startswith("mcp_server_ttt")
    assert long != offered_name("server", "t" * 101)


def test_result_text_describes_every_kind_of_content():
    result = mcp_types.CallToolResult(
        content=[
            mcp_types.TextContent(text="hello"),
            mcp_types.ImageContent(data="AAAA" * 10, mime_type="image/png"),
            mcp_types.AudioContent(data="AAAA", mime_type="audio/wav"),
            mcp_types.ResourceLink(name="r", uri="file:///r.txt", mime_type="text/plain"),
            mcp_types.EmbeddedResource(
                resource=mcp_types.TextResourceContents(uri="mem://a", text="inside")
            ),
            mcp_types.EmbeddedResource(
                resource=mcp_types.BlobResourceContents(uri="mem://b", blob="AAAA")
            ),
        ],
        structured_content={"temperature": 21},
    )
    assert result_text(result).splitlines() == [
        "hello",
        "[image content: image/png, about 30 bytes]",
        "[audio content: audio/wav, about 3 bytes]",
        "[resource link r <file:///r.txt>, text/plain]",
        "[resource <mem://a>]",
        "inside",
        "[resource <mem://b>, about 3 bytes of binary data]",
        "[structured content]",
        '{"temperature": 21}',
    ]
    mirrored = mcp_types.CallToolResult(
        content=[mcp_types.TextContent(text="ABC")], structured_content={"result": "ABC"}
    )
    assert result_text(mirrored) == "ABC"
    assert result_text(mcp_types.CallToolResult(content=[])) == "(no output)"


# -- real servers over stdio ---------------------------------------------------


def test_real_stdio_servers_list_tools_and_answer(open_mcp, tmp_path):
    ws, events = open_mcp(
        {
            "everything": {"command": EVERYTHING, "args": ["stdio"]},
            "time": {"command": TIME_SERVER},
            "test": server_table(tmp_path),
        }
    )
    entries = settle(ws)
    assert {n: e["status"] for n, e in entries.items()} == dict.fromkeys(
        ("everything", "time", "test"), "connected"
    )
    assert {"echo", "get-sum", "get-tiny-image", "trigger-long-running-operation"} <= set(
        entries["everything"]["tools"]
    )
    assert set(entries["time"]["tools"]) == {"get_current_time", "convert_time"}
    assert entries["time"]["transport"] == "stdio" and entries["time"]["error"] is None
    assert sorted(e["status"] for e in events) == ["connected"] * 3

    tools = ws.tools()
    current = tools["mcp_time_get_current_time"]
    assert "timezone" in current.parameters["properties"]
    assert current.parameters["type"] == "object" and current.mutating
    assert tools["mcp_everything_get-sum"].parameters["required"] == ["a", "b"]

    out = tools["mcp_time_get_current_time"].run({"timezone": "Asia/Tokyo"}, ctx(tmp_path))
    assert not out.is_error and '"timezone": "Asia/Tokyo"' in out.content
    out = tools["mcp_everything_get-sum"].run({"a": 2, "b": 40}, ctx(tmp_path))
    assert out.content == "The sum of 2 and 40 is 42." and not out.is_error
    image = tools["mcp_everything_get-tiny-image"].run({}, ctx(tmp_path))
    assert "[image content: image/png, about" in image.content
    bad = tools["mcp_time_get_current_time"].run({"timezone": "Mars/Olympus"}, ctx(tmp_path))
    assert bad.is_error and "Mars/Olympus" in bad.content
    where = tools["mcp_test_where"].run({}, ctx(tmp_path))
    assert where.content.split()[0] == "/"  # not the workspace: see the cwd tests
    long = tools["mcp_test_shout"].run(
        {"text": "x" * 500}, ToolContext(tmp_path, CancelToken(), max_output=100)
    )
    assert "[output truncated: 400 more characters]" in long.content


def test_disabled_tools_are_hidden_and_allow_skips_asking(open_mcp):
    ws, _ = open_mcp(
        {
            "time": {
                "command": TIME_SERVER,
                "allow": ["get_current_time"],
                "disabled_tools": ["mcp_time_convert_time"],
            },
            "off": {"command": TIME_SERVER, "enabled": False},
        }
    )
    entries = settle(ws)
    assert entries["off"] == {
        "name": "off",
        "transport": "stdio",
        "status": "disabled",
        "tools": [],
        "error": None,
    }
    tools = ws.tools()
    assert sorted(tools) == ["mcp_time_get_current_time"]
    assert not tools["mcp_time_get_current_time"].mutating


def test_cancel_interrupts_a_call_and_the_server_stays_usable(open_mcp, tmp_path):
    ws, _ = open_mcp(
        {"everything": {"command": EVERYTHING, "args": ["stdio"]}, "test": server_table(tmp_path)}
    )
    settle(ws)
    tools = ws.tools()
    for tool, args in (
        ("mcp_everything_trigger-long-running-operation", {"duration": 30, "steps": 5}),
        ("mcp_test_hang", {}),
    ):
        token = CancelToken()
        threading.Timer(0.3, token.cancel).start()
        started = time.monotonic()
        with pytest.raises(Cancelled):
            tools[tool].run(args, ctx(tmp_path, token))
        assert time.monotonic() - started < 1.3
    # The SDK told the server: the hanging handler was cancelled.
    wait_for(lambda: (tmp_path / "cancelled.mark").exists(), 5)
    assert tools["mcp_everything_echo"].run({"message": "hi"}, ctx(tmp_path)).content == "Echo: hi"
    assert tools["mcp_test_shout"].run({"text": "ok"}, ctx(tmp_path)).content == "OK"
    cancelled = CancelToken()
    cancelled.cancel()
    with pytest.raises(Cancelled):
        tools["mcp_test_shout"].run({"text": "no"}, ctx(tmp_path, cancelled))


def test_a_call_past_its_timeout_is_an_error_result(open_mcp, tmp_path):
    ws, _ = open_mcp({"test": server_table(tmp_path, timeout=0.5)})
    settle(ws)
    started = time.monotonic()
    out = ws.tools()["mcp_test_hang"].run({}, ctx(tmp_path))
    assert out.is_error and out.content == "MCP server test: hang timed out after 0.5 s"
    assert time.monotonic() - started < 3
    wait_for(lambda: (tmp_path / "cancelled.mark").exists(), 5)
    assert ws.tools()["mcp_test_shout"].run({"text": "a"}, ctx(tmp_path)).content == "A"


def test_a_crashed_server_is_restarted_at_the_next_call(open_mcp, tmp_path, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    ws, events = open_mcp({"test": server_table(tmp_path)})
    settle(ws)
    (pidfile,) = temp.glob("crushd-mcp-*/test.pid")
    tools = ws.tools()
    first_pid = tools["mcp_test_where"].run({}, ctx(tmp_path)).content.split()[1]
    out = tools["mcp_test_crash"].run({}, ctx(tmp_path))
    assert out.is_error and "restarted at the next call" in out.content
    wait_for(lambda: ws.entries()[0]["status"] == "failed", 5)
    # Its group is gone, so is the file naming it (nothing stale is left
    # to keep the run directory after a kill -9).
    wait_for(lambda: not pidfile.exists(), 5)
    assert "restarts at the next call" in ws.entries()[0]["error"]
    assert "mcp_test_where" in ws.tools()  # still offered, so the model can call it
    again = ws.tools()["mcp_test_where"].run({}, ctx(tmp_path))
    assert not again.is_error and again.content.split()[1] != first_pid
    assert [e["status"] for e in events] == ["connected", "failed", "starting", "connected"]
    # A server killed from outside while idle is noticed and restarted too.
    os.kill(int(again.content.split()[1]), signal.SIGKILL)
    wait_for(lambda: ws.entries()[0]["status"] == "failed", 5)
    assert ws.tools()["mcp_test_shout"].run({"text": "b"}, ctx(tmp_path)).content == "B"


def test_stderr_is_logged_and_only_its_end_kept(open_mcp, tmp_path, caplog):
    ws, _ = open_mcp({"test": server_table(tmp_path)})
    settle(ws)
    with caplog.at_level("DEBUG", "crushd.mcp"):
        assert ws.tools()["mcp_test_chatter"].run({"lines": 3000}, ctx(tmp_path)).content == "done"
        ws.tools()["mcp_test_crash"].run({}, ctx(tmp_path))
        wait_for(lambda: ws.entries()[0]["status"] == "failed", 5)
    error = ws.entries()[0]["error"]
    assert error.endswith("chatter line 2999") and len(error) < STDERR_TAIL + 200
    assert 'event=mcp_stderr server=test line="chatter line 1234"' in caplog.text


def test_broken_servers_fail_with_their_error_and_delay_nothing(open_mcp, tmp_path):
    started = time.monotonic()
    ws, events = open_mcp(
        {
            "missing": {"command": "no-such-mcp-server-binary"},
            "dies": {"command": sys.executable, "args": [TEST_SERVER, "crash-at-start"]},
            "nobody": {"url": f"http://127.0.0.1:{free_port()}/mcp"},
            "good": {"command": TIME_SERVER},
        }
    )
    assert time.monotonic() - started < 0.5
    assert {e["status"] for e in ws.entries()} <= {"starting", "failed"}
    entries = settle(ws)
    assert entries["missing"]["error"] == "command not found: no-such-mcp-server-binary"
    assert "refusing to start (crash-at-start)" in entries["dies"]["error"]
    assert "ConnectError" in entries["nobody"]["error"]
    assert {n: e["status"] for n, e in entries.items()} == {
        "missing": "failed",
        "dies": "failed",
        "nobody": "failed",
        "good": "connected",
    }
    assert {e["name"] for e in events if e["status"] == "failed"} == {"missing", "dies", "nobody"}
    assert sorted(ws.tools()) == ["mcp_good_convert_time", "mcp_good_get_current_time"]


def test_a_server_that_never_connected_is_tried_again_by_a_later_run(mcp_loop, tmp_path):
    later = tmp_path / "later-server"
    events: list[dict] = []
    now = [100.0]
    ws = WorkspaceMcp(
        parse_mcp_tables({"later": {"command": str(later)}}),
        tmp_path,
        mcp_loop,
        events.append,
        retry_interval=30,
        clock=lambda: now[0],
    )
    try:
        ws.start()
        assert settle(ws)["later"]["error"] == f"command not found: {later}"
        later.write_text(f'#!/bin/sh\nexec "{TIME_SERVER}" "$@"\n')
        later.chmod(0o755)
        now[0] += 29.5
        assert ws.tools() == {}  # too soon: no retry yet
        assert ws.entries()[0]["status"] == "failed"
        now[0] += 0.5
        assert ws.tools() == {}  # this run goes without it, but asked for a retry
        wait_for(lambda: ws.entries()[0]["status"] == "connected", 30)
        assert "mcp_later_get_current_time" in ws.tools()
        assert [e["status"] for e in events] == ["failed", "starting", "connected"]
    finally:
        ws.close()


# -- remote servers --------------------------------------------------------------


@pytest.fixture
def remote_servers(tmp_path):
    everything_port, sse_port = free_port(), free_port()
    procs = [
        subprocess.Popen(
            [EVERYTHING, "streamableHttp"],
            env={**os.environ, "PORT": str(everything_port)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, TEST_SERVER, "sse", str(sse_port)],
            env={**os.environ, "MCP_TEST_MARKS": str(tmp_path)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    for port in (everything_port, sse_port):
        wait_for(lambda p=port: _listening(p), 20, message=f"nothing listens on {port}")
    yield everything_port, sse_port
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_streamable_http_and_sse_servers(open_mcp, remote_servers, tmp_path):
    everything_port, sse_port = remote_servers
    ws, _ = open_mcp(
        {
            "ev": {"url": f"http://127.0.0.1:{everything_port}/mcp", "headers": {"X-Crushd": "1"}},
            "old": {"url": f"http://127.0.0.1:{sse_port}/sse", "transport": "sse"},
            "wrong": {"url": f"http://127.0.0.1:{everything_port}/no-such-endpoint"},
        }
    )
    entries = settle(ws)
    assert (entries["ev"]["status"], entries["ev"]["transport"]) == ("connected", "http")
    assert (entries["old"]["status"], entries["old"]["transport"]) == ("connected", "sse")
    assert entries["wrong"]["status"] == "failed" and "Not Found" in entries["wrong"]["error"]
    tools = ws.tools()
    assert tools["mcp_ev_get-sum"].run({"a": 1, "b": 2}, ctx(tmp_path)).content == (
        "The sum of 1 and 2 is 3."
    )
    assert tools["mcp_old_shout"].run({"text": "sse"}, ctx(tmp_path)).content == "SSE"
    token = CancelToken()
    threading.Timer(0.3, token.cancel).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        tools["mcp_ev_trigger-long-running-operation"].run(
            {"duration": 30, "steps": 3}, ctx(tmp_path, token)
        )
    assert time.monotonic() - started < 1.3
    assert tools["mcp_ev_echo"].run({"message": "x"}, ctx(tmp_path)).content == "Echo: x"


# -- stopping ------------------------------------------------------------------


def test_close_stops_the_whole_process_group(mcp_loop, tmp_path):
    ws = WorkspaceMcp(
        parse_mcp_tables({"test": server_table(tmp_path), "time": {"command": TIME_SERVER}}),
        tmp_path,
        mcp_loop,
    )
    ws.start()
    settle(ws)
    grandchild = int(ws.tools()["mcp_test_spawn_child"].run({}, ctx(tmp_path)).content)
    spawned = descendants(os.getpid())
    assert grandchild in spawned and len(spawned) >= 5  # 2 supervisors, 2 servers, sleep
    started = time.monotonic()
    assert ws.close() == []
    assert time.monotonic() - started < 3
    wait_for(lambda: not any(alive(p) for p in spawned), 5, message="MCP processes left")
    assert ws.tools() and ws.entries()[0]["status"] == "connected"  # no events after close
    shout = ws.tools()["mcp_test_shout"]
    closed = shout.run({"text": "x"}, ctx(tmp_path))
    assert closed == ToolResult("MCP server test is unavailable: the workspace is closing", True)
    mcp_loop.stop()
    stopped = shout.run({"text": "x"}, ctx(tmp_path))
    assert stopped == ToolResult("MCP server test is unavailable: crushd is stopping", True)


def test_a_server_that_outstays_the_deadline_is_killed_and_named(mcp_loop, tmp_path, caplog):
    ws = WorkspaceMcp(parse_mcp_tables({"stubborn": server_table(tmp_path)}), tmp_path, mcp_loop)
    ws.start()
    settle(ws)
    assert ws.tools()["mcp_stubborn_linger"].run({}, ctx(tmp_path)).content == "lingering"
    spawned = descendants(os.getpid())
    started = time.monotonic()
    with caplog.at_level("WARNING", "crushd.mcp"):
        assert ws.close(timeout=0.5) == ["stubborn"]
    assert time.monotonic() - started < 3
    assert "event=mcp_stop_stragglers workspace= servers=stubborn timeout=0.5" in caplog.text
    wait_for(lambda: not any(alive(p) for p in spawned), 5, message="stubborn server left")


KILLED_HOST = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from crushd.cancel import CancelToken
    from crushd.mcp import McpLoop, WorkspaceMcp
    from crushd.mcp_config import parse_mcp_tables
    from crushd.tools.base import ToolContext
    tables = {
        "test": {"command": sys.executable, "args": [sys.argv[1]]},
        "everything": {"command": sys.argv[2], "args": ["stdio"]},
        "group": {"command": "bash", "args": ["-c", sys.argv[3] + "; true"]},
    }
    ws = WorkspaceMcp(parse_mcp_tables(tables), Path.cwd(), McpLoop())
    ws.start()
    while any(e["status"] == "starting" for e in ws.entries()):
        time.sleep(0.05)
    call = ToolContext(Path.cwd(), CancelToken())
    print(ws.tools()["mcp_test_spawn_child"].run({}, call).content)
    print([e["status"] for e in ws.entries()], flush=True)
    time.sleep(3600)
    """
)


def test_no_server_outlives_its_host_after_kill_9(tmp_path):
    temp = tmp_path / "tmp"  # the host's TMPDIR, where its run directory goes
    temp.mkdir()
    host = subprocess.Popen(
        [sys.executable, "-c", KILLED_HOST, TEST_SERVER, EVERYTHING, TIME_SERVER],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "TMPDIR": str(temp)},
    )
    try:
        grandchild = int(host.stdout.readline())
        assert host.stdout.readline().strip() == str(["connected"] * 3)
        spawned = descendants(host.pid)
        assert grandchild in spawned and len(spawned) >= 7
        (run_dir,) = temp.glob("crushd-mcp-*")
        assert sorted(p.name for p in run_dir.iterdir()) == [
            "everything.pid",
            "group.pid",
            "test.pid",
        ]
        host.kill()
        host.wait(5)
        wait_for(
            lambda: not any(alive(p) for p in spawned),
            5,
            message=f"left after kill -9: {[p for p in spawned if alive(p)]}",
        )
        # The supervisors, the last owners of the run directory, removed it.
        wait_for(lambda: not run_dir.exists(), 5, message=f"left: {list(temp.rglob('*'))}")
    finally:
        host.kill()
        host.wait(5)
        host.stdout.close()


def test_config_file_tables_and_their_errors(tmp_path):
    readme = (Path(__file__).parents[1] / "README.rst").read_text()
    section = readme.split("\nMCP servers\n===========\n", 1)[1]
    block = section.split("::\n\n", 1)[1].splitlines()
    end = next(i for i, line in enumerate(block) if line and not line.startswith(" "))
    example = "\n".join(line[4:] for line in block[:end])
    good = tmp_path / "good.toml"
    good.write_text(example)
    config = Config.load({}, env={}, config_file=str(good))
    assert list(config.mcp) == ["time", "docs", "legacy"]
    assert config.mcp["time"].allow == {"get_current_time"}
    assert config.mcp["docs"].transport == "http" and config.mcp["legacy"].transport == "sse"
    assert not config.mcp["legacy"].enabled

    bad = tmp_path / "bad.toml"
    bad.write_text('[mcp.fs]\ncommand = "mcp-fs"\nargs = "--root ."\n')
    with pytest.raises(ConfigError, match=r"mcp\.fs: args must be a list of strings"):
        Config.load({}, env={}, config_file=str(bad))
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "crushd",
            "serve",
            "--config",
            str(bad),
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2
    assert "mcp.fs: args must be a list of strings" in refused.stderr
    assert not (tmp_path / "crushd.lock").exists()  # refused before anything started
