"""What --top-examples' per-chunk ranking costs on its own, in CPU seconds of one thread (so that other
processes on a shared machine change it little): examples_cost.py's SAE case without the model, the
accumulator fed random scores of the same shapes. 4 batches of 508 tokens, 4 layers, 16,384 features,
gradients (dense) and attribution (half zeros), K = 16; the three sums alone for scale.

Prints the sums' seconds, the sums + ranking seconds, and their difference. To compare two versions, run
it with each on PYTHONPATH, taking turns:

    PYTHONPATH=/tmp/topk_before python benchmarks/ranking_cost.py --label before
    PYTHONPATH=. python benchmarks/ranking_cost.py --label after
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from raygrad.compute.accumulator import DeviceAccumulator

TOKENS, LAYERS, BATCHES = 508, 4, 4  # examples_cost.py's 16 texts of 128 tokens, batch 4, layers 0,10,20,29


class _Batch:
    """What begin_batch reads: each aggregated position's dataset row and token position."""
    token_rows = np.repeat(np.arange(4), TOKENS // 4)
    token_positions = np.tile(np.arange(TOKENS // 4), 4).astype(np.int32)


def seconds(scores: list[list[dict]], width: int, k: int) -> float:
    """CPU seconds to add every batch's scores to a fresh accumulator (top_k = k; 0: sums only)."""
    acc = DeviceAccumulator(LAYERS, {"grad": width, "attr": width}, torch.device("cpu"), top_k=k)
    started = time.process_time()
    for batch in scores:
        staged = acc.empty_like()
        staged.begin_batch(_Batch)
        for layer, by_prefix in enumerate(batch):
            for prefix, x in by_prefix.items():
                staged.add(prefix, layer, x, 0)
        acc.merge(staged)
    acc.to_partial()
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="this version")
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    scores = []
    for _ in range(BATCHES):
        grads = [torch.randn(TOKENS, args.width, generator=generator) for _ in range(LAYERS)]
        scores.append([{"grad": g, "attr": g * (torch.rand(g.shape, generator=generator) < 0.5)} for g in grads])
    best = {0: float("inf"), args.k: float("inf")}
    for _ in range(args.repeats):
        for k in best:
            best[k] = min(best[k], seconds(scores, args.width, k))
    print(f"{args.label}: sums {best[0]:.2f} s, sums + top-{args.k} {best[args.k]:.2f} s, "
          f"ranking {best[args.k] - best[0]:.2f} s (CPU seconds, 1 thread, best of {args.repeats})")


if __name__ == "__main__":
    main()
