"""The head benchmarks run end to end on tiny sizes, so a change to the scheduler, the reducer, the
store or the engine that breaks them fails here rather than when someone next measures. The figures
they print are not checked (they are timings); that each row is there, with the sizes asked for, is."""

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
                        "--store-dir", str(tmp_path), cwd=tmp_path)
    (row,) = [line.split() for line in out.splitlines() if re.match(r"\s+2\s", line)]
    assert row[2] == "4"  # 2 workers x 2 shards each, every one reduced
    assert float(row[3]) == pytest.approx(40.9 if kinds == "gradients" else 163.6, abs=0.1)  # MB per partial
    assert not list(tmp_path.iterdir())  # the temporary store is removed


def test_head_runs_and_resumes_on_a_small_corpus(tmp_path):
    out = run_benchmark("head.py", "--tokens", "1.5e5", "--workdir", str(tmp_path), cwd=tmp_path)
    (row,) = [line.split() for line in out.splitlines() if line.strip().startswith("0.15M")]
    assert int(row[1].replace(",", "")) == round(1.5e5 / 126)  # rows of the corpus written
    assert int(row[2]) >= 2  # shards: the resume had one to compute
    assert "peak at 0.15M tokens / peak at 0.15M: 1.00x" in out
