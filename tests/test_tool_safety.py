"""The file tools' safety promises: the hidden list, no symbolic link followed
between the permission check and the open, and grep matching in a child
process with a deadline and prompt cancel.

The race tests call the tools through the run loop's own code
(:class:`crushd.toolcalls.ToolCalls`: the paths resolved once, checked,
refused as an unanswered permission would refuse them when they lie
outside, then handed to ``run()``) against a thread that swaps ``<ws>/d``
between a real directory and a link out of the workspace with
``renameat2(RENAME_EXCHANGE)``, so ``d`` always exists as one or the other.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from fakeprovider import ToolCall
from helpers import api, descendants, messages, parts, processes_with, register, submit
from helpers import wait_terminal as wait_run

from crushd.cancel import Cancelled, CancelToken
from crushd.toolcalls import StepCalls, ToolCalls, call_context
from crushd.tools import ToolContext, ToolError, ToolResult, default_tools, grepchild, safeopen
from crushd.tools import search as search_module

SECRET = "SECRET-TOKEN-3f9a"
OUTSIDE = "OUTSIDE-TEXT-77c1"
SLOW_PATTERN = "(a+)+$"
SLOW_LINE = "a" * 34 + "!\n"
CHILD_MARKER = "crushd.tools.grepchild"


@pytest.fixture
def hidden_ws(root: Path) -> ToolContext:
    """A workspace holding crushd's token at ``conf/token`` and a hidden
    directory ``private/``, both on the context's hidden list."""
    (root / "conf").mkdir()
    (root / "conf" / "token").write_text(SECRET + "\n")
    (root / "conf" / "settings.txt").write_text("colour = blue\n")
    (root / "private" / "deep").mkdir(parents=True)
    (root / "private" / "notes.txt").write_text(SECRET + " in notes\n")
    (root / "private" / "deep" / "more.txt").write_text(SECRET + " deeper\n")
    (root / "readme.txt").write_text("nothing secret\n")
    (root / "token-link").symlink_to(root / "conf" / "token")
    hidden = (str(root / "conf" / "token"), str(root / "private"))
    return ToolContext(root=root, token=CancelToken(name="test"), hidden=hidden)


class Refuse:
    """The permission broker of :func:`run_loop`: a call that has to ask is
    refused (as an unanswered request is), or fails the test."""

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed

    def is_allowed(self, session_id: str, tool: str) -> bool:
        return False

    def request(self, **ask) -> str:
        assert self.allowed, f"the run loop asked permission: {ask}"
        return "deny"


def run_loop(ctx: ToolContext, name: str, params: dict, deny: bool) -> tuple[bool, ToolResult]:
    """One call through the run loop's code (yolo, so only a path outside
    the workspace asks): whether it was denied, and its result."""
    calls = ToolCalls(
        default_tools(),
        ctx,
        session_id="s",
        run_id="r",
        yolo=True,
        allowed_tools=frozenset(),
        permissions=Refuse(deny),
        store=None,
        hub=None,
        model_ids=(None, None),
    )
    step = StepCalls([{"id": "c1", "name": name, "input": json.dumps(params)}])
    denied = calls.run(step)
    result = step.results["c1"]
    return denied is not None, ToolResult(result["content"], result["is_error"])


def tool_call(ctx: ToolContext, name: str, **params) -> ToolResult:
    """Call a tool as the run loop does, failing the test on a permission ask
    (every path here lies inside the workspace); a tool error is raised."""
    _, result = run_loop(ctx, name, params, deny=False)
    if result.is_error:
        raise ToolError(result.content)
    return result


def refused(ctx: ToolContext, name: str, **params) -> str:
    with pytest.raises(ToolError) as info:
        tool_call(ctx, name, **params)
    message = str(info.value)
    assert SECRET not in message
    return message


# -- the hidden list -----------------------------------------------------------


