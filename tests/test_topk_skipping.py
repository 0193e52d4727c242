"""The per-chunk ranking that skips what cannot enter (topk.batch_top_above, DeviceAccumulator's floors):
the tables must equal a brute-force ranking of every token by the rule (|score| descending, then row, then
position; zeros are no example) for the cases a wrong floor would get wrong: a later chunk that beats the
K-th best, ties at the floor with an earlier row arriving later, all-equal scores, negative scores, columns
with fewer than K nonzero tokens, and fewer than K tokens in all."""

import numpy as np
import pytest
import torch

from raygrad.compute.accumulator import DeviceAccumulator
from raygrad.store import topk


def brute_force(scores: np.ndarray, rows: np.ndarray, positions: np.ndarray, k: int) -> list[list[tuple]]:
    best = []
    for dim in range(scores.shape[1]):
        tokens = [(int(r), int(p), float(s)) for r, p, s in zip(rows, positions, scores[:, dim]) if s != 0]
        tokens.sort(key=lambda t: (-abs(t[2]), t[0], t[1]))
        best.append(tokens[:k])
    return best


def ranked(scores, rows, positions, k: int, dtype, batches: list[np.ndarray], chunks: int) -> list[list[tuple]]:
    """The accumulator's tables after the tokens are offered in `batches` (index arrays, in that order),
    each batch in (row, position) order as make_batch gives it and added in `chunks` calls."""
    kept = torch.float64 if dtype == torch.float64 else torch.float32
    acc = DeviceAccumulator(1, {"grad": scores.shape[1]}, torch.device("cpu"), top_k=k, score_dtype=kept)
    for part in batches:
        part = part[np.lexsort((positions[part], rows[part]))]

        class Batch:
            token_rows, token_positions = rows[part], positions[part]

        staged = acc.empty_like()
        staged.begin_batch(Batch)
        x = torch.tensor(scores[part], dtype=dtype)
        for piece in np.array_split(np.arange(len(part)), chunks):
            if len(piece):
                staged.add("grad", 0, x[piece[0]:piece[-1] + 1], int(piece[0]))
        acc.merge(staged)
    tables = acc.to_partial().examples
    score, row, position = (tables[name][0] for name in topk.array_names("grad"))
    return [[(int(r), int(p), float(s)) for s, r, p in zip(score[dim], row[dim], position[dim]) if r != topk.EMPTY]
            for dim in range(score.shape[0])]


