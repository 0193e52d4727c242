"""Command line: `raygrad run | export | info`. Options come from RunConfig's
fields (each also accepted in the original scripts' underscore spelling)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

import click

from . import constants as names
from .config import RunConfig, _choices, field_type
from .errors import RaygradError


def _config_options(func):
    for f in reversed(dataclasses.fields(RunConfig)):
        dashed, underscored = f"--{f.name.replace('_', '-')}", f"--{f.name}"
        spellings = [dashed] if dashed == underscored else [dashed, underscored]
        help_text = f.metadata["help"]
        hint = field_type(f.name)
        if hint is bool:
            option = click.option(*spellings, f.name, is_flag=True, default=f.default, help=help_text)
        elif f.metadata.get("multiple"):
            option = click.option(*spellings, f.name, multiple=True, default=f.default, show_default=True,
                                  help=help_text)
        else:
            choices = _choices(f)
            kind = click.Choice(choices) if choices else next(
                (t for t in (int, float) if t in (hint, *typing.get_args(hint))), str)
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
              help="Continue a killed run from its directory. Its options are read from the run; only "
                   "--address, --workers, --gpus-per-worker, --device and --worker-timeout may be given anew.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.pass_context
def run(ctx, model_alias, resume, no_progress, **options) -> None:
    """Aggregate loss gradients over a dataset for every selected layer."""
    from click.core import ParameterSource

    from . import engine

    if model_alias:
        options["model"] = model_alias
    if resume:
        given = {name: value for name, value in options.items()
                 if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE or
                 (name == "model" and model_alias)}
        run_dir = engine.resume(Path(resume), echo=click.echo, progress=not no_progress, execution=given)
    else:
        run_dir = engine.run(RunConfig(**options), echo=click.echo, progress=not no_progress)
    click.echo(f"results  {run_dir}")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--save-outputs/--no-save-outputs", default=None,
              help="Write per-layer .npy files and plots (default: as the run asked).")
def export(run_dir, save_outputs) -> None:
    """Regenerate every export of RUN_DIR from its Zarr store."""
    from .export import write_exports

    if not (Path(run_dir) / names.STORE_NAME).exists():
        raise RaygradError(f"RUN_DIR {run_dir}: no {names.STORE_NAME} here")
    written = write_exports(Path(run_dir), with_outputs=save_outputs)
    click.echo(f"wrote {len(written)} files in {run_dir}")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def info(run_dir) -> None:
    """Print a run's status, plan and timing."""
    from .quality import sae_quality
    from .results import open_results

    group = open_results(run_dir)
    attrs = dict(group.attrs)
    shown = {k: attrs.get(k) for k in (names.ATTR_STATUS, names.ATTR_PLAN, names.ATTR_TIMING)}
    quality = sae_quality(group)
    if quality is not None:  # per layer: FVU, mean L0, and (splice modes) the loss with the SAE spliced in
        shown["sae_quality"] = quality
    click.echo(json.dumps(shown, indent=2))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--layer", type=int, default=None, help="One layer (default: every layer of the run).")
@click.option("--k", type=int, default=20, show_default=True, help="Entries per layer.")
@click.option("--by", default="mean_abs", show_default=True,
              help="Array to rank by: mean_abs, mean, value_mean_abs, attr_mean_abs, site_mean_abs, ...")
def top(run_dir, layer, k, by) -> None:
    """The top features (or dimensions) per layer, largest magnitude first."""
    from .top import format_rows, top_features

    click.echo(format_rows(top_features(run_dir, layer, k, by), by))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:  # bad option value or usage: one line
        click.echo(f"error: {err.format_message()}", err=True)
        sys.exit(2)
    except RaygradError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
