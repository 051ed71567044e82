"""Instruction files: the project's AGENTS.md (and the rest) and the user's own
reach the system prompt of the model, as the fake model server received it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakeprovider import FakeProvider, Text, ToolCall
from helpers import register, wait_terminal

from crushd.context import INSTRUCTION_FILES, read_instructions

KEY_ENV = "CRUSHD_TEST_INSTRUCTIONS_KEY"
BOTH = pytest.mark.parametrize("protocol", ["openai", "anthropic"])


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as server:
        server.set_default([Text("done")])
        yield server


@pytest.fixture
def daemon(fake, live_factory, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-instructions-test")

    def start(protocol: str = "openai", **overrides: Any):
        base = fake.openai_base_url if protocol == "openai" else fake.anthropic_base_url
        values = {"provider": protocol, "model": "m", "base_url": base, "api_key_env": KEY_ENV}
        return live_factory(**{**values, **overrides})

    return start


def system_of(request: Any) -> str:
    """The system prompt of a request the fake received, in either protocol."""
    body = request.body
    if request.protocol == "anthropic":  # text blocks, marked for the prompt cache
        return "".join(block["text"] for block in body["system"])
    assert body["messages"][0]["role"] == "system"
    return body["messages"][0]["content"]


def run_prompt(url: str, project: Path, text: str = "hi") -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=30) as http:
        wid = register(http, project)
        response = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": text})
        assert response.status_code == 202, response.text
        return wait_terminal(http, wid, response.json()["id"])


def warnings_about(caplog, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"event={event}" in r.getMessage()]


@BOTH
def test_every_file_in_order_under_its_path_and_the_users_last(
    daemon, fake, project, isolated_user_config, protocol
):
    for index, name in enumerate(INSTRUCTION_FILES):
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"rule {index} from {name}\n")
    user_file = isolated_user_config / "crushd" / "AGENTS.md"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("the user's own rule: answer in French\n")
    live = daemon(protocol)
    assert run_prompt(live.url, project)["status"] == "completed"
    system = system_of(fake.requests[0])
    assert system.startswith("You are crushd")  # crushd's own prompt comes first
    headings = [f"## {project / name}" for name in INSTRUCTION_FILES] + [f"## {user_file}"]
    positions = [system.index(heading) for heading in headings]
    assert positions == sorted(positions)
    for index, name in enumerate(INSTRUCTION_FILES):
        assert f"## {project / name}\n\nrule {index} from {name}" in system
    assert f"## {user_file}\n\nthe user's own rule: answer in French" in system
    assert "cut here" not in system


def test_no_files_no_instructions_and_every_step_of_a_run_carries_them(daemon, fake, project):
    live = daemon()
    run_prompt(live.url, project)
    assert "# Instructions" not in system_of(fake.requests[0])
    (project / "CLAUDE.md").write_text("Use tabs.\n")
    fake.script([ToolCall("ls", {"path": "."})])
    fake.script([Text("listed")])
    run_prompt(live.url, project)
    first, second = fake.requests[1:3]
    assert f"## {project / 'CLAUDE.md'}\n\nUse tabs." in system_of(first)
    assert system_of(second) == system_of(first)


def test_an_edit_is_seen_by_the_next_run(daemon, fake, project):
    agents = project / "AGENTS.md"
    agents.write_text("version one\n")
    live = daemon("anthropic")
    run_prompt(live.url, project)
    agents.write_text("version two\n")
    (project / "GEMINI.md").write_text("a new file\n")
    run_prompt(live.url, project)
    first, second = (system_of(r) for r in fake.requests)
    assert "version one" in first and "version two" not in first and "a new file" not in first
    assert "version two" in second and "version one" not in second and "a new file" in second


def test_a_symlink_inside_is_followed_and_one_leaving_the_workspace_is_not(
    daemon, fake, project, tmp_path, caplog
):
    secret = tmp_path / "outside.md"
    secret.write_text("SECRET FROM OUTSIDE\n")
    (project / "docs").mkdir()
    (project / "docs" / "agents.md").write_text("inside rule\n")
    (project / "AGENTS.md").symlink_to("docs/agents.md")
    (project / "CLAUDE.md").symlink_to(secret)
    (project / ".github").symlink_to(tmp_path)  # a directory link that leaves
    (tmp_path / "copilot-instructions.md").write_text("SECRET COPILOT\n")
    live = daemon()
    with caplog.at_level(logging.WARNING, logger="crushd.context"):
        assert run_prompt(live.url, project)["status"] == "completed"
    system = system_of(fake.requests[0])
    assert f"## {project / 'AGENTS.md'}\n\ninside rule" in system
    assert "SECRET" not in system
    skipped = warnings_about(caplog, "instructions_skipped")
    assert len(skipped) == 2
    assert any("CLAUDE.md" in w and "outside the workspace" in w for w in skipped)
    assert any("copilot-instructions.md" in w for w in skipped)


def test_bad_files_are_skipped_with_a_warning_and_the_run_goes_on(daemon, fake, project, caplog):
    (project / "AGENTS.md").write_bytes(b"caf\xe9 in latin-1\n")
    (project / "CRUSH.md").mkdir()
    os.mkfifo(project / "CLAUDE.md")  # opening it must not block the run
    (project / "GEMINI.md").symlink_to("GEMINI.md")  # a loop
    (project / ".cursorrules").write_text("the good one\n")
    live = daemon()
    with caplog.at_level(logging.WARNING, logger="crushd.context"):
        run = run_prompt(live.url, project)
    assert run["status"] == "completed" and run["text"] == "done"
    system = system_of(fake.requests[0])
    assert f"## {project / '.cursorrules'}\n\nthe good one" in system
    for name in ("AGENTS.md", "CRUSH.md", "CLAUDE.md", "GEMINI.md"):
        assert f"## {project / name}" not in system
    skipped = warnings_about(caplog, "instructions_skipped")
    assert any("AGENTS.md" in w and "not UTF-8" in w for w in skipped)
    assert any("CRUSH.md" in w and "not a regular file" in w for w in skipped)
    assert any("CLAUDE.md" in w and "not a regular file" in w for w in skipped)
    assert any("GEMINI.md" in w for w in skipped)


def test_oversized_instructions_are_cut_with_a_note(
    daemon, fake, project, isolated_user_config, caplog
):
    (project / "AGENTS.md").write_text("A" * 60)
    (project / "CLAUDE.md").write_text("B" * 30 + "C" * 100)
    (project / "GEMINI.md").write_text("never shown")
    user_file = isolated_user_config / "crushd" / "AGENTS.md"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("nor this")
    live = daemon(max_instructions_bytes=90)
    with caplog.at_level(logging.WARNING, logger="crushd.context"):
        run_prompt(live.url, project)
    system = system_of(fake.requests[0])
    assert "A" * 60 in system
    assert f"## {project / 'CLAUDE.md'}\n\n{'B' * 30}\n\n[crushd: instructions cut here" in system
    assert "BC" not in system
    assert "never shown" not in system and "nor this" not in system
    note = system[system.index("[crushd: instructions cut here") :]
    assert "at most 90 bytes (--max-instructions-bytes)" in note
    assert f"the rest of {project / 'CLAUDE.md'}" in note
    assert str(project / "GEMINI.md") in note and str(user_file) in note
    assert warnings_about(caplog, "instructions_truncated")


def test_the_limit_counts_bytes_and_never_splits_a_character(tmp_path):
    (tmp_path / "AGENTS.md").write_text("é" * 10)  # 20 bytes of UTF-8
    result = read_instructions(tmp_path, None, 7)
    assert result.truncated and result.files == [str(tmp_path / "AGENTS.md")]
    body = result.text.split(f"## {tmp_path / 'AGENTS.md'}\n\n")[1]
    assert body.startswith("ééé\n\n[crushd: instructions cut here")
    assert read_instructions(tmp_path, None, 0).text.count("é") == 0
    whole = read_instructions(tmp_path, None, 20)
    assert not whole.truncated and "é" * 10 in whole.text


def test_the_limit_is_a_flag_a_file_key_and_an_environment_variable(tmp_path):
    from click.testing import CliRunner

    from crushd.cli import main
    from crushd.config import Config, ConfigError

    assert Config.load({}, env={}).max_instructions_bytes == 65536
    assert Config.load({"max_instructions_bytes": 10}, env={}).max_instructions_bytes == 10
    toml = tmp_path / "c.toml"
    toml.write_text("max_instructions_bytes = 2048\n")
    env = {"CRUSHD_MAX_INSTRUCTIONS_BYTES": "4096"}
    assert Config.load({}, env=env).max_instructions_bytes == 4096
    assert Config.load({}, env=env, config_file=str(toml)).max_instructions_bytes == 2048
    with pytest.raises(ConfigError, match="max_instructions_bytes must not be negative"):
        Config.load({"max_instructions_bytes": -1}, env={})
    result = CliRunner().invoke(main, ["serve", "--max-instructions-bytes", "-5"])
    assert result.exit_code == 2
    assert "max_instructions_bytes must not be negative" in result.output
