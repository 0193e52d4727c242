"""The command line: a real subprocess run, and one clear line for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli, tiny_args

from raygrad import constants as names

REPO = Path(__file__).resolve().parent.parent


def test_console_script_runs_and_exports(tiny_llama, texts_file, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # The original's underscore spellings are accepted.
    script = str(Path(sys.executable).parent / "raygrad")
    args = [script, "run", "--model_name", str(tiny_llama), "--dataset", str(texts_file), "--num_samples", "3",
            "--batch_size", "2", "--max_length", "16", "--workers", "0", "--output_dir", str(tmp_path),
            "--aggregation_mode", "both", "--save_outputs", "--no-plots", "--no-progress"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "family llama" in done.stdout and "layers   0-2 (3 of 3), width 32" in done.stdout
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "layer_2_mean_gradients.npy").exists()
    metadata = json.loads((run_dir / names.METADATA_JSON).read_text())
    assert metadata["configuration"]["aggregation_mode"] == "both"

    again = subprocess.run([sys.executable, str(REPO / "cli.py"), "export", str(run_dir)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "wrote" in again.stdout


def test_info_prints_status_plan_and_timing(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    code, _, _ = run_cli(tiny_args(tiny_llama, texts_file, tmp_path), capsys, monkeypatch)
    (run_dir,) = tmp_path.iterdir()
    code, out, _ = run_cli(["info", str(run_dir)], capsys, monkeypatch)
    info = json.loads(out)
    assert code == 0 and info["status"] == "complete"
    assert info["plan"]["layers"] == [0, 1, 2] and info["plan"]["samples"] == 4
    assert '"layers": [0, 1, 2],' in out  # a list of values on one line, not a line per layer
    assert info["timing"]["tokens_this_session"] == json.loads((run_dir / names.METADATA_JSON).read_text())[
        "target_tokens"]


def test_reading_a_run_imports_no_torch(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    """`raygrad info` and `export` read results in numpy (raygrad.store.partial): importing torch would cost
    each of them seconds. The Ray actor's shell (cluster/runtime.py) and the reducer import none either:
    torch comes with the model, in the actor's first load."""
    run_cli(tiny_args(tiny_llama, texts_file, tmp_path / "runs"), capsys, monkeypatch)
    (run_dir,) = (tmp_path / "runs").iterdir()
    probe = ("import sys\nfrom raygrad import cli\nfrom raygrad.cluster import runtime\n"
             "from raygrad.store import reducer\n"
             "for command in (['info', sys.argv[1]], ['export', sys.argv[1]]):\n"
             "    sys.argv = ['raygrad', *command]\n"
             "    try:\n        cli.main()\n    except SystemExit as exited:\n        assert not exited.code, command\n"
             "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe, str(run_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]


def test_bad_option_value_in_a_subprocess_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "cli.py"), "run", "--max-length", "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --max-length 1: must be >= 2 (one input and one target token)"]


@pytest.mark.parametrize("extra, expected", [
    (["--layers", "0-x"], "--layers '0-x': use a range like '0-23'"),
    (["--layers", "0-9"], "--layers '0-9': layer 3 is out of range; this model has layers 0-2"),
    (["--layers", "2-1"], "--layers '2-1': range 2-1 runs backwards"),
    (["--num-samples", "0"], "--num-samples 0: must be an integer >= 1"),
    (["--batch-size", "-2"], "--batch-size -2: must be an integer >= 1 or 'auto'"),
    (["--batch-size", "lots"], "--batch-size lots: must be an integer >= 1 or 'auto'"),
    (["--tokens-per-batch", "8"], "--tokens-per-batch 8: must be an integer >= --max-length (16)"),
    (["--tokens-per-batch", "64"], "--tokens-per-batch 64: give it or --batch-size 2, not both"),
    (["--sae-dtype", "float64"], "'float64' is not one of 'float32', 'bfloat16', 'float16'"),
    (["--address", "127.0.0.1:1"], "--workers 0: runs in this process without Ray, so --address 127.0.0.1:1"),
    (["--worker-timeout", "0"], "--worker-timeout 0.0: must be a number of seconds > 0"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker -1: must be an integer >= 0"),
    (["--gpus-per-worker", "0", "--device", "cuda"], "--gpus-per-worker 0: workers would see no GPU"),
    (["--max-length", "1"], "--max-length 1: must be >= 2"),
    (["--num-samples", "many"], "--num-samples many: must be an integer >= 1 or 'all'"),
    (["--device", "gpu"], "'gpu' is not one of 'auto', 'cuda', 'cpu'"),
    (["--workers", "-1"], "--workers -1: must be >= 0"),
])
def test_bad_values_get_one_line(extra, expected, tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path, *extra), capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_dataset_file(tiny_llama, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(tiny_args(tiny_llama, tmp_path / "nope.txt", tmp_path / "out"), capsys, monkeypatch)
    assert code == 2 and err.strip() == f"error: --dataset {tmp_path / 'nope.txt'}: no such file"


def test_missing_text_column(tiny_llama, tmp_path, capsys, monkeypatch):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"content": "x" * 80}) for _ in range(3)))
    code, _, err = run_cli(tiny_args(tiny_llama, data, tmp_path / "out"), capsys, monkeypatch)
    assert code == 2
    assert err.strip() == f"error: --text-column text: not in dataset {data}; its columns are content"
    code, out, _ = run_cli(tiny_args(tiny_llama, data, tmp_path / "out", "--text-column", "content"),
                           capsys, monkeypatch)
    assert code == 0 and "samples  3 (requested 4)" in out


