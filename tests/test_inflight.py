"""Two shards in flight per worker, against the simulated Ray of test_pool_losses (fake actors on a
fake clock): a worker goes from one shard to the next without waiting for the driver, a death is
charged only to the shard its process was computing (the one queued behind it goes back uncharged),
every shard comes back exactly once, and the pool's clocks see the idle time."""

from types import SimpleNamespace

import pytest
from test_pool_losses import World

from raygrad import scheduler
from raygrad.config import RunConfig
from raygrad.pool import WorkerPool
from raygrad.shards import Shard


def run_pool(world: World, shards: int, workers: int) -> tuple[WorkerPool, list]:
    pool = WorkerPool(RunConfig(workers=workers), echo=world.said.append)
    pool.workers = workers
    pool.start_workers(SimpleNamespace(sae_layers_per_pass=None, layers=[]), seed=0)
    results = list(pool.map([(shard, None, Shard(shard, shard + 1, 1, 6, "")) for shard in range(shards)]))
    return pool, results


@pytest.mark.parametrize("per_worker", [1, 2])
def test_a_worker_goes_from_shard_to_shard_without_waiting_for_the_driver(monkeypatch, per_worker):
    """40 shards of 1 s on 2 workers. With two in flight the next shard is sent while one computes,
    so the workers never wait between shards until the last two; with one, each shard waits for the
    driver's `placed` question (0.01 s here) after the one before."""
    monkeypatch.setattr(scheduler, "PER_WORKER", per_worker)
    world = World(monkeypatch, [dict(name="a", load_seconds=0.2), dict(name="b", load_seconds=0.2)])
    pool, results = run_pool(world, 40, workers=2)
    assert sorted(result.shard for result in results) == list(range(40))
    clocks = pool.clocks.record()
    assert set(clocks["worker_idle_seconds"]) == {"1", "2"}
    first_run = 0.01 + 0.2 + 0.01  # placed, loaded, asked `placed` again before the first shard
    if per_worker == 2:
        assert world.clock.now == pytest.approx(first_run + 20 + 0.01, abs=1e-6)  # the last one: a question
        assert clocks["worker_idle_fraction"] < 0.002
        # each actor: asked where it is when it starts and before its first shard; one of them before the last
        assert sum(method == "placed" for actor in world.made for _, method in actor.calls) == 5
    else:
        assert world.clock.now == pytest.approx(0.01 + 0.2 + 20 * 1.01, abs=1e-6)
        assert clocks["worker_idle_fraction"] > 0.009


def test_a_death_is_charged_to_the_shard_computing_not_the_one_queued_behind_it(monkeypatch):
    """One worker; shard 1 kills its process twice, with shard 2 queued behind it both times, then
    shard 2 kills the process once itself: shard 2's only loss is its own (three would stop the run),
    and every shard comes back once."""
    world = World(monkeypatch, [dict(name="only")], fates={1: ["kill", "kill"], 2: ["kill"]})
    _, results = run_pool(world, 6, workers=1)
    assert sorted(result.shard for result in results) == list(range(6))
    assert len(world.lost_lines(1)) == 2 and len(world.lost_lines(2)) == 1, world.said
    assert not any(world.lost_lines(shard) for shard in (0, 3, 4, 5)), world.said


def test_a_queued_shard_of_an_actor_out_of_reach_goes_back_uncharged(monkeypatch):
    """Shard 1 kills its worker twice, then its third run is out of reach for 0.3 s halfway while
    the same process computes on; shard 2 is queued behind it each time. Two losses, none for shard
    2, and the run ends with every shard once."""
    world = World(monkeypatch, [dict(name="only")], fates={1: ["kill", "kill", "unreachable"]})
    _, results = run_pool(world, 5, workers=1)
    assert sorted(result.shard for result in results) == list(range(5))
    assert len(world.lost_lines(1)) == 3 and not world.lost_lines(2), world.said
    assert not world.killed


def test_a_shard_queued_behind_one_that_kills_every_worker_is_not_what_stops_the_run(monkeypatch):
    """Shard 0 kills every process that computes it, with shard 1 queued behind: the run stops on
    shard 0's third loss, naming shard 0."""
    from raygrad.errors import RaygradError

    world = World(monkeypatch, [dict(name="only", max_restarts=2)], fates={0: ["kill"] * 9})
    with pytest.raises(RaygradError, match=r"^shard 0 \(1 texts"):
        run_pool(world, 4, workers=1)
    assert not world.lost_lines(1)
