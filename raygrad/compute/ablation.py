"""`raygrad ablate`'s per-batch math (DESIGN.md §8), Ray-free: ablate_batch, (model, batch, hook sites[,
SAEs], AblationSpec) -> per-variant sums in a DeviceAccumulator.

Per batch: one clean forward + backward (each text's summed loss, g at every listed dimension at every
position, and the values a there), then forwards with the intervention at every position: variant 0 sets
every listed dimension jointly; with --each, variant 1 + k sets feature k alone. Those forwards are the
batch's texts repeated once per variant and run together, ABLATED_TOKENS_PER_FORWARD padded tokens at a time.

A listed entry is (module row, index): a dimension of the hook site (target mlp), or an SAE feature
(target sae), changed in its own term only, z' = z + (f' - f) W_dec[feature]: the SAE's reconstruction
error stays, so a variant that changes nothing leaves the module's output exactly as it was.

What is set, at every position, in the model as intervened so far (an earlier layer's change reaches a
later layer's values): zero -> 0; mean -> the run's mean value of that entry; clamp -> C where the entry is
active (f > 0 for an SAE feature; everywhere for a site dimension), else unchanged.

Per variant row v the accumulator adds, over texts i with n_i > 0 target tokens (ABLATION_SUMS): the
ablated summed loss A_i, d_i = A_i - C_i (C_i the clean summed loss), d_i^2, d_i * n_i, the first-order
prediction p_i = sum over the text's positions t of sum over the variant's entries of g_t * (a'_t - a_t)
(a, a' and g from the clean pass; every real token's position, as the intervention is: g_t is 0 where no
target depends on t, and with --completion-column the prompt's positions count, the completion's loss
depends on them), the count of texts and n_i^2. The clean loss and target tokens are
the accumulator's own loss_sum, loss_tokens and tokens. Every sum adds over texts, so shards, workers
and resumes merge exactly (raygrad.analysis.ablation derives the report from them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import constants as names
from .accumulator import DeviceAccumulator
from .batch import IGNORE_INDEX, Batch
from .sites import LOSS_CHUNK_ELEMENTS, delta_hooks, output_tensor, replace_output

MODES = ("zero", "mean", "clamp")
# Padded tokens of one ablated forward: the batch's texts are repeated once per variant and that many
# copies run together (at least one variant a forward, whatever the batch).
ABLATED_TOKENS_PER_FORWARD = 8192


@dataclass(frozen=True)
class AblationSpec:
    """What is ablated, resolved from the run: plain data, so the Plan carries it to every worker."""

    rows: tuple[int, ...]  # per listed entry: the row of its hook module in the plan's module list
    indices: tuple[int, ...]  # per listed entry: the site dimension or SAE feature
    mode: str  # zero / mean / clamp
    values: tuple[float, ...]  # per listed entry: the value set (0, the run's mean value, or C)
    each: bool = False  # also each entry alone (variants 1..F)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: one of {', '.join(MODES)}")
        if not (len(self.rows) == len(self.indices) == len(self.values)) or not self.rows:
            raise ValueError("rows, indices and values: one each per listed entry, at least one entry")

    @property
    def num_variants(self) -> int:
        return 1 + (len(self.rows) if self.each else 0)

    def variant_entries(self) -> list[list[int]]:
        """Per variant, the listed entries it sets: all of them, then (--each) each one alone."""
        joint = list(range(len(self.rows)))
        return [joint] + ([[entry] for entry in joint] if self.each else [])

    def to_dict(self) -> dict:
        return {"rows": list(self.rows), "indices": list(self.indices), "mode": self.mode,
                "values": list(self.values), "each": self.each}

    @classmethod
    def from_dict(cls, data: dict) -> "AblationSpec":
        return cls(tuple(data["rows"]), tuple(data["indices"]), data["mode"], tuple(data["values"]),
                   bool(data["each"]))


def _position_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 logits are widened for the softmax (as sites.summed_loss does); 0 where there is no target
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(wide, labels, ignore_index=IGNORE_INDEX, reduction="none")


def per_text_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) float64, nats: each text's cross-entropy summed over its targets (labels != IGNORE_INDEX, so a
    mask on the targets restricts it). The clean and the ablated forwards both come here, so the same
    arithmetic gives both sides of a difference. Widened logits exist LOSS_CHUNK_ELEMENTS at a time; with
    a graph each chunk is recomputed in the backward (as sites.summed_loss), not kept."""
    rows, width = labels.shape
    flat, targets = logits.flatten(0, 1), labels.to(logits.device, non_blocking=True).flatten()
    step = max(1, LOSS_CHUNK_ELEMENTS // logits.shape[-1])
    chunks = []
    for start in range(0, flat.shape[0], step):
        piece, wanted = flat[start:start + step], targets[start:start + step]
        chunks.append(checkpoint(_position_losses, piece, wanted, use_reentrant=False) if piece.requires_grad
                      else _position_losses(piece, wanted))
    return torch.cat(chunks).double().view(rows, width).sum(1)


def set_values(a: torch.Tensor, target: torch.Tensor, mode: str, is_sae: bool) -> torch.Tensor:
    """a' from the values `a` (..., K) and the entries' targets (K,): the target everywhere, or for
    clamp on SAE features only where the feature is active (f > 0)."""
    target = target.to(a.device, a.dtype).expand_as(a)
    if mode == "clamp" and is_sae:
        return torch.where(a > 0, target, a)
    return target.clone()


class ListedEntries:
    """One hooked module's listed entries: their indices, targets and (per variant) whether set."""

    def __init__(self, spec: AblationSpec, row: int, sae, device: torch.device):
        self.positions = [k for k, r in enumerate(spec.rows) if r == row]  # into the spec's entries
        self.index = torch.tensor([spec.indices[k] for k in self.positions], device=device)
        self.target = torch.tensor([spec.values[k] for k in self.positions], dtype=torch.float64)
        self.sae = sae
        # (V, K) bool: variant v sets this module's k-th entry
        self.chosen = torch.tensor([[k in entries for k in self.positions] for entries in spec.variant_entries()])

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., K) the entries' values at `hidden` (..., D): the site's dimensions or the SAE's features."""
        if self.sae is None:
            return hidden.index_select(-1, self.index.to(hidden.device))
        return self.sae.encode(hidden).index_select(-1, self.index.to(hidden.device))

    def apply(self, hidden: torch.Tensor, chosen: torch.Tensor, mode: str) -> torch.Tensor:
        """`hidden` (V*B, T, D) with each copy's chosen entries set (`chosen` (V, K) for its V copies).
        An SAE feature changes only its own term, z + (f' - f) W_dec[feature]; an unchosen entry adds an
        exact zero, so a copy with nothing chosen comes back exactly as it was."""
        copies = chosen.shape[0]
        a = self.values(hidden)  # (V*B, T, K)
        a_set = set_values(a, self.target, mode, self.sae is not None)
        mask = chosen.to(a.device).repeat_interleave(hidden.shape[0] // copies, 0)[:, None, :]  # (V*B, 1, K)
        if self.sae is None:  # the chosen dimensions set, the others copied back as they were
            return hidden.index_copy(-1, self.index.to(hidden.device), torch.where(mask, a_set, a).to(hidden.dtype))
        change = torch.where(mask, a_set - a, torch.zeros_like(a))
        weight = getattr(self.sae, "affine_decoder_weight", None)
        if weight is not None:  # (f' - f) W_dec[features]
            return hidden + (change.to(weight.dtype) @ weight.index_select(0, self.index.to(weight.device))
                             ).to(hidden.device, hidden.dtype)
        f = self.sae.encode(hidden)  # decode(f') - decode(f): the same change for any decoder
        changed = f.index_add(-1, self.index.to(f.device), change.to(f.dtype))
        return hidden + (self.sae.decode(changed) - self.sae.decode(f)).to(hidden.dtype)

    def gradient(self, g_z: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, T, K) dLoss/da at each entry: g_z's own dimensions, or for SAE features with the error
        held constant J_decode(f)^T g_z (g_z @ W_dec[feature] for an affine decoder)."""
        if self.sae is None:
            return g_z.index_select(-1, self.index.to(g_z.device))
        weight = getattr(self.sae, "affine_decoder_weight", None)
        if weight is not None:
            rows = weight.index_select(0, self.index.to(weight.device))  # (K, D)
            return (g_z.to(weight.device, weight.dtype) @ rows.T).to(g_z.device)
        with torch.enable_grad():
            f = self.sae.encode(z).detach().requires_grad_(True)
            (g_f,) = torch.autograd.grad(self.sae.decode(f), f, grad_outputs=g_z.to(f.dtype))
        return g_f.index_select(-1, self.index.to(g_f.device))


def _clean_pass(model, modules, batch: Batch):
    """One forward + backward: (each text's summed loss (B,), per module z (B, T, D) and dLoss/dz)."""
    with delta_hooks(modules) as (outputs, deltas):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.model_mask, use_cache=False).logits
    losses = per_text_loss(logits, batch.labels)
    del logits
    grads = torch.autograd.grad(losses.sum(), deltas)
    return losses.detach(), outputs, [grad.detach() for grad in grads]


def ablated_losses(model, modules, batch: Batch, entries: list[ListedEntries], mode: str, chosen: list[torch.Tensor]
                   ) -> torch.Tensor:
    """(V, B) each text's summed loss with, for each of V copies of the batch, the entries chosen for it
    set (`chosen`: per module, (V, K) bool); one forward of the V copies together."""
    copies = chosen[0].shape[0]

    def hook_for(row: int):
        def intervene(module, args, output):
            return replace_output(output, entries[row].apply(output_tensor(output), chosen[row], mode))

        return intervene

    repeat = (copies,) + (1,) * (batch.input_ids.dim() - 1)
    mask = batch.model_mask.repeat(*repeat) if batch.model_mask is not None else None
    handles = [module.register_forward_hook(hook_for(row)) for row, module in enumerate(modules)]
    try:
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids.repeat(*repeat), attention_mask=mask, use_cache=False).logits
            losses = per_text_loss(logits, batch.labels.repeat(*repeat))
    finally:
        for handle in handles:
            handle.remove()
    return losses.view(copies, -1)


