"""Slow senders and stalled readers against real sockets (crushd.connections).

A thousand connections that trickle their request headers must neither keep
``/v1/health`` from answering nor stay open past the header deadline; an
event-stream reader that stops reading must not hold its server thread,
subscriber and buffers past the stall deadline.
"""

from __future__ import annotations

import resource
import socket
import threading
import time

import httpx
from conftest import wait_for

SLOW_CLIENTS = 1000


def raise_test_files_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def is_closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (EOF or reset)."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_a_thousand_slow_senders_neither_block_health_nor_stay(daemon_factory):
    raise_test_files_limit(SLOW_CLIENTS + 512)
    daemon = daemon_factory(env={"CRUSHD_HEADER_TIMEOUT": "3"})
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    sockets: list[socket.socket] = []
    stop = threading.Event()
    try:
        for _ in range(SLOW_CLIENTS):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sockets.append(sock)

        def trickle() -> None:  # one byte per connection every half second, bounded
            deadline = time.monotonic() + 45
            while not stop.is_set() and time.monotonic() < deadline:
                for sock in sockets:
                    try:
                        sock.send(b"a")
                    except OSError:
                        pass
                stop.wait(0.5)

        feeder = threading.Thread(target=trickle, name="test-trickle")
        feeder.start()
        try:
            with httpx.Client(base_url=daemon.url, timeout=10) as http:
                for _ in range(5):
                    started = time.monotonic()
                    response = http.get("/v1/health")
                    assert response.status_code == 200
                    assert time.monotonic() - started < 5.0, "health waited behind slow clients"
                    time.sleep(0.2)
            # Past the header deadline every trickling connection is cut.
            wait_for(
                lambda: all(is_closed_by_peer(s) for s in sockets),
                timeout=30,
                message="slow senders were kept past the header deadline",
            )
        finally:
            stop.set()
            feeder.join(10)
        assert "event=connection_cut reason=headers_too_slow" in daemon.log()
        with httpx.Client(base_url=daemon.url, timeout=10) as http:
            assert http.get("/v1/health").status_code == 200
    finally:
        for sock in sockets:
            sock.close()


def test_a_stalled_event_reader_is_cut_and_frees_its_stream(live_factory, project):
    live = live_factory(stall_timeout=2.0, echo_delay=0.0)
    host, port = live.url.removeprefix("http://").rsplit(":", 1)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
        workspace = live.server.get(wid)
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that never reads
        reader.connect((host, int(port)))
        try:
            reader.sendall(
                f"GET /v1/workspaces/{wid}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            )
            wait_for(lambda: workspace.hub.subscriber_count == 1)
            prompt = "word " * 20_000  # 20,000 deltas a run: megabytes of frames
            runs = [
                http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": prompt}).json()
                for _ in range(3)
            ]
            for run in runs:
                done = http.get(f"/v1/workspaces/{wid}/runs/{run['id']}?wait=60").json()
                assert done["status"] == "completed"
            # The stalled stream's thread was blocked writing; the cut frees it.
            wait_for(
                lambda: live.server._streams._value == live.server.config.max_streams,
                timeout=15,
                message="the stalled stream still holds its slot",
            )
            assert workspace.hub.subscriber_count == 0
            # Other clients were served all along and still are.
            assert http.get("/v1/health").status_code == 200
            # The server closed the connection: after what the kernel buffered, EOF.
            reader.settimeout(10)
            total = 0
            while chunk := reader.recv(1 << 20):
                total += len(chunk)
            assert total > 0
        finally:
            reader.close()
