"""The driver: plan (shards as row ranges, from one streaming pass over the dataset),
run shards on the worker pool (each worker reads its own rows), reduce partial sums
into the store, finalize, export. The driver never holds the texts."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from . import constants as names
from .cluster.pool import WorkerPool
from .config import EXECUTION, MEASURED, SHARDS_PER_WORKER, RunConfig, dashed, fields_of, part_of, planned_fields
from .dataset import hub_parquet
from .dataset.formats import describe_source
from .dataset.shards import plan_shards
from .dataset.text import absolute_if_local
from .errors import RaygradError, first_line
from .model.loading import loading_bars
from .model.pins import check_unchanged, dataset_commit, model_commit
from .plan import Plan, make_plan, run_dir_name
from .store import topk
from .store.lock import LockTaken, run_lock
from .store.reducer import Reducer
from .store.zarr_store import ResultStore

log = logging.getLogger(__name__)

BATCHING_OPTIONS = ("batch_size", "tokens_per_batch")  # give one anew on a resume and the other is dropped


def run(config: RunConfig, echo: Callable[[str], None] = log.info, progress: bool = True) -> Path:
    """A new run; returns its output directory."""
    started = time.perf_counter()
    config = dataclasses.replace(config, dataset=absolute_if_local(config.dataset))  # what --resume reads
    output_dir = Path(config.output_dir)
    _check_output_paths(config)
    # Resolving the model, sites, SAEs and pins checks them and the dataset's file before weights load
    # (beside Ray's start, _resolved_beside_pool). Once the pool is sized (batching), the workers start
    # and load the model while one pass over the dataset plans the shards: they get everything but the
    # shards, which reach them as work items (an actor Ray restarts is built again from what it got).
    source = _source(config)
    with contextlib.ExitStack() as locked, loading_bars(progress), _resolved_beside_pool(config, echo) as (
            resolved, pool):
        pool.start_workers(_pinned_source(resolved.placed(config, pool.workers, pool.device), source), config.seed)
        plan = _whole_plan(resolved, config, source, pool, echo)
        run_dir = _new_run_dir(output_dir, run_dir_name(config, plan, datetime.now().strftime("%Y%m%d_%H%M%S")))
        locked.enter_context(run_lock(run_dir, "run", "--output-dir"))  # from now until the run ends or stops
        echo(f"output   {run_dir}")
        try:
            store = ResultStore.create(
                run_dir / names.STORE_NAME, plan.prefixes, len(plan.shards), plan.layers,
                {names.ATTR_CONFIG: config.to_dict(), names.ATTR_PLAN: plan.to_dict()}, plan.layer_sums,
                plan.top_examples, tuple(plan.example_prefixes), topk.score_dtype(plan.dtype),
            )
        except OSError as err:
            raise RaygradError(f"--output-dir {output_dir}: cannot create the store ({_os_reason(err)})") from None
        execute(plan, config, store, pool, progress, time.perf_counter() - started, echo)
    return run_dir


@contextlib.contextmanager
def _resolved_beside_pool(config: RunConfig, echo) -> Iterator[tuple[Plan, WorkerPool]]:
    """-> (the plan resolved without shards, the entered pool). The pool is entered in this thread
    (where it uses Ray, it starts or joins it there: ray.init wants the main thread) while another
    resolves the model, sites, SAEs and pins: the two take seconds each, mostly waiting on other
    processes and files (issue 28). Either failing stops the run with its own line, the resolution's
    first (as when it ran before Ray), and a Ray started is stopped."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="raygrad-resolve") as beside, \
            contextlib.ExitStack() as entered:
        resolving = beside.submit(make_plan, config, 0)
        try:
            pool = entered.enter_context(WorkerPool(config, echo=echo))
        except BaseException:
            resolving.result()  # a bad model or dataset is said before a pool that cannot start
            raise
        yield resolving.result(), pool


