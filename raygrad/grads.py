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
from torch.utils.checkpoint import checkpoint

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
    the host once rather than once per batch. Counts are host integers: they
    are known from the host-side attention mask, so reading them never waits
    for the device."""

    num_layers: int
    prefixes: dict[str, int]  # statistic prefix -> width
    device: torch.device
    sums: dict[str, torch.Tensor] = field(init=False)
    tokens: np.ndarray = field(init=False)  # (L,) positions aggregated per layer
    loss_sum: torch.Tensor = field(init=False)  # nats, float64 on the device
    loss_tokens: int = 0

    def __post_init__(self) -> None:
        self.sums = {
            name: torch.zeros((self.num_layers, width), dtype=torch.float64, device=self.device)
            for name, width in array_widths(self.prefixes).items()
        }
        self.tokens = np.zeros(self.num_layers, dtype=np.int64)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)

    def empty_like(self) -> "DeviceAccumulator":
        return DeviceAccumulator(self.num_layers, self.prefixes, self.device)

    def add(self, prefix: str, row: int, x: torch.Tensor) -> None:
        """Add sum, sum of |x| and sum of x^2 over the rows of x (N, width).

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

    def merge(self, other: "DeviceAccumulator") -> None:
        """Add a finished batch's sums (kept apart until the batch succeeded,
        so a batch retried after running out of memory is never counted twice)."""
        for name, total in self.sums.items():
            total += other.sums[name]
        self.tokens += other.tokens
        self.loss_sum += other.loss_sum
        self.loss_tokens += other.loss_tokens

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

    def to_partial(self) -> Partial:
        return Partial(
            sums={name: total.cpu().numpy() for name, total in self.sums.items()},
            tokens=self.tokens.copy(),
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
        return Batch(**move, targets=self.targets, has_padding=self.has_padding)


def make_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, agg: "Aggregation") -> Batch:
    """A host-side Batch from right-padded ids and their mask."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = next_token_labels(input_ids, attention_mask)
    counted = labels != IGNORE_INDEX
    mask = aggregated_positions(counted[:, :-1], input_ids, agg)
    flat = torch.zeros_like(counted)
    flat[:, :-1] = mask
    return Batch(input_ids, attention_mask, labels, flat.flatten().nonzero().squeeze(1), int(counted.sum()),
                 has_padding=bool((attention_mask == 0).any()))


@dataclass
class BatchGradients:
    loss: torch.Tensor  # scalar float64, nats: sum of cross-entropy over real targets
    grads: tuple[torch.Tensor, ...]  # per hooked module, (B, T, D) dLoss/dz
    outputs: list[torch.Tensor]  # per hooked module, (B, T, D) z itself (detached)


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_output(output, hidden):
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


def site_gradients(
    model: nn.Module, modules: list[nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None = None,
) -> BatchGradients:
    """One forward and one backward for every hooked module at once.

    Each module's output z gets a zero tensor `delta` added in a forward hook;
    dLoss/d(delta) == dLoss/dz at every position, and the graph through z is
    untouched, so all layers' gradients come from a single backward pass that
    stops at the earliest hooked module. `labels` (B, T) default to the next
    tokens of `input_ids` under `attention_mask`."""
    deltas: list[torch.Tensor | None] = [None] * len(modules)
    outputs: list[torch.Tensor | None] = [None] * len(modules)

    def hook_for(row: int):
        def add_delta(module, args, output):
            hidden = _output_tensor(output)
            outputs[row] = hidden.detach()
            deltas[row] = torch.zeros_like(hidden, requires_grad=True)
            return _replace_output(output, hidden + deltas[row])

        return add_delta

    if labels is None:
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, :-1] = next_token_labels(input_ids, attention_mask)
    handles = [module.register_forward_hook(hook_for(row)) for row, module in enumerate(modules)]
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    loss = summed_loss(logits, labels)
    del logits  # the loss chunks keep what the backward needs
    grads = torch.autograd.grad(loss, deltas)
    return BatchGradients(loss.detach(), grads, outputs)


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


def _rows(x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (N, D): the selected flattened positions (no host sync: the
    indices are already on the device)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, selected.to(x.device, non_blocking=True))


def _add_kinds(acc: DeviceAccumulator, row: int, kinds: tuple[str, ...], value, grad) -> None:
    """gradients: dLoss/dx; values: x; attribution: x * dLoss/dx (rows are positions)."""
    for kind in kinds:
        x = grad if kind == "gradients" else value if kind == "values" else value * grad
        acc.add(names.KIND_PREFIX[kind], row, x)


def accumulate_batch(
    model: nn.Module,
    modules: list[nn.Module],
    batch: Batch,
    acc: DeviceAccumulator,
    agg: Aggregation = Aggregation(),
    saes: list[nn.Module] | None = None,
) -> None:
    """Add one batch's statistics to `acc`: of the hook sites' own dimensions
    (no `saes`), or of SAE features (one SAE per hooked module). `batch` is
    on the model's device."""
    acc.loss_tokens += batch.targets
    acc.tokens += batch.aggregated
    if saes is not None and agg.sae_mode in ("splice", "splice-all"):
        _accumulate_spliced(model, modules, batch, acc, agg, saes)
        return
    result = site_gradients(model, modules, batch.input_ids, batch.model_mask, batch.labels)
    with torch.no_grad():
        acc.loss_sum += result.loss.to(acc.device, non_blocking=True)
        for row, (grad, z) in enumerate(zip(result.grads, result.outputs)):
            g = _rows(grad, batch.selected)  # (N, D)
            if saes is None:
                value = _rows(z, batch.selected) if agg.kinds != ("gradients",) else None
                _add_kinds(acc, row, agg.kinds, value, g)
            else:
                acc.add(names.SITE_PREFIX, row, g)
                _add_clean_features(acc, row, agg, saes[row], z, batch.selected, g)


