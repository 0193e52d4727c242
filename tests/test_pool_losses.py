"""Which shard a lost worker is charged to, and a pool that never sleeps past a result: WorkerPool's
scheduling loop against a simulated Ray (fake actors on a fake clock) that fails calls as Ray 2.x
does, as measured on a local Ray: a call sent while Ray restarts an actor, or in flight when its
process dies with restarts left, fails with ActorUnavailableError; with none left, ActorDiedError.
Then --gpus-per-worker on an in-process run, through the command line."""

import bisect
import math
from types import SimpleNamespace

import pytest
import ray
from helpers import run_cli, tiny_args, tree_digest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from raygrad import pool as pool_module
from raygrad import scheduler
from raygrad.config import RunConfig
from raygrad.errors import RaygradError
from raygrad.pool import RESTART_POLL_SECONDS, WorkerPool
from raygrad.shards import Shard

REPLY_SECONDS = 0.001  # a call to an actor that is not up fails this fast
PLACED_SECONDS = 0.01
UNREACHABLE_SECONDS = 0.3  # how long a "blip" keeps an actor out of reach


class Clock:
    """The pool's `time`: monotonic() and sleep() on simulated seconds."""

    def __init__(self):
        self.now, self.slept = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Ref:
    def __init__(self, at: float, value=None, error: BaseException | None = None):
        self.at, self.value, self.error = at, value, error


class Method:
    def __init__(self, actor: "FakeActor", name: str):
        self.actor, self.name = actor, name

    def remote(self, *args) -> Ref:
        return self.actor.call(self.name, *args)


class FakeActor:
    """A Ray actor: process k is up from `restart_seconds` after process k-1 died (process 0 from
    the start) until the k-th of `deaths` (times), which a shard that kills its worker adds to.
    A call runs on the process up when it is sent, after that process's earlier calls; during a
    blip (from, to) the actor is out of reach but its process runs on."""

    def __init__(self, world: "World", name: str, deaths=(), restart_seconds=0.5, max_restarts=2,
                 load_seconds=0.2, blips=()):
        self.world, self.name = world, name
        self._actor_id = SimpleNamespace(hex=lambda: name)
        self.deaths, self.restart_seconds, self.max_restarts = sorted(deaths), restart_seconds, max_restarts
        self.load_seconds, self.blips = load_seconds, list(blips)
        self.free_at: dict[int, float] = {}  # process -> when its calls sent so far are done
        self.calls: list[tuple[float, str]] = []
        self.placed, self.ready, self.run = (Method(self, name) for name in ("placed", "ready", "run"))

    def process_at(self, t: float) -> int | str:
        """-> the process up at t, "restarting" or "dead"."""
        k = bisect.bisect_right(self.deaths, t)
        if k > self.max_restarts:
            return "dead"
        if k and t < self.deaths[k - 1] + self.restart_seconds:
            return "restarting"
        return k

    def failure(self, k: int, why: str) -> BaseException:
        return ActorDiedError() if k >= self.max_restarts else ActorUnavailableError(why, None)

    def call(self, method: str, *args) -> Ref:
        now = self.world.clock.now
        self.calls.append((now, method))
        if any(start <= now < end for start, end in self.blips):
            return Ref(now + REPLY_SECONDS, error=ActorUnavailableError("RpcError: Socket closed", None))
        k = self.process_at(now)
        if k == "dead":
            return Ref(now + REPLY_SECONDS, error=ActorDiedError())
        if k == "restarting":
            return Ref(now + REPLY_SECONDS, error=ActorUnavailableError("The actor is restarting.", None))
        start = max(now, self.free_at.get(k, now))
        dies = self.deaths[k] if k < len(self.deaths) else math.inf
        if method == "run":
            shard = args[0]
            seconds = self.world.run_seconds.get(shard, 1.0)
            fates = self.world.fates.get(shard)
            if start < dies and fates:  # halfway through, the process dies or the actor is out of reach
                fate, halfway = fates.pop(0), start + seconds / 2
                if fate == "kill":
                    dies = halfway
                    bisect.insort(self.deaths, dies)
                else:
                    self.blips.append((halfway, halfway + UNREACHABLE_SECONDS))
            value = SimpleNamespace(shard=shard, ready_at=start + seconds)
        elif method == "ready":
            seconds, value = self.load_seconds, {"device": "cpu", "load_seconds": self.load_seconds}
        else:
            seconds, value = PLACED_SECONDS, (f"node-{self.name}", f"{self.name}/process-{k}")
        end = start + seconds
        if dies <= end:  # the process dies before answering, and so do the calls queued behind it
            self.free_at[k] = dies
            return Ref(dies, error=self.failure(k, "RpcError: Socket closed"))
        self.free_at[k] = end
        for blip_start, _ in self.blips:
            if now <= blip_start < end:  # out of reach before it answers; the process runs on
                return Ref(blip_start, error=ActorUnavailableError("RpcError: Socket closed", None))
        return Ref(end, value=value)


