"""The driver of `raygrad ablate RUN` (DESIGN.md §8): the run's model (pinned), site, target and SAEs over
the run's own texts (its shards) or other ones, on the run's engine (raygrad.engine.execute: shards, Ray
workers, the exact merge, checkpoints, the lock, the progress bar), with raygrad.compute.ablation's
per-batch function. Everything is checked before anything is written.

RUN/ablations/<stem>/ holds the ablation's store while it runs (re-running the same command resumes it);
RUN/ablations/<stem>.json is the report once it is complete. A complete one is never overwritten: the
same command again writes <stem>_2.json."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import constants as names
from .analysis import ablation as reading
from .analysis.export import open_complete_run
from .cluster.pool import WorkerPool
from .compute.ablation import AblationSpec
from .config import RunConfig
from .engine import execute, plan_with_shards
from .errors import RaygradError
from .model.loading import loading_bars
from .model.pins import check_unchanged, pin_dataset
from .plan import Plan
from .store.files import replacing
from .store.lock import run_lock
from .store.zarr_store import DamagedStore, ResultStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """Which entries: exactly one of --features, --from-compare (with --k), --from-top (with --k)."""

    features: str | None = None
    from_compare: str | None = None
    from_top: bool = False
    k: int | None = None


@dataclass
class Ablation:
    """Everything resolved from the run and the options, before anything is written."""

    run_dir: Path
    config: RunConfig  # the run's, with the texts and execution options given
    plan: Plan  # the run's, restricted to the entries' layers, carrying the AblationSpec
    entries: list[tuple[int, int]]  # (model layer, index)
    mode: reading.Mode
    each: bool
    dataset: str | None  # None: the run's own texts (its shards)
    stem: str
    record: dict  # the store's ablation attribute: what a resume must match


def resolve(run_dir: Path, selection: Selection, mode: reading.Mode, each: bool, texts: dict,
            execution: dict, echo: Callable[[str], None] = log.info) -> Ablation:
    """Check the run, the entries, the mode and the texts; one line (RaygradError) for any problem."""
    run_dir = Path(run_dir)
    if not (run_dir / names.STORE_NAME).is_dir():
        raise RaygradError(f"RUN {run_dir}: no {names.STORE_NAME} here; give a run directory")
    store, config = open_complete_run(run_dir, "RUN")
    saved = Plan.from_dict(store.attrs[names.ATTR_PLAN])
    check_unchanged(saved, "ablating")
    what = "feature" if saved.target == "sae" else "dimension"
    entries, option = _entries(store, selection)
    reading.check_entries(entries, saved.layers, saved.width, option, what)
    totals, _ = store.totals()
    rows = [saved.layers.index(layer) for layer, _ in entries]
    if mode.name == "mean":
        if "values" not in saved.aggregate_by:
            raise RaygradError(f"--mode mean: RUN {run_dir} did not collect values (--aggregate-by values), so it "
                               "has no mean value to set; use zero or clamp=VALUE, or a run with values")
        values = reading.mean_values(totals, rows, [index for _, index in entries])
    else:
        values = [mode.clamp if mode.name == "clamp" else 0.0] * len(entries)
    dataset = texts.get("dataset", config.dataset) if texts else None  # other texts: named by their dataset
    if not texts:
        _check_same_texts(run_dir, config, saved)
    config = _ablation_config(config, texts, execution)
    layers = sorted({layer for layer, _ in entries})
    spec = AblationSpec(tuple(layers.index(layer) for layer, _ in entries), tuple(index for _, index in entries),
                        mode.name, tuple(values), each)
    plan = _restricted(saved, layers, spec, None if texts else saved.dataset_revision, config)
    record = {"run": str(run_dir.resolve()), "features": [list(e) for e in entries], "mode": mode.label,
              "each": each, "values": list(values), "texts": texts or None}
    stem = reading.file_stem(mode, entries, each, dataset)
    return Ablation(run_dir, config, plan, entries, mode, each, dataset, stem, record)


def _entries(store: ResultStore, selection: Selection) -> tuple[list[tuple[int, int]], str]:
    given = [name for name, value in (("--features", selection.features), ("--from-compare", selection.from_compare),
                                      ("--from-top", selection.from_top)) if value]
    if len(given) != 1:
        raise RaygradError("ablate: give exactly one of --features L:F[,L:F...], --from-compare DIR --k N, "
                           f"--from-top --k N ({'none' if not given else ' and '.join(given)} given)")
    if selection.features:
        if selection.k is not None:
            raise RaygradError("--k: goes with --from-compare or --from-top, not --features")
        return reading.parse_features(selection.features), f"--features {selection.features}"
    if selection.k is None:
        raise RaygradError(f"{given[0]}: give --k N, how many to ablate")
    if selection.from_compare:
        return reading.comparison_entries(Path(selection.from_compare), selection.k), \
            f"--from-compare {selection.from_compare}"
    entries, _ = reading.top_entries(store.committed_group(), selection.k)
    return entries, "--from-top"


def _check_same_texts(run_dir: Path, config: RunConfig, saved: Plan) -> None:
    """The run's own texts: a local dataset must still be the file the run read (each shard's rows are
    checked again by their fingerprints on the workers)."""
    pin = saved.dataset_revision or {}
    if pin.get("kind") == "local":
        now = pin_dataset(config.dataset)
        if now != pin:
            raise RaygradError(f"RUN {run_dir}: its dataset {config.dataset} changed since the run; its texts are not "
                               "the ones it measured (give --dataset to ablate on the file as it is now)")


def _ablation_config(config: RunConfig, texts: dict, execution: dict) -> RunConfig:
    """The run's configuration with the other texts' options and the execution options given."""
    try:
        return dataclasses.replace(config, **texts, **execution)
    except ValueError as err:
        raise RaygradError(str(err)) from None


def _restricted(saved: Plan, layers: list[int], spec: AblationSpec, dataset_revision: dict | None,
                config: RunConfig) -> Plan:
    """The run's plan for the entries' layers only, with the spec; shards kept for the run's own texts."""
    rows = [saved.layers.index(layer) for layer in layers]

    def pick(values):
        return [values[row] for row in rows] if values else values

    plan = dataclasses.replace(
        saved, layers=layers, module_paths=pick(saved.module_paths), saes=pick(saved.saes),
        sae_revisions=pick(saved.sae_revisions), aggregate_by=("gradients",), top_examples=0, position_stride=1,
        ablation=spec.to_dict(),
    )
    if dataset_revision is None:  # other texts: pinned now, shards planned when the pool is sized
        plan = dataclasses.replace(plan, shards=[], source=None, dataset_revision=pin_dataset(config.dataset))
    return plan


