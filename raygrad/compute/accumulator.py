"""Running sums on the device: DeviceAccumulator (float64 sums, host counts, the loss, the top-K candidates
of --top-examples) and add_kinds, which adds the gradients / values / attribution statistics of one layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import constants as names
from ..store import topk
from ..store.partial import Partial, array_widths

if TYPE_CHECKING:
    from .batch import Batch

MERGED_SHARE = 0.5  # above this share of a layer's dimensions with candidates, merging them all beats gathering
# Where a chunk's ranking skips what cannot enter. It reads two counts back from the device per chunk
# (how many pass, and where): free on a CPU, a wait for the queue on a GPU, where ranking every entry is
# sync-free (benchmarks/gpu.py's smollm2-135m-bf16-sae16k-attr pair is the case to try it on).
SKIPPING_DEVICES = ("cpu",)


@dataclass
class DeviceAccumulator:
    """Running float64 sums kept on the model's device, so a shard moves to
    the host once rather than once per batch. Counts are host integers: they
    are known from the host-side attention mask, so reading them never waits
    for the device."""

    num_layers: int
    prefixes: dict[str, int]  # statistic prefix -> width
    device: torch.device
    layer_sums: tuple[str, ...] = ()  # per-layer scalar totals (constants.LAYER_SUMS), (L,) each
    top_k: int = 0  # --top-examples: the best K tokens per dimension of each ranked kind (raygrad.store.topk)
    score_dtype: torch.dtype = torch.float32  # of those examples' scores (float64 in a float64 run)
    sums: dict[str, torch.Tensor] = field(init=False)
    tokens: np.ndarray = field(init=False)  # (L,) positions aggregated per layer
    loss_sum: torch.Tensor = field(init=False)  # nats, float64 on the device
    loss_tokens: int = 0

    def __post_init__(self) -> None:
        self.sums = {
            name: torch.zeros((self.num_layers, width), dtype=torch.float64, device=self.device)
            for name, width in array_widths(self.prefixes).items()
        }
        for name in self.layer_sums:
            self.sums[name] = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        self.tokens = np.zeros(self.num_layers, dtype=np.int64)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        ranked = [prefix for prefix in topk.RANKED_PREFIXES if prefix in self.prefixes] if self.top_k else []
        # prefix -> {score, row, position} (L, width, K), best first
        self.examples = {prefix: topk.empty_tensors(self.num_layers, self.prefixes[prefix], self.top_k,
                                                        self.score_dtype, self.device) for prefix in ranked}
        # The batch being added: (prefix, layer row) -> its best rows so far, (score, index) (width, <=K)
        # each, index into the batch's aggregated positions; resolved to (row, position) by `merge`.
        self.pending: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.token_rows: torch.Tensor | None = None  # (N,) the batch's dataset row per aggregated position
        self.token_positions: torch.Tensor | None = None  # (N,) and its token position
        self.ranked = False  # whether the tables hold any batch yet
        # prefix -> (L, width) |score| of each K-th best in the tables a staged batch is merged into (0: a
        # slot still empty): what a token must reach to enter (topk.batch_top_above); None: not known
        self.floors: dict[str, torch.Tensor] | None = None

    def empty_like(self) -> "DeviceAccumulator":
        """Empty sums for a batch merged into this one later; its ranking skips what cannot enter these tables."""
        staged = DeviceAccumulator(self.num_layers, self.prefixes, self.device, self.layer_sums, self.top_k,
                                   self.score_dtype)
        if self.ranked:
            staged.floors = {prefix: tables["score"][..., -1].abs() for prefix, tables in self.examples.items()}
        return staged

    def begin_batch(self, batch: "Batch") -> None:
        """The batch whose rows the next `add`s rank (only --top-examples reads them)."""
        if self.examples:
            self.token_rows = torch.from_numpy(batch.token_rows).to(self.device, non_blocking=True)
            self.token_positions = torch.from_numpy(batch.token_positions).to(self.device, non_blocking=True)

    def add_scalar(self, name: str, row: int, value: torch.Tensor) -> None:
        """Add a 0-d tensor to one layer's scalar total (kept on the device)."""
        self.sums[name][row] += value.to(self.device, torch.float64, non_blocking=True)

    def add(self, prefix: str, row: int, x: torch.Tensor, start: int = 0) -> None:
        """Add sum, sum of |x| and sum of x^2 over the rows of x (N, width); with --top-examples, rank
        them too (x's rows are the batch's aggregated positions from `start` on).

        Each reduction reads x once and accumulates in float32 or wider (a
        float16 square underflows below 6e-8 and overflows above 65504; on a
        GPU a half-precision x is widened inside the kernel, not copied); the
        batch's result is then added to the float64 running total."""
        wide = torch.promote_types(x.dtype, torch.float32)
        total, abs_total, sq_total = names.sum_names(prefix)
        # .to(): a model split across GPUs computes x on its layer's device.
        self.sums[total][row] += x.sum(0, dtype=wide).to(self.device, non_blocking=True)
        self.sums[abs_total][row] += torch.linalg.vector_norm(x, 1, dim=0, dtype=wide).to(self.device,
                                                                                         non_blocking=True)
        self.sums[sq_total][row] += torch.linalg.vector_norm(x, 2, dim=0, dtype=wide).square().to(
            self.device, non_blocking=True)
        if prefix in self.examples:
            self._rank(prefix, row, x, start)

    def _rank(self, prefix: str, row: int, x: torch.Tensor, start: int) -> None:
        """Keep, per dimension, the batch's best K rows seen so far (the merge across batches, which
        needs the rows' dataset order, happens once per batch in `merge`). Once the tables, or this
        batch's earlier rows, hold K examples of a dimension, only its tokens that reach the K-th are ranked."""
        floor = self._floor(prefix, row, x) if x.device.type in SKIPPING_DEVICES else None
        found = None if floor is None else topk.batch_top_above(x, floor, self.top_k)
        if found is None:  # rank every entry
            index = topk.batch_top(x, self.top_k)  # (k', width) rows of x
            score, index = x.gather(0, index).T, index.T
        else:
            score, index = found
        score = score.to(self.device, self.score_dtype, non_blocking=True)
        index = index.to(self.device, non_blocking=True) + start
        if (prefix, row) in self.pending:
            score, index = topk.best_in_batch(*self.pending[prefix, row], score, index, self.top_k)
        self.pending[prefix, row] = score, index

    def _floor(self, prefix: str, row: int, x: torch.Tensor) -> torch.Tensor | None:
        """(width,) the |score| a token of the chunk x must reach to enter `prefix`'s tables at `row`: the
        highest of the tables' K-th best, the batch's own K-th best so far (either 0 while not full) and a
        lower bound of x's own K-th best (topk.chunk_floor) while the tables are empty (the first batch of a
        shard: later, the tables' floor is about as high, and what it costs is saved)."""
        floors = [self.floors[prefix][row]] if self.floors is not None else []
        own = topk.chunk_floor(x, self.top_k) if self.floors is None else None
        if own is not None:
            floors.append(own.to(self.device, self.score_dtype))  # exact: x's values are exact in score_dtype
        if (prefix, row) in self.pending:
            score = self.pending[prefix, row][0]
            if score.shape[1] == self.top_k:
                floors.append(torch.where((score != 0).all(1), score.abs().amin(1), 0))
        return torch.stack(floors).amax(0) if floors else None

    def merge(self, other: "DeviceAccumulator") -> None:
        """Add a finished batch's sums (kept apart until the batch succeeded,
        so a batch retried after running out of memory is never counted twice)."""
        for name, total in self.sums.items():
            total += other.sums[name]
        self.tokens += other.tokens
        self.loss_sum += other.loss_sum
        self.loss_tokens += other.loss_tokens
        if other.ranked:  # tables of its own (a staged batch has only its pending rows)
            for prefix, tables in self.examples.items():
                tables.update(topk.merge(tables, other.examples[prefix], self.top_k))
            self.ranked = True
        other.resolve(into=self)

    def resolve(self, into: "DeviceAccumulator | None" = None) -> None:
        """The pending batch's best rows, as (score, row, position), merged into the tables (of `into`)."""
        into = self if into is None else into
        empty = not into.ranked  # no table of `into` holds anything yet
        for (prefix, row), (score, index) in self.pending.items():
            candidates = {"score": score, "row": self.token_rows[index],
                          "position": self.token_positions[index].int()}
            if empty:  # the candidates, best first already (topk.batch_top*, best_in_batch), are the tables
                slots = score.shape[1]  # <= K; the slots after them stay empty
                real = score != 0  # a zero is no example
                for name, value in candidates.items():
                    into.examples[prefix][name][row, :, :slots] = torch.where(real, value, topk.FILL[name])
            else:
                into._merge_at(prefix, row, candidates)
        into.ranked = into.ranked or bool(self.pending)
        self.pending.clear()

    def _merge_at(self, prefix: str, rows, candidates: dict[str, torch.Tensor]) -> None:
        """Merge `candidates` into the `prefix` tables' layer rows `rows` (an int, or a tensor of them), in place."""
        tables = self.examples[prefix]
        if isinstance(rows, int) and self.device.type in SKIPPING_DEVICES:  # only the dimensions with a candidate
            offered = (candidates["score"] != 0).any(-1).nonzero().squeeze(1)
            if offered.numel() <= MERGED_SHARE * candidates["score"].shape[0]:
                merged = topk.merge({name: value[rows, offered] for name, value in tables.items()},
                                    {name: value[offered] for name, value in candidates.items()}, self.top_k)
                for name, value in merged.items():
                    tables[name][rows, offered] = value
                return
        merged = topk.merge({name: value[rows] for name, value in tables.items()}, candidates, self.top_k)
        for name, value in merged.items():
            tables[name][rows] = value

    def merge_rows(self, part: "DeviceAccumulator", rows: list[int], with_loss: bool) -> None:
        """Add the sums of a pass over some layers only (`part` row i is this row rows[i]);
        the loss is counted by one pass of a shard (`with_loss`), not by each."""
        index = torch.as_tensor(rows, device=self.device)
        for name, total in self.sums.items():
            total.index_add_(0, index, part.sums[name])
        self.tokens[rows] += part.tokens
        if with_loss:
            self.loss_sum += part.loss_sum
            self.loss_tokens += part.loss_tokens
        part.resolve()
        self.ranked = self.ranked or part.ranked
        for prefix in self.examples:
            self._merge_at(prefix, index, part.examples[prefix])

    def to_partial(self) -> Partial:
        self.resolve()
        return Partial(
            sums={name: total.cpu().numpy() for name, total in self.sums.items()},
            tokens=self.tokens.copy(),
            loss_sum=float(self.loss_sum),
            loss_tokens=self.loss_tokens,
            examples={name: tables[table].cpu().numpy() for prefix, tables in self.examples.items()
                      for name, table in zip(topk.array_names(prefix), topk.TABLES)},
        )


def add_kinds(acc: DeviceAccumulator, row: int, kinds: tuple[str, ...], value, grad, start: int = 0) -> None:
    """gradients: dLoss/dx; values: x; attribution: x * dLoss/dx (rows are the batch's aggregated positions
    from `start` on). The hessian kind is added by the Hutchinson step, not here."""
    for kind in kinds:
        if kind == "hessian":
            continue
        x = grad if kind == "gradients" else value if kind == "values" else value * grad
        acc.add(names.KIND_PREFIX[kind], row, x, start)