def test_fewer_samples_than_asked_goes_on_and_is_recorded(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    args = tiny_args(tiny_llama, texts_file, tmp_path)
    args[args.index("--num-samples") + 1] = "50"
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert "warning: --num-samples 50: the dataset has only 6 texts longer than 50 characters; going on with 6" in out
    (run_dir,) = tmp_path.iterdir()
    metadata = json.loads((run_dir / names.METADATA_JSON).read_text())
    assert metadata["num_samples_requested"] == 50 and metadata["num_samples"] == 6


def test_output_directory_holding_a_run_is_refused(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    code, _, _ = run_cli(tiny_args(tiny_llama, texts_file, tmp_path), capsys, monkeypatch)
    (run_dir,) = tmp_path.iterdir()
    before = np.load(run_dir / names.CONSOLIDATED_NPZ)["layer_0_mean_abs"]
    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, run_dir), capsys, monkeypatch)
    assert code == 2 and "already holds a run" in err and len(err.strip().splitlines()) == 1
    np.testing.assert_array_equal(np.load(run_dir / names.CONSOLIDATED_NPZ)["layer_0_mean_abs"], before)
    existing = tmp_path / "taken.npz"
    existing.write_bytes(b"keep me")
    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path / "new", "--save-consolidated", str(existing)),
                           capsys, monkeypatch)
    assert code == 2 and "--save-consolidated" in err and existing.read_bytes() == b"keep me"
    # numpy appends .npz to a name without it: that file is protected too
    (tmp_path / "mine.npz").write_bytes(b"keep me too")
    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path / "new2", "--save-consolidated",
                                     str(tmp_path / "mine")), capsys, monkeypatch)
    assert code == 2 and f"{tmp_path / 'mine.npz'} exists" in err
    assert (tmp_path / "mine.npz").read_bytes() == b"keep me too"


def test_unreachable_hub_model_suggests_the_offline_demo(texts_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(tiny_args("nobody/no-such-model", texts_file, tmp_path), capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: --model nobody/no-such-model: not a local path")
    assert "--model smollm2-135m --dataset stdlib-docs" in lines[0]


def test_unreachable_hub_dataset_suggests_the_offline_corpus(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(tiny_args(tiny_llama, "wikitext", tmp_path), capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: --dataset wikitext: not a local file and could not be loaded")
    assert "--dataset stdlib-docs" in lines[0]


def test_resume_takes_execution_options_and_refuses_the_rest(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    from raygrad.store.zarr_store import ResultStore

    code, _, _ = run_cli(tiny_args(tiny_llama, texts_file, tmp_path), capsys, monkeypatch)
    (run_dir,) = tmp_path.iterdir()
    store = ResultStore.open(run_dir / names.STORE_NAME, writable=True)
    store.group.attrs["status"] = "running"  # as if it had been killed before its last shard
    code, _, err = run_cli(["run", "--resume", str(run_dir), "--layers", "0"], capsys, monkeypatch)
    assert code == 2 and err.strip().splitlines() == [
        f"error: --resume {run_dir}: --layers would change what the run computes; a resumed run keeps its own "
        "(only --batch-size, --tokens-per-batch, --sae-layers-per-pass, --device, --workers, --address, "
        "--gpus-per-worker, --allow-offload, --worker-timeout, --connect-timeout, --checkpoint-seconds, "
        "--shard-size may change)"]
    code, _, err = run_cli(["run", "--resume", str(run_dir), "--workers", "0", "--worker-timeout", "60"],
                           capsys, monkeypatch)
    assert code == 0, err
