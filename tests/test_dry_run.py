"""`raygrad run --dry-run`: the whole plan printed; nothing written, no Ray, no weights."""

import dataclasses
from pathlib import Path

import psutil
import pytest
from helpers import build_config, killed_run, run_cli, tiny_args, tree_digest
from sae_factory import write_sae_lens_dir

from raygrad import constants as names

LAYERS, WIDTH = 3, 32  # the tiny llama's


def _raylets() -> int:
    """Raylets this test process started (other pytest workers may run their own Rays meanwhile)."""
    return sum(1 for process in psutil.Process().children(recursive=True) if "raylet" in process.name())


@pytest.fixture
def nothing_loads(monkeypatch):
    """Ray and weights fail if touched; the model's config and tokenizer may be read."""
    import ray
    import transformers

    from raygrad.model import loading as models
    from raygrad.model import saes

    def refused(*args, **kwargs):
        raise AssertionError("a dry run started Ray or loaded weights")

    monkeypatch.setattr(ray, "init", refused)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        monkeypatch.setattr(auto, "from_pretrained", refused)
    monkeypatch.setattr(models, "load_model_and_tokenizer", refused)
    monkeypatch.setattr(saes, "_load_release", refused)
    for name, fmt in saes.SAE_FORMATS.items():
        monkeypatch.setitem(saes.SAE_FORMATS, name, dataclasses.replace(fmt, load=refused))
    raylets = _raylets()
    yield
    assert not ray.is_initialized()
    assert _raylets() == raylets


def _dry(model, texts, out, *extra):
    return tiny_args(model, texts, out, "--dry-run", *extra)


def test_dry_run_prints_the_whole_plan_and_writes_nothing(tiny_llama, texts_file, tmp_path, capsys, monkeypatch,
                                                         nothing_loads):
    before = tree_digest(tmp_path)
    code, out, err = run_cli(_dry(tiny_llama, texts_file, tmp_path / "out", "--shard-size", "2"), capsys,
                             monkeypatch)
    assert code == 0, err
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()
    lines = {line[:9].strip(): line[9:] for line in out.splitlines()}
    assert lines["dry run"] == "nothing written, no Ray started, no weights loaded"
    assert lines["texts"].startswith("4 (counted in one pass over ") and "rows 0-4" in lines["texts"]
    assert lines["tokens"].startswith("about ") and "(estimated: " in lines["tokens"]
    assert lines["shards"].startswith("2: 2-2 texts and ")
    assert lines["workers"] == "in-process (no Ray) on cpu" and lines["request"] == "in-process (no Ray) on cpu"
    assert lines["memory"].startswith("about ") and "per worker" in lines["memory"]
    assert lines["SAEs"] == "none (--target mlp)"
    per_partial = 8 * LAYERS * (3 * WIDTH + 1)  # grad sum, abs sum, sq sum per dimension; a count per layer
    assert lines["partials"].startswith(f"2 (one per shard) x {per_partial / 1024:.1f} KiB = "
                                        f"{2 * per_partial / 1024:.1f} KiB to the driver")


def test_dry_run_of_an_sae_run_says_what_each_worker_loads(tiny_llama, texts_file, tmp_path, capsys, monkeypatch,
                                                           nothing_loads):
    for layer in range(LAYERS):
        write_sae_lens_dir(tmp_path / "saes" / f"sae_{layer}", WIDTH, 64, hook_name=f"blocks.{layer}.hook_mlp_out")
    before = tree_digest(tmp_path)
    code, out, err = run_cli(_dry(tiny_llama, texts_file, tmp_path / "out", "--target", "sae", "--layers", "0,2",
                                  "--sae-path", str(tmp_path / "saes" / "sae_{layer}")), capsys, monkeypatch)
    assert code == 0, err
    assert tree_digest(tmp_path) == before
    lines = {line[:9].strip(): line[9:] for line in out.splitlines()}
    per_layer = 2 * WIDTH * 64 * 4  # encoder and decoder, float32
    assert lines["SAEs"].startswith(f"each worker loads 2 x {per_layer / 1024:.1f} KiB = "
                                    f"{2 * per_layer / 1024:.1f} KiB")
    # grad over 64 features; the site's gradient and values over 32 dimensions; 2 SAE quality sums and a count
    per_partial = 8 * 2 * (3 * 64 + 3 * WIDTH + 3 * WIDTH + 2 + 1)
    assert f"x {per_partial / 1024:.1f} KiB = " in lines["partials"]
    assert "grad 64, site_grad 32, site_value 32" in lines["partials"]


