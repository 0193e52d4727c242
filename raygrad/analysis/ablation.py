"""`raygrad ablate`'s reading side: which entries (site dimensions or SAE features) to ablate, checked
against the run (--features, --from-compare, --from-top, --mode), and the report derived from an
ablation store's sums (raygrad.compute.ablation writes them), as JSON and as a table.

The report, per target token (n = target tokens of all texts, N = texts with at least one target):

- loss = sum_i C_i / n and loss_ablated = sum_i A_i / n (C_i, A_i: text i's summed clean and ablated loss)
- delta = sum_i d_i / n, d_i = A_i - C_i: a ratio of sums, so every token weighs the same
- delta_ci95: paired over texts. Each text is one pair (its clean and ablated summed loss over the same
  tokens); the interval is the t-interval (N - 1 degrees of freedom) of the mean of the linearized
  per-text values e_i = delta + (d_i - delta * n_i) / (n / N), whose mean is delta: the ratio's delta
  method. Where every text has as many targets, e_i is text i's per-token difference and this is
  exactly scipy.stats.ttest_rel(ablated per-token loss, clean per-token loss).confidence_interval().
- predicted_delta = sum over texts and positions of g * (a' - a), over n (first order, same pass; g is 0 where no
  target depends on the position)
- each (--each): per entry alone, its delta and predicted_delta; pearson: their Pearson correlation
  over the entries (None with fewer than two entries or a constant side).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import constants as names
from ..errors import RaygradError
from ..store.partial import Partial

CONFIDENCE = 0.95
MODES = ("zero", "mean", "clamp")
JSON_KEYS = ("mode", "features", "tokens", "loss", "loss_ablated", "delta", "delta_ci95", "predicted_delta", "each",
             "pearson")


@dataclass(frozen=True)
class Mode:
    name: str  # zero / mean / clamp
    clamp: float | None = None  # C for clamp

    @property
    def label(self) -> str:
        """As given: 'zero', 'mean', 'clamp=-2.5'."""
        return f"clamp={self.clamp:g}" if self.name == "clamp" else self.name


def parse_mode(text: str) -> Mode:
    """--mode zero | mean | clamp=VALUE; one line for anything else."""
    if text in ("zero", "mean"):
        return Mode(text)
    if text.startswith("clamp="):
        try:
            value = float(text[len("clamp="):])
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise RaygradError(f"--mode {text}: clamp= takes a finite number, e.g. clamp=-5")
        return Mode("clamp", value)
    raise RaygradError(f"--mode {text}: choose zero, mean or clamp=VALUE (a number)")


def parse_features(text: str) -> list[tuple[int, int]]:
    """'2:17,3:5' -> [(2, 17), (3, 5)]: model layer and index, as given; one line for a malformed entry."""
    entries = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if not match:
            raise RaygradError(f"--features {text}: {part.strip()!r} is not LAYER:INDEX (e.g. 2:17,3:5)")
        entries.append((int(match.group(1)), int(match.group(2))))
    return entries


def check_entries(entries: list[tuple[int, int]], layers: list[int], width: int, option: str, what: str) -> None:
    """One line for an entry whose layer the run did not collect, whose index is outside the width, or
    that is listed twice."""
    seen = set()
    for layer, index in entries:
        if layer not in layers:
            raise RaygradError(f"{option}: layer {layer} (in {layer}:{index}) was not collected by this run; it has "
                               f"layers {', '.join(map(str, layers))}")
        if not 0 <= index < width:
            raise RaygradError(f"{option}: {what} {index} (in {layer}:{index}) is outside 0-{width - 1}")
        if (layer, index) in seen:
            raise RaygradError(f"{option}: {layer}:{index} is listed twice")
        seen.add((layer, index))


def from_ranking(group, name: str, k: int, order: str) -> list[tuple[int, int]]:
    """The k first (layer, index) over every layer of `group` by its array or statistic `name`
    ('largest' v, or 'magnitude' |v|); ties by layer, then index."""
    from .top import top_rows

    if k < 1:
        raise RaygradError(f"--k {k}: must be >= 1")
    rows = top_rows(group, name, k=k, order=order)
    key = (lambda r: -r.value) if order == "largest" else (lambda r: -abs(r.value))
    rows = sorted(rows, key=lambda r: (key(r), r.layer, r.index))[:k]
    return [(r.layer, r.index) for r in rows]


def comparison_entries(directory: Path, k: int) -> list[tuple[int, int]]:
    """--from-compare DIR --k N: the N first by the comparison's own ranking (its --by, largest first:
    what is most specific to its RUN_A)."""
    from .results import open_results

    store = Path(directory) / names.STORE_NAME
    if not store.is_dir():
        raise RaygradError(f"--from-compare {directory}: not a comparison (no {names.STORE_NAME}); give the "
                           "directory raygrad compare wrote")
    group = open_results(directory)
    info = group.attrs.get(names.ATTR_COMPARE)
    if not info:
        raise RaygradError(f"--from-compare {directory}: a run, not a comparison (raygrad compare RUN_A RUN_B writes "
                           "one)")
    return from_ranking(group, info["by"], k, "largest")


def top_entries(group, k: int) -> tuple[list[tuple[int, int]], str]:
    """--from-top --k N: the N first of the run by |attribution| (mean over tokens of g * a) where it
    collected attribution, else by the mean |gradient| (`raygrad top`'s default)."""
    by = names.store_name(names.KIND_PREFIX["attribution"], "mean")
    if names.sum_names(names.KIND_PREFIX["attribution"])[0] not in group:
        by = names.store_name(names.KIND_PREFIX["gradients"], "mean_abs")
    return from_ranking(group, by, k, "magnitude"), by


def mean_values(totals: Partial, rows: list[int], indices: list[int]) -> list[float]:
    """The run's mean value of each entry (its `value` sums over its tokens)."""
    value_sum = totals.sums[names.sum_names(names.KIND_PREFIX["values"])[0]]
    return [float(value_sum[row, index] / max(int(totals.tokens[row]), 1)) for row, index in zip(rows, indices)]


def file_stem(mode: Mode, entries: list[tuple[int, int]], each: bool, dataset: str | None) -> str:
    """RUN/ablations/<stem>.json: the mode, the entries (the first three and a digest of all when more),
    --each, and the texts ('run' for the run's own)."""
    listed = [f"{layer}-{index}" for layer, index in entries]
    shown = "_".join(listed) if len(listed) <= 3 else (
        "_".join(listed[:3]) + f"_and{len(listed) - 3}_" + hashlib.sha256(",".join(listed).encode()).hexdigest()[:8])
    texts = "run" if dataset is None else re.sub(r"[^A-Za-z0-9.-]+", "-", Path(dataset.rstrip("/")).name)[:40]
    label = re.sub(r"[^A-Za-z0-9.-]+", "", mode.label.replace("=", "-"))
    return f"{label}_{shown}{'_each' if each else ''}_{texts}"


def report(totals: Partial, mode: Mode, entries: list[tuple[int, int]], each: bool) -> dict:
    """The report (module docstring) from an ablation store's totals: row 0 the joint ablation, rows
    1.. each entry alone."""
    from scipy import stats as scipy_stats

    sums, tokens = totals.sums, int(totals.loss_tokens)
    per_token = 1.0 / max(tokens, 1)
    texts = float(sums[names.ABLATED_TEXTS][0])
    delta = float(sums[names.ABLATED_DELTA_SUM][0]) * per_token
    # sum_i (d_i - delta n_i)^2 from the sums, clipped at 0 against rounding
    residual = max(0.0, float(sums[names.ABLATED_DELTA_SQ_SUM][0] - 2 * delta * sums[names.ABLATED_DELTA_TOKENS_SUM][0]
                              + delta * delta * sums[names.ABLATED_TOKENS_SQ_SUM][0]))
    if texts >= 2 and tokens:
        scale = math.sqrt(residual / (texts * (texts - 1))) / (tokens / texts)
        half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, texts - 1)) * scale
        interval = [delta - half, delta + half]
    else:
        interval = [None, None]  # one text: no spread to estimate
    each_rows = [{"layer": layer, "feature": index,
                  "delta": float(sums[names.ABLATED_DELTA_SUM][row]) * per_token,
                  "predicted_delta": float(sums[names.ABLATED_PREDICTED_SUM][row]) * per_token}
                 for row, (layer, index) in enumerate(entries, start=1)] if each else []
    return {
        "mode": mode.label,
        "features": [{"layer": layer, "feature": index} for layer, index in entries],
        "tokens": tokens,
        "loss": totals.loss_sum * per_token,
        "loss_ablated": float(sums[names.ABLATED_LOSS_SUM][0]) * per_token,
        "delta": delta,
        "delta_ci95": interval,
        "predicted_delta": float(sums[names.ABLATED_PREDICTED_SUM][0]) * per_token,
        "each": each_rows,
        "pearson": pearson([r["predicted_delta"] for r in each_rows], [r["delta"] for r in each_rows]),
    }


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson's r of x and y; None with fewer than two points or a constant side."""
    if len(x) < 2:
        return None
    x, y = np.asarray(x) - np.mean(x), np.asarray(y) - np.mean(y)
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denominator if denominator > 0 else None


