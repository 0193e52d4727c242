"""Per-dimension statistics derived from a run's float64 sums: nothing here is
accumulated, so any statistic can be asked for after the run (DESIGN §1).

For one layer and dimension, with n positions, S = sum x, A = sum |x|, Q = sum x^2:

- mean = S / n, mean_abs = A / n, mean_sq = Q / n (for gradients: the
  diagonal of the empirical Fisher, E[g^2])
- std = sqrt((Q - S^2 / n) / (n - 1)), the sample standard deviation over
  positions (ddof 1); sem = std / sqrt(n)

A layer with no positions has every statistic 0 (not NaN), and std/sem are 0
with fewer than 2 positions.
"""

from __future__ import annotations

import numpy as np

from .. import constants as names

UNITS = {  # prefix -> (unit of x, what x is)
    "grad": ("nats per unit of the target", "dLoss/dz: gradient of the summed next-token loss w.r.t. the target"),
    "value": ("units of the target", "z: the target's value (hook-site output or SAE feature activation)"),
    "attr": ("nats", "z * dLoss/dz: gradient times value"),
    "hess": ("nats per unit of the target squared",
             "d2Loss/dz2 diagonal: Hutchinson estimate v * (H v), Rademacher v (--hessian-probes per batch)"),
    names.SITE_PREFIX: ("nats per unit of the hook-site output", "dLoss/dz at the hook site (the SAE error node)"),
    names.SITE_VALUE_PREFIX: ("units of the hook-site output", "x: the hook site's output, the SAE's input"),
}
STATISTIC_TEXT = {
    "sum": "sum over positions of x", "abs_sum": "sum over positions of |x|", "sq_sum": "sum over positions of x^2",
    "mean": "mean over positions of x", "mean_abs": "mean over positions of |x|",
    "mean_sq": "mean over positions of x^2 (for gradients: diagonal empirical Fisher)",
    "std": "sample standard deviation over positions of x (ddof 1)", "sem": "standard error of the mean: std / sqrt(n)",
}


def sample_variance(total: np.ndarray, sq_total: np.ndarray, count) -> np.ndarray:
    """Unbiased variance from a sum and a sum of squares (0 where n < 2; clipped at 0 against rounding)."""
    n = np.asarray(count, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = np.maximum(sq_total - total * total / np.maximum(n, 1), 0.0)
        return np.where(n >= 2, spread / np.maximum(n - 1, 1), 0.0)


def derive(statistic: str, total: np.ndarray, abs_total: np.ndarray, sq_total: np.ndarray, count) -> np.ndarray:
    """One statistic (float64) from the three sums; `count` broadcasts against them ((L, 1) or a scalar)."""
    n = np.maximum(np.asarray(count, dtype=np.float64), 1.0)
    if statistic == "mean":
        return total / n
    if statistic == "mean_abs":
        return abs_total / n
    if statistic == "mean_sq":
        return sq_total / n
    std = np.sqrt(sample_variance(total, sq_total, count))
    if statistic == "std":
        return std
    if statistic == "sem":
        return std / np.sqrt(n)
    raise ValueError(f"statistic {statistic!r}: one of {', '.join(names.STATISTICS)}")


def from_group(group, prefix: str, statistic: str, row: int | None = None) -> np.ndarray:
    """A statistic of one prefix from a store's sums: (L, D), or (D,) for one row (reads only that row)."""
    index = slice(None) if row is None else row
    sums = [group[name][index] for name in names.sum_names(prefix)]
    count = group[names.TOKENS][index]
    return derive(statistic, *sums, count if row is not None else np.asarray(count)[:, None])


def transform(values: np.ndarray, power: float = 1.0, normalize: str = "none") -> np.ndarray:
    """The original's later options, in its order, row by row (one row = one layer), float64:
    power: sign(x)|x|^P (x^P for the non-negative statistics);
    normalize: sum_abs x*D/sum|x|, sum x*D/sum x, none; a row whose sum is 0 is left as it is."""
    v = np.asarray(values, dtype=np.float64)
    if power != 1:
        v = np.sign(v) * np.abs(v) ** power
    if normalize == "none":
        return v
    total = (np.abs(v) if normalize == "sum_abs" else v).sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total != 0, v * v.shape[-1] / np.where(total != 0, total, 1.0), v)


def welch(mean_a, var_a, n_a, mean_b, var_b, n_b) -> tuple[np.ndarray, np.ndarray]:
    """Welch's t of A against B and its Welch-Satterthwaite degrees of freedom. Where both standard
    errors are 0 (a dimension constant in both runs, e.g. a feature that never fires) t and df are 0."""
    n_a, n_b = (np.maximum(np.asarray(n, dtype=np.float64), 1.0) for n in (n_a, n_b))
    se_a, se_b = var_a / n_a, var_b / n_b
    se = se_a + se_b
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, (mean_a - mean_b) / np.sqrt(se), 0.0)
        df = np.where(se > 0, se * se / (se_a**2 / np.maximum(n_a - 1, 1) + se_b**2 / np.maximum(n_b - 1, 1)), 0.0)
    return t, df


def array_attrs(prefix: str, statistic: str) -> dict:
    """Units and a description for the array {prefix}_{statistic} of a run's store."""
    unit, what = UNITS.get(prefix, ("", prefix))
    if statistic in ("sq_sum", "mean_sq"):
        unit = f"({unit})^2"
    return {"units": unit, "description": f"{STATISTIC_TEXT.get(statistic, statistic)}, x = {what}"}
