"""The bash sandbox with the real bubblewrap and real processes: what a
sandboxed command can write, read and reach, and that cancel and timeout
still leave no process behind."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AGENT_KEY_ENV, wait_for
from fakeprovider import Text, ToolCall
from helpers import (
    api,
    decide,
    messages,
    parts,
    pending_permission,
    processes_with,
    register,
    run_events,
    serve_once,
    submit,
    wait_terminal,
)

from crushd.cancel import Cancelled, CancelToken
from crushd.config import Config, ConfigError, SandboxSettings
from crushd.tools import ToolContext, ToolResult
from crushd.tools.bash import BashTool
from crushd.tools.sandbox import Bubblewrap, command_env, detect, sandbox_for

REFUSED = "[sandbox: this command ran in crushd's sandbox and may have been refused"


@pytest.fixture(scope="module")
def bwrap() -> Bubblewrap:
    found = detect()
    assert found.available, f"bubblewrap must work for these tests: {found.reason}"
    return found


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A sibling of the workspace holding a secret."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_text("sibling secret\n")
    return path


@pytest.fixture
def home_secret() -> Iterator[Path]:
    """A private directory in the real home of the user running the tests,
    like ``~/.ssh``, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=".crushd-sandbox-test-", dir=Path.home()))
    (path / "id_rsa").write_text("PRIVATE KEY\n")
    try:
        yield path
    finally:
        shutil.rmtree(path)


def make_ctx(bwrap: Bubblewrap, root: Path, **options) -> ToolContext:
    values = {"mode": "workspace-write", "network": True}
    values.update(options)
    sandbox = sandbox_for(bwrap, root, **values)
    assert sandbox is not None
    return ToolContext(root=root, token=CancelToken(name="test"), sandbox=sandbox)


def bash(ctx: ToolContext, command: str, **params) -> ToolResult:
    return BashTool().run({"command": command, **params}, ctx)


# -- the file system -------------------------------------------------------------


def test_writes_inside_the_workspace_and_tmp_work(bwrap, root):
    ctx = make_ctx(bwrap, root)
    name = f"crushd-sandbox-{uuid.uuid4().hex}"
    result = bash(
        ctx, f"mkdir -p sub && echo hi > sub/f.txt && echo t > /tmp/{name} && cat /tmp/{name}"
    )
    assert result == ToolResult("t")
    assert (root / "sub" / "f.txt").read_text() == "hi\n"
    assert not Path("/tmp", name).exists()  # the sandbox's /tmp is its own


def test_writes_outside_fail_and_say_the_sandbox_refused(bwrap, root, outside):
    ctx = make_ctx(bwrap, root)
    beside = bash(ctx, "touch ../beside.txt")
    assert beside.is_error
    assert "Read-only file system" in beside.content
    assert REFUSED in beside.content and '"unsandboxed": true' in beside.content
    assert "sandbox_read" not in beside.content  # reading more would not help a write
    assert not (root.parent / "beside.txt").exists()

    into_sibling = bash(ctx, "echo pwned > ../outside/new.txt")
    assert into_sibling.is_error and REFUSED in into_sibling.content
    assert not (outside / "new.txt").exists()

    name = f".crushd-sandbox-{uuid.uuid4().hex}"
    in_home = bash(ctx, f"echo pwned > ~/{name}")
    assert in_home.is_error
    assert "Read-only file system" in in_home.content and REFUSED in in_home.content
    assert not (Path.home() / name).exists()

    system = bash(ctx, "echo pwned > /etc/crushd-sandbox-test")
    assert system.is_error and REFUSED in system.content
    assert not Path("/etc/crushd-sandbox-test").exists()


def test_home_directories_and_siblings_are_hidden(bwrap, root, outside, home_secret):
    ctx = make_ctx(bwrap, root)
    key = bash(ctx, f"cat ~/{home_secret.name}/id_rsa")
    assert key.is_error and "PRIVATE KEY" not in key.content
    assert "No such file or directory" in key.content and REFUSED in key.content
    assert "add the path to sandbox_read" in key.content
    listing = bash(ctx, "ls -A ~ /root /home 2>&1; cat ../outside/secret.txt")
    assert home_secret.name not in listing.content
    assert "sibling secret" not in listing.content
    # The rest of the system stays readable.
    system = bash(ctx, "head -c 4 /etc/passwd; echo; ls /usr/bin/env")
    assert system == ToolResult("root\n/usr/bin/env")


