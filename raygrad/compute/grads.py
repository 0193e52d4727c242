"""The per-batch gradient math's entry point: accumulate_batch, (model, batch, hook sites[, SAEs]) -> running sums.

No Ray, no files: the worker (a Ray actor or in-process) calls
`accumulate_batch`, and the tests check it against independent references.
It runs the site gradients (sites), the Hutchinson products (hessian) and,
with SAEs, the clean or spliced feature path (sae_paths) into a
DeviceAccumulator (accumulator), for one Batch (batch).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import constants as names
from .accumulator import DeviceAccumulator, add_kinds
from .batch import Aggregation, Batch, selected_rows
from .hessian import add_site_hessian, site_hessian_products
from .sae_paths import accumulate_spliced, add_clean_features
from .sites import site_gradients


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
        accumulate_spliced(model, modules, batch, acc, agg, saes, layers)
        return
    hooked = list(modules) + ([module for module, _ in context] if agg.hessian else [])
    result = site_gradients(model, hooked, batch.input_ids, batch.model_mask, batch.labels, create_graph=agg.hessian)
    products = site_hessian_products(result, batch, agg, layers + [layer for _, layer in context]) \
        if agg.hessian else None
    grads = [grad.detach() for grad in result.grads[:len(modules)]]
    loss, outputs = result.loss, result.outputs
    del result  # with the hessian kind: the first backward's graph goes here
    with torch.no_grad():
        acc.loss_sum += loss.to(acc.device, non_blocking=True)
        for row, (grad, z) in enumerate(zip(grads, outputs)):
            g = selected_rows(grad, batch.selected)  # (N, D)
            if saes is None:
                value = selected_rows(z, batch.selected) if agg.needs_values else None
                add_kinds(acc, row, agg.kinds, value, g)
                if products is not None:
                    add_site_hessian(acc, row, products[row])
            else:
                acc.add(names.SITE_PREFIX, row, g)
                if names.SITE_VALUE_PREFIX in acc.prefixes:
                    acc.add(names.SITE_VALUE_PREFIX, row, selected_rows(z, batch.selected))
                add_clean_features(acc, row, agg, saes[row], z, batch.selected, g,
                                   products[row] if products is not None else None)
