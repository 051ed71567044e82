"""Usage and cost accounting: cache tokens from both wire formats, cost_usd
per run from the model's prices, summed on the session, kept across a restart."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import make_config
from fakeprovider import FakeProvider, Text, ToolCall, Usage

from crushd.cancel import CancelToken
from crushd.providers import StepRequest
from crushd.providers import Usage as UsageEvent
from crushd.providers.anthropic import AnthropicProvider
from crushd.providers.catalog import ModelSpec
from crushd.providers.openai import OpenAIProvider
from crushd.server import Server

KEY_ENV = "CRUSHD_TEST_COSTS_KEY"
PROMPT = StepRequest(
    system="", messages=[{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]
)
PRICED = {
    "input_price": 3.0,
    "output_price": 15.0,
    "cache_read_price": 0.3,
    "cache_write_price": 3.75,
}


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_cache_tokens_from_both_wire_formats(fake, protocol):
    fake.script([Text("x"), Usage(1000, 50, cache_read_tokens=600, cache_write_tokens=300)])
    if protocol == "openai":
        provider = OpenAIProvider("m", fake.openai_base_url, "k")
    else:
        provider = AnthropicProvider("m", fake.anthropic_base_url, "k")
    try:
        events = list(provider.stream(PROMPT, CancelToken()))
    finally:
        provider.close()
    (usage,) = [e for e in events if isinstance(e, UsageEvent)]
    if protocol == "openai":  # prompt_tokens_details.cached_tokens; no cache writes reported
        assert usage == UsageEvent(1000, 50, cache_read_tokens=600, cache_write_tokens=0)
    else:  # input_tokens + cache_creation_input_tokens + cache_read_input_tokens
        assert usage == UsageEvent(1000, 50, cache_read_tokens=600, cache_write_tokens=300)


def test_cost_arithmetic():
    spec = ModelSpec("s", "anthropic", "claude", **PRICED)
    usage = UsageEvent(1_000_000, 100_000, cache_read_tokens=600_000, cache_write_tokens=300_000)
    # 100k uncached * 3 + 600k * 0.3 + 300k * 3.75 + 100k out * 15, per million
    assert spec.cost(usage) == pytest.approx(0.3 + 0.18 + 1.125 + 1.5)
    assert ModelSpec("n", "openai", "gpt").cost(usage) is None  # no prices: unknown
    reads_at_input = ModelSpec("r", "openai", "gpt", input_price=2.0, output_price=8.0)
    assert reads_at_input.cost(UsageEvent(1_000_000, 0, cache_read_tokens=500_000)) == 2.0
    only_output = ModelSpec("o", "openai", "gpt", output_price=10.0)
    assert only_output.cost(UsageEvent(5_000_000, 1_000_000)) == 10.0


def models(fake: FakeProvider) -> dict:
    common = {"base_url": fake.anthropic_base_url, "api_key_env": KEY_ENV}
    return {
        "priced": {"provider": "anthropic", "model": "claude-p", **common, **PRICED},
        "free": {"provider": "anthropic", "model": "claude-f", **common},
    }


def test_cost_per_run_summed_on_the_session(fake, live_factory, project, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk")
    # Run 1: two steps (a tool call, then the answer); run 2: one step.
    fake.script([ToolCall("ls", {"path": "."}), Usage(2000, 100, cache_write_tokens=1500)])
    fake.script([Text("listed"), Usage(2500, 200, cache_read_tokens=1500)])
    fake.script([Text("again"), Usage(3000, 50, cache_read_tokens=2800, cache_write_tokens=100)])
    live = live_factory(models=models(fake), default_model="priced")
    with httpx.Client(base_url=live.url, timeout=30) as http:
        wid = http.post("/v1/workspaces", json={"path": str(project), "yolo": True}).json()["id"]
        first = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "a"}).json()
        sid = first["session_id"]
        done1 = http.get(f"/v1/workspaces/{wid}/runs/{first['id']}", params={"wait": 20}).json()
        second = http.post(
            f"/v1/workspaces/{wid}/agent", json={"prompt": "b", "session_id": sid}
        ).json()
        done2 = http.get(f"/v1/workspaces/{wid}/runs/{second['id']}", params={"wait": 20}).json()
        session = http.get(f"/v1/workspaces/{wid}/sessions/{sid}").json()
    assert done1["status"] == done2["status"] == "completed"
    step1 = (500 * 3 + 1500 * 3.75 + 100 * 15) / 1e6
    step2 = (1000 * 3 + 1500 * 0.3 + 200 * 15) / 1e6
    step3 = (100 * 3 + 2800 * 0.3 + 100 * 3.75 + 50 * 15) / 1e6
    assert done1["usage"] == {
        "prompt_tokens": 4500,
        "completion_tokens": 300,
        "cache_read_tokens": 1500,
        "cache_write_tokens": 1500,
        "cost_usd": pytest.approx(step1 + step2),
    }
    assert done2["usage"]["cost_usd"] == pytest.approx(step3)
    assert session["cost_usd"] == pytest.approx(step1 + step2 + step3)
    assert (session["prompt_tokens"], session["completion_tokens"]) == (7500, 350)
    assert (session["cache_read_tokens"], session["cache_write_tokens"]) == (4300, 1600)


def test_no_prices_means_no_cost_and_costs_survive_a_restart(
    fake, tmp_path: Path, project, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, "sk")
    fake.set_default([Text("ok"), Usage(1_000_000, 0)])
    config = make_config(tmp_path, models=models(fake), default_model="free")
    server = Server(config).start()
    try:
        record, _ = server.register(str(project), True)
        workspace = server.get(record["id"])
        free, _ = workspace.submit("a")
        free = workspace.wait_run(free["id"], 20)
        priced, _ = workspace.submit("b", model="priced")
        priced = workspace.wait_run(priced["id"], 20)
        other, _ = workspace.submit("c", model="free")
        other = workspace.wait_run(other["id"], 20)
    finally:
        server.stop()
    assert free["status"] == "completed" and free["usage"]["cost_usd"] is None
    assert free["usage"]["prompt_tokens"] == 1_000_000
    assert priced["usage"]["cost_usd"] == pytest.approx(3.0)
    assert other["usage"]["cost_usd"] is None

    again = Server(config).start()
    try:
        workspace = again.get(record["id"])
        assert workspace.get_run(priced["id"])["usage"] == priced["usage"]
        sessions = {s["id"]: s for s in workspace.store.list_sessions()}
        assert sessions[free["session_id"]]["cost_usd"] is None
        assert sessions[priced["session_id"]]["cost_usd"] == pytest.approx(3.0)
    finally:
        again.stop()