def test_dry_run_says_what_ray_workers_would_ask_for_without_starting_ray(tiny_llama, texts_file, tmp_path, capsys,
                                                                          monkeypatch, nothing_loads):
    from raygrad.cluster import pool

    monkeypatch.setattr(pool, "local_gpus", lambda: 0)
    monkeypatch.setattr(pool.os, "cpu_count", lambda: 8)
    common = ["run", "--model", str(tiny_llama), "--dataset", str(texts_file), "--num-samples", "4", "--max-length",
              "16", "--output-dir", str(tmp_path / "out"), "--dry-run"]
    code, out, err = run_cli([*common, "--workers", "2"], capsys, monkeypatch)
    assert code == 0, err
    assert "request  a local Ray would be started, asking for 2 x {GPU: 0, CPU: 4}" in out
    assert "workers  2 Ray CPU workers" in out

    code, out, err = run_cli([*common, "--workers", "3", "--gpus-per-worker", "2", "--address", "10.0.0.1:6379"],
                             capsys, monkeypatch)
    assert code == 0, err
    assert "request  --address 10.0.0.1:6379 would be asked for 3 x {GPU: 2, CPU: 1} (the cluster is not contacted" \
        in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [
    ["--tokens-per-batch", "64"],  # with tiny_args' --batch-size 2
    ["--layers", "0-9"],  # the tiny model has 3
    ["--target", "sae"],  # no SAE named
])
def test_dry_run_with_conflicting_options_fails_with_the_same_line_as_a_run(tiny_llama, texts_file, tmp_path, capsys,
                                                                            monkeypatch, extra):
    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path / "a", *extra), capsys, monkeypatch)
    dry_code, dry_out, dry_err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path / "b", "--dry-run", *extra),
                                         capsys, monkeypatch)
    assert (dry_code, dry_err) == (code, err) and code == 2 and len(err.strip().splitlines()) == 1
    assert dry_out == "" and not (tmp_path / "b").exists()


def test_dry_run_resume_prints_what_remains_and_changes_nothing(tiny_llama, texts_file, tmp_path, capsys,
                                                                monkeypatch):
    run_dir = killed_run(build_config(tiny_llama, texts_file, tmp_path, shard_size=2, checkpoint_seconds=0),
                         dies_at_call=3)
    before = tree_digest(run_dir)
    with pytest.MonkeyPatch.context() as patch:
        import ray

        patch.setattr(ray, "init", lambda *a, **k: pytest.fail("a dry run started Ray"))
        code, out, err = run_cli(["run", "--dry-run", "--resume", str(run_dir)], capsys, monkeypatch)
    assert code == 0, err
    assert tree_digest(run_dir) == before and not (run_dir / names.LOCK_FILE).exists()
    assert f"resume   {run_dir}: 2 of 3 shards done, 1 left" in out
    assert "texts left 2 (counted when the run was planned)" in out
    assert "tokens left about " in out and "(estimated: " in out
    assert "shards left 1: 2-2 texts and " in out and "partials 1 (one per shard) x " in out

    # A measured option is refused as a real resume refuses it.
    code, _, err = run_cli(["run", "--dry-run", "--resume", str(run_dir), "--max-length", "8"], capsys, monkeypatch)
    real_code, _, real_err = run_cli(["run", "--resume", str(run_dir), "--max-length", "8"], capsys, monkeypatch)
    assert (code, err) == (real_code, real_err) and code == 2
    assert tree_digest(run_dir) == before


def test_dry_run_resume_of_a_complete_run(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    code, _, _ = run_cli(tiny_args(tiny_llama, texts_file, tmp_path), capsys, monkeypatch)
    (run_dir,) = Path(tmp_path).iterdir()
    before = tree_digest(run_dir)
    code, out, err = run_cli(["run", "--dry-run", "--resume", str(run_dir)], capsys, monkeypatch)
    assert code == 0 and "is complete; its exports are whole: --resume has nothing to do" in out, err
    assert tree_digest(run_dir) == before


def test_layer_lists_print_runs_of_consecutive_layers_as_ranges():
    """The plan's layer line, the run directory's name, the report's target and the examples' errors."""
    from raygrad.plan import layer_span

    assert layer_span([0, 1, 2, 3, 10]) == "0-3,10"
    assert layer_span([0, 2]) == "0,2" and layer_span([7]) == "7" and layer_span([4, 5]) == "4-5"
    assert layer_span([0, 1, 5, 6, 7, 9], ", ") == "0-1, 5-7, 9"


def test_dry_run_says_which_csv_records_were_skipped_and_why(tiny_llama, tmp_path, capsys, monkeypatch,
                                                             nothing_loads):
    """A record the csv module cannot read (a field over its limit) is counted in the plan's skipped
    line under its own words, beside the short ones; the rows csv reads are the texts counted."""
    from raygrad.dataset.formats import CSV_FIELD_CHARS

    text = "A sentence long enough to be measured by the tiny model, and then some more words."
    path = tmp_path / "data.csv"
    path.write_text(f'id,text\n0,{text}\n1,"{"a" * (CSV_FIELD_CHARS + 1)}"\n2,short\n3,{text} 6" tall\n')
    code, out, err = run_cli(_dry(tiny_llama, path, tmp_path / "out", "--num-samples", "all"), capsys, monkeypatch)
    assert code == 0, err
    lines = {line[:9].strip(): line[9:] for line in out.splitlines()}
    assert lines["texts"].startswith("2 (counted in one pass over ") and "rows 0-3" in lines["texts"]
    assert lines["skipped"] == ("1 CSV records the csv module cannot read (a field over its size limit); "
                                "1 rows too short (--min-chars)")
