"""A real ``crushd serve`` process: persistence across restarts, the
data-directory lock, curl, body limits, logs and where the data lives."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import LISTENING, wait_for
from helpers import scrubbed_env

LOG_LINE = re.compile(r"^ts=\S+ level=\w+ logger=\S+ ")
CURL = shutil.which("curl") or "/usr/bin/curl"


def run_to_completion(client: httpx.Client, wid: str, prompt: str, sid: str) -> dict:
    resp = client.post(f"/v1/workspaces/{wid}/agent", json={"prompt": prompt, "session_id": sid})
    assert resp.status_code == 202, resp.text
    run = resp.json()
    done = client.get(f"/v1/workspaces/{wid}/runs/{run['id']}", params={"wait": 20}).json()
    assert done["status"] == "completed", done
    return done


# -- restart ---------------------------------------------------------------------


def test_restart_keeps_workspaces_sessions_messages_and_runs(daemon_factory, project):
    first = daemon_factory()
    with first.client() as client:
        workspace = client.post("/v1/workspaces", json={"path": str(project)})
        assert workspace.status_code == 201
        wid = workspace.json()["id"]
        session = client.post(f"/v1/workspaces/{wid}/sessions", json={"title": "persist me"})
        sid = session.json()["id"]
        run = run_to_completion(client, wid, "hello there", sid)
        assert run["text"] == "hello there"
        messages = client.get(f"/v1/workspaces/{wid}/sessions/{sid}/messages").json()
        assert [m["role"] for m in messages] == ["user", "assistant"]
        before_session = client.get(f"/v1/workspaces/{wid}/sessions/{sid}").json()
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0, first.log()

    second = daemon_factory()
    with second.client() as client:
        workspaces = client.get("/v1/workspaces").json()
        assert [(w["id"], w["path"]) for w in workspaces] == [(wid, os.path.realpath(project))]
        assert client.get(f"/v1/workspaces/{wid}/sessions/{sid}").json() == before_session
        assert client.get(f"/v1/workspaces/{wid}/sessions/{sid}/messages").json() == messages
        again = client.get(f"/v1/workspaces/{wid}/runs/{run['id']}").json()
        assert again == run
        # Registering the path again is the same workspace, and it still works.
        resp = client.post("/v1/workspaces", json={"path": str(project)})
        assert resp.status_code == 200 and resp.json()["id"] == wid
        run_to_completion(client, wid, "second turn", sid)
        assert len(client.get(f"/v1/workspaces/{wid}/sessions/{sid}/messages").json()) == 4
    second.signal(signal.SIGTERM)
    assert second.wait(20) == 0, second.log()


# -- the data-directory lock -------------------------------------------------------


def test_second_daemon_on_the_same_data_dir_exits_at_once(daemon_factory, tmp_path):
    first = daemon_factory()
    second = daemon_factory(start=False)
    started = time.monotonic()
    second.start(wait=False)
    code = second.wait(10)
    assert time.monotonic() - started < 10
    assert code != 0
    log = second.log()
    assert str(first.data_dir.resolve()) in log, log
    assert "another" in log.lower() and "process" in log.lower(), log
    assert "Traceback" not in log, log
    # The first daemon is untouched and still holds the lock.
    with first.client() as client:
        assert client.get("/v1/health").status_code == 200
    assert (first.data_dir / "crushd.lock").read_text().strip() == str(first.proc.pid)

    # The lock goes with its process, even a killed one.
    first.proc.kill()
    first.proc.wait(10)
    third = daemon_factory()
    with third.client() as client:
        assert client.get("/v1/health").status_code == 200
    third.signal(signal.SIGTERM)
    assert third.wait(20) == 0


def test_newer_database_stops_the_daemon_with_a_clear_message(daemon_factory, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with sqlite3.connect(data_dir / "registry.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    daemon = daemon_factory(start=False)
    daemon.start(wait=False)
    code = daemon.wait(15)
    log = daemon.log()
    assert code != 0, log
    assert "registry.db" in log and "newer" in log, log
    assert "Traceback" not in log, log


# -- curl ------------------------------------------------------------------------


def curl(*args: str) -> tuple[int, str]:
    out = subprocess.run(
        [CURL, "-s", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


def test_the_curl_examples_work(daemon_factory, project):
    assert os.path.exists(CURL), "curl is installed by .ci/run"
    daemon = daemon_factory()
    base = "localhost:" + daemon.url.rsplit(":", 1)[1]
    status, body = curl(f"{base}/v1/workspaces", "-d", json.dumps({"path": str(project)}))
    assert status == 201, body
    wid = json.loads(body)["id"]

    status, body = curl(f"{base}/v1/workspaces/{wid}/agent", "-d", '{"prompt": "hello there"}')
    assert status == 202, body
    rid = json.loads(body)["id"]
    status, body = curl(f"{base}/v1/workspaces/{wid}/runs/{rid}?wait=30")
    assert status == 200 and json.loads(body)["status"] == "completed", body
    assert json.loads(body)["text"] == "hello there"

    status, body = curl(f"{base}/v1/workspaces", "-d", "not json")
    assert status == 400, body
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_request" and error["message"]

    status, body = curl("-X", "POST", f"{base}/v1/workspaces/{wid}/runs/{rid}/cancel")
    assert status == 200 and json.loads(body)["status"] == "completed", body


# -- body limit ------------------------------------------------------------------


def test_two_mib_body_is_413_json_and_the_daemon_lives_on(daemon_factory, project):
    daemon = daemon_factory()
    payload = json.dumps({"path": str(project), "pad": "x" * (2 * 1024 * 1024)}).encode()
    with daemon.client() as client:
        resp = client.post("/v1/workspaces", content=payload)
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["code"] == "too_large"
        assert resp.json()["error"]["message"]

        def chunks():
            for start in range(0, len(payload), 64 * 1024):
                yield payload[start : start + 64 * 1024]

        resp = client.post("/v1/workspaces", content=chunks())  # chunked, no Content-Length
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["code"] == "too_large"

        assert client.get("/v1/workspaces").json() == []
        assert client.get("/v1/health").status_code == 200
        resp = client.post("/v1/workspaces", json={"path": str(project)})
        assert resp.status_code == 201
    assert daemon.proc.poll() is None
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0


def raw_request(url: str, head: bytes) -> http.client.HTTPResponse:
    """Send ``head`` (request line and headers, no body) on a fresh socket."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head)
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.body = response.read()
    sock.close()
    return response


