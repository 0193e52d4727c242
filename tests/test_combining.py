"""Combining (compute/folding.py, scheduler.SendPolicy, Reducer.add): a worker folds consecutive shards
into one running partial and sends it when the head asks; the head commits a combined partial's shards
all or nothing. Against the simulated Ray of test_pool_losses (every shard comes back exactly once; a
worker lost with folded shards costs only those, re-queued uncharged, the loss charged to the shard it
was computing; one that comes back after being out of reach drops what it folded); with real Partials
(folded top-K tables byte-identical to adding shard by shard, sums to float64 rounding; a partial with
a shard already in is not added at all); and on two real Ray workers (folding off and on give the
in-process run's tables, also with a worker killed holding folded shards)."""

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import assert_same_totals, build_config, run_tiny, write_many_texts
from test_cluster import cluster_ray  # noqa: F401 (a fixture)
from test_pool_losses import ShardList, World

from raygrad.cluster import pool as pool_module
from raygrad.cluster import scheduler
from raygrad.cluster.pool import WorkerPool
from raygrad.cluster.runtime import RemoteWorker
from raygrad.compute.folding import SendOrder, ShardFold
from raygrad.config import RunConfig
from raygrad.dataset.shards import Shard
from raygrad.store import topk
from raygrad.store.partial import Partial, ShardResult, array_widths
from raygrad.store.reducer import Reducer
from raygrad.store.zarr_store import ResultStore

# --- the scheduler's side, on the simulated Ray of test_pool_losses


def folded_run(world: World, shards: int, workers: int) -> list[ShardResult]:
    pool = WorkerPool(RunConfig(workers=workers), echo=world.said.append)
    pool.workers = workers
    pool.start_workers(SimpleNamespace(sae_layers_per_pass=None, layers=[]), seed=0)
    return list(pool.map([(shard, None, Shard(shard, shard + 1, 1, 6, "")) for shard in range(shards)]))


def shards_sent(results: list[ShardResult]) -> list[int]:
    """Every shard in every partial sent, as often as sent: the partials' own lists (ShardList) and the
    shards they say they hold must agree."""
    out = []
    for result in results:
        assert sorted(result.partial) == sorted(result.shards), (result.partial, result.shards)
        out.extend(result.partial)
    return sorted(out)


@pytest.mark.parametrize("share", [math.inf, 0.0])
def test_every_shard_is_sent_once_folded_or_not(monkeypatch, share):
    """20 shards on 2 workers. Every call sending (share inf): 20 partials. The head giving no time to
    partials (share 0): the first shard alone (to measure one), the rest held until the tail."""
    world = World(monkeypatch, [dict(name="a"), dict(name="b")], head_share=share)
    results = folded_run(world, 20, workers=2)
    assert shards_sent(results) == list(range(20))
    if share == math.inf:
        assert len(results) == 20
    else:
        assert len(results) <= 5 and results[0].shards.keys() == {0}, [sorted(r.shards) for r in results]


def test_the_policy_paces_sends_by_the_head_s_cost(monkeypatch):
    """The head's cost per partial measured at 0.5 s and its share 0.25: a send every 2 s of the fake
    clock at most, however many calls are sent; the first call sends before anything is measured, and
    each token goes to the worker whose shards have waited longest."""
    policy = scheduler.SendPolicy(0.25)
    assert policy.grant(0.0, ahead=0, workers=4)  # the first: to measure a partial
    assert not policy.grant(1.0, ahead=0, workers=4)  # nothing measured: nothing fills the bucket
    policy.measured(0.5)
    grants = [t for t in np.arange(1.0, 21.0, 0.25) if policy.grant(float(t), ahead=0, workers=4)]
    assert grants == [3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0, 17.0, 19.0], grants  # 0.5 partials/s: 1 per 2 s
    assert not policy.grant(21.0, ahead=1, workers=4)  # one token, owed to a worker waiting longer
    assert policy.grant(21.0, ahead=0, workers=4)