def test_sandbox_read_makes_a_hidden_path_readable_not_writable(bwrap, root, home_secret):
    ctx = make_ctx(bwrap, root, read=[str(home_secret)])
    assert bash(ctx, f"cat ~/{home_secret.name}/id_rsa") == ToolResult("PRIVATE KEY")
    write = bash(ctx, f"echo x > ~/{home_secret.name}/new")
    assert write.is_error and "Read-only file system" in write.content
    assert not (home_secret / "new").exists()


def test_workspace_inside_a_home_is_still_writable(bwrap, home_secret):
    project = home_secret / "project"
    project.mkdir()
    ctx = make_ctx(bwrap, project)
    assert bash(ctx, "echo ok > f && cat f && ls ..") == ToolResult("ok\nproject")
    assert (project / "f").read_text() == "ok\n"
    refused = bash(ctx, "cat ../id_rsa")
    assert refused.is_error and "PRIVATE KEY" not in refused.content


def test_read_only_mode_refuses_writes_in_the_workspace(bwrap, root):
    (root / "kept.txt").write_text("kept\n")
    ctx = make_ctx(bwrap, root, mode="read-only")
    assert bash(ctx, "cat kept.txt") == ToolResult("kept")
    result = bash(ctx, "echo changed > kept.txt")
    assert result.is_error and REFUSED in result.content
    assert (root / "kept.txt").read_text() == "kept\n"
    assert bash(ctx, "echo scratch > /tmp/s && cat /tmp/s") == ToolResult("scratch")


def test_crushd_secrets_are_hidden(bwrap, root, monkeypatch):
    # Both inside the workspace, the one place outside /tmp a test may write:
    # the hardest case, as the workspace is bound read-write over everything.
    data = root / "crushd-data"
    data.mkdir()
    (data / "workspace.db").write_text("sessions")
    token = root / "token"
    token.write_text("s3cret-token\n")
    monkeypatch.setenv("CRUSHD_TOKEN", "s3cret-env")
    monkeypatch.setenv("MY_KEY", "model-key")
    ctx = make_ctx(bwrap, root, private=[str(data)], masked=[str(token)], unset_env=["MY_KEY"])
    result = bash(ctx, 'ls -A crushd-data; echo "[$CRUSHD_TOKEN][$MY_KEY]"; cat token')
    assert result.is_error
    assert result.content.splitlines()[:2] == ["[][]", "cat: token: Permission denied"]
    write = bash(ctx, "echo x > crushd-data/new; echo x > token")
    assert write.is_error and "crushd-data/new: Read-only file system" in write.content
    assert sorted(os.listdir(data)) == ["workspace.db"]
    assert token.read_text() == "s3cret-token\n"


def test_an_ordinary_failure_gets_no_sandbox_note(bwrap, root):
    ctx = make_ctx(bwrap, root)
    result = bash(ctx, "cat missing.txt; ls sub/none; exit 2")
    assert result.is_error and "exit code 2" in result.content
    assert REFUSED not in result.content


def test_unsandboxed_runs_as_without_a_sandbox(bwrap, root, outside):
    ctx = make_ctx(bwrap, root)
    tool = BashTool()
    params = {"command": "cat ../outside/secret.txt; touch ../beside.txt", "unsandboxed": True}
    assert tool.escapes(params, ctx)
    assert tool.describe(params, ctx).action == "unsandboxed"
    assert not tool.escapes({"command": "ls"}, ctx)
    assert tool.describe({"command": "ls"}, ctx).action == "run: ls"
    assert tool.run(params, ctx) == ToolResult("sibling secret")
    assert (root.parent / "beside.txt").exists()
    # Without a sandbox there is nothing to escape: the flag changes nothing.
    plain = ToolContext(root=root, token=CancelToken())
    assert not tool.escapes(params, plain)
    assert tool.describe(params, plain).action.startswith("run: cat")


# -- the network -----------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


CONNECT = "exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"


