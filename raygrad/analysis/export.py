"""Exports, all generated from the store: per-layer .npy, consolidated .npz,
metadata.json and timing files (names follow the original scripts).

`raygrad export RUN_DIR` calls `write_exports` again; `raygrad export RUN_DIR
--aggregation-mode/--power/--normalize-mode` writes a new export set in
RUN_DIR/exports/<name>/ (`write_export_set`). Nothing here reads anything but
the store."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from .. import constants as names
from ..config import RunConfig
from ..errors import RaygradError
from ..store import stats
from ..store.files import replacing, replacing_directory
from ..store.zarr_store import ResultStore
from .sae_quality import sae_quality


def exported_arrays(store: ResultStore, config: RunConfig,
                    modes: tuple[str, ...] | None = None) -> dict[tuple[str, str, str | None], np.ndarray]:
    """(kind, statistic, normalize mode or None) -> (L, D) float32, derived from the float64 sums for
    every kind the run aggregated and each statistic (default: those the run exports), then --power,
    then --normalize-mode (docs/outputs.md "Names": None keeps the original's names, a mode adds `_norm_{mode}`)."""
    sum_names = {kind: names.sum_names(names.KIND_PREFIX[kind]) for kind in config.aggregate_by}
    stored = store.read_many([names.TOKENS, *(name for kind in sum_names for name in sum_names[kind])])
    count = stored[names.TOKENS][:, None]
    arrays = {}
    for kind in config.aggregate_by:
        sums = [stored[name] for name in sum_names[kind]]
        for statistic in modes or config.export_modes:
            powered = stats.transform(stats.derive(statistic, *sums, count), config.power)
            for norm in config.normalize_modes:
                arrays[(kind, statistic, norm)] = stats.transform(
                    powered, normalize=norm or config.normalization).astype(np.float32)
    return arrays


def write_exports(run_dir: Path, with_outputs: bool | None = None, extra_npz: Path | None = None,
                  with_plots: bool | None = None) -> list[Path]:
    """(Re)write every export of a complete run; returns the files written.

    `with_outputs` overrides the run's --save-outputs (npy files and plots), `with_plots` its
    --plots/--no-plots; `extra_npz` is a second place for the consolidated file (--save-consolidated)."""
    run_dir = Path(run_dir)
    store, config = open_complete_run(run_dir)
    return _write(store, config, run_dir, *_outputs_and_plots(config, with_outputs, with_plots), extra_npz)


def export_set_name(config: RunConfig) -> str:
    """e.g. 'mean_abs-std_power2_norm_sum_abs': what an export set holds, as a directory name."""
    return f"{'-'.join(config.export_modes)}_power{config.power:g}_norm_{config.normalize_mode or config.normalization}"


def write_export_set(run_dir: Path, options: dict, name: str | None = None, with_outputs: bool | None = None,
                     with_plots: bool | None = None) -> tuple[Path, list[Path]]:
    """A new export set RUN_DIR/exports/NAME derived from the store with `options` (aggregation_mode,
    power, normalize_mode) replacing the run's; never overwrites one: an existing NAME is refused.
    Written in a hidden directory renamed into place once whole."""
    run_dir = Path(run_dir)
    store, config = open_complete_run(run_dir)
    if "normalize_mode" in options:
        options = {**options, "normalize_gradients": False}  # the mode given replaces the run's
    config = dataclasses.replace(config, **options)
    name = name or export_set_name(config)
    if not name or "/" in name or name.startswith("."):
        raise RaygradError(f"--name {name!r}: must be a plain directory name")
    target = run_dir / names.EXPORT_SETS_DIR / name
    if target.exists():
        raise RaygradError(f"--name {name}: {target} exists; export sets are never overwritten (give another --name)")
    outputs = _outputs_and_plots(config, with_outputs, with_plots)
    with replacing_directory(target) as staging:
        written = _write(store, config, staging, *outputs, None, export_set=name)
    return target, [target / path.relative_to(staging) for path in written]


def open_complete_run(run_dir: Path, label: str = "") -> tuple[ResultStore, RunConfig]:
    """The verified store of a complete run and its configuration; one line otherwise.
    `label` names the argument in that line (RUN_A, ...)."""
    where = f"{label} {run_dir}" if label else f"{run_dir}"
    store = ResultStore.open(Path(run_dir) / names.STORE_NAME)
    attrs = store.attrs
    if attrs.get(names.ATTR_STATUS) != names.STATUS_COMPLETE:
        raise RaygradError(f"{where}: the run is not complete; finish it with: raygrad run --resume {run_dir}")
    if names.ATTR_CONFIG not in attrs:
        raise RaygradError(f"{where}: not a raygrad run but a comparison (written whole, exports included; "
                           "read it with open_results or its .npz)")
    return store, RunConfig.from_dict(attrs[names.ATTR_CONFIG])


def _outputs_and_plots(config: RunConfig, with_outputs: bool | None, with_plots: bool | None) -> tuple[bool, bool]:
    """(write the per-layer .npy files, draw the plots): the run's choices unless overridden; --plots
    without the .npy files is one line, before anything is written."""
    save_outputs = config.save_outputs if with_outputs is None else with_outputs
    if with_plots and not save_outputs:
        raise RaygradError("--plots: plots are drawn beside the per-layer .npy files; add --save-outputs "
                           "(this run was made without it)")
    return save_outputs, save_outputs and (config.plots if with_plots is None else with_plots)


def _write(store: ResultStore, config: RunConfig, out_dir: Path, save_outputs: bool, plots: bool,
           extra_npz: Path | None, export_set: str | None = None) -> list[Path]:
    started = time.perf_counter()
    layers = [int(layer) for layer in store.array(names.LAYERS)[:]]
    arrays = exported_arrays(store, config)
    values = {names.export_key(*key): array for key, array in arrays.items()}

    written: list[Path] = []
    if save_outputs:
        for (kind, mode, norm), array in arrays.items():
            for row, layer in enumerate(layers):
                path = out_dir / names.layer_npy_name(layer, mode, kind, norm)
                with replacing(path) as handle:
                    np.save(handle, array[row])
                written.append(path)

    metadata = build_metadata(store, config, layers, values)
    metadata["export_set"] = export_set
    consolidated = {names.npz_key(layer, mode, kind, norm): array[row]
                    for (kind, mode, norm), array in arrays.items() for row, layer in enumerate(layers)}
    # JSON in a 0-d unicode array: loads with allow_pickle=False.
    consolidated[names.NPZ_METADATA_KEY] = np.array(json.dumps(metadata))
    for path in [out_dir / names.CONSOLIDATED_NPZ] + ([Path(extra_npz)] if extra_npz else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as handle:
            np.savez(handle, **consolidated)
        written.append(path)

    if plots:
        from .plots import write_plots

        written.extend(write_plots(out_dir / names.PLOTS_DIR, layers, values))

    timing = dict(store.attrs.get(names.ATTR_TIMING, {}))
    timing["export_seconds"] = time.perf_counter() - started
    metadata["timing"] = timing
    _write_json(out_dir / names.TIMING_JSON, timing)
    with replacing(out_dir / names.TIMING_TXT) as handle:
        handle.write(timing_summary(timing, metadata).encode())
    written += [out_dir / names.TIMING_JSON, out_dir / names.TIMING_TXT]
    # Last, with a digest of every file written in the run directory: its presence says the set is
    # whole, and `check_exports` (raygrad info, --resume) finds one that went missing or changed.
    metadata[names.EXPORT_FILES_KEY] = {str(path.relative_to(out_dir)): file_digest(path)
                                        for path in written if path.is_relative_to(out_dir)}
    _write_json(out_dir / names.METADATA_JSON, metadata)
    return written + [out_dir / names.METADATA_JSON]


def check_exports(run_dir: Path) -> list[str]:
    """What is wrong with a complete run's exports (missing or changed files); [] when whole."""
    run_dir = Path(run_dir)
    try:
        recorded = json.loads((run_dir / names.METADATA_JSON).read_text())[names.EXPORT_FILES_KEY]
    except FileNotFoundError:
        return [f"{names.METADATA_JSON} is missing"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{names.METADATA_JSON} is damaged"]
    problems = []
    for name, digest in recorded.items():
        path = run_dir / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif file_digest(path) != digest:
            problems.append(f"{name} is damaged")
    return problems


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_metadata(store: ResultStore, config: RunConfig, layers: list[int], values: dict[str, np.ndarray]) -> dict:
    attrs = store.attrs
    plan = attrs[names.ATTR_PLAN]
    stored = store.read_many([names.TOKENS, names.LOSS_TOKENS, names.LOSS_SUM])
    tokens, loss_tokens = stored[names.TOKENS], int(stored[names.LOSS_TOKENS])
    per_layer = {}
    for row, layer in enumerate(layers):
        entry = {"tokens": int(tokens[row])}
        for mode, array in values.items():
            v = array[row].astype(np.float64)
            entry[mode] = {"mean": float(v.mean()), "std": float(v.std()), "max": float(v.max()),
                           "min": float(v.min()), "sum_abs": float(np.abs(v).sum())}
        per_layer[str(layer)] = entry
    return {
        "raygrad_version": attrs.get(names.ATTR_VERSION, names.VERSION),
        "exported_by_version": names.VERSION,
        "configuration": config.to_dict(),
        "plan": plan,
        "model_name": config.model,
        "family": plan["family"],
        "hook_site": plan["hook_site"],
        "module_paths": plan["module_paths"],
        "target": plan.get("target", "mlp"),
        "saes": plan.get("saes"),
        "layers": layers,
        "dimension_sizes": {str(layer): plan["width"] for layer in layers},
        "aggregation_modes": list(config.export_modes),
        "aggregated": list(config.aggregate_by),
        "exported_arrays": list(values),
        "power": config.power,
        "normalize_mode": config.normalize_mode or config.normalization,
        "normalized": (config.normalize_mode or config.normalization) != "none",
        "num_samples_requested": plan["samples_requested"],
        "num_samples": plan["samples"],
        "target_tokens": loss_tokens,
        "mean_loss_nats_per_token": float(stored[names.LOSS_SUM]) / max(loss_tokens, 1),
        "layer_statistics": per_layer,
        "sae_quality": sae_quality(store),  # per layer FVU, mean L0, spliced loss (sae_quality.py); None for mlp
        "loading_instructions": {
            "npy": "np.load('layer_{layer}_{mode}_gradients.npy') -> (dimension,) float32",
            "npz": "d = np.load('consolidated_results.npz'); d['layer_{layer}_{mode}']; "
                   "json.loads(d['metadata'].item()) -> this metadata",
            "raygrad": "raygrad.load_results(path) -> arrays in memory; raygrad.open_results(path) -> lazy Zarr",
            "zarr": "zarr.open_group('results.zarr', mode='r')['grad_mean_abs'][layer_row] (rows follow 'layers')",
            "xarray": "xarray.open_zarr('results.zarr').grad_mean_abs.sel(layer=layer)",
        },
    }


def timing_summary(timing: dict, metadata: dict) -> str:
    lines = [
        "raygrad timing summary",
        f"model:                 {metadata['model_name']}",
        f"layers:                {len(metadata['layers'])}",
        f"samples:               {metadata['num_samples']}",
        f"target tokens:         {metadata['target_tokens']}",
        f"planning (s):          {timing.get('plan_seconds', 0):.2f}",
        f"worker model load (s): {timing.get('worker_load_seconds', 0):.2f}",
        f"compute (s):           {timing.get('compute_seconds', 0):.2f}",
        f"tokens per second:     {timing.get('tokens_per_second', 0):.1f} (wall clock, model loading included)",
        f"  per worker computing: {timing.get('worker_tokens_per_second', 0):.1f}",
        f"export (s):            {timing.get('export_seconds', 0):.2f}",
        f"resumed:               {timing.get('resumed', False)}",
    ]
    if "partials_received" in timing:  # what the head received (raygrad 0.3 on)
        lag = timing.get("checkpoint_lag_seconds", {})
        lines += [
            f"partials received:     {timing['partials_received']} ({timing.get('bytes_received', 0) / 2**20:.1f} MiB)",
            f"head reducing (s):     {timing.get('reduce_seconds', 0):.2f}",
            f"checkpoints:           {timing.get('checkpoints', 0)} ({timing.get('checkpoint_write_seconds', 0):.2f} s "
            f"writing; a shard on disk {lag.get('mean', 0):.2f} s after it arrived on average, "
            f"{lag.get('max', 0):.2f} s at most)",
        ]
    if "worker_idle_fraction" in timing:  # Ray workers only
        lines.append(f"worker idle:           {timing['worker_idle_fraction']:.1%} of their time up "
                     "(no shard computing or queued)")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, data: dict) -> None:
    with replacing(path) as handle:
        handle.write((json.dumps(data, indent=2) + "\n").encode())
