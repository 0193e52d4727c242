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
ray_runtime.py's; this module decides which shard runs where."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from typing import Callable, Iterator

from .config import RunConfig
from .errors import RaygradError, first_line
from .models import pick_device
from .plan import Plan
from .ray_runtime import (
    RemoteWorker,
    actor_name,
    cluster_offer,
    get,
    largest_node_gpus,
    local_gpus,
    sigterm_handler_kept,
    start_or_join,
    stop,
)
from .worker import ShardResult, ShardRunner

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0  # how long one wait for a result or a worker lasts
STATUS_SECONDS = 30.0  # between "waiting for workers" lines
RESTART_POLL_SECONDS = 1.0  # between questions to an actor Ray is restarting (the loop takes other results meanwhile)
MAX_LOSSES_PER_SHARD = 3  # a shard whose worker dies this often is killing it (memory, say): stop, not loop
PER_WORKER = 2  # shards in flight per worker: the one it computes and the next, queued behind it


class WorkerTimeout(RaygradError):
    pass


class WorkerClocks:
    """Per worker, as the driver sees it: seconds up (from its `ready` answer until it is lost or the
    map ends) and seconds idle (up with no shard computing or queued on it: waiting for the driver)."""

    def __init__(self):
        self.up: Counter = Counter()
        self.idle: Counter = Counter()
        self._up_since: dict[str, float] = {}
        self._idle_since: dict[str, float] = {}
        self.names: dict[str, int] = {}  # actor id -> worker number, in the order they came up

    def ready(self, name: str, now: float) -> None:
        self.names.setdefault(name, len(self.names) + 1)
        self._up_since.setdefault(name, now)
        self._idle_since.setdefault(name, now)

    def working(self, name: str, now: float) -> None:
        since = self._idle_since.pop(name, None)
        if since is not None:
            self.idle[name] += now - since

    def waiting(self, name: str, now: float) -> None:
        if name in self._up_since:
            self._idle_since.setdefault(name, now)

    def lost(self, name: str, now: float) -> None:
        self.working(name, now)
        since = self._up_since.pop(name, None)
        if since is not None:
            self.up[name] += now - since

    def stop(self, now: float) -> None:
        for name in list(self._up_since):
            self.lost(name, now)

    def record(self) -> dict:
        """The timing record's part: idle seconds per worker (by number) and the idle fraction of all."""
        up = sum(self.up.values())
        return {"worker_idle_seconds": {str(self.names[name]): seconds for name, seconds in self.idle.items()},
                "worker_idle_fraction": sum(self.idle.values()) / up if up > 0 else 0.0}


