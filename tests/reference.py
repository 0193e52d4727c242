"""An independent float64 reference: one layer at a time, one sample at a
time (no padding), plain autograd on a leaf tensor that replaces the
module's output. Shares no code with raygrad."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
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


def load_float64(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(model_dir)


def leaf_gradient(model, tokenizer, module, text, max_length):
    """(ids, z, g, loss) for one text: z (T, D) the module's output, g = dLoss/dz,
    loss the summed cross-entropy, from a leaf that replaces the output."""
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
    return ids[0], leaf["z"].detach()[0], leaf["z"].grad[0], loss.item()


def reference_sums(model_dir, texts, layers, max_length, site="mlp_out", exclude_bos=False):
    """-> dict with grad_sum, grad_abs_sum, grad_sq_sum (L, D), tokens (L,), loss_sum."""
    model, tokenizer = load_float64(model_dir)
    width = model.config.hidden_size  # every hook site is residual-stream wide
    out = {k: np.zeros((len(layers), width)) for k in ("grad_sum", "grad_abs_sum", "grad_sq_sum")}
    out["tokens"] = np.zeros(len(layers), dtype=np.int64)
    out["loss_sum"] = 0.0
    for row, layer in enumerate(layers):
        module = explicit_module(model, layer, site)
        for text in texts:
            ids, _, grad, loss = leaf_gradient(model, tokenizer, module, text, max_length)
            g = grad[:-1].numpy()  # the last position predicts nothing
            if exclude_bos and ids[0] == tokenizer.bos_token_id:
                g = g[1:]
            out["grad_sum"][row] += g.sum(0)
            out["grad_abs_sum"][row] += np.abs(g).sum(0)
            out["grad_sq_sum"][row] += (g**2).sum(0)
            out["tokens"][row] += g.shape[0]
            if row == 0:
                out["loss_sum"] += loss
    return out


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def reference_site_tokens(model_dir, texts, layer, max_length, site="mlp_out"):
    """Per sample: (ids, z, g) with z, g (T, D) float64 tensors at one layer."""
    model, tokenizer = load_float64(model_dir)
    module = explicit_module(model, layer, site)
    return [leaf_gradient(model, tokenizer, module, text, max_length)[:3] for text in texts]


def read_sae_lens_weights(sae_dir):
    """W_enc (d, F), b_enc, W_dec (F, d), b_dec and the cfg, read from the files
    with safetensors (not through sae-lens or raygrad)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    weights = {k: v.double() for k, v in load_file(str(Path(sae_dir) / "sae_weights.safetensors")).items()}
    cfg = json.loads((Path(sae_dir) / "cfg.json").read_text())
    return weights, cfg


def relu_sae_encode(weights, cfg, z):
    """A standard (ReLU) SAE's features: relu((z - b_dec?) @ W_enc + b_enc)."""
    x = z - weights["b_dec"] if cfg.get("apply_b_dec_to_input", False) else z
    return torch.relu(x @ weights["W_enc"] + weights["b_enc"])


def reference_splice_all_sums(model_dir, sae_dirs, texts, layers, max_length, stride=1, site="mlp_out"):
    """The SAE substituted at every position, in float64: for each layer, the whole
    output is replaced by decode(f) with f = encode(z) a leaf; dLoss/df per position
    (summed loss), aggregated over positions t with t % stride == 0."""
    model, tokenizer = load_float64(model_dir)
    out = None
    for row, (layer, sae_dir) in enumerate(zip(layers, sae_dirs)):
        weights, cfg = read_sae_lens_weights(sae_dir)
        module = explicit_module(model, layer, site)
        if out is None:
            width = weights["W_enc"].shape[1]
            out = {k: np.zeros((len(layers), width)) for k in ("grad_sum", "grad_abs_sum", "grad_sq_sum")}
            out["tokens"] = np.zeros(len(layers), dtype=np.int64)
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt").input_ids
            leaf = {}

            def splice(mod, args, output):
                leaf["f"] = relu_sae_encode(weights, cfg, output.detach()).requires_grad_(True)
                return leaf["f"] @ weights["W_dec"] + weights["b_dec"]

            handle = module.register_forward_hook(splice)
            try:
                logits = model(ids).logits
            finally:
                handle.remove()
            F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").backward()
            g = leaf["f"].grad[0, :-1][::stride].numpy()
            out["grad_sum"][row] += g.sum(0)
            out["grad_abs_sum"][row] += np.abs(g).sum(0)
            out["grad_sq_sum"][row] += (g**2).sum(0)
            out["tokens"][row] += g.shape[0]
    return out



def reference_site_hessian(model_dir, texts, layers, max_length, site="mlp_out"):
    """Per text: (ids, H), H the exact Hessian of the summed loss w.r.t. the outputs z_l of the hooked
    modules of `layers`, float64, (L*T*D, L*T*D) ordered (layer, position, dim): a zero leaf is added to
    each output (z_l keeps its dependence on earlier layers), and H is one second derivative per element.
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    modules = [explicit_module(model, layer, site) for layer in layers]
    out = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt").input_ids
        leaves = []

        def add_leaf(mod, args, output):
            leaves.append(torch.zeros_like(output, requires_grad=True))
            return output + leaves[-1]

        handles = [module.register_forward_hook(add_leaf) for module in modules]
        try:
            with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no double backward
                logits = model(ids).logits
        finally:
            for handle in handles:
                handle.remove()
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        g = torch.cat([grad.flatten() for grad in torch.autograd.grad(loss, leaves, create_graph=True)])
        # every row at once: the backward of g batched over the unit vectors (vmap)
        rows = torch.autograd.grad(g, leaves, grad_outputs=torch.eye(g.numel(), dtype=g.dtype),
                                   is_grads_batched=True)
        out.append((ids[0], torch.cat([r.flatten(1) for r in rows], 1)))
    return out
