"""raygrad on one GPU: the one-pass engine against a bare forward+backward and
the per-layer loop, for model shapes a researcher runs, with no network.

Models are built with random weights from the configs in benchmarks/configs
(the compute is the same as with trained weights); texts are the bundled
corpus (stdlib docstrings) joined to fill --max-length tokens of the bundled
tokenizer. Per case:

  raygrad    ShardComputer, --batch-size auto: one forward + one backward per
             batch for every layer, sums in float64 (after one warm-up shard
             that also learns the token budget)
  bare       forward + backward to the input embeddings, same batches, same
             chunked summed loss, no hooks and no sums
  per-layer  the original scripts' loop (one forward + backward per layer),
             timed on the first and last layers (the backward depth falls
             linearly with the layer, so their mean is the average) and
             scaled to every layer

It prints tokens/s, peak GPU memory, model FLOPs utilization and the ratios,
and writes them as JSON (--out). Needs only torch, transformers, accelerate
and numpy: raygrad's Ray, Zarr and sae-lens imports are never reached.

    python benchmarks/gpu.py --tokenizer DIR [--cases qwen-fp32,gemma-sae] [--out gpu.json]
    python benchmarks/gpu.py --dry-run --tokenizer DIR   # tiny model on the CPU, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from one_pass_vs_per_layer import corpus_paragraphs, long_texts, per_layer_loop  # noqa: E402

from raygrad.compute.ablation import AblationSpec  # noqa: E402
from raygrad.compute.batch import Aggregation, make_batch  # noqa: E402
from raygrad.compute.batching import BatchSizer, MemoryProbe, collate, pack_by_tokens  # noqa: E402
from raygrad.compute.sites import summed_loss  # noqa: E402
from raygrad.compute.worker import AblationComputer, ShardComputer  # noqa: E402
from raygrad.constants import KIND_PREFIX, SAE_L0_SUM, SAE_SQ_ERROR_SUM  # noqa: E402
from raygrad.model.loading import resolve_hook_sites  # noqa: E402
from raygrad.model.memory import sae_layer_groups  # noqa: E402
from raygrad.model.saes import DictionaryLearningSAE  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
# Dense peak TFLOP/s (NVIDIA's datasheets, SXM): bf16/fp16 tensor cores; fp32 without TF32,
# which torch leaves off by default and raygrad does not turn on.
PEAK_TFLOPS = {"H100": {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9},
               "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}}


@dataclass(frozen=True)
class Case:
    name: str
    config: str  # file in benchmarks/configs
    dtype: str
    texts: int  # timed texts (after a warm-up shard of the same size)
    sae_width: int = 0  # random SAEs on every layer (0: target mlp)
    sae_dtype: str = "bfloat16"
    per_layer: bool = True
    kinds: tuple[str, ...] = ("gradients",)  # --aggregate-by (hessian: one Rademacher probe per batch)
    sae_layers_per_pass: int = 0  # SAE layers per forward+backward (0: all in one pass)
    top_examples: int = 0  # --top-examples K (0: off)
    layers: tuple[int, ...] = ()  # the layers measured (and given SAEs); empty: every layer
    ablate: int = 0  # raygrad ablate of this many site dimensions (spread over the layers) instead of the run
    ablate_each: bool = False  # with --each: one more forward per dimension, batched as copies


CASES = [
    Case("qwen2.5-0.5b-fp32", "qwen2.5-0.5b.json", "float32", texts=64),
    Case("qwen2.5-0.5b-bf16", "qwen2.5-0.5b.json", "bfloat16", texts=128),
    Case("llama-3.1-8b-bf16", "llama-3.1-8b.json", "bfloat16", texts=48),
    Case("gemma-2-2b-bf16", "gemma-2-2b.json", "bfloat16", texts=64),
    Case("gemma-2-2b-bf16-sae65k", "gemma-2-2b.json", "bfloat16", texts=64, sae_width=65536, per_layer=False),
    Case("gemma-2-2b-bf16-sae65k-f32", "gemma-2-2b.json", "bfloat16", texts=16, sae_width=65536,
         sae_dtype="float32", per_layer=False),
    # Not yet run on a GPU (added after the last GPU session): the Hessian's double backward, and
    # SAEs in two passes (as when they do not fit beside the model), each against its plain case.
    Case("qwen2.5-0.5b-bf16-hessian", "qwen2.5-0.5b.json", "bfloat16", texts=32, per_layer=False,
         kinds=("gradients", "hessian")),
    Case("gemma-2-2b-bf16-sae65k-2passes", "gemma-2-2b.json", "bfloat16", texts=64, sae_width=65536,
         per_layer=False, sae_layers_per_pass=13),
    # --top-examples 16 on every feature of the 26 x 65k SAEs, against gemma-2-2b-bf16-sae65k (target <= 1.15x)
    Case("gemma-2-2b-bf16-sae65k-top16", "gemma-2-2b.json", "bfloat16", texts=64, sae_width=65536,
         per_layer=False, top_examples=16),
    # benchmarks/examples_cost.py's SAE case on a GPU: 4 layers x 16k features, gradients and attribution,
    # without and with --top-examples 16 (target <= 1.15x)
    Case("smollm2-135m-bf16-sae16k-attr", "smollm2-135m.json", "bfloat16", texts=64, sae_width=16384,
         per_layer=False, kinds=("gradients", "attribution"), layers=(0, 10, 20, 29)),
    Case("smollm2-135m-bf16-sae16k-attr-top16", "smollm2-135m.json", "bfloat16", texts=64, sae_width=16384,
         per_layer=False, kinds=("gradients", "attribution"), layers=(0, 10, 20, 29), top_examples=16),
    # raygrad ablate of 8 MLP-output dimensions, jointly and with --each, against qwen2.5-0.5b-bf16's run
    Case("qwen2.5-0.5b-bf16-ablate8", "qwen2.5-0.5b.json", "bfloat16", texts=128, per_layer=False, ablate=8),
    Case("qwen2.5-0.5b-bf16-ablate8-each", "qwen2.5-0.5b.json", "bfloat16", texts=128, per_layer=False, ablate=8,
         ablate_each=True),
]
DRY_CASES = [
    Case("tiny-llama-fp32", "tiny-llama.json", "float32", texts=8),
    Case("tiny-llama-fp32-sae", "tiny-llama.json", "float32", texts=8, sae_width=256, sae_dtype="float32",
         per_layer=False),
    Case("tiny-llama-fp32-hessian", "tiny-llama.json", "float32", texts=8, per_layer=False,
         kinds=("gradients", "hessian")),
    Case("tiny-llama-fp32-sae-2passes", "tiny-llama.json", "float32", texts=8, sae_width=256, sae_dtype="float32",
         per_layer=False, sae_layers_per_pass=1),
    Case("tiny-llama-fp32-sae-top16", "tiny-llama.json", "float32", texts=8, sae_width=256, sae_dtype="float32",
         per_layer=False, top_examples=16),
    Case("tiny-llama-fp32-sae-attr", "tiny-llama.json", "float32", texts=8, sae_width=256, sae_dtype="float32",
         per_layer=False, kinds=("gradients", "attribution"), layers=(0, 2)),
    Case("tiny-llama-fp32-sae-attr-top16", "tiny-llama.json", "float32", texts=8, sae_width=256,
         sae_dtype="float32", per_layer=False, kinds=("gradients", "attribution"), layers=(0, 2), top_examples=16),
    Case("tiny-llama-fp32-ablate8-each", "tiny-llama.json", "float32", texts=8, per_layer=False, ablate=8,
         ablate_each=True),
]


def build_model(case: Case, device: torch.device, vocab_at_least: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    options = {k: v for k, v in json.loads((CONFIGS / case.config).read_text()).items() if not k.startswith("_")}
    options["vocab_size"] = max(options["vocab_size"], vocab_at_least)
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    with device:  # random weights made on the device: an 8B model in seconds, no host copy
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, case.dtype))
    model.requires_grad_(False)
    return model.eval()


def random_saes(model, layers: int, width: int, dtype: torch.dtype, device: torch.device) -> list:
    """BatchTopK-format SAEs with random weights (no sae-lens needed); decoder rows of unit norm."""
    d_in = model.config.hidden_size
    saes = []
    for _ in range(layers):
        w_dec = torch.randn(width, d_in, device=device, dtype=dtype)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        tensors = {"W_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(width, device=device, dtype=dtype),
                   "W_dec": w_dec, "b_dec": torch.zeros(d_in, device=device, dtype=dtype),
                   "threshold": torch.tensor(0.0, device=device, dtype=dtype), "k": 64}
        sae = DictionaryLearningSAE("BatchTopKSAE", tensors, hook_name=None, source="random")
        saes.append(sae.requires_grad_(False))
    return saes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_token(model, positions: float) -> float:
    """Forward + the backward to activations (frozen weights: no weight
    gradients), 2 FLOPs per multiply-add: 4 x the parameters of every Linear,
    plus causal attention (QK^T and AV over `positions` on average, x3 for
    forward + backward)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * positions
    return 4 * linear + 3 * attention


