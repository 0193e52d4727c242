"""Command line: `raygrad run | export | info | top | compare`. Options come from RunConfig's
fields (each also accepted in the original scripts' underscore spelling)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import signal
import sys
import typing
from pathlib import Path
from typing import Literal

import click

from . import constants as names
from .config import (
    EXECUTION,
    MEASURED,
    RunConfig,
    field_choices,
    field_type,
    fields_of,
    is_ascii_count,
    planned_fields,
    refuse_url,
)
from .errors import RaygradError, Terminated, raise_terminated
from .store.lock import run_lock


class _Integer(click.ParamType):
    """An integer in ASCII digits, with an optional sign: click.INT takes whatever int() reads, Arabic-Indic
    and full-width digits or '1_000' included."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):  # a default
            return value
        text = str(value).strip()
        if is_ascii_count(text[1:] if text[:1] in ("-", "+") else text):
            return int(text)
        self.fail(f"{value}: must be an integer written in ASCII digits 0-9", param, ctx)


INTEGER = _Integer()


# What a terminal acts on rather than shows: C0 and C1 control characters and DEL (ESC starts the ANSI
# colour and OSC title sequences), line and paragraph separators, and bidirectional marks and overrides
# (they reorder the text after them). Newlines stay: the commands print lines.
_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with each control character escaped as repr writes it (ESC as \\x1b, U+202E as \\u202e):
    dataset texts, column names, paths and a lock file's record reach the terminal as text."""
    return _CONTROLS.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), text)


def _say(text="", err: bool = False, nl: bool = True) -> None:
    """click.echo of `text` made printable: every line raygrad prints goes through here."""
    click.echo(printable(str(text)), err=err, nl=nl)


class _PrintableFormatter(logging.Formatter):
    """Log lines (warnings on stderr) made printable like the rest."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def _help(name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(RunConfig) if f.name == name)


def _config_options(func, only: tuple[str, ...] | None = None):
    for f in reversed(dataclasses.fields(RunConfig)):
        if only is not None and f.name not in only:
            continue
        dashed, underscored = f"--{f.name.replace('_', '-')}", f"--{f.name}"
        spellings = [dashed] if dashed == underscored else [dashed, underscored]
        help_text = f.metadata["help"]
        hint = field_type(f.name)
        if hint is bool and f.default:  # on unless turned off: --plots/--no-plots
            option = click.option(f"{dashed}/--no-{dashed[2:]}", f.name, default=True, help=help_text)
        elif hint is bool:
            option = click.option(*spellings, f.name, is_flag=True, default=f.default, help=help_text)
        elif f.metadata.get("multiple"):
            option = click.option(*spellings, f.name, multiple=True, default=f.default, show_default=True,
                                  help=help_text)
        else:
            choices = field_choices(f)
            words = any(typing.get_origin(arg) is Literal for arg in typing.get_args(hint))  # 'all' or N: str
            kind = click.Choice(choices) if choices else str if words else next(
                (t for t in (int, float) if t in (hint, *typing.get_args(hint))), str)
            kind = INTEGER if kind is int else kind
            option = click.option(*spellings, f.name, type=kind, default=f.default, show_default=True,
                                  help=help_text)
        func = option(func)
    return func


@click.group()
@click.version_option(package_name="raygrad")
def cli() -> None:
    """How strongly each dimension of each layer affects a causal LM's next-token loss."""


@cli.command()
@_config_options
@click.option("--model_name", "model_alias", default=None, hidden=True, help="Original spelling of --model.")
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue a killed run from its directory (or rewrite a complete run's missing exports). Its "
                   "options are read from the run; only those that change where and how it executes may be given "
                   f"anew: --{', --'.join(f.replace('_', '-') for f in fields_of(EXECUTION))} (--"
                   f"{', --'.join(f.replace('_', '-') for f in planned_fields())} only notes that the saved shards "
                   "stay).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars (the run's and the weights' loading).")
@click.option("--dry-run", is_flag=True,
              help="Print the whole plan and exit: texts (counted), target tokens (estimated), shards, workers "
                   "and the resources asked for, memory per worker, SAE bytes, partial traffic. Writes nothing, "
                   "starts no Ray, loads no weights (it reads the model's config and tokenizer, and the dataset "
                   "once). With --resume: what remains.")
