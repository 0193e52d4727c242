"""raygrad's one-pass engine against the original per-layer algorithm.

Same model, same samples, one process:
  raygrad    ShardRunner.run: one forward + one backward per batch for all layers
  per-layer  the original scripts' algorithm: for each layer, a forward with
             that layer's MLP output made a leaf, and a backward to it
  bare       forward + backward to the input embeddings, no hooks, no sums
Prints the per-layer / raygrad speed ratio (target >= 20x on 30 layers) and
raygrad's tokens/s against the bare loop (target >= 0.9x).

    python benchmarks/one_pass_vs_per_layer.py [--samples 32] [--max-length 128]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from raygrad.compute.sites import summed_loss
from raygrad.compute.worker import ShardRunner
from raygrad.config import RunConfig
from raygrad.dataset.text import stdlib_paragraphs
from raygrad.plan import make_plan

_CORPUS: list[str] = []  # the bundled corpus's paragraphs read so far, in order
_UNREAD = stdlib_paragraphs()  # the rest; read only as far as asked (all of it: seconds of parsing)


def _read_corpus(count: int | None) -> None:
    """Read the bundled corpus until `count` paragraphs (None: all) are in _CORPUS, or it ends."""
    _CORPUS.extend(itertools.islice(_UNREAD, None if count is None else max(0, count - len(_CORPUS))))


def corpus_paragraphs(count: int | None = None) -> list[str]:
    """The bundled corpus's first `count` paragraphs (None: all); each read once per process."""
    _read_corpus(count)
    return _CORPUS[:count]


def long_texts(count: int, chars: int = 900) -> list[str]:
    """`count` texts of bundled-corpus paragraphs joined until each has at least
    `chars` characters (enough to fill max_length tokens); the corpus is reused
    from its start when a benchmark needs more (the compute does not depend on
    the words)."""
    texts, current, index = [], "", 0
    while len(texts) < count:
        _read_corpus(index + 1)
        if index >= len(_CORPUS):  # past the corpus's end: from its start again
            index = 0
            continue
        current = f"{current} {_CORPUS[index]}".strip()
        index += 1
        if len(current) >= chars:
            texts.append(current)
            current = ""
    return texts


def batches(tokenizer, texts, batch_size, max_length):
    for start in range(0, len(texts), batch_size):
        yield tokenizer(texts[start:start + batch_size], padding="longest", truncation=True,
                        max_length=max_length, return_tensors="pt")


def sum_loss(logits, input_ids, attention_mask):
    """raygrad's summed loss (chunked over positions when logits are large), so
    every loop compared here pays the same for the loss."""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return summed_loss(logits, labels)


def output_as_leaf(row: int, output):
    """The original layer script: the layer's output itself is the leaf."""
    leaf = output.detach().requires_grad_(True)
    return leaf, leaf


def per_layer_loop(model, modules, encoded, make_leaf=output_as_leaf, stride: int = 1) -> float:
    """One forward + backward per layer and batch, the original scripts' algorithm.

    `make_leaf(row, output) -> (leaf, replacement)`: the tensor whose gradient is
    kept and what the hooked module returns instead of `output`. Returns seconds."""
    started = time.perf_counter()
    for row, module in enumerate(modules):
        total = None
        for batch in encoded:
            leaf = {}

            def hook(mod, args, output):
                leaf["x"], replacement = make_leaf(row, output)
                return replacement

            handle = module.register_forward_hook(hook)
            try:
                logits = model(**batch, use_cache=False).logits
            finally:
                handle.remove()
            sum_loss(logits, batch["input_ids"], batch["attention_mask"]).backward()
            g = leaf["x"].grad[:, :-1:stride].double().abs().sum((0, 1))
            total = g if total is None else total + g
    return time.perf_counter() - started


def bare_loop(model, encoded) -> float:
    started = time.perf_counter()
    for batch in encoded:
        embeds = model.get_input_embeddings()(batch["input_ids"]).requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False).logits
        sum_loss(logits, batch["input_ids"], batch["attention_mask"]).backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--layers", default=None, help="default: every layer")
    args = parser.parse_args()

    texts = long_texts(args.samples)
    config = RunConfig(model=args.model, num_samples=args.samples, batch_size=args.batch_size,
                       max_length=args.max_length, layers=args.layers, workers=0, device="cpu")
    plan = make_plan(config, len(texts), workers=0, device="cpu")
    runner = ShardRunner(plan)
    model, tokenizer = runner.model, runner.tokenizer
    encoded = list(batches(tokenizer, texts, args.batch_size, args.max_length))
    tokens = sum(int(b["attention_mask"][:, 1:].sum()) for b in encoded)
    print(f"{args.model}: {len(plan.layers)} layers, {len(texts)} samples, {tokens} target tokens, "
          f"{torch.get_num_threads()} threads")

    runner.computer.compute(texts[: args.batch_size])  # warm-up: first-call allocations and kernel selection
    bare_loop(model, encoded[:1])

    started = time.perf_counter()
    runner.computer.compute(texts)
    raygrad_s = time.perf_counter() - started
    bare_s = bare_loop(model, encoded)
    print(f"raygrad one pass     {raygrad_s:8.1f} s  {tokens / raygrad_s:8.1f} tokens/s")
    print(f"bare single pass     {bare_s:8.1f} s  {tokens / bare_s:8.1f} tokens/s")
    per_layer_s = per_layer_loop(model, runner.modules, encoded)
    print(f"per-layer loop       {per_layer_s:8.1f} s  {tokens / per_layer_s:8.1f} tokens/s")
    print(f"speed-up vs per-layer loop: {per_layer_s / raygrad_s:.1f}x (target >= 20x)")
    print(f"tokens/s vs bare single pass: {bare_s / raygrad_s:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    with torch.inference_mode(False):
        main()
