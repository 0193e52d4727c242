"""The reading side of a store (the base of ResultStore, which callers use): its group and arrays,
opened once; every read as last committed, a committed checkpoint not yet applied included; the
running totals; the names of what it holds; and the committed state as a Zarr group. The writing jobs
(raygrad.store.checkpoint, .means, .verify) write through the arrays it opens."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import zarr

from .. import constants as names
from . import topk
from .partial import Partial
from .zarr_batch import open_arrays, read_arrays

# Zarr warns, when it lists a group, about files it does not know; these are raygrad's own
# (the redo log and the digests beside the arrays), so that note is noise to a user.
warnings.filterwarnings("ignore", message=r"Object at \.?(checkpoint_state|pending_checkpoint)\S* is not recognized",
                        module="zarr")


class StoreReader:
    def __init__(self, path: Path, group: zarr.Group, committed: dict[str, np.ndarray] | None = None,
                 arrays: dict[str, zarr.Array] | None = None):
        """`arrays`: every array of `group` by name, where the caller has them (it just created them)."""
        self.path = Path(path)
        self.group = group
        # A committed checkpoint not yet applied to the arrays (read-only opens of a
        # run being checkpointed, or killed mid-apply): it overrides what the arrays hold.
        self.committed = committed or {}
        self.verified_state: dict | None = None  # the state file as `verify` last read it
        # Each `name in group` and `group[name]` is a round trip through Zarr's event loop (most of
        # a small run's store time): the arrays are listed and opened once, together (zarr_batch).
        self._arrays = arrays

    def _members(self) -> dict[str, zarr.Array]:
        if self._arrays is None:
            try:
                self._arrays = open_arrays(self.group)
            except Exception:  # one array's metadata is damaged: `array` opens each by name, and that one fails
                self._arrays = {name: None for name in self.group.array_keys()}
        return self._arrays

    def add_arrays(self, arrays: dict[str, zarr.Array]) -> None:
        """Arrays just created in the group: known by name without listing it again."""
        self._members().update(arrays)

    def has(self, name: str) -> bool:
        """Whether the store holds an array `name`."""
        return name in self._members()

    def array(self, name: str) -> zarr.Array:
        """The Zarr array `name` (its data read from the store at each access)."""
        members = self._members()
        if members.get(name) is None:
            members[name] = self.group[name]  # KeyError: not in the store
        return members[name]

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def read(self, name: str) -> np.ndarray:
        """One array as last committed."""
        if name in self.committed:
            return self.committed[name]
        return self.array(name)[...]

    def read_many(self, wanted: list[str]) -> dict[str, np.ndarray]:
        """These arrays as last committed, read together (one round trip)."""
        stored = read_arrays({name: self.array(name) for name in wanted if name not in self.committed})
        return {name: self.committed[name] if name in self.committed else stored[name] for name in wanted}

    def totals(self) -> tuple[Partial, np.ndarray]:
        sums, examples = self.sum_array_names(), self.example_array_names()
        values = self.read_many([*sums, *examples, names.TOKENS, names.LOSS_SUM, names.LOSS_TOKENS, names.SHARDS_DONE])
        partial = Partial(
            sums={name: values[name] for name in sums},
            tokens=values[names.TOKENS],
            loss_sum=float(values[names.LOSS_SUM]),
            loss_tokens=int(values[names.LOSS_TOKENS]),
            examples={name: values[name] for name in examples},
        )
        return partial, values[names.SHARDS_DONE]

    def shards_done(self) -> np.ndarray:
        return self.read(names.SHARDS_DONE)

    # --- the names of what it holds

    def prefixes(self) -> list[str]:
        """The statistic prefixes this store keeps (grad, value, attr, site_grad)."""
        return [prefix for prefix in names.MEAN_ARRAYS if self.has(f"{prefix}_sum")]

    def example_prefixes(self) -> list[str]:
        """The prefixes whose --top-examples tables this store keeps (none: the run kept no examples)."""
        return [prefix for prefix in topk.RANKED_PREFIXES if self.has(topk.array_names(prefix)[0])]

    def example_array_names(self) -> list[str]:
        return [name for prefix in self.example_prefixes() for name in topk.array_names(prefix)]

    def sum_array_names(self) -> list[str]:
        """Every running total added shard by shard: the prefixes' sums and the per-layer scalars."""
        return ([name for prefix in self.prefixes() for name in names.sum_names(prefix)]
                + [name for name in names.LAYER_SUMS if self.has(name)])

    def recorded_arrays(self) -> list[str]:
        """Every array a checkpoint vouches for (the derived statistics only once the run is complete)."""
        return [*self.sum_array_names(), *self.example_array_names(), names.LAYERS, names.LAYER_COORD, names.TOKENS,
                names.SHARDS_DONE, names.LOSS_SUM, names.LOSS_TOKENS]

    def committed_group(self) -> zarr.Group:
        """The Zarr group as last committed: the group itself, or (while a committed
        checkpoint waits to be applied) an in-memory copy with it applied."""
        if not self.committed:
            return self.group
        view = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
        view.attrs.update(self.attrs)
        with warnings.catch_warnings():  # Zarr notes the redo file as "not a component"; it is ours
            warnings.simplefilter("ignore")
            members = list(self.group.arrays())
        for name, array in members:
            copy = view.create_array(name, shape=array.shape, chunks=array.chunks, dtype=array.dtype,
                                     fill_value=array.fill_value, dimension_names=array.metadata.dimension_names)
            copy[...] = self.read(name)
            copy.attrs.update(dict(array.attrs))
        return view
