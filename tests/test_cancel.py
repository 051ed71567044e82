"""Unit tests of the concurrency parts: cancel tokens, the countdown latch and
the coalescing message writer (with an injected clock, so no test sleeps)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from crushd.cancel import Cancelled, CancelToken, CountdownLatch, Deadline
from crushd.events import EventHub
from crushd.providers.base import waiting
from crushd.store import WorkspaceStore
from crushd.writer import MessageWriter

# -- CancelToken -----------------------------------------------------------------


def test_cancel_is_idempotent_and_keeps_the_first_reason():
    token = CancelToken(name="t")
    assert not token.cancelled and token.reason is None
    assert token.cancel("first") is True
    assert token.cancel("second") is False
    assert token.cancelled and token.reason == "first"
    with pytest.raises(Cancelled, match="first"):
        token.raise_if_cancelled()


def test_children_follow_their_parent_but_not_the_other_way():
    parent = CancelToken(name="workspace")
    child = parent.child("run")
    grandchild = child.child("tool")
    sibling = parent.child("other")
    sibling.cancel("only me")
    assert not parent.cancelled and not child.cancelled
    parent.cancel("closing")
    assert child.cancelled and grandchild.cancelled
    assert (child.reason, grandchild.reason) == ("closing", "closing")


def test_a_released_child_no_longer_hears_its_parent():
    parent = CancelToken()
    child = parent.child()
    child.release()
    parent.cancel()
    assert not child.cancelled


def test_callbacks_run_once_on_cancel_and_at_once_when_already_cancelled():
    token = CancelToken()
    calls: list[str] = []
    token.on_cancel(lambda: calls.append("a"))
    handle = token.on_cancel(lambda: calls.append("removed"))
    token.remove_callback(handle)
    token.cancel()
    token.cancel()
    assert calls == ["a"]
    assert token.on_cancel(lambda: calls.append("late")) == -1
    assert calls == ["a", "late"]


def test_a_failing_callback_does_not_stop_the_others(caplog):
    token = CancelToken(name="t")
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    token.on_cancel(broken)
    token.on_cancel(lambda: calls.append("after"))
    assert token.cancel() is True
    assert calls == ["after"]
    assert "event=cancel_callback_failed token=t" in caplog.text


def test_wait_returns_as_soon_as_another_thread_cancels():
    token = CancelToken()
    assert token.wait(0) is False
    threading.Timer(0.05, token.cancel).start()
    assert token.wait(10) is True


def test_deadline_counts_down_on_its_clock():
    now = [10.0]
    deadline = Deadline(2.0, clock=lambda: now[0])
    assert deadline.remaining() == 2.0 and not deadline.expired
    now[0] = 11.5
    assert deadline.remaining() == pytest.approx(0.5)
    now[0] = 13.0
    assert deadline.remaining() == 0.0 and deadline.expired


# -- CountdownLatch ----------------------------------------------------------------


def test_latch_waits_until_every_count_is_down():
    latch = CountdownLatch()
    assert latch.wait(0) is True  # nothing dispatched
    latch.count_up()
    latch.count_up()
    assert latch.count == 2 and latch.wait(0.01) is False
    latch.count_down()
    assert latch.wait(0.01) is False
    threading.Timer(0.05, latch.count_down).start()
    assert latch.wait(10) is True and latch.count == 0


def test_latch_refuses_to_count_below_zero():
    latch = CountdownLatch()
    with pytest.raises(RuntimeError, match="below zero"):
        latch.count_down()


# -- MessageWriter -----------------------------------------------------------------


@dataclass
class Env:
    """The part of a RunEnv a writer uses, with a clock the test moves."""

    store: WorkspaceStore
    hub: EventHub
    now: float = 0.0

    def clock(self) -> float:
        return self.now


@pytest.fixture
def env(tmp_path: Path):
    store = WorkspaceStore(tmp_path / "workspace.db", "w1")
    hub = EventHub("w1")
    yield Env(store, hub)
    hub.close()
    store.close()


def new_writer(env: Env, interval: float = 0.2) -> MessageWriter:
    session = env.store.create_session("s")
    message = env.store.create_message(session["id"], None, "assistant", [])
    return MessageWriter(env, message, "r1", interval=interval)  # type: ignore[arg-type]


def stored_parts(env: Env, writer: MessageWriter) -> list[dict]:
    (message,) = [m for m in env.store.list_messages(writer.message["session_id"])]
    return message["parts"]


def test_deltas_are_published_at_once_and_stored_at_most_once_an_interval(env):
    sub, _, _ = env.hub.subscribe(None, None)
    writer = new_writer(env)
    env.now = 100.0
    writer.delta("text", "one ")  # the first write happens at once
    assert stored_parts(env, writer) == [{"type": "text", "text": "one "}]
    env.now = 100.1
    writer.delta("text", "two ")
    writer.delta("reasoning", "hm")
    assert stored_parts(env, writer) == [{"type": "text", "text": "one "}]  # coalesced
    env.now = 100.2
    writer.delta("text", "three")
    assert stored_parts(env, writer) == [
        {"type": "text", "text": "one two "},
        {"type": "reasoning", "text": "hm"},
        {"type": "text", "text": "three"},
    ]
    deltas = [sub.queue.get_nowait().data["payload"]["delta"] for _ in range(4)]
    assert deltas == ["one ", "two ", "hm", "three"]
    assert writer.text() == "one two three"


def test_flush_writes_what_is_pending_and_close_refuses_later_writes(env):
    writer = new_writer(env)
    writer.delta("text", "a")
    assert writer.flush() is None  # nothing pending: the first delta was written
    env.now = 0.05
    writer.delta("text", "b")
    stored = writer.flush()
    assert stored is not None and stored["parts"] == [{"type": "text", "text": "ab"}]
    writer.tool_call_start("c1", "view")
    writer.tool_call_input("c1", '{"path": ')
    writer.tool_call_input("c1", '"x"}')
    (call,) = writer.finish_tool_calls()
    assert (call["input"], call["raw_input"], call["finished"]) == ('{"path": "x"}',) * 2 + (True,)
    writer.add_finish("tool_use")
    closed = writer.close()
    assert closed is not None and closed["parts"][-1]["reason"] == "tool_use"
    env.now = 10.0
    writer.delta("text", "late")  # published, never stored
    assert writer.flush() is None
    assert stored_parts(env, writer)[0] == {"type": "text", "text": "ab"}


def test_parts_built_from_many_fragments_hold_every_fragment_in_order(env):
    writer = new_writer(env)
    words = [f"w{i} " for i in range(1000)]
    for word in words:
        writer.delta("text", word)
    writer.tool_call_start("c1", "edit")
    for char in '{"path": "a"}':
        writer.tool_call_input("c1", char)
    writer.tool_call_start("c2", "view")
    writer.tool_call_input("c1", "")  # a late fragment for an earlier call
    writer.tool_call_input("c2", '{"path": "b"}')
    writer.delta("reasoning", "hm")
    writer.delta("reasoning", "m")
    writer.delta("text", "end")
    assert writer.text() == "".join(words) + "end"
    calls = writer.finish_tool_calls()
    assert [c["input"] for c in calls] == ['{"path": "a"}', '{"path": "b"}']
    writer.add_finish("stop")
    writer.close()
    assert [(p["type"], p.get("text")) for p in stored_parts(env, writer)] == [
        ("text", "".join(words)),
        ("tool_call", None),
        ("tool_call", None),
        ("reasoning", "hmm"),
        ("text", "end"),
        ("finish", None),
    ]


def test_a_reset_drops_the_fragments_not_yet_joined(env):
    writer = new_writer(env)
    writer.delta("text", "first attempt ")
    env.now = 0.05
    writer.delta("text", "still pending")
    assert writer.reset()
    writer.delta("text", "second")
    assert writer.text() == "second"
    assert writer.flush()["parts"] == [{"type": "text", "text": "second"}]


def published(sub) -> list[tuple[str, str | None]]:
    """The events queued for ``sub`` so far: (type, delta)."""
    events = []
    while not sub.queue.empty():
        event = sub.queue.get_nowait()
        events.append((event.type, event.data["payload"].get("delta")))
    return events


def test_merging_publishes_what_was_read_together_when_the_provider_waits(env):
    sub, _, _ = env.hub.subscribe(None, None)
    writer = new_writer(env)
    with writer.merging():
        assert waiting() is False  # nothing shown yet: reads are not paced
        writer.delta("reasoning", "hm")
        writer.delta("text", "one ")  # another kind: what was held goes first
        writer.delta("text", "two ")
        assert published(sub) == [("message.delta", "hm")]
        assert stored_parts(env, writer) == []  # stored only once published
        assert waiting() is True
        assert published(sub) == [("message.delta", "one two ")]
        assert stored_parts(env, writer)[-1] == {"type": "text", "text": "one two "}
        writer.delta("text", "three")
        assert writer.text() == "one two three"  # a read publishes first
        writer.delta("text", " four")
        assert writer.reset()
        assert published(sub) == [
            ("message.delta", "three"),
            ("message.delta", " four"),
            ("message.reset", None),
        ]
        assert waiting() is False  # the next attempt's first text is awaited again
        writer.delta("text", "again")
    assert published(sub) == [("message.delta", "again")]  # the end releases it
    assert waiting() is False  # the hook is gone with the block
    assert writer.flush()["parts"] == [{"type": "text", "text": "again"}]


def test_a_coalesced_write_while_merging_waits_for_the_release(env):
    writer = new_writer(env)
    with writer.merging():
        env.now = 10.0
        writer.delta("text", "held")
        assert stored_parts(env, writer) == []
        waiting()
        assert stored_parts(env, writer) == [{"type": "text", "text": "held"}]
        env.now = 10.1
        writer.delta("text", " more")
        waiting()  # within the interval: published, not written
        assert stored_parts(env, writer) == [{"type": "text", "text": "held"}]
    assert writer.flush()["parts"] == [{"type": "text", "text": "held more"}]


def test_unparsable_tool_arguments_are_stored_as_an_empty_object(env):
    writer = new_writer(env)
    writer.tool_call_start("c1", "bash")
    writer.tool_call_input("c1", '{"command": "ls')
    (call,) = writer.finish_tool_calls()
    assert call["input"] == "{}" and call["raw_input"] == '{"command": "ls'
