"""Events: numbering, replay, reset, filters, stream caps and disconnects."""

from __future__ import annotations

import socket
import time

import httpx
from conftest import sse_events, wait_for
from helpers import LONG, prompt, register, wait_terminal

from crushd.events import EventHub


def test_hub_replays_after_a_seq_and_resets_when_too_old():
    hub = EventHub("w", first_seq=101, buffer_size=10_000)
    for i in range(10_050):
        hub.publish("message.delta", "s1" if i % 2 else "s2", {"i": i})
    assert hub.last_seq == 10_150
    sub, backlog, reset = hub.subscribe(10_140, None)
    assert reset is None and [e.seq for e in backlog] == list(range(10_141, 10_151))
    _, backlog, reset = hub.subscribe(10_140, "s1")
    assert all(e.session_id == "s1" for e in backlog) and len(backlog) == 5
    _, backlog, reset = hub.subscribe(100, None)
    assert reset is not None and backlog == []
    assert reset.data["payload"]["oldest"] == 151
    _, _, reset = hub.subscribe(99_999, None)
    assert reset is not None, "a seq from the future must reset too"
    hub.close()
    assert hub.publish("x", None, {}) is None


def test_hub_drops_a_subscriber_that_stops_reading():
    hub = EventHub("w")
    sub, _, _ = hub.subscribe(None, None)
    for i in range(10_001):
        hub.publish("message.delta", "s", {"i": i})
    assert sub.dropped and hub.subscriber_count == 0


def test_seq_continues_above_the_reservation_after_a_restart():
    reserved = []
    hub = EventHub("w", first_seq=1, reserve=reserved.append)
    hub.publish("a", None, {})
    assert reserved and reserved[-1] >= 1
    restarted = EventHub("w", first_seq=reserved[-1] + 1)
    event = restarted.publish("a", None, {})
    assert event.seq > 1


def test_reconnect_with_last_event_id_gets_every_missed_event(live, project):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        with http.stream("GET", f"/v1/workspaces/{wid}/events") as stream:
            lines = stream.iter_lines()
            assert next(lines) == ": open"
            run = prompt(http, wid, "one two three").json()
            seen = sse_events(lines, 3)
        last = seen[-1]["id"]
        wait_terminal(http, wid, run["id"])
        prompt(http, wid, "four five")
        full_replay = []
        with http.stream(
            "GET", f"/v1/workspaces/{wid}/events", params={"since": int(seen[0]["id"]) - 1}
        ) as stream:
            full_replay = sse_events(stream.iter_lines(), 3)
        assert [e["id"] for e in full_replay] == [e["id"] for e in seen]
        with http.stream(
            "GET", f"/v1/workspaces/{wid}/events", headers={"Last-Event-ID": last}
        ) as stream:
            lines = stream.iter_lines()
            missed = []
            while not any(
                e["event"] == "run.completed" and e["data"]["payload"]["text"] == "four five"
                for e in missed
            ):
                missed.extend(sse_events(lines, 1))
        seqs = [int(e["id"]) for e in missed]
        assert seqs == list(range(int(last) + 1, int(last) + 1 + len(seqs)))
        types = [e["event"] for e in missed]
        assert types.count("run.completed") == 2
        for event in missed:
            assert event["data"]["seq"] == int(event["id"])
            assert event["data"]["workspace_id"] == wid
            assert event["data"]["type"] == event["event"]
        deltas = [e["data"]["payload"]["delta"] for e in missed if e["event"] == "message.delta"]
        assert "".join(deltas).endswith("four five")
        bad = http.get(f"/v1/workspaces/{wid}/events", params={"since": "x"})
        assert bad.status_code == 400


def test_session_filter_and_reset_for_an_unknown_seq(live, project):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        mine = http.post(f"/v1/workspaces/{wid}/sessions", json={"title": "mine"}).json()["id"]
        with http.stream(
            "GET", f"/v1/workspaces/{wid}/events", params={"session_id": mine}
        ) as stream:
            lines = stream.iter_lines()
            prompt(http, wid, "not mine")
            run = prompt(http, wid, "mine", session_id=mine).json()
            events = []
            while not events or events[-1]["event"] != "run.completed":
                events.extend(sse_events(lines, 1))
        assert {e["data"]["session_id"] for e in events} == {mine}
        assert events[-1]["data"]["payload"]["id"] == run["id"]
        with http.stream("GET", f"/v1/workspaces/{wid}/events", params={"since": 10**9}) as stream:
            (first,) = sse_events(stream.iter_lines(), 1)
        assert first["event"] == "reset"
        missing = http.get(f"/v1/workspaces/{wid}/events", params={"session_id": "nope"})
        assert missing.status_code == 404


