"""Exports, all generated from the store: per-layer .npy, consolidated .npz,
metadata.json and timing files (names follow the original scripts).

`raygrad export RUN_DIR` calls `write_exports` again; nothing here reads
anything but the store."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np

from . import __version__
from . import constants as names
from .config import RunConfig
from .errors import RaygradError
from .quality import sae_quality
from .store import ResultStore


def aggregated(store: ResultStore, name: str, normalize: bool) -> np.ndarray:
    """(L, D) float32 from a mean array (`mean`, `mean_abs`, `value_mean`, ...),
    rescaled so each row has sum(|v|) == D when `normalize`."""
    values = store.group[name][:].astype(np.float32)
    if normalize:
        scale = np.abs(values).sum(axis=1, keepdims=True)
        values = np.where(scale > 0, values * values.shape[1] / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    return values


def exported_arrays(store: ResultStore, config: RunConfig,
                    modes: tuple[str, ...] | None = None) -> dict[tuple[str, str], np.ndarray]:
    """(kind, mode) -> (L, D) for every kind the run aggregated and each mode
    (default: the modes the run exports). --normalize-gradients rescales the
    gradient kind only."""
    return {
        (kind, mode): aggregated(store, names.mean_name(names.KIND_PREFIX[kind], mode),
                                 config.normalize_gradients and kind == "gradients")
        for kind in config.aggregate_by for mode in (modes or config.export_modes)
    }


def write_exports(run_dir: Path, with_outputs: bool | None = None, extra_npz: Path | None = None) -> list[Path]:
    """(Re)write every export of a complete run; returns the files written.

    `with_outputs` overrides the run's --save-outputs (npy files and plots);
    `extra_npz` is a second place for the consolidated file (--save-consolidated)."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    store = ResultStore.open(run_dir / names.STORE_NAME)
    attrs = store.attrs
    if attrs.get(names.ATTR_STATUS) != names.STATUS_COMPLETE:
        raise RaygradError(f"{run_dir}: the run is not complete; finish it with: raygrad run --resume {run_dir}")
    config = RunConfig.from_dict(attrs[names.ATTR_CONFIG])
    save_outputs = config.save_outputs if with_outputs is None else with_outputs
    layers = [int(layer) for layer in store.group[names.LAYERS][:]]
    arrays = exported_arrays(store, config)
    values = {names.export_key(kind, mode): array for (kind, mode), array in arrays.items()}

    written: list[Path] = []
    if save_outputs:
        for (kind, mode), array in arrays.items():
            for row, layer in enumerate(layers):
                path = run_dir / names.layer_npy_name(layer, mode, kind)
                with _replacing(path) as handle:
                    np.save(handle, array[row])
                written.append(path)

    metadata = build_metadata(store, config, layers, values)
    consolidated = {names.npz_key(layer, mode, kind): array[row]
                    for (kind, mode), array in arrays.items() for row, layer in enumerate(layers)}
    # JSON in a 0-d unicode array: loads with allow_pickle=False.
    consolidated[names.NPZ_METADATA_KEY] = np.array(json.dumps(metadata))
    for path in [run_dir / names.CONSOLIDATED_NPZ] + ([Path(extra_npz)] if extra_npz else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        with _replacing(path) as handle:
            np.savez(handle, **consolidated)
        written.append(path)

    if save_outputs:
        from .plots import write_plots

        written.extend(write_plots(run_dir / names.PLOTS_DIR, layers, values))

    timing = dict(attrs.get(names.ATTR_TIMING, {}))
    timing["export_seconds"] = time.perf_counter() - started
    metadata["timing"] = timing
    _write_json(run_dir / names.TIMING_JSON, timing)
    with _replacing(run_dir / names.TIMING_TXT) as handle:
        handle.write(timing_summary(timing, metadata).encode())
    _write_json(run_dir / names.METADATA_JSON, metadata)  # last: its presence says the export set is whole
    written += [run_dir / names.TIMING_JSON, run_dir / names.TIMING_TXT, run_dir / names.METADATA_JSON]
    return written


@contextlib.contextmanager
def _replacing(path: Path):
    """A binary handle on a temporary file beside `path`, renamed onto `path` only once it is
    completely written: a full disk or a kill never leaves a truncated export, and an earlier
    version stays until the new one is whole."""
    temporary = path.with_name(f".{path.name}.partial")
    try:
        with open(temporary, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def build_metadata(store: ResultStore, config: RunConfig, layers: list[int], values: dict[str, np.ndarray]) -> dict:
    attrs = store.attrs
    plan = attrs[names.ATTR_PLAN]
    tokens = store.group[names.TOKENS][:]
    loss_tokens = int(store.group[names.LOSS_TOKENS][()])
    per_layer = {}
    for row, layer in enumerate(layers):
        entry = {"tokens": int(tokens[row])}
        for mode, array in values.items():
            v = array[row].astype(np.float64)
            entry[mode] = {"mean": float(v.mean()), "std": float(v.std()), "max": float(v.max()),
                           "min": float(v.min()), "sum_abs": float(np.abs(v).sum())}
        per_layer[str(layer)] = entry
    return {
        "raygrad_version": attrs.get(names.ATTR_VERSION, __version__),
        "exported_by_version": __version__,
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
        "normalized": config.normalize_gradients,
        "num_samples_requested": plan["samples_requested"],
        "num_samples": plan["samples"],
        "target_tokens": loss_tokens,
        "mean_loss_nats_per_token": float(store.group[names.LOSS_SUM][()]) / max(loss_tokens, 1),
        "layer_statistics": per_layer,
        "sae_quality": sae_quality(store.group),  # per layer FVU, mean L0, spliced loss (quality.py); None for mlp
        "loading_instructions": {
            "npy": "np.load('layer_{layer}_{mode}_gradients.npy') -> (dimension,) float32",
            "npz": "d = np.load('consolidated_results.npz'); d['layer_{layer}_{mode}']; "
                   "json.loads(d['metadata'].item()) -> this metadata",
            "raygrad": "raygrad.load_results(path) -> arrays in memory; raygrad.open_results(path) -> lazy Zarr",
            "zarr": "zarr.open_group('results.zarr', mode='r')['mean_abs'][layer_row] (rows follow 'layers')",
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
    return "\n".join(lines) + "\n"


def _write_json(path: Path, data: dict) -> None:
    with _replacing(path) as handle:
        handle.write((json.dumps(data, indent=2) + "\n").encode())
