"""The Zarr store of one run: running totals, checkpoint/resume, final means. `ResultStore` is the one
class callers use; each of its jobs lives in a module of its own:

- raygrad.store.layout: what a new store holds (array names, shapes, chunks, attributes);
- raygrad.store.reading: reading as last committed, the totals, the names of what it holds;
- raygrad.store.checkpoint: checkpoints through a redo log, replayed when a store is opened to write;
- raygrad.store.digests: the state file, every recorded array's digest and the inputs';
- raygrad.store.means: the derived statistics written when a run finishes;
- raygrad.store.verify: checking every digest (DamagedStore), rebuilding the means, sealing.

A run whose lock this process has lost to another (raygrad.store.lock) writes nothing
more: a checkpoint or the derived statistics raise first, one line naming the
new holder, and the last checkpoint stands.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from .. import constants as names
from ..errors import first_line
from . import checkpoint, layout, means
from . import verify as verifying
from .digests import read_state, record
from .files import sync_tree
from .partial import Partial
from .reading import StoreReader
from .verify import DamagedStore
from .zarr_batch import create_arrays

__all__ = ["DamagedStore", "ResultStore"]


class ResultStore(StoreReader):
    """One run's store: create or open it, then read (StoreReader), checkpoint, finalize, verify, repair."""

    @classmethod
    def create(cls, path: Path, prefixes: dict[str, int], num_shards: int, layers: list[int],
               attrs: dict, layer_sums: tuple[str, ...] = (), top_k: int = 0, ranked: tuple[str, ...] = (),
               score_dtype: np.dtype = np.dtype(np.float32)) -> "ResultStore":
        """`prefixes`: statistic prefix -> width; each gets {prefix}_sum/_abs_sum/_sq_sum.
        `layer_sums`: per-layer float64 scalar totals (constants.LAYER_SUMS), summed like the others.
        `top_k` > 0: the prefixes `ranked` get their --top-examples tables (raygrad.store.topk), empty."""
        group = zarr.open_group(str(path), mode="w-")
        specs = layout.array_specs(prefixes, num_shards, layers, attrs, layer_sums, top_k, ranked, score_dtype)
        group.attrs.update({names.ATTR_VERSION: names.VERSION, names.ATTR_STATUS: names.STATUS_RUNNING, **attrs})
        store = cls(path, group, arrays=create_arrays(group, specs))
        sync_tree(store.path)
        initial = layout.initial_values(specs)
        record(store.path, store.attrs, {name: initial[name] for name in store.recorded_arrays()})
        return store

    @classmethod
    def open(cls, path: Path, writable: bool = False, verify: bool = True, retries: int = 3) -> "ResultStore":
        """Open for reading (the last committed state, never written to) or for writing
        (a committed checkpoint is applied first). `verify` checks every digest."""
        path = Path(path)
        store = cls(path, *_open_group(path, writable))
        if verify:
            try:
                store.verify()
            except DamagedStore:
                # A live run may have checkpointed while we read: then read again.
                if writable or read_state(path) == store.verified_state or retries == 0:
                    raise
                return cls.open(path, writable, verify, retries - 1)
        return store

    def checkpoint(self, totals: Partial, shards_done: np.ndarray) -> None:
        """Save these totals and shards done (raygrad.store.checkpoint: a kill at any instant loses nothing)."""
        checkpoint.save(self, totals, shards_done)

    def finalize(self, timing: dict) -> None:
        """Write the derived statistics and mark the run complete (in that order: a kill
        in between leaves a running store that a resume finalizes again)."""
        means.finalize(self, timing)

    def write_means(self) -> dict[str, np.ndarray]:
        """Every derived statistic ({prefix}_{statistic}, float32, for xarray and lazy readers; the
        exports derive theirs from the sums in float64) from the sums; returns them by name."""
        return means.write_means(self)

    def verify(self, means: bool = True) -> None:
        """Every recorded array reads back to its digest, and the configuration and plan
        are the ones the checkpoints were made for; else one line naming the part (DamagedStore).
        `means`: also the derived means of a complete run."""
        verifying.verify(self, means)

    def rebuild_means(self) -> list[str]:
        """A complete run whose sums verify: write its means again; returns their names."""
        return verifying.rebuild_means(self)

    def seal(self) -> None:
        """Record the digest of every array (a store written in one go, like a comparison's)."""
        verifying.seal(self)

    def seal_unrecorded(self) -> None:
        """A store from before digests were recorded: take what it holds as its state."""
        verifying.seal_unrecorded(self)


def _open_group(path: Path, writable: bool) -> tuple[zarr.Group, dict[str, np.ndarray]]:
    """The group, and a committed checkpoint a reader sees before it is applied (a writer applies it first)."""
    try:
        if writable:
            checkpoint.replay_pending(path)
        group = zarr.open_group(str(path), mode="r+" if writable else "r")
        return group, {} if writable else checkpoint.pending_arrays(path)
    except DamagedStore:
        raise
    except Exception as err:  # truncated zarr.json, unreadable redo file: one line, not a traceback
        raise DamagedStore(f"{path}: cannot be read ({first_line(err)}); the run cannot be vouched for, "
                           "re-run it") from None
