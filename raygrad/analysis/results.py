"""Reading results back: eagerly (`load_results`) or lazily (`open_results`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import constants as names
from ..errors import RaygradError


@dataclass
class Results:
    layers: list[int]
    # export keys (docs/outputs.md, "Names"): "mean_abs", "std" (gradients), "mean_abs_values", "sem_attribution",
    # "mean_abs_norm_sum" (--normalize-mode all), ... -> (L, D); rows follow `layers`
    arrays: dict[str, np.ndarray]
    metadata: dict

    def layer(self, layer: int, mode: str = "mean_abs") -> np.ndarray:
        return self.arrays[mode][self.layers.index(layer)]

    def __getitem__(self, key: str):
        """The original scripts' helper's shape: results['data']['layer_0_mean_abs'] (the npz keys)
        and results['metadata'] (a dict)."""
        if key == "data":
            return {f"layer_{layer}_{name}": array[row]
                    for name, array in self.arrays.items() for row, layer in enumerate(self.layers)}
        if key == "metadata":
            return self.metadata
        raise KeyError(f"{key!r}: Results has 'data' and 'metadata' (and .arrays, .layers)")


def _store_path(path: Path) -> Path | None:
    if (path / "zarr.json").exists() and path.name.endswith(".zarr"):
        return path
    if (path / names.STORE_NAME).is_dir():
        return path / names.STORE_NAME
    return None


def open_results(path: str | Path) -> "zarr.Group":  # noqa: F821 (zarr is imported lazily)
    """The run's Zarr group, read-only, as of its last committed checkpoint, after
    every array was checked against that checkpoint's digests; arrays then load
    lazily, chunk by chunk.

    Accepts the run directory or its results.zarr. A complete run holds every statistic of every
    kind as {prefix}_{statistic} (grad_mean_abs, grad_std, value_sem, ...; docs/outputs.md "Names"), float32,
    written at finalize; `raygrad.store.stats.from_group(group, prefix, statistic)` derives any of them
    in float64 from the sums (also for stores written before those arrays existed)."""
    from ..store.zarr_store import ResultStore

    store = _store_path(Path(path))
    if store is None:
        raise RaygradError(f"{path}: not a raygrad run directory or {names.STORE_NAME} store")
    return ResultStore.open(store).committed_group()


def load_results(path: str | Path) -> Results:
    """Arrays as exported (with the run's --power and normalization) from the consolidated .npz,
    an export set's directory, the run directory, or its results.zarr. From the store: every
    statistic (mean_abs, mean, mean_sq, std, sem) of every kind, derived from the float64 sums."""
    path = Path(path)
    if path.is_dir() and _store_path(path) is None and (path / names.CONSOLIDATED_NPZ).exists():
        path = path / names.CONSOLIDATED_NPZ  # an export set (RUN_DIR/exports/NAME)
    if path.suffix == ".npz":
        return _from_npz(path)
    from .export import build_metadata, exported_arrays, open_complete_run

    store_path = _store_path(path)
    if store_path is None:
        raise RaygradError(f"{path}: expected a consolidated .npz, a run directory or a {names.STORE_NAME} store")
    store, config = open_complete_run(store_path.parent)
    layers = [int(layer) for layer in store.array(names.LAYERS)[:]]
    arrays = {names.export_key(*key): array
              for key, array in exported_arrays(store, config, names.STATISTICS).items()}
    return Results(layers, arrays, build_metadata(store, config, layers, arrays))


_KEY = re.compile(r"^layer_(\d+)_(.+)$")


def _from_npz(path: Path) -> Results:
    with np.load(path, allow_pickle=False) as data:
        metadata = json.loads(data[names.NPZ_METADATA_KEY].item())
        rows: dict[str, dict[int, np.ndarray]] = {}
        for key in data.files:
            match = _KEY.match(key)
            if match:
                rows.setdefault(match.group(2), {})[int(match.group(1))] = data[key]
    layers = sorted(next(iter(rows.values())))
    return Results(layers, {mode: np.stack([r[layer] for layer in layers]) for mode, r in rows.items()}, metadata)
