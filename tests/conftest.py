"""Shared fixtures: configs, an in-process server and app, a real waitress
server on a thread, and a real ``crushd serve`` subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakeprovider import FakeProvider
from waitress import wasyncore
from waitress.server import create_server

from crushd.app import create_app
from crushd.config import Config
from crushd.connections import guard_connections
from crushd.mcp import McpLoop
from crushd.serve import waitress_options
from crushd.server import Server

LISTENING = re.compile(r"event=listening addresses=(\S+)")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = ""):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"timed out after {timeout}s waiting")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves any thread running: crushd's, waitress's, the
    fake model server's or a stream reader's.  Threads get 5 s to finish."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    leaked = [t for t in threading.enumerate() if t not in before]
    while leaked and time.monotonic() < deadline:
        leaked[0].join(max(deadline - time.monotonic(), 0.01))
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads left behind: {sorted(t.name for t in leaked)}"


@pytest.fixture(autouse=True)
def isolated_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``$XDG_CONFIG_HOME`` at an empty directory, so the user's own
    ``~/.config/crushd/AGENTS.md`` never reaches a test's system prompt."""
    path = tmp_path / "xdg-config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(path))
    return path


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "echo_delay": 0.001,
        "shutdown_timeout": 5.0,
    }
    values.update(overrides)
    return Config.from_mapping(values)


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    """A local model server speaking the OpenAI and Anthropic wire protocols."""
    with FakeProvider() as server:
        yield server


#: The environment variable that holds the fake model's API key in live servers.
AGENT_KEY_ENV = "CRUSHD_TEST_AGENT_KEY"


@pytest.fixture
def agent(fake, live_factory, monkeypatch):
    """Start a live crushd whose model is the fake: ``agent(protocol="openai",
    **config_overrides)``."""
    monkeypatch.setenv(AGENT_KEY_ENV, "sk-agent-test")

    def start(protocol: str = "openai", **overrides: Any) -> LiveServer:
        values = {
            "provider": protocol,
            "model": "m",
            "base_url": fake.openai_base_url if protocol == "openai" else fake.anthropic_base_url,
            "api_key_env": AGENT_KEY_ENV,
        }
        values.update(overrides)
        return live_factory(**values)

    return start


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def server(config: Config) -> Iterator[Server]:
    srv = Server(config).start()
    yield srv
    srv.stop()


@pytest.fixture
def app(server: Server):
    return create_app(server=server)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A workspace directory for tools called directly, links resolved (as
    the server resolves a workspace's path)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    return Path(os.path.realpath(ws))


@pytest.fixture
def mcp_loop() -> Iterator[McpLoop]:
    loop = McpLoop()
    yield loop
    loop.stop()


class LiveServer:
    """A real waitress server on a real socket, run on a thread."""

    def __init__(self, config: Config) -> None:
        self.server = Server(config).start()
        self.app = create_app(server=self.server)
        options = waitress_options(config)
        self.wsgi = create_server(self.app, host="127.0.0.1", port=0, **options)
        guard_connections(self.wsgi, config.header_timeout, config.stall_timeout)
        self.url = f"http://127.0.0.1:{self.wsgi.effective_port}"
        self.thread = threading.Thread(target=self.wsgi.run, name="test-waitress")
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.wsgi.task_dispatcher.shutdown(timeout=5)
        self.wsgi.trigger.pull_trigger(lambda: wasyncore.close_all(self.wsgi._map))
        self.thread.join(10)


@pytest.fixture
def live_factory(tmp_path: Path):
    servers: list[LiveServer] = []

    def start(**overrides: Any) -> LiveServer:
        live = LiveServer(make_config(tmp_path, **overrides))
        servers.append(live)
        return live

    yield start
    for live in servers:
        live.stop()


@pytest.fixture
def live(live_factory) -> LiveServer:
    return live_factory()


class Daemon:
    """A real ``crushd serve`` process with its stderr captured to a file."""

    def __init__(
        self, data_dir: Path, log_path: Path, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.args = args
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, wait: bool = True) -> Daemon:
        self._log = self.log_path.open("ab")
        self._offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "crushd",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--port",
                "0",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=self.env,
        )
        if wait:
            address = wait_for(self._address, 20, message=f"daemon did not start:\n{self.log()}")
            self.url = f"http://{address}"
        return self

    def _address(self) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        match = LISTENING.search(self.log()[self._offset :])
        return match.group(1) if match else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if hasattr(self, "_log"):
            self._log.close()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


@pytest.fixture
def daemon_factory(tmp_path: Path):
    daemons: list[Daemon] = []

    def make(
        *args: str,
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
    ) -> Daemon:
        daemon = Daemon(
            data_dir or tmp_path / "data", tmp_path / f"daemon{len(daemons)}.log", *args, env=env
        )
        daemons.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in daemons:
        daemon.kill()


def sse_events(lines: Iterator[str], count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    """Read ``count`` events from SSE lines (``id``/``event``/``data``)."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    for line in lines:
        if time.monotonic() > deadline:
            break
        if line == "":
            if "data" in current:
                events.append(current)
                if len(events) >= count:
                    break
            current = {}
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            current[field] = json.loads(value) if field == "data" else value
    return events