def test_what_waitress_refuses_is_json_too(daemon_factory):
    """A body far over --max-body is refused from its Content-Length, before
    a byte of it is sent, and malformed headers are refused, both in the JSON
    error shape rather than waitress's plain text."""
    daemon = daemon_factory("--max-body", "1000")
    started = time.monotonic()
    resp = raw_request(
        daemon.url,
        b"POST /v1/workspaces HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1073741824\r\n\r\n",
    )
    assert time.monotonic() - started < 5
    assert resp.status == 413
    assert resp.getheader("Content-Type") == "application/json"
    assert json.loads(resp.body) == {
        "error": {"code": "too_large", "message": "request body is larger than 1000 bytes"}
    }
    resp = raw_request(
        daemon.url, b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nbad header\r\n\r\n"
    )
    assert resp.status == 400
    assert resp.getheader("Content-Type") == "application/json"
    assert json.loads(resp.body)["error"]["code"] == "invalid_request"
    with daemon.client() as client:
        # Exactly --max-body is accepted (and read as JSON).
        body = b'{"path": "x"}'.ljust(1000)
        resp = client.post("/v1/workspaces", content=body)
        assert resp.status_code == 400 and "absolute" in resp.json()["error"]["message"]
        assert client.get("/v1/health").status_code == 200


# -- logs ------------------------------------------------------------------------


