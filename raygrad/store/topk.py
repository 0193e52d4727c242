"""Top-K examples per dimension: for every layer and every dimension of the target space, the K tokens
with the largest |score| (a gradient, attribution or value), each as (signed score, dataset row, token
position).

The order is total, so the top-K of any union is exact and the same for any batching, sharding, worker
count or resume: |score| descending, then row ascending, then position ascending. A score of exactly 0
is not an example (a token that does not move a feature does not drive it; an SAE feature inactive on
most tokens would otherwise fill its K slots with arbitrary zeros): a dimension with fewer than K
nonzero scores keeps empty slots, row = position = -1, score 0.

Tables are (layers, width, K) per kind, sorted best first along K. The same merge runs on a worker's
device (batch after batch), on a worker's host (shard partials) and in the reducer.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from .. import constants as names
from ..constants import EXAMPLE_KINDS

if TYPE_CHECKING:  # torch is imported where it is used: reading results (store, the read commands) needs none
    import torch

RANKED_PREFIXES = tuple(names.KIND_PREFIX[kind] for kind in EXAMPLE_KINDS)
EMPTY = -1  # row and position of an empty slot
POSITION_BITS = 21  # the merge orders ties by row * 2**21 + position: positions < 2,097,152 tokens
TABLES = ("score", "row", "position")
FILL = {"score": 0, "row": EMPTY, "position": EMPTY}  # an empty slot


def example_prefixes(kinds) -> list[str]:
    """The statistic prefixes ranked for `kinds` (the run's --aggregate-by), in a fixed order."""
    return [names.KIND_PREFIX[kind] for kind in EXAMPLE_KINDS if kind in kinds]


def array_names(prefix: str) -> tuple[str, str, str]:
    """'grad' -> ('grad_top_score', 'grad_top_row', 'grad_top_position'): the store's arrays."""
    return tuple(f"{prefix}_top_{table}" for table in TABLES)


def score_dtype(model_dtype: str) -> np.dtype:
    """Scores are kept in float32 (exact for bfloat16, float16 and float32 models); float64 in a float64 run."""
    return np.dtype(np.float64 if model_dtype == "float64" else np.float32)


def table_dtypes(score: np.dtype) -> dict[str, np.dtype]:
    return {"score": np.dtype(score), "row": np.dtype(np.int64), "position": np.dtype(np.int32)}


def empty(num_layers: int, width: int, k: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    return {name: np.full((num_layers, width, k), FILL[name], table_dtype)
            for name, table_dtype in table_dtypes(dtype).items()}


def empty_tensors(num_layers: int, width: int, k: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    import torch

    dtypes = {"score": dtype, "row": torch.int64, "position": torch.int32}
    return {name: torch.full((num_layers, width, k), FILL[name], dtype=dtypes[name], device=device) for name in TABLES}


def merge_named(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Two partials' example arrays (array_names(prefix) -> (L, width, K)) merged: a's layout and K."""
    merged = {name: value.copy() for name, value in a.items()}
    merge_named_into(merged, b)
    return merged


def merge_named_into(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """merge_named(a, b) written into a's arrays (which must be writable: a running total's own, never
    a partial just taken from Ray's object store), with no copy of a's tables."""
    for prefix in {name.rsplit("_top_", 1)[0] for name in a}:
        keys = array_names(prefix)
        merge_sorted_into(dict(zip(TABLES, (a[name] for name in keys))), dict(zip(TABLES, (b[name] for name in keys))))


def merge_sorted(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """merge() of two host tables that are each sorted best first (as every table is), k = a's K: only
    the (layer, dimension) cells where b's best would enter a's K are merged. After S shards a new
    shard enters a cell with a chance of about K / S, so the head's work per partial falls as a run goes."""
    out = {name: value.copy() for name, value in a.items()}
    merge_sorted_into(out, b)
    return out


def merge_sorted_into(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """merge_sorted(a, b) written into a's arrays: the cells b enters are merged and written back in
    place; a's other cells are neither copied nor touched."""
    k = a["score"].shape[-1]
    worst = {name: value[..., -1] for name, value in a.items()}
    best = {name: value[..., 0] for name, value in b.items()}
    enters = _precedes(best, worst)
    if enters.mean() > 0.5:  # most cells change (the first shards): merging all beats gathering them
        for name, value in _merge_by_magnitude(a, b, k).items():
            np.copyto(a[name], value)
        return
    if enters.any():
        cells = np.nonzero(enters)
        merged = _merge_by_magnitude({name: value[cells] for name, value in a.items()},
                                     {name: value[cells] for name, value in b.items()}, k)
        for name, value in merged.items():
            a[name][cells] = value


def _merge_by_magnitude(a: dict[str, np.ndarray], b: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """merge() of host tables (cells, K) each, faster: one top-k by |score| decides every cell whose first
    k + 1 real candidates have distinct |scores| (the rows then cannot change the order); the cells with
    equal |scores| there go through the exact merge. In torch, whose CPU kernels use every core (three
    times faster than merge() on 2 cores, nine times faster than the same steps in NumPy)."""
    import torch

    both = {name: torch.cat([_tensor(a[name]), _tensor(b[name])], dim=-1) for name in TABLES}
    real = (both["row"] != EMPTY) & (both["score"] != 0)
    magnitude = torch.where(real, both["score"].abs(), -1)
    ranked, order = torch.topk(magnitude, k + 1, dim=-1)
    tied = ((ranked[..., 1:] == ranked[..., :-1]) & (ranked[..., 1:] >= 0)).any(dim=-1)
    order, kept = order[..., :k], ranked[..., :k] >= 0
    out = {name: torch.where(kept, value.gather(-1, order), FILL[name]).numpy() for name, value in both.items()}
    if tied.any():
        cells = tied.numpy()
        exact = merge({name: value[cells] for name, value in a.items()},
                      {name: value[cells] for name, value in b.items()}, k)
        for name, value in exact.items():
            out[name][cells] = value
    return out


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing the array's memory, which is only read here: a partial from Ray's object store
    is read-only, and torch warns about that although nothing writes to it."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _precedes(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> np.ndarray:
    """Elementwise: x is a real example that comes before y in the total order (an empty y comes last)."""
    x_real = (x["row"] != EMPTY) & (x["score"] != 0)
    y_real = (y["row"] != EMPTY) & (y["score"] != 0)
    x_mag, y_mag = np.abs(x["score"].astype(np.float64)), np.abs(y["score"].astype(np.float64))
    earlier = (x["row"] < y["row"]) | ((x["row"] == y["row"]) & (x["position"] < y["position"]))
    return x_real & (~y_real | (x_mag > y_mag) | ((x_mag == y_mag) & earlier))


def merge(a: dict, b: dict, k: int) -> dict:
    """The exact top-k of the union of two sets of tables (torch tensors on one device, or NumPy arrays:
    then NumPy arrays come back), each (..., n) along the last axis, in any order, empty slots anywhere."""
    import torch

    as_numpy = isinstance(a["score"], np.ndarray)
    if as_numpy:
        a = {name: _tensor(value) for name, value in a.items()}
        b = {name: _tensor(value) for name, value in b.items()}
    merged = top(**{name: torch.cat([a[name], b[name].to(a[name].device)], dim=-1) for name in TABLES}, k=k)
    return {name: value.numpy() for name, value in merged.items()} if as_numpy else merged


def top(score: torch.Tensor, row: torch.Tensor, position: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The first k of (..., n) candidates by the total order; fewer than k real ones leave empty slots."""
    import torch

    real = (row != EMPTY) & (score != 0)
    # Two stable sorts make a lexicographic one: by (row, position), then by |score| descending.
    tie = torch.where(real, row * (1 << POSITION_BITS) + position.long(), torch.iinfo(torch.int64).max)
    order = torch.sort(tie, dim=-1, stable=True).indices
    magnitude = torch.where(real, score.abs().double(), -1.0).gather(-1, order)
    order = order.gather(-1, torch.sort(magnitude, dim=-1, descending=True, stable=True).indices)
    order = order[..., :k]
    kept = real.gather(-1, order)
    out = {name: torch.where(kept, value.gather(-1, order), FILL[name])
           for name, value in (("score", score), ("row", row), ("position", position))}
    if out["score"].shape[-1] < k:  # fewer candidates than slots
        pad = k - out["score"].shape[-1]
        out = {name: torch.nn.functional.pad(value, (0, pad), value=FILL[name]) for name, value in out.items()}
    return out


def best_in_batch(score_a: torch.Tensor, index_a: torch.Tensor, score_b: torch.Tensor, index_b: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Within one batch: the best k of two (width, n) candidate sets, each a score and the index of its
    row among the batch's aggregated positions (which are in (row, position) order, so a lower index is
    the earlier token). Same total order as `top`, best first, zeros included (`top` drops them later)."""
    import torch

    score, index = torch.cat([score_a, score_b], dim=1), torch.cat([index_a, index_b], dim=1)
    order = _best(score, k, dim=1, ranks=index)
    return score.gather(1, order), index.gather(1, order)


def batch_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """(k', width) indices into the rows of x (n, width) of each column's k' = min(k, n) best rows by
    |x|, ties to the earlier row, best first: exact when x's rows are in (row, position) order, as a
    batch's aggregated positions are (grads.make_batch)."""
    return _best(x, k, dim=0)


SPARSE_SHARE = 1 / 8  # above this share of x's entries able to enter, ranking them all (batch_top) is faster
KEY_BITS = 32  # bits an int64 sort key has beside |x|'s 31 for a column and a row (batch_top_above)
GROUPS_PER_K = 4  # chunk_floor's row groups per slot: 4k groups keep about 3.5% of a 508-row chunk, 3.1% is ideal


def chunk_floor(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """(width,) a lower bound of each column's k-th largest |x| over the rows of x (n, width), from x alone,
    in one read of it: the k-th largest of the maxima of min(n, GROUPS_PER_K * k) disjoint groups of rows.
    k groups reach it, so k distinct entries do, and the column's k-th best is no lower (0 where fewer than
    k groups hold a nonzero entry). None when x has fewer than k rows or is float64 (batch_top_above's case)."""
    import torch

    n, width = x.shape
    if n < k or x.dtype == torch.float64:
        return None
    groups = min(n, GROUPS_PER_K * k)
    rows = n // groups
    grouped = x[: groups * rows].view(groups, rows, width)
    maxima = torch.maximum(grouped.amax(1), grouped.amin(1).neg_())  # (groups, width) max |x|, with no |x| copy
    return torch.topk(maxima, k, dim=0, sorted=False).values.amin(0)


def batch_top_above(x: torch.Tensor, floor: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """batch_top's choice among the entries of x (n, width) that can still enter: nonzero and |x| >= floor
    (width,), the |score| of each column's K-th best so far (0: fewer than K yet). -> (width, k) scores (x's
    dtype) and row indices, best first, a slot with nothing to offer holding score 0 (which is no example,
    so `top` drops it) and index 0; or None when more than SPARSE_SHARE of the entries can enter, or x is float64.

    Exact: an entry below the floor is behind K better ones, and one equal to it is kept (it enters when its
    row comes first). The passing entries are found with one comparison and put in order by one sort of
    integer keys: column, then |x| descending (its bits, which order like its value), then row."""
    import torch

    if x.dtype == torch.float64:  # no spare bits for the row in a float64 key
        return None
    n, width = x.shape
    smallest = torch.nextafter(torch.zeros((), dtype=floor.dtype), torch.ones((), dtype=floor.dtype))
    # |x| compared in the wider of the two dtypes (x's values are exact in the scores' dtype), so a tie stays one
    passes = x.abs() >= floor.to(x.device).clamp_min(smallest)
    if int(torch.count_nonzero(passes)) > SPARSE_SHARE * x.numel():
        return None
    rows, columns = passes.nonzero(as_tuple=True)
    values = x[rows, columns]
    smaller = (1 << 31) - 1 - values.float().abs().view(torch.int32).long()  # 31 bits: a larger |x|, a smaller key
    row_bits, column_bits = max(1, (n - 1).bit_length()), max(1, (width - 1).bit_length())
    if row_bits + column_bits <= KEY_BITS:  # one sort of (column, smaller, row) keys, each distinct
        order = torch.sort((columns << (31 + row_bits)) | (smaller << row_bits) | rows).indices
    else:  # by (smaller, row), then stably by column
        order = torch.sort((smaller << 32) | rows).indices
        order = order.gather(0, torch.sort(columns.gather(0, order), stable=True).indices)
    grouped = columns.gather(0, order)
    rank = torch.arange(grouped.numel(), device=x.device) - torch.searchsorted(grouped, grouped)
    kept = rank < k
    order, grouped, rank = order[kept], grouped[kept], rank[kept]
    score = torch.zeros((width, k), dtype=x.dtype, device=x.device)
    index = torch.zeros((width, k), dtype=torch.int64, device=x.device)
    score[grouped, rank] = values.gather(0, order)
    index[grouped, rank] = rows.gather(0, order)
    return score, index


def _best(values: torch.Tensor, k: int, dim: int, ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Indices along `dim` of the min(k, n) largest |values|, ties to the lower rank (`ranks`, like `values`;
    None: the index along `dim`), best first (|value| descending, then rank ascending).

    The bits of a non-negative float order like its value, so |value|'s bits in the high part of an integer
    key and the rank, reversed, in the low part make every key distinct: torch.topk (which breaks ties in
    no stated order) is then exact. A 16-bit x ranked by index (bfloat16, float16: the GPU's SAE scores)
    takes an int32 key while n <= 65,536, half the memory traffic of the int64 key a float32 x needs.
    float64 has no spare bits: stable sorts (float64 runs are references, not the fast path)."""
    import torch

    n = values.shape[dim]
    k = min(k, n)
    if values.dtype == torch.float64:  # by rank first (already so without ranks), then by |value|
        order = None if ranks is None else torch.sort(ranks, dim=dim, stable=True).indices
        magnitude = values.abs() if order is None else values.abs().gather(dim, order)
        best = torch.sort(magnitude, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
        return best if order is None else order.gather(dim, best)
    if ranks is None and values.dtype in (torch.bfloat16, torch.float16) and n <= 1 << 16:
        bits, shift, key_dtype = values.abs().view(torch.int16).int(), 16, torch.int32
    else:
        bits, shift, key_dtype = values.float().abs().view(torch.int32).long(), 32, torch.int64
    if ranks is None:
        shape = [1] * values.dim()
        shape[dim] = n
        ranks = torch.arange(n, device=values.device, dtype=key_dtype).view(shape)
    reversed_ranks = ((1 << shift) - 1) - ranks.to(key_dtype)  # the lowest rank, the largest key
    keys = bits.bitwise_left_shift_(shift).bitwise_or_(reversed_ranks)  # in place: one key array
    return torch.topk(keys, k, dim=dim, sorted=True).indices  # best first: in the total order
