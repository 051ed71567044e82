"""The start gate: runs are held while prompts are being accepted (crushd.gate)."""

from __future__ import annotations

import logging
import threading
import time

from crushd.gate import StartGate


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
    gate, launches = StartGate(bound=30, quiet=0.3), Launches()
    with gate.accept():
        gate.hold(launches, ["a", "b"])
    time.sleep(0.05)  # the next request of the burst reaches its accept
    with gate.accept():
        assert launches.items == []
        gate.hold(launches, ["c"])
    ended = time.monotonic()
    assert launches.done.wait(5)
    assert time.monotonic() - ended >= 0.25
    assert launches.items == ["a", "b", "c"]


def test_a_run_is_held_for_at_most_the_bound_while_accepts_go_on():
    gate, launches = StartGate(bound=0.2), Launches()
    with gate.accept():  # an accept that never ends within the test
        started = time.monotonic()
        gate.hold(launches, ["a"])
        assert launches.done.wait(10)
        assert 0.15 <= time.monotonic() - started < 5
        assert launches.items == ["a"]
        assert launches.threads == ["crushd-start-gate"]
        launches.done.clear()
        gate.hold(launches, ["b"])  # a timer is set again for the next one
        assert launches.done.wait(10)
        assert launches.items == ["a", "b"]


def test_a_shorter_bound_is_kept_even_with_a_longer_hold_pending():
    gate = StartGate(bound=30)
    slow, fast = Launches(), Launches()
    with gate.accept():
        gate.hold(slow, ["a"])
        gate.bound = 0.05
        gate.hold(fast, ["b"])
        assert fast.done.wait(10)
        assert slow.items == []
        gate.release(slow)
    assert slow.items == ["a"]


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
