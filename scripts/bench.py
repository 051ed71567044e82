#!/usr/bin/env python3
"""Benchmarks of crushd; prints one JSON document.

(a) ``submit``: POST /agent latency (p50/p99) and requests/s from 32
    concurrent clients while >= 200 runs stream, next to GET /v1/health on
    the same server in the same run.
(b) ``stream``: message.delta events/s delivered end to end to an SSE
    client, and database writes per streamed assistant message.
(c) ``stop``: seconds from SIGTERM to exit with 100 runs streaming across
    10 workspaces.
(d) ``bash``: latency (p50/p99) of one ``bash`` tool call running ``true``,
    unsandboxed and in the bubblewrap sandbox (network on and off).
(e) ``mcp``: an MCP server's start (to ``connected``), the latency (p50/p99)
    of one tool call through the synchronous facade, the time from a cancel
    to the run thread being free, and a workspace close; against the
    reference server-everything over stdio (``npm install -g
    @modelcontextprotocol/server-everything``).
(f) ``stalled``: the server's peak RSS with 20 event-stream readers that
    never read while runs stream fast, how long until every stalled stream
    was cut, and GET /v1/health latency meanwhile (target: RSS < 150 MB).
(g) ``retry``: against the fake model server of ``tests/fakeprovider.py``,
    how much later than a 429's ``Retry-After: 1`` the retry arrives, how
    long a cancel takes to end a run waiting out a 30 s ``Retry-After``
    (target: < 1 s), and how much later than ``--stream-idle-timeout 1`` a
    silent stream is retried.

(h) ``burst``: against the fake model server of ``tests/fakeprovider.py``
    (in a process of its own) streaming 22 words 20 ms apart, one run alone
    end to end, 20 prompts one after another, then 100 prompts submitted at
    once (a new session each, on plain sockets opened beforehand): accept
    p50/p99, first ``message.delta`` p50/p99 seen by an event-stream
    subscriber, and when the last run was done.
(i) ``peer``: (h) against crushd and against ``opencode serve`` (npm
    ``opencode-linux-x64``, installed into a temporary directory), on the same
    fake in the same run, with the ratios.  Only when named: it needs npm.
(j) ``provider``: the CPU time of one provider request, from its start to
    its first text delta (the requesting thread's own), with 0 to 400 other
    streams of the same provider in flight, against the fake model server.
(k) ``floor``: (h)'s burst on the bare stack, without crushd: 100 POSTs at
    once to a Flask app on waitress that only answers 202, and 100 streaming
    requests at once with httpx (a client and a thread each) to the fake
    model; latency and CPU per request of each, and the first-text p50 they
    leave possible when prompts are accepted before runs start.
(l) ``checkpoint``: against the fake model of (h), a run's first
    ``message.delta`` after its submit, with checkpoints on and off, on a
    workspace of 3,000 files (30 MB): the first run (its snapshot hashes
    the whole tree while the model streams), then 20 more one after
    another; and the snapshot itself timed in process, the first one and
    one after a single file changed.

A single burst varies by a fifth from one run to the next on a small
machine; ``--repeat N`` runs (h) and (i) N times (alternating the two
servers) and reports the median of each figure.

Usage: ``python scripts/bench.py [SCENARIO] [--quick] [--repeat N]``.  Everything runs on loopback
against a real ``crushd serve`` (a) and (c), or waitress on a thread (b).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

LISTENING = re.compile(r"event=listening addresses=(\S+)")
TESTS = Path(__file__).resolve().parent.parent / "tests"


def import_tests() -> None:
    """Make ``tests/`` importable: the fake model server lives there."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


class Daemon:
    def __init__(self, root: Path, *args: str) -> None:
        self.log_path = root / "daemon.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "crushd",
                "serve",
                "--port",
                "0",
                "--data-dir",
                str(root / "data"),
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + 30
        while not (match := LISTENING.search(self.log_path.read_text())):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(self.log_path.read_text())
            time.sleep(0.05)
        self.url = f"http://{match.group(1)}"

    def stop(self) -> float:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self._log.close()
        return time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def make_workspaces(http: httpx.Client, root: Path, count: int) -> list[str]:
    ids = []
    for i in range(count):
        path = root / f"ws{i}"
        path.mkdir()
        ids.append(http.post("/v1/workspaces", json={"path": str(path)}).json()["id"])
    return ids


def timed_requests(url: str, clients: int, per_client: int, request) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(per_client):
                started = time.perf_counter()
                response = request(http, n, i)
                elapsed = time.perf_counter() - started
                if response.status_code >= 300:
                    raise RuntimeError(f"{response.status_code}: {response.text}")
                with lock:
                    latencies.append(elapsed)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker, n) for n in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "requests_per_s": round(len(latencies) / wall, 1),
    }


