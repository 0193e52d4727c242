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
        if self.examples:
            self.examples.update(topk.merge_named(self.examples, other.examples))


def array_widths(prefixes: dict[str, int]) -> dict[str, int]:
    """{'grad': 576} -> {'grad_sum': 576, 'grad_abs_sum': 576, 'grad_sq_sum': 576}."""
    return {name: width for prefix, width in prefixes.items() for name in names.sum_names(prefix)}


@dataclass
class ShardResult:
    shard: int
    partial: Partial
    seconds: float  # wall time of the shard on its worker
    worker_load_seconds: float  # how long this worker took to load its model
    batch_tokens: int = 0  # the token budget per batch at the end of the shard (0: fixed text counts)
    read_seconds: float = 0.0  # reading, filtering and tokenizing its rows (overlaps the previous shard on Ray)