def test_streams_are_capped_below_threads_and_prompts_still_work(live_factory, project):
    live = live_factory(threads=4, ping_interval=0.5)
    assert live.server.config.max_streams == 2
    with httpx.Client(base_url=live.url, timeout=10) as http:
        wid = register(http, project)
        with (
            http.stream("GET", f"/v1/workspaces/{wid}/events") as one,
            http.stream("GET", f"/v1/workspaces/{wid}/events") as two,
        ):
            assert one.status_code == two.status_code == 200
            third = http.get(f"/v1/workspaces/{wid}/events")
            assert third.status_code == 503
            assert third.json()["error"]["code"] == "too_many_streams"
            assert third.headers["Retry-After"]
            run = prompt(http, wid, "still served")
            assert run.status_code == 202
            done = wait_for(
                lambda: (
                    http.get(f"/v1/workspaces/{wid}/runs/{run.json()['id']}").json()["status"]
                    == "completed"
                ),
                10,
            )
            assert done
            assert http.get("/v1/health").status_code == 200
        # Closed streams give their slots back.
        wait_for(lambda: _stream_available(http, wid), 5)


def _stream_available(http: httpx.Client, wid: str) -> bool:
    with http.stream("GET", f"/v1/workspaces/{wid}/events") as stream:
        return stream.status_code == 200


def test_a_vanished_client_frees_its_stream_within_a_ping(live_factory, project):
    live = live_factory(threads=4, ping_interval=1.0)
    with httpx.Client(base_url=live.url, timeout=10) as http:
        wid = register(http, project)
    host, port = live.url.removeprefix("http://").split(":")
    raw = []
    for _ in range(2):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(
            f"GET /v1/workspaces/{wid}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        assert b"200 OK" in sock.recv(4096)
        raw.append(sock)
    with httpx.Client(base_url=live.url, timeout=10) as http:
        assert http.get(f"/v1/workspaces/{wid}/events").status_code == 503
        for sock in raw:
            sock.close()
        started = time.monotonic()
        wait_for(lambda: _stream_available(http, wid), 5)
        assert time.monotonic() - started < 3


def test_pings_keep_an_idle_stream_alive(live_factory, project):
    live = live_factory(ping_interval=0.3)
    with httpx.Client(base_url=live.url, timeout=10) as http:
        wid = register(http, project)
        with http.stream("GET", f"/v1/workspaces/{wid}/events") as stream:
            lines = stream.iter_lines()
            assert next(lines) == ": open"
            assert next(lines) == ""
            assert next(lines) == ": ping"


def test_delete_ends_streams_after_the_last_run_completed(live_factory, project):
    live = live_factory(echo_delay=0.05)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = register(http, project)
        with http.stream("GET", f"/v1/workspaces/{wid}/events") as stream:
            lines = stream.iter_lines()
            run = prompt(http, wid, LONG).json()
            queued = prompt(http, wid, "queued", session_id=run["session_id"]).json()
            wait_for(lambda: any(e["event"] == "message.delta" for e in sse_events(lines, 1)))
            with httpx.Client(base_url=live.url, timeout=30) as other:
                assert other.delete(f"/v1/workspaces/{wid}").status_code == 204
            rest = sse_events(lines, 10_000, timeout=10)
        types = [e["event"] for e in rest]
        assert "workspace.closing" in types
        completed = {
            e["data"]["payload"]["id"]: e["data"]["payload"]["status"]
            for e in rest
            if e["event"] == "run.completed"
        }
        assert completed == {run["id"]: "cancelled", queued["id"]: "cancelled"}
        assert types.index("workspace.closing") < types.index("run.completed")


def test_events_are_sent_through_the_servers_blinker_signal(server, project):
    received = []

    def receiver(sender, event):
        received.append((sender, event.type))

    server.signals.event_published.connect(receiver)
    try:
        record, _ = server.register(str(project), None)
        workspace = server.get(record["id"])
        run, _ = workspace.submit("hi")
        assert workspace.wait_run(run["id"], 10)["status"] == "completed"
    finally:
        server.signals.event_published.disconnect(receiver)
    assert {sender for sender, _ in received} == {record["id"]}
    types = [t for _, t in received]
    assert types[:2] == ["session.created", "run.queued"] and types[-1] == "run.completed"
