"""Named models: the config tables, ``GET /v1/models``, a model per prompt,
the run's ``kind``/``model`` and the provider's id on the messages.

The live tests run two models on one :class:`FakeProvider` (one speaking the
OpenAI protocol, one Anthropic's) so the request the fake receives says which
model a run really used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakeprovider import FakeProvider, Text

from crushd.common import TERMINAL_STATUSES
from crushd.config import Config, ConfigError
from crushd.providers.base import ProviderError
from crushd.providers.catalog import ModelCatalog, ModelSpec
from crushd.server import Server
from crushd.store import WorkspaceStore

KEY_ENV = "CRUSHD_TEST_MODELS_KEY"


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "crushd.toml"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- configuration


TWO_MODELS = """
default_model = "claude"

[models.cheap]
provider = "openai"
model = "gpt-4o-mini"
base_url = "http://localhost:11434/v1"
context_window = 16000
input_price = 0.15
output_price = 0.6

[models.claude]
provider = "anthropic"
model = "claude-sonnet-4-5"
api_key_env = "MY_ANTHROPIC_KEY"
context_window = 200000
max_output_tokens = 4096
input_price = 3
output_price = 15
cache_read_price = 0.3
cache_write_price = 3.75
"""


def test_model_tables_and_the_default(tmp_path):
    config = Config.load({}, env={}, config_file=write_config(tmp_path, TWO_MODELS))
    assert list(config.models) == ["cheap", "claude"]
    assert config.default_model == "claude"
    claude = config.models["claude"]
    assert claude == ModelSpec(
        name="claude",
        provider="anthropic",
        model="claude-sonnet-4-5",
        api_key_env="MY_ANTHROPIC_KEY",
        context_window=200000,
        max_output_tokens=4096,
        input_price=3.0,
        output_price=15.0,
        cache_read_price=0.3,
        cache_write_price=3.75,
    )
    cheap = config.models["cheap"]
    assert cheap.base_url == "http://localhost:11434/v1" and cheap.cache_read_price is None
    assert cheap.key_env == "OPENAI_API_KEY" and not cheap.key_required  # a local server
    assert claude.key_required


def test_flags_define_a_model_and_are_the_default(tmp_path):
    path = write_config(tmp_path, TWO_MODELS)
    flags = {"provider": "openai", "model": "gpt-4.1", "base_url": "http://127.0.0.1:9/v1"}
    config = Config.load(flags, env={}, config_file=path)
    assert list(config.models) == ["cheap", "claude", "gpt-4.1"]
    assert config.default_model == "gpt-4.1"
    spec = config.models["gpt-4.1"]
    assert (spec.provider, spec.model, spec.base_url) == ("openai", "gpt-4.1", flags["base_url"])
    assert spec.context_window == 128000


def test_a_config_with_only_provider_and_model_keeps_working(tmp_path):
    path = write_config(tmp_path, 'provider = "anthropic"\nmodel = "claude-haiku-4-5"\n')
    config = Config.load({}, env={}, config_file=path)
    assert list(config.models) == ["claude-haiku-4-5"]
    assert config.default_model == "claude-haiku-4-5"
    assert config.models["claude-haiku-4-5"].provider == "anthropic"
    # With nothing at all, the built-in echo model.
    bare = Config.load({}, env={})
    assert list(bare.models) == ["echo"] and bare.default_model == "echo"
    # A [crushd] table with [models] beside it.
    path = write_config(
        tmp_path,
        '[crushd]\ndefault_model = "e"\n[models.e]\nprovider = "echo"\n'
        '[models.f]\nprovider = "echo"\n',
    )
    assert Config.load({}, env={}, config_file=path).default_model == "e"
    # CRUSHD_DEFAULT_MODEL picks among the file's models.
    path = write_config(tmp_path, '[models.e]\nprovider = "echo"\n[models.f]\nprovider = "echo"\n')
    config = Config.load({}, env={"CRUSHD_DEFAULT_MODEL": "f"}, config_file=path)
    assert config.default_model == "f"
    assert Config.load({}, env={}, config_file=path).default_model == "e"  # the first


@pytest.mark.parametrize(
    "text,message",
    [
        ('[models.a]\nmodel = "x"\n', "[models.a]: provider must be one of"),
        ('[models.a]\nprovider = "gpt"\n', "not 'gpt'"),
        ('[models.a]\nprovider = "echo"\ncolor = 1\n', "[models.a]: unknown key 'color'"),
        ('[models.a]\nprovider = "echo"\ncontext_window = "big"\n', "context_window must be"),
        ('[models.a]\nprovider = "echo"\ncontext_window = 0\n', "at least 1"),
        ('[models.a]\nprovider = "echo"\ncontext_window = 1.5\n', "whole number"),
        ('[models.a]\nprovider = "echo"\ninput_price = -1\n', "input_price must be at least 0"),
        ('[models.a]\nprovider = "echo"\noutput_price = true\n', "output_price must be a number"),
        ('[models.a]\nprovider = "openai"\nbase_url = ""\n', "base_url must be a non-empty"),
        ("models = 3\n", "models must be a table"),
        ("[models]\na = 3\n", "[models.a] must be a table"),
        (
            'default_model = "nope"\n[models.a]\nprovider = "echo"\n',
            "default_model 'nope' is not a configured model (configured: a)",
        ),
        ('provider = "openai"\n', "the openai provider needs a model name"),
    ],
)
def test_bad_model_tables_are_clear_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        Config.load({}, env={}, config_file=write_config(tmp_path, text))
    assert message in info.value.message


def test_the_catalog_builds_each_client_once_and_reports_missing_keys():
    specs = {
        "e": ModelSpec("e", "echo", "echo"),
        "keyed": ModelSpec("keyed", "anthropic", "claude-x", api_key_env="UNSET_KEY_VAR"),
        "local": ModelSpec("local", "openai", "llama", base_url="http://127.0.0.1:9/v1"),
    }
    catalog = ModelCatalog(specs, "e", env={})
    try:
        assert catalog.provider("e") is catalog.provider("e")
        assert catalog.missing_keys() == [("keyed", "UNSET_KEY_VAR")]
        with pytest.raises(ProviderError) as info:
            catalog.provider("keyed")
        assert info.value.details == "model 'keyed': environment variable UNSET_KEY_VAR is not set"
        assert catalog.provider("local").model == "llama"  # no key needed, none sent
        with pytest.raises(ProviderError, match="not configured"):
            catalog.provider("gone")
        assert [m["name"] for m in catalog.describe() if m["default"]] == ["e"]
    finally:
        catalog.close()
    with pytest.raises(ProviderError, match="stopping"):
        catalog.provider("e")


# ---------------------------------------------------------------- a live daemon


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as server:
        server.set_default([Text("an "), Text("answer")])
        yield server


@pytest.fixture
def two_models(fake, live_factory, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-models-test")
    models = {
        "fast": {
            "provider": "openai",
            "model": "gpt-fast-1",
            "base_url": fake.openai_base_url,
            "api_key_env": KEY_ENV,
            "context_window": 32000,
        },
        "claude": {
            "provider": "anthropic",
            "model": "claude-test-9",
            "base_url": fake.anthropic_base_url,
            "api_key_env": KEY_ENV,
            "max_output_tokens": 1234,
        },
        "keyless": {
            "provider": "anthropic",
            "model": "claude-nokey",
            "base_url": fake.anthropic_base_url,
            "api_key_env": "CRUSHD_TEST_UNSET_KEY",
        },
    }
    monkeypatch.delenv("CRUSHD_TEST_UNSET_KEY", raising=False)
    return live_factory(models=models, default_model="fast")


def submit(http: httpx.Client, wid: str, text: str, **extra: Any) -> dict[str, Any]:
    response = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": text, **extra})
    assert response.status_code == 202, response.text
    return response.json()


def wait(http: httpx.Client, wid: str, rid: str) -> dict[str, Any]:
    run = http.get(f"/v1/workspaces/{wid}/runs/{rid}", params={"wait": 20}).json()
    assert run["status"] in TERMINAL_STATUSES, run
    return run


def test_models_are_listed(two_models):
    with httpx.Client(base_url=two_models.url, timeout=10) as http:
        listed = http.get("/v1/models").json()
    assert listed == [
        {
            "name": "fast",
            "provider": "openai",
            "model": "gpt-fast-1",
            "context_window": 32000,
            "default": True,
        },
        {
            "name": "claude",
            "provider": "anthropic",
            "model": "claude-test-9",
            "context_window": 128000,
            "default": False,
        },
        {
            "name": "keyless",
            "provider": "anthropic",
            "model": "claude-nokey",
            "context_window": 128000,
            "default": False,
        },
    ]


def test_a_prompt_picks_its_model_and_the_session_keeps_it(two_models, fake, project):
    with httpx.Client(base_url=two_models.url, timeout=30) as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
        first = submit(http, wid, "one")
        assert (first["kind"], first["model"]) == ("prompt", "fast")
        sid = first["session_id"]
        assert wait(http, wid, first["id"])["status"] == "completed"
        second = submit(http, wid, "two", session_id=sid, model="claude")
        assert second["model"] == "claude"
        third = submit(http, wid, "three", session_id=sid)  # queued behind "two"
        assert third["model"] == "claude"
        for run in (second, third):
            done = wait(http, wid, run["id"])
            assert done["status"] == "completed" and done["model"] == "claude", done
        other = submit(http, wid, "elsewhere")  # a new session: the default again
        assert other["model"] == "fast"
        wait(http, wid, other["id"])
        stored = http.get(f"/v1/workspaces/{wid}/sessions/{sid}/messages").json()
        runs = {r["id"]: r for r in http.get(f"/v1/workspaces/{wid}/runs").json()}
    assert {r["kind"] for r in runs.values()} == {"prompt"}
    assistants = [(m["provider"], m["model"]) for m in stored if m["role"] == "assistant"]
    assert assistants == [
        ("openai", "gpt-fast-1"),
        ("anthropic", "claude-test-9"),
        ("anthropic", "claude-test-9"),
    ]
    sent = [(r.protocol, r.body["model"]) for r in fake.requests]
    assert sent == [
        ("openai", "gpt-fast-1"),
        ("anthropic", "claude-test-9"),
        ("anthropic", "claude-test-9"),
        ("openai", "gpt-fast-1"),
    ]
    assert fake.requests[1].body["max_tokens"] == 1234
    # The Anthropic request carried the whole session, the OpenAI turn included.
    history = fake.requests[2].body["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant", "user"]


@pytest.mark.parametrize("model", ["nope", 7, ""])
def test_an_unknown_model_is_400_and_stores_nothing(two_models, fake, project, model):
    with httpx.Client(base_url=two_models.url, timeout=10) as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
        response = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "x", "model": model})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        if model == "nope":
            assert "unknown model 'nope'" in error["message"]
            assert "fast, claude, keyless" in error["message"]
        assert http.get(f"/v1/workspaces/{wid}/sessions").json() == []
        assert http.get(f"/v1/workspaces/{wid}/runs").json() == []
    assert fake.requests == []


def test_a_model_without_its_key_is_reported_and_its_runs_fail_saying_so(
    two_models, fake, project, caplog
):
    with httpx.Client(base_url=two_models.url, timeout=30) as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
        run = submit(http, wid, "hi", model="keyless")
        done = wait(http, wid, run["id"])
        sid = run["session_id"]
        stored = http.get(f"/v1/workspaces/{wid}/sessions/{sid}/messages").json()
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert (stored[1]["provider"], stored[1]["model"]) == ("anthropic", "claude-nokey")
    (finish,) = [p for p in stored[1]["parts"] if p["type"] == "finish"]
    assert (finish["reason"], finish["message"]) == ("error", "Missing API key")
    assert done["message_id"] == stored[1]["id"]
    assert done["status"] == "failed"
    assert done["error"] == "model 'keyless': environment variable CRUSHD_TEST_UNSET_KEY is not set"
    assert fake.requests == []


def test_startup_warns_about_a_missing_key(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("CRUSHD_TEST_UNSET_KEY", raising=False)
    config = Config.from_mapping(
        {
            "data_dir": tmp_path / "data",
            "models": {
                "e": {"provider": "echo"},
                "k": {"provider": "openai", "api_key_env": "CRUSHD_TEST_UNSET_KEY"},
            },
        }
    )
    with caplog.at_level(logging.WARNING, logger="crushd.server"):
        server = Server(config).start()
        server.stop()
    warnings = [r.getMessage() for r in caplog.records if "model_key_missing" in r.getMessage()]
    assert len(warnings) == 1
    assert "model=k" in warnings[0] and "variable=CRUSHD_TEST_UNSET_KEY" in warnings[0]


def test_a_queued_run_whose_model_is_gone_fails_when_it_starts(tmp_path, project):
    def config(models: dict[str, Any]) -> Config:
        return Config.from_mapping({"data_dir": tmp_path / "data", "models": models})

    first = Server(config({"old": {"provider": "echo"}, "e": {"provider": "echo"}})).start()
    try:
        record, _ = first.register(str(project), None)
        directory = first.get(record["id"]).directory
    finally:
        first.stop()
    # A run queued under the old configuration, left for the next start.
    store = WorkspaceStore(directory / "workspace.db", record["id"])
    try:
        store.accept_run("r-old", "hi", None, "t", 10, model="old")
    finally:
        store.close()
    second = Server(config({"e": {"provider": "echo"}})).start()
    try:
        done = second.get(record["id"]).wait_run("r-old", 10)
        stored = second.get(record["id"]).store.run_messages("r-old")
    finally:
        second.stop()
    assert done["status"] == "failed" and done["model"] == "old"
    assert done["error"] == "model 'old' is not configured (configured: e)"
    assert [m["role"] for m in stored] == ["user", "assistant"]


def test_the_default_models_client_is_built_at_start_not_by_the_first_prompt(
    tmp_path, monkeypatch, caplog
):
    """Its first build loads the HTTP stack and the CA bundle; a start pays
    for it, not the first prompt.  A default model whose key is missing
    does not stop the start."""

    def built() -> list[str]:
        return [r.getMessage() for r in caplog.records if "provider_built" in r.getMessage()]

    monkeypatch.setenv("CRUSHD_TEST_KEY", "sk-test")
    monkeypatch.delenv("CRUSHD_TEST_UNSET_KEY", raising=False)
    models = {
        "o": {"provider": "openai", "api_key_env": "CRUSHD_TEST_KEY"},
        "k": {"provider": "openai", "api_key_env": "CRUSHD_TEST_UNSET_KEY"},
    }
    with caplog.at_level(logging.INFO, logger="crushd.providers.catalog"):
        for default, expected in (("o", ["model=o"]), ("k", [])):
            config = Config.from_mapping(
                {"data_dir": tmp_path / default, "models": models, "default_model": default}
            )
            caplog.clear()
            server = Server(config).start()
            server.stop()
            assert [m.split()[1] for m in built()] == expected