def test_network_false_cannot_reach_a_loopback_listener(bwrap, root, listener):
    result = bash(make_ctx(bwrap, root, network=False), CONNECT.format(port=listener))
    assert result.is_error and "connected" not in result.content
    assert "Connection refused" in result.content
    assert "it has no network (network = false)" in result.content


def test_network_true_has_a_network_but_not_the_hosts_loopback(bwrap, root, listener):
    """crushd's API listens on the host's loopback: a sandbox with the
    network on reaches neither it nor it through the slirp gateway."""
    assert bwrap.slirp4netns, "slirp4netns must be installed for these tests"
    ctx = make_ctx(bwrap, root, network=True)
    for host in ("127.0.0.1", "10.0.2.2"):
        result = bash(ctx, CONNECT.replace("127.0.0.1", host).format(port=listener))
        assert result.is_error and "connected" not in result.content, host
    # It is online all the same: a tap device with a default route via slirp4netns.
    routes = bash(ctx, "cat /proc/net/route; cat /etc/resolv.conf")
    assert "tap0\t00000000\t0202000A" in routes.content
    assert "nameserver 10.0.2.3" in routes.content


def test_network_true_without_slirp4netns_has_no_network(bwrap, root, listener):
    """Where slirp4netns is missing the network stays off rather than shared
    with the host, and the refusal says why."""
    ctx = make_ctx(dataclasses.replace(bwrap, slirp4netns=None), root, network=True)
    result = bash(ctx, CONNECT.format(port=listener))
    assert result.is_error and "connected" not in result.content
    assert "it has no network (slirp4netns is not installed)" in result.content


# -- processes -------------------------------------------------------------------


def tree(marker: str) -> str:
    """A command leaving a background child, a child in a session of its own
    and a foreground sleep, all findable on the host by ``marker``."""
    return (
        f"(exec -a {marker}-bg sleep 300) & "
        f"setsid bash -c 'exec -a {marker}-setsid sleep 300' & "
        f"echo started; exec -a {marker}-fg sleep 300"
    )


def named(marker: str) -> list[int]:
    """Live processes whose argv[0] starts with ``marker`` (set with ``exec -a``)."""
    found = []
    for pid in processes_with(marker):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(marker.encode()):
                found.append(pid)
        except OSError:  # exited meanwhile
            continue
    return found


def test_timeout_kills_the_whole_tree_in_the_sandbox(bwrap, root):
    marker = f"crushd-sbx-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    result = bash(make_ctx(bwrap, root), tree(marker), timeout=1)
    assert time.monotonic() - started < 5
    assert result.is_error and "timed out after 1 s" in result.content
    assert "started" in result.content
    wait_for(lambda: not processes_with(marker), 5, message="sandboxed processes survived")


def test_cancel_kills_the_whole_tree_in_the_sandbox(bwrap, root):
    marker = f"crushd-sbx-{uuid.uuid4().hex[:12]}"
    ctx = make_ctx(bwrap, root)

    seen: list[int] = []

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            ctx.token.wait(0.02)
            seen[:] = named(marker)
        ctx.token.cancel(reason="user")

    watcher = threading.Thread(target=cancel_when_running)
    watcher.start()
    started = time.monotonic()
    try:
        with pytest.raises(Cancelled):
            bash(ctx, tree(marker))
    finally:
        watcher.join()
    assert time.monotonic() - started < 12
    assert ctx.token.reason == "user"
    assert len(seen) == 3, "the three sandboxed processes never all ran"
    wait_for(lambda: not processes_with(marker), 5, message="sandboxed processes survived")
    assert not ctx.token._callbacks


def test_background_children_do_not_hold_the_call(bwrap, root):
    marker = f"crushd-sbx-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    result = bash(make_ctx(bwrap, root), f"(exec -a {marker} sleep 300) & echo done")
    assert time.monotonic() - started < 3
    assert result == ToolResult("done")
    wait_for(lambda: not processes_with(marker), 5, message="the background child survived")


# -- detection -------------------------------------------------------------------


def test_missing_bwrap_is_unavailable_and_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="crushd.tools.sandbox")
    found = detect(path=str(tmp_path))
    assert not found.available and "bwrap not found" in found.reason
    assert sandbox_for(found, tmp_path, "workspace-write", True) is None
    assert caplog.text.count("event=sandbox_unavailable") == 1


