"""What `raygrad ablate` costs beside a plain run on the same texts, on one worker (the bundled demo model,
one process, as ShardRunner computes a shard):

  run              gradients at the features' layers (one forward + backward per batch): the baseline
  ablate           the same texts, --features (8 site dimensions by default), jointly: the clean forward +
                   backward (per-text loss, g at the dimensions) and one forward with the intervention
  ablate --each    the same, and each dimension alone: 1 + 8 ablated forwards per batch, run together as
                   copies of the batch (compute/ablation.py ABLATED_TOKENS_PER_FORWARD padded tokens a forward)

The three take turns in each of --repeats rounds (best time kept), so load from other processes hits
them alike. Prints each time and its ratio to the run.

    python benchmarks/ablate_cost.py [--samples 16] [--features 10:1,10:2,...] [--device cpu] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hessian_cost import add_runner_options, best_times  # noqa: E402
from one_pass_vs_per_layer import long_texts  # noqa: E402

from raygrad.analysis.ablation import parse_features  # noqa: E402
from raygrad.compute.ablation import AblationSpec  # noqa: E402
from raygrad.compute.worker import ShardRunner  # noqa: E402
from raygrad.config import RunConfig  # noqa: E402
from raygrad.plan import make_plan  # noqa: E402

DEFAULT_FEATURES = "10:1,10:2,10:3,10:4,20:1,20:2,20:3,20:4"


def runners(texts, args) -> dict[str, ShardRunner]:
    """The run's runner at the features' layers, and the ablation's two on the same plan."""
    entries = parse_features(args.features)
    layers = sorted({layer for layer, _ in entries})
    config = RunConfig(model=args.model, num_samples=len(texts), batch_size=args.batch_size, max_length=args.max_length,
                       workers=0, device=args.device, layers=",".join(map(str, layers)))
    plan = make_plan(config, len(texts), workers=0, device=args.device)

    def ablation(each: bool) -> ShardRunner:
        spec = AblationSpec(tuple(layers.index(layer) for layer, _ in entries), tuple(i for _, i in entries), "zero",
                            (0.0,) * len(entries), each)
        return ShardRunner(dataclasses.replace(plan, ablation=spec.to_dict()))

    return {"run": ShardRunner(plan), "ablate": ablation(False), "each": ablation(True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runner_options(parser, samples=16)
    parser.add_argument("--features", default=DEFAULT_FEATURES, help="LAYER:INDEX,... site dimensions to ablate")
    args = parser.parse_args()
    texts = long_texts(args.samples)
    timed = runners(texts, args)
    count = len(parse_features(args.features))
    tokens = sum(min(len(ids), args.max_length) - 1 for ids in timed["run"].tokenizer(texts)["input_ids"])
    print(f"{args.model} on {args.device}: {len(texts)} samples, ~{tokens} target tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {count} dimensions ({args.features}), best of {args.repeats}")
    seconds = best_times(timed, texts, args)
    base = seconds["run"]
    print(f"  {'run (gradients, same layers)':<34}{base:8.2f} s  1.00x")
    print(f"  {'ablate, jointly':<34}{seconds['ablate']:8.2f} s  {seconds['ablate'] / base:5.2f}x")
    print(f"  {f'ablate --each ({count} alone)':<34}{seconds['each']:8.2f} s  {seconds['each'] / base:5.2f}x")


if __name__ == "__main__":
    main()
