"""ShardFold: a worker's consecutive shards folded into one running partial, sent when the head asks.

A Ray worker that sent every shard's partial would cost the head one transfer and one merge per shard
(hundreds of MB and seconds of CPU each with top-K tables of 26 x 65,536 SAE features), so the head's
load would grow with the shard count. Instead each computed shard is added into the worker's running
partial by the partial's own `add` (for a Partial: float64 sums added, top-K tables merged by the exact
rule of store/topk.py, the reducer's own merge, so the tables are those of a run that sent every shard)
and the call answers only the shard's id. A call that the head marks `send` answers the running partial
with the ids of every shard in it, and the fold starts again. When to send is the head's decision
(cluster/scheduler.py SendPolicy): it paces the sends so that taking them costs it a bounded share of
its time, whatever the number of workers or shards.

`fold` names the running partial the head knows of: a call carrying another one (the head gave up the
shards this worker held, after losing touch with it, and queued them again) drops what was folded, so
no shard is sent twice. Generic over the partial: anything with `add(other)` in place (ablate's
partials, the simulation's stand-ins)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..store.partial import ShardResult


@dataclass(frozen=True)
class SendOrder:
    """The head's word on a call: which running partial it extends, and whether to send it after."""

    fold: int  # the head's number for this worker's running partial
    send: bool  # send everything folded once this call's shard (if any) is in


class ShardFold:
    """One worker's running partial and the shards in it (shard -> seconds on this worker)."""

    def __init__(self):
        self.fold: int | None = None
        self.partial = None
        self.shards: dict[int, float] = {}

    def take(self, result: ShardResult | None, order: SendOrder) -> ShardResult | None:
        """Fold `result` (a computed shard; None for a call that only sends) -> what the call answers: an
        acknowledgement (partial None), or the running partial with every shard in it. The first shard's
        partial becomes the running one (it is this worker's own, written in place from then on)."""
        if order.fold != self.fold:  # the head gave up what was folded under another number
            self.fold, self.partial, self.shards = order.fold, None, {}
        if result is not None:
            if self.partial is None:
                self.partial = result.partial
            else:
                self.partial.add(result.partial)
            self.shards[result.shard] = result.seconds
        if not order.send:
            return ShardResult(None, None, 0.0, 0.0) if result is None else replace(result, partial=None, folded={})
        sent, folded = self.partial, self.shards
        self.partial, self.shards = None, {}
        if result is None:
            return ShardResult(None, sent, 0.0, 0.0, folded=folded)
        return replace(result, partial=sent, folded=folded)

    def absorb(self, other: ShardResult, order: SendOrder) -> None:
        """Fold another worker's sent partial (`other`: what its call that sends answered) into this one's
        running partial, its shards with it: the end of a run's tree reduction (cluster/scheduler.py), so the
        head takes one partial, not one per worker. Sums add and top-K tables merge by the same exact rule
        as a shard's, so the tables do not depend on which worker absorbed which."""
        if order.fold != self.fold:
            self.fold, self.partial, self.shards = order.fold, None, {}
        overlap = self.shards.keys() & other.shards.keys()
        if overlap:  # the head moves a sent partial's shards to one worker only
            raise RuntimeError(f"internal error: asked to absorb shards {sorted(overlap)}, already folded here")
        if other.partial is None:
            return
        if self.partial is None:
            self.partial = other.partial
        else:
            self.partial.add(other.partial)
        self.shards.update(other.shards)
