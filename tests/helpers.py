"""Helpers the test modules share: HTTP calls against a live crushd, event
stream readers, checks of the closing records, process and port probes.

Test modules import from here (or use the fixtures of ``conftest.py``);
no test module imports another.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from conftest import sse_events, wait_for

from crushd.common import TERMINAL_STATUSES


def register(http: httpx.Client, path: Path | str, yolo: bool | None = None) -> str:
    """Register ``path``; with ``yolo`` given, as that and checked."""
    body: dict[str, Any] = {"path": str(path)}
    if yolo is not None:
        body["yolo"] = yolo
    response = http.post("/v1/workspaces", json=body)
    assert response.status_code in (200, 201), response.text
    if yolo is not None:
        assert response.json()["yolo"] is yolo
    return response.json()["id"]


LONG = " ".join(f"word{i}" for i in range(200))


def prompt(http: httpx.Client, wid: str, text: str, **extra) -> httpx.Response:
    return http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": text, **extra})


def wait_terminal(http: httpx.Client, wid: str, rid: str, timeout: float = 20) -> dict:
    response = http.get(f"/v1/workspaces/{wid}/runs/{rid}", params={"wait": timeout})
    run = response.json()
    assert run["status"] in TERMINAL_STATUSES, run
    return run


def messages(http: httpx.Client, wid: str, sid: str) -> list[dict]:
    return http.get(f"/v1/workspaces/{wid}/sessions/{sid}/messages").json()


def finish_of(message: dict) -> dict:
    finishes = [p for p in message["parts"] if p["type"] == "finish"]
    assert len(finishes) == 1, message
    return finishes[0]


@contextmanager
def api(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as http:
        yield http


def submit(http: httpx.Client, wid: str, text: str, **extra: Any) -> dict[str, Any]:
    response = prompt(http, wid, text, **extra)
    assert response.status_code == 202, response.text
    return response.json()


class EventReader:
    """Reads one open SSE stream on the test thread; every read is bounded by
    the client's read timeout."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines
        self.seen: list[dict[str, Any]] = []  # the ``data`` objects, in order

    def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = sse_events(self._lines, 1, timeout)
            assert got, f"event stream ended; seen {[e['type'] for e in self.seen]}"
            data = got[0]["data"]
            assert int(got[0]["id"]) == data["seq"]
            self.seen.append(data)
            if predicate(data):
                return data
        raise AssertionError(f"no matching event; seen {[e['type'] for e in self.seen]}")


@contextmanager
def event_stream(url: str, wid: str, **params: Any) -> Iterator[EventReader]:
    with (
        httpx.Client(base_url=url, timeout=httpx.Timeout(10.0)) as http,
        http.stream("GET", f"/v1/workspaces/{wid}/events", params=params) as response,
    ):
        assert response.status_code == 200
        yield EventReader(response.iter_lines())


def is_type(kind: str, **payload: Any) -> Callable[[dict[str, Any]], bool]:
    def match(event: dict[str, Any]) -> bool:
        got = event["payload"] or {}
        return event["type"] == kind and all(got.get(k) == v for k, v in payload.items())

    return match


def run_events(url: str, wid: str, sid: str, rid: str) -> list[dict[str, Any]]:
    """Every buffered event of the session up to the run's ``run.completed``."""
    with event_stream(url, wid, since=0, session_id=sid) as events:
        events.until(is_type("run.completed", id=rid))
        return events.seen


def parts(message: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [p for p in message["parts"] if p["type"] == kind]


def assert_sealed(stored: list[dict[str, Any]]) -> None:
    """The contract's closing records: one finish per assistant message, every
    tool call finished with JSON input, every tool call answered exactly once."""
    calls, results = [], []
    for message in stored:
        if message["role"] == "assistant":
            finish_of(message)
            for call in parts(message, "tool_call"):
                assert call["finished"] is True, call
                json.loads(call["input"])
                calls.append(call["id"])
        elif message["role"] == "tool":
            results += [p["tool_call_id"] for p in parts(message, "tool_result")]
    assert sorted(calls) == sorted(results)


def pending_permission(http: httpx.Client, wid: str) -> dict[str, Any]:
    pending = wait_for(
        lambda: http.get(f"/v1/workspaces/{wid}/permissions").json(),
        10,
        message="no permission request arrived",
    )
    assert len(pending) == 1, pending
    return pending[0]


def decide(http: httpx.Client, wid: str, pid: str, decision: Any) -> httpx.Response:
    return http.post(f"/v1/workspaces/{wid}/permissions/{pid}", json={"decision": decision})


def processes_with(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):  # gone since listdir
            continue
        if marker in cmdline and state != b"Z":
            found.append(int(entry))
    return found


TEST_SERVER = str(Path(__file__).with_name("mcpserver.py"))


EVERYTHING = shutil.which("mcp-server-everything") or "mcp-server-everything"


TIME_SERVER = str(Path(sys.executable).with_name("mcp-server-time"))

#: What a sandboxed "bash -c 'mcp-server-time'" needs to see wherever the
#: virtualenv and its Python are (the sandbox hides homes and /tmp).
PYTHON_DIRS = sorted({sys.prefix, sys.base_prefix})


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rpartition(b")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


#: Chromium flags for the tests that drive Debian's chromium: nothing fetched
#: from the network besides the pages under test.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    """The path of Debian's chromium (the tests need it; they never skip)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is installed by .ci/run (apt-get install -y chromium)"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrubbed_env(*prefixes: str, drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """This process's environment for a crushd subprocess: without the
    developer's ``CRUSHD_*`` settings (and variables starting with any of
    ``prefixes``, and those named in ``drop``), unbuffered, plus ``extra``."""
    skip = ("CRUSHD_", *prefixes)
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip) and k not in drop}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def serve_once(data_dir: Path, *args: str, env: dict[str, str] | None = None):
    """Run ``crushd serve`` on port 0 to its end and return the finished
    process (for the ways it refuses to start); at most 30 s."""
    return subprocess.run(
        [sys.executable, "-m", "crushd", "serve", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


class PageServer:
    """A web page on another local origin (another port of 127.0.0.1: same-site,
    not same-origin), served by a second HTTP server on a thread.  ``page``
    may be set after start, once the page can name the server it attacks."""

    def __init__(self, page: bytes = b"") -> None:
        self.page = page
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(outer.page)))
                self.end_headers()
                self.wfile.write(outer.page)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="test-page")
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
