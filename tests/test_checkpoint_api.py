"""Checkpoints through a real server: runs whose real bash, write, edit and
MCP tool calls change real files, then diff, revert, unrevert and fork over
HTTP and the command line; what a revert refuses (a busy session, files
changed since, another session's later change); what is never recorded;
kill -9 in the middle of a revert; disk use and retention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from conftest import AGENT_KEY_ENV, make_config, wait_for
from fakeprovider import Text, ToolCall
from helpers import (
    PYTHON_DIRS,
    TEST_SERVER,
    api,
    decide,
    event_stream,
    is_type,
    messages,
    pending_permission,
    register,
    scrubbed_env,
    submit,
    wait_terminal,
)
from prometheus_client.parser import text_string_to_metric_families

from crushd.restore import JOURNAL, TEMP_PREFIX


def seed(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def files_of(root: Path) -> dict[str, str]:
    """Every file below ``root`` by relative path, with its text."""
    return {
        p.relative_to(root).as_posix(): p.read_text(errors="replace")
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def diff(http: httpx.Client, wid: str, rid: str, **params: str) -> httpx.Response:
    return http.get(f"/v1/workspaces/{wid}/runs/{rid}/diff", params=params)


def act(http: httpx.Client, wid: str, sid: str, action: str, **body) -> httpx.Response:
    return http.post(f"/v1/workspaces/{wid}/sessions/{sid}/{action}", json=body)


def ok(response: httpx.Response, status: int = 200) -> dict:
    assert response.status_code == status, response.text
    return response.json()


def refused(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return error


def run_to_end(http: httpx.Client, wid: str, text: str, **extra) -> dict:
    done = wait_terminal(http, wid, submit(http, wid, text, **extra)["id"])
    assert done["status"] == "completed", done
    return done


def git_dir(data_dir: Path, wid: str) -> Path:
    return data_dir / "workspaces" / wid / "checkpoints.git"


def disk_use(path: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


# -- the whole cycle ---------------------------------------------------------------


def test_bash_write_and_edit_changes_diff_revert_unrevert_and_fork(fake, agent, project):
    original = {"a.txt": "one\n", "gone.txt": "bye\n", "keep.txt": "keep\n"}
    seed(project, original)
    bash = "echo two >> a.txt && rm gone.txt && mkdir -p sub && echo new > sub/new.txt"
    fake.script([Text("Changing. "), ToolCall("bash", {"command": bash}, id="call_bash")])
    fake.script(
        [
            ToolCall("write", {"path": "w.txt", "content": "written\n"}, id="call_write"),
            ToolCall(
                "edit",
                {"path": "keep.txt", "old_string": "keep", "new_string": "kept"},
                id="call_edit",
            ),
        ]
    )
    fake.script([Text("done")])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        with event_stream(live.url, wid, since=0) as events:
            run = submit(http, wid, "change things")
            events.until(is_type("run.completed", id=run["id"]))
        sid, rid = run["session_id"], run["id"]
        changed = files_of(project)
        assert changed == {
            "a.txt": "one\ntwo\n",
            "keep.txt": "kept\n",
            "sub/new.txt": "new\n",
            "w.txt": "written\n",
        }

        # One run.diff per changing call, before that step's tool results.
        diffs = [e["payload"] for e in events.seen if e["type"] == "run.diff"]
        assert [
            (d["tool_call_id"], [(f["path"], f["status"]) for f in d["files"]]) for d in diffs
        ] == [
            (
                "call_bash",
                [("a.txt", "modified"), ("gone.txt", "deleted"), ("sub/new.txt", "added")],
            ),
            ("call_write", [("w.txt", "added")]),
            ("call_edit", [("keep.txt", "modified")]),
        ]
        kinds = [(e["type"], (e["payload"] or {}).get("role")) for e in events.seen]
        assert kinds.index(("run.diff", None)) < kinds.index(("message.created", "tool"))

        whole = diff(http, wid, rid)
        assert whole.status_code == 200 and whole.headers["content-type"].startswith("text/x-diff")
        for line in ("+two", "deleted file mode", "-bye", "+++ b/sub/new.txt", "-keep", "+kept"):
            assert line in whole.text, whole.text
        stat = ok(diff(http, wid, rid, stat="1"))
        assert stat["run_id"] == rid and stat["tool_call_id"] is None and stat["note"] == ""
        assert {f["path"]: (f["status"], f["added"], f["removed"]) for f in stat["files"]} == {
            "a.txt": ("modified", 1, 0),
            "gone.txt": ("deleted", 0, 1),
            "keep.txt": ("modified", 1, 1),
            "sub/new.txt": ("added", 1, 0),
            "w.txt": ("added", 1, 0),
        }
        one = diff(http, wid, rid, tool_call_id="call_write")
        assert "+written" in one.text and "a.txt" not in one.text
        refused(diff(http, wid, rid, tool_call_id="call_nope"), 404, "not_found")
        refused(diff(http, wid, "no-such-run"), 404, "not_found")

        # A dry run changes nothing and says what the revert would do.
        preview = ok(act(http, wid, sid, "revert", run_id=rid, dry_run=True))
        assert preview["state"] == "dry_run" and preview["id"] is None
        assert preview["files"] == ["a.txt", "gone.txt", "keep.txt", "sub/new.txt", "w.txt"]
        assert preview["restored"]["written"] == ["a.txt", "gone.txt", "keep.txt"]
        assert preview["restored"]["deleted"] == ["sub/new.txt", "w.txt"]
        assert files_of(project) == changed
        assert not any(m["reverted"] for m in messages(http, wid, sid))

        with event_stream(live.url, wid, since=0) as events:
            reverted = ok(act(http, wid, sid, "revert", run_id=rid))
            announced = events.until(is_type("session.reverted"))["payload"]
        assert announced["revert"]["id"] == reverted["id"] and reverted["state"] == "applied"
        assert files_of(project) == original  # sub/ stays, empty: directories are not removed
        stored = messages(http, wid, sid)
        assert reverted["messages"] == [m["id"] for m in stored]
        assert all(m["reverted"] for m in stored) and reverted["message_id"] == stored[0]["id"]

        # Reverted messages are kept but no longer sent to the model.
        fake.script([Text("fresh start")])
        run_to_end(http, wid, "again, differently", session_id=sid)
        sent = json.dumps(fake.requests[-1].body["messages"])
        assert "again, differently" in sent and "change things" not in sent
        assert "Changing." not in sent

        undone = ok(act(http, wid, sid, "unrevert"))
        assert undone["id"] == reverted["id"] and undone["state"] == "undone"
        assert undone["undone"]["written"] == ["a.txt", "keep.txt", "sub/new.txt", "w.txt"]
        assert undone["undone"]["deleted"] == ["gone.txt"]
        assert files_of(project) == changed
        assert not any(m["reverted"] for m in messages(http, wid, sid))
        refused(act(http, wid, sid, "unrevert"), 409, "nothing_to_revert")

        # A fork at the first prompt, files restored: the source session is untouched.
        first = messages(http, wid, sid)[0]
        forked = ok(act(http, wid, sid, "fork", message_id=first["id"], restore_files=True), 201)
        new_sid = forked["session"]["id"]
        copied = messages(http, wid, new_sid)
        assert [(m["role"], m["parts"]) for m in copied] == [("user", first["parts"])]
        assert copied[0]["id"] != first["id"] and forked["session"]["title"].endswith("(fork)")
        assert forked["revert"]["session_id"] == new_sid and forked["revert"]["messages"] == []
        assert files_of(project) == original
        assert not any(m["reverted"] for m in messages(http, wid, sid))
        ok(act(http, wid, new_sid, "unrevert"))
        assert files_of(project) == changed


def test_a_revert_point_may_be_a_message_and_what_it_refuses(fake, agent, project):
    fake.script([ToolCall("write", {"path": "a.txt", "content": "1\n"}, id="call_a")])
    fake.script([ToolCall("write", {"path": "b.txt", "content": "2\n"}, id="call_b")])
    fake.script([Text("both written")])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = run_to_end(http, wid, "write a and b")
        sid = run["session_id"]
        stored = messages(http, wid, sid)
        assert [m["role"] for m in stored] == [
            "user", "assistant", "tool", "assistant", "tool", "assistant"
        ]  # fmt: skip
        refused(act(http, wid, sid, "revert", message_id=stored[2]["id"]), 400, "invalid_request")
        refused(act(http, wid, sid, "revert"), 400, "invalid_request")
        both = {"run_id": run["id"], "message_id": stored[0]["id"]}
        refused(act(http, wid, sid, "revert", **both), 400, "invalid_request")
        refused(act(http, wid, "no-such-session", "revert", run_id=run["id"]), 404, "not_found")
        refused(act(http, wid, sid, "revert", run_id="no-such-run"), 404, "not_found")

        # Back to before the second step: only its file goes, only its messages.
        reverted = ok(act(http, wid, sid, "revert", message_id=stored[3]["id"]))
        assert reverted["files"] == ["b.txt"] and reverted["restored"]["deleted"] == ["b.txt"]
        assert files_of(project) == {"a.txt": "1\n"}
        assert [m["reverted"] for m in messages(http, wid, sid)] == [False] * 3 + [True] * 3
        again = act(http, wid, sid, "revert", message_id=stored[3]["id"])
        refused(again, 409, "nothing_to_revert")
        # A fork at an assistant message with calls copies their results too.
        forked = ok(act(http, wid, sid, "fork", message_id=stored[1]["id"]), 201)
        assert forked["revert"] is None
        copied = messages(http, wid, forked["session"]["id"])
        assert [m["role"] for m in copied] == ["user", "assistant", "tool"]


# -- what a revert refuses -----------------------------------------------------------


def test_a_file_changed_since_is_refused_with_its_name_unless_forced(fake, agent, project):
    seed(project, {"a.txt": "one\n", "b.txt": "b\n"})
    fake.script(
        [
            ToolCall("write", {"path": "a.txt", "content": "by the model\n"}, id="call_a"),
            ToolCall("bash", {"command": "echo more >> b.txt"}, id="call_b"),
        ]
    )
    fake.script([Text("changed")])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = run_to_end(http, wid, "change a and b")
        sid = run["session_id"]
        (project / "a.txt").write_text("by hand\n")  # no snapshot saw this
        error = refused(act(http, wid, sid, "revert", run_id=run["id"]), 409, "workspace_changed")
        assert error["files"] == ["a.txt"] and "a.txt" in error["message"]
        assert files_of(project) == {"a.txt": "by hand\n", "b.txt": "b\nmore\n"}
        assert not any(m["reverted"] for m in messages(http, wid, sid))

        preview = ok(act(http, wid, sid, "revert", run_id=run["id"], dry_run=True, force=True))
        assert preview["restored"]["overridden"] == ["a.txt"]
        assert files_of(project) == {"a.txt": "by hand\n", "b.txt": "b\nmore\n"}
        forced = ok(act(http, wid, sid, "revert", run_id=run["id"], force=True))
        assert forced["restored"]["overridden"] == ["a.txt"]
        assert files_of(project) == {"a.txt": "one\n", "b.txt": "b\n"}
        # The revert was checkpointed first: undoing it brings the hand edit back.
        ok(act(http, wid, sid, "unrevert"))
        assert files_of(project) == {"a.txt": "by hand\n", "b.txt": "b\nmore\n"}


def test_a_later_run_of_another_session_on_the_same_file_is_refused(fake, agent, project):
    seed(project, {"shared.txt": "base\n", "mine.txt": "mine\n"})
    fake.script([ToolCall("write", {"path": "shared.txt", "content": "from A\n"}, id="call_a")])
    fake.script([Text("A done")])
    # Session B changes the file and puts back what A left: nothing differs
    # on disk, and still the revert of A must not go over B's work unasked.
    fake.script([ToolCall("bash", {"command": "echo B >> shared.txt"}, id="call_b1")])
    fake.script([ToolCall("bash", {"command": "echo 'from A' > shared.txt"}, id="call_b2")])
    fake.script([Text("B done")])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run_a = run_to_end(http, wid, "session A")
        run_to_end(http, wid, "session B")
        assert (project / "shared.txt").read_text() == "from A\n"
        error = refused(
            act(http, wid, run_a["session_id"], "revert", run_id=run_a["id"]),
            409,
            "workspace_changed",
        )
        assert error["files"] == ["shared.txt"]
        forced = ok(act(http, wid, run_a["session_id"], "revert", run_id=run_a["id"], force=True))
        assert forced["restored"]["overridden"] == ["shared.txt"]
        assert files_of(project) == {"shared.txt": "base\n", "mine.txt": "mine\n"}


def test_a_busy_session_is_refused_and_reverts_once_idle(fake, agent, project):
    seed(project, {"a.txt": "one\n"})
    fake.script([ToolCall("write", {"path": "a.txt", "content": "two\n"}, id="call_w")])
    fake.script([Text("written")])
    fake.script([ToolCall("bash", {"command": "echo x > x.txt"}, id="call_x")])
    live = agent(permission_timeout=60)
    with api(live.url) as http:
        wid = register(http, project, yolo=False)
        first = submit(http, wid, "write a")
        decide(http, wid, pending_permission(http, wid)["id"], "allow")
        assert wait_terminal(http, wid, first["id"])["status"] == "completed"
        sid = first["session_id"]
        second = submit(http, wid, "write x", session_id=sid)
        asked = pending_permission(http, wid)  # the session is busy with it
        refused(act(http, wid, sid, "revert", run_id=first["id"]), 409, "session_busy")
        refused(act(http, wid, sid, "unrevert"), 409, "session_busy")
        refused(act(http, wid, sid, "fork", restore_files=True), 409, "session_busy")
        assert ok(act(http, wid, sid, "fork"), 201)["revert"] is None  # files stay as they are
        assert (project / "a.txt").read_text() == "two\n"
        decide(http, wid, asked["id"], "deny")
        wait_terminal(http, wid, second["id"])
        ok(act(http, wid, sid, "revert", run_id=first["id"]))
        assert files_of(project) == {"a.txt": "one\n"}


# -- what is never recorded ---------------------------------------------------------------


def test_ignored_oversized_and_hidden_files_are_not_recorded_nor_touched(
    fake, agent, project, tmp_path
):
    seed(project, {".gitignore": "build/\n", "small.txt": "small\n"})
    command = (
        "mkdir -p build secrets && echo obj > build/out.o && head -c 10000 /dev/zero > big.bin"
        " && echo s3cret > secrets/key && echo more >> small.txt"
    )
    fake.script([ToolCall("bash", {"command": command}, id="call_all")])
    fake.script([Text("done")])
    live = agent(
        checkpoint_max_file_bytes=4096, sandbox="off", sandbox_hide=[str(project / "secrets")]
    )
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = run_to_end(http, wid, "make things")
        stat = ok(diff(http, wid, run["id"], stat="1"))
        assert [f["path"] for f in stat["files"]] == ["small.txt"]
        assert "too_large: big.bin" in stat["note"]
        text = diff(http, wid, run["id"]).text
        assert "s3cret" not in text and "secrets" not in text and "out.o" not in text
        ok(act(http, wid, run["session_id"], "revert", run_id=run["id"]))
    assert (project / "small.txt").read_text() == "small\n"
    assert (project / "build/out.o").read_text() == "obj\n"
    assert (project / "big.bin").stat().st_size == 10000
    assert (project / "secrets/key").read_text() == "s3cret\n"
    # The secret never reached the shadow repository, under any name.
    objects = subprocess.run(
        ["git", f"--git-dir={git_dir(tmp_path / 'data', wid)}", "rev-list", "--all", "--objects"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "secrets" not in objects and "big.bin" not in objects and "build" not in objects


def test_checkpoints_off_for_one_workspace(fake, agent, project, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    fake.script([ToolCall("bash", {"command": "echo x > x.txt"}, id="call_x")])
    fake.script([Text("done")])
    fake.script([Text("elsewhere")])
    live = agent(workspaces={str(project): {"checkpoints": False}})
    with api(live.url) as http:
        off = register(http, project, yolo=True)
        run = run_to_end(http, off, "write x")
        assert (project / "x.txt").exists()
        refused(diff(http, off, run["id"]), 409, "checkpoints_disabled")
        refused(
            act(http, off, run["session_id"], "revert", run_id=run["id"]),
            409,
            "checkpoints_disabled",
        )
        on = register(http, other, yolo=True)
        done = run_to_end(http, on, "nothing to change")
        assert diff(http, on, done["id"]).text == ""
        # A home directory itself is never recorded, whatever the settings say.
        home = register(http, Path.home())
        error = refused(diff(http, home, done["id"]), 409, "checkpoints_disabled")
        assert "home directory" in error["message"]
    assert not git_dir(tmp_path / "data", off).exists()
    assert git_dir(tmp_path / "data", on).is_dir()
    assert make_config(tmp_path, checkpoints=False).checkpoints_for(other) is False


def test_an_mcp_tool_that_writes_files_is_recorded_and_reverted(fake, agent, project):
    live = agent(
        mcp={
            "test": {
                "command": sys.executable,
                "args": [TEST_SERVER],
                "allow": ["write_note"],
                "cwd": "workspace",  # its relative paths land in the workspace
            }
        },
        sandbox_read=PYTHON_DIRS,
    )
    fake.script(
        [ToolCall("mcp_test_write_note", {"path": "note.md", "text": "# hi\n"}, id="call_m")]
    )
    fake.script([Text("noted")])
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        with event_stream(live.url, wid, since=0) as events:
            events.until(is_type("mcp.status", name="test", status="connected"), 30)
        run = run_to_end(http, wid, "write a note")
        assert (project / "note.md").read_text() == "# hi\n"
        stat = ok(diff(http, wid, run["id"], stat="1", tool_call_id="call_m"))
        assert [(f["path"], f["status"]) for f in stat["files"]] == [("note.md", "added")]
        ok(act(http, wid, run["session_id"], "revert", run_id=run["id"]))
        assert not (project / "note.md").exists()


# -- the command line ------------------------------------------------------------------


def crushd(live_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crushd", *args, "--url", live_url],
        capture_output=True,
        text=True,
        timeout=60,
        env=scrubbed_env(),
    )


def test_crushd_diff_revert_unrevert_and_fork(fake, agent, project):
    seed(project, {"a.txt": "one\n"})
    fake.script([ToolCall("write", {"path": "w.txt", "content": "written\n"}, id="call_w")])
    fake.script([Text("done")])
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        run = run_to_end(http, wid, "write w")
    rid, sid = run["id"], run["session_id"]

    shown = crushd(live.url, "diff", rid)
    assert shown.returncode == 0 and "+++ b/w.txt" in shown.stdout and "+written" in shown.stdout
    table = crushd(live.url, "diff", rid, "--stat")
    assert table.stdout.split() == ["STATUS", "LINES", "PATH", "added", "+1", "-0", "w.txt"]
    dry = crushd(live.url, "revert", sid, "--to", rid, "--dry-run")
    assert dry.returncode == 0 and "would remove  w.txt" in dry.stdout
    assert (project / "w.txt").exists()
    done = crushd(live.url, "revert", sid, "--to", rid)
    assert (
        done.returncode == 0
        and "removed  w.txt" in done.stdout
        and "reverted 4 messages" in done.stderr
    )
    assert not (project / "w.txt").exists()
    (project / "w.txt").write_text("in the way\n")
    blocked = crushd(live.url, "unrevert", sid)
    assert (
        blocked.returncode == 1
        and "changed: w.txt" in blocked.stderr
        and "--force" in blocked.stderr
    )
    assert crushd(live.url, "unrevert", sid, "--force").returncode == 0
    assert (project / "w.txt").read_text() == "written\n"
    forked = crushd(live.url, "fork", sid)
    assert forked.returncode == 0
    with api(live.url) as http:
        assert len(messages(http, wid, forked.stdout.strip())) == 4
    usage = crushd(live.url, "revert", sid)
    assert usage.returncode == 2 and "--to RUN or --message ID" in usage.stderr


# -- crashes, disk, retention ------------------------------------------------------------


def agent_daemon(daemon_factory, fake, *args: str, data_dir: Path | None = None):
    return daemon_factory(
        *("--provider", "openai", "--model", "m", "--base-url", fake.openai_base_url),
        *("--api-key-env", AGENT_KEY_ENV, *args),
        data_dir=data_dir,
        env={AGENT_KEY_ENV: "sk-agent-test"},
    )


def test_kill_9_in_the_middle_of_a_revert_then_a_restart_finishes_it(
    fake, daemon_factory, project, tmp_path
):
    count = 2000
    old = {f"f{i:04d}.txt": f"old {i}\n" * 50 for i in range(count)}
    seed(project, old)
    fake.script([ToolCall("bash", {"command": "for f in f*.txt; do echo new > $f; done"})])
    fake.script([Text("rewritten")])
    data_dir = tmp_path / "data"
    daemon = agent_daemon(daemon_factory, fake)
    with daemon.client() as http:
        wid = register(http, project, yolo=True)
        run = run_to_end(http, wid, "rewrite them all")
    journal = git_dir(data_dir, wid) / JOURNAL

    def revert() -> None:
        with httpx.Client(base_url=daemon.url, timeout=60) as client:
            try:
                client.post(
                    f"/v1/workspaces/{wid}/sessions/{run['session_id']}/revert",
                    json={"run_id": run["id"]},
                )
            except httpx.TransportError:  # the daemon was killed under it
                pass

    reverting = threading.Thread(target=revert)
    reverting.start()
    # Files are written in path order: once the first is old again, kill.
    first = project / "f0000.txt"
    deadline = time.monotonic() + 30
    while not (journal.exists() and first.read_text() == old["f0000.txt"]):
        assert time.monotonic() < deadline, "the restore never started"
        time.sleep(0.0002)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    reverting.join(30)
    assert journal.exists()  # killed in the middle
    seen = files_of(project)
    # Every file is whole: its old content or its new one, never half (the
    # one being written is still crushd's temporary file).
    temporary = {n for n in seen if n.encode().startswith(TEMP_PREFIX)}
    assert set(seen) - temporary == set(old) and len(temporary) <= 1
    assert all(seen[n] in (t, "new\n") for n, t in old.items())
    restored = sum(seen[n] == t for n, t in old.items())
    assert 0 < restored < count, restored

    again = agent_daemon(daemon_factory, fake, data_dir=data_dir)
    with again.client() as http:
        assert files_of(project) == old
        assert not journal.exists()
        assert not [p for p in project.iterdir() if p.name.encode().startswith(TEMP_PREFIX)]
        assert all(m["reverted"] for m in messages(http, wid, run["session_id"]))
        # The revert is in force, so it can be undone.
        undone = ok(act(http, wid, run["session_id"], "unrevert"))
        assert undone["state"] == "undone"
    assert all(text == "new\n" for text in files_of(project).values())
    assert "event=revert_finished_at_start" in again.log()


def test_disk_grows_by_what_changed_and_retention_expires_old_runs(
    fake, daemon_factory, project, tmp_path
):
    # 20 MB that does not compress, and one small file the runs change.
    for i in range(20):
        (project / f"blob{i:02d}.bin").write_bytes(os.urandom(1 << 20))
    (project / "log.txt").write_text("start\n")
    runs = 12
    for i in range(runs):
        fake.script([ToolCall("bash", {"command": f"echo line {i} >> log.txt"})])
        fake.script([Text(f"run {i}")])
    data_dir = tmp_path / "data"
    daemon = agent_daemon(daemon_factory, fake)
    with daemon.client() as http:
        wid = register(http, project, yolo=True)
        first = run_to_end(http, wid, "run 0")
        store = git_dir(data_dir, wid)
        after_first = disk_use(store)
        assert after_first >= 20 << 20
        done = [run_to_end(http, wid, f"run {i}") for i in range(1, runs)]
        grown = disk_use(store) - after_first
        assert grown < 1 << 20, f"{runs - 1} runs of a one-line change grew the store by {grown}"
        health = wait_for(
            lambda: (h := http.get("/v1/health").json())["checkpoint_bytes"] >= 20 << 20 and h,
            15,
        )
        assert health["checkpoint_bytes"] <= disk_use(store) + (1 << 20)
        metrics = {
            s.name: s.value
            for family in text_string_to_metric_families(http.get("/metrics").text)
            for s in family.samples
        }
        assert metrics["crushd_checkpoint_store_bytes"] >= 20 << 20
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0

    # Retention at start: with 0 days only the newest run's checkpoints stay.
    again = agent_daemon(daemon_factory, fake, "--checkpoint-keep-days", "0", data_dir=data_dir)
    with again.client() as http:
        expired = wait_for(lambda: (r := diff(http, wid, first["id"])).status_code == 410 and r, 15)
        assert expired.json()["error"]["code"] == "checkpoint_expired"
        assert "+line 11" in diff(http, wid, done[-1]["id"]).text
        sid = first["session_id"]
        refused(act(http, wid, sid, "revert", run_id=first["id"]), 410, "checkpoint_expired")
    assert disk_use(store) <= after_first + (1 << 20)


def test_runs_starting_together_share_one_first_snapshot(fake, agent, project):
    """A burst of runs costs one "before" snapshot, not one each, and every
    run still has its checkpoint: its diff answers."""
    seed(project, {"a.txt": "a\n"})
    live = agent()
    with api(live.url) as http:
        wid = register(http, project, yolo=True)
        checkpoints = live.server.get(wid).checkpoints
        taken: list[str] = []
        snapshot = checkpoints.store.snapshot

        def counted(*args, **kwargs):
            taken.append(kwargs.get("note", ""))
            return snapshot(*args, **kwargs)

        checkpoints.store.snapshot = counted
        busy, release = threading.Event(), threading.Event()
        checkpoints.submit(lambda: (busy.set(), release.wait(10)))
        assert busy.wait(5)
        for _ in range(5):
            fake.script([Text("done")])
        runs = [submit(http, wid, f"run {n}") for n in range(5)]
        for run in runs:
            assert wait_terminal(http, wid, run["id"])["status"] == "completed"
        release.set()
        wait_for(lambda: all(diff(http, wid, r["id"]).status_code == 200 for r in runs), 10)
    assert len(taken) == 1, taken