def bare_loop(model, batches, device) -> float:
    synchronize(device)
    started = time.perf_counter()
    for input_ids, mask, labels in batches:
        embeds = model.get_input_embeddings()(input_ids).requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        loss = summed_loss(logits, labels)
        del logits
        torch.autograd.grad(loss, embeds)
    synchronize(device)
    return time.perf_counter() - started


def count_syncs(computer: ShardComputer, texts: list[str], device: torch.device) -> int | None:
    """Host-device synchronizations while computing one shard (CUDA's sync debug mode)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            computer.compute(texts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run_case(case: Case, tokenizer, device: torch.device, max_length: int, gpu: str | None,
             per_layer: bool = True) -> dict:
    started = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(case, device, len(tokenizer))
    layers = list(case.layers) or list(range(model.config.num_hidden_layers))
    modules = [model.get_submodule(site.path) for site in resolve_hook_sites(model, layers, "mlp_out")]
    saes = (random_saes(model, len(layers), case.sae_width, getattr(torch, case.sae_dtype), device)
            if case.sae_width else None)
    prefixes = {KIND_PREFIX[kind]: case.sae_width or model.config.hidden_size for kind in case.kinds}
    if saes:
        prefixes["site_grad"] = model.config.hidden_size
        prefixes["site_value"] = model.config.hidden_size
    probe = MemoryProbe.cuda(device) if device.type == "cuda" else None
    sizer = BatchSizer("auto", probe=probe)
    groups = sae_layer_groups(len(layers), 0, requested=case.sae_layers_per_pass) if case.sae_layers_per_pass else None
    layer_sums = (SAE_SQ_ERROR_SUM, SAE_L0_SUM) if saes else ()
    computer = ShardComputer(model, tokenizer, modules, prefixes, Aggregation(kinds=case.kinds), sizer, max_length,
                             device, saes, groups, [device] * len(layers), layer_sums, layers, case.top_examples)
    if case.ablate:
        computer = ablation_computer(case, model, tokenizer, modules, sizer, max_length, device)
    texts = long_texts(2 * case.texts, chars=6 * max_length)
    warm, timed = texts[:case.texts], texts[case.texts:]
    built = time.perf_counter() - started

    for _ in range(3):  # kernels chosen, token budget measured (it goes on into a second pass if it must)
        computer.compute(warm)
        if not sizer.measuring:
            break
    syncs = count_syncs(computer, warm[: max(1, case.texts // 4)], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    partial = computer.compute(timed)
    synchronize(device)
    raygrad_s = time.perf_counter() - t0
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    token_ids = tokenizer(timed, truncation=True, max_length=max_length)["input_ids"]
    batches = []
    for indices in sizer.batches([len(ids) for ids in token_ids]):
        input_ids, mask = collate([token_ids[i] for i in indices], tokenizer.pad_token_id)
        b = make_batch(input_ids, mask, Aggregation()).to(device)
        batches.append((b.input_ids, b.model_mask, b.labels))
    targets = partial.loss_tokens
    padded = sum(ids.numel() for ids, _, _ in batches)
    bare_s = bare_loop(model, batches, device)

    row = {"case": case.name, "dtype": case.dtype, "layers": len(layers), "texts": len(timed),
           "target_tokens": targets, "padded_tokens": padded, "batch_tokens": sizer.tokens, "batches": len(batches),
           "raygrad_s": raygrad_s, "raygrad_tok_s": targets / raygrad_s, "bare_s": bare_s,
           "bare_tok_s": targets / bare_s, "vs_bare": bare_s / raygrad_s, "peak_gib": peak_gib,
           "syncs_per_shard": syncs, "build_s": built}
    if case.per_layer and per_layer:  # the original's batches: 4 texts, in order
        fixed = ShardComputer(model, tokenizer, modules, prefixes, Aggregation(), BatchSizer("texts", batch_size=4),
                              max_length, device, saes)
        synchronize(device)
        t0 = time.perf_counter()
        fixed.compute(timed)
        synchronize(device)
        row["batch4_tok_s"] = targets / (time.perf_counter() - t0)
        sample = [0, len(layers) - 1]  # backward depth falls linearly with the layer: these two average it
        encoded = [{"input_ids": ids, "attention_mask": mask if mask is not None else torch.ones_like(ids)}
                   for ids, mask, _ in batches]
        synchronize(device)
        sampled_s = per_layer_loop(model, [modules[i] for i in sample], encoded)
        synchronize(device)
        row["per_layer_s"] = sampled_s / len(sample) * len(layers)
        row["per_layer_sampled_layers"] = sample
        row["vs_per_layer"] = row["per_layer_s"] / raygrad_s
    mean_length = padded / sum(ids.shape[0] for ids, _, _ in batches)
    flops = matmul_flops_per_token(model, mean_length / 2) * padded  # a causal position sees half on average
    if saes:
        flops += 2 * model.config.hidden_size * case.sae_width * len(layers) * targets
    row["tflops"] = flops / raygrad_s / 1e12
    peak = next((table[case.dtype] for key, table in PEAK_TFLOPS.items() if gpu and key in gpu), None)
    row["mfu"] = row["tflops"] / peak if peak else None
    del computer, model, saes
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def ablation_computer(case: Case, model, tokenizer, modules, sizer, max_length: int, device: torch.device):
    """raygrad ablate's shard loop for `case.ablate` dimensions zeroed, spread over the first, middle and
    last layers (only their modules hooked, as an ablation's plan does)."""
    layers = sorted({0, len(modules) // 2, len(modules) - 1})
    entries = [(k % len(layers), 1 + k) for k in range(case.ablate)]  # (row among `layers`, dimension)
    spec = AblationSpec(tuple(row for row, _ in entries), tuple(index for _, index in entries), "zero",
                        (0.0,) * len(entries), case.ablate_each)
    return AblationComputer(model, tokenizer, [modules[layer] for layer in layers], spec, sizer, max_length, device)


class _AutogradDecoderSAE(DictionaryLearningSAE):
    """The same SAE with the affine shortcut turned off: dLoss/df by autograd through decode."""

    affine_decoder_weight = None


def check_against_cpu(tokenizer, device: torch.device) -> dict:
    """The CUDA path against the CPU path in float64 on a tiny model: texts of
    mixed lengths packed by the auto budget on the device vs one text per
    batch on the CPU; SAE features by the affine shortcut on the device vs
    autograd through decode on the CPU. Returns the largest relative error."""
    case = Case("check", "tiny-llama.json", "float64", texts=24)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(case, cpu, len(tokenizer))
    layers = list(range(model.config.num_hidden_layers))
    paths = [site.path for site in resolve_hook_sites(model, layers, "mlp_out")]
    saes = random_saes(model, len(layers), 512, torch.float64, cpu)
    texts = corpus_paragraphs(case.texts)  # natural paragraphs: lengths differ, so batches pad
    prefixes = {"grad": 512, "site_grad": model.config.hidden_size}
    probe = MemoryProbe.cuda(device) if device.type == "cuda" else None
    runs = {"device": (device, BatchSizer("auto", probe=probe), DictionaryLearningSAE),
            "reference": (cpu, BatchSizer("texts", batch_size=1), _AutogradDecoderSAE)}
    results = {}
    for name, (where, sizer, sae_class) in runs.items():
        placed = build_model(case, cpu, len(tokenizer))
        placed.load_state_dict(model.state_dict())
        placed.to(where)
        placed_saes = [sae_class("BatchTopKSAE", {**dict(sae.named_buffers()), "k": 64}, hook_name=None,
                                 source="random").to(where) for sae in saes]
        modules = [placed.get_submodule(path) for path in paths]
        computer = ShardComputer(placed, tokenizer, modules, prefixes, Aggregation(), sizer, 256, where, placed_saes)
        results[name] = computer.compute(texts)
    got, want = results["device"], results["reference"]
    errors = {name: float(abs(got.sums[name] - want.sums[name]).max() / abs(want.sums[name]).max())
              for name in want.sums}
    assert (got.tokens == want.tokens).all() and got.loss_tokens == want.loss_tokens
    return {"max_relative_error": max(errors.values()), "per_array": errors,
            "loss_relative_error": abs(got.loss_sum - want.loss_sum) / abs(want.loss_sum)}


def budget_sweep(case: Case, tokenizer, device: torch.device, max_length: int, budgets: list[int]) -> list[dict]:
    """The bare loop at fixed budgets, with the allocator's retries (cudaFree + cudaMalloc after a
    failed allocation): what the auto budget's memory fraction is chosen from."""
    torch.manual_seed(0)
    model = build_model(case, device, len(tokenizer))
    token_ids = tokenizer(long_texts(max(budgets) // max_length * 2, 6 * max_length), truncation=True,
                          max_length=max_length)["input_ids"]
    rows = []
    for budget in budgets:
        batches = []
        for indices in pack_by_tokens([len(ids) for ids in token_ids], budget):
            input_ids, mask = collate([token_ids[i] for i in indices], tokenizer.pad_token_id)
            b = make_batch(input_ids, mask, Aggregation()).to(device)
            batches.append((b.input_ids, b.model_mask, b.labels))
        bare_loop(model, batches[:1], device)
        torch.cuda.reset_peak_memory_stats(device)
        retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
        seconds = bare_loop(model, batches, device)
        rows.append({"budget": budget, "bare_tok_s": sum(ids.numel() for ids, _, _ in batches) / seconds,
                     "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                     "alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - retries})
        print(json.dumps({"sweep": case.name, **rows[-1]}), flush=True)
        del batches
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    header = (f"{'case':26} {'tok/s':>9} {'bare tok/s':>10} {'vs bare':>7} {'per-layer x':>11} {'4-text tok/s':>12} "
              f"{'batch tok':>9} {'peak GiB':>8} {'TFLOP/s':>7} {'MFU':>5} {'syncs':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['case']:26} error: {r['error']}")
            continue
        per_layer = f"{r['vs_per_layer']:.1f}x" if "vs_per_layer" in r else "-"
        batch4 = f"{r['batch4_tok_s']:.0f}" if "batch4_tok_s" in r else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] is not None else "-"
        syncs = str(r["syncs_per_shard"]) if r["syncs_per_shard"] is not None else "-"
        print(f"{r['case']:26} {r['raygrad_tok_s']:9.0f} {r['bare_tok_s']:10.0f} {r['vs_bare']:6.2f}x "
              f"{per_layer:>11} {batch4:>12} {r['batch_tokens']:9d} {peak:>8} {r['tflops']:7.1f} {mfu:>5} {syncs:>5}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the bundled smollm2-135m)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default 1024; 64 dry)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script runs")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--no-per-layer", action="store_true", help="skip the per-layer loop (the slow part)")
    parser.add_argument("--sweep", default=None, help="first, the bare loop of this case at 4k, 16k and 64k tokens")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    if args.tokenizer is None:
        from raygrad.model.loading import resolve_model_path

        args.tokenizer = resolve_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cases = DRY_CASES if args.dry_run else CASES
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in cases if c.name in wanted]
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    max_length = args.max_length or (64 if args.dry_run else 1024)
    print(f"device {gpu or 'cpu'}, torch {torch.__version__}, max length {max_length}, "
          f"tokenizer {args.tokenizer} ({len(tokenizer)} tokens)", flush=True)
    with torch.inference_mode(False):
        check = check_against_cpu(tokenizer, device)
    print(f"check {device.type} (auto-packed, affine shortcut) vs cpu (1 text per batch, autograd), float64: "
          f"max relative error {check['max_relative_error']:.1e}, loss {check['loss_relative_error']:.1e}",
          flush=True)
    sweep = []
    if args.sweep and device.type == "cuda":
        with torch.inference_mode(False):
            sweep = budget_sweep(next(c for c in CASES if c.name == args.sweep), tokenizer, device, max_length,
                                 [4096, 16384, 65536])
    rows = []
    for case in cases:
        case_started = time.perf_counter()
        try:
            with torch.inference_mode(False):
                row = run_case(case, tokenizer, device, max_length, gpu, per_layer=not args.no_per_layer)
        except Exception as err:  # one case failing (too big for this GPU, say) must not cost the others
            traceback.print_exc()
            row = {"case": case.name, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["case_s"] = time.perf_counter() - case_started
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            record = {"device": gpu or "cpu", "torch": torch.__version__, "max_length": max_length,
                      "check": check, "sweep": sweep, "rows": rows}
            Path(args.out).write_text(json.dumps(record, indent=2))
    print_table(rows)
    by_name = {r["case"]: r for r in rows if "error" not in r}
    for name, row in by_name.items():
        if "-ablate" in name:  # raygrad ablate against the run on the same model and texts
            plain = by_name.get(name.split("-ablate", 1)[0])
            if plain:
                print(f"{name}: {plain['raygrad_tok_s'] / row['raygrad_tok_s']:.2f}x the time of {plain['case']}")
            continue
        if "-top" in name:  # --top-examples against the same run without
            plain = by_name.get(name.rsplit("-top", 1)[0])
            if plain:
                print(f"{name}: {plain['raygrad_tok_s'] / row['raygrad_tok_s']:.2f}x the time of {plain['case']} "
                      "(target <= 1.15x)")
            continue
        plain = by_name.get(name.rsplit("-sae", 1)[0]) if "-sae" in name else None
        if plain:
            print(f"{name}: {plain['raygrad_tok_s'] / row['raygrad_tok_s']:.2f}x the time of {plain['case']} "
                  "(target <= 2x)")
    return {"device": gpu or "cpu", "check": check, "rows": rows}


if __name__ == "__main__":
    main()
