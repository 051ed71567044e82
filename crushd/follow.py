"""Following one run to its end, and cancelling it on Ctrl-C.

The protocol of ``crushd prompt``: read the workspace's event stream,
reconnect a broken one with ``since`` a few times, then fall back to long
polls of the run; after Ctrl-C, cancel the run and wait (bounded) for its
terminal record.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, NoReturn

import click

from crushd.cancel import CancelToken
from crushd.common import TERMINAL_STATUSES
from crushd.events import EventType
from crushd.terminal import Follower, fail

#: Bound on waiting for a cancelled run's terminal record (a cancel takes < 1 s).
CANCEL_WAIT = 10.0

#: Each fallback long poll; the server caps ``wait`` at 300.
POLL_WAIT = 30.0

#: Reconnects of a broken event stream before falling back to polling.
RECONNECTS = 2

#: The pause between polls the server answered at once (no long-poll slot).
POLL_PAUSE = 1.0


def follow_events(
    client: Any,
    stream: Any | None,
    workspace_id: str,
    session_id: str | None,
    handle: Callable[[dict[str, Any]], dict[str, Any] | None],
    watch: Callable[[Any], contextlib.AbstractContextManager[Any]] = (
        lambda stream: contextlib.nullcontext()
    ),
    between: Callable[[], None] = lambda: None,
) -> dict[str, Any] | None:
    """Hand each event of ``stream`` to ``handle`` until it returns the
    terminal run, and return that.  A broken stream is reconnected with
    ``since`` up to :data:`RECONNECTS` times; None when the events cannot
    tell the end — a ``reset`` (events were lost), or the stream could not
    be had again — and the caller polls the run instead.

    ``watch(stream)`` is entered around each stream's reading (so another
    thread can abort it); ``between()`` runs after each stream ended and
    may raise to stop following.
    """
    from crushd.client import ClientError, StreamBroken

    reconnects = 0
    while stream is not None:
        try:
            with watch(stream):
                for event in stream:
                    if event.get("type") == EventType.RESET:  # a reconnect would be reset too
                        return None
                    terminal = handle(event)
                    if terminal is not None:
                        return terminal
        except StreamBroken:
            pass
        finally:
            stream.close()
        between()
        since, stream = stream.last_seq, None
        if since is None or reconnects >= RECONNECTS:
            break
        reconnects += 1
        try:
            stream = client.events(workspace_id, session_id, since=since)
        except ClientError:
            break
    return None


def follow_run(
    client: Any,
    follower: Follower,
    stream: Any | None,
    workspace_id: str,
    session_id: str | None,
    run_id: str,
    token: CancelToken | None = None,
) -> dict[str, Any]:
    """Read events until the run ends (:func:`follow_events`), then fall
    back to long polls of the run.

    Cancelling ``token`` ends a pause between polls at once and raises
    :class:`~crushd.cancel.Cancelled` (Ctrl-C interrupts everything else).
    """
    from crushd.client import ClientError

    if token is None:
        token = CancelToken(name="follow")
    terminal = follow_events(client, stream, workspace_id, session_id, follower.handle)
    if terminal is not None:
        return terminal
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