def test_a_bwrap_that_cannot_create_namespaces_is_unavailable(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="crushd.tools.sandbox")
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    found = detect(path=str(tmp_path))
    assert not found.available
    assert "No permissions to create new namespace" in found.reason
    assert "event=sandbox_unavailable" in caplog.text


def test_sandbox_off_means_no_sandbox(bwrap, root):
    assert sandbox_for(bwrap, root, "off", True) is None
    with pytest.raises(ValueError, match="sandbox must be one of"):
        sandbox_for(bwrap, root, "strict", True)


# -- through the daemon ----------------------------------------------------------
#
# A live crushd on a real socket, the model a FakeProvider scripting bash calls.

KEY_ENV = AGENT_KEY_ENV


def only_result(http, wid: str, run: dict) -> dict:
    stored = messages(http, wid, run["session_id"])
    (result,) = parts(stored[2], "tool_result")
    return result


def test_yolo_workspace_write_runs_bash_without_asking(fake, agent, project, tmp_path):
    fake.script(
        [
            ToolCall("bash", {"command": "echo in > inside.txt"}, id="call_in"),
            ToolCall("bash", {"command": "echo pwned > ../outside.txt"}, id="call_out"),
        ]
    )
    fake.script([Text("tried")])
    live = agent()
    with api(live.url) as http:
        assert http.get("/v1/health").json()["sandbox"] == "bwrap"
        wid = register(http, project, yolo=True)
        assert http.get(f"/v1/workspaces/{wid}").json()["sandbox"] == "workspace-write"
        run = submit(http, wid, "write both")
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed" and done["text"] == "tried"
        stored = messages(http, wid, run["session_id"])
        inside, out = parts(stored[2], "tool_result")
        assert inside["is_error"] is False
        assert out["is_error"] is True and REFUSED in out["content"]
        events = run_events(live.url, wid, run["session_id"], run["id"])
    assert (project / "inside.txt").read_text() == "in\n"
    assert not (tmp_path / "outside.txt").exists()
    assert not any(e["type"] == "permission.requested" for e in events)


def test_unsandboxed_asks_even_in_yolo(fake, agent, project, tmp_path):
    command = "echo escaped > ../outside.txt"
    fake.script([ToolCall("bash", {"command": command, "unsandboxed": True}, id="call_1")])
    fake.script([ToolCall("bash", {"command": command, "unsandboxed": True}, id="call_2")])
    fake.script([Text("done")])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = submit(http, wid, "escape")
        asked = pending_permission(http, wid)
        assert (asked["tool"], asked["action"]) == ("bash", "unsandboxed")
        assert asked["params"] == {"command": command, "unsandboxed": True}
        assert asked["path"] == str(project.resolve())
        assert decide(http, wid, asked["id"], "allow_session").status_code == 200
        # Allowing it for the session does not stop the next one from asking.
        again = pending_permission(http, wid)
        assert again["tool_call_id"] == "call_2" and again["action"] == "unsandboxed"
        assert decide(http, wid, again["id"], "allow").status_code == 200
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed"
    assert (tmp_path / "outside.txt").read_text() == "escaped\n"


def test_a_denied_unsandboxed_command_does_not_run(fake, agent, project, tmp_path):
    command = "echo escaped > ../outside.txt"
    fake.script([ToolCall("bash", {"command": command, "unsandboxed": True})])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = submit(http, wid, "escape")
        asked = pending_permission(http, wid)
        assert decide(http, wid, asked["id"], "deny").status_code == 200
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed" and "Permission denied: bash" in done["error"]
    assert not (tmp_path / "outside.txt").exists()


def test_a_sandboxed_command_still_asks_without_yolo(fake, agent, project):
    fake.script([ToolCall("bash", {"command": "echo hi > f.txt"})])
    fake.script([Text("ok")])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=False)
        run = submit(http, wid, "write")
        asked = pending_permission(http, wid)
        assert (asked["tool"], asked["action"]) == ("bash", "run: echo hi > f.txt")
        decide(http, wid, asked["id"], "allow")
        assert wait_terminal(http, wid, run["id"])["status"] == "completed"
    assert (project / "f.txt").read_text() == "hi\n"