def test_file_tools_refuse_hidden_paths(hidden_ws: ToolContext):
    root = hidden_ws.root
    message = refused(hidden_ws, "view", path="conf/token")
    assert message == "view: conf/token is hidden from the agent (crushd keeps it secret)"
    assert "hidden from the agent" in refused(hidden_ws, "view", path="token-link")
    assert "hidden from the agent" in refused(hidden_ws, "view", path=str(root / "conf/token"))
    assert "hidden from the agent" in refused(hidden_ws, "view", path="private/notes.txt")
    assert "hidden from the agent" in refused(
        hidden_ws, "edit", path="conf/token", old_string=SECRET, new_string="x"
    )
    assert "hidden from the agent" in refused(
        hidden_ws, "edit", path="private/new.txt", old_string="", new_string="x"
    )
    assert "hidden from the agent" in refused(hidden_ws, "write", path="conf/token", content="x")
    assert "hidden from the agent" in refused(
        hidden_ws, "write", path="private/deep/new/file.txt", content="x"
    )
    assert "hidden from the agent" in refused(hidden_ws, "ls", path="private")
    assert "hidden from the agent" in refused(hidden_ws, "glob", pattern="*", path="private")
    assert "hidden from the agent" in refused(hidden_ws, "grep", pattern="S", path="conf/token")
    assert "hidden from the agent" in refused(hidden_ws, "grep", pattern="S", path="private")
    assert (root / "conf" / "token").read_text() == SECRET + "\n"
    assert sorted(p.name for p in (root / "private").iterdir()) == ["deep", "notes.txt"]
    assert not (root / "private" / "deep" / "new").exists()
    # What is not hidden still works beside it.
    assert "colour = blue" in tool_call(hidden_ws, "view", path="conf/settings.txt").content


def test_walking_tools_skip_hidden_entries(hidden_ws: ToolContext):
    listing = tool_call(hidden_ws, "ls", depth=5).content
    assert listing.splitlines() == [
        "./",
        "  conf/",
        "    settings.txt",
        "  readme.txt",
        f"  token-link -> {hidden_ws.root / 'conf' / 'token'}",
    ]
    assert tool_call(hidden_ws, "ls", path="conf").content.splitlines() == [
        "conf/",
        "  settings.txt",
    ]
    found = tool_call(hidden_ws, "glob", pattern="**/*").content.splitlines()
    assert sorted(found) == ["conf/settings.txt", "readme.txt", "token-link"]
    assert tool_call(hidden_ws, "glob", pattern="conf/*").content == "conf/settings.txt"
    assert "hidden from the agent" in refused(hidden_ws, "glob", pattern="private/**/*")
    for params in ({}, {"include": "token"}, {"include": "*.txt"}, {"path": "conf"}):
        result = tool_call(hidden_ws, "grep", pattern="SECRET|secret", **params)
        assert SECRET not in result.content
    whole = tool_call(hidden_ws, "grep", pattern="secret|blue").content.splitlines()
    assert whole == ["readme.txt:1: nothing secret", "conf/settings.txt:1: colour = blue"]


# -- symbolic links appearing after the check ------------------------------------


@pytest.fixture(params=["openat2", "walk"])
def open_mode(request, monkeypatch) -> str:
    """Each test runs with openat2 and with the component-by-component walk."""
    if request.param == "walk":

        def unused(*args):
            raise AssertionError("openat2 called with the walk forced")

        monkeypatch.setattr(safeopen, "USE_OPENAT2", False)
        monkeypatch.setattr(safeopen, "_openat2", unused)
    else:
        assert safeopen.openat2_supported(), "this kernel has openat2; the test relies on it"
    return request.param


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret").write_text(OUTSIDE + "\n")
    return Path(os.path.realpath(out))


def outside_untouched(outside: Path) -> bool:
    entries = sorted(p.name for p in outside.iterdir())
    return entries == ["secret"] and (outside / "secret").read_text() == OUTSIDE + "\n"


def test_a_link_swapped_in_after_the_check_is_refused(open_mode, root, outside):
    ctx = ToolContext(root=root, token=CancelToken())
    tools = default_tools()
    (root / "d").mkdir()
    (root / "d" / "secret").write_text("inside\n")
    write = {"path": "d/f", "content": "x"}
    view = {"path": "d/secret"}
    # What the run loop checks, and hands to run().
    write_ctx, view_ctx = (
        call_context(tools["write"], write, ctx),
        call_context(tools["view"], view, ctx),
    )
    assert list(write_ctx.paths) == [root / "d" / "f"]
    assert list(view_ctx.paths) == [root / "d" / "secret"]
    (root / "d").rename(root / "d.real")
    (root / "d").symlink_to(outside)
    with pytest.raises(ToolError) as info:
        tools["write"].run(write, write_ctx)
    assert str(info.value) == (
        "write: d/f changed while it was being opened (a symbolic link appeared); "
        "nothing was written"
    )
    with pytest.raises(ToolError, match="symbolic link appeared"):
        tools["view"].run(view, view_ctx)
    # A link put in place of the file itself is not followed either.
    (root / "d").unlink()
    (root / "d.real").rename(root / "d")
    leaf = {"path": "d/leaf", "content": "x"}
    leaf_ctx = call_context(tools["write"], leaf, ctx)
    (root / "d" / "leaf").symlink_to(outside / "secret")
    with pytest.raises(ToolError, match="symbolic link appeared"):
        tools["write"].run(leaf, leaf_ctx)
    assert outside_untouched(outside)


