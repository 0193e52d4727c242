"""An independent float64 reference: one layer at a time, one sample at a
time (no padding), plain autograd on a leaf tensor that replaces the
module's output. Shares no code with raygrad."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer


def explicit_module(model, layer: int, site: str):
    """The hooked module, spelled out per architecture from its modeling code."""
    family = model.config.model_type
    if family == "gpt2":
        block = model.transformer.h[layer]
        mlp, attn = block.mlp, block.attn
    elif family == "gpt_neox":
        block = model.gpt_neox.layers[layer]
        mlp, attn = block.mlp, block.attention
    else:
        block = model.model.layers[layer]
        mlp, attn = block.mlp, block.self_attn
    if site == "resid_post":
        return block
    if family in ("gemma2", "gemma3_text") and site != "mlp":
        # residual += post_norm(block(pre_norm(residual)))
        return block.post_feedforward_layernorm if site == "mlp_out" else block.post_attention_layernorm
    return attn if site == "attn_out" else mlp


def reference_sums(model_dir, texts, layers, max_length, site="mlp_out", exclude_bos=False):
    """-> dict with grad_sum, grad_abs_sum, grad_sq_sum (L, D), tokens (L,), loss_sum."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    width = model.config.hidden_size  # every hook site is residual-stream wide
    out = {k: np.zeros((len(layers), width)) for k in ("grad_sum", "grad_abs_sum", "grad_sq_sum")}
    out["tokens"] = np.zeros(len(layers), dtype=np.int64)
    out["loss_sum"] = 0.0
    for row, layer in enumerate(layers):
        module = explicit_module(model, layer, site)
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt").input_ids
            leaf = {}

            def replace_with_leaf(mod, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                leaf["z"] = hidden.detach().requires_grad_(True)
                return (leaf["z"], *output[1:]) if isinstance(output, tuple) else leaf["z"]

            handle = module.register_forward_hook(replace_with_leaf)
            try:
                logits = model(ids).logits
            finally:
                handle.remove()
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            loss.backward()
            loss = loss.detach()
            g = leaf["z"].grad[0, :-1].numpy()
            if exclude_bos and ids[0, 0] == tokenizer.bos_token_id:
                g = g[1:]
            out["grad_sum"][row] += g.sum(0)
            out["grad_abs_sum"][row] += np.abs(g).sum(0)
            out["grad_sq_sum"][row] += (g**2).sum(0)
            out["tokens"][row] += g.shape[0]
            if row == 0:
                out["loss_sum"] += loss.item()
    return out


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())