def test_sandbox_off_behaves_as_before(fake, agent, project, tmp_path):
    command = "echo written > ../outside.txt"
    fake.script([ToolCall("bash", {"command": command})])
    fake.script([ToolCall("bash", {"command": "cat ../outside.txt", "unsandboxed": True})])
    fake.script([Text("done")])
    live = agent(sandbox="off")
    with api(live.url) as http:
        assert http.get("/v1/health").json()["sandbox"] == "bwrap"  # it works, but is off
        wid = register(http, project, yolo=True)
        assert http.get(f"/v1/workspaces/{wid}").json()["sandbox"] == "off"
        run = submit(http, wid, "write outside")
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed" and done["text"] == "done"
        stored = messages(http, wid, run["session_id"])
        (second,) = parts(stored[4], "tool_result")
        assert second["content"] == "written"
        events = run_events(live.url, wid, run["session_id"], run["id"])
    assert (tmp_path / "outside.txt").read_text() == "written\n"
    assert not any(e["type"] == "permission.requested" for e in events)


def test_workspace_table_overrides_the_sandbox(agent, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    live = agent(
        network=False,
        sandbox_read=["/opt"],
        workspaces={str(second): {"sandbox": "read-only", "sandbox_read": ["~/.cargo"]}},
    )
    with api(live.url) as http:
        one = register(http, first, yolo=True)
        two = register(http, second, yolo=True)
        assert http.get(f"/v1/workspaces/{one}").json()["sandbox"] == "workspace-write"
        assert http.get(f"/v1/workspaces/{two}").json()["sandbox"] == "read-only"
    a, b = live.server.get(one).sandbox, live.server.get(two).sandbox
    assert KEY_ENV in a.unset_env  # the model's key is crushd's, not the command's
    assert (a.network, b.network) == (False, False)
    assert a.read == ("/opt",)
    assert b.read == ("/opt", os.path.realpath(Path.home() / ".cargo"))
    # crushd keeps its own data and model keys out of every sandbox.
    assert str(live.server.data_dir) in a.private
    assert {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "CRUSHD_TOKEN"} <= set(a.unset_env)


def test_without_bwrap_the_daemon_falls_back_and_says_so(fake, daemon_factory, project, tmp_path):
    empty = tmp_path / "no-bwrap"
    empty.mkdir()
    fake.script([ToolCall("bash", {"command": "echo plain > ../outside.txt"})])
    fake.script([Text("done")])
    args = f"--provider openai --base-url {fake.openai_base_url} --model m"
    daemon = daemon_factory(*args.split(), env={"PATH": str(empty), "OPENAI_API_KEY": "sk-t"})
    with daemon.client() as http:
        assert http.get("/v1/health").json()["sandbox"] == "unavailable"
        wid = register(http, project, yolo=True)
        assert http.get(f"/v1/workspaces/{wid}").json()["sandbox"] == "off"
        run = submit(http, wid, "write outside")
        done = wait_terminal(http, wid, run["id"])
        assert done["status"] == "completed"
    assert (tmp_path / "outside.txt").read_text() == "plain\n"
    log = daemon.log()
    assert log.count("event=sandbox_unavailable") == 1
    assert "bwrap not found on PATH" in log


# -- configuration ---------------------------------------------------------------


def test_sandbox_settings_from_every_layer(tmp_path):
    assert Config.load(env={}).sandbox_settings("/srv/p") == SandboxSettings(
        "workspace-write", True, ()
    )
    env = {"CRUSHD_SANDBOX": "read-only", "CRUSHD_NETWORK": "false",
           "CRUSHD_SANDBOX_READ": os.pathsep.join(["/opt/a", "~/.m2"])}  # fmt: skip
    assert Config.load(env=env).sandbox_settings("/srv/p") == SandboxSettings(
        "read-only", False, ("/opt/a", "~/.m2")
    )
    path = tmp_path / "crushd.toml"
    path.write_text(
        'sandbox_read = ["/opt/sdk"]\n'
        f'[workspaces."{tmp_path}"]\n'
        'sandbox = "off"\nnetwork = false\nsandbox_read = ["/srv/data"]\n'
    )
    config = Config.load(env={}, config_file=str(path))
    assert config.source_file == str(path.resolve())
    assert config.sandbox_settings(tmp_path) == SandboxSettings(
        "off", False, ("/opt/sdk", "/srv/data")
    )
    assert config.sandbox_settings("/elsewhere") == SandboxSettings(
        "workspace-write", True, ("/opt/sdk",)
    )
    flags = {"sandbox": "read-only", "network": False, "sandbox_read": ("/x",)}
    flagged = Config.load(flags, env={}, config_file=str(path))
    assert flagged.sandbox_settings("/elsewhere") == SandboxSettings("read-only", False, ("/x",))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('sandbox = "strict"\n', "sandbox must be one of workspace-write, read-only, off"),
        ('network = "maybe"\n', "network: cannot use 'maybe' (expected true or false)"),
        ('sandbox_read = ["relative/path"]\n', "sandbox_read entries must be absolute paths"),
        ('[workspaces."/srv/p"]\nnetwrok = false\n', "unknown key(s) netwrok"),
        ('[workspaces."srv/p"]\nnetwork = false\n', "the workspace path must be absolute"),
        ('[workspaces."/srv/p"]\nnetwork = "no"\n', "network must be true or false"),
        ('[workspaces."/srv/p"]\nsandbox = "none"\n', "sandbox must be one of"),
        ('[workspaces."/srv/p"]\nsandbox_read = "/x"\n', "sandbox_read must be a list"),
        ('sandbox_hide = ["secrets"]\n', "sandbox_hide entries must be absolute paths"),
        ('[workspaces."/srv/p"]\nsandbox_hide = "/x"\n', "sandbox_hide must be a list"),
        ('sandbox_env = ["GOOD", "BAD-NAME"]\n', "sandbox_env entries must be variable names"),
        ('sandbox_env = ["A*B"]\n', "not 'A*B'"),
        ("max_message_bytes = 0\n", "max_message_bytes must be at least 1"),
        ('workspaces = "all"\n', "workspaces: cannot use 'all' (expected a table)"),
        ('source_file = "/x"\n', "unknown configuration key 'source_file'"),
    ],
)
def test_bad_sandbox_settings_are_clear_config_errors(tmp_path, text, message):
    path = tmp_path / "crushd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        Config.load(env={}, config_file=str(path))
    assert message in caught.value.message


