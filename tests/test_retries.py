"""Provider resilience: retries, Retry-After, idle timeouts, message resets.

The unit tests pin the retry arithmetic with an injected clock and jitter;
the rest drive real turns through a real waitress server whose model is
:class:`FakeProvider` answering over a real socket with scripted failures,
and check the events, the stored messages, the run record and the requests
the model saw.  Backoff starts at 10 ms here (``retry_base_delay``), so only
the tests of a demanded wait wait for real.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from conftest import AGENT_KEY_ENV, sse_events
from fakeprovider import (
    Drop,
    Hang,
    HTTPError,
    StreamError,
    Text,
    ToolCall,
)

from crushd.common import text_of
from crushd.providers.retry import (
    RetryPolicy,
    classify_stream_error,
    is_context_too_long,
    parse_retry_after,
)

KEY_ENV = AGENT_KEY_ENV
BOTH = pytest.mark.parametrize("protocol", ["openai", "anthropic"])


# ---------------------------------------------------------------- arithmetic


def test_retry_after_seconds_milliseconds_and_dates():
    now = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    clock = lambda: now  # noqa: E731
    assert parse_retry_after({"Retry-After": "7"}, clock) == 7.0
    assert parse_retry_after({"retry-after": "0.5"}, clock) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "Retry-After": "9"}, clock) == 0.25
    assert parse_retry_after({"Retry-After": "Fri, 01 May 2026 12:00:30 GMT"}, clock) == 30.0
    assert parse_retry_after({"Retry-After": "Fri, 01 May 2026 11:00:00 GMT"}, clock) == 0.0
    assert parse_retry_after({"retry-after-ms": "soon", "Retry-After": "3"}, clock) == 3.0
    for junk in ("", "soon", "-4", "inf", "Friday noon"):
        assert parse_retry_after({"Retry-After": junk}, clock) is None, junk
    assert parse_retry_after({}, clock) is None


def test_backoff_doubles_from_one_second_to_thirty_with_jitter():
    middle = RetryPolicy(random=lambda: 0.5)
    assert [middle.backoff(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    low, high = RetryPolicy(random=lambda: 0.0), RetryPolicy(random=lambda: 0.999999)
    assert low.backoff(1) == 0.75 and 1.24 < high.backoff(1) < 1.25
    assert high.backoff(6) == 30.0  # the cap holds with the jitter too
    assert RetryPolicy(max_wait=5, random=lambda: 0.5).backoff(4) == 5.0
    assert RetryPolicy(base_delay=0.01, random=lambda: 0.5).backoff(3) == 0.04


def test_in_stream_errors_are_classified():
    assert classify_stream_error({"type": "overloaded_error", "message": "Overloaded"})["retryable"]
    assert classify_stream_error({"type": "rate_limit_error", "message": "slow"})["retryable"]
    assert classify_stream_error({"type": "api_error", "message": "Internal"})["retryable"]
    assert classify_stream_error({"type": "server_error", "code": None})["retryable"]
    assert classify_stream_error({"code": 502, "message": "upstream"})["retryable"]
    assert not classify_stream_error({"type": "invalid_request_error", "message": "bad"})[
        "retryable"
    ]
    too_long = classify_stream_error(
        {"type": "invalid_request_error", "message": "prompt is too long: 210000 tokens"}
    )
    assert too_long["context_too_long"] and not too_long["retryable"]
    assert is_context_too_long("This model's maximum context length is 128000 tokens")
    assert not is_context_too_long("Overloaded")


# ---------------------------------------------------------------- a live daemon


@pytest.fixture
def agent(agent):
    """The shared live-crushd starter with backoff starting at 10 ms."""

    def start(protocol: str = "openai", **overrides: Any):
        return agent(protocol, **{"retry_base_delay": 0.01, **overrides})

    return start


class Turn:
    """One prompt submitted to a live server, with its session's event stream open."""

    def __init__(self, http: httpx.Client, lines: Iterator[str], wid: str) -> None:
        self.http = http
        self.wid = wid
        self._lines = lines
        self.events: list[dict[str, Any]] = []
        self.run: dict[str, Any] = {}

    def submit(self, text: str = "hello") -> dict[str, Any]:
        response = self.http.post(f"/v1/workspaces/{self.wid}/agent", json={"prompt": text})
        assert response.status_code == 202, response.text
        self.run = response.json()
        return self.run

    def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = sse_events(self._lines, 1, timeout)
            assert got, f"event stream ended; seen {self.types()}"
            self.events.append(got[0]["data"])
            if predicate(self.events[-1]):
                return self.events[-1]
        raise AssertionError(f"no matching event; seen {self.types()}")

    def finish(self, timeout: float = 15) -> dict[str, Any]:
        """Wait for this run's ``run.completed``; return the terminal run."""
        rid = self.run["id"]
        event = self.until(
            lambda e: e["type"] == "run.completed" and e["payload"]["id"] == rid, timeout
        )
        return event["payload"]

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e["payload"] for e in self.events if e["type"] == kind]

    def stored(self) -> list[dict[str, Any]]:
        sid = self.run["session_id"]
        return self.http.get(f"/v1/workspaces/{self.wid}/sessions/{sid}/messages").json()


