"""The HTTP API through Flask's test client: server endpoints, workspaces,
sessions and messages, and the JSON error shape for every way a request can
be wrong."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import httpx
import pytest
from conftest import make_config

from crushd import __version__
from crushd.app import create_app
from crushd.common import text_of
from crushd.server import AlreadyRunning, Server

WORKSPACE_KEYS = {
    "id",
    "path",
    "yolo",
    "sandbox",
    "created_at",
    "closing",
    "active_runs",
    "queued_runs",
    "open",
    "closed_reason",
}
SESSION_KEYS = {
    "id", "title", "created_at", "updated_at", "message_count", "prompt_tokens",
    "completion_tokens", "cache_read_tokens", "cache_write_tokens", "cost_usd", "is_busy",
    "queued_runs",
}  # fmt: skip


def assert_error(resp, status: int, code: str) -> str:
    """The response is the contract's JSON error; returns its message."""
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    assert resp.mimetype == "application/json", resp.get_data(as_text=True)
    data = resp.get_json()
    assert set(data) == {"error"}, data
    assert set(data["error"]) == {"code", "message"}, data
    assert data["error"]["code"] == code, data
    assert isinstance(data["error"]["message"], str) and data["error"]["message"].strip()
    return data["error"]["message"]


def register(client, path: Path | str, **extra) -> dict:
    resp = client.post("/v1/workspaces", json={"path": str(path), **extra})
    assert resp.status_code in (200, 201), resp.get_json()
    return resp.get_json()


def new_session(client, wid: str, title: str | None = None) -> dict:
    resp = client.post(
        f"/v1/workspaces/{wid}/sessions", json={} if title is None else {"title": title}
    )
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


# -- server ----------------------------------------------------------------------


def test_health(client, project):
    resp = client.get("/v1/health")
    assert resp.status_code == 200
    data = resp.get_json()
    assert data["status"] == "ok"
    assert data["version"] == __version__
    assert data["workspaces"] == 0 and data["active_runs"] == 0
    assert isinstance(data["uptime_s"], int | float) and data["uptime_s"] >= 0
    register(client, project)
    assert client.get("/v1/health").get_json()["workspaces"] == 1


def test_version(client):
    resp = client.get("/v1/version")
    assert resp.status_code == 200
    assert resp.get_json() == {"version": __version__}


def test_openapi_document(client):
    resp = client.get("/v1/openapi.json")
    assert resp.status_code == 200
    assert resp.mimetype == "application/json"
    document = json.loads(resp.get_data(as_text=True))
    assert document["openapi"].startswith("3.1")
    assert {"/v1/health", "/v1/workspaces", "/v1/workspaces/{id}/sessions"} <= set(
        document["paths"]
    )


# -- workspaces ------------------------------------------------------------------


def test_register_workspace_then_again_gives_the_same_one(client, project):
    resp = client.post("/v1/workspaces", json={"path": str(project)})
    assert resp.status_code == 201
    created = resp.get_json()
    assert set(created) == WORKSPACE_KEYS
    assert created["path"] == os.path.realpath(project)
    assert created["yolo"] is False and created["closing"] is False
    assert created["active_runs"] == 0 and created["queued_runs"] == 0
    assert created["created_at"].endswith("Z")

    again = client.post("/v1/workspaces", json={"path": str(project)})
    assert again.status_code == 200
    assert again.get_json()["id"] == created["id"]
    same_with_slash = client.post("/v1/workspaces", json={"path": f"{project}/"})
    assert same_with_slash.status_code == 200
    assert same_with_slash.get_json()["id"] == created["id"]

    listed = client.get("/v1/workspaces")
    assert listed.status_code == 200
    assert [w["id"] for w in listed.get_json()] == [created["id"]]
    got = client.get(f"/v1/workspaces/{created['id']}")
    assert got.status_code == 200
    assert got.get_json() == created


