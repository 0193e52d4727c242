"""The most important dimensions (SAE features) per layer, read lazily from a run
(or a compare result), one layer row at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import constants as names
from ..errors import RaygradError
from ..store import stats
from .results import open_results

NEURONPEDIA_URL = "https://www.neuronpedia.org/{model_and_sae}/{feature}"


@dataclass(frozen=True)
class TopRow:
    layer: int
    rank: int  # 1 = first
    index: int  # dimension or feature index
    value: float
    url: str | None  # Neuronpedia page of the feature, when the SAE release names one


def store_array_name(by: str, kinds: dict[str, str]) -> str:
    """Any spelling of the naming table -> the store's {prefix}_{statistic}: 'grad_std' stays,
    'std' (gradients' export key) and 'sem_values' (another kind's) are translated, as are the
    mean names of earlier stores ('mean_abs', 'site_mean_abs'). `kinds`: kind -> prefix."""
    if by in names.LEGACY_MEAN_NAMES:
        return names.LEGACY_MEAN_NAMES[by]
    for kind, prefix in kinds.items():
        for statistic in (*names.STATISTICS, *names.COMPARE_STATISTICS):
            if by == names.export_key(kind, statistic):
                return names.store_name(prefix, statistic)
    return by


def row_reader(group, by: str) -> tuple[str, Callable[[int], np.ndarray]]:
    """(store name, row -> (D,) values) for `by`: an array of the store, or a statistic derived from
    its sums (so every statistic of every kind is available, also in stores written before them)."""
    prefixes = [p for p in names.MEAN_ARRAYS if names.sum_names(p)[0] in group]
    kinds = {names.kind_of(p): p for p in prefixes}
    name = store_array_name(by, kinds or {k: names.prefix_of(k) for k in names.KIND_PREFIX})
    derivable = {names.store_name(p, s): (p, s) for p in prefixes for s in names.STATISTICS}
    if name in derivable:
        prefix, statistic = derivable[name]
        return name, lambda row: stats.from_group(group, prefix, statistic, row)
    if name in group and group[name].ndim == 2:
        return name, lambda row: group[name][row].astype(np.float64)
    available = list(derivable) or [n for n, a in group.arrays() if a.ndim == 2]
    raise RaygradError(f"--by {by}: this run has {', '.join(sorted(available))}")


def neuronpedia_ids(group, name: str, num_layers: int) -> list[str | None]:
    """Per layer, the SAE's Neuronpedia id when `name` is indexed by SAE features."""
    saes = group.attrs.get(names.ATTR_PLAN, {}).get("saes") or [{} for _ in range(num_layers)]
    if name.startswith((names.SITE_PREFIX + "_", names.SITE_VALUE_PREFIX + "_")):  # the site's dims
        return [None] * num_layers
    return [sae.get("neuronpedia_id") for sae in saes]


def ranked(values: np.ndarray, k: int, order: str = "magnitude") -> np.ndarray:
    """Indices of the k first entries: largest |v| ('magnitude'), largest v, or smallest v."""
    key = {"magnitude": -np.abs(values), "largest": -values, "smallest": values}[order]
    return np.argsort(key, kind="stable")[:k]


def top_rows(group, by: str, layer: int | None = None, k: int = 20, order: str = "magnitude") -> list[TopRow]:
    if k < 1:
        raise RaygradError(f"--k {k}: must be >= 1")
    name, read = row_reader(group, by)
    layers = [int(x) for x in group[names.LAYERS][:]]
    if layer is not None and layer not in layers:
        raise RaygradError(f"--layer {layer}: this run has layers {', '.join(map(str, layers))}")
    pages = neuronpedia_ids(group, name, len(layers))
    rows = []
    for row, current in enumerate(layers):
        if layer is not None and current != layer:
            continue
        values = read(row)  # one chunk row, read on demand
        for rank, index in enumerate(ranked(values, k, order), start=1):
            url = NEURONPEDIA_URL.format(model_and_sae=pages[row], feature=int(index)) if pages[row] else None
            rows.append(TopRow(current, rank, int(index), float(values[index]), url))
    return rows


def top_features(run_dir, layer: int | None = None, k: int = 20, by: str = "mean_abs") -> list[TopRow]:
    """The k entries of `by` with the largest magnitude, per layer (or one layer)."""
    group = open_results(run_dir)
    if group.attrs.get(names.ATTR_STATUS) != names.STATUS_COMPLETE:
        raise RaygradError(f"RUN_DIR {run_dir}: the run is not complete; finish it with raygrad run --resume")
    return top_rows(group, by, layer, k)


def format_rows(rows: list[TopRow], by: str) -> str:
    lines = [f"{'layer':>5} {'rank':>4} {'index':>7} {by:>14}" + ("  neuronpedia" if rows and rows[0].url else "")]
    for r in rows:
        lines.append(f"{r.layer:>5} {r.rank:>4} {r.index:>7} {r.value:>14.6g}" + (f"  {r.url}" if r.url else ""))
    return "\n".join(lines)
