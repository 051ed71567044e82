"""The start gate: runs are held while prompts are being accepted (crushd.gate).

Where time matters the gate runs on :class:`FakeTime`, so each test says
exactly when held runs go; the others keep the real timer thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from crushd.gate import StartGate


class FakeTimer:
    def __init__(self, at: float, function: Callable[[], None]) -> None:
        self.at = at
        self.function = function
        self.started = self.cancelled = False

    def start(self) -> None:
        self.started = True

    def cancel(self) -> None:
        self.cancelled = True


class FakeTime:
    """The gate's clock and timer: time moves only in :meth:`advance`, which
    fires the timers that come due on the calling thread, in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []

    def __call__(self) -> float:
        return self.now

    def timer(self, delay: float, function: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.now + delay, function)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[FakeTimer]:
        return [t for t in self.timers if t.started and not t.cancelled]

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while due := [t for t in self.pending() if t.at <= end]:
            timer = min(due, key=lambda t: t.at)
            self.timers.remove(timer)
            self.now = max(self.now, timer.at)
            timer.function()
        self.now = end


def fake_gate(**options: float) -> tuple[StartGate, FakeTime]:
    clock = FakeTime()
    return StartGate(clock=clock, timer=clock.timer, **options), clock


class Launches:
    """A launch callback that records what it was given, and on which thread."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.threads: list[str] = []
        self.done = threading.Event()

    def __call__(self, items: list[str]) -> None:
        self.items += items
        self.threads.append(threading.current_thread().name)
        self.done.set()


def test_with_nothing_being_accepted_runs_launch_at_once_in_order():
    gate, launches = StartGate(bound=30), Launches()
    gate.hold(launches, ["a", "b"])
    gate.hold(launches, ["c"])
    assert launches.items == ["a", "b", "c"]
    assert launches.threads == [threading.current_thread().name] * 2


def test_runs_are_held_until_the_accepts_end_then_launched_together():
    gate, launches = StartGate(bound=30, quiet=0.05), Launches()
    with gate.accept():
        with gate.accept():
            gate.hold(launches, ["a"])
            gate.hold(launches, ["b", "c"])
        assert gate.accepting == 1
        assert launches.items == []
        gate.hold(launches, ["d"])
        assert launches.items == []
    assert gate.accepting == 0
    assert launches.done.wait(5)
    assert launches.items == ["a", "b", "c", "d"]
    assert launches.threads == ["crushd-start-gate"]  # one hand-back for all of them


def test_a_lone_held_run_goes_as_soon_as_its_accept_ends():
    """One prompt at a time: its run is not kept waiting for quiet."""
    gate, launches = StartGate(bound=30, quiet=30), Launches()
    with gate.accept():
        gate.hold(launches, ["a"])
        assert launches.items == []
    assert launches.items == ["a"]
    assert launches.threads == [threading.current_thread().name]


def test_several_held_runs_wait_until_the_accepts_have_been_quiet():
    """In a burst the count of accepts touches zero between two requests;
    the runs held by then stay held while the next accept follows."""
    (gate, clock), launches = fake_gate(bound=30, quiet=0.25), Launches()
    with gate.accept():
        gate.hold(launches, ["a", "b"])
    clock.advance(0.125)  # the next request of the burst reaches its accept
    assert launches.items == []
    with gate.accept():
        gate.hold(launches, ["c"])
    clock.advance(0.1875)  # 0.0625 s short of quiet since the last accept ended
    assert launches.items == [] and gate.held == 3
    clock.advance(0.0625)
    assert launches.items == ["a", "b", "c"]
    assert launches.threads == [threading.current_thread().name]  # the timer's, once
    assert gate.held == 0 and clock.pending() == []


def test_a_run_is_held_for_at_most_the_bound_while_accepts_go_on():
    (gate, clock), launches = fake_gate(bound=0.25), Launches()
    with gate.accept():  # an accept that never ends within the test
        gate.hold(launches, ["a"])
        clock.advance(0.1875)
        assert launches.items == []
        clock.advance(0.0625)
        assert launches.items == ["a"]
        gate.hold(launches, ["b"])  # a timer is set again for the next one
        assert [t.at for t in clock.pending()] == [0.5]
        clock.advance(0.25)
        assert launches.items == ["a", "b"]


def test_the_real_timer_hands_back_a_run_held_past_its_bound():
    gate, launches = StartGate(bound=0.05), Launches()
    with gate.accept():
        gate.hold(launches, ["a"])
        assert launches.done.wait(10)
        assert launches.items == ["a"]
        assert launches.threads == ["crushd-start-gate"]


def test_a_shorter_bound_is_kept_even_with_a_longer_hold_pending():
    (gate, clock), slow, fast = fake_gate(bound=30), Launches(), Launches()
    with gate.accept():
        gate.hold(slow, ["a"])
        gate.bound = 0.0625
        gate.hold(fast, ["b"])
        clock.advance(0.0625)
        assert fast.items == ["b"]
        assert slow.items == []
        gate.release(slow)
    assert slow.items == ["a"]


def test_a_timer_that_fires_after_it_was_cancelled_changes_nothing():
    """A timer cancelled (or replaced by a sooner one) may still fire, as a
    thread's can once its wait is over; the gate ignores it."""
    (gate, clock), launches = fake_gate(bound=30), Launches()
    with gate.accept():
        gate.hold(launches, ["a"])
        (stale,) = clock.pending()
        gate.release(launches)
        assert stale.cancelled and launches.items == ["a"]
        gate.hold(launches, ["b"])
        stale.function()
        assert launches.items == ["a"] and gate.held == 1
    assert launches.items == ["a", "b"]


def test_release_hands_one_owners_runs_back_at_once():
    gate, closing, other = StartGate(bound=30), Launches(), Launches()
    with gate.accept():
        gate.hold(closing, ["a", "b"])
        gate.hold(other, ["c"])
        gate.release(closing)
        assert closing.items == ["a", "b"]
        assert other.items == []
    assert other.items == ["c"]


def test_a_failing_launch_is_logged_and_the_others_still_launch(caplog):
    gate, launches = StartGate(bound=30), Launches()

    def broken(items: list[str]) -> None:
        raise RuntimeError("broken owner")

    with caplog.at_level(logging.ERROR, logger="crushd.gate"):
        with gate.accept():
            gate.hold(broken, ["a"])
            gate.hold(launches, ["b"])
        assert launches.done.wait(5)
    assert launches.items == ["b"]
    assert "event=launch_failed" in caplog.text
