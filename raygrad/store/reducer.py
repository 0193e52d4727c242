"""The reduce loop's state and policies: running totals, which shards are in,
when to checkpoint, the progress bar and the timing record.

Checkpoints are written off the dispatch path: `checkpoint` copies the totals
and the done flags into a snapshot buffer (a memory copy, milliseconds) and a
background thread writes that snapshot through the store's redo log (hundreds
of milliseconds for tens of MB) while results keep being added. A snapshot is
taken only between two adds, so it is always consistent; a newer snapshot
replaces one still waiting, and there are never more than two buffers (one
being written, one waiting)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .partial import Partial, ShardResult
from .zarr_store import ResultStore

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 30.0  # between checkpoints; the last shard always checkpoints


@dataclass
class _Snapshot:
    totals: Partial
    done: np.ndarray
    # per shard in it: [perf_counter() when it was added, when a snapshot with it was first handed over]
    added: list[list] = field(default_factory=list)


class CheckpointWriter:
    """One thread writing snapshots to the store, newest wins. An error in the thread
    (a full disk; the run's lock taken over by another process, raygrad.store.lock, which the
    store checks before each checkpoint) is kept and raised in the caller's thread by the
    next `submit`, `raise_error` or `wait`; the thread stays up, so a later checkpoint can be
    tried (a displaced run's is refused again, before it writes)."""

    def __init__(self, store: ResultStore):
        self.store = store
        self.changed = threading.Condition()
        self.waiting: _Snapshot | None = None  # submitted, not yet taken by the thread
        self.writing: _Snapshot | None = None
        self.spare: _Snapshot | None = None  # a buffer free to be filled again
        self.unwritten: list[list] = []  # the `added` of a snapshot whose write failed
        self.error: BaseException | None = None
        self.closed = False
        self.saved = -1  # shards done in the last snapshot written (-1: none this session)
        self.count = 0  # checkpoints written
        self.write_seconds = 0.0
        self.lags: list[float] = []  # per shard: seconds from its add until a checkpoint held it on disk
        self.disk_lags: list[float] = []  # per shard: of those, from its snapshot's hand-over until on disk
        self.thread = threading.Thread(target=self._loop, name="raygrad-checkpoint", daemon=True)
        self.thread.start()

    def buffer(self, totals: Partial, done: np.ndarray) -> _Snapshot:
        """A copy of (totals, done) in a free buffer: the waiting one (its shards are in the copy too),
        the spare, or a new one."""
        with self.changed:
            self.raise_error()
            added, self.unwritten = self.unwritten, []
            if self.waiting is not None:
                snapshot, self.waiting = self.waiting, None
                added += snapshot.added
            else:
                snapshot, self.spare = self.spare, None
        if snapshot is None:
            snapshot = _Snapshot(Partial({name: value.copy() for name, value in totals.sums.items()},
                                         totals.tokens.copy(),
                                         examples={name: value.copy() for name, value in totals.examples.items()}),
                                 done.copy())
        else:
            for name, value in totals.sums.items():
                np.copyto(snapshot.totals.sums[name], value)
            for name, value in totals.examples.items():
                np.copyto(snapshot.totals.examples[name], value)
            np.copyto(snapshot.totals.tokens, totals.tokens)
            np.copyto(snapshot.done, done)
        snapshot.totals.loss_sum, snapshot.totals.loss_tokens = totals.loss_sum, totals.loss_tokens
        snapshot.added = added
        return snapshot

    def submit(self, snapshot: _Snapshot) -> None:
        with self.changed:
            self.raise_error()
            now = time.perf_counter()
            for times in snapshot.added:
                times[1] = times[1] or now
            self.waiting = snapshot
            self.changed.notify_all()

    def wait(self) -> None:
        """Until every submitted snapshot is on disk; raises the thread's error, if any."""
        with self.changed:
            while (self.waiting or self.writing) and self.error is None:
                self.changed.wait()
            self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        """Stop the thread after the snapshot it is writing (a waiting one is dropped: close
        follows `wait` on every path that keeps results)."""
        with self.changed:
            self.closed, self.waiting = True, None
            self.changed.notify_all()
        self.thread.join()

    def _loop(self) -> None:
        while True:
            with self.changed:
                while self.waiting is None and not self.closed:
                    self.changed.wait()
                if self.closed:
                    return
                snapshot = self.writing = self.waiting
                self.waiting = None
            started = time.perf_counter()
            try:
                self.store.checkpoint(snapshot.totals, snapshot.done)
            except BaseException as err:  # raised in the reducer's thread; the shards stay unsaved
                with self.changed:
                    self.error, self.writing = err, None
                    self.spare, self.unwritten = snapshot, self.unwritten + snapshot.added
                    self.changed.notify_all()
                continue
            finished = time.perf_counter()
            with self.changed:
                self.saved, self.writing, self.spare = int(snapshot.done.sum()), None, snapshot
                self.count += 1
                self.write_seconds += finished - started
                self.lags.extend(finished - added for added, _ in snapshot.added)
                self.disk_lags.extend(finished - submitted for _, submitted in snapshot.added)
                self.changed.notify_all()


class Reducer:
    """Adds shard results into the totals exactly once and checkpoints them
    with `shards_done` together (the store's redo log makes that atomic)."""

    def __init__(self, store: ResultStore, checkpoint_seconds: float = CHECKPOINT_SECONDS, progress: bool = True):
        from tqdm import tqdm

        self.store = store
        self.checkpoint_seconds = checkpoint_seconds
        self.totals, self.done = store.totals()
        self.todo = [i for i, finished in enumerate(self.done) if not finished]
        self.started = self.last_checkpoint = time.perf_counter()
        self.shard_seconds: dict[int, float] = {}
        self.load_seconds = 0.0
        self.new_tokens = 0
        self.batch_tokens = 0  # the packed batches' token budget, as the workers last reported it
        self.partials_received = 0  # duplicates (a retry's second answer) included
        self.bytes_received = 0  # the partials' arrays
        self.reduce_seconds = 0.0  # this thread's time adding and snapshotting: the head's cost per result
        self.consistent = True  # totals and shards_done agree (false only inside add)
        self.unsaved: list[float] = []  # perf_counter() at each add since the last snapshot
        self.stored = int(self.done.sum())  # shards the store held at the start
        self.writer = CheckpointWriter(store)
        self.bar = tqdm(total=len(self.done), initial=self.stored, unit="shard", disable=not progress,
                        desc="raygrad")

    @property
    def saved(self) -> int:
        """Shards the store holds."""
        return self.stored if self.writer.saved < 0 else self.writer.saved

    def add(self, result: ShardResult) -> None:
        """Commit the shards of one partial a worker sent (one shard, or several it folded), all or
        nothing: a partial holding a shard already counted (a retry's second answer) is not added at all,
        since one shard's part of a folded partial cannot be taken out; an acknowledgement (no partial)
        commits nothing."""
        shards = result.shards
        if not shards:
            return
        started = time.perf_counter()
        self.partials_received += 1
        self.bytes_received += partial_nbytes(result.partial)
        self.writer.raise_error()  # a checkpoint that failed stops the run before more is added
        counted = [shard for shard in shards if self.done[shard]]
        if counted:
            if len(counted) < len(shards):  # the scheduler queues the others again (scheduler._received)
                log.warning("a partial of shards %s holds %s, already counted: not added", sorted(shards), counted)
            return  # a shard already counted is never added twice
        # A signal landing between these lines would leave sums without their done flags
        # (or half of one partial's arrays added): until both are set, nothing is checkpointed.
        self.consistent = False
        self.totals.add(result.partial)
        self.done[list(shards)] = True
        self.consistent = True
        self.unsaved.extend([time.perf_counter()] * len(shards))
        self.shard_seconds.update(shards)
        self.load_seconds = max(self.load_seconds, result.worker_load_seconds)
        self.new_tokens += result.partial.loss_tokens
        self.batch_tokens = max(self.batch_tokens, result.batch_tokens)
        now = time.perf_counter()
        if self.done.all() or now - self.last_checkpoint >= self.checkpoint_seconds:
            self.checkpoint()
        self.reduce_seconds += time.perf_counter() - started
        if self.done.all():
            self.writer.wait()  # the last checkpoint is on disk before the run is finalized
        self.bar.update(len(shards))
        self.bar.set_postfix(tokens=self.totals.loss_tokens, tok_s=f"{self.new_tokens / (now - self.started):.0f}")

    def checkpoint(self) -> None:
        """Hand a snapshot of everything added so far to the writer thread; returns at once."""
        snapshot = self.writer.buffer(self.totals, self.done)
        snapshot.added.extend([added, None] for added in self.unsaved)
        self.unsaved = []
        self.writer.submit(snapshot)
        self.last_checkpoint = time.perf_counter()

    def keep_finished(self) -> None:
        """After a failure: let the checkpoint being written land, then checkpoint whatever finished
        since, unless the failure interrupted an add (then the last checkpoint stands: a shard is
        lost, never doubled). Raises the writer's error (OSError for a full disk)."""
        self.writer.wait()
        if self.consistent and self.done.sum() > self.saved:
            self.checkpoint()
            self.writer.wait()

    def close(self) -> None:
        self.writer.close()
        self.bar.close()

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def timing(self, plan_seconds: float, extra: dict | None = None) -> dict:
        compute_seconds = time.perf_counter() - self.started
        lags = self.writer.lags
        return {
            "plan_seconds": plan_seconds,
            "worker_load_seconds": self.load_seconds,
            "compute_seconds": compute_seconds,
            "tokens_this_session": self.new_tokens,
            # wall clock, worker start-up and model loading included
            "tokens_per_second": self.new_tokens / compute_seconds if compute_seconds > 0 else 0.0,
            # one worker while it computes shards (steady state)
            "worker_tokens_per_second": self.new_tokens / max(sum(self.shard_seconds.values()), 1e-9),
            "shard_seconds": {str(k): v for k, v in sorted(self.shard_seconds.items())},
            "resumed": len(self.todo) < len(self.done),
            **({"batch_tokens": self.batch_tokens} if self.batch_tokens else {}),
            # what the head received and what it cost it
            "partials_received": self.partials_received,
            "bytes_received": self.bytes_received,
            "reduce_seconds": self.reduce_seconds,
            "checkpoints": self.writer.count,
            "checkpoint_write_seconds": self.writer.write_seconds,
            # seconds from a shard's result being added until a checkpoint held it on disk
            # (of which from the snapshot's hand-over to the writer: the write, and any write before it)
            "checkpoint_lag_seconds": {"mean": float(np.mean(lags)) if lags else 0.0, "max": max(lags, default=0.0),
                                       "mean_writing": float(np.mean(self.writer.disk_lags)) if lags else 0.0},
            **(extra or {}),
        }


def partial_nbytes(partial: Partial) -> int:
    """Bytes of a partial's arrays: what a worker sends the head for one shard."""
    return (sum(value.nbytes for value in partial.sums.values()) + partial.tokens.nbytes
            + sum(value.nbytes for value in partial.examples.values()))