def test_a_worker_killed_holding_folded_shards_costs_only_those(monkeypatch):
    """One worker, nothing sent between the first shard and the tail; shard 5 kills its process: the
    loss is charged to shard 5 alone, shards 1-4 (folded, unsent) are queued again uncharged and
    computed again, and every shard is sent exactly once."""
    world = World(monkeypatch, [dict(name="only")], fates={5: ["kill"]}, head_share=0.0)
    results = folded_run(world, 8, workers=1)
    assert shards_sent(results) == list(range(8))
    assert len(world.lost_lines(5)) == 1 and not any(world.lost_lines(s) for s in (1, 2, 3, 4)), world.said
    (actor,) = world.made
    assert sorted(actor.computed) == sorted([*range(8), 1, 2, 3, 4, 5])  # the folded ones computed twice


def test_a_worker_back_from_out_of_reach_drops_what_it_folded(monkeypatch, caplog):
    """Shard 4's worker is out of reach for 0.3 s halfway; its process runs on, holding shards 1-3.
    The head queues them again; the worker, told a new fold number, drops them, so each is sent once,
    and no partial is ever refused for holding a shard already in."""
    world = World(monkeypatch, [dict(name="only")], fates={4: ["unreachable"]}, head_share=0.0)
    with caplog.at_level(logging.WARNING):
        results = folded_run(world, 8, workers=1)
    assert shards_sent(results) == list(range(8))
    assert not [record for record in caplog.records if "already" in record.getMessage()]


def test_a_partial_that_arrives_after_the_next_acknowledgements_holds_what_it_was_sent_with(monkeypatch):
    """Shard 0's partial (the first call sends) reaches the driver 2.5 s late, after the acknowledgements
    of shards 1 and 2 computed behind it: each partial is checked against the calls sent before its
    `send` call, not against what arrived first, and every shard is sent once."""
    world = World(monkeypatch, [dict(name="only")], deliver_seconds={0: 2.5}, head_share=0.0)
    results = folded_run(world, 8, workers=1)
    assert shards_sent(results) == list(range(8))
    assert results[0].shards.keys() == {0}


def test_the_tail_reduces_among_the_workers_and_the_head_takes_one_partial(monkeypatch):
    """8 workers, 40 shards of 1 s, nothing sent after the first shard: at the end the workers absorb each
    other's partials two at a time (7 absorbs, 3 rounds of 0.1 s), and the head takes one partial for
    all of them, not one per worker; every shard once, the absorbed partials' shards with them."""
    world = World(monkeypatch, [dict(name=f"w{i}") for i in range(8)], head_share=0.0)
    results = folded_run(world, 40, workers=8)
    assert shards_sent(results) == list(range(40))
    assert [sorted(r.shards) for r in results[:1]] == [[0]] and len(results) == 2, [sorted(r.shards) for r in results]
    absorbs = [(actor.name, shards) for actor in world.made for shards in actor.absorbed]
    assert len(absorbs) == 7, absorbs
    first_absorb = min(t for actor in world.made for t, method in actor.calls if method == "absorb")
    rounds = (world.clock.now - first_absorb) / world.absorb_seconds
    assert 2.9 < rounds < 4.1, rounds  # log2(8) = 3 rounds (not 7), then the final send


def test_a_long_absorb_is_not_taken_for_waiting_on_workers(monkeypatch):
    """Absorbs of 40 s (a large partial's merge on a slow worker), nothing else running: no "waiting for
    workers" status line (it would ask a Ray this simulation has not started, and fail)."""
    world = World(monkeypatch, [dict(name="a"), dict(name="b")], head_share=0.0)
    world.absorb_seconds = 40.0
    results = folded_run(world, 6, workers=2)
    assert shards_sent(results) == list(range(6)) and not world.said, world.said


