"""The driver: plan, shard, run workers (Ray actors or in-process), reduce
partial sums into the store, checkpoint, finalize, export."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from . import constants as names
from .config import RunConfig
from .data import load_texts
from .errors import RaygradError
from .models import pick_device
from .plan import Plan, make_plan, run_dir_name
from .store import ResultStore
from .worker import ShardResult, ShardRunner

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 30.0  # between checkpoints; the last shard always checkpoints


def run(config: RunConfig, echo: Callable[[str], None] = log.info, progress: bool = True,
        checkpoint_seconds: float = CHECKPOINT_SECONDS) -> Path:
    """A new run; returns its output directory."""
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    if (output_dir / names.STORE_NAME).exists():
        raise RaygradError(
            f"--output-dir {output_dir}: already holds a run; choose another directory (results are never overwritten)"
        )
    if config.save_consolidated and Path(config.save_consolidated).exists():
        raise RaygradError(
            f"--save-consolidated {config.save_consolidated}: file exists; results are never overwritten"
        )
    # Planning checks layers, sites and SAEs before Ray starts or weights load;
    # the samples and shards follow once the texts are read.
    plan = make_plan(config, 0)
    with _Cluster(config) as cluster:
        plan = plan.placed(config, cluster.workers, cluster.device)
        cluster.start_workers(plan, config.seed)  # Ray actors load their model while the texts are read
        texts = _texts(config, echo)
        plan = dataclasses.replace(plan, samples=len(texts)).placed(config, cluster.workers, cluster.device)
        run_dir = output_dir / run_dir_name(config, plan, datetime.now().strftime("%Y%m%d_%H%M%S"))
        if run_dir.exists():
            raise RaygradError(
                f"--output-dir {output_dir}: {run_dir.name} already exists; results are never overwritten"
            )
        echo(plan.describe())
        echo(f"output   {run_dir}")
        run_dir.mkdir(parents=True)
        store = ResultStore.create(
            run_dir / names.STORE_NAME, plan.prefixes, len(plan.shards), plan.layers,
            {names.ATTR_CONFIG: config.to_dict(), names.ATTR_PLAN: plan.to_dict()},
        )
        plan_seconds = time.perf_counter() - started
        _execute(plan, config, texts, store, cluster, progress, checkpoint_seconds, plan_seconds, echo)
    return run_dir


def resume(run_dir: Path, echo: Callable[[str], None] = log.info, progress: bool = True,
           checkpoint_seconds: float = CHECKPOINT_SECONDS) -> Path:
    """Continue a killed run from its last checkpoint."""
    started = time.perf_counter()
    store_path = Path(run_dir) / names.STORE_NAME
    if not store_path.exists():
        raise RaygradError(f"--resume {run_dir}: no {names.STORE_NAME} in this directory")
    store = ResultStore.open(store_path, writable=True)
    if store.attrs.get(names.ATTR_STATUS) == names.STATUS_COMPLETE:
        raise RaygradError(f"--resume {run_dir}: this run is already complete")
    config = RunConfig.from_dict(store.attrs[names.ATTR_CONFIG])
    saved = Plan.from_dict(store.attrs[names.ATTR_PLAN])
    texts = _texts(config, echo)
    if len(texts) != saved.samples:
        raise RaygradError(
            f"--resume {run_dir}: the dataset now yields {len(texts)} texts, the run was planned on {saved.samples}"
        )
    with _Cluster(config, saved.workers) as cluster:
        cluster.start_workers(saved, config.seed)
        _, done = store.totals()
        echo(saved.describe())
        echo(f"resuming {run_dir}: {int(done.sum())} of {len(done)} shards already done")
        _execute(saved, config, texts, store, cluster, progress, checkpoint_seconds,
                 time.perf_counter() - started, echo)
    return Path(run_dir)


def _texts(config: RunConfig, echo) -> list[str]:
    texts = load_texts(config.dataset, config.num_samples, text_column=config.text_column,
                       config=config.dataset_config, split=config.dataset_split, min_chars=config.min_chars)
    if len(texts) < config.num_samples:
        echo(f"warning: --num-samples {config.num_samples}: the dataset has only {len(texts)} texts "
             f"longer than {config.min_chars} characters; going on with {len(texts)}")
    return texts


def _execute(plan: Plan, config: RunConfig, texts: list[str], store: ResultStore, cluster: "_Cluster",
             progress: bool, checkpoint_seconds: float, plan_seconds: float, echo) -> None:
    from tqdm import tqdm

    from .export import write_exports

    totals, done = store.totals()
    todo = [i for i, finished in enumerate(done) if not finished]
    compute_started = last_checkpoint = time.perf_counter()
    shard_seconds: dict[int, float] = {}
    load_seconds = 0.0
    new_tokens = 0
    batch_tokens = 0  # the packed batches' token budget, as the workers last reported it
    bar = tqdm(total=len(done), initial=len(done) - len(todo), unit="shard", disable=not progress,
               desc="raygrad")
    saved = int(done.sum())  # shards the store already holds
    try:
        for result in cluster.map([(i, texts[slice(*plan.shards[i])]) for i in todo]):
            totals.add(result.partial)
            done[result.shard] = True
            shard_seconds[result.shard] = result.seconds
            load_seconds = max(load_seconds, result.worker_load_seconds)
            new_tokens += result.partial.loss_tokens
            batch_tokens = max(batch_tokens, result.batch_tokens)
            now = time.perf_counter()
            if done.all() or now - last_checkpoint >= checkpoint_seconds:
                store.checkpoint(totals, done)
                saved, last_checkpoint = int(done.sum()), now
            bar.update(1)
            bar.set_postfix(tokens=totals.loss_tokens, tok_s=f"{new_tokens / (now - compute_started):.0f}")
    except BaseException as err:  # a failed shard, Ctrl-C: keep what finished, say how to go on
        if done.sum() > saved:
            store.checkpoint(totals, done)
        echo(f"stopped  after {int(done.sum())} of {len(done)} shards ({type(err).__name__}: {err}); "
             f"continue with: raygrad run --resume {store.path.parent}")
        raise
    finally:
        bar.close()
    if not done.all():
        raise RuntimeError("internal error: the worker pool returned before every shard was done")
    compute_seconds = time.perf_counter() - compute_started
    mean_loss = totals.loss_sum / max(totals.loss_tokens, 1)
    timing = {
        "plan_seconds": plan_seconds,
        "worker_load_seconds": load_seconds,
        "compute_seconds": compute_seconds,
        "tokens_this_session": new_tokens,
        # wall clock, worker start-up and model loading included
        "tokens_per_second": new_tokens / compute_seconds if compute_seconds > 0 else 0.0,
        # one worker while it computes shards (steady state)
        "worker_tokens_per_second": new_tokens / max(sum(shard_seconds.values()), 1e-9),
        "shard_seconds": {str(k): v for k, v in sorted(shard_seconds.items())},
        "resumed": len(todo) < len(done),
        **({"batch_tokens": batch_tokens} if batch_tokens else {}),
    }
    store.finalize(timing)
    echo(f"done     {totals.loss_tokens} target tokens, mean loss {mean_loss:.4f} nats/token, "
         f"{timing['tokens_per_second']:.0f} tokens/s overall, "
         f"{timing['worker_tokens_per_second']:.0f} tokens/s per worker computing"
         + (f", batches of up to {batch_tokens} tokens" if batch_tokens else ""))
    write_exports(store.path.parent, extra_npz=config.save_consolidated)


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class _Cluster:
    """Where shards run: in this process (workers 0) or on Ray worker actors."""

    def __init__(self, config: RunConfig, workers: int | None = None):
        self.config = config
        self.requested = config.workers if workers is None else workers
        self.started_ray = False
        self.gpus_per_worker = 0
        self.actors: list = []

    def __enter__(self) -> "_Cluster":
        if self.requested is None and not self.config.address and _local_gpus() <= 1:
            # One device here and no cluster named: Ray would add start-up and nothing else.
            self.requested = 0
        if self.requested == 0:
            self.workers = 0
            self.device = str(pick_device(self.config.device))
            return self
        import ray

        if not ray.is_initialized():
            # Workers import raygrad from wherever this driver does (a checkout works too).
            python_path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH")]))
            if self.config.address:
                ray.init(address=self.config.address, runtime_env={"py_modules": [str(Path(__file__).parent)]})
            else:
                # A local Ray bound to loopback only.
                ray.init(_node_ip_address="127.0.0.1", include_dashboard=False,
                         runtime_env={"env_vars": {"PYTHONPATH": python_path}}, log_to_driver=False)
            self.started_ray = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if self.config.device == "cpu":
            gpus = 0
        if self.config.device == "cuda" and gpus == 0:
            raise RaygradError("--device cuda: the Ray cluster has no GPUs; use --device cpu or auto")
        self.workers = self.requested or max(gpus, 1)
        self.gpus_per_worker = 1 if gpus else 0
        if gpus and self.workers > gpus:
            raise RaygradError(f"--workers {self.workers}: the Ray cluster has only {gpus} GPUs (one per worker)")
        self.cpus_per_worker = max(1, int(resources.get("CPU", 1)) // self.workers) if not gpus else 1
        self.device = "cuda" if gpus else "cpu"
        return self

    def start_workers(self, plan: Plan, seed: int) -> None:
        """Ray actors start loading their model now; in-process, the runner loads on first use."""
        self.plan, self.seed, self.actors = plan, seed, []
        if self.workers == 0:
            return
        import ray

        worker_cls = ray.remote(ShardRunner)
        self.actors = [
            # A crashed actor is restarted (reloading its model) and its
            # shard retried; an exception inside a shard stops the run.
            worker_cls.options(num_gpus=self.gpus_per_worker, num_cpus=self.cpus_per_worker,
                               max_restarts=2, max_task_retries=2).remote(plan, seed)
            for _ in range(self.workers)
        ]

    def __exit__(self, *exc) -> None:
        if self.started_ray or self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor)
        if self.started_ray:
            ray.shutdown()

    def map(self, work: list[tuple[int, list[str]]]) -> Iterator[ShardResult]:
        if not work:
            return
        if self.workers == 0:
            runner = ShardRunner(self.plan, self.seed)
            for shard, texts in work:
                yield runner.run(shard, texts)
            return
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        yield from pool.map_unordered(lambda actor, item: actor.run.remote(*item), work)
