"""The state file, `checkpoint_state.json` beside the arrays: every recorded array's digest and one
digest of the run's configuration and plan. Creating a store, applying a checkpoint, finalizing and
repairing write it (atomically); `verify` reads it back against the arrays."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .. import constants as names
from .files import replacing


def digest(value: np.ndarray) -> str:
    """blake2b-128 of an array's dtype, shape and bytes."""
    value = np.asarray(value)  # a 0-d array may come back from Zarr as a NumPy scalar
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{value.dtype.str}{value.shape}".encode())
    h.update(value.tobytes())  # C order whatever the layout
    return h.hexdigest()


def inputs_digest(attrs: dict) -> str:
    """The whole saved configuration and plan, recorded when the store is created and checked on every open
    (a resume's too): it binds the store to what it measures (the configuration's measured part) and to the
    pinned revisions it was computed on (the plan's model_revision, sae_revisions, dataset_revision)."""
    inputs = {key: attrs.get(key) for key in (names.ATTR_CONFIG, names.ATTR_PLAN)}
    return hashlib.blake2b(json.dumps(inputs, sort_keys=True).encode(), digest_size=16).hexdigest()


def read_state(path: Path) -> dict | None:
    """The state file of the store at `path`; None if it is missing or unreadable."""
    try:
        return json.loads((path / names.CHECKPOINT_STATE).read_text())
    except (OSError, ValueError):
        return None


def record(path: Path, attrs: dict, arrays: dict[str, np.ndarray]) -> None:
    """Add these arrays' digests (and the inputs', from the store's `attrs`) to the state file, atomically."""
    record_digests(path, attrs, {name: digest(value) for name, value in arrays.items()})


def record_digests(path: Path, attrs: dict, digests: dict[str, str]) -> None:
    """Add these digests (and the inputs') to the state file, atomically."""
    state = read_state(path) or {"arrays": {}}
    state["arrays"].update(digests)
    state["inputs"] = inputs_digest(attrs)
    _write_state(path, state)


def _write_state(path: Path, state: dict) -> None:
    with replacing(path / names.CHECKPOINT_STATE) as handle:
        handle.write(json.dumps(state, indent=1, sort_keys=True).encode())
