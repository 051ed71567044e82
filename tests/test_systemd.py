"""crushd.systemd against real sockets, a real child process and systemd-analyze."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from crushd import systemd

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "scripts"


@pytest.fixture
def receiver(tmp_path):
    """A bound AF_UNIX datagram socket standing in for the service manager."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, {"NOTIFY_SOCKET": str(path)}
    sock.close()


def recv(sock: socket.socket, timeout: float = 2.0) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


def assert_silent(sock: socket.socket, timeout: float = 0.2) -> None:
    sock.settimeout(timeout)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


# --- notify ---------------------------------------------------------------


def test_notify_sends_one_datagram_of_lines(receiver):
    sock, env = receiver
    assert systemd.notify("READY=1", "STATUS=listening on 127.0.0.1:7433", env=env)
    assert recv(sock) == "READY=1\nSTATUS=listening on 127.0.0.1:7433"


def test_convenience_messages(receiver):
    sock, env = receiver
    assert systemd.ready("up", env=env)
    assert recv(sock) == "READY=1\nSTATUS=up"
    assert systemd.ready(env=env)
    assert recv(sock) == "READY=1"
    assert systemd.status("draining 2 runs", env=env)
    assert recv(sock) == "STATUS=draining 2 runs"
    assert systemd.stopping("shutting down", env=env)
    assert recv(sock) == "STOPPING=1\nSTATUS=shutting down"
    assert systemd.watchdog_ping(env=env)
    assert recv(sock) == "WATCHDOG=1"
    assert systemd.extend_timeout(2.5, env=env)
    assert recv(sock) == "EXTEND_TIMEOUT_USEC=2500000"


def test_notify_abstract_socket():
    name = f"crushd-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert recv(sock) == "READY=1"


def test_notify_reads_os_environ_by_default(receiver, monkeypatch):
    sock, env = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert systemd.watchdog_ping()
    assert recv(sock) == "WATCHDOG=1"


def test_notify_without_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready(env={}) is False
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": ""}) is False


def test_notify_logs_instead_of_raising(tmp_path, caplog):
    missing = {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}
    assert systemd.notify("READY=1", env=missing) is False
    assert "event=systemd_notify_failed" in caplog.text
    caplog.clear()
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": "relative.sock"}) is False
    assert "unsupported_address" in caplog.text


def test_notify_rejects_malformed_messages():
    with pytest.raises(ValueError):
        systemd.notify(env={})
    with pytest.raises(ValueError):
        systemd.notify("READY", env={})
    with pytest.raises(ValueError):
        systemd.notify("STATUS=a\nREADY=1", env={})
    with pytest.raises(ValueError):
        systemd.extend_timeout(0, env={})


# --- watchdog_interval ------------------------------------------------------


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "500000"}) == 0.25
    own = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(own) == 15.0


def test_watchdog_interval_none_when_not_for_us(caplog):
    assert systemd.watchdog_interval({}) is None
    other = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert systemd.watchdog_interval(other) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert "event=systemd_watchdog_env_invalid" in caplog.text


# --- Watchdog ---------------------------------------------------------------


def test_watchdog_pings_only_while_check_passes(receiver):
    sock, env = receiver
    healthy = threading.Event()
    checked = threading.Event()

    def check() -> bool:
        checked.set()
        return healthy.is_set()

    stop = threading.Event()
    dog = systemd.Watchdog(0.02, check, stop, env=env)
    dog.start()
    try:
        assert checked.wait(2.0)
        assert_silent(sock)  # unhealthy: checks run, no pings

        healthy.set()
        assert recv(sock) == "WATCHDOG=1"
        assert recv(sock) == "WATCHDOG=1"

        healthy.clear()
        # Let a ping already in flight arrive, then nothing more.
        sock.settimeout(0.1)
        try:
            while True:
                sock.recv(4096)
        except TimeoutError:
            pass
        assert_silent(sock)
    finally:
        dog.stop()
    assert stop.is_set()
    assert not any(t.name == "crushd-watchdog" for t in threading.enumerate())


def test_watchdog_survives_a_raising_check(receiver, caplog):
    sock, env = receiver
    calls = []

    def check() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("health endpoint exploded")
        return True

    stop = threading.Event()
    dog = systemd.Watchdog(0.02, check, stop, env=env)
    dog.start()
    try:
        assert recv(sock) == "WATCHDOG=1"
    finally:
        dog.stop()
    assert "event=watchdog_check_failed" in caplog.text


