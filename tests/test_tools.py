"""Workspace tools: bash, view, write, edit, ls, glob, grep and path resolution."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from crushd.cancel import Cancelled, CancelToken
from crushd.tools import (
    PermissionAsk,
    Tool,
    ToolContext,
    ToolError,
    ToolResult,
    default_tools,
)
from crushd.tools import search as search_module
from crushd.tools.bash import KILL_GRACE
from crushd.tools.paths import is_inside, resolve

# -- helpers -------------------------------------------------------------------


@pytest.fixture
def ctx(root: Path) -> ToolContext:
    return ToolContext(root=root, token=CancelToken(name="test"))


TOOLS = default_tools()


def call(name: str, ctx: ToolContext, **params) -> ToolResult:
    return TOOLS[name].run(params, ctx)


def process_alive(pid: int) -> bool:
    """True if ``pid`` runs; an exited orphan may linger as a zombie when the
    container's init does not reap, and that counts as dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat.rpartition(b")")[2].split()[0] != b"Z"


def live_group(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


def assert_group_gone(root: Path) -> None:
    shell = read_pid(root / "shell.pid")
    background = read_pid(root / "bg.pid")
    assert not process_alive(background)
    assert not process_alive(shell)
    assert live_group(shell) == []


# The shell records its pid (= the process group id) and a background child's pid.
TRACKED = "echo $$ > shell.pid; sleep 300 & echo $! > bg.pid; "


# -- registry and schemas ------------------------------------------------------


def test_default_tools_are_fresh_and_complete():
    tools = default_tools()
    assert set(tools) == {"bash", "view", "write", "edit", "ls", "glob", "grep"}
    assert all(tools[name] is not TOOLS[name] for name in tools)
    for name, tool in tools.items():
        assert isinstance(tool, Tool)
        assert tool.name == name
        assert len(tool.description) > 40
        schema = tool.parameters
        assert schema["type"] == "object"
        assert schema["additionalProperties"] is False
        assert set(schema["required"]) <= set(schema["properties"])
    assert {n for n, t in tools.items() if t.mutating} == {"bash", "write", "edit"}


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("bash", {}, "missing required argument(s) command"),
        ("bash", {"command": 5}, "command must be a string"),
        ("bash", {"command": "true", "timeout": "1"}, "timeout must be a number"),
        ("bash", {"command": "true", "timeout": 0}, "timeout must be > 0"),
        ("bash", {"command": "  "}, "must not be empty"),
        ("view", {"path": "a", "offset": 1.5}, "offset must be an integer"),
        ("view", {"path": "a", "limit": 0}, "limit must be >= 1"),
        ("view", {"path": "a", "bogus": 1}, "unknown argument(s) bogus"),
        ("write", {"path": "a"}, "missing required argument(s) content"),
        (
            "edit",
            {"path": "a", "old_string": "x", "new_string": "y", "replace_all": "yes"},
            "boolean",
        ),
        ("ls", {"depth": True}, "depth must be an integer"),
        ("glob", {"pattern": None}, "missing required argument(s) pattern"),
        ("grep", {"pattern": "x", "include": 3}, "include must be a string"),
    ],
)
def test_bad_params_raise_tool_error(ctx, name, params, message):
    with pytest.raises(ToolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TOOLS[name].run(params, ctx)


def test_params_must_be_an_object(ctx):
    with pytest.raises(ToolError, match="JSON object"):
        TOOLS["view"].run(["a"], ctx)  # type: ignore[arg-type]


# -- paths ---------------------------------------------------------------------


def test_relative_paths_resolve_against_root(ctx, root):
    assert TOOLS["view"].paths({"path": "a/b.txt"}, ctx) == [root / "a" / "b.txt"]
    assert TOOLS["ls"].paths({}, ctx) == [root]
    assert TOOLS["grep"].paths({"pattern": "x", "path": "src"}, ctx) == [root / "src"]
    assert TOOLS["glob"].paths({"pattern": "src/**/*.py"}, ctx) == [root / "src"]
    assert is_inside(root / "a" / "b.txt", root)
    assert is_inside(root, root)
    assert TOOLS["bash"].paths({"command": "ls"}, ctx) == []


def test_paths_outside_root_are_reported(ctx, root, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("s")
    (root / "link").symlink_to(outside)
    (root / "dirlink").symlink_to(tmp_path)
    cases = {
        "../x": tmp_path / "x",
        "a/../../x": tmp_path / "x",
        "/etc/passwd": Path(os.path.realpath("/etc/passwd")),
        "link": outside,
        "dirlink/secret.txt": outside,
    }
    for raw, expected in cases.items():
        for name in ("view", "write", "edit"):
            params = {"path": raw, "content": "", "old_string": "", "new_string": ""}
            params = {k: v for k, v in params.items() if k in TOOLS[name].parameters["properties"]}
            [resolved] = TOOLS[name].paths(params, ctx)
            assert resolved == expected
            assert not is_inside(resolved, root)
    [found] = TOOLS["glob"].paths({"pattern": "../*.txt"}, ctx)
    assert not is_inside(found, root)
    [found] = TOOLS["grep"].paths({"pattern": "s", "path": "/etc"}, ctx)
    assert not is_inside(found, root)
    assert not is_inside(root.parent / "wsx", root)  # a sibling sharing the prefix


def test_resolve_rejects_empty_path(root):
    with pytest.raises(ToolError, match="empty"):
        resolve("", root)


def test_describe(ctx, root):
    ask = TOOLS["bash"].describe({"command": "ls -la\necho done"}, ctx)
    assert ask == PermissionAsk(action="run: ls -la …", path=str(root))
    long = TOOLS["bash"].describe({"command": "echo " + "x" * 200}, ctx)
    assert long.action.startswith("run: echo xxx") and len(long.action) <= 90
    assert TOOLS["write"].describe({"path": "f", "content": ""}, ctx) == PermissionAsk(
        action="write file", path=str(root / "f")
    )
    edit = TOOLS["edit"].describe({"path": "f", "old_string": "", "new_string": ""}, ctx)
    assert edit.action == "edit file"


# -- bash ----------------------------------------------------------------------


def test_bash_output_and_cwd(ctx, root):
    result = call("bash", ctx, command="pwd; echo out; echo err >&2")
    assert not result.is_error
    assert result.content.splitlines() == [str(root), "out", "err"]


def test_bash_no_output(ctx):
    assert call("bash", ctx, command="true") == ToolResult("(no output)")


def test_bash_exit_code(ctx):
    result = call("bash", ctx, command="echo partial; exit 3")
    assert result.is_error
    assert "partial" in result.content
    assert "exit code 3" in result.content


def test_bash_timeout_kills_the_group(ctx, root):
    started = time.monotonic()
    result = call("bash", ctx, command=TRACKED + "echo started; sleep 30", timeout=0.5)
    assert time.monotonic() - started < 3
    assert result.is_error
    assert "timed out after 0.5 s" in result.content
    assert "started" in result.content
    assert_group_gone(root)


def test_bash_default_timeout_comes_from_context(root):
    ctx = ToolContext(root=root, token=CancelToken(), bash_timeout=0.3)
    result = call("bash", ctx, command="sleep 30")
    assert result.is_error and "timed out after 0.3 s" in result.content


def test_bash_cancel_kills_the_group(ctx, root):
    timer = threading.Timer(0.5, ctx.token.cancel, kwargs={"reason": "user"})
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(Cancelled) as info:
            call("bash", ctx, command=TRACKED + "sleep 30")
        elapsed = time.monotonic() - started
    finally:
        timer.cancel()
        timer.join()
    assert elapsed < 2
    assert info.value.reason == "user"
    assert_group_gone(root)
    assert not ctx.token._callbacks  # the kill callback was removed


def test_bash_escalates_to_sigkill(ctx, root, caplog):
    caplog.set_level(logging.INFO, logger="crushd.procgroup")
    stubborn = "echo $$ > shell.pid; (trap '' TERM; exec sleep 300) & echo $! > bg.pid; sleep 30"
    started = time.monotonic()
    # Time enough for the sandboxed shell to set its trap on a loaded
    # machine: a TERM that came first would end it with no SIGKILL needed.
    result = call("bash", ctx, command=stubborn, timeout=1.5)
    elapsed = time.monotonic() - started
    assert result.is_error and "timed out" in result.content
    assert 1.5 + KILL_GRACE <= elapsed < 1.5 + KILL_GRACE + 2
    assert_group_gone(root)
    pgid = read_pid(root / "shell.pid")
    assert f"event=tool_killed pgid={pgid} signal=SIGKILL" in caplog.text


def test_bash_cancelled_before_start(ctx, root):
    ctx.token.cancel()
    with pytest.raises(Cancelled):
        call("bash", ctx, command="touch ran")
    assert not (root / "ran").exists()


def test_bash_background_child_does_not_hold_the_call(ctx, root):
    started = time.monotonic()
    result = call("bash", ctx, command=TRACKED + "echo done")
    assert time.monotonic() - started < 3
    assert result == ToolResult("done")
    assert_group_gone(root)


def test_bash_output_is_truncated_and_bounded(root):
    ctx = ToolContext(root=root, token=CancelToken(), max_output=1000)
    result = call("bash", ctx, command="seq 1 200000")
    assert not result.is_error
    assert result.content.startswith("1\n2\n3\n")
    assert result.content.endswith("199999\n200000")
    assert "[output truncated: " in result.content and " more bytes]" in result.content
    assert len(result.content) < 1100


def test_bash_large_output_does_not_deadlock(ctx):
    result = call("bash", ctx, command="head -c 5000000 /dev/zero | tr '\\0' a; echo; exit 1")
    assert result.is_error and "exit code 1" in result.content
    assert len(result.content) < ctx.max_output + 200


# -- view ----------------------------------------------------------------------


def test_view_numbers_lines(ctx, root):
    (root / "f.txt").write_text("alpha\nbeta\r\n\ngamma")
    result = call("view", ctx, path="f.txt")
    assert result.content == "     1\talpha\n     2\tbeta\n     3\t\n     4\tgamma"


def test_view_offset_and_limit(ctx, root):
    (root / "f.txt").write_text("".join(f"line {i}\n" for i in range(1, 11)))
    result = call("view", ctx, path="f.txt", offset=2, limit=3)
    lines = result.content.splitlines()
    assert lines[:3] == ["     3\tline 3", "     4\tline 4", "     5\tline 5"]
    assert "offset=5" in lines[3]
    tail = call("view", ctx, path="f.txt", offset=8)
    assert tail.content == "     9\tline 9\n    10\tline 10"
    past = call("view", ctx, path="f.txt", offset=50)
    assert "past the end" in past.content and "10 lines" in past.content


def test_view_default_limit_and_long_lines(ctx, root):
    (root / "big.txt").write_text("x\n" * 2500)
    result = call("view", ctx, path="big.txt")
    assert "  2000\tx" in result.content and "  2001\t" not in result.content
    assert "offset=2000" in result.content
    (root / "wide.txt").write_text("y" * 5000 + "\n")
    wide = call("view", ctx, path="wide.txt").content
    assert wide.startswith("     1\t" + "y" * 2000 + " [line truncated: 3000 more")


def test_view_output_bounded(root):
    ctx = ToolContext(root=root, token=CancelToken(), max_output=200)
    (root / "f.txt").write_text("some text here\n" * 100)
    content = call("view", ctx, path="f.txt").content
    assert "output truncated at line" in content
    assert len(content) < 400


def test_view_errors(ctx, root):
    (root / "bin").write_bytes(b"abc\0def")
    (root / "d").mkdir()
    (root / "empty").write_text("")
    with pytest.raises(ToolError, match="binary file"):
        call("view", ctx, path="bin")
    with pytest.raises(ToolError, match="file not found: missing.txt"):
        call("view", ctx, path="missing.txt")
    with pytest.raises(ToolError, match="directory; use the ls tool"):
        call("view", ctx, path="d")
    assert call("view", ctx, path="empty").content == "(empty file)"
    os.mkfifo(root / "fifo")
    with pytest.raises(ToolError, match="not a regular file"):
        call("view", ctx, path="fifo")
    with pytest.raises(ToolError, match="not a regular file"):
        call("grep", ctx, pattern="x", path="fifo")


# -- write and edit ------------------------------------------------------------


def test_write_creates_parents(ctx, root):
    result = call("write", ctx, path="a/b/c.txt", content="héllo\n")
    assert result == ToolResult("wrote 7 bytes to a/b/c.txt")
    assert (root / "a/b/c.txt").read_bytes() == "héllo\n".encode()
    call("write", ctx, path="a/b/c.txt", content="new")
    assert (root / "a/b/c.txt").read_text() == "new"
    with pytest.raises(ToolError, match="is a directory"):
        call("write", ctx, path="a", content="x")


def test_edit_replaces_once(ctx, root):
    f = root / "f.py"
    f.write_text("def f():\n    return 1\n")
    result = call("edit", ctx, path="f.py", old_string="return 1", new_string="return 2")
    assert not result.is_error and "replaced 1 occurrence" in result.content
    assert f.read_text() == "def f():\n    return 2\n"


def test_edit_not_found_and_ambiguous(ctx, root):
    f = root / "f.txt"
    f.write_text("a b a c a")
    with pytest.raises(ToolError, match="old_string not found in f.txt"):
        call("edit", ctx, path="f.txt", old_string="zzz", new_string="y")
    with pytest.raises(ToolError, match="occurs 3 times"):
        call("edit", ctx, path="f.txt", old_string="a", new_string="y")
    assert f.read_text() == "a b a c a"
    result = call("edit", ctx, path="f.txt", old_string="a", new_string="y", replace_all=True)
    assert "replaced 3 occurrences" in result.content
    assert f.read_text() == "y b y c y"
    with pytest.raises(ToolError, match="file not found"):
        call("edit", ctx, path="nope.txt", old_string="a", new_string="b")
    with pytest.raises(ToolError, match="identical"):
        call("edit", ctx, path="f.txt", old_string="b", new_string="b")


def test_edit_empty_old_string_creates(ctx, root):
    result = call("edit", ctx, path="new/file.txt", old_string="", new_string="hi\n")
    assert "created new/file.txt" in result.content
    assert (root / "new/file.txt").read_text() == "hi\n"
    with pytest.raises(ToolError, match="already exists"):
        call("edit", ctx, path="new/file.txt", old_string="", new_string="other")


def test_edit_keeps_crlf(ctx, root):
    f = root / "win.txt"
    f.write_bytes(b"one\r\ntwo\r\nthree\r\n")
    call("edit", ctx, path="win.txt", old_string="one\ntwo", new_string="1\n2")
    assert f.read_bytes() == b"1\r\n2\r\nthree\r\n"


# -- ls ------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "deep.py").write_text("deep = 1\n")
    (root / "src" / "main.py").write_text("import os\nprint('hello')\n")
    (root / "README.md").write_text("# hello\n")
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "config").write_text("hello\n")
    (root / "blob.bin").write_bytes(b"hello\0world")


def test_ls_tree(ctx, root):
    make_tree(root)
    assert call("ls", ctx).content.splitlines() == [
        "./",
        "  src/",
        "    pkg/",
        "    main.py",
        "  README.md",
        "  blob.bin",
    ]
    assert call("ls", ctx, path="src", depth=3).content.splitlines() == [
        "src/",
        "  pkg/",
        "    deep.py",
        "  main.py",
    ]
    assert call("ls", ctx, depth=1).content.splitlines()[1] == "  src/"
    (root / "out").symlink_to("/etc")
    assert "  out -> /etc" in call("ls", ctx).content.splitlines()
    with pytest.raises(ToolError, match="no such file or directory"):
        call("ls", ctx, path="missing")


def test_ls_is_bounded(ctx, root, monkeypatch):
    monkeypatch.setattr(search_module, "LS_MAX_ENTRIES", 5)
    for i in range(20):
        (root / f"f{i:02d}").write_text("")
    lines = call("ls", ctx).content.splitlines()
    assert len(lines) == 7  # header, five entries, the note
    assert lines[-1].startswith("[listing truncated at 5 entries")


# -- glob ----------------------------------------------------------------------


def test_glob_patterns_and_mtime_order(ctx, root):
    make_tree(root)
    now = time.time()
    os.utime(root / "src" / "main.py", (now - 100, now - 100))
    os.utime(root / "src" / "pkg" / "deep.py", (now, now))
    assert call("glob", ctx, pattern="**/*.py").content.splitlines() == [
        "src/pkg/deep.py",
        "src/main.py",
    ]
    assert call("glob", ctx, pattern="*.py").content == "no files found"
    assert call("glob", ctx, pattern="*.py", path="src").content == "src/main.py"
    assert call("glob", ctx, pattern="src/*.py").content == "src/main.py"
    braces = call("glob", ctx, pattern="**/*.{md,bin}").content.splitlines()
    assert sorted(braces) == ["README.md", "blob.bin"]
    assert call("glob", ctx, pattern="**/config").content == "no files found"  # .git skipped


def test_glob_is_bounded(ctx, root, monkeypatch):
    monkeypatch.setattr(search_module, "GLOB_MAX_RESULTS", 3)
    for i in range(10):
        (root / f"f{i}.txt").write_text("")
    lines = call("glob", ctx, pattern="*.txt").content.splitlines()
    assert len(lines) == 4
    assert lines[-1].startswith("[7 more matching files not shown")


# -- grep ----------------------------------------------------------------------


def test_grep(ctx, root):
    make_tree(root)
    result = call("grep", ctx, pattern="hel+o")
    assert result.content.splitlines() == ["README.md:1: # hello", "src/main.py:2: print('hello')"]
    only_py = call("grep", ctx, pattern=r"^\w+ = 1|hello", include="*.py")
    assert only_py.content.splitlines() == [
        "src/main.py:2: print('hello')",
        "src/pkg/deep.py:1: deep = 1",
    ]
    single = call("grep", ctx, pattern="import", path="src/main.py")
    assert single.content == "src/main.py:1: import os"
    assert call("grep", ctx, pattern="nothing here").content == "no matches found"
    with pytest.raises(ToolError, match="invalid regular expression"):
        call("grep", ctx, pattern="(unclosed")


def test_grep_is_bounded(ctx, root, monkeypatch):
    monkeypatch.setattr(search_module, "GREP_MAX_MATCHES", 4)
    (root / "many.txt").write_text("match\n" * 50)
    lines = call("grep", ctx, pattern="match").content.splitlines()
    assert lines[:4] == [f"many.txt:{i}: match" for i in range(1, 5)]
    assert lines[4].startswith("[stopped after 4 matching lines")


def test_grep_does_not_follow_symlinks_out(ctx, root, tmp_path):
    (tmp_path / "secret.txt").write_text("password\n")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    assert call("grep", ctx, pattern="password").content == "no matches found"


def test_read_only_tools_honour_cancel(ctx, root):
    make_tree(root)
    ctx.token.cancel()
    for name, params in [("ls", {}), ("glob", {"pattern": "**/*"}), ("grep", {"pattern": "x"})]:
        with pytest.raises(Cancelled):
            TOOLS[name].run(params, ctx)


def test_walk_output_is_truncated(root):
    ctx = ToolContext(root=root, token=CancelToken(), max_output=100)
    for i in range(30):
        (root / f"file-with-a-long-name-{i:02d}.txt").write_text("needle\n")
    for name, params in [
        ("ls", {}),
        ("glob", {"pattern": "*.txt"}),
        ("grep", {"pattern": "needle"}),
    ]:
        content = TOOLS[name].run(params, ctx).content
        assert "[output truncated: " in content and "more characters]" in content
        assert len(content) < 200
