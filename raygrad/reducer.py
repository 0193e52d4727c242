"""The reduce loop's state and policies: running totals, which shards are in,
when to checkpoint, the progress bar and the timing record."""

from __future__ import annotations

import time

from .store import ResultStore
from .worker import ShardResult

CHECKPOINT_SECONDS = 30.0  # between checkpoints; the last shard always checkpoints


class Reducer:
    """Adds shard results into the totals exactly once and checkpoints them
    with `shards_done` together (the store's redo log makes that atomic)."""

    def __init__(self, store: ResultStore, checkpoint_seconds: float = CHECKPOINT_SECONDS, progress: bool = True):
        from tqdm import tqdm

        self.store = store
        self.checkpoint_seconds = checkpoint_seconds
        self.totals, self.done = store.totals()
        self.todo = [i for i, finished in enumerate(self.done) if not finished]
        self.saved = int(self.done.sum())  # shards the store holds
        self.started = self.last_checkpoint = time.perf_counter()
        self.shard_seconds: dict[int, float] = {}
        self.load_seconds = 0.0
        self.new_tokens = 0
        self.batch_tokens = 0  # the packed batches' token budget, as the workers last reported it
        self.consistent = True  # totals and shards_done agree (false only inside add)
        self.bar = tqdm(total=len(self.done), initial=self.saved, unit="shard", disable=not progress,
                        desc="raygrad")

    def add(self, result: ShardResult) -> None:
        if self.done[result.shard]:
            return  # a shard already counted (a retry's second answer) is never added twice
        # A signal landing between these lines would leave sums without their done flag
        # (or half of one shard's arrays added): until both are set, nothing is checkpointed.
        self.consistent = False
        self.totals.add(result.partial)
        self.done[result.shard] = True
        self.consistent = True
        self.shard_seconds[result.shard] = result.seconds
        self.load_seconds = max(self.load_seconds, result.worker_load_seconds)
        self.new_tokens += result.partial.loss_tokens
        self.batch_tokens = max(self.batch_tokens, result.batch_tokens)
        now = time.perf_counter()
        if self.done.all() or now - self.last_checkpoint >= self.checkpoint_seconds:
            self.checkpoint()
        self.bar.update(1)
        self.bar.set_postfix(tokens=self.totals.loss_tokens, tok_s=f"{self.new_tokens / (now - self.started):.0f}")

    def checkpoint(self) -> None:
        self.store.checkpoint(self.totals, self.done)
        self.saved, self.last_checkpoint = int(self.done.sum()), time.perf_counter()

    def keep_finished(self) -> None:
        """After a failure: checkpoint whatever finished since the last checkpoint, unless the
        failure interrupted an add (then the last checkpoint stands: a shard is lost, never doubled)."""
        if self.consistent and self.done.sum() > self.saved:
            self.checkpoint()

    def close(self) -> None:
        self.bar.close()

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def timing(self, plan_seconds: float, extra: dict | None = None) -> dict:
        compute_seconds = time.perf_counter() - self.started
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
            **(extra or {}),
        }
