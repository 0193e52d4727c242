"""What a new store holds and how it lies on disk: every array's name, shape, chunks, dtype, fill value,
dimension names and attributes (as Group.create_array options), what each holds before any chunk is
written, and the consolidated metadata in the root zarr.json."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import zarr

from .. import constants as names
from . import stats, topk
from .files import sync_tree

FEATURE_CHUNK = 65536  # values per chunk: one layer of a 65k-feature SAE, several layers of a narrow site


def chunks(num_layers: int, width: int) -> tuple[int, int]:
    """Whole layers per chunk up to FEATURE_CHUNK values: few files to write and flush per checkpoint."""
    return max(1, min(num_layers, FEATURE_CHUNK // width)), min(width, FEATURE_CHUNK)


def dimension_name(prefix: str, target: str) -> str:
    """`feature` for an SAE's features, `dim` for a site's own dimensions: xarray needs distinct names
    for the two widths of an SAE run."""
    site = prefix in (names.SITE_PREFIX, names.SITE_VALUE_PREFIX)
    return names.DIM_FEATURE if target == "sae" and not site else names.DIM_SITE


def array_specs(prefixes: dict[str, int], num_shards: int, layers: list[int], attrs: dict,
                layer_sums: tuple[str, ...], top_k: int, ranked: tuple[str, ...],
                score_dtype: np.dtype) -> dict[str, dict]:
    """Every array of a new store: name -> Group.create_array options (ResultStore.create's arguments)."""
    num_layers = len(layers)
    target = attrs.get(names.ATTR_PLAN, {}).get("target", "mlp")
    specs = {}
    for prefix, width in prefixes.items():
        specs.update(_sum_specs(prefix, num_layers, width, dimension_name(prefix, target)))
    for prefix in ranked if top_k else ():
        specs.update(_example_specs(prefix, num_layers, prefixes[prefix], top_k, score_dtype,
                                    dimension_name(prefix, target)))
    specs.update(_run_specs(layers, num_shards, layer_sums))
    return specs


def initial_values(specs: dict[str, dict]) -> dict[str, np.ndarray]:
    """What each array of `array_specs` holds when created: its data, or its fill value everywhere
    (no chunk is written yet)."""
    return {name: spec["data"] if "data" in spec else np.full(spec["shape"], spec["fill_value"], spec["dtype"])
            for name, spec in specs.items()}


def consolidate(path: Path) -> None:
    """Every array's metadata in the root zarr.json (a finished store is opened in one read, and
    xarray.open_zarr does not warn), flushed to disk."""
    with warnings.catch_warnings():  # Zarr notes our own files (the state file) as "not a component"
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))
    sync_tree(path, only=("zarr.json",))


def _sum_specs(prefix: str, num_layers: int, width: int, dim: str) -> dict:
    """{prefix}_sum / _abs_sum / _sq_sum, (layer, dim|feature), float64 running totals."""
    return {name: {"shape": (num_layers, width), "chunks": chunks(num_layers, width), "dtype": "float64",
                   "fill_value": 0.0, "attributes": stats.array_attrs(prefix, stat),
                   "dimension_names": (names.LAYER_COORD, dim)}
            for name, stat in zip(names.sum_names(prefix), names.STATS)}


def _example_specs(prefix: str, num_layers: int, width: int, k: int, score_dtype: np.dtype, dim: str) -> dict:
    """{prefix}_top_score / _top_row / _top_position, (layer, dim|feature, k), one chunk per layer, empty:
    name -> Group.create_array options."""
    kind = names.kind_of(prefix)
    described = {"score": ("same units as the kind", f"the signed {kind} of each example, best |score| first"),
                 "row": ("dataset row", "0-based row of the example's text in the dataset as read, before "
                                        "filtering; -1: an empty slot"),
                 "position": ("token position", "0-based index of the token in its tokenized text; -1: an "
                                                "empty slot")}
    dtypes = topk.table_dtypes(score_dtype)
    specs = {}
    for table, name in zip(topk.TABLES, topk.array_names(prefix)):
        units, description = described[table]
        specs[name] = {"shape": (num_layers, width, k), "chunks": (1, width, k), "dtype": dtypes[table],
                       "fill_value": topk.FILL[table], "dimension_names": (names.LAYER_COORD, dim, names.EXAMPLE_DIM),
                       "attributes": {"units": units, "description": description, "kind": kind,
                                      "order": "|score| descending, then row, then position ascending"}}
    return specs


def _run_specs(layers: list[int], num_shards: int, layer_sums: tuple[str, ...]) -> dict:
    """The per-layer scalar totals (SAE quality), the layer coordinates, token counts, shards done and loss."""
    per_layer = {"dimension_names": (names.LAYER_COORD,)}
    specs = {}
    for name in layer_sums:
        specs[name] = {"shape": (len(layers),), "dtype": "float64", "fill_value": 0.0, **per_layer}
    for name in (names.LAYERS, names.LAYER_COORD):  # `layer`: the coordinate xarray reads
        specs[name] = {"data": np.asarray(layers, dtype=np.int32), **per_layer,
                       "attributes": {"units": "layer index", "description": "model layer of each row"}}
    specs[names.TOKENS] = {"shape": (len(layers),), "dtype": "int64", "fill_value": 0, **per_layer, "attributes": {
        "units": "positions", "description": "positions aggregated per layer (n)"}}
    specs[names.SHARDS_DONE] = {"shape": (num_shards,), "dtype": "bool", "fill_value": False,
                                "dimension_names": ("shard",)}
    specs[names.LOSS_SUM] = {"shape": (), "dtype": "float64", "fill_value": 0.0}
    specs[names.LOSS_TOKENS] = {"shape": (), "dtype": "int64", "fill_value": 0}
    return specs