def test_logs_are_one_line_key_value_with_request_lines(daemon_factory, project):
    daemon = daemon_factory()
    with daemon.client() as client:
        client.get("/v1/health")
        client.post("/v1/workspaces", json={"path": str(project)})
        client.post("/v1/workspaces", content=b"{oops")
        client.get("/v1/nope")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    lines = daemon.log().splitlines()
    assert lines
    bad = [line for line in lines if not LOG_LINE.match(line)]
    assert not bad, "\n".join(bad)
    requests = [line for line in lines if " event=request " in f"{line} "]
    assert any("method=GET path=/v1/health status=200" in line for line in requests), lines
    assert any("method=POST path=/v1/workspaces status=201" in line for line in requests), lines
    assert any("path=/v1/nope status=404" in line for line in requests), lines
    assert any("event=listening" in line for line in lines)
    assert any("event=exit" in line for line in lines)


# One ``key=value`` pair: a bare value has no space, quote or ``=``; anything
# else is double-quoted with backslash escapes (crushd.logs.kv).
PAIR = r'[A-Za-z_][\w.]*=(?:"(?:[^"\\\n]|\\.)*"|[^\s"=]*)'
KV_LINE = re.compile(rf"^{PAIR}(?: {PAIR})*$")


def test_logs_stay_one_parseable_line_whatever_the_client_sends(daemon_factory, tmp_path):
    """Values a client controls (URL path, directory names) cannot break a
    line in two or forge a record: they are quoted like crushd.logs.kv does."""
    spaced = tmp_path / "my project"
    spaced.mkdir()
    daemon = daemon_factory()
    with daemon.client() as client:
        assert client.post("/v1/workspaces", json={"path": str(spaced)}).status_code == 201
        client.get("/v1/x%0Aforged%20level=error")
        client.get("/v1/workspaces/a%20b%22c=d")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    lines = daemon.log().splitlines()
    bad = [line for line in lines if not LOG_LINE.match(line)]
    assert not bad, "\n".join(bad)
    unparseable = [
        line
        for line in lines
        if line.split(" ", 2)[2].startswith("logger=crushd") and not KV_LINE.match(line)
    ]
    assert not unparseable, "\n".join(unparseable)


# -- where the data lives ----------------------------------------------------------


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    return scrubbed_env(drop=("STATE_DIRECTORY", "XDG_DATA_HOME"), HOME=str(home), **extra)


def test_data_dir_comes_from_env_in_the_contract_order(tmp_path):
    """CRUSHD_DATA_DIR > STATE_DIRECTORY > XDG_DATA_HOME/crushd > ~/.local/share/crushd."""
    cases: dict[str, tuple[dict[str, str], Path]] = {}
    for name in ("crushd", "state", "xdg", "home"):
        root = tmp_path / f"case-{name}"
        home = root / "home"
        home.mkdir(parents=True)
        everything = {
            "CRUSHD_DATA_DIR": str(root / "crushd-data"),
            "STATE_DIRECTORY": str(root / "state"),
            "XDG_DATA_HOME": str(root / "xdg"),
        }
        given = {
            "crushd": everything,
            "state": {k: v for k, v in everything.items() if k != "CRUSHD_DATA_DIR"},
            "xdg": {"XDG_DATA_HOME": everything["XDG_DATA_HOME"]},
            "home": {},
        }[name]
        expected = {
            "crushd": root / "crushd-data",
            "state": root / "state",
            "xdg": root / "xdg" / "crushd",
            "home": home / ".local" / "share" / "crushd",
        }[name]
        cases[name] = (clean_env(home, **given), expected)

    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        for name, (env, _) in cases.items():
            log = tmp_path / f"{name}.log"
            with log.open("wb") as fh:
                procs[name] = (
                    subprocess.Popen(
                        [sys.executable, "-m", "crushd", "serve", "--port", "0"],
                        stdout=subprocess.DEVNULL,
                        stderr=fh,
                        env=env,
                    ),
                    log,
                )
        for name, (proc, log) in procs.items():

            def listening(proc=proc, log=log, name=name):
                if proc.poll() is not None:
                    raise AssertionError(f"{name}: exited {proc.returncode}\n{log.read_text()}")
                return LISTENING.search(log.read_text())

            wait_for(listening, 20, message=f"{name} did not start")
        for name, (_, expected) in cases.items():
            assert (expected / "registry.db").is_file(), name
            assert (expected / "crushd.lock").is_file(), name
            assert f"data_dir={expected.resolve()}" in procs[name][1].read_text(), name
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int] = {}
        for name, (proc, _) in procs.items():
            try:
                codes[name] = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait(10)
    for name, (_, log) in procs.items():
        assert codes[name] == 0, f"{name}:\n{log.read_text()}"
    # Only the winning location was created in each case.
    for name, (env, expected) in cases.items():
        for key in ("CRUSHD_DATA_DIR", "STATE_DIRECTORY", "XDG_DATA_HOME"):
            if key in env:
                candidate = Path(env[key]) / ("crushd" if key == "XDG_DATA_HOME" else "")
                if candidate != expected:
                    assert not (candidate / "registry.db").exists(), (name, key)