@contextmanager
def turn(live, project) -> Iterator[Turn]:
    with httpx.Client(base_url=live.url, timeout=httpx.Timeout(15.0)) as http:
        response = http.post("/v1/workspaces", json={"path": str(project), "yolo": True})
        assert response.status_code in (200, 201), response.text
        wid = response.json()["id"]
        with http.stream("GET", f"/v1/workspaces/{wid}/events") as events:
            assert events.status_code == 200
            yield Turn(http, events.iter_lines(), wid)


def answer_of(message: dict[str, Any]) -> str:
    return text_of(message["parts"])


def finish_of(message: dict[str, Any]) -> dict[str, Any]:
    (finish,) = [p for p in message["parts"] if p["type"] == "finish"]
    return finish


def deltas_after_last_reset(t: Turn, message_id: str) -> str:
    text = ""
    for event in t.events:
        payload = event["payload"] or {}
        if payload.get("message_id") != message_id:
            continue
        if event["type"] == "message.reset":
            text = ""
        elif event["type"] == "message.delta" and payload["kind"] == "text":
            text += payload["delta"]
    return text


# ---------------------------------------------------------------- rate limits


def http_date(epoch: int) -> str:
    return format_datetime(datetime.fromtimestamp(epoch, UTC), usegmt=True)


@pytest.mark.parametrize(
    "protocol,headers,least,most",
    [
        ("openai", {"Retry-After": "1"}, 1.0, 1.0),
        ("anthropic", {"Retry-After": "1"}, 1.0, 1.0),
        ("openai", {"retry-after-ms": "300", "Retry-After": "20"}, 0.3, 0.3),
        ("anthropic", {"retry-after-ms": "300"}, 0.3, 0.3),
        ("anthropic", "date", None, None),  # set from the request's time
    ],
)
def test_rate_limit_waits_as_told_then_succeeds(
    fake, agent, project, protocol, headers, least, most
):
    live = agent(protocol)
    retry_at = None
    if headers == "date":  # a whole second, at least two ahead
        retry_at = int(time.time()) + 3
        headers = {"Retry-After": http_date(retry_at)}
    fake.script([HTTPError(429, "Rate limit reached for requests", headers=headers)])
    fake.script([Text("made "), Text("it")])
    with turn(live, project) as t:
        t.submit()
        done = t.finish()
        stored = t.stored()
    assert done["status"] == "completed", done
    assert done["text"] == "made it"
    first, second = fake.requests
    if retry_at is not None:
        # The wait is what was left until the date when the answer came, so
        # it is measured from the request, however long the setup took.
        left = retry_at - (first.time + time.time() - time.monotonic())
        least, most = left - 0.5, left + 0.05
    assert second.time - first.time >= least - 0.02
    (retrying,) = t.of("run.retrying")
    assert retrying["run_id"] == done["id"] and retrying["attempt"] == 1
    assert least - 0.01 <= retrying["delay_s"] <= most + 0.01
    assert retrying["error"] == "Rate limit reached for requests"
    assert t.of("message.reset") == []  # nothing had streamed
    assert t.types().index("run.retrying") < t.types().index("message.delta")
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert answer_of(stored[1]) == "made it"
    assert second.body == first.body


