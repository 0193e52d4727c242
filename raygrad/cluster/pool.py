"""Where shards run: in this process, or on Ray worker actors that are asked
for with the resources they need.

On Ray the pool is elastic. Actors are requested whatever the cluster holds
now (a pending actor is what Ray's autoscaler scales on); shards go to the
actors that are up, in the order they come up; a shard whose actor is lost
goes back to the queue for another, and a lost actor is asked for again.
Results are keyed by shard, so a retried shard is never counted twice. With
no worker placed on a node for `--worker-timeout` seconds (one loading its
model counts as placed) the pool stops with one line naming what was asked
for and what the cluster offers. Starting, joining and stopping Ray, and the actor itself, are
cluster/runtime.py's; this module decides which shard runs where."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Callable, Iterator

from ..compute.worker import ShardRunner
from ..config import RunConfig
from ..errors import RaygradError
from ..model.loading import pick_device
from ..plan import Plan
from ..store.partial import ShardResult
from .node_check import verified_nodes
from .runtime import (
    RemoteWorker,
    actor_name,
    cluster_offer,
    largest_node_gpus,
    local_gpus,
    signals_raised_plainly,
    sigterm_handler_kept,
    start_or_join,
    stop,
)
from .scheduler import ElasticMap, WorkerClocks, WorkerTimeout  # noqa: F401 (WorkerTimeout: raised by a map)

log = logging.getLogger(__name__)

RESTART_POLL_SECONDS = 1.0  # between questions to an actor Ray is restarting (the loop takes other results meanwhile)


class WorkerPool:
    """A context manager: enter resolves where shards run (and starts or joins
    Ray), `start_workers` asks for the actors, `map` runs shards."""

    def __init__(self, config: RunConfig, workers: int | None = None, echo: Callable[[str], None] = log.info):
        self.config = config
        self.requested = config.workers if workers is None else workers
        self.echo = echo
        self.started_ray = False
        self._loopback_setting: tuple | None = None  # what runtime.bind_to_loopback changed, put back on exit
        self.gpus_per_worker = 0
        self.cpus_per_worker = 1
        self.actors: list = []
        self.worker_devices: dict[str, str] = {}  # actor id -> the device it resolved
        self.worker_nodes: dict[str, str] = {}  # actor id -> the Ray node it runs on
        self.busy: dict[str, int] = {}  # actor id -> the shard it is computing
        self.placing: dict = {}  # `placed` ref -> an actor not yet on a node
        self.starting: dict = {}  # `ready` ref -> an actor not yet loaded (placed or not)
        self.retry_at: dict[str, tuple[float, object]] = {}  # actor id -> (time.monotonic(), actor): ask it again then
        self.clocks = WorkerClocks()  # per worker: seconds up and idle, for the timing record
        self.verified_nodes: frozenset[str] = frozenset()  # nodes that saw a local dataset (node_check.py)

    # --- where shards run

    def __enter__(self) -> "WorkerPool":
        if self._in_process():
            return self
        import ray

        if not ray.is_initialized():
            with sigterm_handler_kept():
                self._loopback_setting = start_or_join(self.config, ray)
            self.started_ray = True
        try:
            self._size(ray.cluster_resources(), largest_node_gpus(ray.nodes()))
        except BaseException:  # a request no node can meet: stop the Ray this started (no __exit__ follows)
            self.__exit__(None, None, None)
            raise
        return self

    def _in_process(self) -> bool:
        """Whether shards run in this process (then `workers` and `device` are set)."""
        config = self.config
        if self.requested is None and not config.address and local_gpus() <= 1:
            # One device here and no cluster named: Ray would add start-up and nothing else.
            self.requested = 0
            if config.gpus_per_worker:  # with --workers 0 given, RunConfig refuses it
                self.echo(f"--gpus-per-worker {config.gpus_per_worker}: no effect on an in-process run (one "
                          "device here and no --address); use --workers N to run Ray workers")
        if self.requested == 0:
            self.workers = 0
            self.device = str(pick_device(config.device))
        return self.requested == 0

    def dry(self) -> str:
        """What entering would resolve and ask for, without Ray (`raygrad run --dry-run`): a local Ray
        from this machine's GPUs and CPUs; with --address, the request alone, since the cluster is not
        contacted (its defaults are said, not resolved). -> the workers line."""
        config = self.config
        if self._in_process():
            return f"in-process (no Ray) on {self.device}"
        if not config.address:
            gpus = local_gpus()
            self._size({"GPU": gpus, "CPU": os.cpu_count() or 1}, gpus)
            return f"a local Ray would be started, asking for {self.describe_request()}"
        gpus = config.gpus_per_worker
        if gpus is None and config.device != "auto":
            gpus = int(config.device == "cuda")
        self.gpus_per_worker = gpus if gpus is not None else 1  # as on a cluster with GPUs
        self.workers = self.requested or 1
        self.device = "cuda" if self.gpus_per_worker else "cpu"
        count = f"{self.requested} x" if self.requested else "one per GPU of the cluster (1 if it has none), each"
        gpu_text = f"GPU: {gpus}" if gpus is not None else "GPU: 1 if the cluster has GPUs, else 0"
        return (f"--address {config.address} would be asked for {count} {{{gpu_text}, CPU: 1}} (the cluster is "
                f"not contacted: shards here are planned for {self.workers} {self.device.upper()} "
                f"worker{'s' * (self.workers > 1)})")

    def _size(self, resources: dict, node_gpus: int) -> None:
        """Workers and their resources from the request; the cluster is consulted
        only for defaults and for what can never fit (an autoscaler adds nodes)."""
        config = self.config
        gpus_up = int(resources.get("GPU", 0))
        gpus = config.gpus_per_worker
        if gpus is None:
            gpus = 1 if config.device != "cpu" and (gpus_up or config.device == "cuda") else 0
        if gpus == 0 and config.device == "cuda":
            raise RaygradError("--device cuda: workers reserve no GPU (--gpus-per-worker 0, or none in the "
                               "cluster); give --gpus-per-worker 1 or more, or use --device cpu or auto")
        if gpus and node_gpus and gpus > node_gpus:
            raise RaygradError(f"--gpus-per-worker {gpus}: the largest node of this cluster has {node_gpus} GPUs")
        self.gpus_per_worker = gpus
        self.workers = self.requested or max(1, gpus_up // gpus if gpus else 1)
        if not config.address and gpus and self.workers * gpus > gpus_up:
            raise RaygradError(f"--workers {self.workers}: this machine has {gpus_up} GPUs, "
                               f"{self.workers} workers x {gpus} GPUs would never start")
        cpus = int(resources.get("CPU", 1))
        # GPU workers need a CPU each; CPU workers share the local machine's cores.
        self.cpus_per_worker = 1 if gpus or config.address else max(1, cpus // self.workers)
        self.device = "cuda" if gpus else "cpu"  # what the workers are expected to resolve

    def describe_request(self) -> str:
        return f"{self.workers} x {{GPU: {self.gpus_per_worker}, CPU: {self.cpus_per_worker}}}"

    # --- the actors

    def start_workers(self, plan: Plan, seed: int) -> None:
        """Ray actors are asked for now, each given the plan once (at construction: an actor Ray restarts
        gets it again), and load their model as soon as they are placed; in-process, the runner loads on
        first use. The plan's shards need not be planned yet: each reaches a worker as a work item (`map`)."""
        self.plan, self.seed, self.actors = plan, seed, []
        if self.workers == 0:
            return
        with signals_raised_plainly():  # every node that may host a worker sees a local dataset (node_check.py)
            self.verified_nodes = verified_nodes(plan, self.gpus_per_worker, self.cpus_per_worker,
                                                 client=(self.config.address or "").startswith("ray://"))
        for _ in range(self.workers):
            self._add_actor()

    def _add_actor(self) -> None:
        actor = self._new_actor()
        self.actors.append(actor)
        self.watch_start(actor)

    def watch_start(self, actor) -> None:
        """Ask a new (or restarted) actor where it is and to load its model: `placed` answers
        while `ready` loads (an actor runs two calls at a time), and neither waits for the other."""
        self._forget_calls(actor)  # one outstanding pair per actor; earlier ones answer the same
        self.retry_at.pop(actor_name(actor), None)
        self.placing[actor.placed.remote()] = actor
        self.starting[actor.ready.remote()] = actor

    def ask_later(self, actor) -> None:
        """An actor Ray is restarting (perhaps waiting for a node) answers every call at once, in vain: ask
        again in RESTART_POLL_SECONDS, taking other results meanwhile."""
        self._forget_calls(actor)
        self.retry_at[actor_name(actor)] = (time.monotonic() + RESTART_POLL_SECONDS, actor)

    def _forget_calls(self, actor) -> None:
        for refs in (self.placing, self.starting):
            for ref in [ref for ref, owner in refs.items() if owner is actor]:
                del refs[ref]

    # --- the start-up calls, as the scheduler sees them (scheduler.ActorPool)

    def watch_unwatched(self) -> None:
        """Ask `placed` and `ready` of every actor with neither in flight nor a retry due: those up since
        an earlier map (they answer at once)."""
        watched = {id(actor) for actor in self.starting.values()} | {id(a) for _, a in self.retry_at.values()}
        for actor in self.actors:
            if id(actor) not in watched:
                self.watch_start(actor)

    def retry_due(self, now: float) -> float | None:
        """Ask again each actor whose retry is due; -> seconds until the next one (None: none waits)."""
        for due, actor in list(self.retry_at.values()):
            if due <= now:
                self.watch_start(actor)  # drops it from retry_at
        return min((due - now for due, _ in self.retry_at.values()), default=None)

    def loading(self) -> int:
        """Actors placed and loading their model (a download may take long)."""
        return len({id(actor) for actor in self.starting.values()} - {id(actor) for actor in self.placing.values()})

    def startup_refs(self) -> list:
        """The `placed` and `ready` calls in flight."""
        return [*self.placing, *self.starting]

    def take_startup(self, ref) -> tuple[str, object] | None:
        """-> ("placed" | "ready", its actor) for a start-up call that answered (no longer in flight);
        None for any other ref."""
        if ref in self.placing:
            return "placed", self.placing.pop(ref)
        if ref in self.starting:
            return "ready", self.starting.pop(ref)
        return None

    def placed_on(self, actor, node: str) -> None:
        self.worker_nodes[actor_name(actor)] = node  # Ray may restart an actor elsewhere

    def loaded(self, actor, device: str) -> int:
        """An actor that loaded its model on `device`; -> how many have (its worker number when new)."""
        self.worker_devices[actor_name(actor)] = device
        return len(self.worker_devices)

    def computing(self, actor, shard: int | None) -> None:
        """The shard an actor computes now (None: none)."""
        if shard is None:
            self.busy.pop(actor_name(actor), None)
        else:
            self.busy[actor_name(actor)] = shard

    def _new_actor(self):
        import ray

        # Ray restarts an actor whose process or node died (reloading the
        # model) and the pool re-queues the shard it held; Ray itself never
        # re-runs a call, so no shard can come back twice.
        actor = ray.remote(RemoteWorker).options(
            num_gpus=self.gpus_per_worker, num_cpus=self.cpus_per_worker, max_restarts=2, max_task_retries=0,
            max_concurrency=2,  # a shard read ahead while one computes, in the order sent (RemoteWorker)
        ).remote(self.plan, self.seed, self.verified_nodes)
        return actor

    def __exit__(self, *exc) -> None:
        if self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor)
        if self.started_ray:
            stop(self._loopback_setting)

    # --- running shards

    def map(self, work: list[tuple]) -> Iterator[ShardResult]:
        """`work`: (shard number, source, shards.Shard) each, references a worker reads; never texts."""
        if not work:
            return
        if self.workers == 0:
            runner = ShardRunner(self.plan, self.seed)
            self.worker_devices["in-process"] = str(runner.device)
            self.say_sae_passes("this process", runner.sae_groups)
            for item in work:
                yield runner.run(*item)
            return
        yield from self._elastic_map(deque(work))

    def _elastic_map(self, queue: deque) -> Iterator[ShardResult]:
        """Shards to actors as they come up, until every shard has a result (scheduler.py)."""
        yield from ElasticMap(self, queue).results()

    def say_sae_passes(self, who: str, groups: list[list[int]] | None) -> None:
        if groups and len(groups) > 1 and not self.plan.sae_layers_per_pass:
            self.echo(f"sae      {who}: the SAEs of {len(self.plan.layers)} layers do not fit beside the model "
                      f"on its GPU; {len(groups)} passes of up to {len(groups[0])} layers each")

    def replace_actor(self, lost) -> None:
        import ray

        if lost in self.actors:
            self.actors.remove(lost)
        self._forget_calls(lost)
        self.retry_at.pop(actor_name(lost), None)
        ray.kill(lost)
        self._add_actor()

    def status_line(self, up: int, loading: int) -> str:
        return (f"waiting  for workers: asked for {self.describe_request()}, {up} up, {loading} loading their "
                f"model; cluster: {cluster_offer()}")

    def timeout_message(self) -> str:
        return (f"--worker-timeout {self.config.worker_timeout:g}: no worker was placed in that time; asked for "
                f"{self.describe_request()}, the cluster offers {cluster_offer()}")