@pytest.mark.parametrize("fate, key", [("kill", "absorb"), ("unreachable", "absorb"), ("kill", "send")])
def test_either_side_of_an_absorb_lost_costs_only_its_folded_shards(monkeypatch, caplog, fate, key):
    """The first absorb's taker killed or out of reach halfway through, or the first giver killed as it
    sends: the shards folded on the lost side (for a taker: the giver's too) are queued again uncharged
    and computed again, and every shard is sent exactly once; no shard is charged a loss."""
    world = World(monkeypatch, [dict(name=f"w{i}") for i in range(4)], fates={key: [fate]}, head_share=0.0)
    with caplog.at_level(logging.WARNING):
        results = folded_run(world, 16, workers=4)
    assert shards_sent(results) == list(range(16))
    assert not [line for line in world.said if line.startswith("worker lost during shard")], world.said
    assert [line for line in world.said if "queued again" in line], world.said
    computed = sorted(shard for actor in world.made for shard in actor.computed)
    assert len(computed) > 16 and set(computed) == set(range(16))  # the lost side's shards computed again
    assert not [record for record in caplog.records if "already" in record.getMessage()]


def test_a_fold_number_change_drops_the_old_fold():
    fold = ShardFold()
    ack = fold.take(ShardResult(0, ShardList([0]), 1.0, 0.0), SendOrder(7, False))
    assert ack.partial is None and ack.shards == {}
    fold.take(ShardResult(1, ShardList([1]), 2.0, 0.0), SendOrder(7, False))
    sent = fold.take(ShardResult(2, ShardList([2]), 3.0, 0.0), SendOrder(7, True))
    assert sent.shards == {0: 1.0, 1: 2.0, 2: 3.0} and sent.partial == [0, 1, 2]
    fold.take(ShardResult(3, ShardList([3]), 1.0, 0.0), SendOrder(7, False))
    sent = fold.take(ShardResult(4, ShardList([4]), 1.0, 0.0), SendOrder(8, True))  # 3 was given up
    assert sent.shards == {4: 1.0} and sent.partial == [4]
    assert fold.take(None, SendOrder(8, True)).partial is None  # nothing held: nothing sent


# --- real Partials: the tables of a folded run are those of a run that sent every shard

LAYERS, WIDTH, K = 2, 24, 4
PREFIXES = {"grad": WIDTH, "value": WIDTH}
RANKED = ("grad", "value")


def shard_partial(shard: int, rng: np.random.Generator) -> Partial:
    """A shard's sums and top-K tables from random candidates: scores drawn from a few values (ties
    decided by row, then position), some zeros, rows of this shard only."""
    sums = {name: rng.normal(size=(LAYERS, width)) for name, width in array_widths(PREFIXES).items()}
    examples = {}
    for prefix in RANKED:
        n = 9
        score = torch.tensor(rng.choice([-2.0, -0.5, 0.0, 0.5, 1.0, 2.0], size=(LAYERS, WIDTH, n)), dtype=torch.float32)
        row = torch.tensor(shard * 10 + rng.integers(0, 3, size=(LAYERS, WIDTH, n)), dtype=torch.int64)
        position = torch.tensor(rng.permutation(LAYERS * WIDTH * n).reshape(LAYERS, WIDTH, n) % 50,
                                dtype=torch.int32)
        tables = topk.top(score, row, position, K)
        examples.update(zip(topk.array_names(prefix), (tables[t].numpy() for t in topk.TABLES)))
    return Partial(sums, rng.integers(1, 100, size=LAYERS), loss_sum=float(rng.random()), loss_tokens=5,
                   examples=examples)


def reducer_for(path, shards: int) -> Reducer:
    store = ResultStore.create(path, PREFIXES, shards, list(range(LAYERS)), {}, top_k=K, ranked=RANKED)
    return Reducer(store, checkpoint_seconds=3600, progress=False)


