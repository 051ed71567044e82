"""The ``[mcp.NAME]`` tables of the configuration, validated, and the names
their tools are offered under.  Imports nothing of the MCP SDK, so reading a
configuration stays cheap."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from crushd.errors import ConfigError

DEFAULT_TIMEOUT = 60.0  # seconds per tool call
MAX_TOOL_NAME = 64  # what OpenAI and Anthropic accept for a function name
TRANSPORTS = {"stdio": "stdio", "http": "http", "streamable_http": "http", "sse": "sse"}
_KEYS = {
    "command",
    "args",
    "env",
    "url",
    "transport",
    "headers",
    "allow",
    "disabled_tools",
    "timeout",
    "enabled",
    "cwd",
    "sandbox",
}
#: ``cwd = "workspace"`` runs a local server in the workspace; without it,
#: in an empty directory of its own, so files the model wrote there (a
#: ``json/__init__.py``, ``node_modules/.bin``) are not what it runs.
WORKSPACE_CWD = "workspace"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class McpConfigError(ConfigError):
    """A bad ``[mcp.NAME]`` table; the message names the table and the key."""


@dataclass(frozen=True)
class McpServerConfig:
    """One ``[mcp.NAME]`` table, validated.  ``transport`` is ``stdio``,
    ``http`` (streamable HTTP) or ``sse``."""

    name: str
    transport: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    allow: frozenset[str] = frozenset()
    disabled_tools: frozenset[str] = frozenset()
    timeout: float = DEFAULT_TIMEOUT
    enabled: bool = True
    cwd: str | None = None  # "workspace", an absolute directory, or None: a private one
    sandbox: bool = True  # a local server runs in the workspace's bash sandbox

    @property
    def prefix(self) -> str:
        return f"mcp_{safe_name(self.name)}_"

    def offered_name(self, tool: str) -> str:
        return offered_name(self.name, tool)

    def lists(self, names: frozenset[str], tool: str) -> bool:
        """True if ``tool`` (its own name or its offered name) is in ``names``."""
        return tool in names or self.offered_name(tool) in names


def safe_name(text: str) -> str:
    return _UNSAFE.sub("_", text)


def offered_name(server: str, tool: str) -> str:
    """``mcp_<server>_<tool>`` with characters outside ``[A-Za-z0-9_-]`` as
    ``_``; a name longer than providers accept keeps its start and gets a
    short hash of the whole, so it stays unique."""
    name = f"mcp_{safe_name(server)}_{safe_name(tool)}"
    if len(name) <= MAX_TOOL_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_TOOL_NAME - 9]}_{digest}"


def parse_mcp_tables(tables: Any) -> dict[str, McpServerConfig]:
    """Validate the ``[mcp]`` table of a config file; raise
    :class:`McpConfigError` naming the table and the key at fault."""
    if tables is None:
        return {}
    if not isinstance(tables, dict):
        raise McpConfigError("mcp must be a table of [mcp.NAME] server tables")
    servers: dict[str, McpServerConfig] = {}
    prefixes: dict[str, str] = {}
    for name, table in tables.items():
        server = _parse_table(str(name), table)
        clash = prefixes.get(server.prefix)
        if clash is not None:
            raise McpConfigError(
                f"mcp.{name}: its tools would be offered as {server.prefix}*, "
                f"like those of mcp.{clash}; rename one of them"
            )
        prefixes[server.prefix] = str(name)
        servers[str(name)] = server
    return servers


def _parse_table(name: str, table: Any) -> McpServerConfig:
    where = f"mcp.{name}"
    if not name:
        raise McpConfigError("mcp: a server name must not be empty")
    if not isinstance(table, dict):
        raise McpConfigError(f"{where} must be a table (command = ... or url = ...)")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise McpConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(_KEYS))}"
        )
    command, url = table.get("command"), table.get("url")
    if (command is None) == (url is None):
        raise McpConfigError(
            f"{where} needs exactly one of command (a local server) or url (a remote one)"
        )
    transport = table.get("transport", "stdio" if command is not None else "http")
    if transport not in TRANSPORTS:
        raise McpConfigError(f"{where}: transport must be stdio, http or sse, not {transport!r}")
    transport = TRANSPORTS[transport]
    if command is not None:
        if not isinstance(command, str) or not command.strip():
            raise McpConfigError(f"{where}: command must be a non-empty string")
        if transport != "stdio":
            raise McpConfigError(f"{where}: a command server speaks stdio, not {transport}")
        for key in ("url", "headers"):
            if key in table:
                raise McpConfigError(f"{where}: {key} is for remote servers (url = ...)")
        cwd = table.get("cwd")
        if cwd is not None and not (
            isinstance(cwd, str) and (cwd == WORKSPACE_CWD or cwd.startswith("/"))
        ):
            raise McpConfigError(
                f'{where}: cwd must be "{WORKSPACE_CWD}" or an absolute directory, not {cwd!r}'
            )
    else:
        if not isinstance(url, str) or not re.match(r"https?://[^/\s]+", url):
            raise McpConfigError(f"{where}: url must be an http:// or https:// URL, not {url!r}")
        if transport == "stdio":
            raise McpConfigError(f"{where}: a url server speaks http or sse, not stdio")
        for key in ("args", "env", "cwd", "sandbox"):
            if key in table:
                raise McpConfigError(f"{where}: {key} is for local servers (command = ...)")
    timeout = table.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise McpConfigError(f"{where}: timeout must be a positive number of seconds")
    for key in ("enabled", "sandbox"):
        if not isinstance(table.get(key, True), bool):
            raise McpConfigError(f"{where}: {key} must be true or false")
    return McpServerConfig(
        name=name,
        transport=transport,
        command=command,
        args=tuple(_strings(where, "args", table.get("args", []))),
        env=_string_table(where, "env", table.get("env", {})),
        url=url,
        headers=_string_table(where, "headers", table.get("headers", {})),
        allow=frozenset(_strings(where, "allow", table.get("allow", []))),
        disabled_tools=frozenset(
            _strings(where, "disabled_tools", table.get("disabled_tools", []))
        ),
        timeout=float(timeout),
        enabled=table.get("enabled", True),
        cwd=table.get("cwd"),
        sandbox=table.get("sandbox", True),
    )


def _strings(where: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise McpConfigError(f"{where}: {key} must be a list of strings")
    return list(value)


def _string_table(where: str, key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise McpConfigError(f'{where}: {key} must be a table of strings ({key}.NAME = "value")')
    return {str(k): v for k, v in value.items()}
