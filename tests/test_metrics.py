"""GET /metrics (SPEC §4 "Console and metrics"): Prometheus text that a
Prometheus parser reads, and that follows real runs on a real socket."""

from __future__ import annotations

from typing import Any

import httpx
from conftest import wait_for
from fakeprovider import HTTPError, Text
from prometheus_client.parser import text_string_to_metric_families

from crushd.common import ACTIVE_STATUSES

KEY_ENV = "CRUSHD_TEST_METRICS_KEY"
BOUNDED_LABELS = {"status", "method", "le"}
LONG_PROMPT = " ".join(f"w{i}" for i in range(400))


def scrape(http: httpx.Client, **headers: str) -> dict[tuple[str, frozenset], float]:
    response = http.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            assert set(sample.labels) <= BOUNDED_LABELS, sample
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def finish(http: httpx.Client, wid: str, run: dict[str, Any]) -> dict[str, Any]:
    done = http.get(f"/v1/workspaces/{wid}/runs/{run['id']}", params={"wait": 20}).json()
    assert done["status"] not in ACTIVE_STATUSES, done
    return done


def test_metrics_follow_runs_streams_and_requests(live_factory, project):
    live = live_factory(echo_delay=0.02)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        before = scrape(http)
        for name in (
            "crushd_runs_active",
            "crushd_runs_queued",
            "crushd_event_streams",
            "crushd_provider_retries_total",
            "crushd_run_duration_seconds_count",
            "crushd_first_delta_seconds_count",
        ):
            assert (name, frozenset()) in before, name
        assert value(before, "crushd_runs_total", status="completed") == 0
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
        for prompt in ("one two", "three four five"):
            run = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": prompt}).json()
            assert finish(http, wid, run)["status"] == "completed"

        # A long run holds its session; a second prompt there waits behind it.
        long = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": LONG_PROMPT}).json()
        sid = long["session_id"]
        queued = http.post(
            f"/v1/workspaces/{wid}/agent", json={"prompt": "later", "session_id": sid}
        ).json()
        assert queued["status"] == "queued"
        wait_for(lambda: value(scrape(http), "crushd_runs_active") == 1)
        assert value(scrape(http), "crushd_runs_queued") == 1
        with http.stream("GET", f"/v1/workspaces/{wid}/events") as stream:
            assert stream.status_code == 200
            wait_for(lambda: value(scrape(http), "crushd_event_streams") == 1)
            wait_for(
                lambda: http.get(f"/v1/workspaces/{wid}/sessions/{sid}/messages").json()[-1][
                    "parts"
                ],
                message="the long run streamed nothing",
            )
            http.post(f"/v1/workspaces/{wid}/sessions/{sid}/cancel")
        assert finish(http, wid, long)["status"] == "cancelled"
        assert finish(http, wid, queued)["status"] == "cancelled"
        wait_for(lambda: value(scrape(http), "crushd_event_streams") == 0)

        after = scrape(http)
    assert value(after, "crushd_runs_total", status="completed") == 2
    assert value(after, "crushd_runs_total", status="cancelled") == 2
    assert value(after, "crushd_runs_active") == 0
    assert value(after, "crushd_runs_queued") == 0
    # The queued run never started: no duration, no first delta for it.
    assert value(after, "crushd_run_duration_seconds_count") == 3
    assert value(after, "crushd_first_delta_seconds_count") == 3
    assert value(after, "crushd_run_duration_seconds_sum") > 0
    assert value(after, "crushd_run_duration_seconds_bucket", le="+Inf") == 3
    assert value(after, "crushd_http_requests_total", method="POST", status="201") == 1
    assert value(after, "crushd_http_requests_total", method="POST", status="202") == 4
    assert value(before, "crushd_http_requests_total", method="GET", status="200") == 0
    assert value(after, "crushd_http_requests_total", method="GET", status="200") >= 5
    assert value(after, "crushd_provider_retries_total") == 0


def test_provider_retries_are_counted(fake, live_factory, project, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-metrics")
    fake.script([HTTPError(429, "slow down", headers={"retry-after-ms": "20"})])
    fake.script([HTTPError(503, "busy", headers={"retry-after-ms": "20"})])
    fake.script([Text("fine")])
    live = live_factory(
        provider="openai", model="m", base_url=fake.openai_base_url, api_key_env=KEY_ENV
    )
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
        run = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "hi"}).json()
        assert finish(http, wid, run)["status"] == "completed"
        samples = scrape(http)
    assert value(samples, "crushd_provider_retries_total") == 2
    assert value(samples, "crushd_runs_total", status="completed") == 1


def test_metrics_need_the_token_and_pass_the_browser_guard(live_factory):
    live = live_factory(token="metrics-token")
    with httpx.Client(base_url=live.url, timeout=30) as http:
        refused = http.get("/metrics")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"
        assert http.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        bearer = {"Authorization": "Bearer metrics-token"}
        samples = scrape(http, **bearer)
        assert value(samples, "crushd_http_requests_total", method="GET", status="401") == 2
        foreign = http.get("/metrics", headers={**bearer, "Origin": "http://evil.example"})
        assert foreign.status_code == 403
        rebound = http.get("/metrics", headers={**bearer, "Host": "evil.example"})
        assert rebound.status_code == 403
        assert (
            value(scrape(http, **bearer), "crushd_http_requests_total", method="GET", status="403")
            == 2
        )
