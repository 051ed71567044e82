"""``crushd.wsgi:application`` under real WSGI hosts: gunicorn and waitress-serve."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import gunicorn.config as gunicorn_config
import httpx
import pytest
from conftest import sse_events, wait_for
from helpers import scrubbed_env

LOCK_MESSAGE = "is already using the data directory"


class Host:
    """A WSGI host process started with crushd's environment; output in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent
        )
        self.url = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, pattern: str) -> str:
        def port() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"host exited with {self.proc.returncode}:\n{self.log()}")
            if "event=wsgi_ready" not in self.log():  # the app is imported (gunicorn: lazily)
                return None
            match = re.search(pattern, self.log())
            return match.group(1) if match else None

        self.url = f"http://127.0.0.1:{wait_for(port, 20, message=self.log())}"
        return self.url

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def hosts(tmp_path: Path):
    """Start WSGI hosts on one data directory; every one is killed at the end."""
    started: list[Host] = []
    env = scrubbed_env("NOTIFY_")
    env.update(
        CRUSHD_DATA_DIR=str(tmp_path / "data"),
        CRUSHD_ECHO_DELAY="0.2",
        CRUSHD_SHUTDOWN_TIMEOUT="5",
        CRUSHD_THREADS="8",  # = the host's threads, so the stream cap stays below them
    )

    def start(kind: str, **extra_env: str) -> Host:
        if kind == "gunicorn":
            argv = [sys.executable, "-m", "gunicorn", "-w", "1", "--threads", "8"]
            argv += ["-b", "127.0.0.1:0", "--graceful-timeout", "20"]
            names = {s.name for s in gunicorn_config.KNOWN_SETTINGS}
            if "control_socket_disable" in names:  # gunicorn >= 25 opens one in $HOME
                argv.append("--no-control-socket")
        else:
            argv = [sys.executable, "-m", "waitress", "--listen=127.0.0.1:0", "--threads=8"]
            argv.append("--channel-request-lookahead=1")  # streams see a gone client at once
        host = Host(
            [*argv, "crushd.wsgi:application"],
            {**env, **extra_env},
            tmp_path / f"{kind}{len(started)}.log",
        )
        started.append(host)
        return host

    yield start
    for host in started:
        host.kill()


GUNICORN_LISTENING = r"Listening at: http://127\.0\.0\.1:(\d+)"
WAITRESS_LISTENING = r"Serving on http://127\.0\.0\.1:(\d+)"


def round_trip(url: str, project: Path) -> str:
    """Register, prompt, wait: returns the workspace id."""
    with httpx.Client(base_url=url, timeout=20) as http:
        assert http.get("/v1/health").json()["status"] == "ok"
        response = http.post("/v1/workspaces", json={"path": str(project)})
        assert response.status_code in (200, 201)
        wid = response.json()["id"]
        run = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "hello there"})
        assert run.status_code == 202
        run = http.get(f"/v1/workspaces/{wid}/runs/{run.json()['id']}?wait=10").json()
        assert (run["status"], run["text"]) == ("completed", "hello there")
        messages = http.get(f"/v1/workspaces/{wid}/sessions/{run['session_id']}/messages").json()
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[1]["parts"][-1]["reason"] == "end_turn"
    return wid


def stop_mid_stream(host: Host, wid: str) -> tuple[str, float]:
    """With an event stream open and a long run streaming, SIGTERM the host.

    Returns the run id and how long the host took to exit.  The open stream
    would hold a host's graceful stop forever if crushd did not end it.
    """
    with (
        httpx.Client(base_url=host.url, timeout=20) as http,
        http.stream("GET", f"/v1/workspaces/{wid}/events") as stream,
    ):
        lines = stream.iter_lines()
        assert next(lines) == ": open"
        prompt = " ".join(f"w{i}" for i in range(40))  # 8 s of streaming
        run = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": prompt}).json()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the run has streamed a delta
            [event] = sse_events(lines, 1)
            if event["data"]["type"] == "message.delta":
                break
        started = time.monotonic()
        host.proc.send_signal(signal.SIGTERM)
        # The stream ends (workspace.closing, then EOF) rather than hanging.
        types = [e["data"]["type"] for e in sse_events(lines, 100, timeout=15)]
        assert "workspace.closing" in types
    assert host.wait(15) == 0, host.log()
    return run["id"], time.monotonic() - started


