"""Hutchinson probes keyed by what is computed, not by how it was executed.

Every probe entry is a function of (run seed, dataset row, layer, probe index,
token position, dimension) alone: a counter-based generator rather than a
stateful one. A token therefore gets the same +-1 signs whatever batch, pack,
shard, worker, device or resume it is computed in, and texts in a batch do not
interact, so a Hessian estimate equals the unbatched, uninterrupted one.

Two stages. On the host, (seed, row, layer, probe, position) -> one 64-bit key
per token (splitmix64 steps, numpy uint64 wraps like the C original). On the
device, (token key, dimension) -> a sign, with two rounds of a 32-bit integer
hash (Wellons' lowbias32) done in int64 tensors masked to 32 bits, so CPU and
CUDA give identical signs.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN64 = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """One splitmix64 output step on uint64 values (a bijection with full avalanche)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64 by design
        x = x + _GOLDEN64
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def token_keys(seed: int, rows: np.ndarray, positions: np.ndarray, layer: int, probe: int) -> np.ndarray:
    """(N,) uint64: the key of each token (dataset row, token position) for one layer and probe."""
    key = _splitmix64(np.full(1, seed & (2**64 - 1), dtype=np.uint64))
    for part in (layer, probe):
        key = _splitmix64(key ^ np.uint64(part & (2**64 - 1)))
    keys = _splitmix64(key ^ np.asarray(rows, dtype=np.uint64))
    return _splitmix64(keys ^ np.asarray(positions, dtype=np.uint64))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit values, in place. A product of two 32-bit values may
    wrap past int64's sign bit; its low 32 bits, all that is kept, are still right."""
    x ^= x >> 16
    x.mul_(0x7FEB352D).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(0x846CA68B).bitwise_and_(_MASK32)
    x ^= x >> 16
    return x


def rademacher(keys: np.ndarray, width: int, device, dtype: torch.dtype) -> torch.Tensor:
    """(N, width) independent +-1 entries, probability 1/2 each: entry (n, j) from token key n and
    dimension j only, so any subset of tokens or a chunk of them is drawn the same as in the whole."""
    keys = np.asarray(keys, dtype=np.uint64)
    low = torch.from_numpy((keys & np.uint64(_MASK32)).astype(np.int64)).to(device)
    high = torch.from_numpy((keys >> np.uint64(32)).astype(np.int64)).to(device)
    columns = _mix32(torch.arange(width, device=device, dtype=torch.int64).mul_(0x9E3779B9).bitwise_and_(_MASK32))
    x = _mix32(low[:, None] ^ columns[None, :])
    x = _mix32(x ^ high[:, None])
    return (x >> 31).to(dtype).mul_(2).sub_(1)
