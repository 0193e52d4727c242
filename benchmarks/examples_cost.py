"""What --top-examples K costs, on a worker and on the head.

Worker (the bundled demo model, one process, as ShardRunner computes a shard):
  site             every layer's MLP output (576 dims), gradients, without and with --top-examples K
  sae              random SAEs (--width features) on --sae-layers, gradients and attribution, without
                   and with --top-examples K (each kind ranked: the costliest common case)
Head (the reducer's merge of one shard's examples into the totals, raygrad.store.topk.merge_sorted):
  per partial      seconds to merge a --layers x --features x K partial into totals that already hold
                   S shards (the pruned merge touches only the cells the new shard enters: about K / S),
                   and the partial's bytes
Prints each time and its ratio to the run without examples.

    python benchmarks/examples_cost.py [--samples 16] [--k 16] [--width 16384] [--head-layers 26 --features 65536]
                                       [--only worker|site|sae|head] [--clock wall|cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hessian_cost import add_runner_options, runner_for  # noqa: E402
from one_pass_vs_per_layer import long_texts  # noqa: E402
from sae_factory import write_sae_lens_dir  # noqa: E402

from raygrad.store import topk  # noqa: E402


def best_times(runners: dict, texts, args) -> dict[str, float]:
    """hessian_cost.best_times on --clock: wall seconds, or CPU seconds of the process (all its threads:
    steadier than wall time on a machine other processes load; with --threads 1, one thread's work)."""
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for runner in runners.values():
        runner.computer.compute(texts[: args.batch_size])
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(args.repeats):
        for name, runner in runners.items():
            started = clock()
            runner.computer.compute(texts)
            best[name] = min(best[name], clock() - started)
    return best


def worker_costs(args, cases=("site", "sae")) -> None:
    texts = long_texts(args.samples)
    base = runner_for(texts, args)
    tokens = sum(min(len(ids), args.max_length) - 1 for ids in base.tokenizer(texts)["input_ids"])
    print(f"{args.model} on {args.device}: {len(texts)} samples, ~{tokens} target tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, K = {args.k}, {args.clock} seconds")
    if "site" in cases:
        seconds = best_times({"plain": base, "top": runner_for(texts, args, top_examples=args.k)}, texts, args)
        print(f"site, {len(base.plan.layers)} layers x {base.plan.width}, gradients:")
        print(f"  without examples     {seconds['plain']:8.2f} s")
        print(f"  --top-examples {args.k:<4}  {seconds['top']:8.2f} s  {seconds['top'] / seconds['plain']:5.2f}x")
    if "sae" not in cases:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for layer in map(int, args.sae_layers.split(",")):
            write_sae_lens_dir(Path(tmp) / f"sae_{layer}", base.plan.site_width, args.width,
                               hook_name=f"blocks.{layer}.hook_mlp_out", seed=layer)
        options = dict(target="sae", sae_path=str(Path(tmp) / "sae_{layer}"), layers=args.sae_layers,
                       aggregate_by=("gradients", "attribution"))
        seconds = best_times({"plain": runner_for(texts, args, **options),
                              "top": runner_for(texts, args, top_examples=args.k, **options)}, texts, args)
    print(f"sae, layers {args.sae_layers} x {args.width} features, gradients and attribution:")
    print(f"  without examples     {seconds['plain']:8.2f} s")
    print(f"  --top-examples {args.k:<4}  {seconds['top']:8.2f} s  {seconds['top'] / seconds['plain']:5.2f}x")


def random_tables(rng, layers: int, features: int, k: int, shard: int, rows_per_shard: int) -> dict:
    """A shard's tables, as a worker sends them: full (every token has a nonzero gradient), sorted, rows
    within the shard's row range, |score| drawn from one distribution for every shard."""
    score = np.sort(rng.standard_exponential((layers, features, k)).astype(np.float32), axis=-1)[..., ::-1]
    row = rng.integers(shard * rows_per_shard, (shard + 1) * rows_per_shard, size=score.shape)
    position = rng.integers(0, 128, size=score.shape).astype(np.int32)
    return {"score": np.ascontiguousarray(score), "row": row, "position": position}


def head_costs(args) -> None:
    rng = np.random.default_rng(0)
    tables = lambda shard: random_tables(rng, args.head_layers, args.features, args.k, shard, 1000)  # noqa: E731
    totals = tables(0)
    nbytes = sum(value.nbytes for value in totals.values())
    print(f"head: one partial's examples {args.head_layers} x {args.features} x {args.k} = {nbytes / 2**20:.0f} MiB "
          f"per ranked kind; the reducer's merge of one more shard into totals holding S shards:")
    merged = 1
    for target in (1, 4, 16, 64):
        while merged < target:  # bring the totals to `target` shards (untimed)
            totals = topk.merge_sorted(totals, tables(merged))
            merged += 1
        partial = tables(merged)
        started = time.perf_counter()
        topk.merge_sorted(totals, partial)
        print(f"  S = {target:4}  {time.perf_counter() - started:7.2f} s per partial")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runner_options(parser, samples=16)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--head-layers", type=int, default=26)
    parser.add_argument("--features", type=int, default=65536)
    parser.add_argument("--only", choices=("worker", "site", "sae", "head"), default=None,
                        help="one part: the worker's two cases, one of them, or the head's merge")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time the worker's cases by wall seconds or by the process's CPU seconds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only != "head":
        worker_costs(args, ("site", "sae") if args.only in (None, "worker") else (args.only,))
    if args.only in (None, "head"):
        head_costs(args)


if __name__ == "__main__":
    main()
