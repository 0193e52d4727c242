"""An SAE's reconstruction quality per layer, derived from the store's float64 sums
(they add across shards like every other total, so this is exact for any sharding)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import constants as names

if TYPE_CHECKING:
    from ..store.zarr_store import ResultStore


def sae_quality(store: ResultStore) -> dict[str, dict] | None:
    """Layer -> {fvu, mean_l0, tokens[, clean/spliced loss]} for a target sae run (None otherwise).

    fvu = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the aggregated tokens, x the hook site's
    output and x_hat the SAE's reconstruction (model units); the denominator is
    sum ||x||^2 - ||sum x||^2 / N from the site_value sums. mean_l0: nonzero features per token.
    Splice modes also give the mean cross-entropy (nats per target token) with that layer's SAE
    spliced in (at the aggregated positions for splice, everywhere for splice-all) against the
    unmodified model's."""
    if not store.has(names.SAE_SQ_ERROR_SUM):
        return None
    value_sum, _, value_sq_sum = names.sum_names(names.SITE_VALUE_PREFIX)
    spliced_kept = store.has(names.SPLICED_LOSS_SUM)
    stored = store.read_many([names.TOKENS, names.SAE_SQ_ERROR_SUM, names.SAE_L0_SUM, value_sum, value_sq_sum,
                              names.LOSS_TOKENS, names.LOSS_SUM, names.LAYERS,
                              *([names.SPLICED_LOSS_SUM] if spliced_kept else [])])  # as last committed
    tokens = stored[names.TOKENS]
    errors, l0 = stored[names.SAE_SQ_ERROR_SUM], stored[names.SAE_L0_SUM]
    x_sum, x_sq_sum = stored[value_sum], stored[value_sq_sum]
    loss_tokens = max(int(stored[names.LOSS_TOKENS]), 1)
    clean = float(stored[names.LOSS_SUM]) / loss_tokens
    spliced = stored[names.SPLICED_LOSS_SUM] if spliced_kept else None
    out = {}
    for row, layer in enumerate(stored[names.LAYERS]):
        count = max(int(tokens[row]), 1)
        spread = float(x_sq_sum[row].sum() - (x_sum[row] ** 2).sum() / count)
        entry = {"tokens": int(tokens[row]),
                 "fvu": float(errors[row]) / spread if spread > 0 else None,  # None: x never varied
                 "mean_l0": float(l0[row]) / count}
        if spliced is not None:
            entry.update(clean_loss_nats_per_token=clean,
                         spliced_loss_nats_per_token=float(spliced[row]) / loss_tokens,
                         loss_increase_nats_per_token=float(spliced[row]) / loss_tokens - clean)
        out[str(int(layer))] = entry
    return out
