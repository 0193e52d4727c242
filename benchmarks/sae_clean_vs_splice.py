"""--target sae: clean mode (one forward + backward for all layers) against the
original script's per-layer splice loop, same model, samples and SAEs.

  clean      ShardRunner.run with --sae-mode clean: one pass, feature gradients
             by projecting dLoss/dz through each SAE decoder
  splice     the original algorithm: per layer, the output replaced by the SAE
             reconstruction of leaf features, one forward + backward per layer,
             gradients kept at every 4th position
Both aggregate every 4th position (the original's sampling). SAEs are random
sae-lens-format ReLU SAEs, 16,384 wide, written to a temporary directory.

    python benchmarks/sae_clean_vs_splice.py [--layers 0,10,20,29] [--samples 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from one_pass_vs_per_layer import batches, long_texts, per_layer_loop  # noqa: E402
from sae_factory import write_sae_lens_dir  # noqa: E402

from raygrad.compute.worker import ShardRunner  # noqa: E402
from raygrad.config import RunConfig  # noqa: E402
from raygrad.plan import make_plan  # noqa: E402


def splice_loop(model, modules, saes, encoded, stride: int) -> float:
    """The original SAE script: per layer, the output replaced by the reconstruction
    of leaf features; returns seconds."""

    def features_as_leaf(row, output):
        features = saes[row].encode(output.detach()).requires_grad_(True)
        return features, saes[row].decode(features)

    return per_layer_loop(model, modules, encoded, features_as_leaf, stride)


def timed_clean(model_name, texts, layers, sae_dir, args) -> tuple[float, ShardRunner]:
    config = RunConfig(model=model_name, num_samples=len(texts), batch_size=args.batch_size,
                       max_length=args.max_length, layers=layers, workers=0, device="cpu", target="sae",
                       sae_path=str(sae_dir / "sae_{layer}"), position_stride=args.stride)
    runner = ShardRunner(make_plan(config, len(texts), workers=0, device="cpu"))
    runner.computer.compute(texts[: args.batch_size])  # warm-up
    started = time.perf_counter()
    runner.computer.compute(texts)
    return time.perf_counter() - started, runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="0,10,20,29")
    parser.add_argument("--all-layers", default="0-29",
                        help="layer set for the extrapolated all-layer ratio ('none' skips it)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--stride", type=int, default=4)
    args = parser.parse_args()

    texts = long_texts(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        sae_dir = Path(tmp)
        for layer in range(30):
            write_sae_lens_dir(sae_dir / f"sae_{layer}", 576, args.width, hook_name=f"blocks.{layer}.hook_mlp_out",
                               seed=layer)
        clean_s, runner = timed_clean(args.model, texts, args.layers, sae_dir, args)
        encoded = list(batches(runner.tokenizer, texts, args.batch_size, args.max_length))
        tokens = sum(int(b["attention_mask"][:, 1:].sum()) for b in encoded)
        layers = runner.plan.layers
        print(f"{args.model}: layers {layers}, {len(texts)} samples, {tokens} target tokens, "
              f"SAEs {args.width} wide, every {args.stride}th position, {torch.get_num_threads()} threads")
        splice_s = splice_loop(runner.model, runner.modules, runner.saes, encoded, args.stride)
        print(f"clean, one pass        {clean_s:8.1f} s")
        print(f"per-layer splice loop  {splice_s:8.1f} s")
        print(f"speed-up ({len(layers)} layers): {splice_s / clean_s:.1f}x (target >= 4x)")

        if args.all_layers == "none":
            return
        # All layers: the splice loop's cost grows per layer; time one clean pass
        # over all layers and the splice loop on every 5th layer, scaled up.
        all_clean_s, all_runner = timed_clean(args.model, texts, args.all_layers, sae_dir, args)
        sampled = list(range(0, len(all_runner.modules), 5))
        sampled_s = splice_loop(all_runner.model, [all_runner.modules[i] for i in sampled],
                                [all_runner.saes[i] for i in sampled], encoded, args.stride)
        all_splice_s = sampled_s * len(all_runner.modules) / len(sampled)
        print(f"clean, all {len(all_runner.modules)} layers   {all_clean_s:8.1f} s")
        print(f"splice loop, {len(sampled)} of {len(all_runner.modules)} layers {sampled_s:8.1f} s "
              f"-> {all_splice_s:.1f} s estimated for all")
        print(f"speed-up ({len(all_runner.modules)} layers, splice estimated from every 5th layer): "
              f"{all_splice_s / all_clean_s:.1f}x")


if __name__ == "__main__":
    main()
