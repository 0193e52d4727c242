"""RunConfig's three frozen parts (DESIGN.md section 2): what is measured, how it executes, what is
exported. Each field names its part; resume, compare and the store read the parts from those tags."""

import dataclasses
import json
import shutil

import pytest
from helpers import assert_same_totals, build_config, killed_run, run_cli

from raygrad import constants as names
from raygrad import engine
from raygrad.analysis import compare
from raygrad.config import (
    EXECUTION,
    EXPORT,
    MEASURED,
    PARTS,
    Execution,
    Export,
    Measured,
    RunConfig,
    fields_of,
    part_of,
    planned_fields,
)
from raygrad.errors import RaygradError
from raygrad.store.zarr_store import ResultStore

# Each field's part, decided by whether it changes the numbers in the store. "sample": measured, and says
# which texts, how much of each and which probe draws (--seed keys the Hessian probes) the statistics are
# over; compare checks the measured part less these.
MEASURED_FIELDS = ["model", "target", "layers", "hook_site", "exclude_bos", "sae_release", "sae_id", "sae_path",
                   "sae_mode", "position_stride", "aggregate_by", "hessian_probes", "dtype", "sae_dtype"]
KEPT_FIELDS = ["top_examples"]  # measured (a resume keeps them), but the sums do not depend on them
SAMPLE_FIELDS = ["num_samples", "max_length", "dataset", "dataset_config", "dataset_split", "text_column",
                 "prompt_column", "completion_column", "min_chars", "seed"]
EXECUTION_FIELDS = ["batch_size", "tokens_per_batch", "sae_layers_per_pass", "device", "workers", "address",
                    "gpus_per_worker", "allow_offload", "worker_timeout", "connect_timeout", "checkpoint_seconds",
                    "shard_size"]
EXPORT_FIELDS = ["aggregation_mode", "power", "normalize_mode", "normalize_gradients", "save_outputs", "plots",
                 "save_consolidated", "output_dir"]

CONFIGS = {
    "default": dict(),
    "sae": dict(target="sae", sae_path="/saes/layer_{layer}", sae_mode="splice", sae_layers_per_pass=2,
                sae_dtype="bfloat16", layers="0-3,7"),
    "hessian": dict(aggregate_by=("gradients", "hessian"), hessian_probes=3, seed=7, num_samples="all",
                    tokens_per_batch=512, shard_size=16, workers=2, address="10.0.0.1:6379", gpus_per_worker=2),
    "exports": dict(aggregation_mode="all", power=2.0, normalize_mode="all", save_outputs=True, plots=False,
                    save_consolidated="/tmp/out.npz", output_dir="runs", dataset="/data/texts.jsonl",
                    text_column="body", min_chars=0, exclude_bos=True, position_stride=4, batch_size="auto"),
}


def test_every_field_has_exactly_one_part():
    fields = [f.name for f in dataclasses.fields(RunConfig)]
    for f in dataclasses.fields(RunConfig):
        assert f.metadata["part"] in PARTS, f.name
    by_part = {part: fields_of(part) for part in PARTS}
    assert sorted(name for names_ in by_part.values() for name in names_) == sorted(fields)  # each once
    for part, cls in ((MEASURED, Measured), (EXECUTION, Execution), (EXPORT, Export)):
        assert tuple(f.name for f in dataclasses.fields(cls)) == by_part[part]
        assert all(part_of(name) == part for name in by_part[part])


def test_each_field_is_in_the_part_that_matches_what_it_changes():
    assert list(fields_of(MEASURED, sample=False, statistics=True)) == MEASURED_FIELDS
    assert list(fields_of(MEASURED, statistics=False)) == KEPT_FIELDS
    assert list(fields_of(MEASURED, sample=True)) == SAMPLE_FIELDS
    assert list(fields_of(EXECUTION)) == EXECUTION_FIELDS
    assert list(fields_of(EXPORT)) == EXPORT_FIELDS
    assert planned_fields() == ("shard_size",)  # the one execution option a resume cannot apply


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_whole_and_each_part_round_trip(overrides):
    config = RunConfig(**overrides)
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # as the store keeps it
    parts = config.measured(), config.execution(), config.export()
    for part in parts:
        assert type(part).from_dict(part.to_dict()) == part
        assert type(part).from_dict(json.loads(json.dumps(part.to_dict()))) == part
    assert RunConfig.from_parts(*parts) == config
    merged = {**parts[0].to_dict(), **parts[1].to_dict(), **parts[2].to_dict()}
    assert merged == config.to_dict()