def resume(run_dir: Path, echo: Callable[[str], None] = log.info, progress: bool = True,
           execution: dict | None = None) -> Path:
    """Continue a killed run from its last checkpoint. `execution` may change any option
    of the config's execution part (where and how it runs), never what it measures nor what it
    exports. Holds the run's lock throughout; one line when another command holds it."""
    started = time.perf_counter()
    store_path = Path(run_dir) / names.STORE_NAME
    if not store_path.exists():
        raise RaygradError(f"--resume {run_dir}: no {names.STORE_NAME} in this directory")
    execution = execution or {}
    _check_execution(run_dir, execution)
    # Locked before the store opens: opening it for writing replays a committed checkpoint.
    with run_lock(Path(run_dir), "run --resume", "--resume"):
        return _resume(run_dir, store_path, execution, echo, progress, started)


def _resume(run_dir: Path, store_path: Path, execution: dict, echo, progress: bool, started: float) -> Path:
    store = ResultStore.open(store_path, writable=True)
    _refuse_comparison(run_dir, store)
    config = RunConfig.from_dict(store.attrs[names.ATTR_CONFIG])
    if store.attrs.get(names.ATTR_STATUS) == names.STATUS_COMPLETE:
        return _complete_exports(Path(run_dir), config, echo)
    config, saved, workers = _resumed_config(run_dir, store, execution)
    _planned_notes(saved, execution, echo)
    # The dataset is not read here: each worker checks its shard's rows against the plan's fingerprint.
    # Shards stay as saved (the store counts those shards); where and how they run may change.
    with loading_bars(progress), WorkerPool(config, workers, echo=echo) as pool:
        plan = _resumed_plan(saved, config, pool.workers, pool.device, execution)
        pool.start_workers(plan, config.seed)
        done = store.shards_done()
        echo(plan.describe())
        echo(f"resuming {run_dir}: {int(done.sum())} of {len(done)} shards already done")
        execute(plan, config, store, pool, progress, time.perf_counter() - started, echo)
    return Path(run_dir)


def dry_run(config: RunConfig, echo: Callable[[str], None] = log.info) -> None:
    """`raygrad run --dry-run`: the whole plan, printed, as a run would make it. Writes nothing, starts
    no Ray, loads no weights: it reads the model's config and tokenizer, and the dataset once (the
    streaming pass that plans the shards)."""
    config = dataclasses.replace(config, dataset=absolute_if_local(config.dataset))
    _check_output_paths(config, create=False)
    plan = make_plan(config, 0)
    source = _source(config)
    pool = WorkerPool(config, echo=echo)
    request = pool.dry()
    plan = _whole_plan(plan, config, source, pool, echo)
    echo("\n".join(_dry_run_lines(plan, list(range(len(plan.shards))), request, config.dataset)))


def dry_run_resume(run_dir: Path, execution: dict | None = None, echo: Callable[[str], None] = log.info) -> None:
    """`raygrad run --dry-run --resume RUN`: what a resume would do and what remains. Reads the store's
    last committed state; takes no lock, replays nothing, changes nothing."""
    store_path = Path(run_dir) / names.STORE_NAME
    if not store_path.exists():
        raise RaygradError(f"--resume {run_dir}: no {names.STORE_NAME} in this directory")
    execution = execution or {}
    _check_execution(run_dir, execution)
    store = ResultStore.open(store_path)
    _refuse_comparison(run_dir, store)
    if store.attrs.get(names.ATTR_STATUS) == names.STATUS_COMPLETE:
        from .analysis.export import check_exports

        problems = check_exports(Path(run_dir))
        echo(f"dry run  {run_dir} is complete; " + (f"its exports are not ({problems[0]}): --resume would write "
                                                    "them again" if problems else
                                                    "its exports are whole: --resume has nothing to do"))
        return
    config, saved, workers = _resumed_config(run_dir, store, execution)
    _planned_notes(saved, execution, echo)
    pool = WorkerPool(config, workers, echo=echo)
    request = pool.dry()
    plan = _resumed_plan(saved, config, pool.workers, pool.device, execution)
    done = store.shards_done()
    todo = [index for index, finished in enumerate(done) if not finished]
    echo(plan.describe())
    echo(f"resume   {run_dir}: {len(done) - len(todo)} of {len(done)} shards done, {len(todo)} left")
    echo("\n".join(_dry_run_lines(plan, todo, request, None)))


