"""Following one run to its end, and cancelling it on Ctrl-C.

The protocol of ``crushd prompt``: read the workspace's event stream,
reconnect a broken one with ``since`` a few times, then fall back to long
polls of the run; after Ctrl-C, cancel the run and wait (bounded) for its
terminal record.
"""

from __future__ import annotations

import time
from typing import Any, NoReturn

import click

from crushd.cancel import CancelToken
from crushd.common import TERMINAL_STATUSES
from crushd.terminal import Follower, fail

#: Bound on waiting for a cancelled run's terminal record (a cancel takes < 1 s).
CANCEL_WAIT = 10.0

#: Each fallback long poll; the server caps ``wait`` at 300.
POLL_WAIT = 30.0

#: Reconnects of a broken event stream before falling back to polling.
RECONNECTS = 2

#: The pause between polls the server answered at once (no long-poll slot).
POLL_PAUSE = 1.0


def follow_run(
    client: Any,
    follower: Follower,
    stream: Any | None,
    workspace_id: str,
    session_id: str | None,
    run_id: str,
    token: CancelToken | None = None,
) -> dict[str, Any]:
    """Read events until the run ends; reconnect a broken stream with
    ``since`` a few times, then fall back to long polls of the run.

    Cancelling ``token`` ends a pause between polls at once and raises
    :class:`~crushd.cancel.Cancelled` (Ctrl-C interrupts everything else).
    """
    from crushd.client import ClientError, StreamBroken

    if token is None:
        token = CancelToken(name="follow")
    reconnects = 0
    while stream is not None:
        try:
            for event in stream:
                if event.get("type") == "reset":  # events were lost: ask for the run
                    break
                terminal = follower.handle(event)
                if terminal is not None:
                    return terminal
        except StreamBroken:
            pass
        finally:
            stream.close()
        since, stream = stream.last_seq, None
        if since is None or reconnects >= RECONNECTS:
            break
        reconnects += 1
        try:
            stream = client.events(workspace_id, session_id, since=since)
        except ClientError:
            break
    while True:
        asked = time.monotonic()
        try:
            run = client.run(workspace_id, run_id, wait=POLL_WAIT)
        except ClientError as exc:
            raise ClientError(
                f"{exc.message}; lost track of run {run_id} "
                "(`crushd runs` shows it once the daemon is back)"
            ) from None
        if run["status"] in TERMINAL_STATUSES:
            follower.finish(run)
            return run
        if time.monotonic() - asked < POLL_PAUSE:  # no long-poll slot was free: do not spin
            token.wait(POLL_PAUSE)
        token.raise_if_cancelled()


def cancel_interrupted(client: Any, workspace_id: str, run_id: str) -> NoReturn:
    """Ctrl-C while following: cancel the run, wait (bounded) for its end, exit 130."""
    from crushd.client import ApiError, ClientError

    click.echo(f"crushd: interrupted, cancelling run {run_id}", err=True)
    try:
        client.cancel(workspace_id, run_id)
        run = client.run(workspace_id, run_id, wait=CANCEL_WAIT)
    except KeyboardInterrupt:
        fail("interrupted again; the run may still be active", 130)
    except ApiError as exc:
        if exc.status == 404:  # interrupted before the daemon accepted it
            fail("interrupted before the prompt was accepted", 130)
        fail(f"could not cancel run {run_id}: {exc.message}", 130)
    except ClientError as exc:
        fail(f"could not cancel run {run_id}: {exc.message}", 130)
    fail(f"run {run_id} {run['status']}", 130)
