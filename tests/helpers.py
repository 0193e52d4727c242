import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from raygrad import constants as names
from raygrad.config import RunConfig
from raygrad.engine import run
from raygrad.store.zarr_store import ResultStore


def build_config(model_dir: Path, texts_file: Path, output_dir: Path, **overrides) -> RunConfig:
    options = dict(model=str(model_dir), dataset=str(texts_file), num_samples=6, batch_size=3, max_length=24,
                   workers=0, dtype="float64", output_dir=str(output_dir))
    options.update(overrides)
    return RunConfig(**options)


def run_tiny(model_dir, texts_file, output_dir, **overrides):
    """-> (run_dir, totals Partial) of an engine run on a tiny model."""
    run_dir = run(build_config(model_dir, texts_file, output_dir, **overrides), echo=lambda _: None, progress=False)
    totals, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    return run_dir, totals


def assert_same_totals(a, b, rtol=1e-10):
    assert set(a.sums) == set(b.sums)
    for name in a.sums:
        np.testing.assert_allclose(a.sums[name], b.sums[name], rtol=rtol, atol=1e-14, err_msg=name)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.loss_tokens == b.loss_tokens
    np.testing.assert_allclose(a.loss_sum, b.loss_sum, rtol=rtol)


def rms_norm_float64(self, x):
    """LlamaRMSNorm's math without its float32 upcast: transformers computes the norm in float32
    even in a float64 model, and that rounding (~1e-7) differs between two float64 computations
    that scale the gradient differently (a summed vs a mean loss)."""
    return self.weight * (x * (x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon).rsqrt())


def load_script(relative_path: str, monkeypatch):
    """A script of the repository (benchmarks/, scripts/) imported as a module for a test."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parent.parent / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_cli(args, capsys, monkeypatch):
    """-> (exit code, stdout, stderr) of `raygrad ARGS` in this process (the console script's main)."""
    from raygrad.cli import main

    monkeypatch.setattr(sys, "argv", ["raygrad", *args])
    with pytest.raises(SystemExit) as exited:
        main()
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def tiny_args(model_dir, texts_file, out_dir, *extra):
    return ["run", "--model", str(model_dir), "--dataset", str(texts_file), "--num-samples", "4",
            "--batch-size", "2", "--max-length", "16", "--workers", "0", "--output-dir", str(out_dir),
            "--no-progress", *extra]


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (to show a failed command changed nothing)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def killed_run(config: RunConfig, dies_at_call: int) -> Path:
    """An in-process run interrupted (KeyboardInterrupt, as Ctrl-C) when its `dies_at_call`-th shard
    starts; returns the run directory (the only one in config.output_dir)."""
    from raygrad.compute.worker import ShardRunner
    from raygrad.engine import run as engine_run

    real_run, calls = ShardRunner.run, []

    def dies(self, shard, *args):
        calls.append(shard)
        if len(calls) == dies_at_call:
            raise KeyboardInterrupt
        return real_run(self, shard, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ShardRunner, "run", dies)
        with pytest.raises(KeyboardInterrupt):
            engine_run(config, echo=lambda _: None, progress=False)
    (run_dir,) = Path(config.output_dir).iterdir()
    return run_dir


def write_many_texts(path: Path) -> Path:
    """48 texts (the longer sample texts, eight copies each): with a shard a text, a run is still going
    when its third checkpoint is seen (the tests that signal a real `raygrad run`)."""
    from tiny import SAMPLE_TEXTS

    texts = [f"{text} (copy {i})" for i in range(8) for text in SAMPLE_TEXTS if len(text.strip()) > 50]
    path.write_text("\n".join(texts) + "\n")
    return path


def many_texts_run_args(model_dir, dataset: Path, out_dir: Path, workers: int, *extra: str) -> list[str]:
    """`raygrad run`'s arguments for write_many_texts' 48 texts, a shard each, a checkpoint after each
    shard, in float64: a run to signal, whose sums equal run_tiny(..., num_samples=48, shard_size=1)'s."""
    return ["run", "--model", str(model_dir), "--dataset", str(dataset), "--num-samples", "48", "--batch-size", "3",
            "--max-length", "24", "--dtype", "float64", "--shard-size", "1", "--checkpoint-seconds", "0",
            "--workers", str(workers), "--output-dir", str(out_dir), "--no-progress", *extra]


def signal_after_checkpoints(process, out_dir: Path, signal_number: int, shards: int = 3,
                             timeout: float = 120) -> tuple[str, str]:
    """Send `signal_number` to a `raygrad run` process once its run in `out_dir` has checkpointed
    `shards` shards (or it ended, or `timeout` s passed) -> its (stdout, stderr) once it has ended."""
    import time

    deadline, done = time.monotonic() + timeout, 0
    try:
        while done < shards and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
            stores = list(Path(out_dir).glob(f"*/{names.STORE_NAME}"))
            if stores and (stores[0] / names.CHECKPOINT_STATE).exists():
                try:
                    done = int(ResultStore.open(stores[0]).totals()[1].sum())
                except Exception:  # read while the writer is mid-checkpoint: look again
                    continue
        process.send_signal(signal_number)
    finally:
        out, err = process.communicate(timeout=timeout)
    return out, err


def read_by_shard(source: dict, layout) -> list[tuple]:
    """Each planned shard read alone: (its texts, rows, fingerprint, skip counts)."""
    from collections import Counter

    from raygrad.dataset.shards import read_rows

    results = []
    for shard in layout.shards:
        counts = Counter()
        texts, rows, fingerprint = read_rows(source, shard, counts)
        results.append((texts, rows, fingerprint, dict(counts)))
    return results