def test_parts_are_frozen_and_checked_as_a_whole():
    config = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.measured().max_length = 8
    # a check that spans two parts (--tokens-per-batch >= --max-length) runs when they are put together
    execution = dataclasses.replace(config.execution(), tokens_per_batch=64)
    with pytest.raises(RaygradError, match="--tokens-per-batch 64: must be an integer >= --max-length"):
        RunConfig.from_parts(dataclasses.replace(config.measured(), max_length=128), execution, config.export())


def test_a_store_written_before_the_parts_still_reads():
    """The saved configuration is the flat dict it always was: one written before (with keys since
    dropped, and without those since added) reads as before."""
    older = {"model": "m", "target": "mlp", "num_samples": 8, "batch_size": 2, "max_length": 16, "layers": "0,1",
             "hook_site": "mlp_out", "aggregate_by": ["gradients", "values"], "device": "cpu", "dtype": "float64",
             "aggregation_mode": "both", "dataset": "/d.txt", "workers": 0, "seed": 3, "retired_option": 1}
    config = RunConfig.from_dict(older)
    assert config.measured().aggregate_by == ("gradients", "values") and config.execution().batch_size == 2
    assert config.export().aggregation_mode == "both" and config.hessian_probes == 1
    assert RunConfig.from_dict(config.to_dict()) == config


def test_every_field_is_still_a_run_option():
    from raygrad.cli import run

    options = {param.name for param in run.params}
    assert {f.name for f in dataclasses.fields(RunConfig)} <= options


# --- compare: the measured part less the sample

class _Store:
    def prefixes(self):
        return ["grad"]


def _side(plan=None, **overrides):
    config = RunConfig(**{"model": "/m", "layers": "0,1", "workers": 0, **overrides})
    return _Store(), config, {"layers": [0, 1], "width": 8, "model_path": None, **(plan or {})}


def test_compare_checks_the_measured_part_less_the_sample():
    assert [name for name, _ in compare.MEASURED] == [n.replace("_", "-") for n in MEASURED_FIELDS] + ["width"]
    # runs over different samples, run differently and exported differently: comparable
    compare._check_same_measurement(
        _side(), _side(num_samples=3, max_length=16, dataset="/other.txt", min_chars=0, text_column="t", seed=9,
                       batch_size=1, shard_size=2, device="cpu", aggregation_mode="all", power=2.0,
                       sae_dtype="bfloat16", top_examples=8))  # no SAE: --sae-dtype has no effect
    compare._check_same_measurement(_side(), _side(layers="0-1"))  # one resolved layer list, two spellings
    for overrides, text in ((dict(dtype="bfloat16"), "--dtype float32 vs bfloat16"),
                            (dict(exclude_bos=True), "--exclude-bos False vs True"),
                            (dict(aggregate_by=("gradients", "hessian"), hessian_probes=2),
                             "--aggregate-by gradients vs gradients,hessian")):
        with pytest.raises(RaygradError, match=f"measured different things: {text}$"):
            compare._check_same_measurement(_side(), _side(**overrides))
    with pytest.raises(RaygradError, match="--width 8 vs 16$"):
        compare._check_same_measurement(_side(), _side(plan={"width": 16}))


# --- resume: any execution change; measured and export options refused with one line

@pytest.fixture(scope="module")
def killed(tiny_llama, texts_file, tmp_path_factory):
    """An in-process run of 3 shards of 2 texts (batches of 3), stopped after its first shard."""
    config = build_config(tiny_llama, texts_file, tmp_path_factory.mktemp("killed"), shard_size=2,
                          checkpoint_seconds=0)
    return killed_run(config, dies_at_call=2)


def _copy(run_dir, tmp_path):
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


def test_resume_refuses_measured_and_export_options_with_one_line(killed, tmp_path, capsys, monkeypatch):
    run_dir = _copy(killed, tmp_path)
    allowed = ", --".join(name.replace("_", "-") for name in EXECUTION_FIELDS)
    for option, value in (("--seed", "1"), ("--dataset", "/elsewhere.txt"), ("--dtype", "float32")):
        code, _, err = run_cli(["run", "--resume", str(run_dir), option, value], capsys, monkeypatch)
        assert code == 2 and err.strip().splitlines() == [
            f"error: --resume {run_dir}: {option} would change what the run computes; a resumed run keeps its own "
            f"(only --{allowed} may change)"], err
    for option in (["--power", "2"], ["--save-outputs"], ["--output-dir", str(tmp_path / "x")]):
        code, _, err = run_cli(["run", "--resume", str(run_dir), *option], capsys, monkeypatch)
        assert code == 2 and err.strip().splitlines() == [
            f"error: --resume {run_dir}: {option[0]} would change what the run exports; a resumed run writes the "
            f"exports it was started with (derive others from the complete run with raygrad export {run_dir})"], err
    with pytest.raises(RaygradError, match="--bogus: not an option of raygrad run"):
        engine.resume(run_dir, echo=lambda _: None, progress=False, execution={"bogus": 1})
    _, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.tolist() == [True, False, False]  # nothing ran


