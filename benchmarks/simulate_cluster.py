"""A GPU cluster's load on the head, simulated: 8, 64 and 256 workers.

Real: the scheduler (`WorkerPool._elastic_map`: two shards in flight per worker, `placed` questions,
loss bookkeeping), the reducer (`Reducer.add`: float64 addition of full-size partials, done flags,
snapshots) and its checkpoint writer thread writing a real `ResultStore` (redo log, Zarr arrays,
fsync) in a temporary directory on this machine's disk, all in this one process as in a run.

Simulated: Ray and the workers. Each worker is a fake actor (as in tests/test_pool_losses.py, on
the real clock) that computes its calls one after another; a shard takes the time the H200 figures
imply (docs/benchmarks.md: Gemma-2-2B with 26 x 65,536 SAEs, 14.7k tokens/s per GPU; a shard of 1M target
tokens is 68 s, +-5% at random) and answers one shared Partial of 26 x 65,536 for the chosen
kinds (gradients: 3 sums, 41 MB; --kinds all: gradients, values, attribution, hessian, 164 MB).
No bytes cross a network or Ray's object store: those costs are not in these figures.

Time is scaled: shards and the checkpoint interval (30 s) run `scale` times faster than on the
cluster, so the head takes `scale` times as many partials a second as it would there, while each
partial costs it the real time. The idle fraction measured is thus an upper bound for the cluster's;
rates are printed unscaled (divided by `scale`). The scale is chosen per worker count so the head
takes about --partials-per-second real partials a second (it is printed).

Printed per worker count: the workers' idle fraction while shards waited (from the workers' side:
time not computing between their first shard and the last shard sent), the pool's own record of it
(idle including the start and the tail), partials/s and head bytes/s (unscaled), the head's CPU per
partial, and the checkpoint lag (a result's wait until a checkpoint holds it on disk; unscaled: the
wait for the next checkpoint scaled back, the write itself as measured).

    python benchmarks/simulate_cluster.py [--workers 8 64 256] [--kinds gradients|all] [--per-worker 2]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from raygrad.cluster import scheduler
from raygrad.cluster.pool import WorkerPool
from raygrad.config import RunConfig
from raygrad.store.partial import Partial, ShardResult, array_widths
from raygrad.store.reducer import CHECKPOINT_SECONDS, Reducer
from raygrad.store.zarr_store import ResultStore

LAYERS, FEATURES = 26, 65536
TOKENS_PER_SECOND = 14_700  # one H200, Gemma-2-2B with 26 x 65,536 SAEs (docs/benchmarks.md)
SHARD_TOKENS = 1_000_000  # target tokens per shard (the default token budget on a GPU)
LOAD_SECONDS = 60.0  # model + SAEs loading on a worker, as reported
READY_SECONDS = 0.5  # how long a simulated worker takes to load (real seconds: only the start)
RPC_SECONDS = 0.001  # a `placed` question's round trip (not scaled: a real one costs this)
KINDS = {"gradients": {"grad": FEATURES},
         "all": {"grad": FEATURES, "value": FEATURES, "attr": FEATURES, "hess": FEATURES}}


class Ref:
    def __init__(self, at: float, value):
        self.at, self.value = at, value


class Method:
    def __init__(self, actor: "SimActor", name: str):
        self.actor, self.name = actor, name

    def remote(self, *args) -> Ref:
        return self.actor.call(self.name, *args)


class SimActor:
    """A worker that computes its calls one after another, on the real clock."""

    def __init__(self, sim: "SimRay", number: int):
        self.sim, self.number = sim, number
        self._actor_id = SimpleNamespace(hex=lambda: f"actor{number}")
        self.free_at = time.monotonic()
        self.busy: list[tuple[float, float]] = []  # (start, end) of each shard it computed
        self.sent: list[float] = []  # when each shard was sent to it
        self.placed, self.ready, self.run = (Method(self, name) for name in ("placed", "ready", "run"))

    def call(self, method: str, *args) -> Ref:
        start = max(time.monotonic(), self.free_at)
        if method == "run":
            seconds = self.sim.shard_seconds * self.sim.rng.uniform(0.95, 1.05)
            value = ShardResult(args[0], self.sim.partial, seconds * self.sim.scale, LOAD_SECONDS)
            self.busy.append((start, start + seconds))
            self.sent.append(time.monotonic())
        elif method == "ready":
            seconds = READY_SECONDS * self.sim.rng.uniform(0.9, 1.1)
            value = {"device": "cuda", "load_seconds": LOAD_SECONDS}
        else:
            seconds, value = RPC_SECONDS, (f"node-{self.number}", f"actor{self.number}/process-0")
        self.free_at = start + seconds
        return Ref(self.free_at, value)


class SimRay:
    """ray.wait / ray.get / ray.kill over SimActors (patched onto the ray module for one run)."""

    def __init__(self, shard_seconds: float, scale: float, partial: Partial, seed: int = 0):
        self.shard_seconds, self.scale, self.partial = shard_seconds, scale, partial
        self.rng = random.Random(seed)
        self.actors: list[SimActor] = []

    def new_actor(self) -> SimActor:
        actor = SimActor(self, len(self.actors))
        self.actors.append(actor)
        return actor

    def wait(self, refs, num_returns=1, timeout=None):
        first = min(refs, key=lambda ref: ref.at)
        delay = first.at - time.monotonic()
        if timeout is not None and delay > timeout:
            time.sleep(timeout)
            return [], refs
        if delay > 0:
            time.sleep(delay)
        return [first], [ref for ref in refs if ref is not first]

    @staticmethod
    def get(ref: Ref):
        return ref.value


def simulate(workers: int, kinds: str, per_worker: int, partials_per_second: float, shards_per_worker: int,
             store_dir: Path) -> dict:
    import ray

    shard_seconds = SHARD_TOKENS / TOKENS_PER_SECOND  # on the cluster
    scale = max(1.0, partials_per_second * shard_seconds / workers)
    widths = array_widths(KINDS[kinds])
    partial = Partial({name: np.full((LAYERS, width), 1e-3) for name, width in widths.items()},
                      np.full(LAYERS, SHARD_TOKENS, dtype=np.int64), loss_sum=2.5 * SHARD_TOKENS,
                      loss_tokens=SHARD_TOKENS)
    shards = workers * shards_per_worker
    sim = SimRay(shard_seconds / scale, scale, partial)
    saved = {name: getattr(ray, name) for name in ("wait", "get", "kill")}
    saved_new_actor, saved_per_worker = WorkerPool._new_actor, scheduler.PER_WORKER
    ray.wait, ray.get, ray.kill = sim.wait, sim.get, lambda actor: None
    WorkerPool._new_actor = lambda pool: sim.new_actor()
    scheduler.PER_WORKER = per_worker
    path = store_dir / f"w{workers}.zarr"
    try:
        store = ResultStore.create(path, KINDS[kinds], shards, list(range(LAYERS)), {})
        reducer = Reducer(store, checkpoint_seconds=CHECKPOINT_SECONDS / scale, progress=False)
        pool = WorkerPool(RunConfig(workers=workers), echo=print)
        pool.workers = workers
        pool.start_workers(SimpleNamespace(sae_layers_per_pass=None, layers=[]), seed=0)
        cpu_started = time.thread_time()
        started = time.monotonic()
        try:
            for result in pool.map([(shard, []) for shard in range(shards)]):
                reducer.add(result)
        finally:
            reducer.close()
        ended = time.monotonic()
        head_cpu = time.thread_time() - cpu_started
    finally:
        ray.wait, ray.get, ray.kill = saved["wait"], saved["get"], saved["kill"]
        WorkerPool._new_actor, scheduler.PER_WORKER = saved_new_actor, saved_per_worker
        shutil.rmtree(path, ignore_errors=True)
    assert reducer.complete
    timing = reducer.timing(0.0, pool.clocks.record())

    # The workers' side while shards waited: from the moment every worker had started its first
    # shard until fewer shards were left to send than there are workers (the tail), each worker's
    # time not computing.
    first = max(actor.busy[0][0] for actor in sim.actors)
    last = sorted(at for actor in sim.actors for at in actor.sent)[shards - workers]
    idle = computing = 0.0
    for actor in sim.actors:
        busy = sum(max(0.0, min(end, last) - max(start, first)) for start, end in actor.busy)
        computing += busy
        idle += (last - first) - busy
    wall = ended - started
    write = timing["checkpoint_write_seconds"] / max(timing["checkpoints"], 1)
    lag = timing["checkpoint_lag_seconds"]
    writing = lag["mean_writing"]  # real seconds, not scaled: the writes are full size
    return {
        "workers": workers, "kinds": kinds, "per_worker": per_worker, "scale": scale, "shards": shards,
        "partial_mb": timing["bytes_received"] / timing["partials_received"] / 1e6,
        "idle_while_waiting": idle / (idle + computing),
        "idle_pool_record": timing["worker_idle_fraction"],
        "partials_per_second": timing["partials_received"] / wall / scale,
        "head_bytes_per_second": timing["bytes_received"] / wall / scale,
        "head_cpu_per_partial": timing["reduce_seconds"] / timing["partials_received"],
        "head_thread_cpu": head_cpu / (wall * scale),  # share of one core on the cluster (scaled back)
        "checkpoints": timing["checkpoints"], "checkpoint_write_seconds": write,
        # the wait for the next checkpoint scaled back, the writing as measured
        "lag_mean": (lag["mean"] - writing) * scale + writing, "lag_max": (lag["max"] - writing) * scale + writing,
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--kinds", choices=sorted(KINDS), default="gradients")
    parser.add_argument("--per-worker", type=int, default=scheduler.PER_WORKER,
                        help="shards in flight per worker (the scheduler's PER_WORKER)")
    parser.add_argument("--partials-per-second", type=float, default=8.0,
                        help="real partials a second the head is given (sets the time scale)")
    parser.add_argument("--shards-per-worker", type=int, default=4)
    parser.add_argument("--store-dir", type=Path, default=None, help="where the temporary store goes (a disk)")
    args = parser.parse_args()

    print(f"shard: {SHARD_TOKENS:,} target tokens at {TOKENS_PER_SECOND:,} tokens/s = "
          f"{SHARD_TOKENS / TOKENS_PER_SECOND:.1f} s on an H200; {LAYERS} x {FEATURES:,}, kinds {args.kinds}; "
          f"{args.per_worker} in flight per worker; checkpoints every {CHECKPOINT_SECONDS:g} s (unscaled)")
    header = (f"{'workers':>7} {'scale':>6} {'shards':>6} {'MB/partial':>10} {'idle':>6} {'idle(pool)':>10} "
              f"{'partials/s':>10} {'head MB/s':>9} {'ms/partial':>10} {'ckpt s':>6} {'lag mean':>8} "
              f"{'lag max':>7} {'wall s':>6}")
    print(header)
    with tempfile.TemporaryDirectory(dir=args.store_dir) as store_dir:
        for workers in args.workers:
            row = simulate(workers, args.kinds, args.per_worker, args.partials_per_second,
                           args.shards_per_worker, Path(store_dir))
            print(f"{row['workers']:>7} {row['scale']:>5.1f}x {row['shards']:>6} {row['partial_mb']:>10.1f} "
                  f"{row['idle_while_waiting']:>6.2%} {row['idle_pool_record']:>10.2%} "
                  f"{row['partials_per_second']:>10.2f} {row['head_bytes_per_second'] / 1e6:>9.1f} "
                  f"{row['head_cpu_per_partial'] * 1e3:>10.1f} {row['checkpoint_write_seconds']:>6.2f} "
                  f"{row['lag_mean']:>7.1f}s {row['lag_max']:>6.1f}s {row['wall_seconds']:>6.0f}", flush=True)
    print("idle: workers not computing while shards waited (from their side); idle(pool): the pool's record "
          "(start and tail included); rates unscaled; ms/partial: the head's time in Reducer.add; ckpt s: one "
          "checkpoint write (real); lag: a result's wait until on disk (unscaled)")


if __name__ == "__main__":
    main()
