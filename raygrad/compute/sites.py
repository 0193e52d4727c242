"""The loss and its gradient at the hook sites: summed_loss (cross-entropy summed over real targets,
in checkpointed chunks), site_gradients (one forward and one backward for every hooked module) and
BatchGradients, and the forward hooks' output helpers (output_tensor, replace_output)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .batch import IGNORE_INDEX, next_token_labels


@dataclass
class BatchGradients:
    loss: torch.Tensor  # scalar float64, nats: sum of cross-entropy over real targets
    grads: tuple[torch.Tensor, ...]  # per hooked module, (B, T, D) dLoss/dz
    outputs: list[torch.Tensor]  # per hooked module, (B, T, D) z itself (detached)
    deltas: list[torch.Tensor] | None = None  # the zero leaves added to z (kept for a second derivative)


def output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def replace_output(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


# Positions x vocabulary per cross-entropy chunk: 2**26 float32 values = 256 MiB,
# whatever the batch (Gemma's 256k vocabulary x 4k tokens would be 4 GiB at once).
LOSS_CHUNK_ELEMENTS = 2**26


def _chunk_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 logits are widened for the softmax; float64 stays float64.
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(wide, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> torch.Tensor:
    """Sum, not mean, of cross-entropy over real targets (float64 scalar): a
    token's gradient then does not depend on which batch or shard it landed in.

    `labels` has the logits' (B, T) shape, IGNORE_INDEX where there is no
    target. The widened logits exist one chunk of positions at a time: each
    chunk is recomputed in the backward pass (activation checkpointing) rather
    than kept, so loss memory does not grow with batch x length x vocabulary."""
    # views: (B*T, V), (B*T,); a model split across GPUs ends on another device than it starts
    logits, labels = logits.flatten(0, 1), labels.to(logits.device, non_blocking=True).flatten()
    step = max(1, chunk_elements // logits.shape[-1])
    if logits.shape[0] <= step:
        return _chunk_cross_entropy(logits, labels).double()
    chunks = []
    for start in range(0, logits.shape[0], step):
        piece, targets = logits[start:start + step], labels[start:start + step]
        if piece.requires_grad:
            chunks.append(checkpoint(_chunk_cross_entropy, piece, targets, use_reentrant=False))
        else:
            chunks.append(_chunk_cross_entropy(piece, targets))
    return torch.stack(chunks).double().sum()


@contextlib.contextmanager
def delta_hooks(modules: list[nn.Module]):
    """-> (outputs, deltas), filled by the forward run inside: each module's output z (detached) and the
    zero tensor `delta` added to it, whose gradient is dLoss/dz. The hooks are removed on leaving."""
    deltas: list[torch.Tensor | None] = [None] * len(modules)
    outputs: list[torch.Tensor | None] = [None] * len(modules)

    def hook_for(row: int):
        def add_delta(module, args, output):
            hidden = output_tensor(output)
            outputs[row] = hidden.detach()
            deltas[row] = torch.zeros_like(hidden, requires_grad=True)
            return replace_output(output, hidden + deltas[row])

        return add_delta

    handles = [module.register_forward_hook(hook_for(row)) for row, module in enumerate(modules)]
    try:
        yield outputs, deltas
    finally:
        for handle in handles:
            handle.remove()


def site_gradients(
    model: nn.Module, modules: list[nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None = None, create_graph: bool = False,
) -> BatchGradients:
    """One forward and one backward for every hooked module at once.

    Each module's output z gets a zero tensor `delta` added in a forward hook;
    dLoss/d(delta) == dLoss/dz at every position, and the graph through z is
    untouched, so all layers' gradients come from a single backward pass that
    stops at the earliest hooked module. `labels` (B, T) default to the next
    tokens of `input_ids` under `attention_mask`.

    `create_graph`: the gradients keep their graph (and `deltas` are returned)
    so that second derivatives can be taken. The fused attention kernels have
    no double backward (CPU flash attention, CUDA flash / memory-efficient), so
    the forward then runs PyTorch's math attention: the same function, more memory."""
    if labels is None:
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, :-1] = next_token_labels(input_ids, attention_mask)
    with delta_hooks(modules) as (outputs, deltas):
        with sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    loss = summed_loss(logits, labels)
    del logits  # the loss chunks keep what the backward needs
    grads = torch.autograd.grad(loss, deltas, create_graph=create_graph)
    return BatchGradients(loss.detach(), grads, outputs, deltas if create_graph else None)
