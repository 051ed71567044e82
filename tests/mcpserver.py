"""A small MCP server for the cases real servers cannot script: a tool that
hangs (and records that it was cancelled), a crash mid-call, a grandchild
process, a server that dies before it answers ``initialize``.

    python tests/mcpserver.py [stdio | sse PORT | http PORT | crash-at-start | slow-start]

``MCP_TEST_MARKS`` names a directory where tools leave marker files.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mcp.server.mcpserver import MCPServer

server = MCPServer("crushd-test")
MARKS = Path(os.environ.get("MCP_TEST_MARKS", "."))


@server.tool()
def shout(text: str) -> str:
    """Return the text in capitals."""
    return text.upper()


@server.tool()
def where() -> str:
    """The server's working directory and pid."""
    return f"{os.getcwd()} {os.getpid()}"


@server.tool()
async def hang(seconds: float = 3600) -> str:
    """Sleep; leaves cancelled.mark when the call is cancelled."""
    (MARKS / "hang-started.mark").write_text(str(os.getpid()))
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        (MARKS / "cancelled.mark").write_text("cancelled")
        raise
    return "woke up"


@server.tool()
def write_note(path: str, text: str) -> str:
    """Write ``text`` to ``path``, relative to the server's working
    directory (the workspace): a tool that changes files."""
    Path(path).write_text(text)
    return f"wrote {path}"


@server.tool()
def crash() -> str:
    """Exit the whole server without answering."""
    os._exit(3)


@server.tool()
def chatter(lines: int) -> str:
    """Write numbered lines to stderr."""
    for n in range(lines):
        sys.stderr.write(f"chatter line {n}\n")
    sys.stderr.flush()
    return "done"


@server.tool()
def spawn_child() -> str:
    """Start a grandchild that sleeps for an hour; return its pid."""
    child = subprocess.Popen(["sleep", "3600"])
    return str(child.pid)


@server.tool()
async def linger() -> str:
    """From now on ignore SIGTERM and outlive the end of stdin."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=time.sleep, args=(3600,), name="linger").start()
    return "lingering"


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "stdio"
    if mode == "slow-start":
        time.sleep(3)
        mode = "stdio"
    if mode == "crash-at-start":
        sys.stderr.write("mcpserver: refusing to start (crash-at-start)\n")
        sys.exit(5)
    if mode == "stdio":
        server.run("stdio")
    elif mode == "sse":
        server.run("sse", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