def bench_submit(root: Path, quick: bool) -> dict:
    streaming = 200
    daemon = Daemon(
        root, "--echo-delay", "0.05", "--workers", "25", "--threads", "64", "--max-queue", "10000"
    )
    try:
        with httpx.Client(base_url=daemon.url, timeout=60) as http:
            workspaces = make_workspaces(http, root, 8)
            long_prompt = " ".join(["streaming"] * 4000)
            for i in range(streaming):
                http.post(f"/v1/workspaces/{workspaces[i % 8]}/agent", json={"prompt": long_prompt})
            deadline = time.monotonic() + 60
            while http.get("/v1/health").json()["active_runs"] < streaming:
                if time.monotonic() > deadline:
                    raise RuntimeError("runs did not start")
                time.sleep(0.1)
            per_client = 10 if quick else 40
            health = timed_requests(daemon.url, 32, per_client, lambda h, n, i: h.get("/v1/health"))
            submit = timed_requests(
                daemon.url,
                32,
                per_client,
                lambda h, n, i: h.post(
                    f"/v1/workspaces/{workspaces[n % 8]}/agent", json={"prompt": "short"}
                ),
            )
            active = http.get("/v1/health").json()["active_runs"]
    finally:
        daemon.stop()
    return {
        "streaming_runs": streaming,
        "active_runs_after": active,
        "clients": 32,
        "post_agent": submit,
        "get_health": health,
        "p50_ratio": round(submit["p50_ms"] / health["p50_ms"], 2),
    }


def bench_stream(root: Path, quick: bool) -> dict:
    from waitress import wasyncore
    from waitress.server import create_server

    from crushd.app import create_app
    from crushd.common import TERMINAL_STATUSES
    from crushd.config import Config
    from crushd.serve import waitress_options
    from crushd.server import Server
    from crushd.store import WorkspaceStore

    writes: dict[str, int] = {}
    original = WorkspaceStore.update_message

    def counting(self, message, parts):
        writes[message["id"]] = writes.get(message["id"], 0) + 1
        return original(self, message, parts)

    WorkspaceStore.update_message = counting
    config = Config.from_mapping(
        {"data_dir": root / "stream-data", "echo_delay": 0.0, "max_body": 8 * 1024 * 1024}
    )
    server = Server(config).start()
    wsgi = create_server(
        create_app(server=server), host="127.0.0.1", port=0, **waitress_options(config)
    )
    thread = threading.Thread(target=wsgi.run, name="bench-waitress")
    thread.start()
    url = f"http://127.0.0.1:{wsgi.effective_port}"
    words = 20_000 if quick else 50_000
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            project = root / "stream-project"
            project.mkdir()
            wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
            started = time.perf_counter()
            rid = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "w " * words}).json()[
                "id"
            ]
            deltas, last_id, done, reconnects, resets = 0, "0", False, -1, 0
            while not done:  # a client dropped for reading too slowly reconnects
                reconnects += 1
                with http.stream(
                    "GET", f"/v1/workspaces/{wid}/events", headers={"Last-Event-ID": last_id}
                ) as stream:
                    for line in stream.iter_lines():
                        if line.startswith("id: "):
                            last_id = line[4:]
                        elif line == "event: message.delta":
                            deltas += 1
                        elif line == "event: run.completed":
                            done = True
                            break
                        elif line == "event: reset":  # fell behind the buffer: refetch
                            resets += 1
                            run = http.get(f"/v1/workspaces/{wid}/runs/{rid}").json()
                            done = run["status"] in TERMINAL_STATUSES
                            if done:
                                break
            elapsed = time.perf_counter() - started
    finally:
        server.stop()
        wsgi.task_dispatcher.shutdown(timeout=5)
        wsgi.trigger.pull_trigger(lambda: wasyncore.close_all(wsgi._map))
        thread.join(10)
        WorkspaceStore.update_message = original
    assistant_writes = max(writes.values())
    return {
        "words": words,
        "deltas": deltas,
        "seconds": round(elapsed, 3),
        "reconnects": reconnects,
        "resets": resets,
        "deltas_per_s": round(deltas / elapsed, 1),
        "db_writes_per_assistant_message": assistant_writes,
        "db_writes_per_second_of_streaming": round(assistant_writes / elapsed, 2),
    }


def bench_stop(root: Path, quick: bool) -> dict:
    daemon = Daemon(root, "--echo-delay", "0.05", "--workers", "10")
    with httpx.Client(base_url=daemon.url, timeout=60) as http:
        workspaces = make_workspaces(http, root, 10)
        for wid in workspaces:
            for _ in range(10):
                http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "w " * 5000})
        deadline = time.monotonic() + 60
        while http.get("/v1/health").json()["active_runs"] < 100:
            if time.monotonic() > deadline:
                raise RuntimeError("runs did not start")
            time.sleep(0.1)
    seconds = daemon.stop()
    return {
        "streaming_runs": 100,
        "workspaces": 10,
        "sigterm_to_exit_s": round(seconds, 3),
        "exit_code": daemon.proc.returncode,
    }


def bench_bash(root: Path, quick: bool) -> dict:
    from crushd.cancel import CancelToken
    from crushd.tools import ToolContext
    from crushd.tools.bash import BashTool
    from crushd.tools.sandbox import detect, sandbox_for

    bwrap = detect()
    tool, calls = BashTool(), 20 if quick else 200
    variants = {"unsandboxed": None}
    if bwrap.available:
        for network in (True, False):
            variants[f"bwrap_network_{str(network).lower()}"] = sandbox_for(
                bwrap, root, "workspace-write", network
            )
    results: dict = {"calls": calls, "bwrap": bwrap.executable or bwrap.reason}
    for name, sandbox in variants.items():
        ctx = ToolContext(root=root, token=CancelToken(), sandbox=sandbox)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            tool.run({"command": "true"}, ctx)
            times.append((time.perf_counter() - started) * 1000)
        results[name] = {
            "p50_ms": round(percentile(times, 0.5), 2),
            "p99_ms": round(percentile(times, 0.99), 2),
        }
    return results