def test_dry_run_resume_shows_new_batching_and_notes_the_planned_shards(killed, capsys, monkeypatch):
    code, out, err = run_cli(["run", "--dry-run", "--resume", str(killed)], capsys, monkeypatch)
    assert code == 0 and "batch 3 texts" in out and "note:" not in out, err  # batching as saved
    code, out, err = run_cli(["run", "--dry-run", "--resume", str(killed), "--tokens-per-batch", "48"], capsys,
                             monkeypatch)
    assert code == 0 and "batch packed to 48 tokens" in out, err  # the saved --batch-size 3 gives way
    code, out, err = run_cli(["run", "--dry-run", "--resume", str(killed), "--tokens-per-batch", "48",
                              "--batch-size", "2"], capsys, monkeypatch)
    assert code == 2 and "--tokens-per-batch 48: give it or --batch-size 2, not both" in err
    code, out, err = run_cli(["run", "--dry-run", "--resume", str(killed), "--shard-size", "1"], capsys,
                             monkeypatch)
    assert code == 0, err
    assert ("note: --shard-size 1 applies when a run plans its shards; this run's 3 shards were planned when it "
            "started and stay as they are") in out.splitlines()
    assert f"resume   {killed}: 1 of 3 shards done, 2 left" in out


def test_resume_with_new_batching_and_shard_size_finishes_with_the_same_sums(killed, tmp_path, in_process_totals,
                                                                              capsys, monkeypatch):
    from raygrad.compute import worker

    run_dir = _copy(killed, tmp_path)
    seen, real_sizer = [], worker.batch_sizer

    def sizer(plan, device):
        seen.append((plan.batching, plan.batch_size))
        return real_sizer(plan, device)

    monkeypatch.setattr(worker, "batch_sizer", sizer)
    code, out, err = run_cli(["run", "--resume", str(run_dir), "--batch-size", "1", "--shard-size", "1",
                              "--checkpoint-seconds", "5", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert "note: --shard-size 1 applies when a run plans its shards" in out
    assert seen == [("texts", 1)]
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.tolist() == [True, True, True]
    assert_same_totals(resumed, in_process_totals(shard_size=2), rtol=1e-9)


# --- the store binds the measured part and the pinned revisions

@pytest.mark.parametrize("edit", ["measured", "pinned model", "pinned dataset"])
def test_a_store_whose_measured_part_or_pins_were_edited_is_not_resumed(edit, killed, tmp_path, capsys,
                                                                        monkeypatch):
    """The store's inputs digest (store._inputs_digest: the whole saved configuration and plan) already
    binds both; a resume recomputes it and stops with one line."""
    run_dir = _copy(killed, tmp_path)
    group = ResultStore.open(run_dir / names.STORE_NAME, writable=True, verify=False).group
    key = names.ATTR_CONFIG if edit == "measured" else names.ATTR_PLAN
    saved = json.loads(json.dumps(dict(group.attrs[key])))
    if edit == "measured":
        saved["max_length"] = 16
    elif edit == "pinned model":
        saved["model_revision"]["digest"] = "0" * 16
    else:
        saved["dataset_revision"] = {**saved["dataset_revision"], "digest": "0" * 16}
    group.attrs[key] = saved
    code, _, err = run_cli(["run", "--resume", str(run_dir), "--no-progress"], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "the run's configuration or plan changed" in lines[0], err
    _, done = ResultStore.open(run_dir / names.STORE_NAME, verify=False).totals()
    assert done.tolist() == [True, False, False]


@pytest.mark.parametrize("overrides, expected", [
    ({"shard_size": 1.5}, "--shard-size 1.5: must be an integer >= 1"),
    ({"gpus_per_worker": "2"}, "--gpus-per-worker 2: must be an integer >= 0"),
    ({"sae_layers_per_pass": True, "target": "sae", "sae_path": "x"}, "--sae-layers-per-pass True: must be an integer"),
    ({"max_length": 16.5}, "--max-length 16.5: must be >= 2"),
    ({"workers": 1.5}, "--workers 1.5: must be >= 0"),
    ({"tokens_per_batch": True}, "--tokens-per-batch True: must be an integer >= --max-length"),
])
def test_counts_from_python_or_a_saved_config_are_integers(overrides, expected):
    """The CLI parses these as integers; RunConfig(...) and from_dict take what they are given, and a float,
    a string or a bool is one line, not accepted (1.5 was) nor a TypeError ('2' was)."""
    with pytest.raises(RaygradError) as refused:
        RunConfig(**overrides)
    assert str(refused.value).startswith(expected)
