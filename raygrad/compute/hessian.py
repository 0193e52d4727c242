"""The hessian kind: Hutchinson estimates of the Hessian's diagonal, with probes drawn where they are
needed (raygrad.compute.probes). site_hessian_products and add_site_hessian for the hook sites (and, pulled
through the decoder by raygrad.compute.sae_paths, for clean SAE features); leaf_hessian for the leaf
features of the splice modes."""

from __future__ import annotations

import torch

from .. import constants as names
from .accumulator import DeviceAccumulator
from .batch import Aggregation, Batch, selected_rows
from .probes import rademacher, token_keys
from .sites import BatchGradients

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


def site_hessian_products(result: BatchGradients, batch: Batch, agg: Aggregation,
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
            g = selected_rows(grad, selected)
            probes.append(_site_probe(batch, agg, k, layer, g))
            term = (g * probes[-1]).sum()
            # a model split across GPUs: every term to one device before they are added
            total = term if total is None else total + term.to(total.device)
        hv = torch.autograd.grad(total, result.deltas, retain_graph=k + 1 < agg.hessian_probes, allow_unused=True)
        for row, (h, grad) in enumerate(zip(hv, result.grads)):
            # None: no second-order path from this layer (its Hessian block is zero)
            hr = grad.new_zeros(n, grad.shape[-1]) if h is None else selected_rows(h.detach(), selected)
            products[row].append((probes[row], hr))
    return products


def add_site_hessian(acc: DeviceAccumulator, row: int, products: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Target = the site: the mean over probes of r_k * (H r_k)."""
    estimate = sum(r * hr for r, hr in products)
    acc.add(names.KIND_PREFIX["hessian"], row, estimate / len(products))


def leaf_hessian(batch: Batch, agg: Aggregation, layer: int, g_f: torch.Tensor, f: torch.Tensor,
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