def test_symlink_to_a_registered_directory_is_the_same_workspace(client, project, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(project, target_is_directory=True)
    first = register(client, project)
    resp = client.post("/v1/workspaces", json={"path": str(link)})
    assert resp.status_code == 200
    assert resp.get_json()["id"] == first["id"]
    assert resp.get_json()["path"] == os.path.realpath(project)
    assert len(client.get("/v1/workspaces").get_json()) == 1


def test_yolo_flag_is_kept(client, project, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    assert register(client, project, yolo=True)["yolo"] is True
    assert register(client, other, yolo=False)["yolo"] is False


@pytest.mark.parametrize("kind", ["relative", "missing", "file", "nul", "dotdot-relative"])
def test_bad_workspace_paths_are_400_and_register_nothing(client, tmp_path, kind):
    (tmp_path / "a-file").write_text("x")
    path = {
        "relative": "project",
        "missing": str(tmp_path / "nope"),
        "file": str(tmp_path / "a-file"),
        "nul": f"{tmp_path}\0x",
        "dotdot-relative": "../..",
    }[kind]
    resp = client.post("/v1/workspaces", json={"path": path})
    assert_error(resp, 400, "invalid_request")
    assert client.get("/v1/workspaces").get_json() == []
    assert not (tmp_path / "data" / "workspaces").exists() or not any(
        (tmp_path / "data" / "workspaces").iterdir()
    )


def test_unknown_workspace_is_404(client):
    assert_error(client.get("/v1/workspaces/nope"), 404, "not_found")
    assert_error(client.delete("/v1/workspaces/nope"), 404, "not_found")
    assert_error(client.get("/v1/workspaces/nope/sessions"), 404, "not_found")
    assert_error(client.post("/v1/workspaces/nope/sessions", json={}), 404, "not_found")
    assert_error(client.get("/v1/workspaces/nope/runs"), 404, "not_found")


def test_delete_workspace_then_register_again_restores_id_and_sessions(client, project):
    workspace = register(client, project)
    wid = workspace["id"]
    session = new_session(client, wid, "keep me")

    resp = client.delete(f"/v1/workspaces/{wid}")
    assert resp.status_code == 204
    assert resp.get_data() == b""
    assert_error(client.get(f"/v1/workspaces/{wid}"), 404, "not_found")
    assert_error(client.get(f"/v1/workspaces/{wid}/sessions"), 404, "not_found")
    assert client.get("/v1/workspaces").get_json() == []

    resp = client.post("/v1/workspaces", json={"path": str(project)})
    assert resp.status_code == 201
    assert resp.get_json()["id"] == wid
    sessions = client.get(f"/v1/workspaces/{wid}/sessions").get_json()
    assert [(s["id"], s["title"]) for s in sessions] == [(session["id"], "keep me")]


def test_delete_workspace_with_purge_forgets_it(client, project, tmp_path):
    wid = register(client, project)["id"]
    new_session(client, wid, "gone")
    assert (tmp_path / "data" / "workspaces" / wid).is_dir()

    assert client.delete(f"/v1/workspaces/{wid}?purge=true").status_code == 204
    assert_error(client.get(f"/v1/workspaces/{wid}"), 404, "not_found")
    assert not (tmp_path / "data" / "workspaces" / wid).exists()

    fresh = client.post("/v1/workspaces", json={"path": str(project)})
    assert fresh.status_code == 201
    assert fresh.get_json()["id"] != wid
    assert client.get(f"/v1/workspaces/{fresh.get_json()['id']}/sessions").get_json() == []


def test_delete_workspace_with_a_bad_purge_value_is_400_and_keeps_it(client, project):
    wid = register(client, project)["id"]
    assert_error(client.delete(f"/v1/workspaces/{wid}?purge=maybe"), 400, "invalid_request")
    assert client.get(f"/v1/workspaces/{wid}").status_code == 200


# -- sessions --------------------------------------------------------------------


@pytest.fixture
def wid(client, project) -> str:
    return register(client, project)["id"]


def test_session_crud(client, wid):
    resp = client.post(f"/v1/workspaces/{wid}/sessions", json={"title": "first"})
    assert resp.status_code == 201
    session = resp.get_json()
    assert set(session) == SESSION_KEYS
    assert session["title"] == "first"
    assert session["message_count"] == 0 and session["is_busy"] is False
    assert session["queued_runs"] == 0
    assert session["prompt_tokens"] == 0 and session["completion_tokens"] == 0
    sid = session["id"]
    url = f"/v1/workspaces/{wid}/sessions/{sid}"

    got = client.get(url)
    assert got.status_code == 200 and got.get_json() == session

    put = client.put(url, json={"title": "renamed"})
    assert put.status_code == 200
    assert put.get_json()["title"] == "renamed"
    assert put.get_json()["updated_at"] >= session["updated_at"]
    assert client.get(url).get_json()["title"] == "renamed"

    deleted = client.delete(url)
    assert deleted.status_code == 204 and deleted.get_data() == b""
    assert_error(client.get(url), 404, "not_found")
    assert_error(client.delete(url), 404, "not_found")
    assert_error(client.put(url, json={"title": "x"}), 404, "not_found")
    assert_error(client.get(f"{url}/messages"), 404, "not_found")
    assert client.get(f"/v1/workspaces/{wid}/sessions").get_json() == []


def test_create_session_without_body_or_title(client, wid):
    no_body = client.post(f"/v1/workspaces/{wid}/sessions")
    assert no_body.status_code == 201
    assert isinstance(no_body.get_json()["title"], str) and no_body.get_json()["title"]
    empty_object = client.post(f"/v1/workspaces/{wid}/sessions", json={})
    assert empty_object.status_code == 201
    assert empty_object.get_json()["title"]
    assert empty_object.get_json()["id"] != no_body.get_json()["id"]


def test_sessions_are_listed_newest_first(client, wid):
    ids = [new_session(client, wid, f"s{i}")["id"] for i in range(4)]
    resp = client.get(f"/v1/workspaces/{wid}/sessions")
    assert resp.status_code == 200
    assert [s["id"] for s in resp.get_json()] == list(reversed(ids))


def test_messages_of_a_session_oldest_first(client, wid):
    sid = new_session(client, wid)["id"]
    assert client.get(f"/v1/workspaces/{wid}/sessions/{sid}/messages").get_json() == []
    resp = client.post(
        f"/v1/workspaces/{wid}/agent", json={"prompt": "hello there", "session_id": sid}
    )
    assert resp.status_code == 202
    run = resp.get_json()
    done = client.get(f"/v1/workspaces/{wid}/runs/{run['id']}?wait=20").get_json()
    assert done["status"] == "completed", done

    resp = client.get(f"/v1/workspaces/{wid}/sessions/{sid}/messages")
    assert resp.status_code == 200
    messages = resp.get_json()
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["parts"] == [{"type": "text", "text": "hello there"}]
    assert messages[0]["run_id"] == run["id"]
    assert text_of(messages[1]["parts"]) == "hello there"
    assert messages[1]["parts"][-1]["type"] == "finish"
    assert messages[0]["created_at"] <= messages[1]["created_at"]
    assert client.get(f"/v1/workspaces/{wid}/sessions/{sid}").get_json()["message_count"] == 2


# -- errors ----------------------------------------------------------------------


def test_malformed_json_is_400(client, wid):
    for url in ("/v1/workspaces", f"/v1/workspaces/{wid}/sessions"):
        resp = client.post(url, data="{not json", content_type="application/json")
        assert_error(resp, 400, "invalid_request")
    resp = client.post("/v1/workspaces", data=b"\xff\xfe", content_type="application/json")
    assert_error(resp, 400, "invalid_request")


@pytest.mark.parametrize("payload", ["[]", '["/tmp"]', '"/tmp"', "5", "null", "true"])
def test_a_body_that_is_not_an_object_is_400(client, payload):
    resp = client.post("/v1/workspaces", data=payload, content_type="application/json")
    assert_error(resp, 400, "invalid_request")
    assert client.get("/v1/workspaces").get_json() == []


def test_wrong_types_are_400_and_name_the_field(client, project, wid):
    message = assert_error(client.post("/v1/workspaces", json={"path": 5}), 400, "invalid_request")
    assert "path" in message
    resp = client.post("/v1/workspaces", json={"path": str(project), "yolo": "x"})
    assert "yolo" in assert_error(resp, 400, "invalid_request")
    resp = client.post("/v1/workspaces", json={"path": str(project), "yolo": 1})
    assert "yolo" in assert_error(resp, 400, "invalid_request")
    resp = client.post(f"/v1/workspaces/{wid}/sessions", json={"title": 3})
    assert "title" in assert_error(resp, 400, "invalid_request")
    sid = new_session(client, wid, "t")["id"]
    resp = client.put(f"/v1/workspaces/{wid}/sessions/{sid}", json={"title": ["a"]})
    assert "title" in assert_error(resp, 400, "invalid_request")
    assert client.get(f"/v1/workspaces/{wid}/sessions/{sid}").get_json()["title"] == "t"


def test_missing_and_empty_fields_are_400(client, wid):
    for payload in ({}, {"yolo": True}, {"path": None}, {"path": ""}, {"path": "   "}):
        resp = client.post("/v1/workspaces", json=payload)
        assert_error(resp, 400, "invalid_request")
    assert_error(client.post("/v1/workspaces"), 400, "invalid_request")
    for payload in ({"title": ""}, {"title": "  "}):
        resp = client.post(f"/v1/workspaces/{wid}/sessions", json=payload)
        assert_error(resp, 400, "invalid_request")
    sid = new_session(client, wid, "t")["id"]
    url = f"/v1/workspaces/{wid}/sessions/{sid}"
    assert_error(client.put(url, json={}), 400, "invalid_request")
    assert_error(client.put(url, json={"title": ""}), 400, "invalid_request")
    assert_error(client.put(url), 400, "invalid_request")
    assert client.get(url).get_json()["title"] == "t"


def test_bad_input_changes_nothing(client, project, wid):
    before_workspaces = client.get("/v1/workspaces").get_json()
    before_sessions = client.get(f"/v1/workspaces/{wid}/sessions").get_json()
    bad_workspaces = [
        {"data": "{", "content_type": "application/json"},
        {"json": {"path": str(project / "missing")}},
        {"json": {"path": str(project), "yolo": "yes"}},
        {"json": [str(project)]},
    ]
    for kwargs in bad_workspaces:
        assert client.post("/v1/workspaces", **kwargs).status_code == 400
    bad_sessions = [
        {"data": "{", "content_type": "application/json"},
        {"json": {"title": 3}},
        {"json": {"title": ""}},
        {"json": ["title"]},
    ]
    for kwargs in bad_sessions:
        assert client.post(f"/v1/workspaces/{wid}/sessions", **kwargs).status_code == 400
    assert client.get("/v1/workspaces").get_json() == before_workspaces
    assert client.get(f"/v1/workspaces/{wid}/sessions").get_json() == before_sessions


def test_unknown_route_is_404_json_not_html(client):
    # "/" is the console (SPEC §4), not an unknown route.
    for url in ("/v1/nope", "/nope", "/console/nope.js", "/v1/workspaces/x/y/z/w"):
        resp = client.get(url)
        assert_error(resp, 404, "not_found")
        assert b"<html" not in resp.get_data().lower()


def test_wrong_method_is_405_json(client, wid):
    resp = client.delete("/v1/health")
    assert_error(resp, 405, "method_not_allowed")
    assert "GET" in resp.headers.get("Allow", "")
    assert_error(client.put("/v1/workspaces", json={}), 405, "method_not_allowed")
    assert_error(client.post(f"/v1/workspaces/{wid}", json={}), 405, "method_not_allowed")
    assert client.get(f"/v1/workspaces/{wid}").status_code == 200


def test_body_over_max_body_is_413_json(tmp_path, project):
    server = Server(make_config(tmp_path, max_body=1024)).start()
    try:
        client = create_app(server=server).test_client()
        padding = "x" * 2048
        resp = client.post("/v1/workspaces", json={"path": str(project), "pad": padding})
        message = assert_error(resp, 413, "too_large")
        assert "1024" in message
        assert client.get("/v1/workspaces").get_json() == []

        resp = client.post(
            "/v1/workspaces",
            data=json.dumps({"path": str(project), "pad": padding}),
            content_type="application/x-www-form-urlencoded",
        )
        assert_error(resp, 413, "too_large")

        wid = register(client, project)["id"]
        resp = client.post(f"/v1/workspaces/{wid}/sessions", json={"title": "t" * 2000})
        assert_error(resp, 413, "too_large")
        assert client.get(f"/v1/workspaces/{wid}/sessions").get_json() == []
        # Just under the limit is accepted.
        assert new_session(client, wid, "t" * 900)["title"] == "t" * 900
    finally:
        server.stop()


def test_form_content_type_body_is_read_as_json(client, project):
    resp = client.post(
        "/v1/workspaces",
        data=json.dumps({"path": str(project)}),
        content_type="application/x-www-form-urlencoded",
    )
    assert resp.status_code == 201, resp.get_json()
    wid = resp.get_json()["id"]
    resp = client.post(
        f"/v1/workspaces/{wid}/sessions",
        data='{"title": "from curl"}',
        content_type="application/x-www-form-urlencoded",
    )
    assert resp.status_code == 201
    assert resp.get_json()["title"] == "from curl"
    resp = client.post(
        "/v1/workspaces", data="not json", content_type="application/x-www-form-urlencoded"
    )
    assert_error(resp, 400, "invalid_request")
    resp = client.post("/v1/workspaces", data=json.dumps({"path": str(project)}), content_type="")
    assert resp.status_code == 200 and resp.get_json()["id"] == wid


# -- roots and stopping ------------------------------------------------------------


def test_allow_root_limits_workspace_paths(tmp_path):
    root = tmp_path / "root"
    inside = root / "inside"
    inside.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    escape = inside / "escape"
    escape.symlink_to(outside, target_is_directory=True)
    server = Server(make_config(tmp_path, allow_roots=[str(root)])).start()
    try:
        client = create_app(server=server).test_client()
        assert client.post("/v1/workspaces", json={"path": str(inside)}).status_code == 201
        assert client.post("/v1/workspaces", json={"path": str(root)}).status_code == 201
        for path in (outside, escape, inside / ".." / ".." / "outside", tmp_path / "root2"):
            if not path.exists():
                path.mkdir()
            resp = client.post("/v1/workspaces", json={"path": str(path)})
            assert_error(resp, 400, "invalid_request")
        assert len(client.get("/v1/workspaces").get_json()) == 2
    finally:
        server.stop()


def test_stopping_server_reports_503_and_refuses_new_workspaces(client, server, project):
    wid = register(client, project)["id"]
    server.stopping.set()
    health = client.get("/v1/health")
    assert health.status_code == 503
    assert health.get_json()["status"] == "stopping"
    other = project / "sub"
    other.mkdir()
    resp = client.post("/v1/workspaces", json={"path": str(other)})
    assert_error(resp, 503, "shutting_down")
    assert resp.headers.get("Retry-After")
    resp = client.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "hi"})
    assert_error(resp, 503, "shutting_down")
    assert client.get(f"/v1/workspaces/{wid}/runs").get_json() == []


