"""Which shard a lost worker is charged to, and a pool that never sleeps past a result: WorkerPool's
scheduling loop against a simulated Ray (fake actors on a fake clock, two calls at a time each, as
max_concurrency=2 gives) that fails calls as Ray 2.x does, as measured on a local Ray: a call sent
while Ray restarts an actor, or in flight when its process dies with restarts left, fails with
ActorUnavailableError; with none left, ActorDiedError. Then --gpus-per-worker on an in-process run,
through the command line."""

import bisect
import math
from collections import deque
from types import SimpleNamespace

import pytest
import ray
from helpers import run_cli, tiny_args, tree_digest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from raygrad.cluster import pool as pool_module
from raygrad.cluster import scheduler
from raygrad.cluster.pool import RESTART_POLL_SECONDS, WorkerPool
from raygrad.compute.folding import ShardFold
from raygrad.config import RunConfig
from raygrad.dataset.shards import Shard
from raygrad.errors import RaygradError
from raygrad.store.partial import ShardResult

REPLY_SECONDS = 0.001  # a call to an actor that is not up fails this fast
PLACED_SECONDS = 0.01
UNREACHABLE_SECONDS = 0.3  # how long a "blip" keeps an actor out of reach
THREADS = 2  # calls an actor runs at once (the pool's max_concurrency)
STUCK_SECONDS = 3600.0  # no test's shards take this long: a pool still waiting then waits for ever


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
    """A call's answer, there from `at` (math.inf until the simulation has decided it)."""

    def __init__(self, at: float = math.inf, value=None, error: BaseException | None = None):
        self.at, self.value, self.error = at, value, error

    def settle(self, at: float, value=None, error: BaseException | None = None) -> None:
        if self.at == math.inf:  # the first answer stands: one lost to a blip stays lost
            self.at, self.value, self.error = at, value, error


class Method:
    def __init__(self, actor: "FakeActor", name: str):
        self.actor, self.name = actor, name

    def remote(self, *args) -> Ref:
        return self.actor.call(self.name, *args)


class Call:
    """A call on an actor's process: queued for a thread, then running. `run` reads its rows
    (World.read_seconds), waits for its turn, then computes (World.run_seconds)."""

    def __init__(self, method: str, args: tuple):
        self.method, self.args, self.ref = method, args, Ref()
        self.stage, self.until = "queued", math.inf  # until: when its stage ends
        if method == "run":
            self.shard, _, _, self.ticket, self.after, self.order = args
        elif method == "absorb":  # another worker's partial, folded in (RemoteWorker.absorb): a `run` of no shard
            self.shard, (self.sent,), self.ticket, self.after, self.order = None, *args


class ShardList(list):
    """A partial that is the list of shards folded into it (compute/folding.py folds by `add`)."""

    def add(self, other: "ShardList") -> None:
        self.extend(other)


