"""The reducer adds results while a background thread writes checkpoints: adding never waits on
the disk, every checkpoint holds a consistent snapshot (totals and done flags of the same shards),
the last one is on disk before the run is finalized, a writer's error stops the run as before,
and the timing record counts what the head received."""

import errno
import threading
import time

import numpy as np
import pytest

from raygrad import constants as names
from raygrad.store.partial import Partial, ShardResult
from raygrad.store.reducer import Reducer
from raygrad.store.zarr_store import ResultStore

LAYERS, WIDTH, SHARDS = 2, 64, 8


def make_store(tmp_path) -> ResultStore:
    return ResultStore.create(tmp_path / names.STORE_NAME, {"grad": WIDTH}, SHARDS, list(range(LAYERS)), {})


def result(shard: int) -> ShardResult:
    """Shard i adds 2**i everywhere: any set of shards gives a distinct total."""
    value = float(2 ** shard)
    sums = {name: np.full((LAYERS, WIDTH), value) for name in names.sum_names("grad")}
    partial = Partial(sums, np.full(LAYERS, 1, dtype=np.int64), loss_sum=value, loss_tokens=1)
    return ShardResult(shard, partial, seconds=1.0, worker_load_seconds=0.0)


def expected_total(done: np.ndarray) -> float:
    return float(sum(2 ** shard for shard in np.flatnonzero(done)))


def test_adding_never_waits_for_a_checkpoint_and_each_one_is_a_consistent_snapshot(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    real_checkpoint, release, written = ResultStore.checkpoint, threading.Event(), []

    def slow_checkpoint(self, totals, done):
        # what the writer was handed: totals of exactly the shards marked done
        for name, value in totals.sums.items():
            np.testing.assert_array_equal(value, expected_total(done), err_msg=name)
        assert totals.loss_sum == expected_total(done) and totals.loss_tokens == done.sum()
        release.wait(timeout=30)  # the disk is slow until the test says otherwise
        real_checkpoint(self, totals, done)
        written.append(int(done.sum()))

    monkeypatch.setattr(ResultStore, "checkpoint", slow_checkpoint)
    reducer = Reducer(store, checkpoint_seconds=0, progress=False)
    started = time.perf_counter()
    for shard in range(SHARDS - 1):
        reducer.add(result(shard))  # each asks for a checkpoint; the first is stuck on the disk
    assert time.perf_counter() - started < 5 and not written and reducer.saved == 0
    release.set()
    reducer.add(result(SHARDS - 1))  # the last one: returns once its checkpoint is on disk
    assert written[-1] == SHARDS and len(written) <= 3  # the stuck one, then the newest snapshot(s)
    reducer.close()
    totals, done = ResultStore.open(store.path).totals()
    assert done.all() and totals.sums["grad_sum"][0, 0] == 2 ** SHARDS - 1
    timing = reducer.timing(0.0)
    assert timing["partials_received"] == SHARDS
    assert timing["bytes_received"] == SHARDS * (3 * LAYERS * WIDTH * 8 + LAYERS * 8)
    assert timing["checkpoints"] == len(written)
    lag = timing["checkpoint_lag_seconds"]
    assert 0 < lag["mean"] <= lag["max"]


def test_a_retry_s_second_answer_is_received_but_not_added(tmp_path):
    reducer = Reducer(make_store(tmp_path), checkpoint_seconds=3600, progress=False)
    reducer.add(result(0))
    reducer.add(result(0))
    assert reducer.totals.loss_sum == 1.0 and reducer.partials_received == 2
    reducer.keep_finished()
    reducer.close()
    totals, done = ResultStore.open(tmp_path / names.STORE_NAME).totals()
    assert done.sum() == 1 and totals.loss_sum == 1.0


def test_a_checkpoint_that_fails_in_the_writer_stops_the_next_add_and_keep_finished_retries(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    real_checkpoint, calls = ResultStore.checkpoint, []

    def disk_fills_on_second(self, totals, done):
        calls.append(int(done.sum()))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_checkpoint(self, totals, done)

    monkeypatch.setattr(ResultStore, "checkpoint", disk_fills_on_second)
    reducer = Reducer(store, checkpoint_seconds=0, progress=False)
    reducer.add(result(0))
    reducer.writer.wait()
    reducer.add(result(1))  # its checkpoint fails in the writer thread
    deadline = time.monotonic() + 30
    while reducer.writer.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match="No space left"):
        reducer.add(result(2))  # raised before shard 2 is added
    assert not reducer.done[2] and reducer.saved == 1
    reducer.keep_finished()  # the disk has room again: shard 1 is kept
    reducer.close()
    _, done = ResultStore.open(store.path).totals()
    assert done.tolist() == [True, True] + [False] * (SHARDS - 2)


def test_a_checkpoint_is_applied_without_a_whole_extra_copy_of_the_totals(tmp_path):
    """The redo file is copied into the arrays one array at a time: while applying it the head holds
    one of its arrays at a time (and Zarr's chunk buffers), not all of them beside the totals."""
    import tracemalloc

    from raygrad.store.checkpoint import _apply_pending, _checkpoint_arrays, _commit, _stage

    width = 65536  # one 4-layer float64 array: 2 MiB; 9 of them in the redo file
    store = ResultStore.create(tmp_path / names.STORE_NAME, {"grad": width, "value": width, "attr": width}, 3,
                               list(range(4)), {})
    totals, done = store.totals()
    rng = np.random.default_rng(0)
    for value in totals.sums.values():
        value[...] = rng.standard_normal(value.shape)
    done[1] = True
    arrays = _checkpoint_arrays(totals, done)
    redo_bytes = sum(np.asarray(value).nbytes for value in arrays.values())
    largest = max(np.asarray(value).nbytes for value in arrays.values())
    pending = store.path / names.PENDING_CHECKPOINT
    _stage(pending, arrays)
    _commit(pending)
    tracemalloc.start()
    try:
        _apply_pending(store, pending)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * largest < redo_bytes / 2, (peak, largest, redo_bytes)  # measured: 6.1 MiB of 18 (22 before)
    read, read_done = ResultStore.open(store.path).totals()  # verified against the digests just recorded
    for name, value in totals.sums.items():
        np.testing.assert_array_equal(read.sums[name], value, err_msg=name)
    np.testing.assert_array_equal(read_done, done)
