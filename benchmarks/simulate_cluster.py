"""A GPU cluster's load on the head, simulated: 8, 64 and 256 workers.

Real: the scheduler (`WorkerPool._elastic_map`: two shards in flight per worker, `placed` questions,
loss bookkeeping), the reducer (`Reducer.add`: float64 addition of full-size partials, the exact
merge of --top-examples tables, done flags, snapshots) and its checkpoint writer thread writing a
real `ResultStore` (created with the same top_k and ranked prefixes as such a run: redo log, Zarr
arrays, fsync) in a temporary directory on this machine's disk, all in this one process as in a run.

Simulated: the workers and Ray's calls. Each worker is a fake actor (as in tests/test_pool_losses.py,
on the real clock) that computes only the calls the head has sent it, one after another; a shard
takes the time the H200 figures imply (docs/benchmarks.md: Gemma-2-2B with 26 x 65,536 SAEs, 14.7k
tokens/s per GPU; a shard of 1M target tokens is 68 s, +-5% at random) and answers a Partial of
26 x 65,536 for the chosen kinds (gradients: 3 sums, 41 MB; --kinds all: gradients, values,
attribution, hessian, 164 MB). With --top-examples K each partial also carries the (26, 65,536, K)
score/row/position tables of every ranked kind (gradients; with all, also attribution and values:
436 MB each at K = 16), sorted best first, random |scores| (a different window of one random table
per shard and kind, so merges do the work of independent shards), valid rows and positions.

Ray's transfer of a partial (the worker serializing it into the object store, the head getting it)
is charged to the head's loop as a sleep of size / rate in `ray.get`, the head then taking nothing
else: a conservative model (a real head pulls objects in Ray's threads beside its loop, but through
one network link). The rate is measured first on a real loopback Ray (one actor returns a Partial of
--calibrate-mb, the round trip of `ray.get` less that of an empty Partial, best of 3; printed); on
one machine the copy is memory to memory, so a cluster's network can only be slower.
--transfer-mb-per-s X skips the measurement and uses X. --head-seconds S adds S seconds of other head
work per partial (a sleep beside the transfer).

Time is scaled: shards, transfers, --head-seconds and the checkpoint interval (30 s) run `scale`
times faster than on the cluster, so the head takes `scale` times as many partials a second as it
would there, while each add and merge costs it the real time. The idle fraction and the head's busy
fraction measured are thus upper bounds for the cluster's, exact at scale 1; rates are printed
unscaled (divided by `scale`). The scale is chosen per worker count so the head takes about
--partials-per-second real partials a second (at least 1x; it is printed): with top-K tables, whose
merge takes about a second, give 1 so the head's load is the cluster's.

Combining (compute/folding.py): each simulated worker folds its shards with the workers' own ShardFold
as the real scheduler's SendOrder says (scheduler.SendPolicy paces the sends by the head's measured
seconds per partial), and answers an acknowledgement or everything folded. What it folds is the list
of its shards (a partial whose `add` is a list's extend): a real worker merges its tables on its own
machine, which here would put every worker's merges on this one's 2 cores; the worker-side merge of a
shard into its fold is not modelled (it overlaps nothing the head does). The tail's tree reduction is:
a worker absorbing another's partial (scheduler._reduce, RemoteWorker.absorb) is busy for the transfer
between the two (the partial's size at the calibrated rate) and one merge, as long as the head's mean
Reducer.add so far (this machine's CPU; a GPU worker's merge on its device is faster); the head takes
only what the last holder sends. The head takes a full-size Partial for each partial sent (one shard's sums and
tables, whatever the count: the same size). --no-combining sends every shard's partial (HEAD_SHARE inf).

Printed per worker count, over the steady window (from the workers' all having started a shard to the
last shard sent while every worker still had one to come): the workers' idle fraction (from their
side: time not computing), partials/s and head MB/s (unscaled) and the head's busy fraction (seconds
in transfer, --head-seconds and Reducer.add per wall second); the pool's own record of idle (start
and tail included); the head's time per partial in Reducer.add; the checkpoint lag (a result's wait
until a checkpoint holds it on disk; unscaled: the wait for the next checkpoint scaled back, the write
itself as measured); and over the whole run, the tail included (as the shards run out the workers
reduce their folds among themselves in about log2(workers) rounds of one absorb each, and the last
sends to the head), the partials, the head's busy fraction and MB/s, the tail's seconds (from the last
shard sent while every worker still had one to come to the end), the drain's seconds (from the last
shard computed to the end: every GPU idle), the absorbs and one absorb's seconds. --json prints one
JSON object a line per worker count instead (keys workers, worker_idle, head_mb_per_s, head_busy,
partials_per_s: the window; head_busy_run, head_mb_per_s_run, partials_per_s_run, tail_seconds,
drain_seconds, absorbs and the rest).

    python benchmarks/simulate_cluster.py [--workers 8 64 256] [--kinds gradients|all] [--per-worker 2]
        [--top-examples K] [--transfer-mb-per-s X] [--head-seconds S] [--partials-per-second P]
        [--no-combining] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from raygrad import constants as names
from raygrad.cluster import scheduler
from raygrad.cluster.pool import WorkerPool
from raygrad.compute.folding import ShardFold
from raygrad.config import RunConfig
from raygrad.store import topk
from raygrad.store.partial import Partial, ShardResult, array_widths
from raygrad.store.reducer import CHECKPOINT_SECONDS, Reducer, partial_nbytes
from raygrad.store.zarr_store import ResultStore

LAYERS, FEATURES = 26, 65536  # FEATURES: --features, for quick runs
TOKENS_PER_SECOND = 14_700  # one H200, Gemma-2-2B with 26 x 65,536 SAEs (docs/benchmarks.md)
SHARD_TOKENS = 1_000_000  # target tokens per shard (the default token budget on a GPU)
LOAD_SECONDS = 60.0  # model + SAEs loading on a worker, as reported
READY_SECONDS = 0.5  # how long a simulated worker takes to load (real seconds: only the start)
RPC_SECONDS = 0.001  # a `placed` question's round trip (not scaled: a real one costs this)
KINDS = {"gradients": ("gradients",), "all": ("gradients", "values", "attribution", "hessian")}
ROWS, MAX_POSITION = 1_000_000, 1024  # the examples' dataset rows and token positions are drawn below these
SHIFT = 7919  # a prime: the windows (shard x kind) * SHIFT mod 65,536 are distinct for 65,536 of them


def prefixes(kinds: str) -> dict[str, int]:
    """{'grad': 65536, ...}: the statistic prefixes of `kinds` and their widths."""
    return {names.KIND_PREFIX[kind]: FEATURES for kind in KINDS[kinds]}


class Examples:
    """Every shard's top-K tables as windows of one random table twice as wide: (L, 2W, K) score, row and
    position, sorted best first along K; shard s's tables of ranked kind j are columns [o, o + W) with
    o = (s * kinds + j) * SHIFT mod W, so no two share a column order and a merge of them does the work
    of independent shards (a new one enters a cell with a chance of about K / shards) at no cost here."""

    def __init__(self, ranked: tuple[str, ...], k: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        shape = (LAYERS, 2 * FEATURES, k)
        magnitude = -np.sort(-rng.exponential(1e-3, shape).astype(np.float32), axis=-1)  # best first
        self.score = np.where(rng.random(shape) < 0.5, -magnitude, magnitude)
        self.row = rng.integers(0, ROWS, shape, dtype=np.int64)
        self.position = rng.integers(0, MAX_POSITION, shape, dtype=np.int32)
        self.ranked = ranked

    def tables(self, shard: int) -> dict[str, np.ndarray]:
        out = {}
        for j, prefix in enumerate(self.ranked):
            at = (shard * len(self.ranked) + j) * SHIFT % FEATURES
            out.update(zip(topk.array_names(prefix),
                           (table[:, at:at + FEATURES] for table in (self.score, self.row, self.position))))
        return out


class Ref:
    def __init__(self, at: float, value):
        self.at, self.value = at, value


class Method:
    def __init__(self, actor: "SimActor", name: str):
        self.actor, self.name = actor, name

    def remote(self, *args) -> Ref:
        return self.actor.call(self.name, *args)


class ShardList(list):
    """What a simulated worker folds: the shards' numbers. The fold itself is the workers' own code
    (compute/folding.py ShardFold, generic over the partial's `add`); merging real tables there would
    put every worker's device merge on this machine's 2 cores, so the simulated partial is the list of
    its shards, and the full-size Partial (sums and tables) is made when the head takes it (SimRay.get)."""

    def add(self, other: "ShardList") -> None:
        self.extend(other)


class SimActor:
    """A worker that computes the calls sent to it one after another, on the real clock: a call starts
    when it is sent or when the one before it ends, whichever is later. Each computed shard goes through
    the workers' ShardFold as the head's SendOrder says: an acknowledgement, or everything folded."""

    def __init__(self, sim: "SimRay", number: int):
        self.sim, self.number = sim, number
        self._actor_id = SimpleNamespace(hex=lambda: f"actor{number}")
        self.free_at = time.monotonic()
        self.busy: list[tuple[float, float]] = []  # (start, end) of each shard it computed
        self.sent: list[float] = []  # when each shard was sent to it
        self.placed, self.ready, self.run, self.absorb = (Method(self, name) for name in
                                                          ("placed", "ready", "run", "absorb"))
        self.fold = ShardFold()
        self.absorbs: list[tuple[float, float]] = []  # (start, end) of each partial it absorbed from another
        self.sends: list[float] = []  # when each of its partials was sent (the end of the call that sent it)

    def call(self, method: str, *args) -> Ref:
        now = time.monotonic()
        start = max(now, self.free_at)
        if method == "run":
            shard, order = args[0], args[-1]
            computed = None
            seconds = 0.0
            if shard is not None:  # None: a call that only sends what the worker folded
                seconds = self.sim.shard_seconds * self.sim.rng.uniform(0.95, 1.05)
                computed = ShardResult(shard, ShardList([shard]), seconds * self.sim.scale, LOAD_SECONDS)
                self.busy.append((start, start + seconds))
                self.sent.append(now)
            value = self.fold.take(computed, order)
            if value.partial is not None:
                self.sends.append(start + seconds)
        elif method == "absorb":  # another worker's partial, pulled from it and merged here (RemoteWorker.absorb)
            (sent,), order = args[0], args[-1]
            start = max(start, sent.at)  # once the other worker has sent it
            seconds = self.sim.absorb_seconds()
            self.fold.absorb(sent.value, order)
            self.absorbs.append((start, start + seconds))
            value = (True, "")
        elif method == "ready":
            seconds = READY_SECONDS * self.sim.rng.uniform(0.9, 1.1)
            value = {"device": "cuda", "load_seconds": LOAD_SECONDS}
        else:
            seconds, value = RPC_SECONDS, (f"node-{self.number}", f"actor{self.number}/process-0")
        self.free_at = start + seconds
        return Ref(self.free_at, value)


class SimRay:
    """ray.wait / ray.get / ray.kill over SimActors (patched onto the ray module for one run). `get` of a
    shard's result costs the head its transfer (bytes / rate) and --head-seconds, both scaled."""

    def __init__(self, shard_seconds: float, scale: float, partial, transfer_bytes_per_s: float,
                 head_seconds: float, seed: int = 0):
        self.shard_seconds, self.scale, self.partial = shard_seconds, scale, partial
        self.transfer_bytes_per_s, self.head_seconds = transfer_bytes_per_s, head_seconds
        self.rng = random.Random(seed)
        self.actors: list[SimActor] = []
        self.receive_seconds = 0.0  # real seconds the head's loop spent in transfers and --head-seconds
        self.charged = 0.0  # the same, as charged on the cluster (unscaled)
        self.taken: list[tuple[float, float, int]] = []  # per partial taken: (get started, ended, bytes)
        self.last_get = (0.0, 0.0)
        self.merge_seconds = 0.0  # one partial's merge (the mean Reducer.add so far, real seconds)
        self.partial_bytes = 0

    def absorb_seconds(self) -> float:
        """A worker absorbing another's partial, in this run's seconds: the transfer between the two
        workers at the calibrated rate and one merge, as long as the head's Reducer.add of one partial
        (this machine's CPU: a GPU worker merges on its device, faster)."""
        return (self.partial_bytes / self.transfer_bytes_per_s + self.merge_seconds) / self.scale

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

    def get(self, ref: Ref):
        value = ref.value
        if isinstance(value, ShardResult) and value.partial is not None:
            started = time.monotonic()
            shards = list(value.partial)
            value = dataclasses.replace(value, partial=self.partial(shards[0], len(shards)))
            cost = partial_nbytes(value.partial) / self.transfer_bytes_per_s + self.head_seconds
            time.sleep(cost / self.scale)
            self.charged += cost
            self.receive_seconds += time.monotonic() - started
            self.taken.append((started, time.monotonic(), partial_nbytes(value.partial)))
            self.last_get = (time.monotonic() - started, cost)  # real seconds here, charged (cluster) seconds
        return value


def calibrate_transfer(megabytes: float, echo) -> float:
    """Bytes a second that a real loopback Ray moves a Partial from an actor to this process: the round
    trip of `ray.get(actor.send.remote())` for a Partial of `megabytes`, less that of an empty one (best
    of 3 each, after one of each to warm up)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from raygrad.cluster.runtime import bind_to_loopback, restore_cluster_setting

    @ray.remote(num_cpus=1)
    class Sender:
        def __init__(self, nbytes: int):
            width = max(1, nbytes // 8 // LAYERS)
            self.full = Partial({"grad_sum": np.random.default_rng(0).random((LAYERS, width))},
                                np.ones(LAYERS, dtype=np.int64))
            self.empty = Partial({"grad_sum": np.zeros((LAYERS, 1))}, np.ones(LAYERS, dtype=np.int64))

        def send(self, full: bool) -> Partial:
            return self.full if full else self.empty

    before = bind_to_loopback()
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=1, log_to_driver=False,
             configure_logging=False)
    try:
        sender = Sender.remote(int(megabytes * 1e6))
        best = {}
        for full in (False, True):
            times = []
            for _ in range(4):
                started = time.perf_counter()
                partial = ray.get(sender.send.remote(full))
                times.append(time.perf_counter() - started)
                nbytes = partial_nbytes(partial)
                del partial
            best[full] = (min(times[1:]), nbytes)
    finally:
        ray.shutdown()
        restore_cluster_setting(*before)
    seconds = max(best[True][0] - best[False][0], 1e-6)
    rate = best[True][1] / seconds
    echo(f"transfer: a {best[True][1] / 1e6:.0f} MB Partial from an actor on a loopback Ray took "
         f"{best[True][0] * 1e3:.0f} ms (an empty one {best[False][0] * 1e3:.1f} ms): {rate / 1e6:.0f} MB/s, "
         f"{1e6 / rate * 1e3:.2f} ms per MB")
    return rate


def simulate(workers: int, kinds: str, per_worker: int, partials_per_second: float, shards_per_worker: int,
             store_dir: Path, top_k: int = 0, transfer_mb_per_s: float = 1000.0, head_seconds: float = 0.0) -> dict:
    import ray

    shard_seconds = SHARD_TOKENS / TOKENS_PER_SECOND  # on the cluster
    scale = max(1.0, partials_per_second * shard_seconds / workers)
    sums = {name: np.full((LAYERS, width), 1e-3) for name, width in array_widths(prefixes(kinds)).items()}
    ranked = tuple(topk.example_prefixes(KINDS[kinds])) if top_k else ()
    examples = Examples(ranked, top_k) if top_k else None

    def partial(shard: int, count: int = 1) -> Partial:
        """The partial of `count` shards folded, the first `shard`: one shard's size, whatever the count."""
        return Partial(sums, np.full(LAYERS, SHARD_TOKENS * count, dtype=np.int64),
                       loss_sum=2.5 * SHARD_TOKENS * count, loss_tokens=SHARD_TOKENS * count,
                       examples=examples.tables(shard) if examples else {})

    shards = workers * shards_per_worker
    sim = SimRay(shard_seconds / scale, scale, partial, transfer_mb_per_s * 1e6, head_seconds)
    saved = {name: getattr(ray, name) for name in ("wait", "get", "kill")}
    saved_new_actor, saved_per_worker = WorkerPool._new_actor, scheduler.PER_WORKER
    saved_measured = scheduler.SendPolicy.measured

    def measured(policy, seconds: float) -> None:
        """The head grants sends at its share / its seconds per partial, per second of the cluster. Its
        seconds per partial on the cluster are the transfer and --head-seconds as charged and Reducer.add
        as measured (real seconds either way); time runs `scale` times faster here, so the policy is
        given them divided by `scale`: the cluster's sends, per second of this run."""
        saved_measured(policy, (seconds - sim.last_get[0] + sim.last_get[1]) / scale)

    scheduler.SendPolicy.measured = measured
    ray.wait, ray.get, ray.kill = sim.wait, sim.get, lambda actor: None
    WorkerPool._new_actor = lambda pool: sim.new_actor()
    scheduler.PER_WORKER = per_worker
    path = store_dir / f"w{workers}.zarr"
    try:
        store = ResultStore.create(path, prefixes(kinds), shards, list(range(LAYERS)), {}, top_k=top_k,
                                   ranked=ranked)
        reducer = Reducer(store, checkpoint_seconds=CHECKPOINT_SECONDS / scale, progress=False)
        sim.partial_bytes = partial_nbytes(partial(0))
        pool = WorkerPool(RunConfig(workers=workers), echo=lambda line: print(line, file=sys.stderr))
        pool.workers = workers
        pool.start_workers(SimpleNamespace(sae_layers_per_pass=None, layers=[]), seed=0)
        cpu_started = time.thread_time()
        started = time.monotonic()
        adds = []  # (start, end) of each Reducer.add
        try:
            for result in pool.map([(shard, []) for shard in range(shards)]):
                added = time.monotonic()
                reducer.add(result)
                adds.append((added, time.monotonic()))
                sim.merge_seconds = reducer.reduce_seconds / reducer.partials_received  # not the last's writer wait
        finally:
            reducer.close()
        ended = time.monotonic()
        head_cpu = time.thread_time() - cpu_started
    finally:
        ray.wait, ray.get, ray.kill = saved["wait"], saved["get"], saved["kill"]
        WorkerPool._new_actor, scheduler.PER_WORKER = saved_new_actor, saved_per_worker
        scheduler.SendPolicy.measured = saved_measured
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
        idle += max(0.0, last - first) - busy
    wall = ended - started

    def within(spans) -> float:  # seconds of `spans` inside the window [first, last]
        return sum(max(0.0, min(end, last) - max(start, first)) for start, end in spans)

    window = max(last - first, 1e-9)
    taken = [(start, nbytes) for start, _, nbytes in sim.taken if first <= start < last]
    write = timing["checkpoint_write_seconds"] / max(timing["checkpoints"], 1)
    lag = timing["checkpoint_lag_seconds"]
    writing = lag["mean_writing"]  # real seconds, not scaled: the writes are full size
    received = timing["partials_received"]
    return {
        "workers": workers,
        "worker_idle": idle / (idle + computing) if idle + computing > 0 else 0.0,
        # the head over the same window (the steady state): partials taken, their MB, its busy fraction
        "head_mb_per_s": sum(nbytes for _, nbytes in taken) / window / scale / 1e6,
        "head_busy": (within((start, end) for start, end, _ in sim.taken) + within(adds)) / window,
        "partials_per_s": len(taken) / window / scale,
        # over the whole run, the tail included (every worker sends what it holds as the shards run out)
        "head_mb_per_s_run": timing["bytes_received"] / wall / scale / 1e6,
        "head_busy_run": (sim.receive_seconds + timing["reduce_seconds"]) / wall,
        "partials_per_s_run": received / wall / scale,
        "partials": received, "window_seconds": window * scale, "tail_seconds": (ended - last) * scale,
        # the tail's tree reduction among the workers: partials absorbed worker to worker, and the worker
        # seconds (unscaled) of one absorb (transfer + merge)
        "absorbs": sum(len(actor.absorbs) for actor in sim.actors),
        # from the last shard computed to the run's end: the GPUs all idle (the head's real add and
        # checkpoint seconds in it count `scale` times: exact at scale 1)
        "drain_seconds": (ended - max(end for actor in sim.actors for _, end in actor.busy)) * scale,
        "absorb_seconds": (sum(end - start for actor in sim.actors for start, end in actor.absorbs) * scale
                           / max(1, sum(len(actor.absorbs) for actor in sim.actors))),
        "kinds": kinds, "top_examples": top_k, "per_worker": per_worker, "scale": scale, "shards": shards,
        "partial_mb": timing["bytes_received"] / received / 1e6,
        "transfer_mb_per_s": transfer_mb_per_s, "head_seconds": head_seconds,
        "worker_idle_pool_record": timing["worker_idle_fraction"],
        "head_transfer_s_per_partial": sim.charged / received,  # with --head-seconds; unscaled
        "head_reduce_s_per_partial": timing["reduce_seconds"] / received,  # real (not scaled)
        "head_thread_cpu": head_cpu / wall,  # share of one core, in the scaled run
        "checkpoints": timing["checkpoints"], "checkpoint_write_seconds": write,
        # the wait for the next checkpoint scaled back, the writing as measured
        "lag_mean": (lag["mean"] - writing) * scale + writing, "lag_max": (lag["max"] - writing) * scale + writing,
        "wall_seconds": wall,
    }


def main() -> None:
    global FEATURES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--kinds", choices=sorted(KINDS), default="gradients")
    parser.add_argument("--top-examples", type=int, default=0, metavar="K",
                        help="each partial carries K examples per dimension of every ranked kind (0: none)")
    parser.add_argument("--per-worker", type=int, default=scheduler.PER_WORKER,
                        help="shards in flight per worker (the scheduler's PER_WORKER)")
    parser.add_argument("--partials-per-second", type=float, default=8.0,
                        help="real partials a second the head is given (sets the time scale, at least 1x)")
    parser.add_argument("--shards-per-worker", type=int, default=4)
    parser.add_argument("--transfer-mb-per-s", type=float, default=None, metavar="X",
                        help="Ray's transfer rate of a partial to the head, MB/s (default: measured on a loopback Ray)")
    parser.add_argument("--calibrate-mb", type=float, default=256.0, help="the Partial's size in the measurement")
    parser.add_argument("--head-seconds", type=float, default=0.0, metavar="S",
                        help="extra seconds of head work per partial (unscaled)")
    parser.add_argument("--no-combining", action="store_true",
                        help="every shard's partial sent on its own (scheduler.HEAD_SHARE inf), as before combining")
    parser.add_argument("--json", action="store_true", help="one JSON object a line per worker count")
    parser.add_argument("--store-dir", type=Path, default=None, help="where the temporary store goes (a disk)")
    parser.add_argument("--features", type=int, default=FEATURES, help="width of each layer (smaller: a quick run)")
    args = parser.parse_args()
    if args.top_examples < 0 or args.head_seconds < 0 or (args.transfer_mb_per_s is not None
                                                          and args.transfer_mb_per_s <= 0):
        parser.error("--top-examples and --head-seconds must be >= 0, --transfer-mb-per-s > 0")

    FEATURES = args.features  # read by prefixes, Examples and the sizes printed
    if args.no_combining:
        scheduler.HEAD_SHARE = math.inf

    def echo(line: str) -> None:  # with --json, stdout holds only the JSON lines
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    rate = args.transfer_mb_per_s
    if rate is None:
        rate = calibrate_transfer(args.calibrate_mb, echo) / 1e6
    else:
        echo(f"transfer: {rate:g} MB/s (given)")
    echo(f"shard: {SHARD_TOKENS:,} target tokens at {TOKENS_PER_SECOND:,} tokens/s = "
         f"{SHARD_TOKENS / TOKENS_PER_SECOND:.1f} s on an H200; {LAYERS} x {FEATURES:,}, kinds {args.kinds}; "
         f"top examples {args.top_examples}; {args.per_worker} in flight per worker; head work "
         f"{args.head_seconds:g} s per partial; checkpoints every {CHECKPOINT_SECONDS:g} s (unscaled); "
         + ("no combining (every shard sent)" if args.no_combining else
            f"combining: the head's share for taking partials {scheduler.HEAD_SHARE:g}"))
    header = (f"{'workers':>7} {'scale':>6} {'shards':>6} {'MB/partial':>10} {'idle':>6} {'idle(pool)':>10} "
              f"{'partials/s':>10} {'head MB/s':>9} {'head busy':>9} {'s xfer':>6} {'s add':>6} {'ckpt s':>6} "
              f"{'lag mean':>8} {'lag max':>7} {'partials':>8} {'busy(run)':>9} {'MB/s(run)':>9} {'tail s':>6} "
              f"{'drain s':>7} {'absorbs':>7} {'s absorb':>8} {'wall s':>6}")
    if not args.json:
        print(header)
    with tempfile.TemporaryDirectory(dir=args.store_dir) as store_dir:
        for workers in args.workers:
            row = simulate(workers, args.kinds, args.per_worker, args.partials_per_second, args.shards_per_worker,
                           Path(store_dir), args.top_examples, rate, args.head_seconds)
            if args.json:
                print(json.dumps(row), flush=True)
                continue
            print(f"{row['workers']:>7} {row['scale']:>5.1f}x {row['shards']:>6} {row['partial_mb']:>10.1f} "
                  f"{row['worker_idle']:>6.2%} {row['worker_idle_pool_record']:>10.2%} "
                  f"{row['partials_per_s']:>10.2f} {row['head_mb_per_s']:>9.1f} {row['head_busy']:>9.1%} "
                  f"{row['head_transfer_s_per_partial']:>6.2f} {row['head_reduce_s_per_partial']:>6.3f} "
                  f"{row['checkpoint_write_seconds']:>6.2f} {row['lag_mean']:>7.1f}s {row['lag_max']:>6.1f}s "
                  f"{row['partials']:>8} {row['head_busy_run']:>9.1%} {row['head_mb_per_s_run']:>9.1f} "
                  f"{row['tail_seconds']:>6.0f} {row['drain_seconds']:>7.0f} {row['absorbs']:>7} "
                  f"{row['absorb_seconds']:>8.2f} "
                  f"{row['wall_seconds']:>6.0f}", flush=True)
    echo("idle: workers not computing while shards waited (from their side); idle(pool): the pool's record "
         "(start and tail included); rates unscaled; head busy: the head's seconds in transfers, --head-seconds "
         "and Reducer.add per wall second; s xfer: transfer and --head-seconds per partial (unscaled); s add: "
         "Reducer.add per partial (real); ckpt s: one checkpoint write (real); lag: a result's wait until on "
         "disk (unscaled)")


if __name__ == "__main__":
    main()