@BOTH
def test_overload_and_server_errors_back_off_then_succeed(fake, agent, project, protocol):
    first = HTTPError(529, "Overloaded") if protocol == "anthropic" else HTTPError(502, "Bad gw")
    fake.script([first])
    fake.script([HTTPError(503, "Service Unavailable")])
    fake.script([Text("fine")])
    live = agent(protocol)
    with turn(live, project) as t:
        t.submit()
        done = t.finish()
    assert done["status"] == "completed" and done["text"] == "fine"
    assert len(fake.requests) == 3
    retries = t.of("run.retrying")
    assert [r["attempt"] for r in retries] == [1, 2]
    assert all(0 < r["delay_s"] < 0.1 for r in retries), retries  # backoff, none demanded
    assert retries[0]["error"] == first.message


@pytest.mark.parametrize("status", [400, 401, 403, 404])
@BOTH
def test_client_errors_are_not_retried(fake, agent, project, protocol, status):
    fake.script([HTTPError(status, f"refused with {status}")])
    fake.set_default([Text("should never be asked")])
    live = agent(protocol)
    with turn(live, project) as t:
        t.submit()
        done = t.finish()
    assert done["status"] == "failed"
    assert done["error"] == f"refused with {status}"
    assert len(fake.requests) == 1
    assert t.of("run.retrying") == []


def test_a_prompt_too_long_is_not_retried_even_under_a_5xx(fake, agent, project):
    # llama.cpp's server answers an oversized prompt with a 500.
    fake.script([HTTPError(500, "the request exceeds the available context size")])
    fake.set_default([Text("should never be asked")])
    live = agent("openai")
    with turn(live, project) as t:
        t.submit()
        done = t.finish()
    assert done["status"] == "failed" and "context size" in done["error"]
    assert len(fake.requests) == 1


@BOTH
def test_a_demanded_wait_over_the_limit_fails_at_once(fake, agent, project, protocol):
    fake.script([HTTPError(429, "Daily quota used up", headers={"Retry-After": "3600"})])
    fake.set_default([Text("should never be asked")])
    live = agent(protocol, max_retry_wait=60)
    with turn(live, project) as t:
        started = time.monotonic()
        t.submit()
        done = t.finish()
        elapsed = time.monotonic() - started
        stored = t.stored()
    assert elapsed < 3
    assert done["status"] == "failed"
    assert "Daily quota used up" in done["error"] and "3600" in done["error"]
    assert len(fake.requests) == 1 and t.of("run.retrying") == []
    assert finish_of(stored[1])["reason"] == "error"


def test_retries_are_bounded_and_the_last_error_fails_the_run(fake, agent, project):
    fake.set_default([HTTPError(503, "still busy")])
    live = agent(max_retries=2)
    with turn(live, project) as t:
        t.submit()
        done = t.finish()
    assert done["status"] == "failed"
    assert "still busy" in done["error"] and "2 retries" in done["error"]
    assert len(fake.requests) == 3
    assert [r["attempt"] for r in t.of("run.retrying")] == [1, 2]


def test_zero_retries_fails_on_the_first_error(fake, agent, project):
    fake.set_default([HTTPError(503, "busy")])
    live = agent(max_retries=0)
    with turn(live, project) as t:
        t.submit()
        done = t.finish()
    assert done["status"] == "failed" and done["error"] == "busy"
    assert len(fake.requests) == 1 and t.of("run.retrying") == []


@BOTH
def test_cancel_during_the_backoff_ends_the_run_within_a_second(fake, agent, project, protocol):
    fake.script([HTTPError(429, "slow down", headers={"Retry-After": "30"})])
    fake.set_default([Text("should never be asked")])
    live = agent(protocol)
    with turn(live, project) as t:
        run = t.submit()
        t.until(lambda e: e["type"] == "run.retrying")
        started = time.monotonic()
        response = t.http.post(f"/v1/workspaces/{t.wid}/runs/{run['id']}/cancel")
        assert response.status_code == 202
        done = t.finish()
        elapsed = time.monotonic() - started
        stored = t.stored()
    assert elapsed < 1.0
    assert done["status"] == "cancelled"
    assert finish_of(stored[1])["reason"] == "canceled"
    assert len(fake.requests) == 1


# ---------------------------------------------------------------- failures mid-stream


