"""The head stays flat: the driver's peak memory and the time to the first computed shard, on
synthetic parquet corpora of 1M, 10M and 100M tokens.

Each size runs in a fresh subprocess (a process's peak memory only grows), which:
  1. starts the real `raygrad.engine.run` on the corpus with --num-samples all, --workers 0 and a
     tiny random model (tests/tiny.py's llama: 3 layers of width 32, built once in the work
     directory; --max-length 128, so each 125-word row gives 127 target tokens), and stops it
     (KeyboardInterrupt, as Ctrl-C) right after the first shard's result reaches the reducer;
  2. resumes that run (`raygrad.engine.resume`) to its first computed shard the same way, and
     counts the parquet rows read meanwhile: only the computed shard's rows, not the dataset's.

Printed per size: the peak RSS of that process (ru_maxrss: its high-water mark, nothing
subtracted), seconds from the start of engine.run to the first shard in the reducer, and the same
for the resume, with the rows it read; then the ratio of the largest corpus's peak to the smallest's.

What the peak includes: everything the driver process holds, i.e. Python, torch, transformers,
pyarrow, the plan and the streaming pass, the store. In-process (--workers 0) the driver also hosts
the worker: the model (tiny here, so the figure is about the driver; a real model adds its
weights and activations, and on Ray they live in the worker processes, not the driver) and the
rows of the shard being computed (one parquet row group at a time).

The corpus: rows of 125 words drawn (Zipf-like, seeded) from a list of common English words, 126
tokens a row by SmolLM2's tokenizer (the sizes are in its tokens; the tiny model's tokenizer cuts
each row at 128); row groups of 8,192 rows.

    python benchmarks/head.py [--tokens 1e6 1e7 1e8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS_PER_ROW = 125
TOKENS_PER_ROW = 126  # SmolLM2's tokenizer on 125 of these words, measured (the corpus sizes are in its tokens)
ROW_GROUP = 8192
WORDS = (
    "the of and to in is was for that on as with by it at from his an were are which this be or had not but "
    "their one they have first new two has after also been who its time her other into more all year years "
    "over most city some would when only during three later may many where about up made there school world "
    "such used part state both between under while well since through however known war before series film "
    "people people four long work any these out these him team national then american second early she "
    "water light river house music small great government number album line high public end around season "
    "north south history name found family home group five life area became because each could game best "
    "including same several did back until old following against last played film country show university "
    "although century called along built day place former being member much often south west major near "
    "without within release won following church top even still published union take left law based county "
    "power under began right local army development main village station form original population system "
    "support general important language island field market order result change king story value model "
    "process level rather second class paper common figure report mountain window garden morning letter "
    "question answer reason simple stone bridge forest animal father mother child doctor teacher engine"
).split()


def write_corpus(path: Path, tokens: int, seed: int = 0) -> int:
    """A parquet file of about `tokens` tokens in one column 'text'; returns its rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocabulary = np.array(WORDS, dtype=object)
    weights = 1.0 / np.arange(1, len(WORDS) + 1)
    weights /= weights.sum()
    rows = max(1, round(tokens / TOKENS_PER_ROW))
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            count = min(ROW_GROUP, rows - start)
            picks = vocabulary[rng.choice(len(WORDS), size=(count, WORDS_PER_ROW), p=weights)]
            texts = [" ".join(words).capitalize() + "." for words in picks]
            writer.write_table(pa.table({"text": texts}, schema=schema), row_group_size=ROW_GROUP)
    return rows


