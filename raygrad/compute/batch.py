"""One batch and what is aggregated of it, worked out on the host: Aggregation (what a worker aggregates,
from the plan), the next-token labels, the aggregated positions, Batch, make_batch, and selected_rows
(a (B, T, D) tensor at those positions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # label of positions that have no real target


@dataclass(frozen=True)
class Aggregation:
    """What a worker aggregates, resolved from the plan."""

    kinds: tuple[str, ...] = ("gradients",)  # gradients / values / attribution / hessian
    exclude_bos_id: int | None = None  # leave a first position holding this token out
    position_stride: int = 1  # aggregate positions t with t % stride == 0
    sae_mode: str = "clean"
    hessian_probes: int = 1  # Rademacher probes per token (hessian kind); the per-token estimate is their mean
    probe_seed: int = 0  # the run's --seed: with (row, layer, probe, position) it keys every probe entry
    # Tokens x features per projection chunk. 2**24 float32 values = 64 MiB
    # per (chunk, features) tensor; about five are alive at once.
    chunk_elements: int = 2**24

    @property
    def hessian(self) -> bool:
        return "hessian" in self.kinds

    @property
    def needs_values(self) -> bool:
        return "values" in self.kinds or "attribution" in self.kinds

    def chunks(self, rows: int, width: int) -> list[slice]:
        """Row ranges of at most chunk_elements // width rows each."""
        step = max(1, self.chunk_elements // width)
        return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def aggregated_positions(counted: torch.Tensor, input_ids: torch.Tensor, agg: Aggregation) -> torch.Tensor:
    """(B, T-1) bool: positions whose statistics are added (a subset of `counted`)."""
    mask = counted.clone()
    if agg.position_stride > 1:
        positions = torch.arange(mask.shape[1], device=mask.device)
        mask &= (positions % agg.position_stride == 0)[None, :]
    if agg.exclude_bos_id is not None:
        mask[:, 0] &= input_ids[:, 0] != agg.exclude_bos_id
    return mask


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """labels[b, t] = the token at t+1, or IGNORE_INDEX where t+1 is padding.

    Shape (B, T-1): position T-1 predicts nothing."""
    labels = input_ids[:, 1:].clone()
    labels[attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return labels


@dataclass
class Batch:
    """One batch, with everything the hot loop needs worked out on the host
    from the attention mask: the device never has to report a count or a
    mask back, so nothing in a batch waits for it."""

    input_ids: torch.Tensor  # (B, T) int64, right-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): the next token, IGNORE_INDEX at padding and at t = T-1
    selected: torch.Tensor  # (N,) int64 indices into the flattened (B*T) positions that are aggregated
    targets: int  # positions that predict a real target (enter the loss)
    has_padding: bool = True
    # Per aggregated position (N,): the dataset row of its text and its token position there.
    # Host arrays; they key the Hutchinson probes (raygrad.compute.probes) by what is computed.
    token_rows: np.ndarray | None = None
    token_positions: np.ndarray | None = None

    @property
    def model_mask(self) -> torch.Tensor | None:
        """The attention mask to give the model: None when nothing is padded,
        which is the same attention, and spares transformers the checks of the
        mask that wait for the device (one or two per forward)."""
        return self.attention_mask if self.has_padding else None

    @property
    def aggregated(self) -> int:
        return self.selected.numel()

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> "Batch":
        if device.type == "cpu":
            return self
        # Pinned host memory lets the copy overlap with the previous batch's kernels.
        move = {name: getattr(self, name).pin_memory().to(device, non_blocking=True)
                for name in ("input_ids", "attention_mask", "labels", "selected")}
        return Batch(**move, targets=self.targets, has_padding=self.has_padding, token_rows=self.token_rows,
                     token_positions=self.token_positions)


def make_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, agg: "Aggregation",
               rows: list[int] | None = None, context: list[int] | None = None) -> Batch:
    """A host-side Batch from right-padded ids and their mask; `rows` (B,) are the texts' dataset
    rows (default 0..B-1), which key the Hessian's probes. `context` (B,), with --completion-column:
    each text's leading prompt tokens, whose prediction is not a target (label IGNORE_INDEX), so the
    loss, its gradient and every aggregated position cover the completion's tokens only."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = next_token_labels(input_ids, attention_mask)
    if context is not None:
        # position t predicts token t + 1: a target only when that token is the completion's
        predicted = torch.arange(1, input_ids.shape[1] + 1)[None, :]
        labels[predicted < torch.as_tensor(context, dtype=torch.long)[:, None]] = IGNORE_INDEX
    counted = labels != IGNORE_INDEX
    mask = aggregated_positions(counted[:, :-1], input_ids, agg)
    flat = torch.zeros_like(counted)
    flat[:, :-1] = mask
    selected = flat.flatten().nonzero().squeeze(1).numpy()
    text_rows = np.arange(input_ids.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    width = input_ids.shape[1]
    token_rows, token_positions = text_rows[selected // width], selected % width
    # In (dataset row, position) order, whatever the order of the texts in the batch: --top-examples
    # breaks ties between equal scores by that order (raygrad.store.topk); sums do not depend on it.
    order = np.lexsort((token_positions, token_rows))
    return Batch(input_ids, attention_mask, labels, torch.from_numpy(selected[order]), int(counted.sum()),
                 has_padding=bool((attention_mask == 0).any()), token_rows=token_rows[order],
                 token_positions=token_positions[order])


def selected_rows(x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (N, D): the selected flattened positions (no host sync: the
    indices are already on the device)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, selected.to(x.device, non_blocking=True))
