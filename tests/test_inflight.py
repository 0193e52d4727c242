"""Two shards in flight per worker, against the simulated Ray of test_pool_losses (fake actors on a
fake clock, two calls at a time each): a worker goes from one shard to the next without waiting for
the driver, a death is charged only to the shard its process was computing (the one sent behind it,
read or not, goes back uncharged), every shard comes back exactly once, and the pool's clocks see the
idle time. Then the real actor (RemoteWorker) on two threads: calls compute in the order sent,
whichever read its rows first."""

import threading
import time
from types import SimpleNamespace

import pytest
from test_pool_losses import ShardList, World

from raygrad.cluster import scheduler
from raygrad.cluster.pool import WorkerPool
from raygrad.cluster.runtime import RemoteWorker
from raygrad.config import RunConfig
from raygrad.dataset.shards import Shard
from raygrad.errors import RaygradError
from raygrad.store.partial import ShardResult


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
    first_run = 0.2 + 0.01  # loaded (`placed` answered meanwhile), asked `placed` again before the first shard
    if per_worker == 2:
        assert world.clock.now == pytest.approx(first_run + 20 + 0.01, abs=1e-6)  # the last one: a question
        assert clocks["worker_idle_fraction"] < 0.002
        # each actor: asked where it is when it starts and before its first shard; one of them before the last
        assert sum(method == "placed" for actor in world.made for _, method in actor.calls) == 5
    else:
        assert world.clock.now == pytest.approx(0.2 + 20 * 1.01, abs=1e-6)
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


SLOW_FIRST_READ = {0: 0.5}  # shard 0's rows take 0.5 s to read, the others' none: the call sent second reads first


def test_a_death_is_charged_to_the_shard_computing_though_the_one_sent_before_it_read_slower(monkeypatch):
    """One worker is sent shards 0 and 1 together; shard 1 reads its rows first, and kills its process
    halfway through computing, twice. The actor computes in the order sent (shard 0, then 1), so the
    deaths are shard 1's: two losses, none for shard 0 (nor for shard 2, sent behind shard 1 and read
    when it died), and every shard comes back once. Computed in the order the rows were read (a bare
    lock), shard 1 ran first and each death was charged to shard 0."""
    world = World(monkeypatch, [dict(name="only")], fates={1: ["kill", "kill"]}, read_seconds=SLOW_FIRST_READ)
    _, results = run_pool(world, 4, workers=1)
    assert sorted(result.shard for result in results) == list(range(4))
    assert len(world.lost_lines(1)) == 2 and not world.lost_lines(0) and not world.lost_lines(2), world.said
    assert world.made[0].computed[:2] == [0, 1]  # process 0: in the order sent


def test_the_shard_named_at_three_losses_is_the_one_that_killed_its_workers(monkeypatch):
    """Shard 1 kills every process that computes it, and is sent each time behind shard 0, which reads
    slower: the run stops on shard 1's third loss, naming shard 1 (it named shard 0)."""
    world = World(monkeypatch, [dict(name="only", max_restarts=2)], fates={1: ["kill"] * 9},
                  read_seconds=SLOW_FIRST_READ)
    with pytest.raises(RaygradError, match=r"^shard 1 \(1 texts"):
        run_pool(world, 4, workers=1)
    assert not world.lost_lines(0), world.said


def test_a_result_that_arrives_after_the_next_ones_does_not_stall_the_worker(monkeypatch):
    """Shard 0's result reaches the driver 1.5 s after it is computed (a large one pulled from another
    node), after shard 1's, computed next: the shard sent then computes after shard 1, the last one
    sent. Sent after shard 0, the last one unanswered, it waited for ever on a real cluster (the
    actor had computed shard 1 since)."""
    world = World(monkeypatch, [dict(name="only")], deliver_seconds={0: 1.5})
    _, results = run_pool(world, 6, workers=1)
    assert [result.shard for result in results][:2] == [1, 0]
    assert sorted(result.shard for result in results) == list(range(6))
    assert world.made[0].computed == list(range(6))


# --- the real actor, its calls on threads as Ray's max_concurrency=2 runs them


