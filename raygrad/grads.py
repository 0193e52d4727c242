"""The per-batch gradient math: (model, batch, hook sites) -> Partial.

No Ray, no files: the worker actor and the in-process mode both call
`batch_partial`, and the tests check it against an independent reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import constants as names

IGNORE_INDEX = -100  # label of positions that have no real target


@dataclass
class Partial:
    """Sums over some tokens, mergeable by addition (float64, exact order-free
    up to float64 rounding). Rows follow the plan's layer order."""

    sums: dict[str, np.ndarray]  # GRAD_SUM / GRAD_ABS_SUM / GRAD_SQ_SUM -> (L, D) float64
    tokens: np.ndarray  # (L,) int64, positions aggregated per layer
    loss_sum: float = 0.0  # nats, sum of cross-entropy over every target
    loss_tokens: int = 0  # targets that entered the loss

    @classmethod
    def zeros(cls, num_layers: int, width: int) -> "Partial":
        return cls(
            sums={name: np.zeros((num_layers, width)) for name in names.SUM_ARRAYS},
            tokens=np.zeros(num_layers, dtype=np.int64),
        )

    def add(self, other: "Partial") -> None:
        for name, total in self.sums.items():
            total += other.sums[name]
        self.tokens += other.tokens
        self.loss_sum += other.loss_sum
        self.loss_tokens += other.loss_tokens


@dataclass
class DeviceAccumulator:
    """Running float64 sums kept on the model's device, so a shard moves to
    the host once rather than once per batch."""

    num_layers: int
    width: int
    device: torch.device
    sums: dict[str, torch.Tensor] = field(init=False)
    tokens: torch.Tensor = field(init=False)
    loss_sum: torch.Tensor = field(init=False)
    loss_tokens: int = 0

    def __post_init__(self) -> None:
        shape = (self.num_layers, self.width)
        self.sums = {name: torch.zeros(shape, dtype=torch.float64, device=self.device) for name in names.SUM_ARRAYS}
        self.tokens = torch.zeros(self.num_layers, dtype=torch.int64, device=self.device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)

    def to_partial(self) -> Partial:
        return Partial(
            sums={name: total.cpu().numpy() for name, total in self.sums.items()},
            tokens=self.tokens.cpu().numpy(),
            loss_sum=float(self.loss_sum),
            loss_tokens=self.loss_tokens,
        )


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """labels[b, t] = the token at t+1, or IGNORE_INDEX where t+1 is padding.

    Shape (B, T-1): position T-1 predicts nothing."""
    labels = input_ids[:, 1:].clone()
    labels[attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return labels


@dataclass
class BatchGradients:
    loss: torch.Tensor  # scalar, nats: sum of cross-entropy over real targets
    grads: tuple[torch.Tensor, ...]  # per hooked module, (B, T, D) dLoss/dz
    counted: torch.Tensor  # (B, T-1) bool: positions that predict a real target


def site_gradients(
    model: nn.Module, modules: list[nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> BatchGradients:
    """One forward and one backward for every hooked module at once.

    Each module's output z gets a zero tensor `delta` added in a forward hook;
    dLoss/d(delta) == dLoss/dz at every position, and the graph through z is
    untouched, so all layers' gradients come from a single backward pass that
    stops at the earliest hooked module."""
    deltas: list[torch.Tensor | None] = [None] * len(modules)

    def hook_for(row: int):
        def add_delta(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            delta = torch.zeros_like(hidden, requires_grad=True)
            deltas[row] = delta
            hidden = hidden + delta
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return add_delta

    handles = [module.register_forward_hook(hook_for(row)) for row, module in enumerate(modules)]
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()

    labels = next_token_labels(input_ids, attention_mask)
    # Sum, not mean, over real targets: a token's gradient then does not
    # depend on which batch or shard it landed in.
    # bf16/fp16 logits are upcast for the softmax; float64 stays float64.
    logits = logits[:, :-1].flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    grads = torch.autograd.grad(loss, deltas)
    return BatchGradients(loss.detach(), grads, labels != IGNORE_INDEX)


def accumulate_batch(
    model: nn.Module,
    modules: list[nn.Module],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    acc: DeviceAccumulator,
    exclude_bos_id: int | None = None,
) -> None:
    """Add one batch's gradient sums to `acc`.

    With `exclude_bos_id`, a first position holding that token is left out of
    the aggregation (attention-sink positions can dominate); it stays in the loss."""
    batch = site_gradients(model, modules, input_ids, attention_mask)
    aggregated = batch.counted.clone()
    if exclude_bos_id is not None:
        aggregated[:, 0] &= input_ids[:, 0] != exclude_bos_id
    with torch.no_grad():
        acc.loss_sum += batch.loss.double()
        acc.loss_tokens += int(batch.counted.sum())
        for row, grad in enumerate(batch.grads):
            g = grad[:, :-1][aggregated].double()  # (N, D)
            acc.sums[names.GRAD_SUM][row] += g.sum(0)
            acc.sums[names.GRAD_ABS_SUM][row] += g.abs().sum(0)
            acc.sums[names.GRAD_SQ_SUM][row] += g.square().sum(0)
            acc.tokens[row] += g.shape[0]
