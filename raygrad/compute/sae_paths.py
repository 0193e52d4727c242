"""SAE features (--target sae), in each SAE mode: add_clean_features (clean: the site gradient pulled
through the decoder, the SAE error held constant), accumulate_spliced (splice, splice-all: the SAE
spliced into the model, one forward and backward per layer), and the reconstruction quality sums
(squared error, L0) both add."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import constants as names
from .accumulator import DeviceAccumulator, add_kinds
from .batch import Aggregation, Batch, selected_rows
from .hessian import leaf_hessian
from .sites import output_tensor, replace_output, summed_loss


def _add_quality(acc: DeviceAccumulator, row: int, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
    """At aggregated rows: sum of ||x - x_hat||^2 (model units^2) and of the nonzero features, when the
    accumulator keeps them (target sae runs). The FVU's denominator comes from the site_value sums."""
    if names.SAE_SQ_ERROR_SUM not in acc.sums:
        return
    wide = torch.promote_types(x_hat.dtype, torch.float32)
    error = x.to(x_hat.device, wide) - x_hat.to(wide)
    acc.add_scalar(names.SAE_SQ_ERROR_SUM, row, torch.linalg.vector_norm(error).square())
    acc.add_scalar(names.SAE_L0_SUM, row, torch.count_nonzero(f))


def add_clean_features(acc, row, agg: Aggregation, sae, z: torch.Tensor, selected: torch.Tensor,
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
        x = selected_rows(z, selected[part]) if needs_features else None
        f = sae.encode(x).detach() if needs_features else None
        if quality:
            _add_quality(acc, row, x, f, sae.decode(f))
        pull = _decoder_transpose(sae, weight, f)
        g_f = pull(g_chunk)
        add_kinds(acc, row, agg.kinds, f, g_f, part.start)
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


def accumulate_spliced(model, modules, batch: Batch, acc, agg: Aggregation, saes, layers: list[int]) -> None:
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
            hidden = output_tensor(output)
            flat = hidden.reshape(-1, hidden.shape[-1])
            z = flat.detach() if everywhere else selected_rows(flat.detach(), batch.selected)
            leaf["f"] = sae.encode(z).detach().requires_grad_(True)
            z_hat = sae.decode(leaf["f"]).to(hidden.dtype)
            leaf["z"], leaf["z_hat"] = z, z_hat.detach()
            spliced = z_hat if everywhere else flat.index_copy(0, batch.selected.to(flat.device), z_hat)
            return replace_output(output, spliced.view_as(hidden))

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
        hessian = leaf_hessian(batch, agg, layer, g_f, leaf["f"], rows) if agg.hessian else None
        with torch.no_grad():
            if names.SPLICED_LOSS_SUM in acc.sums:
                acc.add_scalar(names.SPLICED_LOSS_SUM, row, loss.detach())
            f, g_f, z, z_hat = leaf["f"].detach(), g_f.detach(), leaf["z"], leaf["z_hat"]
            if everywhere:  # rows are every position; keep the aggregated ones
                f, g_f, z, z_hat = (x.index_select(0, rows.to(x.device)) for x in (f, g_f, z, z_hat))
            if names.SITE_VALUE_PREFIX in acc.prefixes:
                acc.add(names.SITE_VALUE_PREFIX, row, z)
            _add_quality(acc, row, z, f, z_hat)
            add_kinds(acc, row, agg.kinds, f, g_f)
            if hessian is not None:
                acc.add(names.KIND_PREFIX["hessian"], row, hessian)
