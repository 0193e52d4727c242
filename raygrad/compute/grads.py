"""The per-batch gradient math: (model, batch, hook sites[, SAEs]) -> running sums.

No Ray, no files: the worker (a Ray actor or in-process) calls
`accumulate_batch`, and the tests check it against independent references.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .. import constants as names
from ..store import topk
from ..store.partial import Partial, array_widths
from .probes import rademacher, token_keys

IGNORE_INDEX = -100  # label of positions that have no real target


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

    def empty_like(self) -> "DeviceAccumulator":
        return DeviceAccumulator(self.num_layers, self.prefixes, self.device, self.layer_sums, self.top_k,
                                 self.score_dtype)

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
        needs the rows' dataset order, happens once per batch in `merge`)."""
        index = topk.batch_top(x, self.top_k)  # (k', width) rows of x
        score = x.gather(0, index).to(self.device, self.score_dtype, non_blocking=True).T
        index = index.to(self.device, non_blocking=True).T + start
        if (prefix, row) in self.pending:
            score, index = topk.best_in_batch(*self.pending[prefix, row], score, index, self.top_k)
        self.pending[prefix, row] = score, index

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
        other.resolve(into=self)

    def resolve(self, into: "DeviceAccumulator | None" = None) -> None:
        """The pending batch's best rows, as (score, row, position), merged into the tables (of `into`)."""
        into = self if into is None else into
        for (prefix, row), (score, index) in self.pending.items():
            candidates = {"score": score, "row": self.token_rows[index],
                          "position": self.token_positions[index].int()}
            into._merge_at(prefix, row, candidates)
            into.ranked = True
        self.pending.clear()

    def _merge_at(self, prefix: str, rows, candidates: dict[str, torch.Tensor]) -> None:
        """Merge `candidates` into the `prefix` tables' layer rows `rows` (an int, or a tensor of them), in place."""
        tables = self.examples[prefix]
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
               rows: list[int] | None = None) -> Batch:
    """A host-side Batch from right-padded ids and their mask; `rows` (B,) are the texts' dataset
    rows (default 0..B-1), which key the Hessian's probes."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = next_token_labels(input_ids, attention_mask)
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


@dataclass
class BatchGradients:
    loss: torch.Tensor  # scalar float64, nats: sum of cross-entropy over real targets
    grads: tuple[torch.Tensor, ...]  # per hooked module, (B, T, D) dLoss/dz
    outputs: list[torch.Tensor]  # per hooked module, (B, T, D) z itself (detached)
    deltas: list[torch.Tensor] | None = None  # the zero leaves added to z (kept for a second derivative)


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
        with sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    loss = summed_loss(logits, labels)
    del logits  # the loss chunks keep what the backward needs
    grads = torch.autograd.grad(loss, deltas, create_graph=create_graph)
    return BatchGradients(loss.detach(), grads, outputs, deltas if create_graph else None)


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


def _rows(x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (N, D): the selected flattened positions (no host sync: the
    indices are already on the device)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, selected.to(x.device, non_blocking=True))


def _add_kinds(acc: DeviceAccumulator, row: int, kinds: tuple[str, ...], value, grad, start: int = 0) -> None:
    """gradients: dLoss/dx; values: x; attribution: x * dLoss/dx (rows are the batch's aggregated positions
    from `start` on). The hessian kind is added by the Hutchinson step, not here."""
    for kind in kinds:
        if kind == "hessian":
            continue
        x = grad if kind == "gradients" else value if kind == "values" else value * grad
        acc.add(names.KIND_PREFIX[kind], row, x, start)


# ---------------------------------------------------------------- Hutchinson (hessian kind)
#
# For a symmetric H and a probe r of independent +-1 entries, E[r_i (Hr)_i] = H_ii + sum_{j != i} H_ij E[r_i r_j]
# = H_ii: r * (Hr) is an unbiased estimate of diag(H), of variance sum_{j != i} H_ij^2 per entry. H is the
# Hessian of the summed loss w.r.t. the site outputs z of every hooked layer at the aggregated positions; the
# probe is zero elsewhere (unbiased all the same, and no variance from positions that are not aggregated).
# For SAE features in clean mode (z = decode(f) + e, e held constant) the Hessian is J^T H J, J = d decode/df,
# and (J^T r) * (J^T H r) is unbiased for its diagonal too: E[(J^T r)_i (J^T H r)_i] = (J^T E[r r^T] H J)_ii.
# So the probes live in site space for both targets, and need no SAE to be drawn.
#
# Every entry of r is drawn from (--seed, dataset row, layer, probe, position, dimension) (raygrad.compute.probes):
# texts in a batch do not interact, so the estimate is the same for any batching, sharding or resume.


def _probe(batch: Batch, agg: Aggregation, k: int, layer: int, rows: slice, width: int, device,
           dtype) -> torch.Tensor:
    """Probe k of model layer `layer` on the aggregated rows `rows`, (rows, width): regenerated where it is
    needed rather than kept (a tokens x 65,536 probe never outlives one chunk)."""
    keys = token_keys(agg.probe_seed, batch.token_rows[rows], batch.token_positions[rows], layer, k)
    return rademacher(keys, width, device, dtype)


def _site_probe(batch: Batch, agg: Aggregation, k: int, layer: int, like: torch.Tensor) -> torch.Tensor:
    """(N, site width) probe k of `layer` at every aggregated row, in `like`'s dtype and device, drawn in
    chunks of agg.chunk_elements entries (the int64 hashing needs 8 bytes an entry)."""
    n, width = like.shape[0], like.shape[-1]
    return torch.cat([_probe(batch, agg, k, layer, part, width, like.device, like.dtype)
                      for part in agg.chunks(n, width)]) if n else like.new_zeros(0, width)


def _site_hessian_products(result: BatchGradients, batch: Batch, agg: Aggregation,
                           layers: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """One double backward per probe k through every hooked layer at once: with
    s_k = sum_l <dLoss/dz_l, r_kl> over the aggregated rows, ds_k/dz_m = sum_l H_ml r_kl. The
    cross-layer blocks (l != m) reach layer m's estimate r_km * (...) only through products of
    independent zero-mean probes of two layers: zero in expectation, so each layer's estimate
    stays unbiased. Returns, per hooked layer and probe, (r_km, (H r_k)_m) at those rows
    (N, site width each), detached: the probe is kept rather than drawn twice."""
    selected, n = batch.selected, batch.selected.numel()
    products: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in result.grads]
    for k in range(agg.hessian_probes):
        total, probes = None, []
        for grad, layer in zip(result.grads, layers):
            g = _rows(grad, selected)
            probes.append(_site_probe(batch, agg, k, layer, g))
            term = (g * probes[-1]).sum()
            # a model split across GPUs: every term to one device before they are added
            total = term if total is None else total + term.to(total.device)
        hv = torch.autograd.grad(total, result.deltas, retain_graph=k + 1 < agg.hessian_probes, allow_unused=True)
        for row, (h, grad) in enumerate(zip(hv, result.grads)):
            # None: no second-order path from this layer (its Hessian block is zero)
            hr = grad.new_zeros(n, grad.shape[-1]) if h is None else _rows(h.detach(), selected)
            products[row].append((probes[row], hr))
    return products


def _add_site_hessian(acc: DeviceAccumulator, row: int, products: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Target = the site: the mean over probes of r_k * (H r_k)."""
    estimate = sum(r * hr for r, hr in products)
    acc.add(names.KIND_PREFIX["hessian"], row, estimate / len(products))