class FakeActor:
    """A Ray actor: process k is up from `restart_seconds` after process k-1 died (process 0 from
    the start) until the k-th of `deaths` (times), which a shard that kills its worker adds to.
    A call runs on the process up when it is sent, on one of its THREADS once one is free (else in
    the order sent). A `run` reads its rows beside the other thread's call, then computes by
    ray_runtime.ComputeTurns' rule: one at a time, after the call it was sent behind (a call sent
    before the newest head returns None at once). During a blip (from, to) the actor is out of reach
    (the calls in flight fail) but its process runs on."""

    def __init__(self, world: "World", name: str, deaths=(), restart_seconds=0.5, max_restarts=2,
                 load_seconds=0.2, blips=()):
        self.world, self.name = world, name
        self._actor_id = SimpleNamespace(hex=lambda: name)
        self.deaths, self.restart_seconds, self.max_restarts = sorted(deaths), restart_seconds, max_restarts
        self.load_seconds, self.blips = load_seconds, list(blips)
        self.blip_starts = sorted(start for start, _ in self.blips)  # those not yet seen by calls in flight
        self.calls: list[tuple[float, str]] = []
        self.computed: list[int] = []  # shards, in the order they started computing
        self.absorbed: list[list[int]] = []  # the shards of each partial it absorbed from another worker
        self.process: int | None = None  # the process the calls below run on
        self.threads: list[Call] = []
        self.queued: deque[Call] = deque()
        self.newest_head, self.passed, self.computing = -1, None, None  # ComputeTurns' state
        self.placed, self.ready, self.run, self.absorb = (Method(self, name) for name in
                                                          ("placed", "ready", "run", "absorb"))

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
        self.world.advance(now)  # what happened before this call has happened
        self.calls.append((now, method))
        self.blip_starts = [start for start in self.blip_starts if start >= now]
        if any(start <= now < end for start, end in self.blips):
            return Ref(now + REPLY_SECONDS, error=ActorUnavailableError("RpcError: Socket closed", None))
        k = self.process_at(now)
        if k == "dead":
            return Ref(now + REPLY_SECONDS, error=ActorDiedError())
        if k == "restarting":
            return Ref(now + REPLY_SECONDS, error=ActorUnavailableError("The actor is restarting.", None))
        if k != self.process:  # a new process: nothing of the last one's runs on it, nothing folded
            self.process, self.newest_head, self.passed, self.computing = k, -1, None, None
            self.fold = ShardFold()
        call = Call(method, args)
        self.queued.append(call)
        self._move(now)
        return call.ref

    # --- the simulation: World.advance steps every actor through its events in time order

    def _death(self) -> float:
        return self.deaths[self.process] if self.process is not None and self.process < len(self.deaths) else math.inf

    def next_event(self) -> float:
        if not self.threads and not self.queued:
            return math.inf
        return min([self._death(), *(call.until for call in self.threads), *self.blip_starts[:1]])

    def step(self, t: float) -> None:
        """Everything due at t: a death first (a call ending as its process dies is lost), then the
        stages that end, then a blip (a call answering as the blip starts is answered)."""
        if (self.threads or self.queued) and self._death() <= t:
            k = self.process
            for call in [*self.threads, *self.queued]:  # the calls in flight, and those queued behind them
                call.ref.settle(self._death(), error=self.failure(k, "RpcError: Socket closed"))
            self.threads, self.queued, self.process = [], deque(), None
            return
        while due := [call for call in self.threads if call.until <= t]:
            self._end_stage(min(due, key=lambda call: call.until), t)
        while self.blip_starts and self.blip_starts[0] <= t:
            start = self.blip_starts.pop(0)
            for call in [*self.threads, *self.queued]:  # out of reach before it answers; the process runs on
                call.ref.settle(start, error=ActorUnavailableError("RpcError: Socket closed", None))

    def _end_stage(self, call: Call, t: float) -> None:
        call.until = math.inf
        if call.stage == "reading":
            call.stage = "waiting"
        elif call.stage == "computing":
            self.computing, self.passed = None, call.ticket
            there = t + self.world.deliver_seconds.get(call.shard, 0.0)
            if call.method == "absorb":  # RemoteWorker.absorb: the other's partial if it is there by now
                sent = call.sent
                if sent.at > t or sent.error is not None or sent.value is None:
                    self._leave(call, t, (False, "lost"))
                else:
                    self.fold.absorb(sent.value, call.order)
                    self.absorbed.append(sorted(sent.value.shards))
                    self._leave(call, t, (True, ""))
                self._move(t)
                return
            computed = None if call.shard is None else ShardResult(call.shard, ShardList([call.shard]), 1.0, 0.0)
            answer = self.fold.take(computed, call.order)  # the worker's own folding (RemoteWorker.run)
            answer.ready_at = there
            self._leave(call, there, answer)
        elif call.method == "ready":
            self._leave(call, t, {"device": "cpu", "load_seconds": self.load_seconds})
        else:
            self._leave(call, t, (f"node-{self.name}", f"{self.name}/process-{self.process}"))
        self._move(t)

    def _leave(self, call: Call, t: float, value) -> None:
        call.ref.settle(t, value=value)
        self.threads.remove(call)

    def _move(self, t: float) -> None:
        """Start queued calls on free threads, and a waiting `run` computing by ComputeTurns' rule."""
        while True:
            while self.queued and len(self.threads) < THREADS:
                call = self.queued.popleft()
                self.threads.append(call)
                call.stage = "reading" if call.method in ("run", "absorb") else "answering"
                call.until = t + (self.world.read_seconds.get(call.shard, 0.0) if call.method == "run" else
                                  self.load_seconds if call.method == "ready" else PLACED_SECONDS)
            waiting = [call for call in self.threads if call.stage == "waiting"]
            self.newest_head = max([self.newest_head, *(call.ticket for call in waiting if call.after is None)])
            given_up = [call for call in waiting if call.ticket < self.newest_head]
            for call in given_up:
                self._leave(call, t, None)
            if given_up:
                continue  # threads freed
            turn = [call for call in waiting if call.after is None or call.after == self.passed]
            if self.computing is None and turn:
                self._compute(min(turn, key=lambda call: call.ticket), t)
            return

    def _compute(self, call: Call, t: float) -> None:
        self.computing, call.stage = call, "computing"
        if call.shard is not None:
            self.computed.append(call.shard)
        seconds = (self.world.run_seconds.get(call.shard, 1.0) if call.shard is not None else
                   self.world.absorb_seconds if call.method == "absorb" else self.world.send_seconds)
        call.until = t + seconds
        fates = self.world.fates.get(call.shard if call.shard is not None else  # or "absorb", "send" (no shard)
                                     "absorb" if call.method == "absorb" else "send")
        if fates:  # halfway through, the process dies or the actor is out of reach
            fate, halfway = fates.pop(0), t + seconds / 2
            if fate == "kill":
                if halfway < self._death():
                    bisect.insort(self.deaths, halfway)
            else:
                self.blips.append((halfway, halfway + UNREACHABLE_SECONDS))
                bisect.insort(self.blip_starts, halfway)