def measure(model: str, corpus: str, output_dir: str) -> dict:
    """In this (fresh) process: run to the first shard, resume to the next; -> the figures."""
    import pyarrow.parquet as pq

    from raygrad import constants as names
    from raygrad.config import RunConfig
    from raygrad.engine import resume, run
    from raygrad.store.reducer import Reducer

    real_add, rows_read, times = Reducer.add, [0], {}
    real_iter = pq.ParquetFile.iter_batches

    def counted_iter(self, *args, **kwargs):  # the parquet rows this process reads
        for batch in real_iter(self, *args, **kwargs):
            rows_read[0] += batch.num_rows
            yield batch

    def first_shard(self, result):
        real_add(self, result)
        times["first"] = time.perf_counter()
        raise KeyboardInterrupt  # as Ctrl-C: the shard is checkpointed, the run resumable

    pq.ParquetFile.iter_batches = counted_iter
    Reducer.add = first_shard
    config = RunConfig(model=model, dataset=corpus, num_samples="all", max_length=128, workers=0,
                       output_dir=output_dir)
    def seconds_to_first_shard(start) -> float:
        started = time.perf_counter()
        try:
            start()
        except KeyboardInterrupt:  # first_shard stops it
            pass
        return times.pop("first") - started

    first = seconds_to_first_shard(lambda: run(config, echo=lambda _: None, progress=False))
    rows_in_run = rows_read[0]
    (run_dir,) = Path(output_dir).iterdir()
    from raygrad.store.zarr_store import ResultStore

    plan = ResultStore.open(run_dir / names.STORE_NAME).attrs[names.ATTR_PLAN]
    if len(plan["shards"]) < 2:  # the run would be done at its first shard, leaving the resume nothing to compute
        sys.exit(f"{corpus}: planned as one shard; the resume needs a second: use --tokens of at least 1.5e5")
    rows_read[0] = 0
    resumed = seconds_to_first_shard(lambda: resume(run_dir, echo=lambda _: None, progress=False))
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "first_shard_seconds": first, "resume_first_shard_seconds": resumed,
            "rows": plan["shards"][-1]["row_stop"], "shards": len(plan["shards"]),
            "est_tokens": sum(shard["est_tokens"] for shard in plan["shards"]),
            "rows_read_run": rows_in_run, "rows_read_resume": rows_read[0],
            "shard_rows": plan["shards"][1]["row_stop"] - plan["shards"][1]["row_start"]}


def tiny_model(workdir: Path) -> Path:
    directory = workdir / "tiny-llama"
    if not (directory / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny import build_model_dir

        directory.mkdir(parents=True, exist_ok=True)
        build_model_dir(directory, "llama")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    parser.add_argument("--workdir", type=Path, default=None, help="Keeps the corpora (default: a temporary one).")
    parser.add_argument("--measure", nargs=3, metavar=("MODEL", "CORPUS", "OUTPUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the subprocess
        print(json.dumps(measure(*args.measure)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        model = tiny_model(workdir)
        rows = []
        for tokens in args.tokens:
            corpus = workdir / f"corpus_{int(tokens)}.parquet"
            if not corpus.exists():
                write_corpus(corpus, int(tokens))
            with tempfile.TemporaryDirectory(dir=workdir) as output_dir:
                done = subprocess.run([sys.executable, __file__, "--measure", str(model), str(corpus), output_dir],
                                      capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{corpus}: the run failed:\n{done.stderr}")
            rows.append((tokens, json.loads(done.stdout.strip().splitlines()[-1])))
    print(f"{'corpus':>8} {'rows':>9} {'shards':>6} {'peak RSS':>10} {'first shard':>12} {'resume: first':>14} "
          f"{'rows read':>10}")
    for tokens, figures in rows:
        print(f"{tokens / 1e6:>7.4g}M {figures['rows']:>9,} {figures['shards']:>6} "
              f"{figures['peak_rss_bytes'] / 2**20:>7.0f} MiB {figures['first_shard_seconds']:>10.1f} s "
              f"{figures['resume_first_shard_seconds']:>12.1f} s {figures['rows_read_resume']:>10,}")
    low, high = rows[0][1]["peak_rss_bytes"], rows[-1][1]["peak_rss_bytes"]
    print(f"peak at {rows[-1][0] / 1e6:.4g}M tokens / peak at {rows[0][0] / 1e6:.4g}M: {high / low:.2f}x "
          "(target <= 1.2x and < 1 GiB)")
    print("rows read: by the resume, before its first shard was computed (the first shard's row groups; "
          "a re-read dataset would be every row)")


if __name__ == "__main__":
    main()