def test_the_opened_descriptor_is_checked(root, monkeypatch):
    """What the kernel says was opened must be the path asked for, and not
    hidden: a rename on the way (or a bind mount) cannot bring another file in."""
    ctx = ToolContext(root=root, token=CancelToken(), hidden=(str(root / "conf"),))
    (root / "notes.txt").write_text("keep me\n")
    monkeypatch.setattr(safeopen, "fd_path", lambda fd: str(root / "elsewhere.txt"))
    with pytest.raises(ToolError) as info:
        tool_call(ctx, "write", path="notes.txt", content="new")
    assert str(info.value) == (
        "write: notes.txt changed while it was being opened (it was moved or replaced); "
        "nothing was written"
    )
    assert (root / "notes.txt").read_text() == "keep me\n"  # not emptied either
    with pytest.raises(ToolError, match="view: notes.txt changed .* nothing was read"):
        tool_call(ctx, "view", path="notes.txt")
    monkeypatch.setattr(safeopen, "fd_path", lambda fd: str(root / "conf" / "token"))
    with pytest.raises(ToolError, match="view: notes.txt is hidden from the agent"):
        tool_call(ctx, "view", path="notes.txt")
    with pytest.raises(ToolError, match="ls: . is hidden from the agent"):
        tool_call(ctx, "ls")


_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """Swap two names atomically: renameat2(RENAME_EXCHANGE)."""
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2 failed")


class Flipper:
    """Swaps ``<root>/d`` (a real directory) with ``<root>/d.link`` (a link
    to ``outside``) as fast as it can, on a thread, until stopped."""

    def __init__(self, root: Path, outside: Path) -> None:
        (root / "d").mkdir()
        (root / "d" / "secret").write_text("inside\n")
        (root / "d.link").symlink_to(outside)
        self.a, self.b = root / "d", root / "d.link"
        self.flips = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-flipper")

    def _run(self) -> None:
        while not self._stop.is_set():
            exchange(self.a, self.b)
            self.flips += 1

    def __enter__(self) -> Flipper:
        # Hand the GIL over often, so flips land between the tool's steps.
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._interval)


def race(ctx: ToolContext, name: str, params: dict, count: int) -> Iterator[ToolResult | str]:
    """Call ``name`` ``count`` times through the run loop: a call whose
    checked path lies outside is not run (the user said no).  Yields each
    result, or the refusal's message."""
    for _ in range(count):
        denied, result = run_loop(ctx, name, params, deny=True)
        if denied:
            yield "outside: denied"
        elif result.is_error:
            yield result.content
        else:
            yield result


@pytest.mark.parametrize("name", ["write", "view"])
def test_flipping_a_directory_to_a_link_never_reaches_outside(open_mode, name, root, outside):
    ctx = ToolContext(root=root, token=CancelToken())
    count = 1000 if open_mode == "openat2" else 300
    params = {"path": "d/f", "content": "written"} if name == "write" else {"path": "d/secret"}
    outcomes: dict[str, int] = {}
    with Flipper(root, outside) as flipper:
        for result in race(ctx, name, params, count):
            if isinstance(result, ToolResult):
                assert not result.is_error
                assert OUTSIDE not in result.content
                kind = "ok"
            else:
                assert OUTSIDE not in result
                assert result == "outside: denied" or re.search(
                    "changed while it was being opened|kept changing while it was being resolved",
                    result,
                )
                kind = "denied" if result == "outside: denied" else "refused"
            outcomes[kind] = outcomes.get(kind, 0) + 1
            assert outside_untouched(outside)
    assert flipper.flips > 0
    assert outcomes.get("ok", 0) > 0, outcomes
    assert sum(outcomes.values()) == count
    if name == "write":
        assert "written" in {
            (root / d / "f").read_text() for d in ("d", "d.link") if (root / d / "f").exists()
        }


def test_walks_are_not_redirected_by_a_flipping_directory(open_mode, root, outside):
    ctx = ToolContext(root=root, token=CancelToken())
    (outside / "deep").mkdir()
    (outside / "deep" / "more").write_text(OUTSIDE + "\n")
    tools = default_tools()
    job = grepchild.Job("TEXT|inside", str(root), str(root), [], None, 200, 500)
    with Flipper(root, outside):
        for _ in range(150):
            listing = tools["ls"].run({"depth": 4}, ctx).content.splitlines()
            assert not {"deep/", "more"} & {line.strip() for line in listing}
            globbed = tools["glob"].run({"pattern": "**/*"}, ctx).content.splitlines()
            assert set(globbed) <= {"d/secret", "d.link/secret", "no files found"}
            found: list[str] = []
            grepchild.search(job, found.append)  # what grep's child runs
            assert all(OUTSIDE not in line for line in found)
    (outside / "deep" / "more").unlink()
    (outside / "deep").rmdir()
    assert outside_untouched(outside)


