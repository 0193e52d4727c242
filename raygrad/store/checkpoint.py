"""Checkpoints and their redo log, so that a kill at any instant never counts a shard twice nor loses
a finished one: the new totals and `shards_done` are first written together to one file (`_stage`),
which is atomically renamed into place (`_commit`, the commit point), then copied into the arrays,
flushed to disk, recorded in the state file (`_apply_pending`), and only then is the redo file
removed (`_drop_redo`). Opening a store for writing replays a committed file that was not yet
applied (`replay_pending`); a reader sees it without writing (`pending_arrays`).

Each step is its own function: the fault-injection tests stop at each."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from .. import constants as names
from .digests import digest, record_digests
from .files import fsync_dir, sync_tree
from .lock import ensure_held
from .partial import Partial
from .reading import StoreReader


def save(store: StoreReader, totals: Partial, shards_done: np.ndarray) -> None:
    """Checkpoint these totals: stage, commit, apply."""
    ensure_held(store.path)  # a run whose lock another process took over writes nothing more (raygrad.store.lock)
    pending = store.path / names.PENDING_CHECKPOINT
    _stage(pending, _checkpoint_arrays(totals, shards_done))
    _commit(pending)
    _apply_pending(store, pending)


def replay_pending(path: Path) -> None:
    """Before a store is opened for writing: drop an uncommitted write, apply a committed one."""
    pending = path / names.PENDING_CHECKPOINT
    for leftover in path.glob("*.tmp.npz"):
        leftover.unlink()  # an uncommitted write: the arrays still hold the last checkpoint
    if pending.exists():
        _apply_pending(StoreReader(path, zarr.open_group(str(path), mode="r+")), pending)


def pending_arrays(path: Path) -> dict[str, np.ndarray]:
    """A committed checkpoint not yet applied, by array name (none: {})."""
    pending = path / names.PENDING_CHECKPOINT
    try:
        with np.load(pending, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:  # none, or the writer applied and dropped it meanwhile
        return {}


def _checkpoint_arrays(totals: Partial, shards_done: np.ndarray) -> dict[str, np.ndarray]:
    return {
        **totals.sums,
        **totals.examples,
        names.TOKENS: totals.tokens,
        names.LOSS_SUM: np.float64(totals.loss_sum),
        names.LOSS_TOKENS: np.int64(totals.loss_tokens),
        names.SHARDS_DONE: shards_done,
    }


# The steps of a checkpoint, each its own function (the fault-injection tests stop at each).

def _stage(pending: Path, arrays: dict[str, np.ndarray]) -> None:
    staging = pending.with_suffix(".tmp.npz")
    # A killed writer's leftover (or a link planted there) is removed, never written through: the new
    # file is created where nothing is (O_EXCL), and a link made there meanwhile is refused (O_NOFOLLOW).
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())


def _commit(pending: Path) -> None:
    os.replace(pending.with_suffix(".tmp.npz"), pending)  # the commit point
    fsync_dir(pending.parent)


def _apply_pending(store: StoreReader, pending: Path) -> None:
    """Copy a committed checkpoint into the arrays, flush them, record their digests,
    then drop the redo file (in that order: a kill anywhere replays it). The redo file is read one
    array at a time, each dropped once written and digested: the head holds one array of it beside
    the totals, not a whole extra copy of them (with --top-examples tables, hundreds of MB)."""
    digests = {}
    with np.load(pending, allow_pickle=False) as data:
        for name in data.files:  # one at a time: a kill between two leaves some written (fault tests)
            value = data[name]
            _write_array(store, name, value)
            digests[name] = digest(value)
            del value
    sync_tree(store.path, only=tuple(digests))
    record_digests(store.path, store.attrs, digests)
    _drop_redo(pending)


def _drop_redo(pending: Path) -> None:
    pending.unlink()
    fsync_dir(pending.parent)


def _write_array(store: StoreReader, name: str, value: np.ndarray) -> None:
    store.array(name)[...] = value
