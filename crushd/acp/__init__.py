"""``crushd acp``: an Agent Client Protocol agent on stdio in front of a
running daemon, so that editors (Zed, JetBrains IDEs, Neovim plugins) can
drive crushd.

- :mod:`crushd.acp.rpc` — JSON-RPC 2.0 over newline-delimited JSON;
- :mod:`crushd.acp.agent` — the ACP methods, answered through the HTTP API;
- :mod:`crushd.acp.turn` — one ``session/prompt``: a run followed to its end;
- :mod:`crushd.acp.updates` — crushd's records as ACP shapes.

The adapter speaks JSON-RPC itself rather than through the
``agent-client-protocol`` SDK: the SDK is asyncio, and everything this side
does is the blocking :mod:`crushd.client` (threads, like the rest of
crushd); the framing is a hundred lines.  The tests drive it with the SDK's
client side, which checks every message against the protocol's schema.

Standard output carries only protocol messages; logs go to stderr.  End of
input stops the adapter: event streams are closed and threads joined; runs
are not cancelled (they are the daemon's, and ``session/load`` shows them
later).
"""

from __future__ import annotations

import logging
import sys
from typing import IO

logger = logging.getLogger(__name__)


def serve(
    url: str | None,
    unix_socket: str | None,
    token: str | None,
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
) -> int:
    """Serve one editor on ``stdin``/``stdout`` until end of input; return
    the exit status.  ``url``/``unix_socket``/``token`` as for
    :class:`crushd.client.Client` (resolved here once, so a bad address
    fails at start)."""
    from crushd.acp.agent import Agent
    from crushd.acp.rpc import Connection
    from crushd.client import Client, resolve_address

    base_url, socket_path = resolve_address(url, unix_socket)
    reader = stdin or sys.stdin.buffer
    writer = stdout or sys.stdout.buffer
    if stdout is None:
        # Anything printed by mistake must not corrupt the protocol stream.
        sys.stdout = sys.stderr

    def connect() -> Client:
        if socket_path:
            return Client(unix_socket=socket_path, token=token)
        return Client(url=base_url, token=token)

    agent = Agent(connect)
    connection = Connection(reader, writer, agent.handle)
    agent.attach(connection)
    address = f"unix:{socket_path}" if socket_path else base_url
    logger.info("event=acp_started daemon=%s", address)
    try:
        connection.serve()
    except KeyboardInterrupt:
        agent.stop()
        return 130
    stuck = agent.stop()
    logger.info("event=acp_stopped threads_left=%d", len(stuck))
    return 0