def _whole_plan(resolved: Plan, config: RunConfig, source: dict, pool: WorkerPool, echo) -> Plan:
    """The resolved plan placed on the sized pool, with its shards (one pass over the dataset), checked
    against this machine's GPU and printed: what a run starts its workers with and --dry-run shows."""
    plan = _plan_shards(resolved.placed(config, pool.workers, pool.device), config, source, pool.workers,
                        pool.device, echo)
    _check_memory(plan, pool.workers, pool.device)
    echo(plan.describe())
    return plan


def _source(config: RunConfig) -> dict:
    """The dataset the configuration names, as the shard planner and the workers read it."""
    return describe_source(config.dataset, config.text_column, config.dataset_config, config.dataset_split,
                           config.min_chars, config.prompt_column, config.completion_column)


def _refuse_comparison(run_dir: Path, store: ResultStore) -> None:
    if names.ATTR_CONFIG not in store.attrs:
        raise RaygradError(f"--resume {run_dir}: a comparison (raygrad compare), not a run; nothing to resume")


def _dry_run_lines(plan: Plan, todo: list[int], request: str, dataset: str | None) -> list[str]:
    """What --dry-run adds to the plan's lines, for the shards `todo`: counted and estimated sizes,
    the resources asked for, the SAEs each worker loads and the partials the driver will receive."""
    shards = [plan.shards[index] for index in todo]
    left = " left" if dataset is None else ""
    texts = sum(shard.texts for shard in shards)
    tokens = sum(shard.est_tokens for shard in shards)
    partial, layers = plan.partial_bytes(), len(plan.layers)
    per_shard = (f"{min(s.texts for s in shards):,}-{max(s.texts for s in shards):,} texts and "
                 f"{min(s.est_tokens for s in shards):,}-{max(s.est_tokens for s in shards):,} estimated target "
                 f"tokens each" if shards else "none")
    widths = ", ".join(f"{prefix} {width:,}" for prefix, width in plan.prefixes.items())
    lines = [
        "dry run  nothing written, no Ray started, no weights loaded",
        f"{'texts' + left:<8} {texts:,} (counted "
        + (f"in one pass over {dataset}, rows 0-{plan.shards[-1].row_stop - 1})" if dataset else
           "when the run was planned)"),
        f"{'tokens' + left:<8} about {tokens:,} target tokens (estimated: {plan.tokens_per_char:.3f} tokens per "
        f"character, from the tokenizer on the first texts; each text cut to {plan.max_length} tokens)",
        f"{'shards' + left:<8} {len(shards)}: {per_shard}",
        f"request  {request}",
        "SAEs     " + (f"each worker loads {layers} x {_size(plan.sae_bytes_per_layer)} = {_size(plan.sae_bytes)} "
                        f"({plan.sae_dtype}, encoder and decoder; those not in a pass wait in CPU memory)"
                        if plan.sae_bytes else "none (--target mlp)"),
        f"partials {len(shards)} (one per shard) x {_size(partial)} = {_size(partial * len(shards))} to the driver "
        f"(float64: 3 sums x {layers} layers x ({widths}), and per-layer counts"
        + (f"; --top-examples tables {_size(plan.example_bytes())}" if plan.top_examples else "") + ")",
    ]
    return lines


