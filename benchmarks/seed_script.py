"""raygrad against the seed layer script, whole processes (issue 28: target >= 25x).

The seed layer script is `layer_gradient_analysis.py`, the research script raygrad replaces
(docs/original-scripts.md). It is not in this repository; `--seed FILE` runs its algorithm as
that script runs it, written out here:

  - imports torch, transformers, datasets, tqdm and matplotlib at start;
  - loads the model in float32, in eval mode, its parameters left requiring gradients (the
    script never freezes them, so every forward records the graph of every layer's weights);
  - tokenizes every text with a datasets `map`, padded to --max-length;
  - for each layer: for each batch of 4, a forward hook replaces the layer's MLP output with a
    detached copy that requires its gradient, the loss is transformers' own (labels=input_ids,
    the batch mean), and torch.autograd.grad takes the gradient at that copy alone (so the
    backward stops at the layer); the |gradient| is summed over real positions, divided by their
    count, and kept per batch; the layer's result is the mean over batches;
  - writes nothing (the script's default, without --save_outputs); with --seed-saves, what its
    --save_outputs adds: per layer the result as .npy, a histogram and a per-dimension scatter plot
    (matplotlib PNGs), as a researcher keeping the results runs it.

Side by side, each a fresh Python process on the same texts (32 by default, each at least
--max-length tokens, the benchmark case of one_pass_vs_per_layer.py) and the bundled SmolLM2-135M,
all 30 layers:

  seed      python benchmarks/seed_script.py --seed FILE   (the per-layer algorithm above)
  default   raygrad run (in-process on this machine), its store, exports and plots written

Both first convert the bundled model once (not timed). `--seed-layers` times the seed on fewer layers
(evenly spaced, first and last included) and scales its per-layer seconds to all 30: a layer's backward
depth falls linearly with its index, so the mean over evenly spaced layers is the mean over all.

    python benchmarks/seed_script.py [--samples 32] [--max-length 128] [--repeats 1] [--seed-layers 30]
                                     [--seed-saves]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def seed_process(path: str, max_length: int, layers: list[int], saves: str | None = None,
                 batch_size: int = 4) -> dict:
    """The seed script's work on the texts of `path` (one per line) -> seconds per phase. `saves`: a
    directory for its --save_outputs files (None: none written)."""
    started = time.perf_counter()
    import matplotlib
    import numpy as np
    import torch
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raygrad.model.loading import resolve_model_path

    matplotlib.use("Agg")
    phases = {"imports": time.perf_counter() - started}
    mark = time.perf_counter()
    model_dir = resolve_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # weights not frozen
    phases["model load"] = time.perf_counter() - mark
    mark = time.perf_counter()
    texts = [line for line in Path(path).read_text().splitlines() if len(line.strip()) > 50]
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda rows: tokenizer(rows["text"], truncation=True, padding="max_length", max_length=max_length),
        batched=True, remove_columns=["text"])
    dataset.set_format(type="torch", columns=["input_ids", "attention_mask"])
    batches = DataLoader(dataset, batch_size=batch_size)
    phases["dataset"] = time.perf_counter() - mark
    mark = time.perf_counter()
    results = {}
    for layer in layers:
        module = model.model.layers[layer].mlp
        per_batch = []
        for batch in tqdm(batches, desc=f"Layer {layer}", disable=True):
            leaf = {}

            def as_leaf(mod, args, output):
                leaf["x"] = output.detach().clone().requires_grad_(True)
                return leaf["x"]

            handle = module.register_forward_hook(as_leaf)
            try:
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["input_ids"]).loss
            finally:
                handle.remove()
            (grad,) = torch.autograd.grad(loss, leaf["x"])
            mask = batch["attention_mask"].unsqueeze(-1).to(grad.dtype)
            per_batch.append(((grad * mask).abs().sum((0, 1)) / batch["attention_mask"].sum()).numpy())
        results[layer] = np.mean(per_batch, axis=0)
        if saves:
            save_layer(Path(saves), layer, results[layer])
    phases["layers"] = time.perf_counter() - mark
    phases["layers timed"] = len(layers)
    return phases


def save_layer(directory: Path, layer: int, values) -> None:
    """What the seed's --save_outputs writes per layer: the values, their histogram, and each dimension's value."""
    import matplotlib.pyplot as plt
    import numpy as np

    np.save(directory / f"layer_{layer}_gradients.npy", values)
    plt.figure(figsize=(10, 6))
    plt.hist(values, bins=50, edgecolor="black")
    plt.title(f"Layer {layer}")
    plt.savefig(directory / f"layer_{layer}_gradient_hist.png", dpi=150, bbox_inches="tight")
    plt.close()
    plt.figure(figsize=(12, 6))
    plt.scatter(range(len(values)), values, s=2)
    plt.title(f"Layer {layer}")
    plt.savefig(directory / f"layer_{layer}_feature_scatter.png", dpi=150, bbox_inches="tight")
    plt.close()


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout


def spaced(count: int, total: int = 30) -> list[int]:
    """`count` layers of `total`, evenly spaced, the first and the last included."""
    if count >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="each command this many times; the best is kept")
    parser.add_argument("--seed-layers", type=int, default=30,
                        help="time the seed on this many evenly spaced layers and scale to all 30")
    parser.add_argument("--seed-saves", action="store_true",
                        help="the seed also writes what its --save_outputs writes (npy and two plots per layer)")
    parser.add_argument("--seed", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--saves", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--layers", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seed:
        phases = seed_process(args.seed, args.max_length, [int(x) for x in args.layers.split(",")], args.saves)
        print(json.dumps(phases))
        return

    sys.path.insert(0, str(REPO / "benchmarks"))
    from one_pass_vs_per_layer import long_texts

    layers = spaced(args.seed_layers)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "texts.txt"
        data.write_text("\n".join(long_texts(args.samples, chars=8 * args.max_length)) + "\n")
        seed = [sys.executable, __file__, "--seed", str(data), "--max-length", str(args.max_length),
                "--layers", ",".join(map(str, layers))]
        if args.seed_saves:
            (Path(tmp) / "seed_outputs").mkdir()
            seed[-2:-2] = ["--saves", str(Path(tmp) / "seed_outputs")]
        raygrad = [sys.executable, "-m", "raygrad.cli", "run", "--model", "smollm2-135m", "--dataset", str(data),
                   "--num-samples", str(args.samples), "--max-length", str(args.max_length), "--no-progress"]
        timed([*seed[:-1], "0"])  # converts the bundled model and warms the file cache
        best_seed, best_default, phases = float("inf"), float("inf"), {}
        for repeat in range(args.repeats):  # interleaved, so drift hits both alike
            seconds, out = timed(seed)
            if seconds < best_seed:
                best_seed, phases = seconds, json.loads(out.strip().splitlines()[-1])
            best_default = min(best_default, timed([*raygrad, "--output-dir", f"{tmp}/default{repeat}"])[0])
    scaled = best_seed + phases["layers"] * (30 / len(layers) - 1)  # the untimed layers at the timed ones' mean
    print(f"{args.samples} texts x {args.max_length} tokens, smollm2-135m, 30 layers, best of {args.repeats}")
    print(f"seed      {'with' if args.seed_saves else 'without'} --save_outputs' files")
    print("seed      " + ", ".join(f"{name} {value:.1f} s" for name, value in phases.items() if name != "layers timed")
          + f" ({len(layers)} layers timed)")
    print(f"seed      {scaled:7.1f} s  whole process" + (" (scaled to 30 layers)" if len(layers) < 30 else ""))
    print(f"default   {best_default:7.1f} s  whole process")
    print(f"ratio     {scaled / best_default:5.1f}x  (target >= 25x)")


if __name__ == "__main__":
    main()
