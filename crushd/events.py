"""Workspace events: sequence numbers, replay buffer, fan-out and SSE framing.

Every event of a workspace gets the next ``seq``, is rendered once to its
SSE frame, kept in a ring buffer for replay and offered to each subscriber's
bounded queue.  A subscriber whose queue is full is dropped (its stream ends
and the client reconnects with ``Last-Event-ID``), so one stalled reader can
never hold back a run or grow memory without bound.

The event types are declared once, in :class:`EventType`.

Events are also sent through the app's blinker ``event_published`` signal
(one permanent receiver per app, see :mod:`crushd.signals`); SSE fan-out does
not use blinker because its connect/disconnect is not thread-safe.
"""

from __future__ import annotations

import collections
import enum
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from crushd.common import utcnow

logger = logging.getLogger(__name__)


class EventType(enum.StrEnum):
    """Every type of event a workspace publishes (SPEC §3 "Events"), declared
    once: the code publishing and reading them, the OpenAPI document's
    ``Event.type`` and the console (which gets the list with its page) all
    use these.  Each member is the ``type`` string itself."""

    #: A session was created; payload: the session.
    SESSION_CREATED = "session.created"
    #: A session was renamed; payload: the session.
    SESSION_UPDATED = "session.updated"
    #: A session was deleted; payload: ``{"id"}``.
    SESSION_DELETED = "session.deleted"
    #: A message was stored; payload: the message.
    MESSAGE_CREATED = "message.created"
    #: A stored message changed (parts written, a finish added); payload: the message.
    MESSAGE_UPDATED = "message.updated"
    #: Streamed text of a message, published before it is stored; payload:
    #: ``{"message_id", "run_id", "kind", "delta"}``.
    MESSAGE_DELTA = "message.delta"
    #: What was streamed for a message is void (a retry streams it again);
    #: payload: ``{"message_id", "run_id"}``.
    MESSAGE_RESET = "message.reset"
    #: A run was accepted and stored ``queued``; payload: the run.
    RUN_QUEUED = "run.queued"
    #: A run started; payload: the run, ``running``.
    RUN_STARTED = "run.started"
    #: A run ended, its final records written; payload: the terminal run.
    RUN_COMPLETED = "run.completed"
    #: A provider request failed and is about to be retried; payload:
    #: ``{"run_id", "attempt", "delay_s", "error"}``.
    RUN_RETRYING = "run.retrying"
    #: A compaction's summary is in force; payload: ``{"session_id", "message_id"}``.
    SESSION_COMPACTED = "session.compacted"
    #: A tool call waits for a person's decision; payload: the permission request.
    PERMISSION_REQUESTED = "permission.requested"
    #: A permission request was decided, timed out or dropped; payload:
    #: ``{"id", "run_id", "tool_call_id", "tool", "decision"}``.
    PERMISSION_RESOLVED = "permission.resolved"
    #: An MCP server's status changed; payload: its entry as in ``GET .../mcp``.
    MCP_STATUS = "mcp.status"
    #: A tool call that can change files changed some; payload: ``{"run_id",
    #: "tool_call_id", "tool", "files": [diff stat entries], "note"}``
    #: (:mod:`crushd.checkpointing`).
    RUN_DIFF = "run.diff"
    #: A session was reverted: files restored, later messages marked;
    #: payload: ``{"session_id", "revert"}`` (:mod:`crushd.reverts`).
    SESSION_REVERTED = "session.reverted"
    #: A session's latest revert was undone; payload: ``{"session_id", "revert"}``.
    SESSION_UNREVERTED = "session.unreverted"
    #: The workspace is closing (or the server stopping): the stream ends after it.
    WORKSPACE_CLOSING = "workspace.closing"
    #: Sent first to a reconnecting stream whose events are no longer
    #: buffered: the client must refetch state.
    RESET = "reset"


def session_of(record: dict[str, Any]) -> str | None:
    """The session a stored record belongs to: its ``session_id``, or, for
    a session, its ``id``."""
    return record["session_id"] if "session_id" in record else record["id"]


