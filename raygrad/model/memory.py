"""What one worker holds on its devices, estimated before anything loads:
weights (from the model's skeleton on the meta device), SAEs and the
activations of one batch. Printed with the plan; a plan that cannot fit a
device whose memory is known is refused with what would fit."""

from __future__ import annotations

from dataclasses import dataclass

BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30

# Activation bytes kept per token for the backward pass, in units of the model's dtype:
# per decoder layer about 16 x hidden + 3 x intermediate, plus the logits and their
# gradient. Against the peaks measured on an H200 at 4,096 tokens (benchmarks/results/
# gpu_h200_run3.json, peak minus weights): Qwen2.5-0.5B bf16 +5%, fp32 -18%, Gemma-2-2B
# bf16 -10%, Llama-3.1-8B bf16 +38%. A rough guide, not a bound.
HIDDEN_FACTOR, INTERMEDIATE_FACTOR, LOGIT_FACTOR = 16, 3, 2
# --aggregate-by hessian keeps the first backward's graph for the double backward, and runs
# PyTorch's math attention: one batch's peak was 3.02x that of gradients alone (smollm2-135m, CPU,
# 8 x 128 tokens, benchmarks/hessian_cost.py --memory; not yet measured on a GPU).
HESSIAN_ACTIVATION_FACTOR = 3.0


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes
    saes: int
    activations: int  # for one batch of `batch_tokens`
    batch_tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.saes + self.activations

    def describe(self) -> str:
        parts = [f"weights {self.weights / GIB:.1f}"]
        if self.saes:
            parts.append(f"SAEs {self.saes / GIB:.1f}")
        parts.append(f"activations {self.activations / GIB:.1f} for {self.batch_tokens} tokens")
        return f"about {self.total / GIB:.1f} GiB per worker ({', '.join(parts)})"


def weight_sae_token_bytes(skeleton, text_config, dtype: str, sae_widths: list[int] | None = None,
                           sae_dtype: str = "float32") -> tuple[int, int, int]:
    """(weights, SAEs, activations per token) in bytes. `skeleton`: the model on
    the meta device (shared weights are counted once)."""
    weights = sum(p.numel() for p in skeleton.parameters()) * BYTES[dtype]
    intermediate = getattr(text_config, "intermediate_size", None) or 4 * text_config.hidden_size
    per_token = (text_config.num_hidden_layers * (HIDDEN_FACTOR * text_config.hidden_size
                                                  + INTERMEDIATE_FACTOR * intermediate)
                 + LOGIT_FACTOR * text_config.vocab_size) * BYTES[dtype]
    sae_bytes = BYTES["float64" if dtype == "float64" else sae_dtype]
    saes = sum(2 * text_config.hidden_size * width * sae_bytes for width in (sae_widths or []))
    return weights, saes, per_token


def check_fits(memory: MemoryEstimate, device_bytes: int, model: str) -> str | None:
    """None when the estimate fits `device_bytes`, else one line saying what would."""
    if memory.total <= device_bytes:
        return None
    hints = ["--gpus-per-worker 2 or more (the model split across GPUs)",
             f"a smaller --tokens-per-batch (now {memory.batch_tokens})"]
    if memory.saes:
        hints += ["--sae-dtype bfloat16", "fewer --sae-layers-per-pass"]
    return (f"--model {model}: {memory.describe()} does not fit the {device_bytes / GIB:.0f} GiB of this GPU; "
            f"try {', '.join(hints)}")


def sae_layer_groups(num_layers: int, sae_bytes_per_layer: int, free_bytes: int | None = None,
                     requested: int | None = None) -> list[list[int]]:
    """Layer rows per forward+backward: `requested` layers a pass; else as many as `free_bytes`
    (what a GPU has left for SAEs) holds; else (memory unknown, or no SAEs) all in one pass."""
    if requested:
        per_pass = requested
    elif free_bytes is None or sae_bytes_per_layer <= 0:
        per_pass = num_layers
    else:
        per_pass = max(1, free_bytes // sae_bytes_per_layer)
    per_pass = min(per_pass, num_layers)
    return [list(range(start, min(start + per_pass, num_layers))) for start in range(0, num_layers, per_pass)]
