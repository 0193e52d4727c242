"""Many Zarr arrays in one round trip.

Each synchronous Zarr call (create, open, read or write one array) is a round trip to Zarr's
event-loop thread and from there to its file threads: about 1 ms on a small machine even for a
100-byte chunk, and a small run's store makes over a hundred of them. Here the asynchronous
calls of many arrays run together, on Zarr's own loop, in one round trip.
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterable

import numpy as np
import zarr
import zarr.api.asynchronous as zarr_async
from zarr.core.sync import sync as on_zarr_loop  # Zarr's own synchronous bridge (its loop, its threads)


def _together(coroutines: Iterable) -> list:
    async def gathered():
        return await asyncio.gather(*coroutines)

    return on_zarr_loop(gathered())


def create_arrays(group: zarr.Group, specs: dict[str, dict[str, Any]]) -> dict[str, zarr.Array]:
    """name -> the options of `Group.create_array` (with `data`: written too) -> name -> the new array."""
    created = _together(zarr_async.create_array(group.store_path, name=name, **options)
                        for name, options in specs.items())
    return {name: zarr.Array(array) for name, array in zip(specs, created)}


def open_arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    """Every array of `group` by name (one listing: a consolidated group's needs no file read)."""
    return dict(group.arrays())


def read_arrays(arrays: dict[str, zarr.Array]) -> dict[str, np.ndarray]:
    """name -> array -> name -> its whole contents (a 0-d array for a scalar one, as `array[...]` gives)."""
    values = _together(array.async_array.getitem(...) for array in arrays.values())
    return {name: np.asarray(value) for name, value in zip(arrays, values)}


def write_arrays(values: dict[str, tuple[zarr.Array, np.ndarray]]) -> None:
    """name -> (array, its whole new contents)."""
    _together(array.async_array.setitem(..., value) for array, value in values.values())