SEQ_RESERVE_BLOCK = 10_000
# Queued events are the same objects as the replay buffer's, so a full queue
# costs references, not copies; past this a reader is too slow to keep.
SUBSCRIBER_QUEUE = 10_000
# At most this many queued events are joined into one write of a stream.
SSE_BATCH = 256
# After a write of several events (events come faster than one at a time),
# a stream waits this long for more before its next write.
SSE_GATHER = 0.005

_CLOSE = object()

Record = TypeVar("Record", bound=dict[str, Any])


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    session_id: str | None
    data: dict[str, Any]
    frame: bytes  # the rendered SSE frame


class Subscriber:
    def __init__(self, session_id: str | None) -> None:
        self.session_id = session_id
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=SUBSCRIBER_QUEUE)
        self.dropped = False  # set by the hub when the queue overflowed
        self.ended = threading.Event()  # set by the hub when it closes or drops it

    def wants(self, event: Event) -> bool:
        return self.session_id is None or event.session_id in (None, self.session_id)


class EventHub:
    """Per-workspace event sequence and fan-out.  Thread-safe.

    ``reserve(n)`` is called (under the hub lock) whenever ``seq`` is about to
    pass the last reserved number, so that after a restart — even a crash —
    numbering continues above anything a client may have seen.
    """

    def __init__(
        self,
        workspace_id: str,
        first_seq: int = 1,
        buffer_size: int = 10_000,
        reserve: Callable[[int], None] | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.workspace_id = workspace_id
        # Guards numbering, buffer, subscribers and the closed flag.  Second
        # in the lock order (crushd.workspace), after a message writer's
        # output lock; held while ``reserve`` writes the store, never while
        # ``on_event`` runs.
        self._events_lock = threading.Lock()
        self._seq = first_seq - 1  # guarded by _events_lock
        self._reserved = self._seq  # guarded by _events_lock
        # The replay buffer; guarded by _events_lock.
        self._buffer: collections.deque[Event] = collections.deque(maxlen=buffer_size)
        self._subscribers: set[Subscriber] = set()  # guarded by _events_lock
        self._closed = False  # guarded by _events_lock
        self._reserve = reserve
        self._on_event = on_event

    @property
    def last_seq(self) -> int:
        with self._events_lock:
            return self._seq

    @property
    def subscriber_count(self) -> int:
        with self._events_lock:
            return len(self._subscribers)

    def publish(
        self, type: EventType, session_id: str | None, payload: dict[str, Any]
    ) -> Event | None:
        """Number, buffer and fan out one event; returns None after close."""
        with self._events_lock:
            if self._closed:
                logger.debug("event=event_after_close type=%s", type)
                return None
            self._seq += 1
            if self._seq > self._reserved and self._reserve is not None:
                self._reserved = self._seq + SEQ_RESERVE_BLOCK
                try:
                    self._reserve(self._reserved)
                except Exception:  # numbering still works in memory; log and go on
                    logger.exception("event=seq_reserve_failed workspace=%s", self.workspace_id)
            event = self._event(type, session_id, payload)
            self._buffer.append(event)
            for sub in list(self._subscribers):
                if not sub.wants(event):
                    continue
                try:
                    sub.queue.put_nowait(event)
                except queue.Full:
                    sub.dropped = True
                    sub.ended.set()
                    self._subscribers.discard(sub)
                    logger.warning(
                        "event=subscriber_dropped workspace=%s reason=queue_full", self.workspace_id
                    )
        if self._on_event is not None:
            self._on_event(event)
        return event

    def publish_stored(self, type: EventType, write: Callable[[], Record | None]) -> Record | None:
        """Write, then publish what was written: call ``write`` (a store
        write returning the record as stored, or None when it changed
        nothing) and publish that record as ``type`` in its session
        (:func:`session_of`); return it.

        Every event that announces a stored change goes through here, so
        none can be published for something not stored yet, nor carry
        anything but what was stored: nothing is published when ``write``
        raises (that propagates) or returns None.  Blocks on the write.
        """
        stored = write()
        if stored is not None:
            self.publish(type, session_of(stored), stored)
        return stored

    def _event(self, type: str, session_id: str | None, payload: dict[str, Any]) -> Event:
        """The event numbered with the current ``seq``, rendered once.  Holds _events_lock."""
        type = str(type)  # an EventType as the plain string it stands for
        data = {
            "seq": self._seq,
            "type": type,
            "workspace_id": self.workspace_id,
            "session_id": session_id,
            "time": utcnow(),
            "payload": payload,
        }
        frame = f"id: {self._seq}\nevent: {type}\ndata: {json.dumps(data)}\n\n".encode()
        return Event(self._seq, type, session_id, data, frame)

    def subscribe(
        self, since: int | None, session_id: str | None
    ) -> tuple[Subscriber, list[Event], Event | None]:
        """Register a subscriber and return it with the backlog after ``since``.

        Registration and backlog are taken under one lock, so no event falls
        between them.  If ``since`` is older than the buffer (or newer than
        anything published) the third value is a ``reset`` event to send first.
        """
        sub = Subscriber(session_id)
        with self._events_lock:
            backlog: list[Event] = []
            reset: Event | None = None
            if since is not None:
                oldest = self._buffer[0].seq if self._buffer else self._seq + 1
                if since > self._seq or since < oldest - 1:
                    reset = self._event(
                        EventType.RESET,
                        None,
                        {"requested": since, "oldest": oldest, "latest": self._seq},
                    )
                else:
                    backlog = [e for e in self._buffer if e.seq > since and sub.wants(e)]
            if self._closed:
                sub.queue.put_nowait(_CLOSE)
            else:
                self._subscribers.add(sub)
        return sub, backlog, reset

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._events_lock:
            self._subscribers.discard(sub)

    def close(self) -> None:
        """End every subscriber's stream; later publishes are dropped."""
        with self._events_lock:
            self._closed = True
            subscribers, self._subscribers = self._subscribers, set()
        for sub in subscribers:
            sub.ended.set()
            try:
                sub.queue.put_nowait(_CLOSE)
            except queue.Full:
                sub.dropped = True


def sse_stream(
    hub: EventHub,
    sub: Subscriber,
    backlog: list[Event],
    reset: Event | None,
    *,
    ping_interval: float,
    client_gone: Callable[[], bool],
    on_close: Callable[[], None],
    poll: float = 1.0,
) -> Iterator[bytes]:
    """The body of one SSE response.

    It never touches the database.  It polls ``client_gone`` between queue
    waits (at most ``poll`` seconds apart) and pings every ``ping_interval``,
    so a vanished client frees its server thread within one ping interval.
    ``on_close`` always runs, however the stream ends.
    """
    try:
        yield b": open\n\n"
        if reset is not None:
            yield reset.frame
        for event in backlog:
            yield event.frame
        next_ping = time.monotonic() + ping_interval
        while True:
            timeout = max(0.0, min(poll, next_ping - time.monotonic()))
            try:
                item = sub.queue.get(timeout=timeout)
            except queue.Empty:
                if client_gone():
                    return
                if sub.dropped:
                    return
                if time.monotonic() >= next_ping:
                    next_ping = time.monotonic() + ping_interval
                    yield b": ping\n\n"
                continue
            # Whatever else is queued goes out in the same write: one socket
            # send and one wake-up of waitress per batch, not per event.
            frames: list[bytes] = []
            while item is not _CLOSE:
                frames.append(item.frame)
                if len(frames) >= SSE_BATCH:
                    break
                try:
                    item = sub.queue.get_nowait()
                except queue.Empty:
                    break
            if frames:
                yield b"".join(frames)
            if item is _CLOSE:
                return
            # Events come faster than one a wake-up: let the next ones
            # gather, so that publishing them wakes nobody, instead of
            # waking this thread for each.  Not after a full batch: more are
            # waiting then, and a fast stream must not be slowed.
            if 1 < len(frames) < SSE_BATCH:
                sub.ended.wait(SSE_GATHER)  # closed or dropped: the queue says which
    finally:
        hub.unsubscribe(sub)
        on_close()
