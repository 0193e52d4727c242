"""`raygrad compare RUN_A RUN_B`: which dimensions (SAE features) matter more for
one dataset than for another (a forget set against a retain set), from the two
runs' float64 sums alone.

Per kind, layer and dimension, with per-token samples x (n = the layer's
positions in each run, which may differ):

- mean_diff = mean_A - mean_B; mean_abs_diff = mean|x|_A - mean|x|_B
- mean_abs_ratio = (mean|x|_A + eps) / (mean|x|_B + eps), eps = --epsilon
  (absolute, default 1e-10, recorded), so a dimension at 0 in both runs is 1
- welch_t, welch_df: Welch's t of A against B for x, and its degrees of freedom
- welch_t_abs, welch_df_abs: the same for |x| (its sum of squares is x's)
- mean_abs_a, mean_abs_b: the two runs' mean |x|

The result is a directory of its own (never inside A or B) with a Zarr store
laid out like a run's (arrays {prefix}_{statistic}, dimensions layer and
dim/feature, `layer` a coordinate), consolidated_results.npz, metadata.json,
top_specific.txt and plots.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import zarr

from .. import constants as names
from ..config import MEASURED as MEASURED_PART
from ..config import RunConfig, fields_of, refuse_url
from ..errors import RaygradError
from ..store import stats
from ..store.files import replacing_directory
from ..store.layout import dimension_name
from ..store.zarr_store import ResultStore
from .top import format_rows, store_array_name, top_rows

DEFAULT_EPSILON = 1e-10
DEFAULT_BY = "welch_t_abs"
TOP_TXT = "top_specific.txt"
# What two runs must share to be compared: the config's measured part less the sample (which texts, how
# much of each, which probe draws: config.fields_of), each read from (config, plan). Most are the config's
# own value; these are read otherwise, so that one thing named two ways is one.
READ_MEASURED = {
    "model": lambda c, p: _model_identity(c, p),
    "layers": lambda c, p: p["layers"],  # resolved: '0-1' and '0,1' (or none, on a 2-layer model) are one
    "sae_path": lambda c, p: (p.get("sae_source") or {}).get("path") or c.sae_path,  # made absolute at the start
    "aggregate_by": lambda c, p: sorted(c.aggregate_by),
    "sae_dtype": lambda c, p: c.sae_dtype if c.target == "sae" else None,  # no SAE, no effect
}
MEASURED = tuple((name.replace("_", "-"), READ_MEASURED.get(name, lambda c, p, name=name: getattr(c, name)))
                 for name in fields_of(MEASURED_PART, sample=False, statistics=True))
MEASURED += (("width", lambda c, p: p["width"]),)  # resolved from the model or SAEs: the same names may differ


def default_output(run_a: Path, run_b: Path) -> Path:
    """Beside RUN_A: compare_{A}_vs_{B}, each name shortened to its last 15 characters (a run's
    timestamp) when long."""
    short = [p.name if len(p.name) <= 48 else p.name[-15:] for p in (run_a, run_b)]
    return run_a.parent / f"{names.COMPARE_PREFIX}_{short[0]}_vs_{short[1]}"


def compare_runs(run_a, run_b, output_dir=None, epsilon: float = DEFAULT_EPSILON, k: int = 20,
                 by: str = DEFAULT_BY) -> tuple[Path, str]:
    """Write the comparison of two complete runs; returns (its directory, the top lists as text)."""
    refuse_url("--output-dir", output_dir)
    run_a, run_b = Path(run_a), Path(run_b)
    if not 0 < epsilon < float("inf"):
        raise RaygradError(f"--epsilon {epsilon}: must be a number > 0")
    if k < 1:
        raise RaygradError(f"--k {k}: must be >= 1")
    for label, path in (("RUN_A", run_a), ("RUN_B", run_b)):
        if not (path / names.STORE_NAME).is_dir():
            raise RaygradError(f"{label} {path}: no {names.STORE_NAME} here")
    if run_a.resolve() == run_b.resolve():
        raise RaygradError(f"RUN_B {run_b}: is RUN_A itself; compare two different runs")
    output = Path(output_dir) if output_dir is not None else default_output(run_a, run_b)
    for label, path in (("RUN_A", run_a), ("RUN_B", run_b)):
        if output.resolve().is_relative_to(path.resolve()):
            raise RaygradError(f"--output-dir {output}: inside {label} {path}; a comparison never writes into a run")
    if output.exists():
        raise RaygradError(f"--output-dir {output}: exists; comparisons are never overwritten")
    a, b = (_open_run(label, path) for label, path in (("RUN_A", run_a), ("RUN_B", run_b)))
    _check_same_measurement(a, b)
    ranking = _ranking(a[0].prefixes(), by)

    with replacing_directory(output) as staging:
        text = _write(staging, a, b, run_a, run_b, epsilon, k, ranking)
    return output, text


def _open_run(label: str, path: Path) -> tuple[ResultStore, RunConfig, dict]:
    from .export import open_complete_run

    store, config = open_complete_run(path, label)
    return store, config, store.attrs[names.ATTR_PLAN]


def _model_identity(config: RunConfig, plan: dict) -> str:
    """A local model's directory, resolved, so one model named two ways (a bundled name and its
    directory, a relative and an absolute path) is one; a hub id, or a directory gone, as given."""
    path = plan.get("model_path")
    return str(Path(path).resolve()) if path and Path(path).is_dir() else config.model


def _check_same_measurement(a, b) -> None:
    (store_a, config_a, plan_a), (store_b, config_b, plan_b) = a, b
    for option, read in MEASURED:
        value_a, value_b = read(config_a, plan_a), read(config_b, plan_b)
        if value_a != value_b:
            raise RaygradError(f"RUN_A and RUN_B measured different things: --{option} {_show(value_a)} "
                               f"vs {_show(value_b)}")
    if store_a.prefixes() != store_b.prefixes():
        raise RaygradError(f"RUN_A and RUN_B measured different things: stored sums {', '.join(store_a.prefixes())} "
                           f"vs {', '.join(store_b.prefixes())}")


def _ranking(prefixes: list[str], by: str) -> tuple[str, str]:
    """--by -> (prefix, compare statistic): 'welch_t_abs' is the gradients', 'mean_abs_ratio_values' the values'."""
    name = store_array_name(by, {names.kind_of(p): p for p in prefixes})
    for prefix in prefixes:
        if name.startswith(prefix + "_") and name[len(prefix) + 1:] in names.COMPARE_STATISTICS:
            return prefix, name[len(prefix) + 1:]
    choices = [names.store_name(p, s) for p in prefixes for s in names.COMPARE_STATISTICS]
    raise RaygradError(f"--by {by}: choose from {', '.join(choices)} (or a statistic alone for gradients)")


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def compared(sums_a: list[np.ndarray], n_a: np.ndarray, sums_b: list[np.ndarray], n_b: np.ndarray,
             epsilon: float) -> dict[str, np.ndarray]:
    """Every compare statistic (float64) from two runs' (sum, abs_sum, sq_sum) and token counts (L, 1)."""
    mean_a, mean_b = (stats.derive("mean", *s, n) for s, n in ((sums_a, n_a), (sums_b, n_b)))
    abs_a, abs_b = (stats.derive("mean_abs", *s, n) for s, n in ((sums_a, n_a), (sums_b, n_b)))
    var_a, var_b = (stats.sample_variance(s[0], s[2], n) for s, n in ((sums_a, n_a), (sums_b, n_b)))
    var_abs_a, var_abs_b = (stats.sample_variance(s[1], s[2], n) for s, n in ((sums_a, n_a), (sums_b, n_b)))
    t, df = stats.welch(mean_a, var_a, n_a, mean_b, var_b, n_b)
    t_abs, df_abs = stats.welch(abs_a, var_abs_a, n_a, abs_b, var_abs_b, n_b)
    return {"mean_diff": mean_a - mean_b, "mean_abs_diff": abs_a - abs_b,
            "mean_abs_ratio": (abs_a + epsilon) / (abs_b + epsilon), "welch_t": t, "welch_t_abs": t_abs,
            "welch_df": df, "welch_df_abs": df_abs, "mean_abs_a": abs_a, "mean_abs_b": abs_b}


