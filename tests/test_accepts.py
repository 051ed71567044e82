"""The accept batcher (crushd.accepts): prompts accepted at once are stored
in shared transactions, each caller gets its own answer, and a close waits
for what it took in."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from conftest import wait_for

from crushd.accepts import AcceptBatcher, AcceptsClosed
from crushd.errors import NotFound, StorageUnavailable


class Writes:
    """The batch writer: records each batch; the first blocks until released."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.batches: list[list[str]] = []
        self.fail = fail
        self.first_started = threading.Event()
        self.release = threading.Event()

    def __call__(self, items: list[str]) -> list[str | Exception]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.first_started.set()
            assert self.release.wait(10)
        elif self.fail is not None:
            raise self.fail
        return [NotFound(f"{i} refused") if i.startswith("bad") else f"stored {i}" for i in items]


class Stored:
    """The hand-back: records what each batch gave, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []

    def __call__(self, items: list[str], results: list[str | Exception]) -> None:
        self.log += zip(items, results, strict=True)

    def items(self) -> list[str]:
        return [item for item, _ in self.log]


def first_batch_under_way(
    batcher: AcceptBatcher, writes: Writes, pool: ThreadPoolExecutor
) -> Future:
    lead = pool.submit(batcher.accept, "a")
    assert writes.first_started.wait(10)
    return lead


def test_accepts_that_come_while_a_batch_is_written_share_the_next_one():
    writes, stored = Writes(), Stored()
    batcher = AcceptBatcher(writes, stored)

    def accept(item: str) -> str:
        result = batcher.accept(item)
        assert item in stored.items()  # handed back before its caller returns
        return result

    with ThreadPoolExecutor(4) as pool:
        lead = pool.submit(accept, "a")
        assert writes.first_started.wait(10)
        followers = {item: pool.submit(accept, item) for item in ("b", "c", "d")}
        wait_for(lambda: batcher.waiting == 3, message="the followers did not queue up")
        writes.release.set()
        assert lead.result(10) == "stored a"
        assert {item: f.result(10) for item, f in followers.items()} == {
            item: f"stored {item}" for item in "bcd"
        }
    assert writes.batches[0] == ["a"]
    assert sorted(writes.batches[1]) == ["b", "c", "d"]  # one transaction for all three
    assert len(writes.batches) == 2
    assert stored.items() == ["a", *writes.batches[1]]  # in the order they were written


def test_an_item_refused_alone_fails_only_its_own_caller():
    batcher = AcceptBatcher(lambda items: [NotFound("no") if i == "bad" else i for i in items])
    assert batcher.accept("good") == "good"
    with pytest.raises(NotFound):
        batcher.accept("bad")


def test_a_failing_batch_is_reported_to_each_of_its_callers():
    writes = Writes(fail=StorageUnavailable("the database refuses writes: disk is full"))
    stored = Stored()
    batcher = AcceptBatcher(writes, stored)
    with ThreadPoolExecutor(4) as pool:
        lead = first_batch_under_way(batcher, writes, pool)
        followers = [pool.submit(batcher.accept, item) for item in ("b", "c", "d")]
        wait_for(lambda: batcher.waiting == 3, message="the followers did not queue up")
        writes.release.set()
        assert lead.result(10) == "stored a"
        errors = [f.exception(10) for f in followers]
    assert all(isinstance(e, StorageUnavailable) for e in errors)
    assert {e.message for e in errors} == {"the database refuses writes: disk is full"}
    assert len({id(e) for e in errors}) == 3  # a copy each: tracebacks do not mix
    assert [type(result) for _, result in stored.log[1:]] == [StorageUnavailable] * 3
    writes.fail = None  # the database accepts writes again
    assert batcher.accept("after") == "stored after"  # and the next batch is written


def test_close_refuses_new_items_and_waits_for_the_batch_being_stored():
    writes, order = Writes(), []
    batcher = AcceptBatcher(writes, lambda items, results: order.extend(results))
    with ThreadPoolExecutor(4) as pool:
        lead = first_batch_under_way(batcher, writes, pool)
        taken = pool.submit(batcher.accept, "b")  # taken in before the close
        wait_for(lambda: batcher.waiting == 1, message="b did not queue up")
        assert batcher.close(timeout=0) is False  # a batch is being written
        with pytest.raises(AcceptsClosed):
            batcher.accept("late")

        def close() -> None:
            assert batcher.close()
            order.append("closed")

        closer = pool.submit(close)
        assert not closer.done()
        writes.release.set()
        closer.result(10)
        assert lead.result(10) == "stored a" and taken.result(10) == "stored b"
    assert writes.batches == [["a"], ["b"]]
    assert order == ["stored a", "stored b", "closed"]
    assert batcher.close(timeout=0) is True  # idempotent, and nothing is being written


def test_building_a_batcher_starts_nothing():
    before = threading.active_count()
    batcher = AcceptBatcher(lambda items: items)
    assert threading.active_count() == before
    assert batcher.accept("x") == "x"  # written on the caller's thread
    assert threading.active_count() == before
