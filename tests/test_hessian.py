"""--aggregate-by hessian: Hutchinson's estimate of diag(d2Loss/dz2) against exact float64 Hessians.

For a symmetric H and a Rademacher probe v, v_i (Hv)_i = H_ii + sum_{j != i} H_ij v_i v_j: the tests check
(1) one probe's estimate is exactly v * (Hv) with the exact H (so only the probe is random), and (2) the
mean over K probes lands within a few standard errors of the exact diagonal, the standard error computed
from the same exact H (so a biased or mis-scaled estimator fails)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rms_norm_float64, run_tiny
from reference import explicit_module, read_sae_lens_weights, reference_site_hessian, relu_sae_encode
from sae_factory import write_sae_lens_dir
from tiny import SAMPLE_TEXTS
from torch.nn.attention import SDPBackend, sdpa_kernel

from raygrad import constants as names
from raygrad.compute.accumulator import DeviceAccumulator
from raygrad.compute.batch import IGNORE_INDEX, Aggregation, make_batch
from raygrad.compute.grads import accumulate_batch
from raygrad.compute.probes import rademacher, token_keys
from raygrad.compute.sites import summed_loss
from raygrad.config import RunConfig
from raygrad.errors import RaygradError

TEXTS = [t for t in SAMPLE_TEXTS if len(t.strip()) > 50][:3]  # the first 3 texts a run on texts_file reads
LENGTH = 12  # tokens per text: Hessians of 3 layers x 12 positions x 32 dims stay small
WIDTH = 32


@pytest.fixture(autouse=True)
def float64_norm(monkeypatch):
    """transformers computes RMSNorm in float32 even in a float64 model; exact Hessians need float64."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm_float64)


def drawn_probe(row: int, layer: int, probe: int, positions, width: int, seed: int = 0) -> torch.Tensor:
    """(len(positions), width) float64: the probe raygrad draws for these positions of the text at dataset
    row `row` (a pure function of what is computed; test_probes_* check it is a fair Rademacher draw)."""
    positions = np.asarray(positions)
    keys = token_keys(seed, np.full(len(positions), row), positions, layer, probe)
    return rademacher(keys, width, "cpu", torch.float64)


def load_float64(model_dir):
    from raygrad.model.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(str(model_dir), torch.device("cpu"), torch.float64)


def site_module(model, layer):
    from raygrad.model.loading import resolve_hook_sites

    return model.get_submodule(resolve_hook_sites(model, [layer], "mlp_out")[0].path)


def one_text_batch(tokenizer, text, agg, row):
    ids = tokenizer(text, truncation=True, max_length=LENGTH, return_tensors="pt").input_ids
    return make_batch(ids, torch.ones_like(ids), agg, rows=[row])


def stat_sums(x: torch.Tensor) -> dict[str, np.ndarray]:
    return {"sum": x.sum(0).numpy(), "abs_sum": x.abs().sum(0).numpy(), "sq_sum": (x**2).sum(0).numpy()}


def assert_sums(partial, prefix, expected: dict, rtol):
    for stat, value in expected.items():
        np.testing.assert_allclose(partial.sums[f"{prefix}_{stat}"][0], value, rtol=rtol, err_msg=stat)


# ---------------------------------------------------------------- building blocks