def test_hide_and_env_lists_add_up_from_every_layer(tmp_path):
    path = tmp_path / "crushd.toml"
    path.write_text(
        'sandbox_hide = ["/srv/secrets"]\nsandbox_env = ["GOPATH"]\n'
        f'[workspaces."{tmp_path}"]\nsandbox_hide = ["~/.aws"]\nsandbox_env = ["CARGO_*"]\n'
    )
    config = Config.load(env={"CRUSHD_SANDBOX_ENV": "A, B"}, config_file=str(path))
    settings = config.sandbox_settings(tmp_path)
    assert settings.hide == ("/srv/secrets", "~/.aws")
    assert settings.env == ("GOPATH", "CARGO_*")
    assert config.sandbox_settings("/elsewhere").env == ("GOPATH",)
    from_env = Config.load(env={"CRUSHD_SANDBOX_ENV": "A, B", "CRUSHD_SANDBOX_HIDE": "/a:/b"})
    assert from_env.sandbox_env == ["A", "B"] and from_env.sandbox_hide == ["/a", "/b"]


def test_command_env_is_an_allowlist():
    environ = {
        "PATH": "/bin",
        "HOME": "/h",
        "LC_ALL": "C",
        "LANGUAGE": "en",  # not LANG, not LC_*
        "AWS_SECRET_ACCESS_KEY": "s",
        "CARGO_HOME": "/c",
        "CRUSHD_TOKEN": "t",
    }
    assert command_env(environ=environ) == {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C"}
    assert command_env(["CARGO_*", "CRUSHD_TOKEN"], environ) == {
        "PATH": "/bin",
        "HOME": "/h",
        "LC_ALL": "C",
        "CARGO_HOME": "/c",
    }


def test_crushd_serve_sandbox_flags_reach_the_config(tmp_path):
    proc = serve_once(tmp_path / "data", "--sandbox", "sometimes", "--port", "0")
    assert proc.returncode != 0 and "sometimes" in proc.stderr
    assert "Traceback" not in proc.stderr
