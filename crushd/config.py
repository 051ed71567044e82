"""Configuration: defaults, then ``CRUSHD_*`` environment, then a TOML file,
then command-line flags — each layer wins over the ones before it."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crushd.browser import normalize_origin, split_host
from crushd.context import DEFAULT_MAX_INSTRUCTIONS_BYTES, user_instructions_path
from crushd.errors import ConfigError
from crushd.mcp_config import McpServerConfig, parse_mcp_tables
from crushd.providers import PROVIDERS
from crushd.providers.catalog import DEFAULT_CONTEXT_WINDOW, PRICE_FIELDS, ModelSpec
from crushd.providers.retry import RetryPolicy
from crushd.tools.sandbox import MODES as SANDBOX_MODES

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024

#: Top-level keys (and flags) that define a model of their own.
MODEL_FLAGS = ("provider", "model", "base_url", "api_key_env")
MODEL_KEYS = frozenset({*MODEL_FLAGS, "context_window", "max_output_tokens", *PRICE_FIELDS})

# A repeatable flag is singular (``--allow-origin``); its setting is plural.
SINGULAR_KEYS = {
    "allow_root": "allow_roots",
    "allow_origin": "allow_origins",
    "allow_host": "allow_hosts",
}


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
    allow_origins: list[str] = field(default_factory=list)
    allow_hosts: list[str] = field(default_factory=list)
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
    sandbox: str = "workspace-write"  # how bash runs where bwrap works; see sandbox_settings
    network: bool = True
    sandbox_read: list[str] = field(default_factory=list)
    # Paths hidden from sandboxed commands and refused by the file tools, on
    # top of crushd's own (its data directory, token, config file, socket).
    sandbox_hide: list[str] = field(default_factory=list)
    # Names (or NAME* prefixes) of crushd's environment variables that bash
    # sees besides BASH_ENV_ALLOWED; nothing else of the environment reaches it.
    sandbox_env: list[str] = field(default_factory=list)
    # [workspaces."<path>"] tables: the sandbox keys above for one workspace.
    workspaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The TOML file this configuration was read from, set by load(): kept out
    # of the bash sandbox's sight, as it may hold the token.
    source_file: str | None = None
    log_level: str = "info"
    ping_interval: float = 15.0
    connection_limit: int = 2048
    header_timeout: float = 10.0
    stall_timeout: float = 30.0
    event_buffer: int = 10_000
    max_instructions_bytes: int = DEFAULT_MAX_INSTRUCTIONS_BYTES  # instruction files, together
    #: Bytes one assistant message may stream (text, reasoning, tool input)
    #: before its step is ended with finish reason ``max_bytes``.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    auto_compact: bool = True  # False: only POST .../compact compacts a session
    #: Checkpoints (crushd.checkpointing): a shadow git repository per
    #: workspace records its files before each run and after each tool call
    #: that can change them.  Per workspace also ``checkpoints = false``.
    checkpoints: bool = True
    checkpoint_max_file_bytes: int = 2 * 1024 * 1024  # larger files are left out
    checkpoint_max_files: int = 100_000  # new files past it are left out, with a note
    checkpoint_keep_days: float = 7.0  # runs' checkpoints older than this are pruned
    checkpoint_max_bytes: int = 1024 * 1024 * 1024  # past it the oldest runs' go first
    #: The user's own instruction file; None means ``$XDG_CONFIG_HOME/crushd/AGENTS.md``
    #: as the environment says when the config is built.
    user_instructions: Path | None = None
    #: Named models, ``[models.NAME]`` plus the one the top-level keys define;
    #: filled and checked by :meth:`from_mapping`, never empty afterwards.
    models: dict[str, ModelSpec] = field(default_factory=dict)
    default_model: str | None = None
    mcp: dict[str, McpServerConfig] = field(default_factory=dict)  # the [mcp.NAME] tables

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
        given = {k: v for k, v in (flags or {}).items() if v is not None and v != ()}
        values.update(given)
        config = cls.from_mapping(values, flags_define_model=any(k in given for k in MODEL_FLAGS))
        if path:
            config.source_file = str(Path(path).expanduser().resolve())
        return config

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, flags_define_model: bool = False) -> Config:
        """Build and validate a config from one merged mapping.

        ``models`` holds the ``[models.NAME]`` tables.  Any of
        ``provider``/``model``/``base_url``/``api_key_env`` defines one more
        model, named after its ``model`` (or its provider); it is the default
        when it came from the flags (``flags_define_model``) or when nothing
        names another.  With no model at all, the built-in ``echo``.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = dict(values)
        tables = values.pop("models", None) or {}
        if not isinstance(tables, dict):
            raise ConfigError("models must be a table of [models.NAME] tables")
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            name = key.replace("-", "_")
            name = SINGULAR_KEYS.get(name, name)
            if name not in fields or name == "source_file":
                raise ConfigError(f"unknown configuration key {key!r}")
            if name == "mcp":
                kwargs[name] = _mcp_servers(raw)
                continue
            kwargs[name] = _coerce(name, fields[name].type, raw)
        config = cls(**kwargs)
        config.models = {str(name): _model_spec(str(name), table) for name, table in tables.items()}
        top = config._top_level_model() if any(k in kwargs for k in MODEL_FLAGS) else None
        if top is not None:
            config.models[top.name] = top  # the flags win over a table of that name
        if not config.models:
            config.models = {"echo": ModelSpec("echo", "echo", "echo")}
        if top is not None and (flags_define_model or config.default_model is None):
            config.default_model = top.name
        elif config.default_model is None:
            config.default_model = next(iter(config.models))
        if config.user_instructions is None:
            config.user_instructions = user_instructions_path()
        config.validate()
        return config

    def _top_level_model(self) -> ModelSpec:
        if self.provider not in PROVIDERS:
            raise ConfigError(f"unknown provider {self.provider!r} ({', '.join(PROVIDERS)})")
        if self.provider != "echo" and not self.model:
            example = PROVIDERS[self.provider].model_example
            raise ConfigError(
                f"the {self.provider} provider needs a model name (--model), e.g. {example}"
            )
        model = self.model or self.provider
        return ModelSpec(
            name=model,
            provider=self.provider,
            model=model,
            base_url=self.base_url,
            api_key_env=self.api_key_env,
        )

    def default_spec(self) -> ModelSpec:
        return self.models[self.default_model or ""]

    def validate(self) -> None:
        if self.provider not in PROVIDERS:
            raise ConfigError(f"unknown provider {self.provider!r} ({', '.join(PROVIDERS)})")
        for name in (
            "threads",
            "workers",
            "max_queue",
            "max_steps",
            "max_body",
            "event_buffer",
            "max_message_bytes",
            "checkpoint_max_files",
            "checkpoint_max_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.max_retries < 0:
            raise ConfigError("max_retries must not be negative")
        if self.max_instructions_bytes < 0:
            raise ConfigError("max_instructions_bytes must not be negative")
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
            "checkpoint_max_file_bytes",
            "checkpoint_keep_days",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, not {self.port}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(
                f"log_level must be debug, info, warning or error, not {self.log_level!r}"
            )
        for origin in self.allow_origins:
            if normalize_origin(origin) is None:
                raise ConfigError(
                    f"allow_origins: {origin!r} is not an origin like http://localhost:3000"
                )
        for host in self.allow_hosts:
            if split_host(host) is None:
                raise ConfigError(f"allow_hosts: {host!r} is not a host name")
        if self.ping_interval <= 0:
            raise ConfigError("ping_interval must be positive")
        for name in ("header_timeout", "stall_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.connection_limit < 100:
            raise ConfigError("connection_limit must be at least 100")
        if self.event_buffer < 10_000:
            raise ConfigError("event_buffer must hold at least 10000 events")
        if self.models and self.default_model not in self.models:
            raise ConfigError(
                f"default_model {self.default_model!r} is not a configured model "
                f"(configured: {', '.join(self.models)})"
            )
        _check_sandbox(
            "", self.sandbox, self.network, self.sandbox_read, self.sandbox_hide, self.sandbox_env
        )
        for path, table in self.workspaces.items():
            where = f"workspaces.{path!r}: "
            if not isinstance(table, dict):
                raise ConfigError(f"{where}must be a table of {', '.join(WORKSPACE_KEYS)}")
            unknown = sorted(set(table) - set(WORKSPACE_KEYS))
            if unknown:
                raise ConfigError(
                    f"{where}unknown key(s) {', '.join(unknown)} "
                    f"(allowed: {', '.join(WORKSPACE_KEYS)})"
                )
            if not os.path.isabs(os.path.expanduser(path)):
                raise ConfigError(f"{where}the workspace path must be absolute")
            if not isinstance(table.get("checkpoints", True), bool):
                raise ConfigError(f"{where}checkpoints must be true or false")
            _check_sandbox(
                where,
                table.get("sandbox", self.sandbox),
                table.get("network", self.network),
                table.get("sandbox_read", []),
                table.get("sandbox_hide", []),
                table.get("sandbox_env", []),
            )

    def sandbox_settings(self, workspace: str | os.PathLike[str]) -> SandboxSettings:
        """The sandbox of the workspace at ``workspace``: the top-level
        ``sandbox``/``network``/``sandbox_*`` keys, overridden by its
        ``[workspaces."<path>"]`` table (whose lists add to the top-level
        ones).  Paths compare after resolving symbolic links."""
        table = self._workspace_table(workspace)
        return SandboxSettings(
            mode=table.get("sandbox", self.sandbox),
            network=table.get("network", self.network),
            read=tuple([*self.sandbox_read, *table.get("sandbox_read", [])]),
            hide=tuple([*self.sandbox_hide, *table.get("sandbox_hide", [])]),
            env=tuple([*self.sandbox_env, *table.get("sandbox_env", [])]),
        )

    def checkpoints_for(self, workspace: str | os.PathLike[str]) -> bool:
        """Whether the workspace at ``workspace`` records checkpoints: its
        ``[workspaces."<path>"]`` table's ``checkpoints``, else the top-level
        one (``--no-checkpoints`` turns them off everywhere)."""
        return self.checkpoints and self._workspace_table(workspace).get("checkpoints", True)

    def _workspace_table(self, workspace: str | os.PathLike[str]) -> dict[str, Any]:
        """The ``[workspaces."<path>"]`` table of ``workspace`` ({} if none);
        paths compare after resolving symbolic links."""
        real = os.path.realpath(workspace)
        table: dict[str, Any] = {}
        for path, candidate in self.workspaces.items():
            if os.path.realpath(os.path.expanduser(path)) == real:
                table = candidate
        return table


WORKSPACE_KEYS = (
    "sandbox",
    "network",
    "sandbox_read",
    "sandbox_hide",
    "sandbox_env",
    "checkpoints",
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?")


@dataclass(frozen=True)
class SandboxSettings:
    mode: str  # one of SANDBOX_MODES
    network: bool
    read: tuple[str, ...]
    hide: tuple[str, ...] = ()
    env: tuple[str, ...] = ()


def _check_sandbox(
    where: str, mode: Any, network: Any, read: Any, hide: Any = (), env: Any = ()
) -> None:
    if mode not in SANDBOX_MODES:
        raise ConfigError(f"{where}sandbox must be one of {', '.join(SANDBOX_MODES)}, not {mode!r}")
    if not isinstance(network, bool):
        raise ConfigError(f"{where}network must be true or false, not {network!r}")
    for key, paths in (("sandbox_read", read), ("sandbox_hide", hide)):
        if not isinstance(paths, list | tuple) or not all(isinstance(p, str) for p in paths):
            raise ConfigError(f"{where}{key} must be a list of paths")
        for path in paths:
            if not path or "\0" in path or not os.path.isabs(os.path.expanduser(path)):
                raise ConfigError(
                    f"{where}{key} entries must be absolute paths (or start with ~), not {path!r}"
                )
    if not isinstance(env, list | tuple) or not all(isinstance(n, str) for n in env):
        raise ConfigError(f"{where}sandbox_env must be a list of variable names")
    for name in env:
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}sandbox_env entries must be variable names (or a NAME* prefix), "
                f"not {name!r}"
            )


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Option:
    """One ``crushd serve`` flag: the :class:`Config` field it sets and what
    ``--help`` says.  Its type, its default and whether it repeats come from
    the field itself (see :func:`crushd.cli.serve_options`), so the help
    cannot show a default the configuration does not use."""

    name: str  # the Config field
    help: str
    flag: str = ""  # default --name-with-dashes; a repeatable one is singular
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    path: str = ""  # "file" or "dir" for a path on disk
    default_text: str | None = None  # for --help, when the value itself says little


#: Every ``crushd serve`` flag, in ``--help`` order.  Each is also the
#: ``CRUSHD_<NAME>`` variable and the ``name`` key of the TOML file.
SERVE_OPTIONS: tuple[Option, ...] = (
    Option("host", "Address to listen on."),
    Option("port", "TCP port."),
    Option("unix_socket", "Serve on this unix socket (mode 0600) instead of TCP.", path="file"),
    Option(
        "data_dir",
        "Data directory.",
        path="dir",
        default_text="$CRUSHD_DATA_DIR, $STATE_DIRECTORY, $XDG_DATA_HOME/crushd",
    ),
    Option("threads", "waitress worker threads."),
    Option("workers", "Concurrent runs per workspace."),
    Option("provider", "Model provider.", choices=tuple(PROVIDERS)),
    Option("model", "Model name sent to the provider."),
    Option("base_url", "Provider base URL."),
    Option("api_key_env", "Environment variable that holds the API key."),
    Option("echo_delay", "Seconds between echo words."),
    Option("token_file", "File holding the API bearer token.", path="file"),
    Option("allow_roots", "Only allow workspaces below this directory (repeatable)."),
    Option(
        "allow_origins",
        "Let web pages of this origin use the API, with CORS (repeatable, exact match).",
        metavar="ORIGIN",
    ),
    Option(
        "allow_hosts",
        "Accept this name in the Host header besides loopback names (repeatable).",
        metavar="NAME",
    ),
    Option("shutdown_timeout", "Seconds to wait for runs on close."),
    Option("drain_timeout", "Seconds running turns get to finish on a server stop."),
    Option("permission_timeout", "Seconds before an unanswered permission request is denied."),
    Option("max_body", "Largest request body in bytes.", default_text="1 MiB"),
    Option("max_queue", "Queued runs allowed per session."),
    Option("max_steps", "Model steps allowed per run."),
    Option("max_retries", "Retries of a failed provider request."),
    Option("max_retry_wait", "Longest wait a provider may demand before a retry, in seconds."),
    Option(
        "stream_idle_timeout", "Seconds a provider stream may send nothing before it is retried."
    ),
    Option(
        "max_instructions_bytes",
        "Bytes of instruction files (AGENTS.md, ...) the system prompt takes, all together.",
    ),
    Option(
        "auto_compact",
        "Compact a session that outgrows its model's context window (--no-auto-compact: "
        "only POST .../compact does).",
        default_text="on",
    ),
    Option("sandbox", "How bash commands are sandboxed where bwrap works.", choices=SANDBOX_MODES),
    Option(
        "network",
        "Whether sandboxed bash commands may use the network.",
        default_text="they may",
    ),
    Option(
        "sandbox_read",
        "A hidden path (e.g. in a home directory) sandboxed bash may read (repeatable).",
    ),
    Option(
        "sandbox_hide",
        "A path sandboxed bash cannot see and the file tools refuse (repeatable).",
    ),
    Option(
        "sandbox_env",
        "An environment variable (or NAME* prefix) bash sees besides PATH, HOME, LANG, "
        "LC_*, TERM, TZ, USER and SHELL (repeatable).",
        metavar="NAME",
    ),
    Option(
        "max_message_bytes",
        "Bytes one assistant message may stream before its step ends (finish reason max_bytes).",
        default_text="1 MiB",
    ),
    Option(
        "checkpoints",
        "Record each run's file changes in a shadow git repository, for diff, revert and "
        "fork (--no-checkpoints: not at all; per workspace: checkpoints = false).",
        default_text="on",
    ),
    Option(
        "checkpoint_max_file_bytes",
        "Files larger than this are left out of checkpoints (and listed).",
        default_text="2 MiB",
    ),
    Option("checkpoint_max_files", "New files past this many are left out of a checkpoint."),
    Option("checkpoint_keep_days", "Days a run's checkpoints are kept before they are pruned."),
    Option(
        "checkpoint_max_bytes",
        "Disk a workspace's checkpoints may take; past it the oldest runs' are pruned first.",
        default_text="1 GiB",
    ),
    Option("log_level", "Log level.", choices=LOG_LEVELS),
)


def _from_env(env: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(Config)}
    for key, value in env.items():
        if not key.startswith("CRUSHD_") or key in ("CRUSHD_CONFIG", "CRUSHD_URL"):
            continue
        name = key[len("CRUSHD_") :].lower()
        if name == "models":  # tables come only from the file
            continue
        name = SINGULAR_KEYS.get(name, name)
        if name in ("allow_roots", "sandbox_read", "sandbox_hide"):
            values[name] = [p for p in value.split(os.pathsep) if p]
        elif name in ("allowed_tools", "allow_origins", "allow_hosts", "sandbox_env"):
            values[name] = [t.strip() for t in value.split(",") if t.strip()]
        elif name in names and name != "mcp":  # servers are TOML tables only
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
    # Allow a [crushd] table or top-level keys; nested [tools] allow lists;
    # [models.NAME] tables beside a [crushd] table or inside it.
    root = data
    data = dict(data.get("crushd", data))
    if data is not root and "models" in root:
        data.setdefault("models", root["models"])
    if "mcp" not in data and "mcp" in root:
        data["mcp"] = root["mcp"]
    tools = data.pop("tools", None)
    if isinstance(tools, dict) and "allow" in tools:
        data["allowed_tools"] = tools["allow"]
    return data


def _mcp_servers(raw: Any) -> dict[str, McpServerConfig]:
    if isinstance(raw, dict) and all(isinstance(v, McpServerConfig) for v in raw.values()):
        return dict(raw)
    return parse_mcp_tables(raw)  # its McpConfigError is a ConfigError


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
            if isinstance(raw, bool):
                return raw
            word = str(raw).strip().lower() if isinstance(raw, str | int) else None
            if word in ("1", "true", "yes", "on"):
                return True
            if word in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind.startswith("dict"):
            if not isinstance(raw, dict):
                raise ValueError("expected a table")
            return dict(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot use {raw!r} ({exc})") from exc


def _model_spec(name: str, table: Any) -> ModelSpec:
    """One ``[models.NAME]`` table, checked; ConfigError names the model and key."""
    where = f"[models.{name}]"
    if not name.strip():
        raise ConfigError("a model name must not be empty")
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - MODEL_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(MODEL_KEYS))})"
        )
    provider = table.get("provider")
    if provider not in PROVIDERS:
        raise ConfigError(
            f"{where}: provider must be one of {', '.join(PROVIDERS)}, not {provider!r}"
        )

    def text(key: str, default: str | None = None) -> str | None:
        value = table.get(key, default)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{where}: {key} must be a non-empty string")
        return value

    def number(key: str, kind: type, default: Any = None, low: float = 0) -> Any:
        value = table.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {key} must be a number, not {value!r}")
        if kind is int and value != int(value):
            raise ConfigError(f"{where}: {key} must be a whole number, not {value!r}")
        if value < low:
            raise ConfigError(f"{where}: {key} must be at least {low:g}, not {value!r}")
        return kind(value)

    return ModelSpec(
        name=name,
        provider=provider,
        model=text("model", name) or name,
        base_url=text("base_url"),
        api_key_env=text("api_key_env"),
        context_window=number("context_window", int, DEFAULT_CONTEXT_WINDOW, 1),
        max_output_tokens=number("max_output_tokens", int, None, 1),
        **{key: number(key, float) for key in PRICE_FIELDS},
    )