@BOTH
def test_a_dropped_stream_is_reset_and_streamed_again(fake, agent, project, protocol):
    fake.script([Text("half of "), Text("an answer"), Drop()])
    fake.script([Text("the whole "), Text("answer")])
    live = agent(protocol)
    with turn(live, project) as t:
        t.submit()
        done = t.finish()
        stored = t.stored()
    assert done["status"] == "completed", done
    assert done["text"] == "the whole answer"
    assert [m["role"] for m in stored] == ["user", "assistant"]
    message = stored[1]
    assert answer_of(message) == "the whole answer" == deltas_after_last_reset(t, message["id"])
    assert finish_of(message)["reason"] == "end_turn"
    (reset,) = t.of("message.reset")
    assert reset == {"message_id": message["id"], "run_id": done["id"]}
    types = t.types()
    assert types.index("message.reset") < types.index("run.retrying")
    # Each attempt's text was published, the failed one's before the reset
    # (chunks read together may come as one delta).
    streamed = [
        "reset" if e["type"] == "message.reset" else e["payload"]["delta"]
        for e in t.events
        if e["type"] in ("message.delta", "message.reset")
    ]
    cut = streamed.index("reset")
    assert "".join(streamed[:cut]) == "half of an answer"
    assert "".join(streamed[cut + 1 :]) == "the whole answer"
    first, second = fake.requests
    assert second.body == first.body  # nothing of the failed attempt reached the model


@BOTH
def test_an_overload_error_inside_the_stream_is_retried(fake, agent, project, protocol):
    kind = "overloaded_error" if protocol == "anthropic" else "server_error"
    fake.script([Text("doomed"), StreamError("Overloaded", kind)])
    fake.script([Text("second try")])
    live = agent(protocol)
    with turn(live, project) as t:
        t.submit()
        done = t.finish()
        stored = t.stored()
    assert done["status"] == "completed" and done["text"] == "second try"
    assert answer_of(stored[1]) == "second try"
    assert len(t.of("message.reset")) == 1
    assert t.of("run.retrying")[0]["error"] == "Overloaded"


def test_an_invalid_request_inside_the_stream_is_not_retried(fake, agent, project):
    message = "messages: text content blocks must be non-empty"
    fake.script([StreamError(message, "invalid_request_error")])
    fake.set_default([Text("should never be asked")])
    live = agent("anthropic")
    with turn(live, project) as t:
        t.submit()
        done = t.finish()
    assert done["status"] == "failed" and "non-empty" in done["error"]
    assert len(fake.requests) == 1


@BOTH
def test_a_silent_stream_times_out_and_is_retried(fake, agent, project, protocol):
    fake.script([Text("stuck "), Hang()])
    fake.script([Hang(headers=False)])
    fake.script([Text("unstuck")])
    # Long enough that a healthy stream on a loaded machine never trips it.
    live = agent(protocol, stream_idle_timeout=1.0)
    with turn(live, project) as t:
        t.submit()
        done = t.finish()
        stored = t.stored()
    assert done["status"] == "completed" and done["text"] == "unstuck"
    assert answer_of(stored[1]) == "unstuck"
    first, second, third = fake.requests
    # The client's clock starts when it has sent the request, a little before
    # the fake records it: allow for that on a loaded machine.
    assert second.time - first.time >= 0.9 and third.time - second.time >= 0.9
    retries = t.of("run.retrying")
    assert len(retries) == 2 and all("no data for 1 s" in r["error"] for r in retries), retries
    assert len(t.of("message.reset")) == 1  # only the first attempt had streamed


def test_retries_are_not_model_steps(fake, agent, project):
    (project / "a.txt").write_text("a\n")
    fake.script([HTTPError(500, "oops")])
    fake.script([ToolCall("ls", {"path": "."})])
    fake.script([Text("partial"), Drop()])
    fake.script([Text("listed")])
    live = agent(max_steps=2)
    with turn(live, project) as t:
        t.submit()
        done = t.finish()
        stored = t.stored()
    assert done["status"] == "completed", done
    assert done["text"] == "listed"
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert len(fake.requests) == 4
    # The retry of step two resends step two's request, tool result included.
    assert fake.requests[3].body == fake.requests[2].body
    assert fake.requests[3].body["messages"][-1]["role"] == "tool"