@click.pass_context
def run(ctx, model_alias, resume, no_progress, dry_run, **options) -> None:
    """Aggregate loss gradients over a dataset for every selected layer."""
    from click.core import ParameterSource

    if model_alias:
        options["model"] = model_alias
    # A bad option is one line before the engine's imports (torch, transformers: seconds) load.
    refuse_url("--resume", resume)
    config = None if resume else RunConfig(**options)
    from . import engine

    if resume:
        given = {name: value for name, value in options.items()
                 if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE or
                 (name == "model" and model_alias)}
        if dry_run:
            engine.dry_run_resume(Path(resume), execution=given, echo=_say)
            return
        run_dir = engine.resume(Path(resume), echo=_say, progress=not no_progress, execution=given)
    elif dry_run:
        engine.dry_run(config, echo=_say)
        return
    else:
        run_dir = engine.run(config, echo=_say, progress=not no_progress)
    _say(f"results  {run_dir}")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--save-outputs/--no-save-outputs", default=None,
              help="Write per-layer .npy files and plots (default: as the run asked).")
@click.option("--plots/--no-plots", default=None,
              help="With the .npy files, draw the plots (default: as the run asked).")
@click.option("--aggregation-mode", "--aggregation_mode", "aggregation_mode", default=None,
              help=_help("aggregation_mode") + " Given: a new export set.")
@click.option("--power", type=float, default=None, help=_help("power") + " Given: a new export set.")
@click.option("--normalize-mode", "--normalize_mode", "normalize_mode", default=None,
              help=_help("normalize_mode") + " Given: a new export set.")
@click.option("--name", default=None,
              help=f"Name of the new export set in RUN_DIR/{names.EXPORT_SETS_DIR}/ (default: from its options, "
                   "e.g. mean_abs-std_power2_norm_sum_abs); an existing one is never overwritten.")
def export(run_dir, save_outputs, plots, aggregation_mode, power, normalize_mode, name) -> None:
    """Regenerate every export of RUN_DIR from its Zarr store, or derive a new export set."""
    from .analysis.export import write_export_set, write_exports

    _store_of(run_dir)
    options = {key: value for key, value in (("aggregation_mode", aggregation_mode), ("power", power),
                                             ("normalize_mode", normalize_mode)) if value is not None}
    with run_lock(Path(run_dir), "export"):  # it writes into RUN_DIR: not while another command does
        if options or name is not None:
            where, written = write_export_set(Path(run_dir), options, name, with_outputs=save_outputs,
                                              with_plots=plots)
        else:
            where, written = run_dir, write_exports(Path(run_dir), with_outputs=save_outputs, with_plots=plots)
    _say(f"wrote {len(written)} files in {where}")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def info(run_dir) -> None:
    """Print a run's status, progress, exports, plan and timing (after verifying its store)."""
    from .analysis.export import check_exports
    from .analysis.sae_quality import sae_quality
    from .store.zarr_store import ResultStore

    store = ResultStore.open(_store_of(run_dir))
    attrs = store.attrs
    if names.ATTR_CONFIG not in attrs:  # a comparison (raygrad compare): what it compared
        _say(_readable_json({names.ATTR_STATUS: attrs.get(names.ATTR_STATUS),
                             "store": "every array matches its recorded digest",
                             names.ATTR_COMPARE: attrs.get(names.ATTR_COMPARE)}))
        return
    done = store.shards_done()
    quality = sae_quality(store)
    complete = attrs.get(names.ATTR_STATUS) == names.STATUS_COMPLETE
    exports = (check_exports(Path(run_dir)) or "whole") if complete else "not written (the run is not complete)"
    _say(_readable_json({
        names.ATTR_STATUS: attrs.get(names.ATTR_STATUS),
        "store": "every array matches its checkpoint digest",
        "shards_done": f"{int(done.sum())} of {len(done)}",
        "exports": exports,
        names.ATTR_PLAN: attrs.get(names.ATTR_PLAN),
        names.ATTR_TIMING: attrs.get(names.ATTR_TIMING),
        # per layer: FVU, mean L0, and (splice modes) the loss with the SAE spliced in
        **({"sae_quality": quality} if quality is not None else {}),
    }))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--trust-unrecorded", is_flag=True,
              help="A store written before raygrad recorded digests (no checkpoint_state.json): record what it "
                   "holds now as its state. Only for a store you know to be whole.")
def repair(run_dir, trust_unrecorded) -> None:
    """Rebuild what can be rebuilt from a complete run's verified sums: the derived statistics, then every export."""
    from .analysis.export import write_exports
    from .store.zarr_store import ResultStore

    store_path = _store_of(run_dir)
    with run_lock(Path(run_dir), "repair"):  # not while a run, a resume or an export writes it
        store = ResultStore.open(store_path, writable=True, verify=False)
        if names.ATTR_CONFIG not in store.attrs:
            raise RaygradError(f"RUN_DIR {run_dir}: a comparison (raygrad compare), not a run; nothing to repair "
                               "(a comparison is written whole: run raygrad compare again)")
        if trust_unrecorded:
            store.seal_unrecorded()
        rebuilt = store.rebuild_means()
        written = write_exports(Path(run_dir))
    _say(f"rebuilt {len(rebuilt)} derived statistics from the verified sums and wrote {len(written)} files "
         f"in {run_dir}")