def _add_clean_features(acc, row, agg: Aggregation, sae, z: torch.Tensor, selected: torch.Tensor,
                        g: torch.Tensor) -> None:
    """Clean mode: the model is unmodified and the SAE error e = z - decode(encode(z))
    is held constant, so dLoss/df = J_decode(f)^T dLoss/dz. For an affine decoder
    that is g @ W_dec^T, one matmul per chunk in the SAE's dtype, and the
    features themselves (the encoder) are needed only for values/attribution.
    Any other decoder is differentiated by autograd (input normalization folded
    in by its own decode). Chunked over tokens so tokens x features stays bounded."""
    weight = getattr(sae, "affine_decoder_weight", None)  # (d_sae, d_in) or None
    needs_features = weight is None or agg.kinds != ("gradients",)
    step = max(1, agg.chunk_elements // sae.d_sae)
    for start in range(0, g.shape[0], step):
        g_chunk = g[start:start + step]
        f = sae.encode(_rows(z, selected[start:start + step])).detach() if needs_features else None
        if weight is not None:
            g_f = g_chunk.to(weight.device, weight.dtype, non_blocking=True) @ weight.T
        else:
            with torch.enable_grad():
                leaf = f.requires_grad_(True)
                (g_f,) = torch.autograd.grad(sae.decode(leaf), leaf, grad_outputs=g_chunk.to(f.dtype))
            f = f.detach()
        _add_kinds(acc, row, agg.kinds, f, g_f)


def _accumulate_spliced(model, modules, batch: Batch, acc, agg: Aggregation, saes) -> None:
    """Splice modes, one forward+backward per layer, dLoss/df taken in the spliced model:

    splice      (the original SAE script) at the aggregated positions only, the layer's
                output is replaced by decode(f), f = encode(z) a leaf; every other position
                keeps the model's own output. Only those positions are encoded.
    splice-all  the output is replaced by decode(encode(z)) at every position: the
                gradient in the model with the SAE substituted everywhere."""
    everywhere = agg.sae_mode == "splice-all"
    with torch.no_grad():  # the unmodified model's loss, for the run's mean loss
        logits = model(input_ids=batch.input_ids, attention_mask=batch.model_mask, use_cache=False).logits
        acc.loss_sum += summed_loss(logits, batch.labels).to(acc.device, non_blocking=True)
        del logits
    for row, (module, sae) in enumerate(zip(modules, saes)):
        leaf = {}

        def splice(mod, args, output, sae=sae):
            hidden = _output_tensor(output)
            flat = hidden.reshape(-1, hidden.shape[-1])
            z = flat.detach() if everywhere else _rows(flat.detach(), batch.selected)
            leaf["f"] = sae.encode(z).detach().requires_grad_(True)
            z_hat = sae.decode(leaf["f"]).to(hidden.dtype)
            spliced = z_hat if everywhere else flat.index_copy(0, batch.selected.to(flat.device), z_hat)
            return _replace_output(output, spliced.view_as(hidden))

        handle = module.register_forward_hook(splice)
        try:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.model_mask, use_cache=False).logits
        finally:
            handle.remove()
        (g_f,) = torch.autograd.grad(summed_loss(logits, batch.labels), leaf["f"])
        del logits
        with torch.no_grad():
            f = leaf["f"].detach()
            if everywhere:  # rows are every position; keep the aggregated ones
                f, g_f = _rows(f, batch.selected), _rows(g_f, batch.selected)
            _add_kinds(acc, row, agg.kinds, f, g_f)
