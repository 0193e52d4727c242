"""Reading results back: eagerly (`load_results`) or lazily (`open_results`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import constants as names
from .config import RunConfig
from .errors import RaygradError


@dataclass
class Results:
    layers: list[int]
    # "mean_abs"/"mean" (gradients), "mean_abs_values", "mean_attribution", ... -> (L, D); rows follow `layers`
    arrays: dict[str, np.ndarray]
    metadata: dict

    def layer(self, layer: int, mode: str = "mean_abs") -> np.ndarray:
        return self.arrays[mode][self.layers.index(layer)]


def _store_path(path: Path) -> Path | None:
    if (path / "zarr.json").exists() and path.name.endswith(".zarr"):
        return path
    if (path / names.STORE_NAME).is_dir():
        return path / names.STORE_NAME
    return None


def open_results(path: str | Path) -> "zarr.Group":  # noqa: F821 (zarr is imported lazily)
    """The run's Zarr group, read-only; arrays load lazily, chunk by chunk.

    Accepts the run directory or its results.zarr."""
    store = _store_path(Path(path))
    if store is None:
        raise RaygradError(f"{path}: not a raygrad run directory or {names.STORE_NAME} store")
    import zarr

    return zarr.open_group(str(store), mode="r")


def load_results(path: str | Path) -> Results:
    """Arrays as exported (normalized if the run asked for it) from the
    consolidated .npz, the run directory, or its results.zarr."""
    path = Path(path)
    if path.suffix == ".npz":
        return _from_npz(path)
    from .export import build_metadata, exported_arrays
    from .store import ResultStore

    store_path = _store_path(path)
    if store_path is None:
        raise RaygradError(f"{path}: expected a consolidated .npz, a run directory or a {names.STORE_NAME} store")
    store = ResultStore.open(store_path)
    if store.attrs.get(names.ATTR_STATUS) != names.STATUS_COMPLETE:
        raise RaygradError(f"{path}: the run is not complete; finish it with raygrad run --resume")
    config = RunConfig.from_dict(store.attrs[names.ATTR_CONFIG])
    layers = [int(layer) for layer in store.group[names.LAYERS][:]]
    arrays = {names.export_key(kind, mode): array
              for (kind, mode), array in exported_arrays(store, config, ("mean_abs", "mean")).items()}
    return Results(layers, arrays, build_metadata(store, config, layers, arrays))


_KEY = re.compile(r"^layer_(\d+)_((?:mean_abs|mean)(?:_values|_attribution|_hessian)?)$")


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