class WorkerPool:
    """A context manager: enter resolves where shards run (and starts or joins
    Ray), `start_workers` asks for the actors, `map` runs shards."""

    def __init__(self, config: RunConfig, workers: int | None = None, echo: Callable[[str], None] = log.info):
        self.config = config
        self.requested = config.workers if workers is None else workers
        self.echo = echo
        self.started_ray = False
        self._loopback_setting: tuple | None = None  # what ray_runtime.bind_to_loopback changed, put back on exit
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
        """Ray actors are asked for now, each given the whole plan once (at construction: an actor Ray
        restarts gets it again), and load their model as soon as they are placed; in-process, the runner
        loads on first use."""
        self.plan, self.seed, self.actors = plan, seed, []
        if self.workers == 0:
            return
        for _ in range(self.workers):
            self._add_actor()

    def _add_actor(self) -> None:
        actor = self._new_actor()
        self.actors.append(actor)
        self._watch_start(actor)

    def _watch_start(self, actor) -> None:
        """Ask a new (or restarted) actor where it is and to load its model: the
        answers come in that order, since an actor runs its calls one at a time."""
        self._forget_calls(actor)  # one outstanding pair per actor; earlier ones answer the same
        self.retry_at.pop(actor_name(actor), None)
        self.placing[actor.placed.remote()] = actor
        self.starting[actor.ready.remote()] = actor

    def _ask_later(self, actor) -> None:
        """An actor Ray is restarting (perhaps waiting for a node) answers every call at once, in vain: ask
        again in RESTART_POLL_SECONDS, taking other results meanwhile."""
        self._forget_calls(actor)
        self.retry_at[actor_name(actor)] = (time.monotonic() + RESTART_POLL_SECONDS, actor)

    def _forget_calls(self, actor) -> None:
        for refs in (self.placing, self.starting):
            for ref in [ref for ref, owner in refs.items() if owner is actor]:
                del refs[ref]

    def _new_actor(self):
        import ray

        # Ray restarts an actor whose process or node died (reloading the
        # model) and the pool re-queues the shard it held; Ray itself never
        # re-runs a call, so no shard can come back twice.
        actor = ray.remote(RemoteWorker).options(
            num_gpus=self.gpus_per_worker, num_cpus=self.cpus_per_worker, max_restarts=2, max_task_retries=0,
            max_concurrency=2,  # a shard read ahead while one computes (RemoteWorker)
        ).remote(self.plan, self.seed)
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
            self._say_sae_passes("this process", runner.sae_groups)
            for item in work:
                yield runner.run(*item)
            return
        yield from self._elastic_map(deque(work))

    def _elastic_map(self, queue: deque) -> Iterator[ShardResult]:
        """Shards to actors as they come up, until every shard has a result.

        Up to PER_WORKER shards are in flight on an actor: the one it computes (the oldest call, its
        head) and the next, which Ray queues behind it, so a worker goes from one shard to the next
        without waiting for the driver to take a result and send work. Near the end (fewer shards
        waiting than workers) an actor takes one at a time, so no shard waits behind another while a
        worker has none.

        A shard is charged a loss (MAX_LOSSES_PER_SHARD stop the run) only when the worker process that
        started it is gone, never for a death while idle, for a shard only queued on it, or for an
        actor that is only restarting:
        - an idle actor is asked `placed` before it is sent a shard, and sent it once that answers, so the
          shard runs on the process that answered. A death while idle fails that question (Ray answers
          ActorUnavailableError while it restarts the actor, ActorDiedError when it will not); the shard
          goes back to the queue uncharged. An actor with a shard in flight is sent the next one without
          asking: a death before that one starts fails the one in flight too.
        - a failed call that is not its actor's head never started (the head's process died, or the actor
          is out of reach): back to the queue uncharged, and the actor gets nothing more until it answers.
        - the head's call failing with ActorUnavailableError tells only that the actor could not be
          reached ("the task may or may not have been executed"): its process died (Ray says this, not
          ActorDiedError, while restarts are left) or the network failed. The shard is queued again, and
          the loss is charged when the actor answers `placed` from another process, or is gone for good;
          the same process answering again costs nothing. The shard queued behind it goes back uncharged.
        - ActorDiedError on the head's call: the process that started it is dead and not restarted; charged."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        watched = {id(actor) for actor in self.starting.values()} | {id(a) for _, a in self.retry_at.values()}
        for actor in self.actors:
            if id(actor) not in watched:
                self._watch_start(actor)  # up since an earlier map: answers at once
        waiting, placing, retry_at, clocks = self.starting, self.placing, self.retry_at, self.clocks
        asking: dict = {}  # `placed` ref -> (actor, item): an idle actor asked whether it is up, before `item`
        running: dict = {}  # run ref -> (actor, item, the worker process that answered before it)
        in_flight: dict[str, deque] = {}  # actor id -> its run refs in the order sent; the first is computing
        process_of: dict[str, str] = {}  # actor id -> the process that last answered `placed`
        room: dict = {}  # actor id -> an actor with a shard in flight and room for another
        suspect: set[str] = set()  # actors a queued call failed on: nothing more until they answer `placed`
        unreachable: dict = {}  # actor id -> (item, process that started it, error): charged if another answers
        idle: list = []
        finished: set[int] = set()
        losses: Counter = Counter()  # shard -> worker processes lost while computing it
        none_up_since = time.monotonic()
        last_status = time.monotonic()

        def charge(item, err) -> None:
            losses[item[0]] += 1
            if losses[item[0]] >= MAX_LOSSES_PER_SHARD:
                raise RaygradError(_shard_keeps_killing_line(item, losses[item[0]], err)) from None

        def settle(actor, process: str | None) -> None:
            """The actor answered from `process`, or (None) is gone for good."""
            if actor_name(actor) in unreachable:
                item, started_by, err = unreachable.pop(actor_name(actor))
                if process != started_by:
                    charge(item, err)

        def send(actor, item) -> None:
            name = actor_name(actor)
            ref = actor.run.remote(*item)
            running[ref] = (actor, item, process_of[name])
            in_flight.setdefault(name, deque()).append(ref)
            self.busy.setdefault(name, item[0])
            clocks.working(name, time.monotonic())

        def fill(actor) -> None:
            """Top an actor with a shard in flight up to PER_WORKER, while enough shards wait."""
            name = actor_name(actor)
            room.pop(name, None)
            if name in suspect:
                return
            while len(in_flight[name]) < PER_WORKER and queue and len(queue) >= len(self.actors):
                send(actor, queue.popleft())
            if len(in_flight[name]) < PER_WORKER:
                room[name] = actor

        def drop_calls(actor) -> list:
            """Forget an actor's calls in flight; -> their items, oldest first."""
            name = actor_name(actor)
            room.pop(name, None)
            self.busy.pop(name, None)
            clocks.lost(name, time.monotonic())
            return [running.pop(ref)[1] for ref in in_flight.pop(name, ())]

        try:
            while queue or running or asking:
                while idle and queue:
                    actor, item = idle.pop(), queue.popleft()
                    asking[actor.placed.remote()] = (actor, item)
                while room and queue and len(queue) >= len(self.actors):
                    fill(room[next(iter(room))])
                now = time.monotonic()
                for due, actor in list(retry_at.values()):
                    if due <= now:
                        self._watch_start(actor)  # drops it from retry_at
                # placed, loading their model (a download may take long)
                loading = len({id(actor) for actor in waiting.values()} - {id(actor) for actor in placing.values()})
                # Checked before every wait, not only after an empty one: the waits end early while an
                # actor that Ray cannot restart (no node for it) is asked again.
                if running or asking or idle or loading:
                    none_up_since = now
                elif now - none_up_since > self.config.worker_timeout:
                    raise WorkerTimeout(self._timeout_message())
                timeout = min([POLL_SECONDS, *(due - now for due, _ in retry_at.values())])
                refs = [*running, *asking, *placing, *waiting]
                if refs:
                    ready, _ = ray.wait(refs, num_returns=1, timeout=max(0.0, timeout))
                else:  # every actor is being restarted: nothing to take until one is asked again
                    time.sleep(max(0.0, timeout))
                    ready = []
                if not ready:
                    now = time.monotonic()
                    if not running and now - last_status >= STATUS_SECONDS:
                        self.echo(self._status_line(len(idle), loading))
                        last_status = now
                    continue
                ref = ready[0]
                if ref in placing:
                    actor = placing.pop(ref)
                    try:
                        node, process = get(ref)  # answered before its `ready`
                    except ActorUnavailableError:  # restarting, perhaps waiting for a node: not placed, ask again
                        self._ask_later(actor)
                        continue
                    except RayActorError:  # gone for good: its `ready` call says so and it is replaced
                        settle(actor, None)
                        continue
                    self.worker_nodes[actor_name(actor)] = node
                    settle(actor, process)
                    continue
                if ref in waiting:
                    actor = waiting.pop(ref)
                    try:
                        info = get(ref)
                    except ActorUnavailableError:  # restarting after a loss: Ray brings it back, ask again
                        self._ask_later(actor)
                        continue
                    except RayActorError as err:  # gone before it was up: ask for another one
                        log.warning("a worker was lost while starting (%s); asking for another", first_line(err))
                        self._replace(actor)
                        continue
                    self.worker_devices[actor_name(actor)] = info["device"]
                    self._say_sae_passes(f"worker {len(self.worker_devices)}", info.get("sae_groups"))
                    idle.append(actor)
                    clocks.ready(actor_name(actor), time.monotonic())
                    continue
                if ref in asking:
                    actor, item = asking.pop(ref)
                    try:
                        node, process = get(ref)
                    except ActorUnavailableError:  # died while idle and being restarted: the shard never started
                        queue.appendleft(item)
                        clocks.lost(actor_name(actor), time.monotonic())
                        self._ask_later(actor)
                        continue
                    except RayActorError:  # died while idle, for good: its `ready` call says so and it is replaced
                        queue.appendleft(item)
                        clocks.lost(actor_name(actor), time.monotonic())
                        self._watch_start(actor)
                        continue
                    name = actor_name(actor)
                    self.worker_nodes[name] = node  # Ray may have restarted it elsewhere while idle
                    process_of[name] = process
                    suspect.discard(name)
                    send(actor, item)
                    fill(actor)
                    continue
                actor, item, process = running.pop(ref)
                name = actor_name(actor)
                calls = in_flight[name]
                head = calls[0] is ref
                calls.remove(ref)
                try:
                    result = get(ref)
                except RayActorError as err:
                    if not head:  # queued behind a shard still in flight: it never started
                        queue.appendleft(item)
                        suspect.add(name)
                        room.pop(name, None)
                        continue
                    # its node or process is gone, or out of reach: the shard is queued again
                    if isinstance(err, ActorUnavailableError):
                        unreachable[name] = (item, process, err)  # charged once the actor answers again
                    else:
                        charge(item, err)
                    self.echo(f"worker lost during shard {item[0]} ({first_line(err)}); the shard is queued again")
                    queue.extendleft(reversed([item, *drop_calls(actor)]))  # those behind it never started
                    self._watch_start(actor)  # answers if Ray restarts it (or it was out of reach), raises if gone
                    continue
                self.busy.pop(name, None)
                if calls:
                    self.busy[name] = running[calls[0]][1][0]
                    fill(actor)
                else:
                    room.pop(name, None)
                    idle.append(actor)
                    clocks.waiting(name, time.monotonic())
                if result.shard not in finished:
                    finished.add(result.shard)
                    yield result
        finally:
            clocks.stop(time.monotonic())

    def _say_sae_passes(self, who: str, groups: list[list[int]] | None) -> None:
        if groups and len(groups) > 1 and not self.plan.sae_layers_per_pass:
            self.echo(f"sae      {who}: the SAEs of {len(self.plan.layers)} layers do not fit beside the model "
                      f"on its GPU; {len(groups)} passes of up to {len(groups[0])} layers each")

    def _replace(self, lost) -> None:
        import ray

        if lost in self.actors:
            self.actors.remove(lost)
        self._forget_calls(lost)
        self.retry_at.pop(actor_name(lost), None)
        ray.kill(lost)
        self._add_actor()

    def _status_line(self, up: int, loading: int) -> str:
        return (f"waiting  for workers: asked for {self.describe_request()}, {up} up, {loading} loading their "
                f"model; cluster: {cluster_offer()}")

    def _timeout_message(self) -> str:
        return (f"--worker-timeout {self.config.worker_timeout:g}: no worker was placed in that time; asked for "
                f"{self.describe_request()}, the cluster offers {cluster_offer()}")


def _shard_keeps_killing_line(item: tuple, losses: int, err: BaseException) -> str:
    shard, ref = item[0], item[-1]
    return (f"shard {shard} ({ref.texts} texts, {ref.rows_text()}, about {ref.est_tokens} target tokens) lost its "
            f"worker {losses} times "
            f"(last: {first_line(err)}); a worker that dies on the same shard is likely out of host or GPU "
            "memory: use a smaller --batch-size or --tokens-per-batch, a shorter --max-length, or workers with "
            "more memory, then resume")