def hard_cases(rng, tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, 8) scores, exact in bfloat16, and distinct (row, position) pairs. Columns:
    0 grows with the row (every later batch beats the K-th best), 1 shrinks, 2 few distinct |values| of both
    signs (ties at the floor everywhere), 3 all equal, 4 all negative, 5 three nonzero tokens, 6 none,
    7 random with a seventh zeros."""
    pairs = rng.choice(60 * 40, size=tokens, replace=False)
    rows, positions = pairs // 40, pairs % 40
    order = np.lexsort((positions, rows)).argsort()  # each token's rank in the dataset order
    scores = np.zeros((tokens, 8))
    scores[:, 0] = (order + 1) / 4
    scores[:, 1] = (tokens - order) / 4
    scores[:, 2] = rng.choice([-1.5, -1.0, 1.0, 1.5, 0.5], size=tokens)
    scores[:, 3] = 0.75
    scores[:, 4] = -rng.integers(1, 5, size=tokens) / 8
    scores[rng.choice(tokens, size=min(3, tokens), replace=False), 5] = [2.0, -2.0, 1.0][:min(3, tokens)]
    scores[:, 7] = np.where(rng.random(tokens) < 1 / 7, 0, rng.integers(-9, 10, size=tokens) / 2)
    return scores, rows, positions


@pytest.fixture(params=[32, 0], ids=["one sort", "two sorts"])
def always_skipping(monkeypatch, request):
    """Every chunk with a floor takes the skipping path (by default a chunk where more than SPARSE_SHARE of
    the entries pass ranks them all), and the calls that did are counted. Its keys sort at once where the
    column and row fit in KEY_BITS, by magnitude and row then column otherwise (wide chunks): both run."""
    monkeypatch.setattr(topk, "SPARSE_SHARE", 1.0)
    monkeypatch.setattr(topk, "KEY_BITS", request.param)
    return count_skipping(monkeypatch)


def count_skipping(monkeypatch) -> dict:
    """-> {"skipped": n}, n counting the calls of topk.batch_top_above that took the skipping path."""
    calls = {"skipped": 0}
    original = topk.batch_top_above

    def counted(x, floor, k):
        found = original(x, floor, k)
        calls["skipped"] += found is not None
        return found

    monkeypatch.setattr(topk, "batch_top_above", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_skipping_ranks_as_brute_force_in_any_batch_order(always_skipping, dtype, k):
    rng = np.random.default_rng(k)
    scores, rows, positions = hard_cases(rng, 90)
    want = brute_force(scores, rows, positions, k)
    dataset_order = np.lexsort((positions, rows))
    for batches, chunks in [
        (np.array_split(dataset_order, 9), 1),  # later batches hold later rows: column 0 keeps entering
        (np.array_split(dataset_order[::-1], 6), 2),  # earlier rows arrive later: ties at the floor enter
        (np.array_split(rng.permutation(90), 15), 3),
        ([np.arange(90)], 7),  # one batch: the floor comes from its own earlier chunks
    ]:
        before = always_skipping["skipped"]
        assert ranked(scores, rows, positions, k, dtype, batches, chunks) == want, (len(batches), chunks)
        assert always_skipping["skipped"] > before  # the skipping path did rank some chunks


@pytest.mark.parametrize("k", [4, 16])
def test_fewer_tokens_than_k_leave_empty_slots(always_skipping, k):
    scores, rows, positions = hard_cases(np.random.default_rng(1), 3)
    batches = [np.array([0]), np.array([2]), np.array([1])]
    assert ranked(scores, rows, positions, k, torch.float32, batches, 1) == brute_force(scores, rows, positions, k)


def test_the_default_share_also_ranks_as_brute_force():
    """Without the fixture: each chunk chooses between skipping and ranking every entry by itself."""
    rng = np.random.default_rng(5)
    scores, rows, positions = hard_cases(rng, 400)
    scores = np.concatenate([scores, rng.integers(-50, 51, size=(400, 200)) / 4], axis=1)
    want = brute_force(scores, rows, positions, 8)
    batches = np.array_split(rng.permutation(400), 20)
    assert ranked(scores, rows, positions, 8, torch.float32, batches, 2) == want


def test_batch_top_above_offers_exactly_what_reaches_the_floor(monkeypatch):
    """Against a plain sort of one chunk: per column, the best k of the entries with |x| >= floor and x != 0,
    ties to the earlier row; empty slots score 0; None where too many pass."""
    monkeypatch.setattr(topk, "SPARSE_SHARE", 0.5)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.integers(-6, 7, size=(50, 12)) / 2, dtype=torch.float32)
    floor = torch.tensor(rng.integers(3, 7, size=12) / 2, dtype=torch.float32)
    floor[0] = 0  # a column not yet full: every nonzero entry
    score, index = topk.batch_top_above(x, floor, 5)
    for column in range(12):
        passing = [(-abs(float(x[r, column])), r) for r in range(50)
                   if x[r, column] != 0 and abs(float(x[r, column])) >= float(floor[column])]
        want = [r for _, r in sorted(passing)[:5]]
        got = [int(r) for s, r in zip(score[column], index[column]) if s != 0]
        assert got == want, column
        assert (score[column, len(want):] == 0).all()
    assert int(((x.abs() >= floor) & (x != 0)).sum()) <= 0.5 * x.numel()
    assert topk.batch_top_above(x, torch.zeros(12), 5) is None  # every nonzero entry passes: rank them all
    assert topk.batch_top_above(x.double(), floor.double(), 5) is None  # float64: ranked by stable sorts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1, 3, 16])
def test_chunk_floor_is_a_lower_bound_of_each_columns_kth_best(dtype, k):
    """Against a plain sort of |x| per column: never above the k-th largest (ties, zeros, negatives, columns
    with fewer than k nonzero entries, rows not a multiple of the groups), and close to it on a dense chunk."""
    rng = np.random.default_rng(k)
    for n in (k, k + 1, 37, 130, 508):
        scores, _, _ = hard_cases(rng, min(n, 2400))
        x = torch.tensor(np.concatenate([scores, rng.standard_normal((n, 40))], axis=1), dtype=dtype)
        floor = topk.chunk_floor(x, k)
        kth = np.sort(np.abs(x.float().numpy()), axis=0)[::-1][k - 1]
        assert floor.dtype == dtype and floor.shape == (x.shape[1],)
        assert (floor.float().numpy() <= kth).all(), n
        assert (floor[6] == 0).all()  # column 6 has no nonzero entry
    dense = torch.randn(508, 2000, generator=torch.Generator().manual_seed(0)).to(dtype)
    passing = (dense.abs() >= topk.chunk_floor(dense, 16)).float().mean()
    assert 16 / 508 <= passing < topk.SPARSE_SHARE  # at least the k best pass; few enough to skip the rest
    assert topk.chunk_floor(dense[:15], 16) is None and topk.chunk_floor(dense.double(), 16) is None


def test_a_shards_first_chunk_skips_and_ranks_as_brute_force(monkeypatch):
    """One batch in one chunk (the tables empty, no earlier chunk): chunk_floor's bound alone lets the default
    share skip, and the tables equal the brute force (written without a merge: the candidates are best first)."""
    calls = count_skipping(monkeypatch)
    rng = np.random.default_rng(3)
    scores, rows, positions = hard_cases(rng, 500)
    scores = np.concatenate([scores, rng.integers(-400, 401, size=(500, 300)) / 8], axis=1)
    for k in (1, 16):
        assert ranked(scores, rows, positions, k, torch.float32, [np.arange(500)], 1) == \
            brute_force(scores, rows, positions, k)
    assert calls["skipped"] == 2