def test_folded_partials_commit_the_tables_of_shard_by_shard(tmp_path):
    rng = np.random.default_rng(0)
    partials = [shard_partial(shard, rng) for shard in range(7)]
    one_by_one = reducer_for(tmp_path / "a.zarr", 7)
    for shard, partial in enumerate(partials):
        one_by_one.add(ShardResult(shard, partial, 1.0, 0.0))
    folded, fold = reducer_for(tmp_path / "b.zarr", 7), ShardFold()
    copies = [Partial({n: v.copy() for n, v in p.sums.items()}, p.tokens.copy(), p.loss_sum, p.loss_tokens,
                      {n: v.copy() for n, v in p.examples.items()}) for p in partials]
    for shard, send in zip([3, 0, 5, 1, 6, 2, 4], [False, False, True, False, True, False, True]):  # any order
        answer = fold.take(ShardResult(shard, copies[shard], 1.0, 0.0), SendOrder(1, send))
        folded.add(answer)
    assert folded.complete and one_by_one.complete and folded.partials_received == 3
    assert_same_totals(folded.totals, one_by_one.totals, rtol=1e-12)
    for name, value in one_by_one.totals.examples.items():
        assert folded.totals.examples[name].tobytes() == value.tobytes(), name
    one_by_one.close()
    folded.close()


def test_a_tree_of_absorbed_folds_commits_the_tables_of_shard_by_shard(tmp_path):
    """Four workers' folds of 8 shards reduced as the tail does (two absorbs, then one absorbing the
    other's result): one partial for all 8 shards, tables byte-identical to adding shard by shard."""
    rng = np.random.default_rng(2)
    partials = [shard_partial(shard, rng) for shard in range(8)]
    one_by_one = reducer_for(tmp_path / "a.zarr", 8)
    for shard, partial in enumerate(partials):
        one_by_one.add(ShardResult(shard, partial, 1.0, 0.0))
    copies = [Partial({n: v.copy() for n, v in p.sums.items()}, p.tokens.copy(), p.loss_sum, p.loss_tokens,
                      {n: v.copy() for n, v in p.examples.items()}) for p in partials]
    folds = [ShardFold() for _ in range(4)]
    for shard in [5, 2, 7, 0, 3, 6, 1, 4]:
        folds[shard % 4].take(ShardResult(shard, copies[shard], float(shard), 0.0), SendOrder(shard % 4, False))
    for taker, giver in [(0, 1), (3, 2), (3, 0)]:
        folds[taker].absorb(folds[giver].take(None, SendOrder(giver, True)), SendOrder(taker, False))
    sent = folds[3].take(None, SendOrder(3, True))
    assert sent.shards == {shard: float(shard) for shard in range(8)}
    with pytest.raises(RuntimeError, match="already folded"):
        folds[3].take(ShardResult(0, copies[0], 0.0, 0.0), SendOrder(3, False))
        folds[3].absorb(ShardResult(0, copies[0], 0.0, 0.0), SendOrder(3, False))
    tree = reducer_for(tmp_path / "b.zarr", 8)
    tree.add(sent)
    assert tree.complete and tree.partials_received == 1
    assert_same_totals(tree.totals, one_by_one.totals, rtol=1e-12)
    for name, value in one_by_one.totals.examples.items():
        assert tree.totals.examples[name].tobytes() == value.tobytes(), name
    one_by_one.close()
    tree.close()


