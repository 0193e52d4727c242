"""Every model family x every hook site against the float64 reference."""

import pytest
import torch
from helpers import run_tiny
from reference import explicit_module, max_relative_error, reference_sums
from tiny import FAMILIES, SAMPLE_TEXTS, build_model_dir
from transformers import AutoConfig, AutoModelForCausalLM

from raygrad import constants as names
from raygrad.errors import RaygradError
from raygrad.model.loading import HOOK_SITES, decoder_layers, resolve_hook_sites

KEPT_TEXTS = [t for t in SAMPLE_TEXTS if len(t.strip()) > 50][:4]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_model_dir(tmp_path_factory.mktemp(family), family)
        return cache[family]

    return get


@pytest.mark.parametrize("site", HOOK_SITES)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_and_site_match_reference(family, site, family_dirs, texts_file, tmp_path):
    model_dir = family_dirs(family)
    _, totals = run_tiny(model_dir, texts_file, tmp_path, layers="0,2", hook_site=site, num_samples=4)
    expected = reference_sums(model_dir, KEPT_TEXTS, [0, 2], max_length=24, site=site)
    for name in names.SUM_ARRAYS:
        assert max_relative_error(totals.sums[name], expected[name]) < 1e-6, name
    assert totals.tokens.tolist() == expected["tokens"].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_resolved_paths_are_the_documented_modules(family, family_dirs):
    model = AutoModelForCausalLM.from_pretrained(family_dirs(family))
    for site in HOOK_SITES:
        (resolved,) = resolve_hook_sites(model, [1], site)
        assert model.get_submodule(resolved.path) is explicit_module(model, 1, site), (family, site)
    assert len(decoder_layers(model)[1]) == 3


def test_unsupported_architecture_lists_the_supported_ones():
    config = AutoConfig.for_model("bert", vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16)
    from raygrad.model.loading import family_of

    with pytest.raises(RaygradError, match=r"architecture 'bert' is not supported; supported model_type values: "
                                           r"gemma, gemma2, gemma3_text, gpt2, gpt_neox, llama, mistral, mixtral"):
        family_of(config)


def test_mixtral_gradient_reaches_experts_through_the_routing_weights(family_dirs):
    """Finite differences on the true function at layer 0's attention output
    (upstream of layer 0's MoE block) agree with raygrad's gradient, and not
    with the gradient one gets when the router's weights are detached: the
    path through the routing softmax is in the gradient."""
    from raygrad.compute.sites import site_gradients

    model = AutoModelForCausalLM.from_pretrained(family_dirs("mixtral"), dtype=torch.float64)
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    model.requires_grad_(False)
    ids = torch.tensor([[0, 5, 17, 42, 99, 7, 63, 120]])
    mask = torch.ones_like(ids)
    attn = model.get_submodule(resolve_hook_sites(model, [0], "attn_out")[0].path)
    grad = site_gradients(model, [attn], ids, mask).grads[0][0]

    router = model.model.layers[0].mlp.gate
    routed = router.forward

    def detached_router(*args, **kwargs):
        return tuple(o.detach() if o.is_floating_point() else o for o in routed(*args, **kwargs))

    router.forward = detached_router
    try:
        no_routing_path = site_gradients(model, [attn], ids, mask).grads[0][0]
    finally:
        router.forward = routed

    def loss_with(delta):
        handle = attn.register_forward_hook(lambda m, a, out: (out[0] + delta, *out[1:]))
        try:
            logits = model(input_ids=ids).logits
        finally:
            handle.remove()
        return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))

    # Mixtral's router takes its softmax in float32 even in a float64 model,
    # so a larger step than usual keeps rounding out of the difference quotient.
    eps = 1e-3
    for t, j in [(2, 3), (5, 10), (6, 31)]:
        e = torch.zeros(1, 8, 32, dtype=torch.float64)
        e[0, t, j] = eps
        numeric = (loss_with(e) - loss_with(-e)) / (2 * eps)
        assert numeric == pytest.approx(float(grad[t, j]), rel=1e-4)
        assert abs(numeric - float(grad[t, j])) < 0.5 * abs(numeric - float(no_routing_path[t, j]))


def test_gemma2_mlp_out_is_what_enters_the_residual_stream(family_dirs):
    """Adding e to the post-feedforward-norm output changes the layer output by exactly e."""
    model = AutoModelForCausalLM.from_pretrained(family_dirs("gemma2"), dtype=torch.float64)
    site = model.get_submodule(resolve_hook_sites(model, [1], "mlp_out")[0].path)
    layer = model.model.layers[1]
    ids = torch.tensor([[0, 5, 17, 42, 99]])
    captured = {}
    layer_hook = layer.register_forward_hook(
        lambda m, a, out: captured.__setitem__("resid", (out[0] if isinstance(out, tuple) else out).clone()))
    try:
        model(input_ids=ids)
        clean = captured["resid"]
        e = torch.randn(1, 5, 32, dtype=torch.float64)
        handle = site.register_forward_hook(lambda m, a, out: out + e)
        try:
            model(input_ids=ids)
        finally:
            handle.remove()
        torch.testing.assert_close(captured["resid"] - clean, e, rtol=0, atol=1e-12)
        # The raw MLP output (`mlp`) is not what enters the stream: the norm rescales it.
        raw = model.get_submodule(resolve_hook_sites(model, [1], "mlp")[0].path)
        handle = raw.register_forward_hook(lambda m, a, out: out + e)
        try:
            model(input_ids=ids)
        finally:
            handle.remove()
        assert (captured["resid"] - clean - e).abs().max() > 1e-3
    finally:
        layer_hook.remove()


def test_exclude_bos_leaves_the_first_position_out(tiny_llama, texts_file, tmp_path):
    _, with_bos = run_tiny(tiny_llama, texts_file, tmp_path / "a", num_samples=4)
    _, without = run_tiny(tiny_llama, texts_file, tmp_path / "b", num_samples=4, exclude_bos=True)
    expected = reference_sums(tiny_llama, KEPT_TEXTS, [0, 1, 2], max_length=24, exclude_bos=True)
    assert max_relative_error(without.sums[names.GRAD_ABS_SUM], expected["grad_abs_sum"]) < 1e-6
    assert (with_bos.tokens - without.tokens).tolist() == [4, 4, 4]  # the tiny tokenizer prepends <s>
    assert without.loss_tokens == with_bos.loss_tokens  # the loss is unchanged
