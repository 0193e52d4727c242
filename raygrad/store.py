"""The Zarr store of one run: running totals, checkpoint/resume, final means.

Checkpoints use a redo log so that a kill at any instant never counts a
shard twice nor loses a finished one: the new totals and `shards_done` are
first written together to one file, which is atomically renamed into place
(the commit point), then copied into the arrays, then the file is removed.
Opening a store replays a committed file that was not yet applied.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from . import __version__
from . import constants as names
from .grads import Partial, array_widths

FEATURE_CHUNK = 65536  # dims per chunk along `dim`


class ResultStore:
    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group

    # --- creating and opening

    @classmethod
    def create(cls, path: Path, prefixes: dict[str, int], num_shards: int, layers: list[int],
               attrs: dict, layer_sums: tuple[str, ...] = ()) -> "ResultStore":
        """`prefixes`: statistic prefix -> width; each gets {prefix}_sum/_abs_sum/_sq_sum.
        `layer_sums`: per-layer float64 scalar totals (constants.LAYER_SUMS), summed like the others."""
        group = zarr.open_group(str(path), mode="w-")
        num_layers = len(layers)
        for name, width in array_widths(prefixes).items():
            group.create_array(name, shape=(num_layers, width), chunks=(1, min(width, FEATURE_CHUNK)),
                               dtype="float64", fill_value=0.0, dimension_names=("layer", "dim"))
        for name in layer_sums:
            group.create_array(name, shape=(num_layers,), dtype="float64", fill_value=0.0,
                               dimension_names=("layer",))
        group.create_array(names.LAYERS, shape=(num_layers,), dtype="int32", dimension_names=("layer",))
        group[names.LAYERS][:] = np.asarray(layers, dtype=np.int32)
        group.create_array(names.TOKENS, shape=(num_layers,), dtype="int64", fill_value=0,
                           dimension_names=("layer",))
        group.create_array(names.SHARDS_DONE, shape=(num_shards,), dtype="bool", fill_value=False,
                           dimension_names=("shard",))
        group.create_array(names.LOSS_SUM, shape=(), dtype="float64", fill_value=0.0)
        group.create_array(names.LOSS_TOKENS, shape=(), dtype="int64", fill_value=0)
        group.attrs.update({names.ATTR_VERSION: __version__, names.ATTR_STATUS: names.STATUS_RUNNING, **attrs})
        return cls(path, group)

    @classmethod
    def open(cls, path: Path, writable: bool = False) -> "ResultStore":
        path = Path(path)
        if writable:
            _replay_pending(path)
        group = zarr.open_group(str(path), mode="r+" if writable else "r")
        return cls(path, group)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    # --- totals and checkpoints

    def totals(self) -> tuple[Partial, np.ndarray]:
        g = self.group
        partial = Partial(
            sums={name: g[name][:] for name in self.sum_array_names()},
            tokens=g[names.TOKENS][:],
            loss_sum=float(g[names.LOSS_SUM][()]),
            loss_tokens=int(g[names.LOSS_TOKENS][()]),
        )
        return partial, g[names.SHARDS_DONE][:]

    def checkpoint(self, totals: Partial, shards_done: np.ndarray) -> None:
        pending = self.path / names.PENDING_CHECKPOINT
        staging = pending.with_suffix(".tmp.npz")
        with open(staging, "wb") as handle:
            np.savez(handle, **_checkpoint_arrays(totals, shards_done))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, pending)  # the commit point
        _apply_pending(self.group, pending)

    def prefixes(self) -> list[str]:
        """The statistic prefixes this store keeps (grad, value, attr, site_grad)."""
        return [prefix for prefix in names.MEAN_ARRAYS if f"{prefix}_sum" in self.group]

    def sum_array_names(self) -> list[str]:
        """Every running total added shard by shard: the prefixes' sums and the per-layer scalars."""
        return ([name for prefix in self.prefixes() for name in names.sum_names(prefix)]
                + [name for name in names.LAYER_SUMS if name in self.group])

    def finalize(self, timing: dict) -> None:
        """Write the derived means and mark the run complete."""
        totals, _ = self.totals()
        count = np.maximum(totals.tokens, 1)[:, None]  # a layer with no tokens has mean 0, not NaN
        for prefix in self.prefixes():
            total, abs_total, _ = names.sum_names(prefix)
            for name, source in zip(names.MEAN_ARRAYS[prefix], (total, abs_total)):
                values = (totals.sums[source] / count).astype(np.float32)
                if name not in self.group:
                    self.group.create_array(name, shape=values.shape, chunks=self.group[source].chunks,
                                            dtype="float32", dimension_names=("layer", "dim"))
                self.group[name][:] = values
        self.group.attrs.update({names.ATTR_STATUS: names.STATUS_COMPLETE, names.ATTR_TIMING: timing})


def _checkpoint_arrays(totals: Partial, shards_done: np.ndarray) -> dict[str, np.ndarray]:
    return {
        **totals.sums,
        names.TOKENS: totals.tokens,
        names.LOSS_SUM: np.float64(totals.loss_sum),
        names.LOSS_TOKENS: np.int64(totals.loss_tokens),
        names.SHARDS_DONE: shards_done,
    }


def _apply_pending(group: zarr.Group, pending: Path) -> None:
    with np.load(pending, allow_pickle=False) as data:
        for name in data.files:
            group[name][...] = data[name]
    pending.unlink()


def _replay_pending(path: Path) -> None:
    pending = path / names.PENDING_CHECKPOINT
    for leftover in path.glob("*.tmp.npz"):
        leftover.unlink()  # an uncommitted write: the arrays still hold the last checkpoint
    if pending.exists():
        _apply_pending(zarr.open_group(str(path), mode="r+"), pending)