class World:
    """Ray as the pool sees it: wait, get and kill, and actors made from `actors` (keyword arguments
    of FakeActor, in the order the pool asks for them; healthy ones after those)."""

    def __init__(self, monkeypatch, actors: list[dict], fates: dict | None = None, run_seconds: dict | None = None,
                 read_seconds: dict | None = None, deliver_seconds: dict | None = None, head_share: float = math.inf):
        self.clock, self.specs, self.made, self.killed, self.said = Clock(), list(actors), [], [], []
        # shard -> what happens halfway through its next computations: "kill" (its process dies) or "unreachable"
        self.fates = {shard: list(fate) for shard, fate in (fates or {}).items()}
        self.run_seconds = dict(run_seconds or {})  # shard -> seconds computing (default 1)
        self.read_seconds = dict(read_seconds or {})  # shard -> seconds reading its rows first (default 0)
        # shard -> seconds from its result being computed to the driver having it (default 0): a large one
        # pulled from another node may arrive after the next call's
        self.deliver_seconds = dict(deliver_seconds or {})
        self.absorb_seconds = 0.1  # a worker folding in another's partial
        self.send_seconds = 0.01  # a call that only sends what its worker folded
        # every call sends (no folding), unless a test gives the head's share (scheduler.HEAD_SHARE)
        monkeypatch.setattr(scheduler, "HEAD_SHARE", head_share)
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

    def advance(self, until: float) -> None:
        """Every actor's events up to `until`, in time order."""
        while (t := min((actor.next_event() for actor in self.made), default=math.inf)) <= until:
            for actor in self.made:
                if actor.next_event() <= t:
                    actor.step(t)

    def wait(self, refs, num_returns=1, timeout=None):
        assert refs and num_returns == 1 and timeout is not None and timeout >= 0
        assert self.clock.now < STUCK_SECONDS, "the pool waits on calls that never answer"
        deadline = self.clock.now + timeout
        while True:
            first = min(refs, key=lambda ref: ref.at)
            upcoming = min([first.at, *(actor.next_event() for actor in self.made)])
            if first.at <= upcoming:  # decided, and nothing can happen before it
                break
            if upcoming > deadline:
                break
            self.advance(upcoming)
        if first.at > deadline:
            self.advance(deadline)
            self.clock.now = deadline
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
    from raygrad.store.zarr_store import ResultStore

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
