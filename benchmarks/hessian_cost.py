"""What --aggregate-by hessian and the SAE quality sums cost, on one device, one process.

  gradients        ShardRunner.run with --aggregate-by gradients, every layer
  + hessian K      the same with --aggregate-by gradients hessian --hessian-probes K: the first
                   backward keeps its graph, then one double backward per probe for all layers
  probes undrawn   + hessian K with every probe entry +1 instead of drawn from its key
                   (raygrad.compute.probes): the time it saves is what drawing the probes costs
  sae clean        --target sae, clean mode, as it runs: feature gradients plus the quality sums
                   (encode and decode of every aggregated token for FVU and L0)
  sae, no quality  the same with the quality sums left out (an affine decoder then needs no encoder)
Prints each time and its ratio to the plain run. With --memory, instead: the peak memory one
batch adds beyond the loaded model (each kind in a fresh process, its peak resident set on a CPU
or peak allocation on a GPU), with and without the Hessian's double backward.

    python benchmarks/hessian_cost.py [--model smollm2-135m] [--samples 8] [--probes 1,2] [--memory]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from one_pass_vs_per_layer import long_texts  # noqa: E402
from sae_factory import write_sae_lens_dir  # noqa: E402

from raygrad import constants as names  # noqa: E402
from raygrad.compute import hessian  # noqa: E402
from raygrad.compute.worker import ShardComputer, ShardRunner  # noqa: E402
from raygrad.config import RunConfig  # noqa: E402
from raygrad.plan import make_plan  # noqa: E402


def runner_for(texts, args, **options) -> ShardRunner:
    config = RunConfig(model=args.model, num_samples=len(texts), batch_size=args.batch_size,
                       max_length=args.max_length, workers=0, device=args.device, **options)
    return ShardRunner(make_plan(config, len(texts), workers=0, device=args.device))


def add_runner_options(parser: argparse.ArgumentParser, samples: int) -> None:
    """The options runner_for and best_times read, and the SAE layers and width both benchmarks time."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--sae-layers", default="0,10,20,29")
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2)


def best_times(runners: dict[str, ShardRunner], texts, args) -> dict[str, float]:
    """Seconds per runner for the texts, after one warm-up batch each: the best of --repeats rounds,
    the runners taking turns in each round (so load from other processes hits them alike)."""
    for runner in runners.values():
        runner.computer.compute(texts[: args.batch_size])
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(args.repeats):
        for name, runner in runners.items():
            started = time.perf_counter()
            runner.computer.compute(texts)
            best[name] = min(best[name], time.perf_counter() - started)
    return best


class UndrawnProbes:
    """A runner whose Hessian probes are all +1 rather than drawn (a wrong estimate, the same work)."""

    def __init__(self, runner: ShardRunner):
        self.runner, self.computer = runner, self  # timed as runner.computer.compute(texts)

    def compute(self, texts):
        def ones(batch, agg, k, layer, rows, width, device, dtype):
            return torch.ones(rows.stop - rows.start, width, device=device, dtype=dtype)

        drawn, hessian._probe = hessian._probe, ones
        try:
            return self.runner.computer.compute(texts)
        finally:
            hessian._probe = drawn


def without_quality(runner: ShardRunner) -> ShardRunner:
    """The runner's computer without the SAE quality sums (as raygrad ran before they existed)."""
    c = runner.computer
    prefixes = {p: w for p, w in c.prefixes.items() if p != names.SITE_VALUE_PREFIX}
    runner.computer = ShardComputer(c.model, c.tokenizer, c.modules, prefixes, c.aggregation, c.sizer,
                                    c.max_length, c.device, c.saes)
    return runner


def batch_peak_bytes(args, kinds: tuple[str, ...]) -> int:
    """Peak memory of one batch of --samples texts beyond the loaded model (and one warm-up text)."""
    texts = long_texts(args.samples)
    one_batch = argparse.Namespace(**{**vars(args), "batch_size": args.samples})
    runner = runner_for(texts, one_batch, aggregate_by=kinds)
    runner.computer.compute(texts[:1])
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(runner.device)
        torch.cuda.reset_peak_memory_stats(runner.device)
        runner.computer.compute(texts)
        return torch.cuda.max_memory_allocated(runner.device) - before
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner.computer.compute(texts)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # Linux: KiB


def memory_report(args) -> None:
    context = multiprocessing.get_context("spawn")  # a fresh process per kind: its own peak
    with context.Pool(1, maxtasksperchild=1) as pool:
        plain = pool.apply(batch_peak_bytes, (args, ("gradients",)))
    with context.Pool(1, maxtasksperchild=1) as pool:
        hessian = pool.apply(batch_peak_bytes, (args, ("gradients", "hessian")))
    print(f"{args.model} on {args.device}, one batch of {args.samples} x {args.max_length} tokens, beyond the model:")
    print(f"  gradients      {plain / 2**20:8.0f} MiB")
    print(f"  + hessian      {hessian / 2**20:8.0f} MiB  {hessian / plain:5.2f}x gradients")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runner_options(parser, samples=8)
    parser.add_argument("--probes", default="1,2", help="--hessian-probes values to time")
    parser.add_argument("--memory", action="store_true", help="peak memory of one batch instead of time")
    args = parser.parse_args()
    if args.memory:
        memory_report(args)
        return

    texts = long_texts(args.samples)
    base = runner_for(texts, args)
    tokens = sum(min(len(ids), args.max_length) - 1 for ids in base.tokenizer(texts)["input_ids"])
    print(f"{args.model} on {args.device}: {len(base.plan.layers)} layers, {len(texts)} samples, ~{tokens} "
          f"target tokens, batch {args.batch_size}, {torch.get_num_threads()} threads")
    probes = [int(p) for p in args.probes.split(",")]
    runners = {"plain": base, **{k: runner_for(texts, args, aggregate_by=("gradients", "hessian"), hessian_probes=k)
                                 for k in probes}}
    runners.update({("undrawn", k): UndrawnProbes(runners[k]) for k in probes})
    seconds = best_times(runners, texts, args)
    del runners
    print(f"gradients              {seconds['plain']:8.2f} s")
    for k in probes:
        print(f"+ hessian, {k} probe(s)  {seconds[k]:8.2f} s  {seconds[k] / seconds['plain']:5.2f}x gradients")
        undrawn = seconds[("undrawn", k)]
        print(f"  probes undrawn       {undrawn:8.2f} s  drawing them costs {seconds[k] / undrawn - 1:+6.1%}")

    if args.sae_layers == "none":
        return
    with tempfile.TemporaryDirectory() as tmp:
        layers = [int(x) for x in args.sae_layers.split(",")]
        width = base.plan.site_width
        for layer in layers:
            write_sae_lens_dir(Path(tmp) / f"sae_{layer}", width, args.width,
                               hook_name=f"blocks.{layer}.hook_mlp_out", seed=layer)
        options = dict(target="sae", sae_path=str(Path(tmp) / "sae_{layer}"), layers=args.sae_layers)
        seconds = best_times({"site": runner_for(texts, args, layers=args.sae_layers),
                              "bare": without_quality(runner_for(texts, args, **options)),
                              "quality": runner_for(texts, args, **options)}, texts, args)
        print(f"layers {args.sae_layers}, SAEs {args.width} wide, clean mode:")
        print(f"  site gradients only  {seconds['site']:8.2f} s")
        print(f"  sae, no quality      {seconds['bare']:8.2f} s")
        print(f"  sae with FVU and L0  {seconds['quality']:8.2f} s  {seconds['quality'] / seconds['bare']:5.2f}x "
              "no quality")


if __name__ == "__main__":
    main()