def bench_mcp(root: Path, quick: bool) -> dict:
    import shutil

    from crushd.cancel import Cancelled, CancelToken
    from crushd.mcp import McpLoop, WorkspaceMcp
    from crushd.mcp_config import parse_mcp_tables
    from crushd.tools import ToolContext

    command = shutil.which("mcp-server-everything")
    if command is None:
        return {"skipped": "mcp-server-everything is not installed"}
    calls = 20 if quick else 300
    loop = McpLoop()
    tables = {"e": {"command": command, "args": ["stdio"]}}
    ws = WorkspaceMcp(parse_mcp_tables(tables), root, loop)
    started = time.perf_counter()
    ws.start()
    while ws.entries()[0]["status"] == "starting":
        time.sleep(0.005)
    connect_s = time.perf_counter() - started
    tools = ws.tools()
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        tools["mcp_e_get-sum"].run({"a": 1, "b": 2}, ToolContext(root=root, token=CancelToken()))
        times.append((time.perf_counter() - began) * 1000)
    cancels = []
    for _ in range(3 if quick else 10):
        token = CancelToken()
        cancelled_at: list[float] = []

        def cancel(token: CancelToken = token, at: list[float] = cancelled_at) -> None:
            at.append(time.perf_counter())
            token.cancel()

        timer = threading.Timer(0.2, cancel)
        timer.start()
        try:
            tools["mcp_e_trigger-long-running-operation"].run(
                {"duration": 30, "steps": 3}, ToolContext(root=root, token=token)
            )
        except Cancelled:
            cancels.append((time.perf_counter() - cancelled_at[0]) * 1000)
        timer.join()
    began = time.perf_counter()
    ws.close()
    close_s = time.perf_counter() - began
    loop.stop()
    return {
        "connect_s": round(connect_s, 3),
        "calls": calls,
        "call_p50_ms": round(percentile(times, 0.5), 2),
        "call_p99_ms": round(percentile(times, 0.99), 2),
        "cancel_to_free_max_ms": round(max(cancels), 2),
        "close_s": round(close_s, 3),
    }


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds the process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_stalled(root: Path, quick: bool) -> dict:
    readers_count = 5 if quick else 20
    daemon = Daemon(root, "--echo-delay", "0", "--threads", "64")
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    readers = []
    health_ms: list[float] = []
    with httpx.Client(base_url=daemon.url, timeout=120) as http:
        wid = make_workspaces(http, root, 1)[0]
        for _ in range(readers_count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            sock.sendall(
                f"GET /v1/workspaces/{wid}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            )
            readers.append(sock)
        started = time.monotonic()
        prompt = "word " * (5_000 if quick else 20_000)
        runs = [
            http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": prompt}).json()["id"]
            for _ in range(4 if quick else 10)
        ]
        peak = 0
        for run in runs:
            while http.get(f"/v1/workspaces/{wid}/runs/{run}").json()["status"] != "completed":
                peak = max(peak, rss_kb(daemon.proc.pid))
                t0 = time.monotonic()
                http.get("/v1/health")
                health_ms.append((time.monotonic() - t0) * 1000)
                time.sleep(0.1)
        cut_after = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            peak = max(peak, rss_kb(daemon.proc.pid))
            if daemon.log_path.read_text().count("reason=reader_stalled") >= readers_count:
                cut_after = round(time.monotonic() - started, 2)
                break
            time.sleep(0.2)
        peak = max(peak, rss_kb(daemon.proc.pid, "VmHWM"))
    for sock in readers:
        sock.close()
    daemon.stop()
    return {
        "stalled_readers": readers_count,
        "runs": len(runs),
        "peak_rss_mb": round(peak / 1024, 1),
        "all_stalled_cut_after_s": cut_after,
        "health_ms_p50": round(percentile(health_ms, 0.5), 1),
        "health_ms_p99": round(percentile(health_ms, 0.99), 1),
    }


def bench_retry(root: Path, quick: bool) -> dict:
    import_tests()
    from fakeprovider import FakeProvider, Hang, HTTPError, Text

    rounds = 2 if quick else 5
    # Backoff of ~1 ms, so the idle retry's gap is the idle timeout itself.
    config = root / "bench.toml"
    config.write_text("retry_base_delay = 0.001\n")
    with FakeProvider() as fake:
        daemon = Daemon(
            root,
            "--config",
            str(config),
            "--provider",
            "openai",
            "--model",
            "bench",
            "--base-url",
            fake.openai_base_url,
            "--stream-idle-timeout",
            "1",
        )
        try:
            with httpx.Client(base_url=daemon.url, timeout=60) as http:
                wid = make_workspaces(http, root, 1)[0]

                def turn(first: list, then: list | None) -> tuple[dict, float]:
                    """One prompt; returns the run and the gap between the
                    fake's first two requests (0 with one request)."""
                    seen = len(fake.requests)
                    fake.script(first)
                    if then is not None:
                        fake.script(then)
                    run = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "p"}).json()
                    done = http.get(f"/v1/workspaces/{wid}/runs/{run['id']}?wait=60").json()
                    got = fake.requests[seen:]
                    gap = got[1].time - got[0].time if len(got) > 1 else 0.0
                    return done, gap

                late_429, late_idle, cancel_ms = [], [], []
                for _ in range(rounds):
                    limited = HTTPError(429, "slow down", headers={"Retry-After": "1"})
                    done, gap = turn([limited], [Text("ok")])
                    assert done["status"] == "completed", done
                    late_429.append((gap - 1.0) * 1000)
                    done, gap = turn([Text("x"), Hang()], [Text("ok")])
                    assert done["status"] == "completed", done
                    late_idle.append((gap - 1.0) * 1000)
                for _ in range(rounds * 2):
                    seen = len(fake.requests)
                    fake.script([HTTPError(429, "later", headers={"Retry-After": "30"})])
                    run = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "p"}).json()
                    fake.wait_for_requests(seen + 1, 10)
                    time.sleep(0.2)  # the run is in its backoff now
                    started = time.monotonic()
                    http.post(f"/v1/workspaces/{wid}/runs/{run['id']}/cancel")
                    done = http.get(f"/v1/workspaces/{wid}/runs/{run['id']}?wait=10").json()
                    assert done["status"] == "cancelled", done
                    cancel_ms.append((time.monotonic() - started) * 1000)
        finally:
            daemon.stop()

    def stats(values: list[float]) -> dict:
        return {
            "p50_ms": round(percentile(values, 0.5), 1),
            "max_ms": round(max(values), 1),
        }

    return {
        "rounds": rounds,
        "retry_after_1s_late": stats(late_429),
        "idle_timeout_1s_late": stats(late_idle),
        "cancel_during_30s_backoff": stats(cancel_ms),
    }