class World:
    """Ray as the pool sees it: wait, get and kill, and actors made from `actors` (keyword arguments
    of FakeActor, in the order the pool asks for them; healthy ones after those)."""

    def __init__(self, monkeypatch, actors: list[dict], fates: dict | None = None, run_seconds: dict | None = None):
        self.clock, self.specs, self.made, self.killed, self.said = Clock(), list(actors), [], [], []
        # shard -> what happens halfway through its next runs: "kill" (its process dies) or "unreachable"
        self.fates = {shard: list(fate) for shard, fate in (fates or {}).items()}
        self.run_seconds = dict(run_seconds or {})  # shard -> seconds (default 1)
        monkeypatch.setattr(pool_module, "time", self.clock)
        monkeypatch.setattr(scheduler, "time", self.clock)
        monkeypatch.setattr(ray, "wait", self.wait)
        monkeypatch.setattr(ray, "get", self.get)
        monkeypatch.setattr(ray, "kill", self.killed.append)
        monkeypatch.setattr(WorkerPool, "_new_actor", lambda pool: self.new_actor())

    def new_actor(self) -> FakeActor:
        spec = self.specs.pop(0) if self.specs else {}
        actor = FakeActor(self, spec.pop("name", f"actor{len(self.made)}"), **spec)
        self.made.append(actor)
        return actor

    def wait(self, refs, num_returns=1, timeout=None):
        assert refs and num_returns == 1 and timeout is not None and timeout >= 0
        first = min(refs, key=lambda ref: ref.at)
        if first.at > self.clock.now + timeout:
            self.clock.now += timeout
            return [], refs
        self.clock.now = max(self.clock.now, first.at)
        return [first], [ref for ref in refs if ref is not first]

    def get(self, ref: Ref):
        assert ref.at <= self.clock.now, "ray.get on a result that is not there yet would block"
        if ref.error is not None:
            raise ref.error
        return ref.value

    def run_shards(self, shards: int, workers: int) -> list[tuple[int, float]]:
        """-> (shard, seconds between its result being there and the pool yielding it), in order."""
        pool = WorkerPool(RunConfig(workers=workers), echo=self.said.append)
        pool.workers = workers
        pool.start_workers(SimpleNamespace(sae_layers_per_pass=None, layers=[]), seed=0)
        return [(result.shard, self.clock.now - result.ready_at)
                for result in pool.map([(shard, None, Shard(shard, shard + 1, 1, 6, "")) for shard in range(shards)])]

    def lost_lines(self, shard: int) -> list[str]:
        return [line for line in self.said if line.startswith(f"worker lost during shard {shard} ")]


# Shard 1 kills the worker that computes it, halfway through, the first two times: two losses of three.
KILLED_TWICE = {1: ["kill", "kill"]}
LONG_SHARD_1 = {0: 0.5, 1: 4.0}  # actor "idle" finishes shard 0 and waits while shard 1 runs on "busy"


def test_an_actor_that_is_only_restarting_is_not_a_loss(monkeypatch):
    """The idle actor's process dies at t=1 and Ray takes 5 s to restart it: the shard the pool gives
    it next fails with ActorUnavailableError without running. Not a loss: with shard 1's two real
    kills the run ends, rather than stopping at 3 losses."""
    actors = [dict(name="idle", load_seconds=0.1, deaths=[1.0], restart_seconds=5.0),
              dict(name="busy", load_seconds=0.3)]
    world = World(monkeypatch, actors, fates=KILLED_TWICE, run_seconds=LONG_SHARD_1)
    assert sorted(shard for shard, _ in world.run_shards(2, workers=2)) == [0, 1]
    assert len(world.lost_lines(1)) == 2, world.said


def test_an_actor_out_of_reach_that_answers_again_is_not_a_loss(monkeypatch):
    """Shard 1 kills its worker twice, then its third run is out of reach for 0.3 s halfway
    (ActorUnavailableError) while the same process computes on: two losses, and the run ends."""
    world = World(monkeypatch, [dict(name="only")], fates={1: ["kill", "kill", "unreachable"]})
    assert sorted(shard for shard, _ in world.run_shards(2, workers=1)) == [0, 1]
    assert len(world.lost_lines(1)) == 3, world.said  # each time the shard went back to the queue
    assert not world.killed