def test_watchdog_stops_when_stop_event_is_set_and_stop_is_idempotent():
    stop = threading.Event()
    dog = systemd.Watchdog(60.0, lambda: True, stop, env={})
    dog.start()
    with pytest.raises(RuntimeError):
        dog.start()
    stop.set()  # the process-wide stop event ends the loop without waiting 60 s
    dog.stop(timeout=2.0)
    dog.stop(timeout=2.0)
    assert not any(t.name.startswith("crushd-watchdog") for t in threading.enumerate())


# --- listen_fds -------------------------------------------------------------


def test_listen_fds_ignores_and_unsets_foreign_variables():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}
    assert systemd.listen_fds(env) == []
    assert env == {}

    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert systemd.listen_fds(env, unset=False) == []
    assert env == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}

    assert systemd.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"}) == []
    assert systemd.listen_fds({}) == []


# The "service manager" side: put the socket on fd 3, set LISTEN_* for our own
# pid, then exec the service (exec keeps the pid, as systemd's fork+exec does).
MANAGER = textwrap.dedent(
    """
    import os, sys
    fd = int(sys.argv[1])
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="http")
    os.execve(sys.executable, [sys.executable, "-c", sys.argv[2]], env)
    """
)

SERVICE = textwrap.dedent(
    """
    import json, os, socket, sys
    from crushd.systemd import listen_fds
    socks = listen_fds()
    print(json.dumps({
        "count": len(socks),
        "fileno": socks[0].fileno(),
        "family": socks[0].family.name,
        "type": socks[0].type.name,
        "port": socks[0].getsockname()[1],
        "inheritable": socks[0].get_inheritable(),
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }), flush=True)
    conn, _ = socks[0].accept()
    with conn:
        conn.sendall(b"echo:" + conn.recv(1024))
    """
)


def test_listen_fds_in_an_activated_child():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    with listener:
        proc = subprocess.Popen(
            [sys.executable, "-c", MANAGER, str(listener.fileno()), SERVICE],
            pass_fds=[listener.fileno()],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    expected = {
        "count": 1,
        "fileno": 3,
        "family": "AF_INET",
        "type": "SOCK_STREAM",
        "port": port,
        "inheritable": False,
        "env_left": [],
    }
    try:
        info = json.loads(proc.stdout.readline() or "{}")
        if info != expected:
            proc.kill()  # it may sit in accept(); read its stderr only once it is gone
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"child saw {info}, expected {expected}\n{err}")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"hello")
            assert client.recv(1024) == b"echo:hello"
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# --- unit files -------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_service_unit_declares_the_contract():
    service = unit_settings(UNITS / "crushd.service")
    for key, value in {
        "Type": "notify",
        "NotifyAccess": "main",
        "StateDirectory": "crushd",
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",
        "Restart": "on-failure",
        "WatchdogSec": "30",
        "Environment": "PYTHONUNBUFFERED=1",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert service.get(key) == [value], key
    assert service["ExecStart"][0].startswith("/usr/local/bin/crushd serve")
    assert int(service["TimeoutStopSec"][0]) > 10 + 0 + 5  # shutdown + drain + waitress
    socket_unit = unit_settings(UNITS / "crushd.socket")
    assert socket_unit["ListenStream"] == ["127.0.0.1:7433"]


def systemd_analyze() -> str | None:
    found = shutil.which("systemd-analyze")
    if found:
        return found
    return "/usr/bin/systemd-analyze" if os.access("/usr/bin/systemd-analyze", os.X_OK) else None


def test_unit_files_pass_systemd_analyze_verify(tmp_path):
    assert systemd_analyze(), "systemd-analyze comes with systemd, which .ci/run installs"
    # verify insists that ExecStart= names an existing executable; crushd is not
    # installed here, so point the copy at /bin/true and change nothing else.
    service = (UNITS / "crushd.service").read_text()
    rewritten = service.replace("ExecStart=/usr/local/bin/crushd ", "ExecStart=/bin/true ")
    assert rewritten != service
    (tmp_path / "crushd.service").write_text(rewritten)
    shutil.copy(UNITS / "crushd.socket", tmp_path / "crushd.socket")

    result = subprocess.run(
        [systemd_analyze(), "verify", "crushd.service", "crushd.socket"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for marker in ("Unknown key", "Unknown section", "ignoring", "Invalid", "Failed"):
        assert marker not in result.stderr, result.stderr