# ------------------------------------------------------------------ bursts

BURST_WORDS, BURST_WORD_GAP_S = 22, 0.02


def serve_fake_model() -> None:
    """``--fake-model``: serve the burst's model until stdin closes; every
    request streams 22 words 20 ms apart.  Prints the OpenAI base URL."""
    import_tests()
    from fakeprovider import FakeProvider, Finish, Pause, Text, Usage

    steps: list = []
    for i in range(BURST_WORDS):
        steps += [Text(f"word{i} "), Pause(BURST_WORD_GAP_S)]
    with FakeProvider() as fake:
        fake.set_default([*steps, Usage(10, BURST_WORDS), Finish("stop")])
        print(fake.openai_base_url, flush=True)
        sys.stdin.read()


class FakeModel:
    """The burst's fake model in a process of its own, so that its hundred
    streaming threads do not share the measuring client's GIL."""

    def __enter__(self) -> FakeModel:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--fake-model"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.openai_base_url = self._proc.stdout.readline().strip()
        if not self.openai_base_url:
            raise RuntimeError("the fake model did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._proc.stdin.close()
        self._proc.wait(30)


class Connection:
    """One keep-alive HTTP/1.1 connection that does as little as a client
    can: a hundred of them share the bench's GIL in a burst, and httpx's
    per-request work there (about 1 ms each) was counted as the server's
    latency."""

    def __init__(self, url: str) -> None:
        parsed = httpx.URL(url)
        self._host = f"{parsed.host}:{parsed.port}".encode()
        self._sock = socket.create_connection((parsed.host, parsed.port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def post(self, path: str, body: object) -> tuple[int, object]:
        """POST ``body`` as JSON; returns the status and the decoded JSON reply."""
        data = json.dumps(body).encode()
        self._sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self._host, len(data), data)
        )
        while b"\r\n\r\n" not in self._buffer:
            self._receive()
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        fields = dict(line.lower().split(b":", 1) for line in lines[1:])
        if b"content-length" not in fields:
            raise RuntimeError(f"{path}: a reply without Content-Length: {head!r}")
        length = int(fields[b"content-length"])
        while len(self._buffer) < length:
            self._receive()
        reply, self._buffer = self._buffer[:length], self._buffer[length:]
        return status, json.loads(reply) if reply else None

    def _receive(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        self._buffer += chunk

    def close(self) -> None:
        self._sock.close()


class Subscriber:
    """Reads one event stream on a thread; records, per session, when its
    first text delta and its end arrived (``time.perf_counter``)."""

    def __init__(self, url: str, path: str, parse) -> None:
        self.first_delta: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self._parse = parse  # data line -> ("delta"|"done"|None, session id)
        self._changed = threading.Condition()
        self._opened = threading.Event()
        self._client = httpx.Client(base_url=url, timeout=httpx.Timeout(10, read=None))
        self._stream = self._client.stream("GET", path)
        self._thread = threading.Thread(target=self._read, name="bench-subscriber")
        self._thread.start()
        if not self._opened.wait(30):
            raise RuntimeError("event stream did not open")

    def _read(self) -> None:
        try:
            with self._stream as response:
                self._opened.set()
                rest = b""
                for chunk in response.iter_raw():  # text/event-stream is UTF-8 lines
                    now = time.perf_counter()
                    *lines, rest = (rest + chunk).split(b"\n")
                    for line in lines:
                        if not line.startswith(b"data:"):
                            continue
                        kind, session = self._parse(line[5:].strip())
                        with self._changed:
                            if kind == "delta":
                                self.first_delta.setdefault(session, now)
                            elif kind == "done":
                                self.done.setdefault(session, now)
                                self._changed.notify_all()
        except httpx.HTTPError:
            pass  # closed by close()

    def wait_done(self, sessions, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not all(s in self.done for s in sessions):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [s for s in sessions if s not in self.done]
                    raise RuntimeError(f"{len(missing)} runs did not end")
                self._changed.wait(left)

    def close(self) -> None:
        self._client.close()
        self._thread.join(10)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def spread(values: list[float]) -> dict:
    return {"p50_ms": ms(percentile(values, 0.5)), "p99_ms": ms(percentile(values, 0.99))}


def run_scenarios(target, runs: int, sequential: int) -> dict:
    """After one warm-up prompt: one run alone, ``sequential`` prompts one
    after another, then ``runs`` prompts submitted at once (a new session
    each); ``target`` speaks one server's API (``submit(connection) ->
    session id``, ``subscriber()``, ``pid``).  Every burst connection is
    open before the burst starts.  ``server_cpu_s`` is the CPU the server
    process used from the burst's start until its last run was done."""
    subscriber = target.subscriber()
    connections: list[Connection] = []
    try:
        http = Connection(target.url)
        connections.append(http)
        warm = target.submit(http)  # a server's first prompt may load things
        subscriber.wait_done([warm], 60)
        began = time.perf_counter()
        alone = target.submit(http)
        subscriber.wait_done([alone], 60)
        alone_s = subscriber.done[alone] - began
        accepts, firsts = [], []
        for _ in range(sequential):
            began = time.perf_counter()
            session = target.submit(http)
            accepts.append(time.perf_counter() - began)
            subscriber.wait_done([session], 60)
            firsts.append(subscriber.first_delta[session] - began)
        connections += [Connection(target.url) for _ in range(runs)]
        barrier = threading.Barrier(runs)

        def one(connection: Connection) -> tuple[str, float, float]:
            barrier.wait()
            began = time.perf_counter()
            session = target.submit(connection)
            return session, began, time.perf_counter() - began

        cpu_before = cpu_s(target.pid)
        with ThreadPoolExecutor(runs) as pool:
            burst = list(pool.map(one, connections[1:]))
        start = min(began for _, began, _ in burst)
        subscriber.wait_done([s for s, _, _ in burst], 300)
        server_cpu = cpu_s(target.pid) - cpu_before
    finally:
        for connection in connections:
            connection.close()
        subscriber.close()
    last_done = max(subscriber.done[s] for s, _, _ in burst) - start
    return {
        "alone_s": round(alone_s, 3),
        "sequential": {
            "prompts": sequential,
            "accept": spread(accepts),
            "first_delta": spread(firsts),
        },
        "burst": {
            "prompts": runs,
            "accept": spread([took for _, _, took in burst]),
            "first_delta": spread([subscriber.first_delta[s] - b for s, b, _ in burst]),
            "last_done_s": round(last_done, 3),
            "last_done_over_alone": round(last_done / alone_s, 2),
            "server_cpu_s": round(server_cpu, 2),
        },
    }


class CrushdTarget:
    def __init__(self, url: str, workspace: str, pid: int) -> None:
        self.url, self.workspace, self.pid = url, workspace, pid

    def submit(self, http: Connection) -> str:
        status, run = http.post(f"/v1/workspaces/{self.workspace}/agent", {"prompt": "hi"})
        if status != 202:
            raise RuntimeError(f"{status}: {run}")
        return run["session_id"]

    def subscriber(self) -> Subscriber:
        def parse(data: str) -> tuple[str | None, str]:
            event = json.loads(data)
            kind = {"message.delta": "delta", "run.completed": "done"}.get(event["type"])
            return kind, event["session_id"]

        return Subscriber(self.url, f"/v1/workspaces/{self.workspace}/events", parse)


def crushd_burst(root: Path, fake, runs: int, sequential: int) -> dict:
    daemon = Daemon(
        root,
        *("--provider", "openai", "--model", "bench", "--base-url", fake.openai_base_url),
        *("--workers", "128", "--threads", "64"),
    )
    try:
        with httpx.Client(base_url=daemon.url, timeout=60) as http:
            workspace = make_workspaces(http, root, 1)[0]
        results = run_scenarios(
            CrushdTarget(daemon.url, workspace, daemon.proc.pid), runs, sequential
        )
    finally:
        daemon.stop()
    return results


def medians(samples: list[dict]) -> dict:
    """The median of every number across ``samples`` (dicts of one shape)."""
    first = samples[0]
    if len(samples) == 1:
        return first
    merged: dict = {}
    for key, value in first.items():
        values = [sample[key] for sample in samples]
        if isinstance(value, dict):
            merged[key] = medians(values)
        elif (
            isinstance(value, int | float) and not isinstance(value, bool) and len(set(values)) > 1
        ):
            merged[key] = round(statistics.median(values), 3)
        else:
            merged[key] = value
    return merged


def bench_burst(root: Path, quick: bool, repeat: int = 1) -> dict:
    runs, sequential = (20, 5) if quick else (100, 20)
    with FakeModel() as fake:
        samples = []
        for i in range(repeat):
            (root / str(i)).mkdir()
            samples.append(crushd_burst(root / str(i), fake, runs, sequential))
    return {**medians(samples), "repeat": repeat}


OPENCODE_PACKAGE, OPENCODE_VERSION = "opencode-linux-x64", "1.18.34"


class OpencodeTarget:
    """``opencode serve``: a prompt is ``POST /session`` then
    ``POST /session/{id}/prompt_async`` (both are counted as its accept);
    ``GET /event`` streams ``message.part.delta`` and ``session.idle``."""

    def __init__(self, url: str, pid: int) -> None:
        self.url, self.pid = url, pid

    def submit(self, http: Connection) -> str:
        status, session = http.post("/session", {})
        if status != 200:
            raise RuntimeError(f"POST /session: {status}: {session}")
        prompt = {"parts": [{"type": "text", "text": "hi"}]}
        status, reply = http.post(f"/session/{session['id']}/prompt_async", prompt)
        if status >= 300:
            raise RuntimeError(f"POST prompt_async: {status}: {reply}")
        return session["id"]

    def subscriber(self) -> Subscriber:
        def parse(data: str) -> tuple[str | None, str]:
            event = json.loads(data)
            kind = {"message.part.delta": "delta", "session.idle": "done"}.get(event["type"])
            return kind, event.get("properties", {}).get("sessionID", "")

        return Subscriber(self.url, "/event", parse)


def install_opencode(root: Path) -> Path | str:
    """The opencode binary installed with npm under ``root``, or why not."""
    import shutil

    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed"
    spec = f"{OPENCODE_PACKAGE}@{OPENCODE_VERSION}"
    done = subprocess.run(
        [npm, "install", "--prefix", str(root), "--no-audit", "--no-fund", spec],
        capture_output=True,
        text=True,
        timeout=600,
    )
    binary = root / "node_modules" / OPENCODE_PACKAGE / "bin" / "opencode"
    if done.returncode != 0 or not binary.exists():
        return f"npm install {spec} failed: {done.stderr.strip()[-300:]}"
    return binary


def opencode_burst(root: Path, fake, runs: int, sequential: int, *, binary: Path) -> dict:
    config = {
        "provider": {
            "fake": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "fake",
                "options": {"baseURL": fake.openai_base_url, "apiKey": "bench"},
                "models": {"bench": {"name": "bench"}},
            }
        },
        "model": "fake/bench",
        "share": "disabled",
        "autoupdate": False,
    }
    home = root / "opencode-home"
    project = root / "opencode-project"
    project.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        **{f"XDG_{d}_HOME": str(home / d.lower()) for d in ("CONFIG", "DATA", "CACHE", "STATE")},
        "OPENCODE_CONFIG_CONTENT": json.dumps(config),
        "OPENCODE_DISABLE_AUTOUPDATE": "1",
    }
    log_path = root / "opencode.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(binary), "serve", "--port", "0", "--hostname", "127.0.0.1"],
            cwd=project,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            listening = re.compile(r"(http://127\.0\.0\.1:\d+)")
            while not (match := listening.search(log_path.read_text(errors="replace"))):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(log_path.read_text(errors="replace"))
                time.sleep(0.05)
            return run_scenarios(OpencodeTarget(match.group(1), proc.pid), runs, sequential)
        finally:
            proc.terminate()
            proc.wait(30)


def bench_peer(root: Path, quick: bool, repeat: int = 1) -> dict:
    """The burst and the sequential scenario against crushd and against
    ``opencode serve``, both on the same fake model, in one run (``repeat``
    times, one server after the other, reporting medians)."""
    binary = install_opencode(root / "npm")
    if isinstance(binary, str):
        return {"skipped": binary}
    runs, sequential = (20, 5) if quick else (100, 20)
    crushd_samples, opencode_samples = [], []
    with FakeModel() as fake:
        for i in range(repeat):
            for name, samples, burst in (
                ("crushd", crushd_samples, crushd_burst),
                ("opencode", opencode_samples, functools.partial(opencode_burst, binary=binary)),
            ):
                (root / f"{name}-{i}").mkdir()
                samples.append(burst(root / f"{name}-{i}", fake, runs, sequential))
    crushd, opencode = medians(crushd_samples), medians(opencode_samples)

    def ratio(path: tuple[str, ...]) -> float:
        a, b = crushd, opencode
        for key in path:
            a, b = a[key], b[key]
        return round(a / b, 3)

    return {
        "opencode": f"{OPENCODE_PACKAGE}@{OPENCODE_VERSION}",
        "repeat": repeat,
        "crushd": crushd,
        "opencode_serve": opencode,
        "crushd_over_opencode": {
            "burst_accept_p99": ratio(("burst", "accept", "p99_ms")),
            "burst_first_delta_p50": ratio(("burst", "first_delta", "p50_ms")),
            "burst_last_done": ratio(("burst", "last_done_s")),
            "sequential_accept_p50": ratio(("sequential", "accept", "p50_ms")),
            "sequential_first_delta_p50": ratio(("sequential", "first_delta", "p50_ms")),
        },
    }


# ------------------------------------------------------------ the stack's floor

BARE_RUN = {
    "id": "3f0c8a52-6c1e-4d47-9d0e-5d1f7b2a9c11",
    "workspace_id": "9b1d2c3e-4f5a-4b6c-8d7e-0f1a2b3c4d5e",
    "session_id": "a7e6d5c4-b3a2-4918-8776-655443322110",
    "kind": "prompt",
    "model": "bench",
    "status": "queued",
    "error": None,
    "message_id": None,
    "text": "",
    "created_at": "2026-12-07T06:00:00.000000Z",
    "started_at": None,
    "finished_at": None,
    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": None},
}


def serve_bare_app() -> None:
    """``--bare-app``: Flask on waitress (64 threads, as the burst's crushd)
    answering ``POST /agent`` with a run-shaped 202 and doing nothing else:
    what one accept costs this stack before crushd's own work.  Prints its URL;
    runs until terminated."""
    from flask import Flask, request
    from waitress.server import create_server

    app = Flask("bare")

    @app.post("/agent")
    def agent() -> tuple[dict, int]:
        return {**BARE_RUN, "prompt": request.get_json(force=True)["prompt"]}, 202

    server = create_server(app, host="127.0.0.1", port=0, threads=64, connection_limit=1000)
    print(f"http://127.0.0.1:{server.effective_port}", flush=True)
    server.run()


def bare_accepts(runs: int) -> dict:
    """``runs`` POSTs at once to the bare app: latency, and its CPU per accept."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--bare-app"], stdout=subprocess.PIPE, text=True
    )
    try:
        url = proc.stdout.readline().strip()
        connections = [Connection(url) for _ in range(runs)]
        connections[0].post("/agent", {"prompt": "warm"})
        barrier = threading.Barrier(runs)

        def one(connection: Connection) -> tuple[float, float]:
            barrier.wait()
            began = time.perf_counter()
            status, _ = connection.post("/agent", {"prompt": "hi"})
            if status != 202:
                raise RuntimeError(f"bare app: {status}")
            return began, time.perf_counter()

        cpu_before = cpu_s(proc.pid)
        with ThreadPoolExecutor(runs) as pool:
            times = list(pool.map(one, connections))
        cpu = cpu_s(proc.pid) - cpu_before
        for connection in connections:
            connection.close()
    finally:
        proc.terminate()
        proc.wait(30)
    start = min(began for began, _ in times)
    return {
        "accept": spread([done - began for began, done in times]),
        "all_accepted_ms": ms(max(done for _, done in times) - start),
        "server_cpu_ms_per_accept": round(cpu * 1000 / runs, 2),
    }


def bare_streams(base_url: str, runs: int) -> dict:
    """``runs`` streaming requests at once with httpx, one client and thread
    each (as crushd's runs), to the fake model: time to the first text, and
    this process's CPU per request."""
    clients = [
        httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0))
        for _ in range(runs)
    ]
    body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    barrier = threading.Barrier(runs + 1)
    firsts: list[float] = []

    def one(client: httpx.Client) -> None:
        barrier.wait()
        with client.stream("POST", base_url + "/chat/completions", json=body) as reply:
            for line in reply.iter_lines():
                if line.startswith("data:") and "word0" in line:
                    firsts.append(time.perf_counter())
                    return

    threads = [threading.Thread(target=one, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    barrier.wait()
    start, cpu_before = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.join(60)
    cpu = time.process_time() - cpu_before
    for client in clients:
        client.close()
    if len(firsts) != runs:
        raise RuntimeError(f"{runs - len(firsts)} bare streams showed no text")
    return {
        "first_text": spread([first - start for first in firsts]),
        "cpu_ms_per_request": round(cpu * 1000 / runs, 2),
    }


def checkpoint_tree(path: Path, files: int, size: int) -> int:
    """A project-like tree: ``files`` files of ``size`` bytes in 30 directories."""
    total = 0
    for i in range(files):
        folder = path / f"pkg{i % 30:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = (f"line {i} " * (size // 8 + 1)).encode()[:size]
        (folder / f"mod{i:05d}.py").write_bytes(data)
        total += len(data)
    return total


def checkpoint_first_deltas(root: Path, fake, tree: Path, runs: int, *flags: str) -> dict:
    """First-delta latency of ``runs`` prompts one after another on ``tree``."""
    daemon = Daemon(
        root,
        *("--provider", "openai", "--model", "bench", "--base-url", fake.openai_base_url),
        *flags,
    )
    try:
        with httpx.Client(base_url=daemon.url, timeout=60) as http:
            workspace = http.post("/v1/workspaces", json={"path": str(tree)}).json()["id"]
        target = CrushdTarget(daemon.url, workspace, daemon.proc.pid)
        subscriber = target.subscriber()
        connection = Connection(daemon.url)
        firsts = []
        try:
            for _ in range(runs + 1):
                began = time.perf_counter()
                session = target.submit(connection)
                subscriber.wait_done([session], 60)
                firsts.append(subscriber.first_delta[session] - began)
        finally:
            connection.close()
            subscriber.close()
    finally:
        daemon.stop()
    return {"first_run_ms": ms(firsts[0]), "first_delta": spread(firsts[1:])}


def bench_checkpoint(root: Path, quick: bool) -> dict:
    from crushd.checkpoints import CheckpointStore

    files, size, runs = (600, 10_000, 5) if quick else (3000, 10_000, 20)
    tree = root / "tree"
    nbytes = checkpoint_tree(tree, files, size)
    results: dict = {"files": files, "bytes": nbytes, "runs": runs}
    with FakeModel() as fake:
        for name, flags in (("off", ("--no-checkpoints",)), ("on", ())):
            (root / name).mkdir()
            results[name] = checkpoint_first_deltas(root / name, fake, tree, runs, *flags)
    results["first_delta_added_p50_ms"] = round(
        results["on"]["first_delta"]["p50_ms"] - results["off"]["first_delta"]["p50_ms"], 1
    )
    results["first_run_added_ms"] = round(
        results["on"]["first_run_ms"] - results["off"]["first_run_ms"], 1
    )
    store = CheckpointStore(root / "direct.git", tree)
    try:
        began = time.perf_counter()
        store.snapshot()
        first = time.perf_counter() - began
        after_change = []
        for i in range(20):
            (tree / "pkg00" / "mod00000.py").write_text(f"changed {i}\n")
            began = time.perf_counter()
            store.snapshot(pin=f"runs/bench/{i}")
            after_change.append(time.perf_counter() - began)
    finally:
        store.close()
    results["snapshot"] = {"first_ms": ms(first), "after_one_change": spread(after_change)}
    return results


def bench_floor(root: Path, quick: bool) -> dict:
    """(k): what the burst costs the stack crushd is built on, with none of
    crushd's work: Flask on waitress accepting, httpx streaming.  Accepted
    first, then streamed (as crushd does), the first text p50 can come no
    sooner than ``first_delta_p50_floor_ms``."""
    runs = 20 if quick else 100
    accepts = bare_accepts(runs)
    with FakeModel() as fake:
        streams = bare_streams(fake.openai_base_url, runs)
    return {
        "prompts": runs,
        "flask_waitress": accepts,
        "httpx": streams,
        "first_delta_p50_floor_ms": round(
            accepts["all_accepted_ms"] + streams["first_text"]["p50_ms"], 1
        ),
    }


# ------------------------------------------------------ provider requests


def bench_provider(root: Path, quick: bool) -> dict:
    """(j): CPU of the requesting thread per provider request, by the number
    of the provider's other streams in flight (they wait, sending nothing)."""
    import_tests()
    from fakeprovider import FakeProvider, Pause, Text

    from crushd.cancel import CancelToken
    from crushd.providers.base import StepRequest, TextDelta
    from crushd.providers.openai import OpenAIProvider

    levels, samples = ((0, 50), 10) if quick else ((0, 100, 200, 400), 50)
    request = StepRequest("be brief", [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}])
    background: list[tuple[CancelToken, threading.Thread]] = []
    streaming = threading.Semaphore(0)

    def hold(token: CancelToken) -> None:
        with contextlib.suppress(Exception):  # ends with the cancel below
            for event in provider.stream(request, token):
                if isinstance(event, TextDelta) and event.text == "a":
                    streaming.release()

    def cpu_to_first_delta() -> float:
        token = CancelToken()
        started = time.thread_time()
        events = provider.stream(request, token)
        try:
            next(e for e in events if isinstance(e, TextDelta))
            return (time.thread_time() - started) * 1000
        finally:
            token.cancel("measured")
            events.close()

    results = {}
    with FakeProvider() as fake:
        fake.set_default([Text("a"), Pause(600), Text("b")])
        provider = OpenAIProvider("bench", fake.openai_base_url, "key")
        try:
            for level in levels:
                while len(background) < level:
                    token = CancelToken()
                    thread = threading.Thread(target=hold, args=(token,))
                    thread.start()
                    background.append((token, thread))
                    if not streaming.acquire(timeout=30):
                        raise RuntimeError("a background stream did not start")
                cpu = [cpu_to_first_delta() for _ in range(samples)]
                results[str(level)] = round(statistics.median(cpu), 3)
        finally:
            for token, _ in background:
                token.cancel("done")
            for _, thread in background:
                thread.join(30)
            provider.close()
    return {"cpu_ms_by_streams_in_flight": results, "samples": samples}


BENCHES = {
    "submit": bench_submit,
    "stream": bench_stream,
    "stop": bench_stop,
    "bash": bench_bash,
    "mcp": bench_mcp,
    "stalled": bench_stalled,
    "retry": bench_retry,
    "burst": bench_burst,
    "peer": bench_peer,
    "provider": bench_provider,
    "floor": bench_floor,
    "checkpoint": bench_checkpoint,
}
REPEATABLE = {"burst", "peer"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    parser.add_argument("scenario", nargs="?", choices=list(BENCHES), help="run only this one")
    parser.add_argument("--only", choices=list(BENCHES), help="the same as SCENARIO")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="burst, peer: run N times and report medians",
    )
    parser.add_argument("--fake-model", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare-app", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.fake_model:
        serve_fake_model()
        return
    if args.bare_app:
        serve_bare_app()
        return
    only = args.scenario or args.only
    results = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    for name, bench in BENCHES.items():
        if name != only and (only or name == "peer"):  # peer installs from npm: on request
            continue
        extra = {"repeat": args.repeat} if name in REPEATABLE else {}
        with tempfile.TemporaryDirectory(prefix=f"crushd-bench-{name}-") as tmp:
            results[name] = bench(Path(tmp), args.quick, **extra)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
