"""One streaming assistant message: its parts, the deltas published, the writes stored.

A :class:`MessageWriter` takes what the model streams into one assistant
message (SPEC §3 "Streaming and persistence").  Deltas go to event
subscribers as they arrive; the database sees at most one write per
:data:`WRITE_INTERVAL`, plus a forced one at step end and on every exit path.
"""

from __future__ import annotations

import codecs
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from crushd.config import DEFAULT_MAX_MESSAGE_BYTES
from crushd.errors import StorageUnavailable
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
    """The parts of one streaming assistant message, persisted coalesced.

    Deltas are published at once, or, inside :meth:`merging`, as soon as
    the provider is about to wait for more; the database sees at most one
    write per ``interval`` plus a forced one at step end and on every exit
    path.  Nothing is stored before it is published.
    Thread-safe: the workspace may flush it from its shutdown thread.

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
        # What the model streamed into the parts, in UTF-8 bytes: a running
        # count, so the check per delta costs O(1).  Guarded by _lock.
        self._bytes = 0
        # Set (once, by the thread that streams) when a delta did not fit.
        self.full = False
        # Guards the parts and the write state; held while a delta is
        # published and while the parts are written, so after Workspace._lock
        # and before EventHub._lock and the store's lock.
        self._lock = threading.Lock()
        self.parts: list[dict[str, Any]] = []  # guarded by _lock
        # Fragments still to be joined onto the last part's ``_tail_key``
        # field (its text, or a tool call's input).  Adding each delta to
        # the string itself copied all of it every time: a 1 MB answer of
        # 200,000 deltas took 25 s of CPU that way, 1.5 s this way.
        # Guarded by _lock.
        self._tail: list[str] = []
        self._tail_key = ""
        self._dirty = False  # guarded by _lock
        self._last_write = float("-inf")  # guarded by _lock
        self._closed = False  # guarded by _lock
        # Inside merging(): the text read but not yet published, of kind
        # _held_kind.  Guarded by _lock.
        self._merging = False
        self._held: list[str] = []
        self._held_kind = ""
        self._shown = False  # whether a delta of this attempt was published; under _lock

    @property
    def id(self) -> str:
        return self.message["id"]

    def delta(self, kind: str, text: str) -> None:
        if not text:
            return
        with self._lock:
            text = self._fit(text)
            if not text:
                return
            if self.parts and self.parts[-1]["type"] == kind:
                self._extend("text", text)
            else:
                self._settle()
                self.parts.append({"type": kind, "text": text})
            # Publish under the lock so the stored text and the published
            # deltas can never disagree about order.
            if self._merging:
                self._held_kind = kind  # _settle() released other kinds
                self._held.append(text)
                self._dirty = True  # a coalesced write waits for the release
            else:
                self._publish_delta(kind, text)
                self._changed()

    @contextlib.contextmanager
    def merging(self) -> Iterator[None]:
        """Hold deltas back until the provider is about to wait for more.

        For a provider that :attr:`~crushd.providers.base.Provider.announces_waits`:
        the text of every chunk read at once is published as one delta.
        """
        with self._lock:
            self._merging = True
        try:
            with on_wait(self.release):
                yield
        finally:
            with self._lock:
                self._merging = False
                self._release()

    def release(self) -> bool:
        """Publish the deltas held back (see :meth:`merging`); return
        whether the reader may now be paced: once some text was shown."""
        with self._lock:
            if self._release():
                self._changed()
            return self._shown

    def _release(self) -> bool:
        """Publish what is held; return whether there was anything.  Holds _lock."""
        if not self._held:
            return False
        text, self._held = "".join(self._held), []
        self._publish_delta(self._held_kind, text)
        return True

    def _publish_delta(self, kind: str, text: str) -> None:
        """Holds _lock."""
        self._shown = True
        self._env.hub.publish(
            "message.delta",
            self.message["session_id"],
            {"message_id": self.id, "run_id": self.run_id, "kind": kind, "delta": text},
        )

    def _fit(self, text: str) -> str:
        """What of ``text`` the message still has room for; sets :attr:`full`
        when that is not all of it.  Holds _lock."""
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

    def tool_call_start(self, call_id: str, name: str) -> None:
        """A call whose name and id do not fit is not recorded (the message is full)."""
        with self._lock:
            if self.full or utf8_size(call_id) + utf8_size(name) > self.max_bytes - self._bytes:
                self.full = True
                return
            self._bytes += utf8_size(call_id) + utf8_size(name)
            self._settle()
            self.parts.append(
                {"type": "tool_call", "id": call_id, "name": name, "input": "", "finished": False}
            )
            self._changed()

    def tool_call_input(self, call_id: str, fragment: str) -> None:
        with self._lock:
            fragment = self._fit(fragment)
            if not fragment:
                return
            for part in reversed(self.parts):
                if part["type"] == "tool_call" and part["id"] == call_id:
                    if part is self.parts[-1]:
                        self._extend("input", fragment)
                    else:
                        part["input"] += fragment
                    self._changed()
                    break

    def finish_tool_calls(self) -> list[dict[str, Any]]:
        """Mark every tool call finished; return copies of them in order.

        The stored ``input`` must be valid JSON (it is sent back to the
        model), so unparsable arguments are stored as ``"{}"``; each copy
        keeps the model's own text as ``raw_input`` so the call is reported
        as invalid instead of being run with no arguments.
        """
        with self._lock:
            self._settle()
            calls = []
            for part in self.parts:
                if part["type"] == "tool_call":
                    raw = part["input"]
                    part["finished"] = True
                    part["input"] = closed_input(raw) if raw else "{}"
                    calls.append({**part, "raw_input": raw})
            self._dirty = True
            return calls

    def reset(self) -> bool:
        """Discard every part (a failed attempt's); return whether there were any.

        ``message.reset`` is published under the lock, like the deltas, and
        the empty parts are written at once: from here on the stored text is
        what the next attempt streams.
        """
        with self._lock:
            self._release()
            self._shown = False  # the next attempt's first text is awaited again
            self._bytes, self.full = 0, False
            if not self.parts:
                return False
            self.parts, self._tail = [], []
            self._env.hub.publish(
                "message.reset",
                self.message["session_id"],
                {"message_id": self.id, "run_id": self.run_id},
            )
            self._dirty = True
            self._write(required=False)
            return True

    def add_finish(self, reason: str, message: str = "", details: str = "") -> None:
        with self._lock:
            self._settle()
            self.parts.append(finish_part(reason, message, details))
            self._dirty = True

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
        with self._lock:
            self._settle()
            return "".join(p["text"] for p in self.parts if p["type"] == kind)

    def _extend(self, key: str, fragment: str) -> None:
        """Add ``fragment`` to the last part's ``key``.  Holds _lock."""
        if key != self._tail_key:
            self._join()
            self._tail_key = key
        self._tail.append(fragment)

    def _settle(self) -> None:
        """Publish what is held and join the pending fragments: before
        anything else changes or reads the parts, and before they are
        written.  Holds _lock."""
        self._release()
        self._join()

    def _join(self) -> None:
        """Join the pending fragments onto the last part.  Holds _lock."""
        if self._tail:
            self.parts[-1][self._tail_key] += "".join(self._tail)
            self._tail = []

    def _changed(self) -> None:
        """Mark the parts dirty and write them if the interval has passed.  Holds _lock."""
        self._dirty = True
        if self._env.clock() - self._last_write >= self._interval:
            self._write(required=False)

    def flush(self) -> dict[str, Any] | None:
        """Write pending parts now; return the stored message if written.
        Raises StorageUnavailable (the parts stay pending)."""
        with self._lock:
            return self._write() if self._dirty else None

    def close(self) -> dict[str, Any] | None:
        """Flush and refuse later writes (the sealing code takes over);
        return the stored message if this wrote it.  Raises
        StorageUnavailable, and stays open, when the write is refused."""
        with self._lock:
            stored = self._write() if self._dirty else None
            self._closed = True
            return stored

    def fill(self) -> None:
        """Take nothing more, as if a delta had not fit: the stream sent
        more than the message may hold in a way no delta shows (one event
        too large to read)."""
        with self._lock:
            self.full = True

    def abandon(self) -> None:
        """Refuse later writes without writing: after closing records that
        raised, the sealing code works from what is stored, and a late
        coalesced write must not undo it."""
        with self._lock:
            self._closed = True

    def _write(self, required: bool = True) -> dict[str, Any] | None:
        """Store the parts.  A write that is not ``required`` (the coalesced
        ones) is skipped while the database refuses writes: the parts stay
        in memory, dirty, for the next required one.  Holds _lock."""
        if self._closed:
            return None
        if not required and not self._env.store.available:
            return None
        self._settle()
        try:
            stored = self._env.store.update_message(self.message, self.parts)
        except StorageUnavailable:
            if required:
                raise
            self._last_write = self._env.clock()
            return None
        self._dirty = False
        self._last_write = self._env.clock()
        return stored
