"""The stop controller every entry point shares: first request, second signal."""

from __future__ import annotations

import logging
import threading

from crushd.stopping import StopController


def test_first_request_stops_on_a_thread_later_ones_do_not():
    calls: list[str] = []
    release = threading.Event()

    def stop() -> None:
        calls.append(threading.current_thread().name)
        release.wait(10)

    control = StopController(stop)
    assert control.join(0)  # nothing started yet
    assert control.request("SIGTERM", before=lambda: calls.append("before"))
    assert control.requested.is_set()  # at once, before the stop thread ran
    assert not control.request("loop ended")
    assert not control.now.is_set()  # a repeated request is not a second signal
    assert not control.join(0.05)
    release.set()
    assert control.join(10) and control.done.is_set()
    assert calls == ["before", "crushd-stop"]


def test_a_second_signal_means_stop_now():
    release = threading.Event()
    control = StopController(lambda: release.wait(10))
    control.signal("SIGTERM")
    assert control.requested.is_set() and not control.now.is_set()
    control.signal("SIGINT")
    assert control.now.is_set()
    release.set()
    assert control.join(10)


def test_a_failing_stop_still_runs_after_and_is_logged(caplog):
    after = threading.Event()

    def stop() -> None:
        raise RuntimeError("disk on fire")

    control = StopController(stop)
    with caplog.at_level(logging.ERROR, logger="crushd.stopping"):
        control.request("SIGTERM", after=after.set)
        assert control.join(10)
    assert after.is_set() and control.done.is_set()
    assert "event=stop_failed reason=SIGTERM" in caplog.text


def test_mark_sets_requested_without_a_thread():
    control = StopController(lambda: None)
    control.mark()
    assert control.requested.is_set() and control.join(0)
    assert control.request("SIGTERM")  # a signal after a direct stop still runs it
    assert control.join(10)
