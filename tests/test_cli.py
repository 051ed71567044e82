"""The ``crushd`` client commands, run as real processes against a real daemon."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for
from helpers import free_port

from crushd.cancel import Cancelled, CancelToken
from crushd.client import DEFAULT_URL, Client, StreamBroken, resolve_address, resolve_token
from crushd.common import new_id
from crushd.config import Config
from crushd.follow import POLL_PAUSE, follow_run
from crushd.terminal import Follower

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$")
REACH_HINT = "is crushd running? start it with `crushd serve`"


@pytest.fixture(autouse=True)
def no_crushd_env(monkeypatch):
    """The developer's own CRUSHD_* settings must not reach the daemons or the CLI."""
    for key in list(os.environ):
        if key.startswith("CRUSHD_"):
            monkeypatch.delenv(key)


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def crushd(
    *args: str,
    cwd: Path,
    url: str | None = None,
    timeout: float = 30,
    stdin: str = "",
    **env: str,
) -> subprocess.CompletedProcess:
    """Run ``python -m crushd ARGS`` to completion."""
    if url:
        env["CRUSHD_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "crushd", *args],
        cwd=cwd,
        env=cli_env(**env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_prompt_prints_the_answer_and_exits_0(daemon_factory, project):
    daemon = daemon_factory()
    done = crushd("prompt", "hello there, friend", cwd=project, url=daemon.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello there, friend\n"

    with daemon.client() as http:
        [workspace] = http.get("/v1/workspaces").json()
        assert workspace["path"] == str(project.resolve())  # registered from the cwd
        [run] = http.get(f"/v1/workspaces/{workspace['id']}/runs").json()
        assert run["status"] == "completed" and run["text"] == "hello there, friend"

        # --session continues that session; several words join into one prompt.
        sid = run["session_id"]
        done = crushd("prompt", "--session", sid, "second", "turn", cwd=project, url=daemon.url)
        assert (done.returncode, done.stdout) == (0, "second turn\n"), done.stderr
        session = http.get(f"/v1/workspaces/{workspace['id']}/sessions/{sid}").json()
        assert session["message_count"] == 4

        # "-" reads the prompt from stdin.
        done = crushd("prompt", "-", cwd=project, url=daemon.url, stdin="from\nstdin")
        assert (done.returncode, done.stdout) == (0, "from\nstdin\n"), done.stderr

        # --json prints the terminal run instead of the answer.
        done = crushd("prompt", "--json", "as json", cwd=project, url=daemon.url)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["text"] == "as json"

        # --no-wait prints the run id once accepted; the run goes on regardless.
        done = crushd("prompt", "--no-wait", "later", cwd=project, url=daemon.url)
        assert done.returncode == 0, done.stderr
        run_id = done.stdout.strip()
        assert UUID.match(run_id)
        run = http.get(f"/v1/workspaces/{workspace['id']}/runs/{run_id}?wait=10").json()
        assert (run["status"], run["text"]) == ("completed", "later")

        # --workspace takes a directory (registered on first use) or an id.
        other = project.parent / "other"
        other.mkdir()
        done = crushd("prompt", "--workspace", str(other), "elsewhere", cwd=project, url=daemon.url)
        assert (done.returncode, done.stdout) == (0, "elsewhere\n"), done.stderr
        done = crushd("prompt", "--workspace", workspace["id"], "by id", cwd=other, url=daemon.url)
        assert (done.returncode, done.stdout) == (0, "by id\n"), done.stderr
        assert len(http.get("/v1/workspaces").json()) == 2


def test_prompt_with_an_unknown_session_fails_with_the_api_error(daemon_factory, project):
    daemon = daemon_factory()
    for extra in ([], ["--no-wait"]):
        done = crushd("prompt", *extra, "--session", "nope", "hi", cwd=project, url=daemon.url)
        assert done.returncode == 1
        assert done.stdout == ""
        assert "session nope not found" in done.stderr
    done = crushd("prompt", "   ", cwd=project, url=daemon.url)
    assert done.returncode == 2 and "empty" in done.stderr


def read_some(stream, timeout: float) -> bytes:
    """The first bytes a child writes to ``stream`` (a pipe), without blocking forever."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"nothing on the pipe after {timeout}s"
    return os.read(stream.fileno(), 4096)


# ``crushd`` as a person runs it from a shell: Ctrl-C (SIGINT) at its default.
# A shell without job control starts background jobs with SIGINT ignored,
# and Python keeps an ignored SIGINT ignored; the tests must not depend on how
# the suite itself was started.
INTERACTIVE_CRUSHD = [
    sys.executable,
    "-c",
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('crushd', run_name='__main__', alter_sys=True)",
]


def test_ctrl_c_cancels_the_run_and_exits_130(daemon_factory, project):
    daemon = daemon_factory("--echo-delay", "0.2")
    words = [f"word{i}" for i in range(40)]  # 8 s of streaming
    proc = subprocess.Popen(
        [*INTERACTIVE_CRUSHD, "prompt", *words],
        cwd=project,
        env=cli_env(CRUSHD_URL=daemon.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        first = read_some(proc.stdout, 10)
        assert first.startswith(b"word0")
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 5  # the cancel took effect, not the 8 s prompt
    answer = (first + out).decode()
    assert answer.endswith("\n") and len(answer.split()) < 40
    assert "cancelling run" in err.decode() and "cancelled" in err.decode()

    with daemon.client() as http:
        [workspace] = http.get("/v1/workspaces").json()
        [run] = http.get(f"/v1/workspaces/{workspace['id']}/runs").json()
    assert run["status"] == "cancelled"
    assert run["text"] and " ".join(words).startswith(run["text"].strip())


def table(text: str) -> tuple[list[str], list[str]]:
    lines = text.rstrip("\n").split("\n")
    return lines[0], lines[1:]


def test_runs_sessions_and_workspaces_tables_and_json(daemon_factory, project):
    daemon = daemon_factory()
    for prompt in ("first prompt", "second prompt"):
        assert crushd("prompt", prompt, cwd=project, url=daemon.url).returncode == 0
    with daemon.client() as http:
        [workspace] = http.get("/v1/workspaces").json()
        wid = workspace["id"]
        api_runs = http.get(f"/v1/workspaces/{wid}/runs").json()
        api_sessions = http.get(f"/v1/workspaces/{wid}/sessions").json()

    done = crushd("runs", cwd=project, url=daemon.url)
    assert done.returncode == 0, done.stderr
    header, rows = table(done.stdout)
    assert header.split() == ["RUN", "STATUS", "CREATED", "SESSION", "PROMPT"]
    assert [row.split()[0] for row in rows] == [r["id"] for r in api_runs]  # newest first
    for row in rows:  # aligned: every value starts under its header
        assert row.index("completed") == header.index("STATUS")
    assert [row[header.index("PROMPT") :] for row in rows] == ["second prompt", "first prompt"]

    done = crushd("runs", "--json", "--limit", "1", cwd=project, url=daemon.url)
    assert json.loads(done.stdout) == api_runs[:1]
    done = crushd("runs", "--status", "failed", cwd=project, url=daemon.url)
    assert table(done.stdout)[1] == []
    sid = api_sessions[-1]["id"]
    done = crushd("runs", "--session", sid, "--json", cwd=project, url=daemon.url)
    assert [r["prompt"] for r in json.loads(done.stdout)] == ["first prompt"]

    done = crushd("sessions", cwd=project, url=daemon.url)
    header, rows = table(done.stdout)
    assert header.split() == ["SESSION", "STATE", "MESSAGES", "UPDATED", "TITLE"]
    assert [row.split()[0] for row in rows] == [s["id"] for s in api_sessions]
    assert all(row.index("idle") == header.index("STATE") for row in rows)
    done = crushd("sessions", "--json", "--workspace", wid, cwd=project.parent, url=daemon.url)
    assert json.loads(done.stdout) == api_sessions

    done = crushd("workspaces", cwd=project.parent, url=daemon.url)
    header, rows = table(done.stdout)
    assert header.split() == ["WORKSPACE", "ACTIVE", "QUEUED", "CREATED", "PATH"]
    assert rows == [rows[0]] and rows[0].startswith(wid)
    assert rows[0].endswith(str(project.resolve()))
    assert rows[0].index(str(project.resolve())) == header.index("PATH")
    done = crushd("workspaces", "--json", cwd=project.parent, url=daemon.url)
    assert [w["id"] for w in json.loads(done.stdout)] == [wid]

    # Read-only commands never register a directory.
    elsewhere = project.parent / "unregistered"
    elsewhere.mkdir()
    done = crushd("runs", cwd=elsewhere, url=daemon.url)
    assert done.returncode == 1 and "no workspace is registered" in done.stderr


def test_cancel_finds_the_run_and_prints_its_status(daemon_factory, project, tmp_path):
    daemon = daemon_factory("--echo-delay", "0.2")
    with daemon.client() as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
        run = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "a " * 40}).json()
        run_url = f"/v1/workspaces/{wid}/runs/{run['id']}"
        wait_for(lambda: http.get(run_url).json()["status"] == "running", 10)

        # From outside the workspace: the run is looked up in every workspace.
        done = crushd("cancel", run["id"], cwd=tmp_path, url=daemon.url)
        assert (done.returncode, done.stdout) == (0, "cancelled\n"), done.stderr
        assert http.get(run_url).json()["status"] == "cancelled"

    # Cancelling a finished run reports its status and changes nothing.
    done = crushd("cancel", run["id"], "--workspace", str(project), cwd=tmp_path, url=daemon.url)
    assert (done.returncode, done.stdout) == (0, "cancelled\n"), done.stderr
    done = crushd("cancel", "--json", run["id"], cwd=project, url=daemon.url)
    assert json.loads(done.stdout)["status"] == "cancelled"

    done = crushd("cancel", "no-such-run", cwd=project, url=daemon.url)
    assert done.returncode == 1 and "run no-such-run not found" in done.stderr


def test_nothing_listening_says_how_to_start_the_daemon(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["prompt", "hi"], ["runs"], ["workspaces"], ["sessions"], ["cancel", "r"]):
        done = crushd(*args, cwd=tmp_path, url=url, timeout=15)
        assert done.returncode == 1, args
        assert f"cannot connect to crushd at {url} (connection refused)" in done.stderr
        assert REACH_HINT in done.stderr
        assert "Traceback" not in done.stderr
    missing = tmp_path / "missing.sock"
    done = crushd("workspaces", "--unix-socket", str(missing), cwd=tmp_path)
    assert done.returncode == 1 and f"unix:{missing}" in done.stderr
    assert REACH_HINT in done.stderr


def test_defaults_find_a_local_daemon_without_flags(tmp_path):
    # `crushd serve` with no flags listens where the client looks with no flags.
    config = Config()
    assert f"http://{config.host}:{config.port}" == DEFAULT_URL
    assert resolve_address(env={}) == (DEFAULT_URL, None)
    env = {"CRUSHD_URL": "http://h:1/", "CRUSHD_UNIX_SOCKET": "/s"}
    assert resolve_address(env=env) == ("http://h:1", None)
    assert resolve_address(env={"CRUSHD_UNIX_SOCKET": "/s"})[1] == "/s"
    assert resolve_address("http://flag:2", env=env) == ("http://flag:2", None)
    assert resolve_address(unix_socket="/f", env=env)[1] == "/f"
    token = tmp_path / "token"
    token.write_text("\n  secret \n")
    assert resolve_token(str(token), env={"CRUSHD_TOKEN": "env"}) == "secret"
    assert resolve_token(env={"CRUSHD_TOKEN": "env", "CRUSHD_TOKEN_FILE": str(token)}) == "env"
    assert resolve_token(env={"CRUSHD_TOKEN_FILE": str(token)}) == "secret"
    assert resolve_token(env={}) is None


class BreakingStream:
    """A real event stream that breaks after ``after`` events."""

    def __init__(self, stream, after: int) -> None:
        self.stream, self.after = stream, after

    @property
    def last_seq(self):
        return self.stream.last_seq

    def __iter__(self):
        # Like a real transport failure: it strikes between two events.
        if self.after == 0:
            raise StreamBroken("event stream broke: test")
        for count, event in enumerate(self.stream, 1):
            yield event
            if count == self.after:
                raise StreamBroken("event stream broke: test")

    def close(self) -> None:
        self.stream.close()


@pytest.mark.parametrize("after", [0, 6], ids=["poll", "reconnect"])
def test_prompt_follows_through_a_broken_stream(live_factory, project, capsys, after):
    """A stream that breaks is resumed with ``since`` (no delta lost or
    repeated), or, with no event seen yet, replaced by ``?wait=`` polling."""
    live = live_factory(echo_delay=0.05)
    prompt = "one two three four five six"
    with Client(live.url) as client:
        wid = client.register(project)["id"]
        run_id = new_id()
        follower = Follower(wid, run_id, quiet=False)
        stream = BreakingStream(client.events(wid), after)
        client.submit(wid, prompt, None, run_id)
        run = follow_run(client, follower, stream, wid, None, run_id)
        follower.out.end_line()
    assert run["status"] == "completed"
    assert capsys.readouterr().out == prompt + "\n"


def test_a_cancel_ends_the_pause_between_polls_at_once(live_factory, project):
    """With no long-poll slot free the server answers at once; the follower
    then pauses between polls, and a cancel ends that pause."""
    live = live_factory(threads=4, echo_delay=1.0)
    assert live.server.config.max_streams == 2
    with Client(live.url) as client:
        wid = client.register(project)["id"]
        with client.events(wid), client.events(wid):  # both stream slots taken
            run_id = new_id()
            client.submit(wid, "one two three four five", None, run_id)
            follower = Follower(wid, run_id, quiet=True)
            token = CancelToken()
            threading.Timer(0.5, token.cancel).start()
            started = time.monotonic()
            with pytest.raises(Cancelled):
                follow_run(client, follower, None, wid, None, run_id, token)
            assert time.monotonic() - started < 0.5 + POLL_PAUSE / 2
            assert client.run(wid, run_id)["status"] == "running"  # it answered at once


def test_follower_renders_text_reasoning_and_tool_activity(capsys):
    """Answer text goes to stdout; thinking, tools and permissions to stderr."""
    follower = Follower("w1", "r1", quiet=False)

    def event(type: str, payload: dict) -> dict | None:
        return follower.handle({"type": type, "payload": payload})

    def delta(message: str, kind: str, text: str, run: str = "r1") -> None:
        event("message.delta", {"message_id": message, "run_id": run, "kind": kind, "delta": text})

    delta("m1", "reasoning", "let me\nlook")
    delta("m1", "text", "Looking.")
    delta("m1", "text", "ignored", run="other-run")
    call = {"type": "tool_call", "id": "c1", "name": "bash", "input": '{"command": "ls"}'}
    event("message.updated", {"run_id": "r1", "role": "assistant", "parts": [call]})
    event("message.updated", {"run_id": "r1", "role": "assistant", "parts": [call]})
    done = {**call, "finished": True}
    event("message.updated", {"run_id": "r1", "role": "assistant", "parts": [done]})
    event("message.updated", {"run_id": "r1", "role": "assistant", "parts": [done]})
    request = {"id": "p1", "run_id": "r1", "tool": "bash", "action": "execute", "path": None}
    event("permission.requested", request)
    event("permission.resolved", {**request, "decision": "allow"})
    result = {"type": "tool_result", "name": "bash", "content": "a\nb", "is_error": False}
    event("message.created", {"run_id": "r1", "role": "tool", "parts": [result]})
    failed = {**result, "content": "boom\nmore", "is_error": True}
    event("message.created", {"run_id": "r1", "role": "tool", "parts": [failed]})
    delta("m2", "text", "Done")
    assert event("run.completed", {"id": "other-run", "status": "completed"}) is None
    terminal = {"id": "r1", "status": "completed", "text": "Done", "message_id": "m2"}
    assert event("run.completed", terminal) == terminal
    follower.finish(terminal)  # nothing left to print: "Done" streamed already

    out, err = capsys.readouterr()
    assert out == "Looking.\nDone\n"
    assert err.splitlines() == [
        "· thinking: let me look",
        '· bash {"command": "ls"}',
        "· permission needed: bash execute; answer with POST "
        '/v1/workspaces/w1/permissions/p1 {"decision": "allow" | "allow_session" | "deny"}',
        "· permission allow: bash",
        "· bash done (2 lines)",
        "· bash failed: boom more",
    ]


def test_follower_shows_retries_and_restarts_a_reset_message(capsys):
    follower = Follower("w1", "r1", quiet=False)

    def event(type: str, payload: dict) -> None:
        follower.handle({"type": type, "payload": {"run_id": "r1", **payload}})

    event("message.delta", {"message_id": "m1", "kind": "text", "delta": "half"})
    event("message.reset", {"message_id": "m1"})
    event("run.retrying", {"attempt": 1, "delay_s": 2.0, "error": "Overloaded"})
    event("message.delta", {"message_id": "m1", "kind": "text", "delta": "whole"})
    terminal = {"id": "r1", "status": "completed", "text": "whole answer", "message_id": "m1"}
    follower.finish(terminal)  # the stream missed " answer": printed from the record
    out, err = capsys.readouterr()
    assert out == "half\nwhole answer\n"
    assert err.splitlines() == [
        "· the answer so far is discarded; the retry streams it again",
        "· provider failed (Overloaded); retry 1 in 2.0 s",
    ]


def test_prompt_polls_when_every_stream_slot_is_taken(daemon_factory, project):
    daemon = daemon_factory("--threads", "4")  # two stream slots
    with daemon.client() as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
        with (
            http.stream("GET", f"/v1/workspaces/{wid}/events") as first,
            http.stream("GET", f"/v1/workspaces/{wid}/events") as second,
        ):
            assert first.status_code == second.status_code == 200
            assert http.get(f"/v1/workspaces/{wid}/events").status_code == 503
            done = crushd("prompt", "answer by polling", cwd=project, url=daemon.url)
    assert (done.returncode, done.stdout) == (0, "answer by polling\n"), done.stderr


def test_prompt_from_a_terminal_says_it_reads_stdin_and_ctrl_c_exits_130(tmp_path):
    """``crushd prompt -`` on a terminal: a hint on stderr, and Ctrl-C while it
    waits exits 130.  Nothing is sent, so no daemon is needed."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [*INTERACTIVE_CRUSHD, "prompt", "-"],
        cwd=tmp_path,
        env=cli_env(CRUSHD_URL="http://127.0.0.1:9"),
        stdin=secondary,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(secondary)
    try:
        hint = read_some(proc.stderr, 15)
        assert b"reading the prompt from standard input" in hint and b"Ctrl-D" in hint
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        os.close(primary)
    assert proc.returncode == 130, err
    assert b"interrupted before the prompt was sent" in err
    assert out == b""


def test_compact_summarizes_the_last_session_and_shows_in_runs(daemon_factory, project):
    from crushd.context import COMPACT_INSTRUCTION

    daemon = daemon_factory()  # echo: the summary is the instruction, echoed
    assert crushd("prompt", "first", cwd=project, url=daemon.url).returncode == 0
    assert crushd("prompt", "second", cwd=project, url=daemon.url).returncode == 0
    with daemon.client() as http:
        [workspace] = http.get("/v1/workspaces").json()
        wid = workspace["id"]
        last = http.get(f"/v1/workspaces/{wid}/runs").json()[0]["session_id"]
    done = crushd("compact", cwd=project, url=daemon.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == COMPACT_INSTRUCTION + "\n"
    with daemon.client() as http:
        run = http.get(f"/v1/workspaces/{wid}/runs").json()[0]
        stored = http.get(f"/v1/workspaces/{wid}/sessions/{last}/messages").json()
    assert (run["kind"], run["status"], run["session_id"]) == ("compact", "completed", last)
    assert stored[-1]["parts"][0] == {"type": "summary", "text": COMPACT_INSTRUCTION}
    header, rows = table(crushd("runs", cwd=project, url=daemon.url).stdout)
    assert rows[0].split()[0] == run["id"] and rows[0].endswith("[compact]")

    done = crushd("compact", "--session", "nope", cwd=project, url=daemon.url)
    assert done.returncode == 1 and "session nope not found" in done.stderr
    done = crushd("compact", "--session", last, "--no-wait", cwd=project, url=daemon.url)
    assert done.returncode == 0 and UUID.match(done.stdout.strip())
    with daemon.client() as http:
        again = http.get(f"/v1/workspaces/{wid}/runs/{done.stdout.strip()}?wait=10").json()
    assert again["status"] == "failed"
    assert "no messages since its last summary" in again["error"]