# -- grep in a child process ------------------------------------------------------


def grep_children() -> list[int]:
    """Live grep children of this test process (not other test runs')."""
    mine = descendants(os.getpid())
    return [pid for pid in processes_with(CHILD_MARKER) if pid in mine]


def gone(pid: int) -> bool:
    """Neither running nor a zombie: killed and reaped."""
    return not os.path.exists(f"/proc/{pid}")


def test_grep_deadline_stops_a_slow_pattern(root, monkeypatch):
    monkeypatch.setattr(search_module, "GREP_TIMEOUT", 1.0)
    (root / "a.txt").write_text("aaaa\n")
    (root / "b.txt").write_text(SLOW_LINE)
    ctx = ToolContext(root=root, token=CancelToken())
    started = time.monotonic()
    result = default_tools()["grep"].run({"pattern": SLOW_PATTERN}, ctx)
    elapsed = time.monotonic() - started
    assert result.is_error
    assert result.content.splitlines() == [
        "grep: stopped after 1 s (the pattern may be too slow: nested repetition such as "
        "(a+)+ can take exponential time on a line that almost matches; simplify the "
        "pattern, or narrow path or include); the matching lines found before it stopped:",
        "a.txt:1: aaaa",
    ]
    assert 1.0 <= elapsed < 4.0
    assert grep_children() == []


def test_grep_cancel_kills_the_child_at_once(root):
    (root / "b.txt").write_text(SLOW_LINE)
    ctx = ToolContext(root=root, token=CancelToken())
    children: list[int] = []
    cancelled_at: list[float] = []

    def cancel_once_started() -> None:
        children.extend(wait_for(grep_children, 10, message="grep's child never started"))
        with open(f"/proc/{children[0]}/environ", "rb") as f:
            environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if item)
        assert set(environ) == {b"PATH", b"LANG", b"LC_ALL"}
        cancelled_at.append(time.monotonic())
        ctx.token.cancel("user")

    canceller = threading.Thread(target=cancel_once_started, name="test-canceller")
    canceller.start()
    try:
        with pytest.raises(Cancelled) as info:
            default_tools()["grep"].run({"pattern": SLOW_PATTERN}, ctx)
        returned_at = time.monotonic()
    finally:
        canceller.join()
    assert cancelled_at, "the canceller failed; see its exception above"
    assert info.value.reason == "user"
    assert returned_at - cancelled_at[0] < 1.0
    assert all(gone(pid) for pid in children)


def test_grep_invalid_pattern_comes_from_the_child(root):
    ctx = ToolContext(root=root, token=CancelToken())
    with pytest.raises(
        ToolError, match=re.escape("grep: invalid regular expression '(+': nothing to repeat")
    ):
        default_tools()["grep"].run({"pattern": "(+"}, ctx)
    with pytest.raises(ToolError, match="grep: invalid regular expression"):
        default_tools()["grep"].run({"pattern": "(" * 2000 + ")" * 2000}, ctx)
    with pytest.raises(ToolError, match="grep: no such file or directory: missing"):
        default_tools()["grep"].run({"pattern": "x", "path": "missing"}, ctx)
    assert grep_children() == []


def test_a_slow_grep_through_the_server_leaves_it_responsive(fake, agent, project):
    (project / "slow.txt").write_text(SLOW_LINE)
    fake.script([ToolCall("grep", {"pattern": SLOW_PATTERN, "path": "slow.txt"}, id="call_grep")])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = submit(http, wid, "search")
        children = wait_for(grep_children, 10, message="grep's child never started")
        for _ in range(3):
            started = time.monotonic()
            health = http.get("/v1/health", timeout=2.0)
            assert health.status_code == 200
            assert time.monotonic() - started < 2.0
        started = time.monotonic()
        assert http.post(f"/v1/workspaces/{wid}/runs/{run['id']}/cancel").status_code == 202
        done = wait_run(http, wid, run["id"], timeout=10)
        assert done["status"] == "cancelled"
        assert time.monotonic() - started < 3.0
        assert all(gone(pid) for pid in children)
        stored = messages(http, wid, run["session_id"])
        (result,) = parts(stored[2], "tool_result")
        assert result["tool_call_id"] == "call_grep" and result["is_error"] is True
