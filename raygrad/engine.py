"""The driver: plan, read the texts, run shards on the worker pool, reduce
partial sums into the store, finalize, export."""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from . import constants as names
from .config import RunConfig
from .data import load_texts
from .errors import RaygradError
from .plan import Plan, make_plan, run_dir_name
from .pool import WorkerPool
from .reducer import CHECKPOINT_SECONDS, Reducer
from .store import ResultStore

log = logging.getLogger(__name__)

# Options that change where a resumed run executes, not what it computes.
EXECUTION_OPTIONS = ("address", "workers", "gpus_per_worker", "device", "worker_timeout")


def run(config: RunConfig, echo: Callable[[str], None] = log.info, progress: bool = True,
        checkpoint_seconds: float = CHECKPOINT_SECONDS) -> Path:
    """A new run; returns its output directory."""
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    if (output_dir / names.STORE_NAME).exists():
        raise RaygradError(
            f"--output-dir {output_dir}: already holds a run; choose another directory (results are never overwritten)"
        )
    if config.save_consolidated and Path(config.consolidated_path).exists():
        raise RaygradError(
            f"--save-consolidated {config.save_consolidated}: {config.consolidated_path} exists; results are "
            "never overwritten"
        )
    # Planning checks layers, sites and SAEs before Ray starts or weights load;
    # the samples and shards follow once the texts are read.
    plan = make_plan(config, 0)
    with WorkerPool(config, echo=echo) as pool:
        plan = plan.placed(config, pool.workers, pool.device)
        pool.start_workers(plan, config.seed)  # Ray actors load their model while the texts are read
        texts = _texts(config, echo)
        plan = dataclasses.replace(plan, samples=len(texts)).placed(config, pool.workers, pool.device)
        run_dir = output_dir / run_dir_name(config, plan, datetime.now().strftime("%Y%m%d_%H%M%S"))
        if run_dir.exists():
            raise RaygradError(
                f"--output-dir {output_dir}: {run_dir.name} already exists; results are never overwritten"
            )
        _check_memory(plan, pool)
        echo(plan.describe())
        echo(f"output   {run_dir}")
        run_dir.mkdir(parents=True)
        store = ResultStore.create(
            run_dir / names.STORE_NAME, plan.prefixes, len(plan.shards), plan.layers,
            {names.ATTR_CONFIG: config.to_dict(), names.ATTR_PLAN: plan.to_dict()}, plan.layer_sums,
        )
        _execute(plan, config, texts, store, pool, progress, checkpoint_seconds, time.perf_counter() - started,
                 echo)
    return run_dir


def resume(run_dir: Path, echo: Callable[[str], None] = log.info, progress: bool = True,
           checkpoint_seconds: float = CHECKPOINT_SECONDS, execution: dict | None = None) -> Path:
    """Continue a killed run from its last checkpoint. `execution` may change
    where it runs (EXECUTION_OPTIONS), never what it computes."""
    started = time.perf_counter()
    store_path = Path(run_dir) / names.STORE_NAME
    if not store_path.exists():
        raise RaygradError(f"--resume {run_dir}: no {names.STORE_NAME} in this directory")
    execution = execution or {}
    for name in execution:
        if name not in EXECUTION_OPTIONS:
            raise RaygradError(
                f"--resume {run_dir}: --{name.replace('_', '-')} would change what the run computes; a resumed "
                f"run keeps its own (only --{', --'.join(o.replace('_', '-') for o in EXECUTION_OPTIONS)} may change)"
            )
    store = ResultStore.open(store_path, writable=True)
    if store.attrs.get(names.ATTR_STATUS) == names.STATUS_COMPLETE:
        raise RaygradError(f"--resume {run_dir}: this run is already complete")
    config = dataclasses.replace(RunConfig.from_dict(store.attrs[names.ATTR_CONFIG]), **execution)
    saved = Plan.from_dict(store.attrs[names.ATTR_PLAN])
    texts = _texts(config, echo)
    if len(texts) != saved.samples:
        raise RaygradError(
            f"--resume {run_dir}: the dataset now yields {len(texts)} texts, the run was planned on {saved.samples}"
        )
    # Shards and batching stay as saved (the store counts those shards); where they run may change.
    workers = execution.get("workers", None if "address" in execution else saved.workers)
    with WorkerPool(config, workers, echo=echo) as pool:
        plan = dataclasses.replace(saved, workers=pool.workers, device=pool.device, device_request=config.device)
        pool.start_workers(plan, config.seed)
        _, done = store.totals()
        echo(plan.describe())
        echo(f"resuming {run_dir}: {int(done.sum())} of {len(done)} shards already done")
        _execute(plan, config, texts, store, pool, progress, checkpoint_seconds, time.perf_counter() - started, echo)
    return Path(run_dir)


def _check_memory(plan: Plan, pool: WorkerPool) -> None:
    """Refuse, before anything is written, a plan whose estimate exceeds the one GPU this
    process will use; Ray workers' devices are not known here, and a split model is not refused."""
    if pool.workers or not pool.device.startswith("cuda") or not plan.weight_bytes:
        return
    import torch

    from .memory import check_fits

    problem = check_fits(plan.memory(), torch.cuda.get_device_properties(0).total_memory, plan.model)
    if problem:
        raise RaygradError(problem)


def _texts(config: RunConfig, echo) -> list[str]:
    texts = load_texts(config.dataset, config.num_samples, text_column=config.text_column,
                       config=config.dataset_config, split=config.dataset_split, min_chars=config.min_chars)
    if len(texts) < config.num_samples:
        echo(f"warning: --num-samples {config.num_samples}: the dataset has only {len(texts)} texts "
             f"longer than {config.min_chars} characters; going on with {len(texts)}")
    return texts


def _execute(plan: Plan, config: RunConfig, texts: list[str], store: ResultStore, pool: WorkerPool,
             progress: bool, checkpoint_seconds: float, plan_seconds: float, echo) -> None:
    from .export import write_exports

    reducer = Reducer(store, checkpoint_seconds, progress)
    try:
        for result in pool.map([(i, texts[slice(*plan.shards[i])]) for i in reducer.todo]):
            reducer.add(result)
    except BaseException as err:  # a failed shard, Ctrl-C, no workers: keep what finished, say how to go on
        reducer.keep_finished()
        echo(f"stopped  after {int(reducer.done.sum())} of {len(reducer.done)} shards ({type(err).__name__}: "
             f"{err}); continue with: raygrad run --resume {store.path.parent}")
        raise
    finally:
        reducer.close()
    if not reducer.complete:
        raise RuntimeError("internal error: the worker pool returned before every shard was done")
    timing = reducer.timing(plan_seconds, {"worker_devices": sorted(set(pool.worker_devices.values()))})
    store.finalize(timing)
    totals = reducer.totals
    mean_loss = totals.loss_sum / max(totals.loss_tokens, 1)
    echo(f"done     {totals.loss_tokens} target tokens, mean loss {mean_loss:.4f} nats/token, "
         f"{timing['tokens_per_second']:.0f} tokens/s overall, "
         f"{timing['worker_tokens_per_second']:.0f} tokens/s per worker computing"
         + (f", batches of up to {reducer.batch_tokens} tokens" if reducer.batch_tokens else ""))
    write_exports(store.path.parent, extra_npz=config.consolidated_path)