def _size(n: int) -> str:
    """Bytes, readably: 1536 -> '1.5 KiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _check_execution(run_dir: Path, execution: dict) -> None:
    """Refuse, with one line, a resume option outside the config's execution part: a measured one would
    change what the run computes, an export one what it writes (raygrad export derives other sets)."""
    allowed = fields_of(EXECUTION)
    for name in execution:
        part = part_of(name)
        if part == MEASURED:
            raise RaygradError(
                f"--resume {run_dir}: --{dashed(name)} would change what the run computes; a resumed "
                f"run keeps its own (only --{', --'.join(dashed(o) for o in allowed)} may change)"
            )
        if part != EXECUTION:
            raise RaygradError(
                f"--resume {run_dir}: --{dashed(name)} would change what the run exports; a resumed run writes the "
                f"exports it was started with (derive others from the complete run with raygrad export {run_dir})"
            )


def _planned_notes(saved: Plan, execution: dict, echo) -> None:
    """One line for each option given that takes effect only when shards are planned: the resume keeps
    the saved shards (the store counts them), so it goes on without it."""
    for name in planned_fields():
        if name in execution:
            echo(f"note: --{dashed(name)} {execution[name]} applies when a run plans its shards; this run's "
                 f"{len(saved.shards)} shards were planned when it started and stay as they are")


def _resumed_config(run_dir: Path, store: ResultStore, execution: dict) -> tuple[RunConfig, Plan, int | None]:
    """An incomplete run's configuration with `execution` applied, its saved plan (pins checked), and
    the workers to ask for (None: the pool's default)."""
    config = RunConfig.from_dict(store.attrs[names.ATTR_CONFIG])
    if execution.get("workers") == 0:  # in this process now: the saved run's Ray options no longer apply
        execution = {"address": None, "gpus_per_worker": None, **execution}
    for given, other in (BATCHING_OPTIONS, BATCHING_OPTIONS[::-1]):
        if given in execution:  # one batching given anew replaces the saved one (both given: refused)
            execution = {other: None, **execution}
    # What it measures and exports stays; the execution part is the saved one with `execution` applied.
    config = RunConfig.from_parts(config.measured(), dataclasses.replace(config.execution(), **execution),
                                  config.export())
    saved = Plan.from_dict(store.attrs[names.ATTR_PLAN])
    check_unchanged(saved, "resuming")  # the pinned model and SAEs, before the dataset is read
    hub_parquet.check_unchanged(saved, "resuming")  # a hub dataset's pinned parquet commit is still there
    if saved.source is None:
        raise RaygradError(f"--resume {run_dir}: planned by an older raygrad, whose shards held texts rather than "
                           "rows of the dataset; start a new run")
    return config, saved, execution.get("workers", None if "address" in execution else saved.workers)


def _resumed_plan(saved: Plan, config: RunConfig, workers: int, device: str, execution: dict) -> Plan:
    """The saved plan, placed where the resume runs. Its shards stay; so does its batching unless a
    batching option was given anew (resumed unchanged, a run's sums stay those of an undisturbed run)."""
    plan = saved.placed(config, workers, device)
    if any(name in execution for name in BATCHING_OPTIONS):
        return plan
    return dataclasses.replace(plan, batching=saved.batching, batch_size=saved.batch_size,
                               tokens_per_batch=saved.tokens_per_batch)


def _complete_exports(run_dir: Path, config: RunConfig, echo) -> Path:
    """--resume on a complete run: regenerate exports that are missing or damaged."""
    from .analysis.export import check_exports

    problems = check_exports(run_dir)
    if not problems:
        raise RaygradError(f"--resume {run_dir}: this run is already complete, and its exports are whole")
    echo(f"resuming {run_dir}: the run is complete; its exports are not ({problems[0]}), writing them again")
    _export(run_dir, config)
    return run_dir


def _check_output_paths(config: RunConfig, create: bool = True) -> None:
    """Refuse, before anything loads, output paths that cannot be written or would overwrite results.
    `create`: make --output-dir and try a file there; else (a dry run) only look."""
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RaygradError(f"--output-dir {output_dir}: is a file, not a directory")
    if (output_dir / names.STORE_NAME).exists():
        raise RaygradError(
            f"--output-dir {output_dir}: already holds a run; choose another directory (results are never overwritten)"
        )
    if create:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=output_dir):
                pass
        except OSError as err:
            raise RaygradError(f"--output-dir {output_dir}: cannot write there ({_os_reason(err)})") from None
    if config.save_consolidated:
        option = f"--save-consolidated {config.save_consolidated}"
        target = Path(config.consolidated_path)
        if target.exists():
            raise RaygradError(f"{option}: {target} exists; results are never overwritten")
        parent = target.parent
        while not parent.exists():  # the export creates the missing directories in the nearest existing one
            parent = parent.parent
        if not parent.is_dir():
            raise RaygradError(f"{option}: {parent} is a file, not a directory")
        if create:  # written only after the whole run: a path that cannot be written is refused before it
            try:
                with tempfile.TemporaryFile(dir=parent):
                    pass
            except OSError as err:
                raise RaygradError(f"{option}: cannot write in {parent} ({_os_reason(err)}); give a path in a "
                                   "writable directory") from None


