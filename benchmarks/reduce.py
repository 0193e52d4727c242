"""The driver's reduce + checkpoint path under a cluster's load: synthetic shard
results of 26 layers x 65,536 features with every kind (gradients, values,
attribution: 3 sums each) and the site gradient (2,304 wide) go through
`Reducer.add` into a real store, as fast as it takes them.

Prints the partials per second it sustains (target >= 8: eight GPU workers
finishing a shard a second each) and what checkpoints cost. The transfer of
partials from workers (Ray's object store) is not in this figure.

    python benchmarks/reduce.py [--seconds 20] [--checkpoint-seconds 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from raygrad.store.partial import Partial, ShardResult, array_widths
from raygrad.store.reducer import CHECKPOINT_SECONDS, Reducer
from raygrad.store.zarr_store import ResultStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--features", type=int, default=65536)
    parser.add_argument("--site-width", type=int, default=2304)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--checkpoint-seconds", type=float, default=5.0,
                        help=f"shorter than the run's {CHECKPOINT_SECONDS:g} s so several fall in the measurement")
    args = parser.parse_args()

    prefixes = {"grad": args.features, "value": args.features, "attr": args.features, "site_grad": args.site_width}
    widths = array_widths(prefixes)
    rng = np.random.default_rng(0)
    samples = [Partial(sums={name: rng.random((args.layers, width)) for name, width in widths.items()},
                       tokens=np.full(args.layers, 1000, dtype=np.int64), loss_sum=1.0, loss_tokens=1000)
               for _ in range(2)]
    partial_bytes = sum(a.nbytes for a in samples[0].sums.values())
    shards = 100_000  # more than any measurement reaches
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultStore.create(Path(tmp) / "results.zarr", prefixes, shards, list(range(args.layers)), {})
        reducer = Reducer(store, args.checkpoint_seconds, progress=False)
        checkpoints, real_checkpoint = [], reducer.checkpoint

        def timed_checkpoint():
            started = time.perf_counter()
            real_checkpoint()
            checkpoints.append(time.perf_counter() - started)

        reducer.checkpoint = timed_checkpoint
        started = time.perf_counter()
        count = 0
        while time.perf_counter() - started < args.seconds:
            reducer.add(ShardResult(count, samples[count % 2], 0.1, 0.0))
            count += 1
        elapsed = time.perf_counter() - started
        reducer.close()
    rate = count / elapsed
    per_checkpoint = np.mean(checkpoints) if checkpoints else float("nan")
    print(f"partials of {args.layers} layers x {args.features} features, all kinds: "
          f"{partial_bytes / 2**20:.0f} MiB each")
    print(f"reduce + checkpoint: {count} partials in {elapsed:.1f} s = {rate:.1f} partials/s (target >= 8)")
    print(f"checkpoints: {len(checkpoints)}, {per_checkpoint:.2f} s each, {partial_bytes / 2**20:.0f} MiB written "
          f"each (plus as much again applied to the store); at the run's {CHECKPOINT_SECONDS:g} s interval: "
          f"{2 * partial_bytes * 60 / CHECKPOINT_SECONDS / 2**20:.0f} MiB per minute")


if __name__ == "__main__":
    main()
