"""Configuration layering (defaults < CRUSHD_* < TOML < flags), validation,
the token file and the stream cap."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_config
from helpers import scrubbed_env, serve_once

from crushd.app import create_app
from crushd.config import Config, ConfigError
from crushd.server import Server


def toml(tmp_path: Path, text: str, name: str = "crushd.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- layering --------------------------------------------------------------------


def test_defaults():
    config = Config.load(env={})
    assert config.host == "127.0.0.1"
    assert config.port == 7433
    assert config.threads == 32
    assert config.workers == 4
    assert config.provider == "echo"
    assert config.echo_delay == 0.02
    assert config.max_body == 1024 * 1024
    assert config.max_queue == 64
    assert config.max_steps == 50
    assert config.shutdown_timeout == 10.0
    assert config.drain_timeout == 0.0
    assert config.permission_timeout == 600.0
    assert config.log_level == "info"
    assert config.allow_roots == []
    assert config.token is None and config.data_dir is None


def test_env_wins_over_defaults(tmp_path):
    env = {
        "CRUSHD_PORT": "9000",
        "CRUSHD_THREADS": "12",
        "CRUSHD_ECHO_DELAY": "0.5",
        "CRUSHD_HOST": "127.0.0.2",
        "CRUSHD_DATA_DIR": str(tmp_path / "d"),
        "CRUSHD_ALLOW_ROOTS": f"{tmp_path / 'a'}:{tmp_path / 'b'}",
        "CRUSHD_MAX_BODY": "2048",
        "OTHER_PORT": "1",
    }
    config = Config.load(env=env)
    assert config.port == 9000 and isinstance(config.port, int)
    assert config.threads == 12
    assert config.echo_delay == 0.5
    assert config.host == "127.0.0.2"
    assert config.resolved_data_dir(env={}) == (tmp_path / "d").resolve()
    assert config.allow_roots == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert config.max_body == 2048
    assert config.workers == 4  # untouched keys keep their defaults


def test_toml_file_wins_over_env(tmp_path):
    path = toml(tmp_path, 'port = 9001\nthreads = 16\nhost = "127.0.0.3"\n')
    env = {"CRUSHD_PORT": "9000", "CRUSHD_THREADS": "12", "CRUSHD_WORKERS": "7"}
    config = Config.load(env=env, config_file=path)
    assert (config.port, config.threads, config.host) == (9001, 16, "127.0.0.3")
    assert config.workers == 7  # env still applies where the file is silent


def test_toml_file_may_use_a_crushd_table_and_dashed_keys(tmp_path):
    path = toml(tmp_path, '[crushd]\nmax-queue = 5\necho_delay = 0\nallow_roots = ["/srv"]\n')
    config = Config.load(env={}, config_file=path)
    assert config.max_queue == 5
    assert config.echo_delay == 0
    assert config.allow_roots == ["/srv"]


def test_config_file_from_env(tmp_path):
    path = toml(tmp_path, "port = 9005\n")
    config = Config.load(env={"CRUSHD_CONFIG": path, "CRUSHD_PORT": "9000"})
    assert config.port == 9005


def test_flags_win_over_toml_file(tmp_path):
    path = toml(tmp_path, "port = 9001\nthreads = 16\nworkers = 3\n")
    env = {"CRUSHD_PORT": "9000", "CRUSHD_MAX_QUEUE": "9"}
    flags = {"port": 9002, "threads": None, "workers": 2, "allow_roots": ()}
    config = Config.load(flags, env=env, config_file=path)
    assert config.port == 9002
    assert config.workers == 2
    assert config.threads == 16  # a flag the user did not give (None) does not win
    assert config.max_queue == 9
    assert config.allow_roots == []

    flagged = Config.load({"allow_roots": ("/x", "/y")}, env={"CRUSHD_ALLOW_ROOTS": "/z"})
    assert flagged.allow_roots == ["/x", "/y"]


# -- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "word"),
    [
        ({"CRUSHD_PORT": "eighty"}, "port"),
        ({"CRUSHD_THREADS": "lots"}, "threads"),
        ({"CRUSHD_THREADS": "2"}, "threads"),
        ({"CRUSHD_THREADS": "0"}, "threads"),
        ({"CRUSHD_WORKERS": "0"}, "workers"),
        ({"CRUSHD_MAX_BODY": "0"}, "max_body"),
        ({"CRUSHD_MAX_QUEUE": "-1"}, "max_queue"),
        ({"CRUSHD_MAX_STEPS": "0"}, "max_steps"),
        ({"CRUSHD_ECHO_DELAY": "fast"}, "echo_delay"),
        ({"CRUSHD_ECHO_DELAY": "-1"}, "echo_delay"),
        ({"CRUSHD_SHUTDOWN_TIMEOUT": "-5"}, "shutdown_timeout"),
        ({"CRUSHD_DRAIN_TIMEOUT": "-5"}, "drain_timeout"),
        ({"CRUSHD_PERMISSION_TIMEOUT": "-1"}, "permission_timeout"),
        ({"CRUSHD_PROVIDER": "gpt"}, "provider"),
        ({"CRUSHD_PORT": "70000"}, "port"),
        ({"CRUSHD_PORT": "-1"}, "port"),
        ({"CRUSHD_LOG_LEVEL": "loud"}, "log"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_setting(env, word):
    with pytest.raises(ConfigError) as caught:
        Config.load(env=env)
    assert word in caught.value.message.lower()


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ('port = "abc"\n', "port"),
        ("port = true\n", "port"),
        ("threads = 1\n", "threads"),
        ('echo_delay = "soon"\n', "echo_delay"),
        ("no_such_setting = 1\n", "no_such_setting"),
        ("port = [\n", "toml"),
    ],
)
def test_invalid_toml_raises_config_error(tmp_path, text, word):
    path = toml(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        Config.load(env={}, config_file=path)
    assert word in caught.value.message.lower()


def test_missing_config_file_is_a_config_error(tmp_path):
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="missing.toml"):
        Config.load(env={}, config_file=missing)


def test_crushd_serve_with_a_bad_config_file_exits_with_a_message(tmp_path):
    bad = toml(tmp_path, "port = [\n", "bad.toml")
    unknown = toml(tmp_path, "colour = 'blue'\n", "unknown.toml")
    for path, word in ((bad, "bad.toml"), (unknown, "colour")):
        proc = serve_once(tmp_path / "data", "--config", path, "--port", "0")
        assert proc.returncode != 0
        assert word in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "data" / "registry.db").exists()


def test_crushd_serve_with_an_invalid_env_value_exits_with_a_message(tmp_path):
    env = scrubbed_env()
    for key, value in (("CRUSHD_THREADS", "two"), ("CRUSHD_LOG_LEVEL", "loud")):
        proc = serve_once(tmp_path / "data", "--port", "0", env={**env, key: value})
        assert proc.returncode != 0, proc.stderr
        assert value in proc.stderr or key[len("CRUSHD_") :].lower() in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr


# -- token file ------------------------------------------------------------------


def test_token_file_whitespace_is_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text("  s3cret-token \n\n")
    config = Config.load({"token_file": str(path)}, env={})
    assert config.resolved_token() == "s3cret-token"


def test_token_file_that_is_empty_or_missing_is_a_config_error(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ConfigError, match="empty"):
        Config.load({"token_file": str(empty)}, env={}).resolved_token()
    with pytest.raises(ConfigError, match="nope"):
        Config.load({"token_file": str(tmp_path / "nope")}, env={}).resolved_token()


def test_token_from_a_file_with_a_newline_is_accepted_by_the_api(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    server = Server(make_config(tmp_path, token_file=str(path))).start()
    try:
        client = create_app(server=server).test_client()
        assert client.get("/v1/health").status_code == 200
        denied = client.get("/v1/workspaces")
        assert denied.status_code == 401
        assert denied.get_json()["error"]["code"] == "unauthorized"
        wrong = client.get("/v1/workspaces", headers={"Authorization": "Bearer s3cret2"})
        assert wrong.status_code == 401
        ok = client.get("/v1/workspaces", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
    finally:
        server.stop()


# -- stream cap ------------------------------------------------------------------


@pytest.mark.parametrize("threads", [4, 5, 6, 7, 8, 10, 16, 32, 33, 64, 100, 1000])
def test_max_streams_is_always_below_threads(threads):
    config = Config.load({"threads": threads}, env={})
    assert 1 <= config.max_streams < threads
    assert threads - config.max_streams >= 2  # room for a prompt and a health check


def test_max_streams_follows_the_threads_setting_from_every_layer(tmp_path):
    path = toml(tmp_path, "threads = 8\n")
    assert Config.load(env={"CRUSHD_THREADS": "6"}).max_streams < 6
    assert Config.load(env={}, config_file=path).max_streams < 8
    assert Config.load({"threads": 4}, env={}, config_file=path).max_streams < 4


def test_serve_flags_are_made_from_the_config_table():
    from crushd.cli import serve
    from crushd.config import SERVE_OPTIONS

    params = {p.name: p for p in serve.params}
    given = serve.make_context("serve", []).params  # what serve() gets with no flags
    defaults = Config()
    for option in SERVE_OPTIONS:
        param = params[option.name]  # every row is a flag of crushd serve ...
        value = getattr(defaults, option.name)  # ... and a field of Config
        # A flag the user did not give leaves the file and CRUSHD_* alone.
        assert given[option.name] in (None, ()), option.name
        shown = option.default_text or ("" if value in (None, []) else str(value))
        assert (param.show_default or "") == shown, option.name
        if option.choices:
            assert list(param.type.choices) == list(option.choices)
    assert params["allow_roots"].opts == ["--allow-root"] and params["allow_roots"].multiple
    assert params["allow_origins"].opts == ["--allow-origin"]
    assert params["allow_hosts"].opts == ["--allow-host"]
    assert params["network"].secondary_opts == ["--no-network"]
    assert set(params) == {o.name for o in SERVE_OPTIONS} | {"config_file"}
