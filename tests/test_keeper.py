"""The storage keeper (crushd.keeper): owed records are written with
backoff once the store accepts writes again; the keeper wakes when the
store changes and stops at once.  Its timed waits end when the test says
(:class:`Wake`), so the backoff is checked exactly and nothing sleeps."""

from __future__ import annotations

import logging
import threading

import pytest

from crushd.errors import StorageUnavailable
from crushd.keeper import KEEPER_BUDGET, Owed, StorageKeeper


class Store:
    """A store that refuses writes while ``refusing``; a probe that gets
    through makes it available, as the real one does."""

    def __init__(self, refusing: bool = False) -> None:
        self.refusing = refusing
        self.available = not refusing
        self.probes = 0

    def probe(self) -> None:
        self.probes += 1
        if self.refusing:
            self.available = False
            raise StorageUnavailable("the database refuses writes: database is locked")
        self.available = True


class Wake:
    """The keeper's event, with timed waits that end only in :meth:`elapse`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._set = False
        self._time_up = False
        self.timeouts: list[float | None] = []  # of every wait begun

    def set(self) -> None:
        with self._cond:
            self._set = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._set = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            self.timeouts.append(timeout)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._set or (timeout is not None and self._time_up))
            self._time_up = False
            return self._set

    def waits(self, count: int) -> list[float | None]:
        """Block until the keeper has begun ``count`` waits; their timeouts."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.timeouts) >= count, 10), self.timeouts
            return list(self.timeouts)

    def elapse(self) -> None:
        """The timed wait under way ends: its timeout has passed."""
        with self._cond:
            self._time_up = True
            self._cond.notify_all()


class Record:
    """An owed record: ``settle`` as the store would do it, ``done`` noted."""

    def __init__(self, store: Store, run_id: str = "r1") -> None:
        self.store = store
        self.budgets: list[float] = []
        self.done = threading.Event()
        self.owed = Owed(run_id, self.settle, self.done.set)

    def settle(self, budget: float) -> None:
        self.budgets.append(budget)
        if self.store.refusing:
            raise StorageUnavailable("the database refuses writes: database is locked")


@pytest.fixture
def keepers():
    started: list[StorageKeeper] = []

    def start(keeper: StorageKeeper) -> StorageKeeper:
        keeper.start()
        started.append(keeper)
        return keeper

    yield start
    for keeper in started:
        keeper.stop()


def test_owed_records_are_written_with_backoff_once_the_store_accepts_writes(keepers):
    store, wake, writable = Store(refusing=True), Wake(), threading.Event()
    keeper = StorageKeeper(store, writable.set, "w", wake=wake)
    record = Record(store)
    keeper.owe(record.owed)  # wakes the keeper's first wait at once
    keepers(keeper)
    for count in range(2, 8):
        wake.waits(count)
        wake.elapse()
    assert wake.waits(8) == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    assert record.budgets == [] and store.probes == 7  # probed first, each time
    assert keeper.owed() == ["r1"] and not writable.is_set()
    store.refusing = False
    wake.elapse()
    assert record.done.wait(10) and writable.wait(10)
    assert record.budgets == [KEEPER_BUDGET]
    assert keeper.owed() == []
    assert wake.waits(9)[-1] is None  # nothing owed: it waits until woken


def test_the_backoff_starts_again_after_a_recovery(keepers):
    store, wake, writable = Store(refusing=True), Wake(), threading.Event()
    keeper = keepers(StorageKeeper(store, writable.set, "w", wake=wake, first=1, longest=4))
    keeper.wake()
    for count in range(2, 4):
        wake.waits(count)
        wake.elapse()
    wake.waits(4)
    store.refusing = False
    wake.elapse()
    assert writable.wait(10)
    wake.waits(5)
    store.refusing, store.available = True, False
    keeper.wake()  # the store says it refuses writes again
    wake.waits(6)
    wake.elapse()
    assert wake.waits(7) == [1, 2, 4, 4, None, 2, 4]


def test_a_store_change_wakes_the_keeper_in_the_middle_of_its_backoff(keepers):
    """A write that got through makes the store available and wakes the
    keeper: the queued runs start without waiting out the backoff."""
    store, wake, writable = Store(refusing=True), Wake(), threading.Event()
    keeper = keepers(StorageKeeper(store, writable.set, "w", wake=wake))
    keeper.wake()
    assert wake.waits(2) == [0.1, 0.2]  # in the second wait, which never elapses
    store.refusing, store.available = False, True
    keeper.wake()
    assert writable.wait(10)
    assert store.probes == 1  # the store said so: no probe needed


def test_a_record_that_fails_for_another_reason_is_logged_and_let_go(keepers, caplog):
    """A bug must not hold the latch (a close) forever: ``done`` runs anyway."""
    store, wake = Store(), Wake()
    keeper = StorageKeeper(store, lambda: None, "w", wake=wake)
    done = threading.Event()

    def broken(budget: float) -> None:
        raise RuntimeError("a bug")

    with caplog.at_level(logging.ERROR, logger="crushd.keeper"):
        keeper.owe(Owed("r1", broken, done.set))
        keepers(keeper)
        assert done.wait(10)
    assert keeper.owed() == []
    assert "event=owed_records_failed workspace=w run=r1" in caplog.text


def test_building_starts_no_thread_and_stop_ends_a_long_backoff_at_once(caplog):
    store = Store(refusing=True)
    keeper = StorageKeeper(store, lambda: None, "w", first=3600)  # a real event
    record = Record(store)
    keeper.owe(record.owed)
    names = lambda: [t.name for t in threading.enumerate()]  # noqa: E731
    assert "crushd-storage-w" not in names()
    keeper.start()
    assert "crushd-storage-w" in names()
    with caplog.at_level(logging.ERROR, logger="crushd.keeper"):
        assert keeper.stop(timeout=10) == ["r1"]  # left to the next start
    assert "crushd-storage-w" not in names()  # it did not wait out the hour
    assert "event=records_owed_at_close workspace=w runs=r1" in caplog.text
    assert not record.done.is_set()