def test_chunked_checkpointed_loss_has_the_exact_second_derivative():
    """summed_loss recomputes its chunks in the backward (checkpointing); a double backward through it
    gives the softmax Hessian: per target row, H v = p * v - p (p . v), p = softmax(logits)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[1, 3:] = IGNORE_INDEX
    v = torch.randn(2, 5, 7, dtype=torch.float64, generator=gen)
    loss = summed_loss(logits, labels, chunk_elements=3 * 7)  # 4 chunks of 3 positions
    (g,) = torch.autograd.grad(loss, logits, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), logits)
    p = torch.softmax(logits.detach(), -1)
    expected = (p * v - p * (p * v).sum(-1, keepdim=True)) * (labels != IGNORE_INDEX)[..., None]
    np.testing.assert_allclose(hv.numpy(), expected.numpy(), rtol=1e-12, atol=1e-15)


def test_probes_are_independent_fair_signs():
    """4,000 tokens x 256 dims: every entry +-1; each sign with probability 1/2; no two dimensions and
    no two tokens correlated beyond sampling noise (a shared or shifted stream would be)."""
    rows, positions = np.repeat(np.arange(40), 100), np.tile(np.arange(100), 40)
    v = rademacher(token_keys(7, rows, positions, 3, 0), 256, "cpu", torch.float64)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(v.mean())) < 4 / np.sqrt(v.numel())
    for gram, samples in ((v.T @ v, v.shape[0]), (v @ v.T, v.shape[1])):  # dimensions, tokens
        gram = gram / samples
        gram.fill_diagonal_(0)
        assert float(gram.abs().max()) < 6.5 / np.sqrt(samples)  # max of ~8e6 pairs of N(0, 1/samples)
        assert 0.9 < float(gram.pow(2).sum() / (gram.numel() - gram.shape[0]) * samples) < 1.1


def test_a_probe_is_a_function_of_what_is_computed():
    """A token's signs depend on (seed, row, layer, probe, position) only: drawn alone, in another order
    or among other tokens they are the same; changing any one part of the key redraws them."""
    rows, positions = np.array([5, 5, 5, 9, 9]), np.array([0, 1, 2, 0, 1])
    whole = rademacher(token_keys(1, rows, positions, 2, 0), 300, "cpu", torch.float32)
    order = [4, 0, 3]
    assert torch.equal(rademacher(token_keys(1, rows[order], positions[order], 2, 0), 300, "cpu", torch.float32),
                       whole[order])
    for changed in (token_keys(2, rows, positions, 2, 0), token_keys(1, rows + 1, positions, 2, 0),
                    token_keys(1, rows, positions, 3, 0), token_keys(1, rows, positions, 2, 1),
                    token_keys(1, rows, positions + 1, 2, 0)):
        agree = (rademacher(changed, 300, "cpu", torch.float32) == whole).float().mean()
        assert 0.4 < float(agree) < 0.6  # independent signs agree half the time


def test_hessian_probes_below_one_is_one_line(capsys, monkeypatch):
    import sys

    from raygrad.cli import main

    with pytest.raises(RaygradError, match=r"^--hessian-probes 0: must be an integer >= 1$"):
        RunConfig(aggregate_by=("hessian",), hessian_probes=0)
    monkeypatch.setattr(sys, "argv", ["raygrad", "run", "--aggregate-by", "hessian", "--hessian-probes", "-1"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: --hessian-probes -1: must be an integer >= 1\n"


def test_hessian_probes_without_the_hessian_kind_is_one_line(capsys, monkeypatch, tmp_path):
    """--hessian-probes asks for something only --aggregate-by hessian does: refused, nothing written."""
    import sys

    from raygrad.cli import main

    monkeypatch.setattr(sys, "argv", ["raygrad", "run", "--hessian-probes", "3", "--output-dir", str(tmp_path / "out"),
                                      "--aggregate-by", "gradients"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert capsys.readouterr().err == ("error: --hessian-probes 3: only --aggregate-by hessian draws probes; add "
                                       "--aggregate-by hessian, or drop --hessian-probes\n")
    assert not (tmp_path / "out").exists()
    RunConfig(aggregate_by=("gradients", "hessian"), hessian_probes=3)  # with the kind it is fine


# ---------------------------------------------------------------- one probe, exactly


def test_one_probe_is_v_times_the_exact_hessian_vector_product(tiny_llama):
    """Site target, one layer, two probes per token: the per-token estimate is the mean over the probes
    of v * (H v), H the exact Hessian w.r.t. the site's output over every position of the text, v the
    probe of (text's row, model layer 1, probe k, position)."""
    model, tokenizer = load_float64(tiny_llama)
    agg = Aggregation(kinds=("gradients", "hessian"), hessian_probes=2)
    acc = DeviceAccumulator(1, {"grad": WIDTH, "hess": WIDTH}, torch.device("cpu"))
    estimates = []
    for row, (ids, hessian) in enumerate(reference_site_hessian(tiny_llama, TEXTS, [1], LENGTH)):
        accumulate_batch(model, [site_module(model, 1)], one_text_batch(tokenizer, TEXTS[row], agg, 10 + row),
                         acc, agg, layers=[1])
        length = ids.numel()
        estimate = torch.zeros(length, WIDTH, dtype=torch.float64)
        for k in range(2):
            v = torch.zeros(length, WIDTH, dtype=torch.float64)
            v[:-1] = drawn_probe(10 + row, 1, k, range(length - 1), WIDTH)  # every position but the last
            estimate += v * (hessian @ v.flatten()).view(length, WIDTH) / 2
        estimates.append(estimate[:-1])
    got = acc.to_partial()
    assert_sums(got, "hess", stat_sums(torch.cat(estimates)), rtol=1e-9)
    assert (got.sums["hess_abs_sum"] > 0).all()  # the original script's attempt returned zeros


def test_sae_clean_probe_is_pulled_through_the_decoder(tiny_llama, tmp_path):
    """Clean mode: z = decode(f) + e with e held constant, so d2Loss/df2 = W_dec H_z W_dec^T; with a site
    probe r, (W_dec r) * (W_dec H_z r) is unbiased for its diagonal, and is the estimate per token, H_z the
    exact site Hessian. Chunks of 4 tokens: a probe drawn by chunk is the probe drawn whole."""
    from raygrad.model.saes import load_sae

    sae_dir = write_sae_lens_dir(tmp_path / "sae", WIDTH, 64, hook_name="blocks.1.hook_mlp_out", seed=1)
    w_dec = read_sae_lens_weights(sae_dir)[0]["W_dec"]  # (64, 32)
    sae = load_sae(1, path=str(sae_dir), dtype=torch.float64)
    model, tokenizer = load_float64(tiny_llama)
    agg = Aggregation(kinds=("hessian",), hessian_probes=1, chunk_elements=4 * 64)  # chunks of 4 tokens
    acc = DeviceAccumulator(1, {"hess": 64, names.SITE_PREFIX: WIDTH}, torch.device("cpu"))
    estimates = []
    for row, (ids, hessian) in enumerate(reference_site_hessian(tiny_llama, TEXTS, [1], LENGTH)):
        accumulate_batch(model, [site_module(model, 1)], one_text_batch(tokenizer, TEXTS[row], agg, row),
                         acc, agg, [sae], layers=[1])
        length = ids.numel()
        r = torch.zeros(length, WIDTH, dtype=torch.float64)
        r[:-1] = drawn_probe(row, 1, 0, range(length - 1), WIDTH)
        hr = (hessian @ r.flatten()).view(length, WIDTH)
        estimates.append((r[:-1] @ w_dec.T) * (hr[:-1] @ w_dec.T))
    assert_sums(acc.to_partial(), "hess", stat_sums(torch.cat(estimates)), rtol=1e-9)


def test_sae_clean_probes_converge_to_the_exact_feature_diagonal(tiny_llama, tmp_path):
    """The site-space probes give the features' diagonal: the mean of K probes lands within 5 standard
    errors of diag(W H W^T) summed over tokens, the variance computed exactly. Per feature i, the summed
    estimate is r^T A r with A = sum_t w_ti (W H)_ti^T (w_ti: feature i of token t as a row over every
    aggregated site entry), so it is unbiased for trace(A) and, r Rademacher, of variance
    sum_{a != b} A_ab (A_ab + A_ba)."""
    from raygrad.model.saes import load_sae

    sae_dir = write_sae_lens_dir(tmp_path / "sae", WIDTH, 64, hook_name="blocks.1.hook_mlp_out", seed=1)
    w_dec = read_sae_lens_weights(sae_dir)[0]["W_dec"].numpy()  # (64, 32)
    sae = load_sae(1, path=str(sae_dir), dtype=torch.float64)
    model, tokenizer = load_float64(tiny_llama)
    probes = 200
    agg = Aggregation(kinds=("hessian",), hessian_probes=probes)
    acc = DeviceAccumulator(1, {"hess": 64, names.SITE_PREFIX: WIDTH}, torch.device("cpu"))
    ((ids, hessian),) = reference_site_hessian(tiny_llama, TEXTS[:1], [1], LENGTH)
    accumulate_batch(model, [site_module(model, 1)], one_text_batch(tokenizer, TEXTS[0], agg, 0), acc, agg,
                     [sae], layers=[1])
    n = ids.numel() - 1  # aggregated positions: every one but the last
    entries = n * WIDTH
    h = hessian.numpy()[:entries, :entries]  # the probe is zero at the last position
    a = np.zeros((64, entries, entries))
    for t in range(n):
        w = np.zeros((64, entries))
        w[:, t * WIDTH:(t + 1) * WIDTH] = w_dec
        a += np.einsum("ia,ib->iab", w, w @ h)
    exact = np.einsum("iaa->i", a)
    off = a.copy()
    off[:, np.arange(entries), np.arange(entries)] = 0
    variance = (off * (off + off.transpose(0, 2, 1))).sum((1, 2))
    got = acc.to_partial().sums["hess_sum"][0]
    standardized = (got - exact) / np.sqrt(variance / probes)
    assert np.abs(standardized).max() < 5, np.abs(standardized).max()
    assert 0.3 < (standardized**2).mean() < 2.5, (standardized**2).mean()  # the spread is the theory's
    assert (np.abs(got - exact) > 0).any()


def spliced_feature_hessian(model_dir, sae_dir, text, layer, stride):
    """(chosen positions, H_f): the exact Hessian of the summed loss w.r.t. the features f = encode(z) at
    positions t < T-1 with t % stride == 0, whose outputs are replaced by f @ W_dec + b_dec (the original
    splice), from the SAE's files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model.requires_grad_(False)
    ids = AutoTokenizer.from_pretrained(model_dir)(text, truncation=True, max_length=LENGTH,
                                                   return_tensors="pt").input_ids
    weights, cfg = read_sae_lens_weights(sae_dir)
    module = explicit_module(model, layer, "mlp_out")
    chosen = torch.arange(ids.shape[1] - 1)[::stride]
    leaf = {}

    def splice(mod, args, out):
        leaf["f"] = relu_sae_encode(weights, cfg, out.detach()[0, chosen]).requires_grad_(True)
        out = out.clone()
        out[0, chosen] = leaf["f"] @ weights["W_dec"] + weights["b_dec"]
        return out

    handle = module.register_forward_hook(splice)
    try:
        with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no double backward
            logits = model(ids).logits
    finally:
        handle.remove()
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    (g,) = torch.autograd.grad(loss, leaf["f"], create_graph=True)
    (rows,) = torch.autograd.grad(g.flatten(), leaf["f"], grad_outputs=torch.eye(g.numel(), dtype=g.dtype),
                                  is_grads_batched=True)
    return chosen, rows.flatten(1)


def test_splice_probe_is_the_spliced_models_hessian_vector_product(tiny_llama, tmp_path):
    """Splice mode: the Hessian w.r.t. the leaf features in the spliced model (layer 0, every 4th position)."""
    from raygrad.model.saes import load_sae

    sae_dir = write_sae_lens_dir(tmp_path / "sae", WIDTH, 64, hook_name="blocks.0.hook_mlp_out", seed=0)
    sae = load_sae(0, path=str(sae_dir), dtype=torch.float64)
    model, tokenizer = load_float64(tiny_llama)
    agg = Aggregation(kinds=("hessian",), hessian_probes=2, sae_mode="splice", position_stride=4)
    acc = DeviceAccumulator(1, {"hess": 64}, torch.device("cpu"))
    estimates = []
    for row, text in enumerate(TEXTS):
        accumulate_batch(model, [site_module(model, 0)], one_text_batch(tokenizer, text, agg, row), acc, agg,
                         [sae], layers=[0])
        chosen, hessian = spliced_feature_hessian(tiny_llama, sae_dir, text, 0, 4)
        estimate = 0
        for k in range(2):
            v = drawn_probe(row, 0, k, chosen.numpy(), 64)  # (chosen, 64) features
            estimate = estimate + v * (hessian @ v.flatten()).view_as(v) / 2
        estimates.append(estimate)
    got = acc.to_partial()
    assert got.tokens[0] == sum(e.shape[0] for e in estimates)
    assert_sums(got, "hess", stat_sums(torch.cat(estimates)), rtol=1e-9)


# ---------------------------------------------------------------- many probes: the exact diagonal


def test_many_probes_converge_to_the_exact_diagonal_for_every_layer(tiny_llama, texts_file, tmp_path):
    """Two layers from one double backward per probe: hess_sum[l, j] = sum over tokens of the estimate
    converges to sum_t H[(l,t,j), (l,t,j)]. Per probe, the estimate of that sum is
    sum_{a in S} H_aa + sum_{a != b} H_ab v_a v_b [a in S], S = {(l, t, j): t aggregated}, of variance
    s^T M (1 + s), M = H^2 off the diagonal, s the indicator of S; cross-layer blocks are in M (they add
    variance, never bias). The mean of K probes is within 5 standard errors (sqrt(var / K)) of the exact
    value, and the squared standardized errors average about 1 (the estimator's spread is the theory's)."""
    probes_per_batch, layers = 120, [0, 2]
    run_dir, totals = run_tiny(tiny_llama, texts_file, tmp_path, layers="0,2", num_samples=3, max_length=LENGTH,
                               aggregate_by=("hessian",), hessian_probes=probes_per_batch)
    exact = np.zeros((2, WIDTH))
    variance = np.zeros((2, WIDTH))
    aggregated = 0
    for ids, hessian in reference_site_hessian(tiny_llama, TEXTS, layers, LENGTH):
        length = ids.numel()
        aggregated += length - 1
        index = np.arange(hessian.shape[0]).reshape(2, length, WIDTH)
        off_diagonal = hessian.numpy() ** 2
        np.fill_diagonal(off_diagonal, 0)
        diagonal = np.diag(hessian.numpy())
        for row in range(2):
            for j in range(WIDTH):
                s = np.zeros(hessian.shape[0])
                s[index[row, :-1, j]] = 1  # every position but the last is aggregated
                exact[row, j] += diagonal[s == 1].sum()
                variance[row, j] += s @ off_diagonal @ (1 + s)
    assert totals.tokens.tolist() == [aggregated] * 2
    standardized = (totals.sums["hess_sum"] - exact) / np.sqrt(variance / probes_per_batch)
    assert np.abs(standardized).max() < 5, np.abs(standardized).max()
    assert 0.3 < (standardized**2).mean() < 2.5, (standardized**2).mean()
    assert (np.abs(exact) > 0).all() and (np.abs(totals.sums["hess_sum"]) > 0).all()

    # exported like every other kind
    with np.load(run_dir / names.CONSOLIDATED_NPZ, allow_pickle=False) as data:
        np.testing.assert_allclose(data["layer_2_mean_abs_hessian"],
                                   totals.sums["hess_abs_sum"][1] / totals.tokens[1], rtol=1e-6)  # float32 export


def test_a_run_with_hessian_probes_is_reproducible(tiny_llama, texts_file, tmp_path):
    """Probes are seeded per shard (--seed, shard index): the same run twice gives the same sums."""
    runs = [run_tiny(tiny_llama, texts_file, tmp_path / str(i), layers="1", num_samples=3, max_length=LENGTH,
                     aggregate_by=("gradients", "hessian"), hessian_probes=2)[1] for i in range(2)]
    for name in runs[0].sums:
        np.testing.assert_array_equal(runs[0].sums[name], runs[1].sums[name], err_msg=name)
