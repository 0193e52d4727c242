"""What a user waits for: whole processes, start-up, loading and exports included.

Side by side, each a fresh Python process on the same texts (the bundled
corpus joined into texts of at least --max-length tokens, one per line of a
.txt file) and the bundled SmolLM2-135M, all 30 layers:

  bare         python: import torch + transformers, load the model, read the
               file, forward + backward to the input embeddings in batches
               of 4 texts, exit
  default      raygrad run (one device, no --address: in-process)
  workers 1    raygrad run --workers 1 (a local Ray and one actor)

Targets (issue 9): default <= 1.15x bare, --workers 1 <= 1.3x bare.

    python benchmarks/whole_process.py [--samples 48] [--max-length 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bare(path: str, max_length: int) -> None:
    """The baseline process's work (run with --bare FILE)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raygrad.model.loading import resolve_model_path

    model_dir = resolve_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False).eval()
    texts = [line for line in Path(path).read_text().splitlines() if len(line.strip()) > 50]
    for start in range(0, len(texts), 4):
        batch = tokenizer(texts[start:start + 4], padding="longest", truncation=True, max_length=max_length,
                          return_tensors="pt")
        embeds = model.get_input_embeddings()(batch["input_ids"]).requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum")
        torch.autograd.grad(loss, embeds)


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="each command this many times; the best is kept")
    parser.add_argument("--bare", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare(args.bare, args.max_length)
        return

    sys.path.insert(0, str(REPO / "benchmarks"))
    from one_pass_vs_per_layer import long_texts

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "texts.txt"
        data.write_text("\n".join(long_texts(args.samples, chars=8 * args.max_length)) + "\n")
        raygrad = [sys.executable, "-m", "raygrad.cli", "run", "--model", "smollm2-135m", "--dataset", str(data),
                   "--num-samples", str(args.samples), "--max-length", str(args.max_length), "--no-progress"]
        commands = {
            "bare": [sys.executable, __file__, "--bare", str(data), "--max-length", str(args.max_length)],
            "default": [*raygrad, "--output-dir", f"{tmp}/default"],
            "workers 1": [*raygrad, "--workers", "1", "--output-dir", f"{tmp}/ray"],
        }
        timed(commands["bare"])  # first use converts the bundled model and warms the file cache
        best = {name: float("inf") for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():  # interleaved, so drift hits every command alike
                best[name] = min(best[name], timed(command))
    print(f"{args.samples} texts x {args.max_length} tokens, smollm2-135m, 30 layers, best of {args.repeats}")
    for name, seconds in best.items():
        print(f"{name:10} {seconds:7.1f} s  {seconds / best['bare']:5.2f}x bare")
    print("targets: default <= 1.15x, workers 1 <= 1.3x")


if __name__ == "__main__":
    main()