def test_an_idle_actor_that_died_is_not_charged_to_the_next_shard(monkeypatch):
    """The idle actor's process dies at t=1 and Ray will not restart it (no restarts left): the next
    call to it fails with ActorDiedError. The shard the pool gives it next never ran on it, so its
    only losses are shard 1's two real kills; the dead actor is replaced and the run ends."""
    actors = [dict(name="idle", load_seconds=0.1, deaths=[1.0], max_restarts=0), dict(name="busy", load_seconds=0.3)]
    world = World(monkeypatch, actors, fates=KILLED_TWICE, run_seconds=LONG_SHARD_1)
    assert sorted(shard for shard, _ in world.run_shards(2, workers=2)) == [0, 1]
    assert len(world.lost_lines(1)) == 2, world.said
    assert world.killed == [world.made[0]]  # replaced


def test_results_are_taken_while_an_actor_restarts(monkeypatch):
    """One actor restarts for 4 s from the start while the other computes shards of 0.3 s: every result
    is taken the moment it is there (no sleep between questions to the restarting actor), and that
    actor is asked again about once a second until it is back, then computes too."""
    actors = [dict(name="restarting", deaths=[0.0], restart_seconds=4.0), dict(name="up")]
    world = World(monkeypatch, actors, run_seconds={shard: 0.3 for shard in range(30)})
    taken = world.run_shards(30, workers=2)
    assert sorted(shard for shard, _ in taken) == list(range(30))
    assert all(late == 0 for _, late in taken), taken
    assert not world.clock.slept
    asked = [at for at, method in world.made[0].calls if method == "placed" and at < 4.0]
    assert len(asked) <= 4.0 / RESTART_POLL_SECONDS + 1, asked  # asked again after a pause, not in a spin
    assert any(method == "run" for _, method in world.made[0].calls)  # back, and given shards


def test_a_shard_that_kills_every_worker_still_stops_at_three_losses(monkeypatch):
    """Ray says ActorUnavailableError for the first two deaths (restarts left), ActorDiedError for the
    third: each is a process that started the shard, so the third stops the run."""
    world = World(monkeypatch, [dict(name="only", max_restarts=2)], fates={0: ["kill"] * 9})
    with pytest.raises(RaygradError, match=r"^shard 0 \(1 texts, rows 0-0, about 6 target tokens\) lost its worker 3"):
        world.run_shards(2, workers=1)
    assert len(world.lost_lines(0)) == 2 and not world.killed


def test_gpus_per_worker_with_workers_0_is_one_line(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    before = tree_digest(tmp_path)
    code, out, err = run_cli(tiny_args(tiny_llama, texts_file, out_dir, "--gpus-per-worker", "1"), capsys, monkeypatch)
    assert code == 2 and err.strip().splitlines() == [
        "error: --gpus-per-worker 1: --workers 0 runs in this process without Ray workers, so it would have no "
        "effect; give --workers N to run Ray workers, or drop --gpus-per-worker"], (code, out, err)
    assert not out_dir.exists() and tree_digest(tmp_path) == before


def test_gpus_per_worker_on_a_default_in_process_run_is_one_warning(tiny_llama, texts_file, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setattr(pool_module, "local_gpus", lambda: 1)  # one device here, whatever this machine has
    args = [arg for arg in tiny_args(tiny_llama, texts_file, tmp_path / "out", "--gpus-per-worker", "2")]
    at = args.index("--workers")
    del args[at:at + 2]  # the default: in-process here
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    warning = ("--gpus-per-worker 2: no effect on an in-process run (one device here and no --address); "
               "use --workers N to run Ray workers")
    assert out.splitlines().count(warning) == 1, out
    assert warning not in err


def test_a_ray_run_resumed_in_process_drops_its_ray_options(tiny_llama, texts_file, tmp_path):
    """A run saved with --gpus-per-worker 1 and an --address, resumed with --workers 0: those options
    describe the Ray workers it no longer has, so the resume drops them rather than refusing the run
    (an explicit --gpus-per-worker with --workers 0 is still refused)."""
    from helpers import assert_same_totals, build_config, killed_run, run_tiny

    from raygrad import constants as names
    from raygrad import engine
    from raygrad.store import ResultStore

    _, expected = run_tiny(tiny_llama, texts_file, tmp_path / "full", shard_size=2)
    config = build_config(tiny_llama, texts_file, tmp_path / "killed", shard_size=2, checkpoint_seconds=0,
                          workers=None, gpus_per_worker=1)  # ran in this process: one device, no --address
    run_dir = killed_run(config, dies_at_call=2)
    with pytest.raises(RaygradError, match=r"^--gpus-per-worker 1: --workers 0 runs in this process"):
        engine.resume(run_dir, echo=lambda _: None, progress=False, execution={"workers": 0, "gpus_per_worker": 1})
    engine.resume(run_dir, echo=lambda _: None, progress=False, execution={"workers": 0})
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    assert_same_totals(resumed, expected)
