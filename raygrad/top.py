"""The most important dimensions (SAE features) per layer, read lazily from a run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import constants as names
from .errors import RaygradError
from .results import open_results

NEURONPEDIA_URL = "https://www.neuronpedia.org/{model_and_sae}/{feature}"


@dataclass(frozen=True)
class TopRow:
    layer: int
    rank: int  # 1 = largest
    index: int  # dimension or feature index
    value: float
    url: str | None  # Neuronpedia page of the feature, when the SAE release names one


def top_features(run_dir, layer: int | None = None, k: int = 20, by: str = "mean_abs") -> list[TopRow]:
    """The k entries of `by` with the largest magnitude, per layer (or one layer)."""
    group = open_results(run_dir)
    if group.attrs.get(names.ATTR_STATUS) != names.STATUS_COMPLETE:
        raise RaygradError(f"RUN_DIR {run_dir}: the run is not complete; finish it with raygrad run --resume")
    available = [name for pair in names.MEAN_ARRAYS.values() for name in pair if name in group]
    if by not in available:
        raise RaygradError(f"--by {by}: this run has {', '.join(available)}")
    if k < 1:
        raise RaygradError(f"--k {k}: must be >= 1")
    layers = [int(x) for x in group[names.LAYERS][:]]
    if layer is not None and layer not in layers:
        raise RaygradError(f"--layer {layer}: this run has layers {', '.join(map(str, layers))}")
    saes = group.attrs[names.ATTR_PLAN].get("saes") or [{} for _ in layers]
    rows = []
    for row, current in enumerate(layers):
        if layer is not None and current != layer:
            continue
        values = group[by][row]  # one chunk row, read on demand
        order = np.argsort(-np.abs(values), kind="stable")[:k]
        neuronpedia_id = saes[row].get("neuronpedia_id") if by.startswith(("mean", "value", "attr", "hess")) else None
        for rank, index in enumerate(order, start=1):
            url = NEURONPEDIA_URL.format(model_and_sae=neuronpedia_id, feature=int(index)) if neuronpedia_id else None
            rows.append(TopRow(current, rank, int(index), float(values[index]), url))
    return rows


def format_rows(rows: list[TopRow], by: str) -> str:
    lines = [f"{'layer':>5} {'rank':>4} {'index':>7} {by:>14}" + ("  neuronpedia" if rows and rows[0].url else "")]
    for r in rows:
        lines.append(f"{r.layer:>5} {r.rank:>4} {r.index:>7} {r.value:>14.6g}" + (f"  {r.url}" if r.url else ""))
    return "\n".join(lines)