def stored_runs(data_dir: Path, wid: str) -> dict[str, str]:
    db = data_dir / "workspaces" / wid / "workspace.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT id, status FROM run"))


def test_gunicorn_serves_one_process_per_data_dir(hosts, project):
    first = hosts("gunicorn")
    round_trip(first.wait_listening(GUNICORN_LISTENING), project)

    second = hosts("gunicorn")
    assert second.wait(20) != 0  # the worker cannot boot, so gunicorn gives up
    assert LOCK_MESSAGE in second.log()
    assert "AlreadyRunning" in second.log()

    # The first one is untouched by the failed second one.
    with httpx.Client(base_url=first.url, timeout=10) as http:
        assert http.get("/v1/health").status_code == 200
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(15) == 0, first.log()
    assert "event=server_stopped" in first.log()


def test_gunicorn_sigterm_cancels_running_turns(hosts, project, tmp_path):
    host = hosts("gunicorn")
    wid = round_trip(host.wait_listening(GUNICORN_LISTENING), project)
    run_id, took = stop_mid_stream(host, wid)
    # Well inside --graceful-timeout (20 s), at which gunicorn's master would
    # SIGKILL the worker and leave the run `running`.
    assert took < 8, host.log()
    statuses = stored_runs(tmp_path / "data", wid)
    assert statuses[run_id] == "cancelled"
    assert "running" not in statuses.values()

    # A new process takes over the data directory and sees the closed records.
    again = hosts("gunicorn")
    with httpx.Client(base_url=again.wait_listening(GUNICORN_LISTENING), timeout=10) as http:
        run = http.get(f"/v1/workspaces/{wid}/runs/{run_id}").json()
        assert run["status"] == "cancelled" and run["finished_at"]
        messages = http.get(f"/v1/workspaces/{wid}/sessions/{run['session_id']}/messages").json()
        finish = messages[-1]["parts"][-1]
        assert (finish["type"], finish["reason"]) == ("finish", "canceled")
    again.proc.send_signal(signal.SIGTERM)
    assert again.wait(15) == 0


def test_waitress_serve_round_trip_and_sigterm(hosts, project, tmp_path):
    host = hosts("waitress")
    wid = round_trip(host.wait_listening(WAITRESS_LISTENING), project)
    run_id, took = stop_mid_stream(host, wid)
    assert took < 5, host.log()  # no 5 s wait on waitress's busy stream thread
    log = host.log()
    assert "event=stop_requested reason=SIGTERM" in log and "event=server_stopped" in log
    statuses = stored_runs(tmp_path / "data", wid)
    assert statuses[run_id] == "cancelled"
    assert "running" not in statuses.values()


def test_browser_guard_under_a_wsgi_host(hosts, project):
    """The host picks the address, so only loopback names and CRUSHD_ALLOW_HOST pass."""
    ui = "http://localhost:5173"
    host = hosts("waitress", CRUSHD_ALLOW_HOST="crushd.lan", CRUSHD_ALLOW_ORIGIN=ui)
    url = host.wait_listening(WAITRESS_LISTENING)
    with httpx.Client(base_url=url, timeout=20) as http:
        assert http.get("/v1/health", headers={"Host": "crushd.lan"}).status_code == 200
        rebound = http.get("/v1/health", headers={"Host": "attacker.example"})
        assert (rebound.status_code, rebound.json()["error"]["code"]) == (403, "forbidden")
        foreign = http.post(
            "/v1/workspaces",
            content=json.dumps({"path": str(project)}),
            headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
        )
        assert foreign.status_code == 403
        assert http.get("/v1/workspaces").json() == []
        allowed = http.get("/v1/workspaces", headers={"Origin": ui})
        assert allowed.headers["Access-Control-Allow-Origin"] == ui
    assert "event=request_forbidden" in host.log()
