"""MessageWriter's locks: what is published is published in order, before it
is stored, and never with the parts locked (see crushd/writer.py).

The coalescing and the byte bound are tested in test_cancel.py and
test_run_safety.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from crushd.common import text_of
from crushd.events import Event, EventHub
from crushd.store import WorkspaceStore
from crushd.writer import MessageWriter


@dataclass
class Env:
    """What a writer uses of a RunEnv; ``receivers`` run inside ``publish``,
    as the app's blinker receivers do."""

    store: WorkspaceStore
    hub: EventHub = field(init=False)
    clock: Callable[[], float] = time.monotonic
    receivers: list[Callable[[Event], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hub = EventHub("w1", on_event=self._on_event)

    def _on_event(self, event: Event) -> None:
        for receiver in self.receivers:
            receiver(event)


@pytest.fixture
def env(tmp_path: Path):
    env = Env(WorkspaceStore(tmp_path / "workspace.db", "w1"))
    yield env
    env.hub.close()
    env.store.close()


def new_writer(env: Env, interval: float = 0.2) -> MessageWriter:
    session = env.store.create_session("s")
    message = env.store.create_message(session["id"], None, "assistant", [])
    return MessageWriter(env, message, "r1", interval=interval)  # type: ignore[arg-type]


def deltas(events: list[Event]) -> str:
    return "".join(e.data["payload"]["delta"] for e in events if e.type == "message.delta")


def test_a_receiver_runs_with_the_parts_unlocked(env):
    """A receiver that waits for another thread reading the message (a
    status page, the shutdown's flush) does not wait forever: the parts are
    not locked while events are published."""
    writer = new_writer(env)
    read: list[str] = []

    def receiver(event: Event) -> None:
        reader = threading.Thread(target=lambda: read.append(writer.text()), name="test-reader")
        reader.start()
        reader.join(5)
        assert not reader.is_alive(), "the parts stayed locked while an event was published"

    env.receivers.append(receiver)
    writer.delta("text", "one")
    env.receivers.clear()
    assert read == ["one"]


def test_a_flush_from_another_thread_returns_once_what_it_stored_is_published(env):
    """The shutdown thread flushes a writer, then closes the hub: what the
    flush stored must be published by then, held deltas included."""
    sub, _, _ = env.hub.subscribe(None, None)
    writer = new_writer(env)
    stored: list[dict[str, Any] | None] = []
    with writer.merging():
        writer.delta("text", "held ")
        writer.delta("text", "back")
        flusher = threading.Thread(target=lambda: stored.append(writer.flush()), name="test-flush")
        flusher.start()
        flusher.join(5)
    assert stored[0] is not None and text_of(stored[0]["parts"]) == "held back"
    events = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
    assert [(e.type, e.data["payload"]["delta"]) for e in events] == [
        ("message.delta", "held back")
    ]


def test_every_write_stores_exactly_what_was_published_when_two_threads_send(env):
    """The run's thread streams (held back and released, as for a provider
    that announces its waits) while another thread keeps flushing and
    reading: the deltas are published in the order they were streamed, and
    each write stores the concatenation of those published before it."""
    published: list[Event] = []
    env.receivers.append(published.append)
    writes: list[tuple[str, str]] = []
    update_message = env.store.update_message

    def recording(message: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
        writes.append((text_of(parts), deltas(published)))
        return update_message(message, parts)

    env.store.update_message = recording  # type: ignore[method-assign]
    writer = new_writer(env, interval=0.0)  # every change is due for a write
    words = [f"w{i} " for i in range(2000)]
    done = threading.Event()

    def stream() -> None:
        try:
            with writer.merging():
                for i, word in enumerate(words):
                    writer.delta("text", word)
                    if i % 3 == 0:
                        writer.release()  # the provider is about to wait
        finally:
            done.set()

    def interfere() -> None:
        while not done.is_set():
            writer.flush()
            writer.text()

    threads = [threading.Thread(target=stream, name="test-stream")]
    threads.append(threading.Thread(target=interfere, name="test-interfere"))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    writer.close()
    assert deltas(published) == "".join(words)
    assert len(writes) > 10
    assert all(stored == sent for stored, sent in writes)
    assert writes[-1][0] == "".join(words)