# ---------------------------------------------------------------- SAE reconstruction quality


def _add_quality(acc: DeviceAccumulator, row: int, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
    """At aggregated rows: sum of ||x - x_hat||^2 (model units^2) and of the nonzero features, when the
    accumulator keeps them (target sae runs). The FVU's denominator comes from the site_value sums."""
    if names.SAE_SQ_ERROR_SUM not in acc.sums:
        return
    wide = torch.promote_types(x_hat.dtype, torch.float32)
    error = x.to(x_hat.device, wide) - x_hat.to(wide)
    acc.add_scalar(names.SAE_SQ_ERROR_SUM, row, torch.linalg.vector_norm(error).square())
    acc.add_scalar(names.SAE_L0_SUM, row, torch.count_nonzero(f))


def accumulate_batch(
    model: nn.Module,
    modules: list[nn.Module],
    batch: Batch,
    acc: DeviceAccumulator,
    agg: Aggregation = Aggregation(),
    saes: list[nn.Module] | None = None,
    layers: list[int] | None = None,
    context: list[tuple[nn.Module, int]] = (),
) -> None:
    """Add one batch's statistics to `acc`: of the hook sites' own dimensions
    (no `saes`), or of SAE features (one SAE per hooked module). `batch` is
    on the model's device. `layers`: the model layer of each module (default
    0, 1, ...), which keys its Hessian probes. `context`: other (module, layer)
    pairs of the run, hooked only so that the Hessian's double backward mixes
    every layer of the run whichever of them this pass adds (SAE passes)."""
    acc.loss_tokens += batch.targets
    acc.tokens += batch.aggregated
    acc.begin_batch(batch)
    layers = list(range(len(modules))) if layers is None else list(layers)
    if saes is not None and agg.sae_mode in ("splice", "splice-all"):
        _accumulate_spliced(model, modules, batch, acc, agg, saes, layers)
        return
    hooked = list(modules) + ([module for module, _ in context] if agg.hessian else [])
    result = site_gradients(model, hooked, batch.input_ids, batch.model_mask, batch.labels, create_graph=agg.hessian)
    products = _site_hessian_products(result, batch, agg, layers + [layer for _, layer in context]) \
        if agg.hessian else None
    grads = [grad.detach() for grad in result.grads[:len(modules)]]
    loss, outputs = result.loss, result.outputs
    del result  # with the hessian kind: the first backward's graph goes here
    with torch.no_grad():
        acc.loss_sum += loss.to(acc.device, non_blocking=True)
        for row, (grad, z) in enumerate(zip(grads, outputs)):
            g = _rows(grad, batch.selected)  # (N, D)
            if saes is None:
                value = _rows(z, batch.selected) if agg.needs_values else None
                _add_kinds(acc, row, agg.kinds, value, g)
                if products is not None:
                    _add_site_hessian(acc, row, products[row])
            else:
                acc.add(names.SITE_PREFIX, row, g)
                if names.SITE_VALUE_PREFIX in acc.prefixes:
                    acc.add(names.SITE_VALUE_PREFIX, row, _rows(z, batch.selected))
                _add_clean_features(acc, row, agg, saes[row], z, batch.selected, g,
                                    products[row] if products is not None else None)


def _add_clean_features(acc, row, agg: Aggregation, sae, z: torch.Tensor, selected: torch.Tensor,
                        g: torch.Tensor, products: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Clean mode: the model is unmodified and the SAE error e = z - decode(encode(z))
    is held constant, so dLoss/df = J_decode(f)^T dLoss/dz. For an affine decoder
    that is g @ W_dec^T, one matmul per chunk in the SAE's dtype. The features
    (the encoder) are needed for values/attribution and for the reconstruction
    quality (FVU, L0; a decode more); without those, an affine decoder skips both.
    Any other decoder is differentiated by autograd (input normalization folded
    in by its own decode). Chunked over tokens so tokens x features stays bounded.

    `products` (hessian kind): per probe, (r_k, H r_k) at the site (N, d each); the features'
    Hessian is J^T H_z J (the decoder is linear in f for every supported SAE, so no
    second-derivative term of decode), estimated as the mean of (J^T r_k) * (J^T H r_k)."""
    weight = getattr(sae, "affine_decoder_weight", None)  # (d_sae, d_in) or None
    quality = names.SAE_SQ_ERROR_SUM in acc.sums
    needs_features = weight is None or agg.needs_values or quality
    for part in agg.chunks(g.shape[0], sae.d_sae):
        g_chunk = g[part]
        x = _rows(z, selected[part]) if needs_features else None
        f = sae.encode(x).detach() if needs_features else None
        if quality:
            _add_quality(acc, row, x, f, sae.decode(f))
        pull = _decoder_transpose(sae, weight, f)
        g_f = pull(g_chunk)
        _add_kinds(acc, row, agg.kinds, f, g_f, part.start)
        if products is not None:
            estimate = None
            for r, hr in products:
                term = pull(r[part]) * pull(hr[part])
                estimate = term if estimate is None else estimate + term
            acc.add(names.KIND_PREFIX["hessian"], row, estimate / len(products))


def _decoder_transpose(sae, weight: torch.Tensor | None, f: torch.Tensor | None):
    """y (rows, d_in) -> J_decode(f)^T y (rows, d_sae), in the SAE's dtype."""
    if weight is not None:
        return lambda y: y.to(weight.device, weight.dtype, non_blocking=True) @ weight.T

    def pull(y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = f.detach().requires_grad_(True)
            (out,) = torch.autograd.grad(sae.decode(leaf), leaf, grad_outputs=y.to(f.device, f.dtype))
        return out

    return pull


def _accumulate_spliced(model, modules, batch: Batch, acc, agg: Aggregation, saes, layers: list[int]) -> None:
    """Splice modes, one forward+backward per layer, dLoss/df taken in the spliced model:

    splice      (the original SAE script) at the aggregated positions only, the layer's
                output is replaced by decode(f), f = encode(z) a leaf; every other position
                keeps the model's own output. Only those positions are encoded.
    splice-all  the output is replaced by decode(encode(z)) at every position: the
                gradient in the model with the SAE substituted everywhere.

    Each layer's pass also gives, at no extra cost, the loss with that SAE spliced in
    (summed over every target, as the clean loss) and the reconstruction quality at the
    aggregated positions. The hessian kind is the Hessian w.r.t. the leaf f in the spliced
    model: K extra double backwards per layer."""
    everywhere = agg.sae_mode == "splice-all"
    with torch.no_grad():  # the unmodified model's loss, for the run's mean loss
        logits = model(input_ids=batch.input_ids, attention_mask=batch.model_mask, use_cache=False).logits
        acc.loss_sum += summed_loss(logits, batch.labels).to(acc.device, non_blocking=True)
        del logits
    for row, (module, sae, layer) in enumerate(zip(modules, saes, layers)):
        leaf = {}

        def splice(mod, args, output, sae=sae):
            hidden = _output_tensor(output)
            flat = hidden.reshape(-1, hidden.shape[-1])
            z = flat.detach() if everywhere else _rows(flat.detach(), batch.selected)
            leaf["f"] = sae.encode(z).detach().requires_grad_(True)
            z_hat = sae.decode(leaf["f"]).to(hidden.dtype)
            leaf["z"], leaf["z_hat"] = z, z_hat.detach()
            spliced = z_hat if everywhere else flat.index_copy(0, batch.selected.to(flat.device), z_hat)
            return _replace_output(output, spliced.view_as(hidden))

        handle = module.register_forward_hook(splice)
        try:
            with sdpa_kernel([SDPBackend.MATH]) if agg.hessian else contextlib.nullcontext():
                logits = model(input_ids=batch.input_ids, attention_mask=batch.model_mask, use_cache=False).logits
        finally:
            handle.remove()
        loss = summed_loss(logits, batch.labels)
        del logits
        (g_f,) = torch.autograd.grad(loss, leaf["f"], create_graph=agg.hessian)
        rows = batch.selected.to(g_f.device) if everywhere else None  # the aggregated rows of f
        hessian = _leaf_hessian(batch, agg, layer, g_f, leaf["f"], rows) if agg.hessian else None
        with torch.no_grad():
            if names.SPLICED_LOSS_SUM in acc.sums:
                acc.add_scalar(names.SPLICED_LOSS_SUM, row, loss.detach())
            f, g_f, z, z_hat = leaf["f"].detach(), g_f.detach(), leaf["z"], leaf["z_hat"]
            if everywhere:  # rows are every position; keep the aggregated ones
                f, g_f, z, z_hat = (x.index_select(0, rows.to(x.device)) for x in (f, g_f, z, z_hat))
            if names.SITE_VALUE_PREFIX in acc.prefixes:
                acc.add(names.SITE_VALUE_PREFIX, row, z)
            _add_quality(acc, row, z, f, z_hat)
            _add_kinds(acc, row, agg.kinds, f, g_f)
            if hessian is not None:
                acc.add(names.KIND_PREFIX["hessian"], row, hessian)


def _leaf_hessian(batch: Batch, agg: Aggregation, layer: int, g_f: torch.Tensor, f: torch.Tensor,
                  rows: torch.Tensor | None) -> torch.Tensor:
    """Splice modes: mean over probes of v_k * (H_f v_k), H_f the Hessian of the spliced model's loss
    w.r.t. the leaf f (M, d_sae); the probe is nonzero on the aggregated rows `rows` only (None: all M).
    Returns those rows (N, d_sae)."""
    n = f.shape[0] if rows is None else rows.numel()
    estimate = None
    for k in range(agg.hessian_probes):
        v = _probe(batch, agg, k, layer, slice(0, n), f.shape[1], f.device, f.dtype)
        v_full = v if rows is None else torch.zeros_like(f).index_copy_(0, rows, v)
        (hv,) = torch.autograd.grad((g_f * v_full).sum(), f, retain_graph=k + 1 < agg.hessian_probes)
        term = v * (hv if rows is None else hv.index_select(0, rows))
        estimate = term if estimate is None else estimate + term
    return estimate.detach() / agg.hessian_probes