def test_a_partial_holding_a_shard_already_in_is_not_added_at_all(tmp_path, caplog):
    rng = np.random.default_rng(1)
    partials = [shard_partial(shard, rng) for shard in range(3)]
    reducer = reducer_for(tmp_path / "s.zarr", 3)
    reducer.add(ShardResult(1, partials[1], 1.0, 0.0))
    before = reducer.totals.sums["grad_sum"].copy(), {n: v.copy() for n, v in reducer.totals.examples.items()}
    both = Partial({n: v.copy() for n, v in partials[0].sums.items()}, partials[0].tokens.copy(),
                   examples=dict(partials[0].examples))
    both.add(partials[1])
    with caplog.at_level(logging.WARNING):
        reducer.add(ShardResult(1, both, 1.0, 0.0, folded={0: 1.0, 1: 1.0}))
    assert reducer.done.tolist() == [False, True, False]  # shard 0 not in either
    np.testing.assert_array_equal(reducer.totals.sums["grad_sum"], before[0])
    for name, value in before[1].items():
        np.testing.assert_array_equal(reducer.totals.examples[name], value)
    assert "already counted" in caplog.text
    reducer.add(ShardResult(2, None, 1.0, 0.0))  # an acknowledgement commits nothing
    assert reducer.done.tolist() == [False, True, False] and reducer.partials_received == 2
    reducer.close()


# --- two real Ray workers

RAY_RUN = dict(layers="0,2", num_samples=16, max_length=12, batch_size=2, shard_size=1,
               aggregate_by=("gradients", "values"), top_examples=4)  # 16 shards


class DiesOnceOnShard(RemoteWorker):
    """Its process dies the first time any worker computes shard `shard` (a marker file says it did), in
    that shard's turn to compute: with nothing sent since the first shard, it holds folded shards then."""

    marker = ""
    shard = 6

    def run(self, shard, source, ref, ticket, after, order=None):
        import os

        if shard == self.shard and not os.path.exists(self.marker):
            with self._turns.turn(ticket, after):  # computing, once the shard before it has been folded
                import time

                time.sleep(2.0)  # a while into the shard, as a real one dies: the last answer is home
                open(self.marker, "w").close()
                os._exit(1)
        return super().run(shard, source, ref, ticket, after, order)


@pytest.mark.parametrize("dies", [False, True])
def test_two_ray_workers_folding_give_the_in_process_tables(tiny_llama, tmp_path, monkeypatch, cluster_ray,  # noqa: F811
                                                            dies):
    """Nothing sent between each worker's first shard and the tail (HEAD_SHARE 0): counts and tables
    byte-identical to the in-process run's, sums to float64 rounding, the head taking 2 partials (the
    first shard, then one worker's fold with the other's absorbed into it, moved worker to worker); a
    worker killed on shard 6 while holding folded shards: they are computed again, the loss charged to shard 6 alone."""
    import sys

    from ray import cloudpickle

    texts_file = write_many_texts(tmp_path / "texts.txt")
    _, want = run_tiny(tiny_llama, texts_file, tmp_path / "in-process", **RAY_RUN)
    monkeypatch.setattr(scheduler, "HEAD_SHARE", 0.0)
    said = []
    if dies:
        DiesOnceOnShard.marker = str(tmp_path / "died")
        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module
        monkeypatch.setattr(pool_module, "RemoteWorker", DiesOnceOnShard)
    try:
        from raygrad import engine

        run_dir = engine.run(build_config(tiny_llama, texts_file, tmp_path / "ray", workers=2, **RAY_RUN),
                             echo=said.append, progress=False)
    finally:
        if dies:
            cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    from raygrad import constants as names

    store = ResultStore.open(run_dir / names.STORE_NAME)
    got, done = store.totals()
    assert done.all()
    assert_same_totals(got, want)
    assert set(got.examples) == set(want.examples)
    for name, value in want.examples.items():
        assert got.examples[name].tobytes() == value.tobytes(), name
    if not dies:  # the first shard (to measure a partial), then one for both workers: the other absorbed
        import json

        timing = json.loads((run_dir / names.TIMING_JSON).read_text())
        assert timing["partials_received"] == 2, timing
    lost = [line for line in said if line.startswith("worker lost")]
    assert lost == ([line for line in lost if line.startswith("worker lost during shard 6 ")] if dies else []), said
    assert len(lost) == int(dies), said
