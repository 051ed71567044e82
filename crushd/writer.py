"""One streaming assistant message: its parts, the deltas published, the writes stored.

A :class:`MessageWriter` takes what the model streams into one assistant
message (SPEC §3 "Streaming and persistence").  Deltas go to event
subscribers as they arrive; the database sees at most one write per
:data:`WRITE_INTERVAL`, plus a forced one at step end and on every exit path.

What is published and what is stored agree: after the message's last
``message.reset`` its stored text is the concatenation of the
``message.delta`` events published for it, in order, and nothing is stored
before it is published.  A change is made in memory under the parts lock and
queues its events in an outbox; the thread that made it then sends them out
under the output lock, with the parts lock released: it publishes the events
in the order they were queued, then, if a write is due, writes a copy of the
parts, which holds exactly what was published before it.  So neither the
event hub, nor its blinker receivers (a log line per delta), nor the
database is ever called with the parts locked, and a method that returns has
published what it changed: a flush from the shutdown thread too, before the
workspace closes its hub.  A delta with nothing queued before it and no
other thread sending skips the outbox and is published at once.

Locks, in the only order they may be taken:

1. ``MessageWriter._output_lock`` — the order in which one message's output
   leaves it: its queued events are published, and its parts written, under
   it, by one thread at a time.  It is held across
   :meth:`EventHub.publish <crushd.events.EventHub.publish>`, and so across
   the blinker receivers ``publish`` calls, and across the store's write.
   A receiver may take any other lock of crushd (the server's, a
   workspace's, the hub's, the store's) but must not call a MessageWriter.
   It is taken holding no lock (the run's thread holds none when it calls
   a writer, and the workspace flushes writers holding none), except for a
   try under the parts lock that never waits (the delta sent at once).
2. ``MessageWriter._parts_lock`` — the parts, the outbox and the write
   state.  A leaf: held for changes in memory only; nothing is published,
   written or waited for while it is held (the clock is read).

The locks of what the output goes to come after both, as :mod:`crushd.workspace`
lists them: ``EventHub._events_lock``, then ``SqliteStore._connection_lock``.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from crushd.config import DEFAULT_MAX_MESSAGE_BYTES
from crushd.errors import StorageUnavailable
from crushd.events import EventType
from crushd.providers.base import on_wait
from crushd.sealing import closed_input, finish_part

if TYPE_CHECKING:
    from crushd.events import EventHub
    from crushd.store import WorkspaceStore

WRITE_INTERVAL = 0.2  # seconds between coalesced writes of one streaming message
TOO_LONG_TITLE = "Message too long"


class WriterEnv(Protocol):
    """What a writer uses of its run's environment (a
    :class:`~crushd.runs.RunEnv` is one): the store, the hub and the clock
    that spaces the coalesced writes."""

    store: WorkspaceStore
    hub: EventHub
    clock: Callable[[], float]


def utf8_size(text: str) -> int:
    """The length of ``text`` in UTF-8 bytes; O(1) for ASCII (most deltas).
    Lone surrogates (JSON can carry them) count as the 3 bytes they take."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def utf8_prefix(text: str, size: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 form fits in ``size`` bytes:
    cut at a character boundary, never inside one."""
    if text.isascii():
        return text[:size]
    data = text.encode("utf-8", "surrogatepass")[:size]
    # Not final: a character cut in two is held back, not replaced.
    return codecs.getincrementaldecoder("utf-8")("surrogatepass").decode(data, final=False)


class MessageWriter:
    """The parts of one streaming assistant message, published at once and
    persisted coalesced.

    Deltas are published at once, or, inside :meth:`merging`, as soon as
    the provider is about to wait for more.  Thread-safe: the run's thread
    streams into it and the workspace may flush it from its shutdown
    thread.  Every method may block on the store's write (the output lock).

    The message holds at most ``max_bytes`` UTF-8 bytes of what the model
    streams (text, reasoning, summary, tool calls): a model that streams
    forever once grew one message to 128 MB, and the daemon to 1.36 GB, in
    20 s.  The delta that does not fit is cut at a character boundary, and
    what is published is what is stored; from then on :attr:`full` is true
    and the writer takes nothing more.  The reader must then stop reading.
    """

    def __init__(
        self,
        env: WriterEnv,
        message: dict[str, Any],
        run_id: str,
        interval: float = WRITE_INTERVAL,
        max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._env = env
        self.message = message
        self.run_id = run_id
        self._interval = interval
        self.max_bytes = max_bytes
        # Set (once, by the thread that streams) when a delta did not fit.
        self.full = False
        # See the module docstring: first the output lock, then the parts lock.
        self._output_lock = threading.Lock()
        self._parts_lock = threading.Lock()
        self._parts: list[dict[str, Any]] = []  # guarded by _parts_lock
        # The events the changes queued, each as (type, payload): appended
        # under _parts_lock (so in the order of the changes), taken from the
        # left under _output_lock by whichever thread publishes them (a
        # deque's append and popleft are thread-safe).
        self._outbox: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        # What the model streamed into the parts, in UTF-8 bytes: a running
        # count, so the check per delta costs O(1).  Guarded by _parts_lock.
        self._bytes = 0
        # Fragments still to be joined onto the last part's ``_tail_key``
        # field (its text, or a tool call's input).  Adding each delta to
        # the string itself copied all of it every time: a 1 MB answer of
        # 200,000 deltas took 25 s of CPU that way, 1.5 s this way.
        # Guarded by _parts_lock.
        self._tail: list[str] = []
        self._tail_key = ""
        self._dirty = False  # guarded by _parts_lock
        self._last_write = float("-inf")  # guarded by _parts_lock
        # No more writes: the sealing code took over.  Set under both locks,
        # so that no write is under way once it is set.
        self._closed = False
        # Inside merging(): the text read but not yet queued, of kind
        # _held_kind.  Guarded by _parts_lock.
        self._merging = False
        self._held: list[str] = []
        self._held_kind = ""
        self._shown = False  # whether a delta of this attempt was queued; under _parts_lock

    @property
    def id(self) -> str:
        return self.message["id"]

    # -- what the model streams ----------------------------------------------

    def delta(self, kind: str, text: str) -> None:
        if not text:
            return
        with self._parts_lock:
            text = self._fit(text)
            if not text:
                return
            if self._parts and self._parts[-1]["type"] == kind:
                self._extend("text", text)
            else:
                self._settle()
                self._parts.append({"type": kind, "text": text})
            write, direct = False, None
            if self._merging:
                self._held_kind = kind  # _settle() released other kinds
                self._held.append(text)
                self._dirty = True  # a coalesced write waits for the release
            else:
                write = self._changed()
                # Nothing queued before it and no thread sending: it goes
                # out at once, without the outbox.  The output lock is only
                # tried here, never waited for, so the lock order holds.
                if not self._outbox and self._output_lock.acquire(False):
                    self._shown = True
                    direct = self._delta_payload(kind, text)
                else:
                    self._queue_delta(kind, text)
            queued = bool(self._outbox)
        if direct is None:
            self._send(write, queued)
            return
        try:
            self._env.hub.publish(EventType.MESSAGE_DELTA, self.message["session_id"], direct)
        finally:
            self._output_lock.release()
        if write:
            self._store(coalesced=True)

    @contextlib.contextmanager
    def merging(self) -> Iterator[None]:
        """Hold deltas back until the provider is about to wait for more.

        For a provider that :attr:`~crushd.providers.base.Provider.announces_waits`:
        the text of every chunk read at once is published as one delta.
        """
        with self._parts_lock:
            self._merging = True
        try:
            with on_wait(self.release):
                yield
        finally:
            with self._parts_lock:
                self._merging = False
                self._release()
                queued = bool(self._outbox)
            self._send(False, queued)

    def release(self) -> bool:
        """Publish the deltas held back (see :meth:`merging`); return
        whether the reader may now be paced: once some text was shown."""
        with self._parts_lock:
            write = self._release() and self._changed()
            shown = self._shown
            queued = bool(self._outbox)
        self._send(write, queued)
        return shown

    def tool_call_start(self, call_id: str, name: str) -> None:
        """A call whose name and id do not fit is not recorded (the message is full)."""
        size = utf8_size(call_id) + utf8_size(name)
        with self._parts_lock:
            if self.full or size > self.max_bytes - self._bytes:
                self.full = True
                return
            self._bytes += size
            self._settle()
            self._parts.append(
                {"type": "tool_call", "id": call_id, "name": name, "input": "", "finished": False}
            )
            write = self._changed()
            queued = bool(self._outbox)
        self._send(write, queued)

    def tool_call_input(self, call_id: str, fragment: str) -> None:
        with self._parts_lock:
            fragment = self._fit(fragment)
            if not fragment:
                return
            write = False
            for part in reversed(self._parts):
                if part["type"] == "tool_call" and part["id"] == call_id:
                    if part is self._parts[-1]:
                        self._extend("input", fragment)
                    else:
                        part["input"] += fragment
                    write = self._changed()
                    break
        self._send(write, False)

    def fill(self) -> None:
        """Take nothing more, as if a delta had not fit: the stream sent
        more than the message may hold in a way no delta shows (one event
        too large to read)."""
        with self._parts_lock:
            self.full = True

    # -- the step's end --------------------------------------------------------

    def finish_tool_calls(self) -> list[dict[str, Any]]:
        """Mark every tool call finished; return copies of them in order.

        The stored ``input`` must be valid JSON (it is sent back to the
        model), so unparsable arguments are stored as ``"{}"``; each copy
        keeps the model's own text as ``raw_input`` so the call is reported
        as invalid instead of being run with no arguments.
        """
        with self._parts_lock:
            self._settle()
            calls = []
            for part in self._parts:
                if part["type"] == "tool_call":
                    raw = part["input"]
                    part["finished"] = True
                    part["input"] = closed_input(raw) if raw else "{}"
                    calls.append({**part, "raw_input": raw})
            self._dirty = True
            queued = bool(self._outbox)
        self._send(False, queued)
        return calls

    def reset(self) -> bool:
        """Discard every part (a failed attempt's); return whether there were any.

        ``message.reset`` is published after the deltas queued before it,
        and the empty parts are written at once: from here on the stored
        text is what the next attempt streams.
        """
        with self._parts_lock:
            self._release()
            self._shown = False  # the next attempt's first text is awaited again
            self._bytes, self.full = 0, False
            had_parts = bool(self._parts)
            if had_parts:
                self._parts, self._tail = [], []
                self._outbox.append(
                    (EventType.MESSAGE_RESET, {"message_id": self.id, "run_id": self.run_id})
                )
                self._dirty = True
            queued = bool(self._outbox)
        if had_parts:
            self._store()
        else:
            self._send(False, queued)
        return had_parts

    def add_finish(self, reason: str, message: str = "", details: str = "") -> None:
        with self._parts_lock:
            self._settle()
            self._parts.append(finish_part(reason, message, details))
            self._dirty = True
            queued = bool(self._outbox)
        self._send(False, queued)

    def add_cut_finish(self) -> None:
        """End the message as cut at :attr:`max_bytes`: finish reason ``max_bytes``."""
        self.add_finish(
            "max_bytes",
            TOO_LONG_TITLE,
            f"the model's output was cut at the limit of {self.max_bytes} bytes "
            "one message may hold (--max-message-bytes)",
        )

    def text(self, kind: str = "text") -> str:
        """The concatenated parts of type ``kind`` (``text`` or ``summary``)."""
        with self._parts_lock:
            self._settle()
            text = "".join(p["text"] for p in self._parts if p["type"] == kind)
            queued = bool(self._outbox)
        self._send(False, queued)
        return text

    def flush(self) -> dict[str, Any] | None:
        """Write pending parts now; return the stored message if written.
        Raises StorageUnavailable (the parts stay pending)."""
        return self._store(required=True)

    def close(self) -> dict[str, Any] | None:
        """Flush and refuse later writes (the sealing code takes over);
        return the stored message if this wrote it.  Raises
        StorageUnavailable, and stays open, when the write is refused."""
        with self._output_lock:
            stored = self._store_locked(required=True)
            with self._parts_lock:
                self._closed = True
        return stored

    def abandon(self) -> None:
        """Refuse later writes without writing: after closing records that
        raised, the sealing code works from what is stored, and a late
        coalesced write must not undo it.  Waits for a write under way."""
        with self._output_lock, self._parts_lock:
            self._closed = True

    # -- in memory: each holds _parts_lock -------------------------------------

    def _delta_payload(self, kind: str, text: str) -> dict[str, Any]:
        return {
            "message_id": self.message["id"],
            "run_id": self.run_id,
            "kind": kind,
            "delta": text,
        }

    def _queue_delta(self, kind: str, text: str) -> None:
        self._shown = True
        self._outbox.append((EventType.MESSAGE_DELTA, self._delta_payload(kind, text)))

    def _release(self) -> bool:
        """Queue what is held; return whether there was anything."""
        if not self._held:
            return False
        text, self._held = "".join(self._held), []
        self._queue_delta(self._held_kind, text)
        return True

    def _fit(self, text: str) -> str:
        """What of ``text`` the message still has room for; sets :attr:`full`
        when that is not all of it."""
        if self.full:
            return ""
        size = utf8_size(text)
        room = self.max_bytes - self._bytes
        if size > room:
            self.full = True
            text = utf8_prefix(text, room)
            size = utf8_size(text)
        self._bytes += size
        return text

    def _extend(self, key: str, fragment: str) -> None:
        """Add ``fragment`` to the last part's ``key``."""
        if key != self._tail_key:
            self._join()
            self._tail_key = key
        self._tail.append(fragment)

    def _settle(self) -> None:
        """Queue what is held and join the pending fragments: before
        anything else changes or reads the parts, and before they are
        written."""
        self._release()
        self._join()

    def _join(self) -> None:
        """Join the pending fragments onto the last part."""
        if self._tail:
            self._parts[-1][self._tail_key] += "".join(self._tail)
            self._tail = []

    def _changed(self) -> bool:
        """Mark the parts dirty; return whether a coalesced write is due."""
        self._dirty = True
        return self._env.clock() - self._last_write >= self._interval

    def _due(self) -> bool:
        return self._env.clock() - self._last_write >= self._interval

    # -- output: each takes _output_lock, holding no lock ----------------------

    def _send(self, write: bool, queued: bool) -> None:
        """After a change: a coalesced write if ``write`` (it publishes
        first), else publish what is ``queued``."""
        if write:
            self._store(coalesced=True)
        elif queued:
            with self._output_lock:
                self._publish()

    def _store(self, required: bool = False, coalesced: bool = False) -> dict[str, Any] | None:
        with self._output_lock:
            return self._store_locked(required, coalesced)

    def _store_locked(self, required: bool, coalesced: bool = False) -> dict[str, Any] | None:
        """Publish what is queued, then store the parts if they changed;
        return the message as stored if written.  Holds _output_lock.

        A write that is not ``required`` (the coalesced ones, the reset's)
        is skipped while the database refuses writes: the parts stay in
        memory, dirty, for the next required one."""
        available = required or self._env.store.available
        with self._parts_lock:
            parts = None
            # A coalesced write is not due if another thread wrote meanwhile.
            due = not coalesced or self._due()
            if self._dirty and available and not self._closed and due:
                self._settle()
                # Copies: the run's thread goes on changing the parts while
                # the store encodes them.
                parts = [dict(p) for p in self._parts]
                self._dirty = False
            # Those before the copy, and no later one: the write then stores
            # exactly what was published before it.
            queued = len(self._outbox)
        self._publish(queued)
        if parts is None:
            return None
        try:
            stored = self._env.store.update_message(self.message, parts)
        except Exception as exc:  # the parts stay pending, whatever refused them
            refused = isinstance(exc, StorageUnavailable)
            with self._parts_lock:
                self._dirty = True
                if refused and not required:
                    self._last_write = self._env.clock()
            if required or not refused:
                raise
            return None
        with self._parts_lock:
            self._last_write = self._env.clock()
        return stored

    def _publish(self, count: int | None = None) -> None:
        """Publish the first ``count`` events of the outbox (those queued
        so far by default), in order.  Holds _output_lock."""
        outbox, publish = self._outbox, self._env.hub.publish
        session_id = self.message["session_id"]
        for _ in range(len(outbox) if count is None else count):
            type, payload = outbox.popleft()
            publish(type, session_id, payload)