def _new_run_dir(output_dir: Path, name: str) -> Path:
    """`name`, or `name_2`, `name_3`, ... when a run started in the same second took it."""
    for attempt in range(1, 1000):
        run_dir = output_dir / (name if attempt == 1 else f"{name}_{attempt}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
        except OSError as err:
            raise RaygradError(f"--output-dir {output_dir}: cannot create {run_dir.name} ({_os_reason(err)})") from None
    raise RaygradError(f"--output-dir {output_dir}: 999 runs named {name} already exist")


def _os_reason(err: OSError) -> str:
    return err.strerror or str(err)


def _check_memory(plan: Plan, workers: int, device: str) -> None:
    """Refuse, before anything is written, a plan whose estimate exceeds the one GPU this
    process will use; Ray workers check their own GPU (the driver cannot see it), and a
    split model is not refused."""
    if workers or not device.startswith("cuda") or not plan.weight_bytes:
        return
    import torch

    problem = plan.fit_problem(torch.cuda.get_device_properties(0).total_memory)
    if problem:
        raise RaygradError(problem)


def _plan_shards(plan: Plan, config: RunConfig, source: dict, workers: int, device: str, echo) -> Plan:
    """The plan with its shards: one streaming pass over the dataset (shards.py), sized for this pool."""
    plan = _pinned_source(plan, source)
    source = plan.source
    layout = plan_shards(source, config.sample_limit, _tokenizer(plan), config.max_length,
                         shard_texts=config.shard_size, token_budget=config.shard_tokens(device),
                         min_shards=SHARDS_PER_WORKER * workers)
    if config.sample_limit and layout.samples < config.sample_limit:
        echo(f"warning: --num-samples {config.num_samples}: the dataset has only {layout.samples} texts "
             f"longer than {config.min_chars} characters; going on with {layout.samples}")
    return dataclasses.replace(plan, samples=layout.samples, skipped_texts=layout.skipped, shards=layout.shards,
                               source=source, tokens_per_char=layout.tokens_per_char)


def _pinned_source(plan: Plan, source: dict) -> Plan:
    """The plan reading `source` at the dataset revision every node reads (before its shards are planned)."""
    if source.get("hub"):  # a hub id, resolved with its source: the plan pins the commit its files are read at
        plan = dataclasses.replace(plan, dataset_revision=source["hub"])
    if source["kind"] == "datasets":  # every node reads the pinned commit
        source = {**source, "revision": dataset_commit(plan)}
    return dataclasses.replace(plan, source=source)


def _tokenizer(plan: Plan):
    """The model's tokenizer alone (no weights): the shards' token estimates."""
    from .model.loading import load_tokenizer

    return load_tokenizer(plan.model, plan.model_path, model_commit(plan))


def plan_with_shards(resolved: Plan, config: RunConfig, pool: WorkerPool, echo) -> Plan:
    """`resolved` placed on the sized pool with shards planned from `config`'s dataset, checked and
    printed, as a run's (raygrad ablate on other texts)."""
    return _whole_plan(resolved, config, _source(config), pool, echo)


def execute(plan: Plan, config: RunConfig, store: ResultStore, pool: WorkerPool, progress: bool,
            plan_seconds: float, echo, resume_hint: str | None = None, finish: Callable | None = None) -> None:
    """A plan's shards on the pool: the reducer, checkpoints and finalize. Another command (raygrad
    ablate) gives its own `resume_hint`, and `finish(totals)` replaces the run's summary line and exports."""
    reducer = Reducer(store, config.checkpoint_seconds, progress)
    resume_hint = resume_hint or f"continue with: raygrad run --resume {store.run_dir}"
    try:
        # each shard a reference, (number, source, row range): its worker reads the rows
        work = [(i, plan.source, plan.shards[i]) for i in reducer.todo]
        for result in pool.map(work):
            reducer.add(result)
    except LockTaken:  # the run is another process's now: nothing more is written, and it is not ours to resume
        echo(f"stopped  after {int(reducer.saved)} of {len(reducer.done)} shards saved by this process; the run "
             "goes on in the process that took its lock over")
        raise
    except BaseException as err:  # a failed shard, Ctrl-C, no workers: keep what finished, say how to go on
        try:
            reducer.keep_finished()
        except Exception as failed:  # whatever stops the last checkpoint (a full disk, a lock taken over):
            # the one before it stands; the original error and the hint still follow
            if not isinstance(err, OSError):  # a failing disk is said once, by the error below
                echo(f"warning: the last checkpoint could not be written ({type(failed).__name__}: "
                     f"{first_line(failed)}); the one before it stands")
        echo(f"stopped  after {int(reducer.saved)} of {len(reducer.done)} shards saved ({type(err).__name__}: "
             f"{err}); {resume_hint}")
        if isinstance(err, OSError):  # a full or failing disk while checkpointing
            raise RaygradError(f"{store.path}: checkpoint failed ({_os_reason(err)}); free space, then "
                               f"{resume_hint}") from None
        raise
    finally:
        reducer.close()
    if not reducer.complete:
        raise RuntimeError("internal error: the worker pool returned before every shard was done")
    timing = reducer.timing(plan_seconds, {"worker_devices": sorted(set(pool.worker_devices.values())),
                                           **pool.clocks.record()})
    try:
        store.finalize(timing)
    except OSError as err:
        raise RaygradError(f"{store.path}: finishing the run failed ({_os_reason(err)}); free space, then "
                           f"{resume_hint}") from None
    except LockTaken:
        raise  # the process that took the lock over finishes the run
    except BaseException as err:  # every shard is saved: a resume only finalizes
        echo(f"stopped  with every shard saved, while finishing the run ({type(err).__name__}: {err}); "
             f"{resume_hint}")
        raise
    totals = reducer.totals
    if finish is not None:
        finish(totals)
        return
    mean_loss = totals.loss_sum / max(totals.loss_tokens, 1)
    echo(f"done     {totals.loss_tokens} target tokens, mean loss {mean_loss:.4f} nats/token, "
         f"{timing['tokens_per_second']:.0f} tokens/s overall, "
         f"{timing['worker_tokens_per_second']:.0f} tokens/s per worker computing"
         + (f", batches of up to {reducer.batch_tokens} tokens" if reducer.batch_tokens else ""))
    _export(store.run_dir, config)


def _export(run_dir: Path, config: RunConfig) -> None:
    from .analysis.export import write_exports

    try:
        write_exports(run_dir, extra_npz=config.consolidated_path)
    except OSError as err:
        raise RaygradError(f"{run_dir}: writing the exports failed ({_os_reason(err)}); the results are safe in "
                           f"{names.STORE_NAME}: free space, then raygrad run --resume {run_dir}") from None
