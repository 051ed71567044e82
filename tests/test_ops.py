"""Operating a real ``crushd serve``: token auth, bind checks, allowed roots,
the unix socket, sd_notify and socket activation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from conftest import LISTENING, wait_for

TOKEN = "s3cret-token-123"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No CRUSHD_*, systemd or socket-activation variables of the test runner
    may reach the daemons."""
    for key in list(os.environ):
        if key.startswith(("CRUSHD_", "NOTIFY_", "WATCHDOG_", "LISTEN_")):
            monkeypatch.delenv(key)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(f"  \n {TOKEN} \n\n")  # surrounding whitespace is ignored
    return path


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crushd", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.request.url, response.text)
    assert response.json() == {
        "error": {"code": "unauthorized", "message": "missing or wrong bearer token"}
    }
    assert response.headers["WWW-Authenticate"] == "Bearer"


# -- token -------------------------------------------------------------------


def test_token_guards_every_route_but_health(daemon_factory, token_file, project):
    daemon = daemon_factory("--token-file", str(token_file))
    good = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=daemon.url, timeout=10, headers=good) as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
        run = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "with token"}).json()
        sid, rid = run["session_id"], run["id"]
        assert http.get(f"/v1/workspaces/{wid}/runs/{rid}?wait=10").json()["status"] == "completed"
        with http.stream("GET", f"/v1/workspaces/{wid}/events?since=0") as stream:
            assert stream.status_code == 200
            assert next(stream.iter_lines()) == ": open"

    w, s = f"/v1/workspaces/{wid}", f"/v1/workspaces/{wid}/sessions/{sid}"
    routes = [
        ("GET", "/v1/version", None),
        ("GET", "/v1/openapi.json", None),
        ("GET", "/v1/workspaces", None),
        ("POST", "/v1/workspaces", {"path": str(project)}),
        ("GET", w, None),
        ("DELETE", w, None),
        ("GET", f"{w}/sessions", None),
        ("POST", f"{w}/sessions", {"title": "x"}),
        ("GET", s, None),
        ("PUT", s, {"title": "x"}),
        ("DELETE", s, None),
        ("GET", f"{s}/messages", None),
        ("POST", f"{s}/cancel", None),
        ("GET", f"{s}/queue", None),
        ("DELETE", f"{s}/queue", None),
        ("POST", f"{w}/agent", {"prompt": "no token"}),
        ("GET", f"{w}/runs", None),
        ("GET", f"{w}/runs/{rid}?wait=5", None),
        ("POST", f"{w}/runs/{rid}/cancel", None),
        ("GET", f"{w}/permissions", None),
        ("POST", f"{w}/permissions/p1", {"decision": "allow"}),
        ("GET", f"{w}/events", None),
    ]
    wrong = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ]
    with httpx.Client(base_url=daemon.url, timeout=10) as http:
        for method, path, body in routes:
            for headers in wrong:
                assert_unauthorized(http.request(method, path, json=body, headers=headers))
        # The SSE route refuses before it streams anything.
        with http.stream("GET", f"{w}/events") as stream:
            stream.read()
            assert_unauthorized(stream)
        health = http.get("/v1/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        # Nothing the refused requests asked for happened.
        listed = http.get(f"{w}/runs", headers=good).json()
        assert [r["id"] for r in listed] == [rid]
        assert http.get(s, headers=good).status_code == 200

    # The CLI sends the token from --token-file or CRUSHD_TOKEN, and says
    # what is missing otherwise.
    done = cli("runs", "--token-file", str(token_file), cwd=project, CRUSHD_URL=daemon.url)
    assert done.returncode == 0 and rid in done.stdout, done.stderr
    done = cli("prompt", "via env token", cwd=project, CRUSHD_URL=daemon.url, CRUSHD_TOKEN=TOKEN)
    assert (done.returncode, done.stdout) == (0, "via env token\n"), done.stderr
    done = cli("runs", cwd=project, CRUSHD_URL=daemon.url)
    assert done.returncode == 1
    assert "missing or wrong bearer token" in done.stderr and "--token-file" in done.stderr


def test_non_loopback_bind_needs_a_token(daemon_factory, token_file):
    refused = daemon_factory("--host", "0.0.0.0", start=False).start(wait=False)
    assert refused.wait(timeout=15) != 0
    log = refused.log()
    assert "refusing to listen on 0.0.0.0 without a token" in log
    assert "--token-file" in log
    assert not LISTENING.search(log)

    daemon = daemon_factory("--host", "0.0.0.0", "--token-file", str(token_file))
    port = daemon.url.rsplit(":", 1)[1]
    assert daemon.url == f"http://0.0.0.0:{port}"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        assert http.get("/v1/health").status_code == 200
        assert_unauthorized(http.get("/v1/workspaces"))
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert http.get("/v1/workspaces", headers=auth).json() == []


# -- allowed roots -----------------------------------------------------------


def test_allow_root_restricts_workspace_paths(daemon_factory, tmp_path, project):
    allowed = tmp_path / "allowed"
    (allowed / "app").mkdir(parents=True)
    (allowed / "link").symlink_to(project)  # points outside the root
    daemon = daemon_factory("--allow-root", str(allowed))
    with daemon.client() as http:
        for inside in (allowed, allowed / "app"):
            assert http.post("/v1/workspaces", json={"path": str(inside)}).status_code == 201
        for outside in (project, allowed / "link", allowed / ".." / "project", Path("/")):
            response = http.post("/v1/workspaces", json={"path": str(outside)})
            assert response.status_code == 400, outside
            error = response.json()["error"]
            assert error["code"] == "invalid_request"
            assert "outside the allowed roots" in error["message"]
            assert str(allowed) in error["message"]
        assert len(http.get("/v1/workspaces").json()) == 2
    done = cli("prompt", "hi", cwd=project, CRUSHD_URL=daemon.url)
    assert done.returncode == 1 and "outside the allowed roots" in done.stderr


# -- unix socket -------------------------------------------------------------


def test_unix_socket_serves_the_api_privately(daemon_factory, tmp_path, project):
    path = tmp_path / "crushd.sock"
    daemon = daemon_factory("--unix-socket", str(path))
    assert daemon.url == f"http://{path}"  # the listening address is the socket
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600

    curl = shutil.which("curl") or "/usr/bin/curl"
    if os.path.exists(curl):
        done = subprocess.run(
            [curl, "-sS", "--max-time", "10", "--unix-socket", str(path), "http://x/v1/health"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "ok"

    transport = httpx.HTTPTransport(uds=str(path))
    with httpx.Client(transport=transport, base_url="http://crushd", timeout=15) as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
        run = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "over the socket"})
        assert run.status_code == 202
        done = http.get(f"/v1/workspaces/{wid}/runs/{run.json()['id']}?wait=10").json()
        assert (done["status"], done["text"]) == ("completed", "over the socket")

    done = cli("prompt", "--unix-socket", str(path), "cli over the socket", cwd=project)
    assert (done.returncode, done.stdout) == (0, "cli over the socket\n"), done.stderr
    done = cli("runs", cwd=project, CRUSHD_UNIX_SOCKET=str(path))
    assert done.returncode == 0 and "cli over the socket" in done.stdout

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    assert not path.exists(), "a clean exit removes the socket file"


# -- systemd -----------------------------------------------------------------


@pytest.fixture
def manager(tmp_path: Path):
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield sock, {"NOTIFY_SOCKET": str(path)}
    sock.close()


def receive(sock: socket.socket, wanted: str, timeout: float = 10) -> tuple[str, list[str]]:
    """Read datagrams until one has the line ``wanted``; returns it and all read."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        seen.append(message)
        if wanted in message.split("\n"):
            return message, seen
    raise AssertionError(f"no {wanted} within {timeout}s; got {seen}")


def test_sd_notify_ready_once_listening_then_stopping(daemon_factory, manager):
    sock, env = manager
    daemon = daemon_factory(env=env, start=False).start(wait=False)
    ready, seen = receive(sock, "READY=1")
    assert seen == [ready]  # nothing before READY
    lines = ready.split("\n")
    assert lines[0] == "READY=1" and lines[1].startswith("STATUS=serving")
    # READY came after the socket listened: the address is logged and it answers.
    address = LISTENING.search(daemon.log()).group(1)
    assert httpx.get(f"http://{address}/v1/health", timeout=10).status_code == 200

    daemon.signal(signal.SIGTERM)
    stopping, _ = receive(sock, "STOPPING=1")
    assert stopping.startswith("STOPPING=1\nSTATUS=stopping")
    assert daemon.wait(15) == 0


def test_a_stop_with_a_drain_asks_systemd_for_more_time(daemon_factory, manager):
    sock, env = manager
    daemon = daemon_factory("--drain-timeout", "20", env=env, start=False).start(wait=False)
    receive(sock, "READY=1")
    daemon.signal(signal.SIGTERM)
    receive(sock, "STOPPING=1")
    sock.settimeout(10)
    extend = sock.recv(4096).decode()
    assert extend.startswith("EXTEND_TIMEOUT_USEC="), extend
    # drain 20 + shutdown 10 + 2 x cleanup 5 + keeper, join and margin
    assert int(extend.split("=", 1)[1]) >= 40_000_000
    assert daemon.wait(15) == 0


def test_sd_notify_watchdog_pings(daemon_factory, manager):
    sock, env = manager
    daemon = daemon_factory(env={**env, "WATCHDOG_USEC": "1000000"}, start=False).start(False)
    receive(sock, "READY=1")
    started = time.monotonic()
    receive(sock, "WATCHDOG=1", timeout=5)
    receive(sock, "WATCHDOG=1", timeout=5)  # every WATCHDOG_USEC / 2 = 0.5 s
    assert time.monotonic() - started < 3
    daemon.signal(signal.SIGTERM)
    receive(sock, "STOPPING=1")
    assert daemon.wait(15) == 0


# The service manager's part of socket activation: the listening socket on
# fd 3, LISTEN_FDS/LISTEN_PID for our own pid, then exec (the pid stays).
ACTIVATE = textwrap.dedent(
    """
    import os, sys
    fd = int(sys.argv[1])
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    os.execv(sys.executable, [sys.executable, "-m", "crushd", "serve", *sys.argv[2:]])
    """
)


def test_socket_activation_serves_the_inherited_socket(tmp_path, project):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    log_path = tmp_path / "activated.log"
    with listener, log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", ACTIVATE, str(listener.fileno())]
            + ["--data-dir", str(tmp_path / "data")],
            pass_fds=[listener.fileno()],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    # Only the child holds the socket now.
    try:

        def listening() -> str | None:
            assert proc.poll() is None, log_path.read_text()
            match = LISTENING.search(log_path.read_text())
            return match.group(1) if match else None

        assert wait_for(listening, 20) == f"127.0.0.1:{port}"
        assert "event=systemd_socket_activation fds=1" in log_path.read_text()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
            assert http.get("/v1/health").json()["status"] == "ok"
            wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
            rid = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "activated"}).json()
            run = http.get(f"/v1/workspaces/{wid}/runs/{rid['id']}?wait=10").json()
            assert (run["status"], run["text"]) == ("completed", "activated")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
