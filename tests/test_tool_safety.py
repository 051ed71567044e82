"""The file tools' safety promises: the hidden list, and no symbolic link
followed between the permission check and the open.

The race tests play the run loop's part (``paths()``, refuse what lies
outside as an unanswered permission would, then ``run()`` with the same
arguments object) against a thread that swaps ``<ws>/d`` between a real
directory and a link out of the workspace with ``renameat2(RENAME_EXCHANGE)``,
so ``d`` always exists as one or the other.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from crushd.cancel import CancelToken
from crushd.tools import ToolContext, ToolError, ToolResult, default_tools, safeopen
from crushd.tools.paths import is_inside

SECRET = "SECRET-TOKEN-3f9a"
OUTSIDE = "OUTSIDE-TEXT-77c1"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return Path(os.path.realpath(ws))


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


def tool_call(ctx: ToolContext, name: str, **params) -> ToolResult:
    """Call a tool as the run loop does, failing the test on a permission ask
    (every path here lies inside the workspace)."""
    tool = default_tools()[name]
    assert all(is_inside(p, ctx.root) for p in tool.paths(params, ctx))
    return tool.run(params, ctx)


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
    assert tools["write"].paths(write, ctx) == [root / "d" / "f"]  # what the run loop checks
    assert tools["view"].paths(view, ctx) == [root / "d" / "secret"]
    (root / "d").rename(root / "d.real")
    (root / "d").symlink_to(outside)
    with pytest.raises(ToolError) as info:
        tools["write"].run(write, ctx)
    assert str(info.value) == (
        "write: d/f changed while it was being opened (a symbolic link appeared); "
        "nothing was written"
    )
    with pytest.raises(ToolError, match="symbolic link appeared"):
        tools["view"].run(view, ctx)
    # A link put in place of the file itself is not followed either.
    (root / "d").unlink()
    (root / "d.real").rename(root / "d")
    leaf = {"path": "d/leaf", "content": "x"}
    tools["write"].paths(leaf, ctx)
    (root / "d" / "leaf").symlink_to(outside / "secret")
    with pytest.raises(ToolError, match="symbolic link appeared"):
        tools["write"].run(leaf, ctx)
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
    """Call ``name`` ``count`` times as the run loop would: a call whose
    checked path lies outside is not run (the user said no).  Yields each
    result, or the refusal's message."""
    tool = default_tools()[name]
    for _ in range(count):
        call = dict(params)
        try:
            if not all(is_inside(p, ctx.root) for p in tool.paths(call, ctx)):
                yield "outside: denied"
                continue
            yield tool.run(call, ctx)
        except ToolError as exc:
            yield str(exc)


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
    with Flipper(root, outside):
        for _ in range(150):
            listing = tools["ls"].run({"depth": 4}, ctx).content.splitlines()
            assert not {"deep/", "more"} & {line.strip() for line in listing}
            globbed = tools["glob"].run({"pattern": "**/*"}, ctx).content.splitlines()
            assert set(globbed) <= {"d/secret", "d.link/secret", "no files found"}
            found = tools["grep"].run({"pattern": "TEXT|inside"}, ctx).content
            assert OUTSIDE not in found
    (outside / "deep" / "more").unlink()
    (outside / "deep").rmdir()
    assert outside_untouched(outside)