def test_a_session_belongs_to_its_workspace(client, project, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    first = register(client, project)["id"]
    second = register(client, other)["id"]
    sid = new_session(client, first, "mine")["id"]
    assert_error(client.get(f"/v1/workspaces/{second}/sessions/{sid}"), 404, "not_found")
    resp = client.put(f"/v1/workspaces/{second}/sessions/{sid}", json={"title": "x"})
    assert_error(resp, 404, "not_found")
    assert_error(client.delete(f"/v1/workspaces/{second}/sessions/{sid}"), 404, "not_found")
    assert client.get(f"/v1/workspaces/{second}/sessions").get_json() == []
    assert client.get(f"/v1/workspaces/{first}/sessions/{sid}").get_json()["title"] == "mine"


def test_concurrent_registration_of_one_path_gives_one_workspace(live, project):
    """Two ``crushd prompt`` started at once in the same directory both
    register it: every request must succeed with the same workspace."""
    barrier = threading.Barrier(8)
    results: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def post() -> None:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            barrier.wait()
            resp = http.post("/v1/workspaces", json={"path": str(project)})
            with lock:
                results.append((resp.status_code, resp.json()))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * 7 + [201], results
    assert len({data["id"] for _, data in results}) == 1
    with httpx.Client(base_url=live.url, timeout=30) as http:
        assert len(http.get("/v1/workspaces").json()) == 1


def test_server_builds_without_opening_anything_then_starts(tmp_path):
    config = make_config(tmp_path)
    now = [100.0]
    server = Server(config, clock=lambda: now[0])
    data_dir = config.resolved_data_dir()
    assert not data_dir.exists()
    try:
        assert server.start() is server
        assert (data_dir / "crushd.lock").exists() and (data_dir / "registry.db").exists()
        assert server.start() is server  # idempotent
        now[0] += 2.5
        assert server.health()["uptime_s"] == 2.5
    finally:
        assert server.stop() is True
    assert server.stop() is True  # a second caller learns that the first finished
    with pytest.raises(RuntimeError, match="cannot be started again"):
        server.start()


def test_a_failed_start_releases_what_it_took(tmp_path):
    config = make_config(tmp_path)
    first = Server(config).start()
    try:
        second = Server(config)
        with pytest.raises(AlreadyRunning):
            second.start()
    finally:
        first.stop()
    third = Server(config).start()  # the lock was released by the first stop
    third.stop()


def test_event_receivers_may_call_back_into_the_server(server, project):
    """Receivers run inside ``publish``; no workspace lock is held then, so
    one that asks for health (every workspace's lock) cannot deadlock."""
    seen: list[tuple[int, str, str | None]] = []

    def receiver(sender: str, event) -> None:
        assert server.health()["status"] == "ok"
        server.get(sender).to_dict()
        seen.append((event.seq, event.type, event.data["payload"].get("id")))

    server.signals.event_published.connect(receiver, weak=False)
    done = threading.Event()

    def scenario() -> None:
        record, _ = server.register(str(project), None)
        workspace = server.get(record["id"])
        first, _ = workspace.submit("one two three four five six seven eight")
        sid = first["session_id"]
        second, _ = workspace.submit("queued behind the first", session_id=sid)
        workspace.cancel_run(second["id"])
        workspace.submit("cancelled with its session", session_id=sid)
        workspace.cancel_session(sid)
        last, _ = workspace.submit("runs to the end", session_id=sid)
        workspace.wait_run(last["id"], 10)
        server.unregister(record["id"])
        done.set()

    thread = threading.Thread(target=scenario, name="test-scenario", daemon=True)
    thread.start()
    thread.join(20)
    assert done.is_set(), "a receiver that called back into the server deadlocked"
    order = {}
    for _seq, kind, run_id in sorted(seen):
        if kind.startswith("run."):
            order.setdefault(run_id, []).append(kind)
    assert len(order) == 4
    for kinds in order.values():  # each run is announced before it starts or ends
        assert kinds[0] == "run.queued" and kinds[-1] == "run.completed", kinds
    assert any(kind == "workspace.closing" for _, kind, _ in seen)


@pytest.mark.parametrize(
    "route, field",
    [
        ("/v1/workspaces", "path"),
        ("/v1/workspaces/{wid}/agent", "prompt"),
        ("/v1/workspaces/{wid}/agent", "session_id"),
        ("/v1/workspaces/{wid}/agent", "run_id"),
        ("/v1/workspaces/{wid}/sessions", "title"),
    ],
)
def test_a_lone_surrogate_is_400_and_stores_nothing(client, wid, route, field):
    body = {"prompt": "hi", "path": "/tmp", field: "a\ud800b"}
    resp = client.post(route.format(wid=wid), data=json.dumps(body))
    assert "surrogate" in assert_error(resp, 400, "invalid_request")
    # As a key, too.
    resp = client.post(route.format(wid=wid), data='{"prompt": "hi", "\\udc00": 1}')
    assert_error(resp, 400, "invalid_request")
    assert client.get(f"/v1/workspaces/{wid}/sessions").get_json() == []
    assert client.get(f"/v1/workspaces/{wid}/runs").get_json() == []
    assert len(client.get("/v1/workspaces").get_json()) == 1


def test_no_content_responses_have_no_content_type(client, wid):
    session = new_session(client, wid)
    resp = client.delete(f"/v1/workspaces/{wid}/sessions/{session['id']}")
    assert resp.status_code == 204 and resp.data == b""
    assert "Content-Type" not in resp.headers
    resp = client.delete(f"/v1/workspaces/{wid}")
    assert resp.status_code == 204 and resp.data == b""
    assert "Content-Type" not in resp.headers


@pytest.mark.parametrize(
    "raw", ["[" * 100_000, '{"prompt": ' + "1" * 5000 + "}", '{"prompt": "\\ud800"}']
)
def test_bodies_json_cannot_hold_are_400(client, wid, raw):
    assert_error(client.post(f"/v1/workspaces/{wid}/agent", data=raw), 400, "invalid_request")
    assert client.get(f"/v1/workspaces/{wid}/runs").get_json() == []


@pytest.mark.parametrize("path", ["~no_such_user_here/dir", "/" + "a" * 5000, "/x/" + "b" * 300])
def test_workspace_paths_the_os_cannot_take_are_400(client, path):
    assert_error(client.post("/v1/workspaces", json={"path": path}), 400, "invalid_request")
    assert client.get("/v1/workspaces").get_json() == []


@pytest.mark.parametrize(
    ("query", "headers", "message"),
    [
        ("?since=-1", {"Last-Event-ID": "0"}, "since must not be negative"),
        ("?since=x", {}, "since must be an integer"),
        ("", {"Last-Event-ID": "-3"}, "Last-Event-ID must not be negative"),
        ("?since=0", {"Last-Event-ID": "later"}, "Last-Event-ID must be an integer"),
    ],
)
def test_a_bad_event_position_is_400_even_beside_a_good_one(client, wid, query, headers, message):
    response = client.get(f"/v1/workspaces/{wid}/events{query}", headers=headers)
    assert response.status_code == 400
    assert response.json["error"] == {"code": "invalid_request", "message": message}


def test_blank_means_what_the_documents_pattern_means(client, wid):
    """ "Not empty" is the OpenAPI document's \\S: ECMAScript white space only."""
    for blank in (" ", "\t\n", "\u00a0\u3000", "\ufeff "):
        response = client.post(f"/v1/workspaces/{wid}/sessions", json={"title": blank})
        assert response.status_code == 400, repr(blank)
    for title in ("a", "\x1d", "\u0085"):  # str.isspace() says blank; \S does not
        response = client.post(f"/v1/workspaces/{wid}/sessions", json={"title": title})
        assert response.status_code == 201, repr(title)
        assert response.json["title"] == title
