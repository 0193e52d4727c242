"""The head benchmarks run end to end on tiny sizes, so a change to the scheduler, the reducer, the
store or the engine that breaks them fails here rather than when someone next measures. The figures
they print are not checked (they are timings); that each row is there, with the sizes asked for, is."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("kinds", ["gradients", "all"])
def test_simulate_cluster_runs_on_two_workers(tmp_path, kinds):
    out = run_benchmark("simulate_cluster.py", "--workers", "2", "--shards-per-worker", "2", "--kinds", kinds,
                        "--transfer-mb-per-s", "1e6", "--store-dir", str(tmp_path), cwd=tmp_path)
    (row,) = [line.split() for line in out.splitlines() if re.match(r"\s+2\s", line)]
    assert row[2] == "4"  # 2 workers x 2 shards each, every one reduced
    assert float(row[3]) == pytest.approx(40.9 if kinds == "gradients" else 163.6, abs=0.1)  # MB per partial
    assert not list(tmp_path.iterdir())  # the temporary store is removed


def simulate_json(tmp_path, *args: str) -> list[dict]:
    """simulate_cluster.py --json on 26 x 256 features, the transfer rate given (no Ray is started)."""
    out = run_benchmark("simulate_cluster.py", "--features", "256", "--transfer-mb-per-s", "100", "--json",
                        "--store-dir", str(tmp_path), *args, cwd=tmp_path)
    rows = [json.loads(line) for line in out.splitlines()]
    for row in rows:
        for key in ("worker_idle", "head_busy", "head_busy_run"):
            assert 0.0 <= row[key] <= 1.0, (key, row[key])
        for key in ("head_mb_per_s", "partials_per_s"):  # in the steady window: none may arrive in a short run
            assert isinstance(row[key], float) and row[key] >= 0, (key, row[key])
        for key in ("head_mb_per_s_run", "partials_per_s_run"):
            assert isinstance(row[key], float) and row[key] > 0, (key, row[key])
        assert 1 <= row["partials"] <= row["shards"]
    assert not list(tmp_path.iterdir())
    return rows


def test_simulate_cluster_carries_top_k_tables(tmp_path):
    (row,) = simulate_json(tmp_path, "--workers", "2", "--shards-per-worker", "2", "--kinds", "all",
                           "--top-examples", "2")
    assert row["workers"] == 2 and row["shards"] == 4 and row["top_examples"] == 2
    # 4 kinds x 3 sums (float64) and 3 ranked kinds x (float32 score, int64 row, int32 position) x K = 2
    sums, tables = 4 * 3 * 26 * 256 * 8, 3 * 26 * 256 * 2 * (4 + 8 + 4)
    assert row["partial_mb"] == pytest.approx((sums + tables + 26 * 8) / 1e6)
    assert row["head_transfer_s_per_partial"] == pytest.approx(row["partial_mb"] / 100)  # 100 MB/s, charged


def test_head_seconds_make_workers_wait(tmp_path):
    """3 workers each 68 s / scale a shard, every shard sent on its own; the head spends 120 s (scaled)
    per partial: it falls behind, and the workers wait for their next shard."""
    (fast,) = simulate_json(tmp_path, "--workers", "3", "--partials-per-second", "30", "--no-combining")
    (slow,) = simulate_json(tmp_path, "--workers", "3", "--partials-per-second", "30", "--head-seconds", "120",
                            "--no-combining")
    assert fast["worker_idle"] < 0.05
    assert slow["worker_idle"] > 0.3 and slow["head_busy"] > max(0.5, fast["head_busy"])
    assert slow["head_seconds"] == 120.0 and slow["partials"] == slow["shards"]


def test_combining_keeps_a_slow_head_from_making_workers_wait(tmp_path):
    """A head that takes 30 s per partial, more than 3 workers' 68 s shards allow if each is sent (1.3 s
    of head a second): every shard sent, the workers wait; with combining the head paces the sends by its
    measured seconds per partial, the workers fold their shards and do not wait (each take blocks the
    head's loop for 30 s, less than the shard in flight behind each worker's)."""
    args = ("--workers", "3", "--partials-per-second", "30", "--head-seconds", "30", "--shards-per-worker", "8")
    (each,) = simulate_json(tmp_path, *args, "--no-combining")
    (folded,) = simulate_json(tmp_path, *args)
    assert each["worker_idle"] > 0.1 and each["partials"] == each["shards"], each
    assert folded["worker_idle"] < 0.1 and folded["partials"] < folded["shards"] / 2, folded  # scaled: an upper bound


def test_head_runs_and_resumes_on_a_small_corpus(tmp_path):
    out = run_benchmark("head.py", "--tokens", "1.5e5", "--workdir", str(tmp_path), cwd=tmp_path)
    (row,) = [line.split() for line in out.splitlines() if line.strip().startswith("0.15M")]
    assert int(row[1].replace(",", "")) == round(1.5e5 / 126)  # rows of the corpus written
    assert int(row[2]) >= 2  # shards: the resume had one to compute
    assert "peak at 0.15M tokens / peak at 0.15M: 1.00x" in out


def test_seed_script_runs_the_per_layer_algorithm_on_two_layers(tmp_path):
    """seed_script.py's seed process on two short texts and layers 0 and 29 of the bundled model, its
    --save_outputs files written: the phases it times, and one .npy of 576 values per layer."""
    import numpy as np

    texts = tmp_path / "texts.txt"
    texts.write_text("The quick brown fox jumps over the lazy dog, again and again, all day long.\n" * 2)
    (tmp_path / "saved").mkdir()
    out = run_benchmark("seed_script.py", "--seed", str(texts), "--max-length", "16", "--layers", "0,29",
                        "--saves", str(tmp_path / "saved"), cwd=tmp_path)
    phases = json.loads(out.strip().splitlines()[-1])
    assert set(phases) == {"imports", "model load", "dataset", "layers", "layers timed"}
    assert phases["layers timed"] == 2
    for layer in (0, 29):
        values = np.load(tmp_path / "saved" / f"layer_{layer}_gradients.npy")
        assert values.shape == (576,) and np.isfinite(values).all() and values.max() > 0
        assert (tmp_path / "saved" / f"layer_{layer}_gradient_hist.png").stat().st_size > 0
