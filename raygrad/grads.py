"""The per-batch gradient math: (model, batch, hook sites[, SAEs]) -> running sums.

No Ray, no files: the worker (a Ray actor or in-process) calls
`accumulate_batch`, and the tests check it against independent references.
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

    sums: dict[str, np.ndarray]  # e.g. grad_sum / grad_abs_sum / grad_sq_sum -> (L, width) float64
    tokens: np.ndarray  # (L,) int64, positions aggregated per layer
    loss_sum: float = 0.0  # nats, sum of cross-entropy over every target
    loss_tokens: int = 0  # targets that entered the loss

    @classmethod
    def zeros(cls, num_layers: int, widths: dict[str, int]) -> "Partial":
        return cls(
            sums={name: np.zeros((num_layers, width)) for name, width in widths.items()},
            tokens=np.zeros(num_layers, dtype=np.int64),
        )

    def add(self, other: "Partial") -> None:
        for name, total in self.sums.items():
            total += other.sums[name]
        self.tokens += other.tokens
        self.loss_sum += other.loss_sum
        self.loss_tokens += other.loss_tokens


def array_widths(prefixes: dict[str, int]) -> dict[str, int]:
    """{'grad': 576} -> {'grad_sum': 576, 'grad_abs_sum': 576, 'grad_sq_sum': 576}."""
    return {name: width for prefix, width in prefixes.items() for name in names.sum_names(prefix)}


@dataclass
class DeviceAccumulator:
    """Running float64 sums kept on the model's device, so a shard moves to
    the host once rather than once per batch."""

    num_layers: int
    prefixes: dict[str, int]  # statistic prefix -> width
    device: torch.device
    sums: dict[str, torch.Tensor] = field(init=False)
    tokens: torch.Tensor = field(init=False)
    loss_sum: torch.Tensor = field(init=False)
    loss_tokens: int = 0

    def __post_init__(self) -> None:
        self.sums = {
            name: torch.zeros((self.num_layers, width), dtype=torch.float64, device=self.device)
            for name, width in array_widths(self.prefixes).items()
        }
        self.tokens = torch.zeros(self.num_layers, dtype=torch.int64, device=self.device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, prefix: str, row: int, x: torch.Tensor) -> None:
        """Add sum, sum of |x| and sum of x^2 over the rows of x (N, width);
        reductions accumulate in float64 whatever x's dtype."""
        total, abs_total, sq_total = names.sum_names(prefix)
        self.sums[total][row] += x.sum(0, dtype=torch.float64)
        self.sums[abs_total][row] += x.abs().sum(0, dtype=torch.float64)
        self.sums[sq_total][row] += x.square().sum(0, dtype=torch.float64)

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
    outputs: list[torch.Tensor]  # per hooked module, (B, T, D) z itself (detached)
    counted: torch.Tensor  # (B, T-1) bool: positions that predict a real target


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_output(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum, not mean, of cross-entropy over real targets: a token's gradient
    then does not depend on which batch or shard it landed in.
    bf16/fp16 logits are upcast for the softmax; float64 stays float64."""
    logits = logits[:, :-1].flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def site_gradients(
    model: nn.Module, modules: list[nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> BatchGradients:
    """One forward and one backward for every hooked module at once.

    Each module's output z gets a zero tensor `delta` added in a forward hook;
    dLoss/d(delta) == dLoss/dz at every position, and the graph through z is
    untouched, so all layers' gradients come from a single backward pass that
    stops at the earliest hooked module."""
    deltas: list[torch.Tensor | None] = [None] * len(modules)
    outputs: list[torch.Tensor | None] = [None] * len(modules)

    def hook_for(row: int):
        def add_delta(module, args, output):
            hidden = _output_tensor(output)
            outputs[row] = hidden.detach()
            deltas[row] = torch.zeros_like(hidden, requires_grad=True)
            return _replace_output(output, hidden + deltas[row])

        return add_delta

    handles = [module.register_forward_hook(hook_for(row)) for row, module in enumerate(modules)]
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    labels = next_token_labels(input_ids, attention_mask)
    loss = summed_loss(logits, labels)
    grads = torch.autograd.grad(loss, deltas)
    return BatchGradients(loss.detach(), grads, outputs, labels != IGNORE_INDEX)


@dataclass(frozen=True)
class Aggregation:
    """What a worker aggregates, resolved from the plan."""

    kinds: tuple[str, ...] = ("gradients",)  # gradients / values / attribution
    exclude_bos_id: int | None = None  # leave a first position holding this token out
    position_stride: int = 1  # aggregate positions t with t % stride == 0
    sae_mode: str = "clean"
    # Tokens x features per projection chunk. 2**24 float32 values = 64 MiB
    # per (chunk, features) tensor; about five are alive at once.
    chunk_elements: int = 2**24


def aggregated_positions(counted: torch.Tensor, input_ids: torch.Tensor, agg: Aggregation) -> torch.Tensor:
    """(B, T-1) bool: positions whose statistics are added (a subset of `counted`)."""
    mask = counted.clone()
    if agg.position_stride > 1:
        positions = torch.arange(mask.shape[1], device=mask.device)
        mask &= (positions % agg.position_stride == 0)[None, :]
    if agg.exclude_bos_id is not None:
        mask[:, 0] &= input_ids[:, 0] != agg.exclude_bos_id
    return mask


def _add_kinds(acc: DeviceAccumulator, row: int, kinds: tuple[str, ...], value, grad) -> None:
    """gradients: dLoss/dx; values: x; attribution: x * dLoss/dx (rows are positions)."""
    for kind in kinds:
        x = grad if kind == "gradients" else value if kind == "values" else value * grad
        acc.add(names.KIND_PREFIX[kind], row, x)


def accumulate_batch(
    model: nn.Module,
    modules: list[nn.Module],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    acc: DeviceAccumulator,
    agg: Aggregation = Aggregation(),
    saes: list[nn.Module] | None = None,
) -> None:
    """Add one batch's statistics to `acc`: of the hook sites' own dimensions
    (no `saes`), or of SAE features (one SAE per hooked module)."""
    if saes is not None and agg.sae_mode == "splice":
        _accumulate_spliced(model, modules, input_ids, attention_mask, acc, agg, saes)
        return
    batch = site_gradients(model, modules, input_ids, attention_mask)
    mask = aggregated_positions(batch.counted, input_ids, agg)
    with torch.no_grad():
        acc.loss_sum += batch.loss.double()
        acc.loss_tokens += int(batch.counted.sum())
        acc.tokens += int(mask.sum())
        for row, (grad, z) in enumerate(zip(batch.grads, batch.outputs)):
            g, value = grad[:, :-1][mask], z[:, :-1][mask]  # (N, D)
            if saes is None:
                _add_kinds(acc, row, agg.kinds, value, g)
            else:
                acc.add(names.SITE_PREFIX, row, g)
                _add_clean_features(acc, row, agg, saes[row], value, g)


def _add_clean_features(acc, row, agg: Aggregation, sae, z: torch.Tensor, g: torch.Tensor) -> None:
    """Clean mode: the model is unmodified and the SAE error e = z - decode(encode(z))
    is held constant, so dLoss/df = J_decode(f)^T dLoss/dz (= W_dec @ g for an
    affine decoder; input normalization is folded in by differentiating the
    SAE's own decode). Chunked over tokens so tokens x features stays bounded."""
    step = max(1, agg.chunk_elements // sae.d_sae)
    for start in range(0, z.shape[0], step):
        f = sae.encode(z[start:start + step]).detach()  # the SAE casts z to its own dtype
        with torch.enable_grad():
            leaf = f.requires_grad_(True)
            (g_f,) = torch.autograd.grad(sae.decode(leaf), leaf, grad_outputs=g[start:start + step].to(f.dtype))
        _add_kinds(acc, row, agg.kinds, f.detach(), g_f)


def _accumulate_spliced(model, modules, input_ids, attention_mask, acc, agg: Aggregation, saes) -> None:
    """Splice mode (the original SAE script): for each layer in turn, its output
    is replaced by the SAE reconstruction decode(f), f = encode(z) made a leaf,
    and dLoss/df is taken in that spliced model: one forward+backward per layer."""
    labels = next_token_labels(input_ids, attention_mask)
    counted = labels != IGNORE_INDEX
    mask = aggregated_positions(counted, input_ids, agg)
    with torch.no_grad():  # the unmodified model's loss, for the run's mean loss
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        acc.loss_sum += summed_loss(logits, labels).double()
        acc.loss_tokens += int(counted.sum())
        acc.tokens += int(mask.sum())
    for row, (module, sae) in enumerate(zip(modules, saes)):
        leaf = {}

        def splice(mod, args, output, sae=sae):
            hidden = _output_tensor(output)
            leaf["f"] = sae.encode(hidden.detach()).detach().requires_grad_(True)
            return _replace_output(output, sae.decode(leaf["f"]).to(hidden.dtype))

        handle = module.register_forward_hook(splice)
        try:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            handle.remove()
        (g_f,) = torch.autograd.grad(summed_loss(logits, labels), leaf["f"])
        with torch.no_grad():
            _add_kinds(acc, row, agg.kinds, leaf["f"].detach()[:, :-1][mask], g_f[:, :-1][mask])