COMPARE_TEXT = {
    "mean_diff": "mean_A - mean_B of x", "mean_abs_diff": "mean_A - mean_B of |x|",
    "mean_abs_ratio": "(mean|x|_A + eps) / (mean|x|_B + eps)", "welch_t": "Welch's t of A against B for x",
    "welch_t_abs": "Welch's t of A against B for |x|", "welch_df": "Welch-Satterthwaite degrees of freedom for x",
    "welch_df_abs": "Welch-Satterthwaite degrees of freedom for |x|", "mean_abs_a": "mean of |x| in RUN_A",
    "mean_abs_b": "mean of |x| in RUN_B",
}


def _write(out: Path, a, b, run_a: Path, run_b: Path, epsilon: float, k: int, ranking: tuple[str, str]) -> str:
    (store_a, config_a, plan_a), (store_b, _, _) = a, b
    layers = [int(x) for x in store_a.array(names.LAYERS)[:]]
    tokens_a, tokens_b = store_a.array(names.TOKENS)[:], store_b.array(names.TOKENS)[:]
    group = zarr.open_group(str(out / names.STORE_NAME), mode="w-")
    for name, values, units in ((names.LAYERS, layers, "layer index"), (names.LAYER_COORD, layers, "layer index"),
                                (names.TOKENS_A, tokens_a, "positions"), (names.TOKENS_B, tokens_b, "positions")):
        array = group.create_array(name, data=np.asarray(values, dtype=np.int64 if "tokens" in name else np.int32),
                                   dimension_names=(names.LAYER_COORD,))
        array.attrs.update({"units": units, "description": f"{name} of each layer row"})
    consolidated = {}
    for prefix in store_a.prefixes():
        sums_a, sums_b = ([s.array(n)[:] for n in names.sum_names(prefix)] for s in (store_a, store_b))
        dims = (names.LAYER_COORD, dimension_name(prefix, plan_a.get("target", "mlp")))
        for statistic, values in compared(sums_a, tokens_a[:, None], sums_b, tokens_b[:, None], epsilon).items():
            name = names.store_name(prefix, statistic)
            array = group.create_array(name, data=values.astype(np.float32), chunks=(1, values.shape[1]),
                                       dimension_names=dims)
            unit = stats.array_attrs(prefix, "mean")["units"]
            array.attrs.update({"units": "" if "welch" in statistic or "ratio" in statistic else unit,
                                "description": f"{COMPARE_TEXT[statistic]}, x = {stats.UNITS[prefix][1]}"})
            for row, layer in enumerate(layers):
                consolidated[names.npz_key(layer, statistic, names.kind_of(prefix))] = values[row].astype(np.float32)
    prefix, statistic = ranking
    name = names.store_name(prefix, statistic)
    info = {"run_a": str(run_a.resolve()), "run_b": str(run_b.resolve()), "epsilon": epsilon, "by": name, "k": k}
    group.attrs.update({names.ATTR_VERSION: names.VERSION, names.ATTR_STATUS: names.STATUS_COMPLETE,
                        names.ATTR_PLAN: plan_a, names.ATTR_COMPARE: info})
    ResultStore(out / names.STORE_NAME, group).seal()  # its readers verify it like a run's store

    sides = {side: top_rows(group, name, k=k, order=order) for side, order in (("a", "largest"), ("b", "smallest"))}
    text = "\n".join([f"specific to A ({run_a}): largest {name}", format_rows(sides["a"], name), "",
                      f"specific to B ({run_b}): smallest {name}", format_rows(sides["b"], name)]) + "\n"
    (out / TOP_TXT).write_text(text)

    from .plots import write_compare_plots

    plots = write_compare_plots(out / names.PLOTS_DIR, layers, group[names.store_name(prefix, "mean_abs_a")][:],
                                group[names.store_name(prefix, "mean_abs_b")][:],
                                group[names.store_name(prefix, "welch_t_abs")][:], names.kind_of(prefix))
    metadata = {
        "raygrad_version": names.VERSION, "compare": info, "model_name": config_a.model,
        "target": plan_a.get("target", "mlp"), "hook_site": plan_a["hook_site"], "layers": layers,
        "tokens_a": [int(x) for x in tokens_a], "tokens_b": [int(x) for x in tokens_b],
        "statistics": {s: COMPARE_TEXT[s] for s in names.COMPARE_STATISTICS},
        "arrays": sorted(n for n, _ in group.arrays()),
        "top_a": [dataclasses.asdict(row) for row in sides["a"]],
        "top_b": [dataclasses.asdict(row) for row in sides["b"]],
        "plots": [p.name for p in plots],
    }
    consolidated[names.NPZ_METADATA_KEY] = np.array(json.dumps(metadata))
    np.savez(out / names.CONSOLIDATED_NPZ, **consolidated)
    (out / names.METADATA_JSON).write_text(json.dumps(metadata, indent=2) + "\n")
    return text