def _readable_json(value, depth: int = 0) -> str:
    """JSON indented by object, with a list of values or of lists on one line (a
    run's layer indices, its shards, a per-layer statistic): `info` reads on one screen."""
    pad, end = "  " * (depth + 1), "  " * depth
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(str(key))}: {_readable_json(item, depth + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{end}}}"
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        return "[\n" + ",\n".join(f"{pad}{_readable_json(item, depth + 1)}" for item in value) + f"\n{end}]"
    return json.dumps(value)


def _store_of(run_dir: str) -> Path:
    store = Path(run_dir) / names.STORE_NAME
    if not store.is_dir():
        raise RaygradError(f"RUN_DIR {run_dir}: no {names.STORE_NAME} here")
    return store


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--layer", type=INTEGER, default=None, help="One layer (default: every layer of the run).")
@click.option("-k", "--k", type=INTEGER, default=20, show_default=True, help="Entries per layer.")
@click.option("--by", default="mean_abs", show_default=True,
              help="Statistic to rank by (README \"Names\"): mean_abs, std, grad_mean_sq, value_mean_abs, "
                   "sem_attribution, site_grad_mean_abs, ...")
def top(run_dir, layer, k, by) -> None:
    """The top features (or dimensions) per layer, largest magnitude first."""
    from .analysis.top import format_rows, top_features

    _say(format_rows(top_features(run_dir, layer, k, by), by))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--layer", type=INTEGER, required=True, help="Model layer (one of the run's).")
@click.option("--feature", type=INTEGER, required=True,
              help="SAE feature, or the site dimension for --target mlp runs (0-based).")
@click.option("--by", default="gradients", show_default=True,
              type=click.Choice(list(names.EXAMPLE_KINDS)), help="Which kind's examples (the run must collect it).")
@click.option("-k", "--k", type=INTEGER, default=None, help="Examples to show, best first (default: all the run kept).")
@click.option("--context", type=INTEGER, default=8, show_default=True, help="Tokens of context before and after.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list, best first.")
def examples(run_dir, layer, feature, by, k, context, as_json) -> None:
    """The tokens where a feature's score (gradient, attribution or value) is largest in |score|, with the
    token each predicts and the text around it, re-read from the dataset (needs a run with --top-examples)."""
    from .analysis.examples import RunExamples, format_examples

    run = RunExamples(run_dir)
    found = run.examples(layer, feature, by, k, context)
    unfinished = run.unfinished()
    if unfinished:  # on stderr: --json's output stays JSON
        _say(f"warning: {unfinished}", err=True)
    # Texts come from the dataset: format_examples escapes their line breaks, _say every other control
    # character; json.dumps escapes them all (\u001b).
    _say(json.dumps([example.to_dict() for example in found], indent=1) if as_json
         else format_examples(found, layer, feature, by))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", default=None,
              help="The page, a .html file in an existing directory (default: RUN_DIR/report.html); an existing "
                   "page is replaced.")
@click.option("--by", default=None,
              help="Statistic to rank features by: default mean_abs of --kind for a run (largest |value| first), "
                   "welch_t_abs of --kind for a comparison (A: largest, B: smallest); or any `top --by` name.")
@click.option("-k", "--k", type=INTEGER, default=10, show_default=True,
              help="Features per layer (per side for a comparison).")
@click.option("--examples", "num_examples", type=INTEGER, default=5, show_default=True,
              help="Contexts per feature (at most the run's --top-examples K).")
@click.option("--kind", default="gradients", show_default=True, type=click.Choice(list(names.EXAMPLE_KINDS)),
              help="Whose statistics and examples (the run must collect it).")
@click.option("--context", type=INTEGER, default=8, show_default=True, help="Tokens of context before and after.")
def report(run_dir, output, by, k, num_examples, kind, context) -> None:
    """One self-contained HTML page of a run (needs --top-examples) or a comparison: per layer a histogram,
    the top features with their statistics and Neuronpedia links, and each one's top contexts."""
    from .analysis.report import write_report

    path, notes = write_report(Path(run_dir), output, by, k, num_examples, kind, context)
    for note in notes:
        _say(f"warning: {note}", err=True)
    _say(f"report   {path}")


@cli.command()
@click.argument("run_a", type=click.Path(exists=True, file_okay=False))
@click.argument("run_b", type=click.Path(exists=True, file_okay=False))
@click.option("--output-dir", default=None,
              help="The new directory (must not exist, nor lie inside either run); default beside RUN_A: "
                   "compare_{A}_vs_{B}.")