def table(result: dict, what: str = "feature") -> str:
    """The report as lines: the joint ablation, then (--each) each entry alone."""
    def number(value) -> str:
        return "n/a" if value is None else f"{value:+.6f}"

    low, high = result["delta_ci95"]
    listed = ", ".join(f"{e['layer']}:{e['feature']}" for e in result["features"])
    lines = [f"ablate   {len(result['features'])} {what}(s) {listed}, mode {result['mode']}, "
             f"{result['tokens']:,} target tokens",
             f"{'':<22}{'loss':>11}{'ablated':>11}{'delta':>11}{'95% interval':>25}{'predicted':>11}",
             f"{'jointly':<22}{result['loss']:>11.6f}{result['loss_ablated']:>11.6f}{number(result['delta']):>11}"
             f"{'[' + number(low) + ', ' + number(high) + ']':>25}{number(result['predicted_delta']):>11}"]
    for row in result["each"]:
        lines.append(f"{'  alone ' + str(row['layer']) + ':' + str(row['feature']):<22}{'':>22}"
                     f"{number(row['delta']):>11}{'':>25}{number(row['predicted_delta']):>11}")
    if result["each"]:
        lines.append(f"pearson  {number(result['pearson'])} (predicted vs actual delta over the {what}s alone)")
    lines.append("         nats per target token; delta = ablated - clean, paired over texts")
    return "\n".join(lines)


def ablation_files(run_dir: Path) -> list[Path]:
    """The finished ablations of a run (RUN/ablations/*.json), oldest name first."""
    folder = Path(run_dir) / names.ABLATIONS_DIR
    return sorted(folder.glob("*.json")) if folder.is_dir() else []