class Runner:
    """A ShardRunner stand-in: reading a shard's rows takes `read_seconds[shard]`, computing records the
    order and takes 0.05 s; shard -1's rows cannot be read."""

    def __init__(self, read_seconds: dict):
        self.read_seconds, self.computed = read_seconds, []

    def prepare(self, shard, source, ref):
        if shard == -1:
            raise RaygradError("shard -1: the dataset changed")
        time.sleep(self.read_seconds.get(shard, 0.0))
        return shard

    def compute(self, prepared):
        self.computed.append(prepared)
        time.sleep(0.05)  # long enough for a call out of turn to start computing beside it
        return ShardResult(prepared, ShardList([prepared]), 0.05, 0.0)


def calls_on_threads(worker: RemoteWorker, calls: list[tuple], gap: float = 0.0) -> dict:
    """Each call (shard, ticket, after) -> what `worker.run` returned or raised, each on a thread of its
    own, started in the order given, `gap` seconds apart (daemon threads: a call left waiting cannot
    hold up the test process)."""
    answers = {}

    def call(shard, ticket, after):
        try:
            answer = worker.run(shard, None, None, ticket, after)  # no SendOrder: sent at once
            answers[shard] = answer if answer is None else f"result {sorted(answer.shards)[0]}"
        except BaseException as err:
            answers[shard] = err

    threads = [threading.Thread(target=call, args=item, daemon=True) for item in calls]
    for thread in threads:
        thread.start()
        time.sleep(gap)
    for thread in threads:
        thread.join(timeout=10)
    return answers


@pytest.mark.parametrize("arrival", ["in the order sent", "the second first"])
def test_an_actor_computes_two_calls_in_the_order_sent(arrival):
    """Shard 0 is sent first and reads for 0.3 s, shard 1 second (behind it) and reads at once: shard 0
    computes first, whichever call Ray's threads start first. With the bare lock before, shard 1 did."""
    worker = RemoteWorker(plan=None, seed=0)
    worker.runner = runner = Runner({0: 0.3})
    calls = [(0, 10, None), (1, 11, 10)]
    answers = calls_on_threads(worker, calls if arrival == "in the order sent" else calls[::-1], gap=0.02)
    assert answers == {0: "result 0", 1: "result 1"}
    assert runner.computed == [0, 1]


def test_a_call_whose_rows_cannot_be_read_passes_its_turn():
    """Shard -1 fails reading its rows: its error is its answer, and shard 1, sent behind it, computes."""
    worker = RemoteWorker(plan=None, seed=0)
    worker.runner = runner = Runner({})
    answers = calls_on_threads(worker, [(1, 21, 20), (-1, 20, None)], gap=0.05)
    assert isinstance(answers[-1], RaygradError) and answers[1] == "result 1"
    assert runner.computed == [1]


def test_a_head_gives_up_the_calls_sent_before_it():
    """Shard 5 was sent behind a call that never arrived (lost with the connection); the driver, having
    dropped both, sends shard 6 with nothing before it: shard 6 computes, and shard 5 returns None
    without computing, rather than waiting for ever (or computing beside shard 6)."""
    worker = RemoteWorker(plan=None, seed=0)
    worker.runner = runner = Runner({})
    answers = calls_on_threads(worker, [(5, 31, 30), (6, 32, None)], gap=0.05)
    assert answers == {5: None, 6: "result 6"}
    assert runner.computed == [6]


def test_an_actor_loads_and_computes_on_one_thread_whichever_thread_takes_the_call(monkeypatch):
    """Ray runs an actor's calls on two threads; torch's OpenMP keeps a thread team per calling thread,
    and two teams on a small machine compute slower. The model loads, and every shard computes, on
    the actor's one compute thread, not on the threads the calls arrive on."""
    import raygrad.compute.worker as worker_module

    threads = {}

    class Recording(Runner):
        def __init__(self, plan, seed):
            super().__init__({})
            threads["load"] = threading.get_ident()

        def compute(self, prepared):
            threads.setdefault("compute", set()).add(threading.get_ident())
            return super().compute(prepared)

    monkeypatch.setattr(worker_module, "ShardRunner", Recording)
    worker = RemoteWorker(plan=SimpleNamespace(dataset_revision=None), seed=0)
    callers = set()
    real_run = worker.run

    def run_and_note(*args, **kwargs):
        callers.add(threading.get_ident())
        return real_run(*args, **kwargs)

    worker.run = run_and_note
    answers = calls_on_threads(worker, [(0, 40, None), (1, 41, 40), (2, 42, 41)], gap=0.02)
    assert answers == {0: "result 0", 1: "result 1", 2: "result 2"}
    assert len(callers) == 3 and threads["compute"] == {threads["load"]} and threads["load"] not in callers