def test_a_narrower_allow_root_leaves_old_workspaces_registered_but_closed(
    daemon_factory, tmp_path
):
    inside, outside = tmp_path / "root" / "inside", tmp_path / "elsewhere"
    inside.mkdir(parents=True)
    outside.mkdir()
    first = daemon_factory()
    with first.client() as http:
        kept = http.post("/v1/workspaces", json={"path": str(inside)}).json()
        old = http.post("/v1/workspaces", json={"path": str(outside)}).json()
        run = http.post(f"/v1/workspaces/{old['id']}/agent", json={"prompt": "before"}).json()
        assert http.get(f"/v1/workspaces/{old['id']}/runs/{run['id']}?wait=10").json()[
            "status"
        ] == ("completed")
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0

    second = daemon_factory("--allow-root", str(tmp_path / "root"))
    log = second.log()
    assert re.search(rf"event=workspace_not_opened workspace={old['id']} .*outside", log), log
    with second.client() as http:
        listed = {w["id"]: w for w in http.get("/v1/workspaces").json()}
        assert listed[kept["id"]]["open"] is True and listed[kept["id"]]["closed_reason"] is None
        shown = http.get(f"/v1/workspaces/{old['id']}").json()
        assert listed[old["id"]] == shown
        assert shown["open"] is False and "outside the allowed roots" in shown["closed_reason"]
        for resp in (
            http.post(f"/v1/workspaces/{old['id']}/agent", json={"prompt": "after"}),
            http.get(f"/v1/workspaces/{old['id']}/sessions"),
        ):
            assert resp.status_code == 409, resp.text
            assert resp.json()["error"]["code"] == "workspace_closing"
            assert "outside the allowed roots" in resp.json()["error"]["message"]
        resp = http.post(f"/v1/workspaces/{kept['id']}/agent", json={"prompt": "still works"})
        assert resp.status_code == 202
        assert http.post("/v1/workspaces", json={"path": str(outside)}).status_code == 400
        assert http.delete(f"/v1/workspaces/{old['id']}").status_code == 204
        assert http.get(f"/v1/workspaces/{old['id']}").status_code == 404
        assert [w["id"] for w in http.get("/v1/workspaces").json()] == [kept["id"]]
    second.signal(signal.SIGTERM)
    assert second.wait(20) == 0
    third = daemon_factory()  # roots lifted: registering the path restores its history
    with third.client() as http:
        again = http.post("/v1/workspaces", json={"path": str(outside)}).json()
        assert again["id"] == old["id"] and again["open"] is True
        assert [r["id"] for r in http.get(f"/v1/workspaces/{old['id']}/runs").json()] == [run["id"]]