def _destination(ablation: Ablation) -> tuple[Path, bool]:
    """(the ablation's directory, whether to resume its store): the first of <stem>, <stem>_2, ... with
    no finished JSON whose directory is new or holds this same ablation, unfinished."""
    folder = ablation.run_dir / names.ABLATIONS_DIR
    for attempt in range(1, 1000):
        stem = ablation.stem if attempt == 1 else f"{ablation.stem}_{attempt}"
        if (folder / f"{stem}.json").exists():
            continue
        store = folder / stem / names.STORE_NAME
        if not store.exists():
            return folder / stem, False
        try:
            attrs = ResultStore.open(store).attrs
        except (DamagedStore, OSError, KeyError):  # damaged or half-created: not this one's to resume, leave it
            continue
        if attrs.get(names.ATTR_ABLATION) == ablation.record:
            return folder / stem, True
    raise RaygradError(f"RUN {ablation.run_dir}: 999 ablations named {ablation.stem} already exist")


def describe(ablation: Ablation) -> str:
    listed = ", ".join(f"{layer}:{index}" for layer, index in ablation.entries)
    texts = "the run's own texts (its shards)" if ablation.dataset is None else f"--dataset {ablation.dataset}"
    return "\n".join([f"ablate   {listed} ({len(ablation.entries)}), mode {ablation.mode.label}"
                      + (", jointly and each alone" if ablation.each else ", jointly"),
                      f"texts    {texts}"])


def dry_run(ablation: Ablation, echo: Callable[[str], None] = log.info) -> None:
    """Print what would run: the plan, the entries, the texts; nothing written, no Ray, no weights."""
    echo(describe(ablation))
    pool = WorkerPool(ablation.config, echo=echo)
    request = pool.dry()
    if ablation.plan.shards:
        echo(ablation.plan.placed(ablation.config, pool.workers, pool.device).describe())
    else:
        plan_with_shards(ablation.plan, ablation.config, pool, echo)
    directory, resume = _destination(ablation)
    echo(f"request  {request}")
    echo(f"dry run  nothing written, no Ray started, no weights loaded; would {'resume' if resume else 'write'} "
         f"{directory}")


def run(ablation: Ablation, echo: Callable[[str], None] = log.info, progress: bool = True) -> tuple[dict, Path]:
    """Compute the ablation (or resume it); returns (the report, its JSON file)."""
    started = time.perf_counter()
    directory, resume = _destination(ablation)
    echo(describe(ablation))
    directory.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    with run_lock(directory, "ablate", "RUN"), loading_bars(progress), \
            WorkerPool(ablation.config, echo=echo) as pool:
        plan = ablation.plan
        if resume:
            store = ResultStore.open(directory / names.STORE_NAME, writable=True)
            plan = Plan.from_dict(store.attrs[names.ATTR_PLAN]).placed(ablation.config, pool.workers, pool.device)
            done = store.shards_done()
            echo(plan.describe())
            echo(f"resuming {directory}: {int(done.sum())} of {len(done)} shards already done")
        else:
            plan = (plan.placed(ablation.config, pool.workers, pool.device) if plan.shards
                    else plan_with_shards(plan, ablation.config, pool, echo))
            if plan.shards and ablation.dataset is None:
                echo(plan.describe())
        # Every SAE of the listed layers in one pass: the intervention and the clean pass need them all.
        plan = dataclasses.replace(plan, sae_layers_per_pass=len(plan.layers))
        pool.start_workers(plan, ablation.config.seed)
        if not resume:
            variant_layers = [-1] + ([layer for layer, _ in ablation.entries] if ablation.each else [])
            store = ResultStore.create(directory / names.STORE_NAME, {}, len(plan.shards), variant_layers,
                                       # no ATTR_CONFIG: not a run (no per-dimension statistics to derive)
                                       {names.ATTR_PLAN: plan.to_dict(), names.ATTR_ABLATION: ablation.record},
                                       names.ABLATION_SUMS)
        json_path = directory.parent / f"{directory.name}.json"

        def finish(totals) -> None:
            result.update(reading.report(totals, ablation.mode, ablation.entries, ablation.each))
            saved = {**result, "run": ablation.record["run"], "texts": ablation.record["texts"],
                     "values_set": ablation.record["values"], "texts_paired": float(
                         totals.sums[names.ABLATED_TEXTS][0]), "raygrad_version": names.VERSION}
            with replacing(json_path) as handle:
                handle.write((json.dumps(saved, indent=2) + "\n").encode())

        if store.attrs.get(names.ATTR_STATUS) == names.STATUS_COMPLETE:  # stopped after finishing, before its JSON
            finish(store.totals()[0])
        else:
            execute(plan, ablation.config, store, pool, progress, time.perf_counter() - started, echo,
                    f"continue with the same raygrad ablate command (it resumes {directory})", finish)
    return result, json_path