@click.option("-k", "--k", type=INTEGER, default=20, show_default=True, help="Entries per layer for each run.")
@click.option("--by", default="welch_t_abs", show_default=True,
              help="Rank by: welch_t_abs, welch_t, mean_abs_ratio, mean_diff, mean_abs_diff (gradients; add "
                   "_values / _attribution, or name the array, e.g. value_welch_t_abs); A: largest, B: smallest.")
@click.option("--epsilon", type=float, default=1e-10, show_default=True,
              help="Added to both mean |x| in mean_abs_ratio = (A + eps) / (B + eps).")
def compare(run_a, run_b, output_dir, k, by, epsilon) -> None:
    """Which dimensions (features) matter more in RUN_A than in RUN_B, and the reverse (e.g. forget vs
    retain): differences, ratios and Welch's t per dimension, from both runs' sums."""
    from .analysis.compare import compare_runs

    output, text = compare_runs(Path(run_a), Path(run_b), output_dir, epsilon=epsilon, k=k, by=by)
    _say(text, nl=False)
    _say(f"results  {output}")


# raygrad ablate: the options naming other texts (the run's own when none is given), and where it runs
ABLATE_TEXTS = tuple(name for name in fields_of(MEASURED, sample=True) if name not in ("max_length", "seed"))
ABLATE_OPTIONS = ABLATE_TEXTS + tuple(name for name in fields_of(EXECUTION) if name != "sae_layers_per_pass")


@cli.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False))
@click.option("--features", default=None, help="Entries to ablate, LAYER:INDEX[,LAYER:INDEX...]: site dimensions "
              "(--target mlp) or SAE features (--target sae) of layers the run collected.")
@click.option("--from-compare", default=None, type=click.Path(file_okay=False),
              help="A comparison's directory (raygrad compare): its --k first by its own ranking (most specific "
                   "to its RUN_A).")
@click.option("--from-top", is_flag=True, help="The run's --k first by |attribution| (mean g * a; mean |gradient| "
              "where the run has no attribution), over every layer.")
@click.option("-k", "--k", type=INTEGER, default=None, help="How many, with --from-compare or --from-top.")
@click.option("--mode", default="zero", show_default=True,
              help="zero, mean (the run's mean value; the run must collect values) or clamp=VALUE (VALUE where "
                   "active: f > 0 for an SAE feature, everywhere for a site dimension).")
@click.option("--each", is_flag=True, help="Also each entry alone, and the Pearson correlation of predicted and "
              "actual delta over the entries.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
@click.option("--dry-run", is_flag=True, help="Print what would run and exit; writes nothing.")
@(lambda func: _config_options(func, ABLATE_OPTIONS))
@click.pass_context
def ablate(ctx, run_dir, features, from_compare, from_top, k, mode, each, as_json, no_progress, dry_run,
           **options) -> None:
    """Set dimensions or SAE features of RUN at every position (zero, mean or clamp) and measure the loss
    per target token against the clean model, beside the first-order prediction sum g * (a' - a), on
    RUN's texts or --dataset. Saved in RUN/ablations/ as JSON; the same command again resumes it."""
    from click.core import ParameterSource

    from .analysis.ablation import JSON_KEYS, parse_mode, table

    given = {name: value for name, value in options.items()
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    texts = {name: value for name, value in given.items() if name in ABLATE_TEXTS}
    execution = {name: value for name, value in given.items() if name not in ABLATE_TEXTS}
    parsed = parse_mode(mode)
    from . import ablate as driver

    selection = driver.Selection(features, from_compare, from_top, k)
    ablation = driver.resolve(Path(run_dir), selection, parsed, each, texts, execution, echo=_say)
    echo = (lambda _: None) if as_json else _say
    if dry_run:
        driver.dry_run(ablation, echo=_say)
        return
    result, path = driver.run(ablation, echo=echo, progress=not no_progress)
    if as_json:
        _say(json.dumps({key: result[key] for key in JSON_KEYS}))
        return
    _say(table(result, "feature" if ablation.plan.target == "sae" else "dimension"))
    _say(f"results  {path}")


def main() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    previous = signal.signal(signal.SIGTERM, raise_terminated)  # like Ctrl-C: a preempted job keeps its shards
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.Abort:
        _say("aborted", err=True)
        sys.exit(130)
    except Terminated:
        _say("terminated (SIGTERM)", err=True)
        sys.exit(128 + signal.SIGTERM)
    except click.ClickException as err:  # bad option value or usage: one line
        _say(f"error: {err.format_message()}", err=True)
        sys.exit(2)
    except RaygradError as err:
        _say(f"error: {err}", err=True)
        sys.exit(2)
    except OSError as err:  # a disk or permission failure outside the checks: one line, not a traceback
        where = f" ({err.filename})" if err.filename else ""
        _say(f"error: {err.strerror or err}{where}", err=True)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() called in a process that goes on (tests)


if __name__ == "__main__":
    main()
