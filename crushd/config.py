"""Configuration: defaults, then ``CRUSHD_*`` environment, then a TOML file,
then command-line flags — each layer wins over the ones before it."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crushd.errors import CrushdError
from crushd.providers import PROVIDERS
from crushd.providers.retry import RetryPolicy


class ConfigError(CrushdError):
    status = 400
    code = "invalid_config"


@dataclass
class Config:
    data_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7433
    unix_socket: str | None = None
    threads: int = 32
    workers: int = 4
    provider: str = "echo"
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    echo_delay: float = 0.02
    token: str | None = None
    token_file: str | None = None
    allow_roots: list[str] = field(default_factory=list)
    shutdown_timeout: float = 10.0
    drain_timeout: float = 0.0
    cleanup_timeout: float = 5.0
    permission_timeout: float = 600.0
    max_body: int = 1024 * 1024
    max_queue: int = 64
    max_steps: int = 50
    max_retries: int = 4
    max_retry_wait: float = 60.0
    retry_base_delay: float = 1.0  # first backoff when the provider demands no wait
    stream_idle_timeout: float = 120.0
    bash_timeout: float = 120.0
    allowed_tools: list[str] = field(default_factory=list)
    log_level: str = "info"
    ping_interval: float = 15.0
    event_buffer: int = 10_000

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_retries=self.max_retries,
            max_wait=self.max_retry_wait,
            base_delay=self.retry_base_delay,
        )

    @property
    def max_streams(self) -> int:
        """SSE streams allowed at once: always fewer than the server threads,
        so open streams can never starve prompt submission."""
        return max(1, self.threads - max(2, self.threads // 4))

    def resolved_data_dir(self, env: dict[str, str] | None = None) -> Path:
        env = os.environ if env is None else env
        if self.data_dir:
            return Path(self.data_dir).expanduser().resolve()
        if env.get("STATE_DIRECTORY"):
            # systemd may pass several colon-separated directories; the first is ours.
            return Path(env["STATE_DIRECTORY"].split(":")[0]).resolve()
        base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return (Path(base) / "crushd").resolve()

    def resolved_token(self) -> str | None:
        """The API token: ``token_file`` (surrounding whitespace ignored) or ``token``."""
        if self.token_file:
            try:
                text = Path(self.token_file).expanduser().read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read token file {self.token_file}: {exc}") from exc
            if not text:
                raise ConfigError(f"token file {self.token_file} is empty")
            return text
        return self.token or None

    def api_key(self, env: dict[str, str] | None = None) -> str | None:
        env = os.environ if env is None else env
        facts = PROVIDERS.get(self.provider)
        name = self.api_key_env or (facts.api_key_env if facts else None)
        return env.get(name) if name else None

    @classmethod
    def load(
        cls,
        flags: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        config_file: str | None = None,
    ) -> Config:
        """Build a config from the three layers.  ``flags`` holds only the
        options the user actually gave (None values are ignored)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        values.update(_from_env(env))
        path = config_file or env.get("CRUSHD_CONFIG")
        if path:
            values.update(_from_toml(Path(path)))
        values.update({k: v for k, v in (flags or {}).items() if v is not None and v != ()})
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Config:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            name = key.replace("-", "_")
            if name == "allow_root":
                name = "allow_roots"
            if name not in fields:
                raise ConfigError(f"unknown configuration key {key!r}")
            kwargs[name] = _coerce(name, fields[name].type, raw)
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        if self.provider not in PROVIDERS:
            raise ConfigError(f"unknown provider {self.provider!r} ({', '.join(PROVIDERS)})")
        for name in ("threads", "workers", "max_queue", "max_steps", "max_body", "event_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.max_retries < 0:
            raise ConfigError("max_retries must not be negative")
        for name in ("stream_idle_timeout", "retry_base_delay"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.threads < 4:
            raise ConfigError("threads must be at least 4 (streams are capped below it)")
        for name in (
            "shutdown_timeout",
            "drain_timeout",
            "cleanup_timeout",
            "permission_timeout",
            "echo_delay",
            "bash_timeout",
            "max_retry_wait",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, not {self.port}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                f"log_level must be debug, info, warning or error, not {self.log_level!r}"
            )
        if self.ping_interval <= 0:
            raise ConfigError("ping_interval must be positive")
        if self.event_buffer < 10_000:
            raise ConfigError("event_buffer must hold at least 10000 events")


def _from_env(env: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(Config)}
    for key, value in env.items():
        if not key.startswith("CRUSHD_") or key in ("CRUSHD_CONFIG", "CRUSHD_URL"):
            continue
        name = key[len("CRUSHD_") :].lower()
        if name == "allow_roots" or name == "allow_root":
            values["allow_roots"] = [p for p in value.split(os.pathsep) if p]
        elif name == "allowed_tools":
            values[name] = [t.strip() for t in value.split(",") if t.strip()]
        elif name in names:
            values[name] = value
    return values


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    # Allow a [crushd] table or top-level keys; nested [tools] allow lists.
    data = dict(data.get("crushd", data))
    tools = data.pop("tools", None)
    if isinstance(tools, dict) and "allow" in tools:
        data["allowed_tools"] = tools["allow"]
    return data


def _coerce(name: str, annotation: Any, raw: Any) -> Any:
    kind = str(annotation)
    try:
        if kind.startswith("list"):
            if isinstance(raw, str):
                return [raw]
            return [str(x) for x in raw]
        if raw is None:
            return None
        if "Path" in kind:
            return Path(str(raw))
        if kind.startswith("int"):
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("bool"):
            if isinstance(raw, str):
                return raw.strip().lower() in ("1", "true", "yes", "on")
            return bool(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot use {raw!r} ({exc})") from exc