def ablate_batch(model, modules: list, batch: Batch, acc: DeviceAccumulator, spec: AblationSpec,
                 saes: list | None = None) -> None:
    """Add one batch's ablation sums to `acc` (one row per variant, ABLATION_SUMS). `modules` (and
    `saes`) are the plan's, in its order; `batch` is on the model's device."""
    clean, outputs, grads = _clean_pass(model, modules, batch)
    device = clean.device
    entries = [ListedEntries(spec, row, saes[row] if saes is not None else None, device) for row in range(len(modules))]
    targets = (batch.labels != IGNORE_INDEX).to(device)  # (B, T): positions that predict a real target
    counts = targets.sum(1).to(torch.float64)  # n_i
    with torch.no_grad():
        # First order, per listed entry and text: sum of g (a' - a) over the real tokens' positions (the
        # intervention's; a prompt's too, with --completion-column), clean a and g.
        real = batch.attention_mask.to(device, torch.float64)  # (B, T)
        predicted = torch.zeros(len(spec.rows), clean.shape[0], dtype=torch.float64, device=device)
        for row, entry in enumerate(entries):
            if not entry.positions:
                continue
            a = entry.values(outputs[row]).to(torch.float64)  # a' - a in float64, whatever the model's dtype
            step = set_values(a, entry.target, spec.mode, entry.sae is not None) - a  # (B, T, K)
            g = entry.gradient(grads[row], outputs[row])
            per_text = ((g.to(torch.float64) * step.to(g.device, torch.float64)) * real[..., None]).sum(1)
            predicted[entry.positions] = per_text.T.to(device)
        variants = spec.variant_entries()
        per_forward = max(1, ABLATED_TOKENS_PER_FORWARD // batch.padded_tokens)
        ablated = []
        for start in range(0, len(variants), per_forward):
            part = slice(start, start + per_forward)
            ablated.append(ablated_losses(model, modules, batch, entries, spec.mode,
                                          [entry.chosen[part] for entry in entries]))
        ablated = torch.cat(ablated).to(device)  # (V, B)
        counted = (counts > 0).to(torch.float64)
        acc.loss_sum += clean.sum().to(acc.device)
        acc.loss_tokens += batch.targets
        acc.tokens += batch.targets
        for v, chosen_entries in enumerate(variants):
            d = ablated[v] - clean
            sums = {names.ABLATED_LOSS_SUM: ablated[v].sum(), names.ABLATED_DELTA_SUM: d.sum(),
                    names.ABLATED_DELTA_SQ_SUM: (d * d).sum(), names.ABLATED_DELTA_TOKENS_SUM: (d * counts).sum(),
                    names.ABLATED_PREDICTED_SUM: predicted[chosen_entries].sum(),
                    names.ABLATED_TEXTS: counted.sum(), names.ABLATED_TOKENS_SQ_SUM: (counts * counts).sum()}
            for name, value in sums.items():
                acc.add_scalar(name, v, value)
