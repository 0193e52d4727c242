"""Partial: the sums over some tokens that a shard, a worker or a whole run adds up, in numpy
(float64); ShardResult: a shard's Partial as its worker sends it back. Their own module, so that
reading and merging results (the store, the reducer, the command line's read commands) and a Ray
actor's shell never import torch."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import constants as names
from . import topk


@dataclass
class Partial:
    """Sums over some tokens, mergeable by addition (float64, exact order-free
    up to float64 rounding). Rows follow the plan's layer order."""

    sums: dict[str, np.ndarray]  # e.g. grad_sum / grad_abs_sum / grad_sq_sum -> (L, width) float64;
    #                              per-layer scalars (constants.LAYER_SUMS) -> (L,) float64
    tokens: np.ndarray  # (L,) int64, positions aggregated per layer
    loss_sum: float = 0.0  # nats, sum of cross-entropy over every target
    loss_tokens: int = 0  # targets that entered the loss

    @classmethod
    def zeros(cls, num_layers: int, widths: dict[str, int]) -> "Partial":
        return cls(
            sums={name: np.zeros((num_layers, width)) for name, width in widths.items()},
            tokens=np.zeros(num_layers, dtype=np.int64),
        )

    # --top-examples: per ranked prefix, topk.array_names(prefix) -> (L, width, K) tables (score, row,
    # position), merged by the exact top-K rule (raygrad.store.topk), not added
    examples: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, other: "Partial") -> None:
        for name, total in self.sums.items():
            total += other.sums[name]
        self.tokens += other.tokens
        self.loss_sum += other.loss_sum
        self.loss_tokens += other.loss_tokens
        if self.examples:  # in place: these totals' own arrays (a worker's running partial, the reducer's)
            topk.merge_named_into(self.examples, other.examples)


def array_widths(prefixes: dict[str, int]) -> dict[str, int]:
    """{'grad': 576} -> {'grad_sum': 576, 'grad_abs_sum': 576, 'grad_sq_sum': 576}."""
    return {name: width for prefix, width in prefixes.items() for name in names.sum_names(prefix)}


@dataclass
class ShardResult:
    """What a worker's call answers. In-process, and on Ray when a worker sends at once: `shard` and its
    partial. On Ray a worker folds consecutive shards into one running partial (compute/folding.py):
    a call whose shard it folded and kept answers `partial` None (an acknowledgement, its id only), and
    the call that sends answers the partial of every shard in `folded`."""

    shard: int | None  # the shard this call computed (None: a call that only sends what its worker folded)
    partial: Partial | None  # None: nothing sent (the shard is folded on its worker, not yet sent)
    seconds: float  # wall time of the shard on its worker
    worker_load_seconds: float  # how long this worker took to load its model
    batch_tokens: int = 0  # the token budget per batch at the end of the shard (0: fixed text counts)
    read_seconds: float = 0.0  # reading, filtering and tokenizing its rows (overlaps the previous shard on Ray)
    folded: dict[int, float] = field(default_factory=dict)  # shard -> its seconds, every shard `partial` holds
    #                                                          (empty: `shard` alone)

    @property
    def shards(self) -> dict[int, float]:
        """shard -> seconds on its worker, for every shard whose sums `partial` holds (none when None)."""
        if self.partial is None:
            return {}
        return self.folded or {self.shard: self.seconds}
