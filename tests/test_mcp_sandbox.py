"""Local MCP servers are kept out of what the model wrote: they start
outside the workspace, and in the workspace's bash sandbox unless their
table says ``sandbox = false``.  Real servers, real bubblewrap."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from helpers import TEST_SERVER, processes_with

from crushd.cancel import CancelToken
from crushd.mcp import WorkspaceMcp
from crushd.mcp_config import McpConfigError, parse_mcp_tables
from crushd.tools import ToolContext
from crushd.tools.sandbox import detect, sandbox_for

PLANTED = """\
from pathlib import Path
Path({mark!r}).write_text("imported from the workspace")
raise SystemExit(9)
"""


@pytest.fixture
def open_servers(mcp_loop, root):
    opened: list[WorkspaceMcp] = []

    def open_(tables: dict, network: bool | None = True) -> dict[str, dict]:
        """Start the servers (in the sandbox unless ``network`` is None) and
        wait until each is connected or failed."""
        sandbox = None
        if network is not None:
            sandbox = sandbox_for(detect(), root, "workspace-write", network)
        ws = WorkspaceMcp(parse_mcp_tables(tables), root, mcp_loop, sandbox=sandbox)
        opened.append(ws)
        ws.start()
        wait_for(lambda: all(e["status"] != "starting" for e in ws.entries()), 30)
        return {"ws": ws, **{e["name"]: e for e in ws.entries()}}

    yield open_
    for ws in opened:
        ws.close()


def call(ws: WorkspaceMcp, tool: str, root: Path, **arguments) -> str:
    result = ws.tools()[tool].run(arguments, ToolContext(root=root, token=CancelToken()))
    assert not result.is_error, result.content
    return result.content


def test_a_module_the_model_wrote_is_not_what_a_server_imports(open_servers, root, tmp_path):
    """The attack: a sandboxed ``write`` puts ``json/__init__.py`` in the
    workspace; ``python -m mcp_server_time`` run there would import it,
    outside the sandbox, at the next start."""
    mark = tmp_path / "imported.mark"
    (root / "json").mkdir()
    (root / "json" / "__init__.py").write_text(PLANTED.format(mark=str(mark)))
    server = {"command": sys.executable, "args": ["-m", "mcp_server_time"]}
    for network in (None, True):  # unsandboxed, and sandboxed
        servers = open_servers({"time": server}, network=network)
        assert servers["time"]["status"] == "connected", servers["time"]["error"]
        assert not mark.exists()
    # What it guards against: asked to start in the workspace, unsandboxed, it is hit.
    servers = open_servers({"time": {**server, "cwd": "workspace", "sandbox": False}}, None)
    assert servers["time"]["status"] == "failed"
    assert mark.read_text() == "imported from the workspace"


def test_cwd_is_private_unless_the_table_says_workspace(open_servers, root):
    test = {"command": sys.executable, "args": [TEST_SERVER]}
    servers = open_servers({"plain": test, "in_ws": {**test, "cwd": "workspace"}}, network=None)
    ws = servers["ws"]
    assert call(ws, "mcp_plain_where", root).split()[0] == "/"
    assert call(ws, "mcp_in_ws_where", root).split()[0] == str(root)
    sandboxed = open_servers({"plain": test, "in_ws": {**test, "cwd": "workspace"}})
    ws = sandboxed["ws"]
    assert call(ws, "mcp_plain_where", root).split()[0] == "/tmp"  # the sandbox's own
    assert call(ws, "mcp_in_ws_where", root).split()[0] == str(root)


def server_pids() -> list[int]:
    """Host pids of the test server processes (not their supervisor or bwrap)."""
    found = []
    for pid in processes_with(TEST_SERVER):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        if argv[1:2] == [TEST_SERVER.encode()]:
            found.append(pid)
    return found


@pytest.fixture
def home_secret() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=".crushd-mcp-test-", dir=Path.home()))
    (path / "token").write_text("HOME SECRET\n")
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_a_sandboxed_server_has_no_capabilities_no_host_network_no_homes(
    open_servers, root, home_secret
):
    test = {"command": sys.executable, "args": [TEST_SERVER]}
    servers = open_servers({"test": test})
    assert servers["test"]["status"] == "connected", servers["test"]["error"]
    (pid,) = server_pids()
    status = Path(f"/proc/{pid}/status").read_text()
    assert "CapEff:\t0000000000000000" in status
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    seen = Path(f"/proc/{pid}/root") / str(home_secret).lstrip("/")
    assert not seen.exists()  # its home directories are empty
    servers["ws"].close()
    wait_for(lambda: not server_pids(), 10, message="the sandboxed server outlived its close")


def test_sandbox_false_runs_a_server_as_the_host_does(open_servers, root):
    test = {"command": sys.executable, "args": [TEST_SERVER], "sandbox": False}
    servers = open_servers({"test": test})
    assert servers["test"]["status"] == "connected", servers["test"]["error"]
    (pid,) = server_pids()
    assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"command": "x", "cwd": "relative/dir"}, 'cwd must be "workspace" or an absolute'),
        ({"command": "x", "sandbox": "yes"}, "sandbox must be true or false"),
        ({"url": "http://localhost:1/mcp", "sandbox": False}, "sandbox is for local servers"),
        ({"url": "http://localhost:1/mcp", "cwd": "/"}, "cwd is for local servers"),
    ],
)
def test_bad_cwd_and_sandbox_keys_are_config_errors(table, message):
    with pytest.raises(McpConfigError, match=message):
        parse_mcp_tables({"s": table})
