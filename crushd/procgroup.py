"""Process groups: the unit crushd kills what it started as.

A bash command runs as the leader of a group of its own (the shell, or
``bwrap``), and so does each local MCP server (its supervisor,
:mod:`crushd.mcp_child`).  Whatever they start stays in that group unless it
leaves it (``setsid``), so signalling the group reaches every member, and
the group is gone once :func:`live_members` finds none.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)


def signal_group(pgid: int, sig: signal.Signals, reason: str, who: str = "tool") -> bool:
    """Send ``sig`` to every process of group ``pgid``; True if it was sent.

    ``who`` (``tool``, ``mcp``) names the log event: ``event=<who>_killed``.
    """
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed uid (setuid binary); nothing more we can do
        logger.warning("event=%s_kill_denied pgid=%s signal=%s", who, pgid, sig.name)
        return False
    logger.info("event=%s_killed pgid=%s signal=%s reason=%s", who, pgid, sig.name, reason)
    return True


def live_members(pgid: int) -> list[int]:
    """Pids of the processes in group ``pgid`` that have not exited.

    Zombies do not count: an orphan that exited stays a zombie until init
    reaps it, and some container inits never do.  Reads ``/proc``; without
    it, falls back to ``killpg(pgid, 0)`` and returns ``[pgid]`` if the group
    exists.
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited since listdir, or not ours to read
            continue
        fields = stat.rpartition(b")")[2].split()
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members
