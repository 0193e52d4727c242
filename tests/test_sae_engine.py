"""--target sae: clean and splice modes against float64 references, exports, top, memory."""

import json

import numpy as np
import pytest
import torch
from helpers import assert_same_totals, rms_norm_float64, run_tiny
from reference import (
    max_relative_error,
    read_sae_lens_weights,
    reference_site_tokens,
    reference_splice_all_sums,
    relu_sae_encode,
)
from sae_factory import write_dictionary_learning_dir, write_sae_lens_dir
from tiny import SAMPLE_TEXTS

from raygrad import constants as names
from raygrad.errors import RaygradError

KEPT_TEXTS = [t for t in SAMPLE_TEXTS if len(t.strip()) > 50][:4]
D_SAE = 64


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    for layer in range(3):
        write_sae_lens_dir(root / f"sae_{layer}", 32, D_SAE, hook_name=f"blocks.{layer}.hook_mlp_out", seed=layer,
                           neuronpedia_id=f"tiny-llama/{layer}-mlp-test")
    return root


def sae_run(model_dir, texts_file, out, sae_dirs, **overrides):
    options = dict(target="sae", sae_path=str(sae_dirs / "sae_{layer}"), layers="0,2", num_samples=4)
    options.update(overrides)
    return run_tiny(model_dir, texts_file, out, **options)


def clean_reference(model_dir, sae_dirs, layers, stride=1):
    """dLoss/df = dLoss/dz @ W_dec.T per token (SAE error held constant), from
    the per-layer float64 reference; plus values f and attribution f * dLoss/df."""
    sums = {}
    for row, layer in enumerate(layers):
        weights, cfg = read_sae_lens_weights(sae_dirs / f"sae_{layer}")
        for _, z, g in reference_site_tokens(model_dir, KEPT_TEXTS, layer, max_length=24):
            z, g = z[:-1][::stride], g[:-1][::stride]
            f = relu_sae_encode(weights, cfg, z)
            g_f = g @ weights["W_dec"].T
            for prefix, x in (("grad", g_f), ("value", f), ("attr", f * g_f), ("site_grad", g)):
                for stat, v in (("sum", x.sum(0)), ("abs_sum", x.abs().sum(0)), ("sq_sum", (x**2).sum(0))):
                    sums.setdefault(f"{prefix}_{stat}", [np.zeros(x.shape[1]) for _ in layers])[row] += v.numpy()
            sums.setdefault("tokens", [0] * len(layers))[row] += z.shape[0]
    return {k: np.asarray(v) for k, v in sums.items()}


@pytest.mark.parametrize("stride", [1, 3])
def test_clean_mode_equals_projected_reference_gradients(stride, tiny_llama, texts_file, sae_dirs, tmp_path):
    _, totals = sae_run(tiny_llama, texts_file, tmp_path, sae_dirs, position_stride=stride,
                        aggregate_by=("gradients", "values", "attribution"))
    expected = clean_reference(tiny_llama, sae_dirs, [0, 2], stride)
    for name, array in expected.items():
        if name == "tokens":
            assert totals.tokens.tolist() == array.tolist()
        else:
            assert totals.sums[name].shape == array.shape
            assert max_relative_error(totals.sums[name], array) < 1e-6, name
    assert totals.sums["grad_abs_sum"].shape == (2, D_SAE)
    assert totals.sums["site_grad_sum"].shape == (2, 32)
    assert (totals.sums["value_sum"] > 0).any() and (totals.sums["value_sum"] == 0).any()  # sparse features


@pytest.mark.parametrize("stride", [1, 4])
def test_splice_all_mode_equals_the_everywhere_substituted_reference(stride, tiny_llama, texts_file, sae_dirs,
                                                                    tmp_path):
    _, totals = sae_run(tiny_llama, texts_file, tmp_path, sae_dirs, sae_mode="splice-all", position_stride=stride)
    expected = reference_splice_all_sums(tiny_llama, [sae_dirs / "sae_0", sae_dirs / "sae_2"], KEPT_TEXTS, [0, 2],
                                     max_length=24, stride=stride)
    for name in names.SUM_ARRAYS:
        assert max_relative_error(totals.sums[name], expected[name]) < 1e-6, name
    assert totals.tokens.tolist() == expected["tokens"].tolist()
    assert "site_grad_sum" not in totals.sums  # no error node in the spliced model


def test_exact_sae_gives_the_same_result_in_clean_and_splice_modes(tiny_llama, texts_file, tmp_path):
    eye = torch.eye(32)
    exact = {"W_enc": torch.cat([eye, -eye], 1), "W_dec": torch.cat([eye, -eye], 0),
             "b_enc": torch.zeros(64), "b_dec": torch.zeros(32)}  # relu(z) - relu(-z) == z
    for layer in range(3):
        write_sae_lens_dir(tmp_path / "exact" / f"sae_{layer}", 32, 64, weights=exact,
                           hook_name=f"blocks.{layer}.hook_mlp_out")
    _, clean = sae_run(tiny_llama, texts_file, tmp_path / "c", tmp_path / "exact", layers="0-2")
    for mode in ("splice", "splice-all"):
        _, splice = sae_run(tiny_llama, texts_file, tmp_path / mode, tmp_path / "exact", layers="0-2", sae_mode=mode)
        for name in names.SUM_ARRAYS:
            assert max_relative_error(splice.sums[name], clean.sums[name]) < 1e-9, (mode, name)
    # and the feature gradient of an exact [I; -I] dictionary is (g, -g)
    np.testing.assert_allclose(clean.sums["grad_sum"][:, :32], clean.sums["site_grad_sum"], rtol=1e-9)
    np.testing.assert_allclose(clean.sums["grad_sum"][:, 32:], -clean.sums["site_grad_sum"], rtol=1e-9)


def test_sae_exports_are_named_by_kind_and_mode(tiny_llama, texts_file, sae_dirs, tmp_path):
    run_dir, totals = sae_run(tiny_llama, texts_file, tmp_path, sae_dirs, aggregate_by=("gradients", "attribution"),
                              aggregation_mode="both", save_outputs=True,
                              plots=False)  # plots: test_exports
    assert run_dir.name.startswith("sae_features_model_")
    for kind in ("gradients", "attribution"):
        for mode in ("mean_abs", "mean"):
            assert np.load(run_dir / f"layer_2_{mode}_{kind}.npy").shape == (D_SAE,)
    with np.load(run_dir / names.CONSOLIDATED_NPZ, allow_pickle=False) as data:
        assert {"layer_0_mean_abs", "layer_0_mean", "layer_0_mean_abs_attribution", "layer_0_mean_attribution"} <= \
            set(data.files)
        np.testing.assert_allclose(data["layer_2_mean_abs_attribution"],
                                   totals.sums["attr_abs_sum"][1] / totals.tokens[1], rtol=1e-6)
        metadata = json.loads(data["metadata"].item())
    assert metadata["target"] == "sae" and metadata["saes"][1]["d_sae"] == D_SAE
    assert metadata["saes"][0]["neuronpedia_id"] == "tiny-llama/0-mlp-test"


def test_top_lists_features_with_neuronpedia_links(tiny_llama, texts_file, sae_dirs, tmp_path, capsys, monkeypatch):
    import sys

    from raygrad.analysis.top import top_features
    from raygrad.cli import main

    run_dir, totals = sae_run(tiny_llama, texts_file, tmp_path / "with", sae_dirs)
    rows = top_features(run_dir, layer=2, k=5)
    expected = totals.sums["grad_abs_sum"][1] / totals.tokens[1]
    assert [r.index for r in rows] == list(np.argsort(-expected, kind="stable")[:5])
    assert rows[0].value == pytest.approx(expected.max(), rel=1e-6)
    assert rows[0].url == f"https://www.neuronpedia.org/tiny-llama/2-mlp-test/{rows[0].index}"

    monkeypatch.setattr(sys, "argv", ["raygrad", "top", str(run_dir), "--k", "3", "--by", "site_mean_abs"])
    with pytest.raises(SystemExit) as exited:
        main()
        raise SystemExit(0)
    out = capsys.readouterr().out.splitlines()
    assert exited.value.code == 0 and len(out) == 1 + 2 * 3 and "neuronpedia" not in out[0]
    # the site's own activations (the SAE's input, kept for its FVU) are not SAE features either
    assert all(r.url is None for r in top_features(run_dir, k=2, by="site_value_mean_abs"))

    for layer in range(3):
        write_sae_lens_dir(tmp_path / "plain" / f"sae_{layer}", 32, D_SAE, hook_name=f"blocks.{layer}.hook_mlp_out")
    run_dir, _ = sae_run(tiny_llama, texts_file, tmp_path / "without", tmp_path / "plain")
    assert all(r.url is None for r in top_features(run_dir, k=2))
    with pytest.raises(RaygradError, match="--by value_mean_abs: this run has grad_mean, grad_mean_abs, grad_mean_sq"):
        top_features(run_dir, by="value_mean_abs")


def test_width_mismatch_is_an_error_and_site_mismatch_a_warning(tiny_llama, texts_file, tmp_path):
    write_sae_lens_dir(tmp_path / "narrow" / "sae_0", 16, D_SAE)
    with pytest.raises(RaygradError, match=r"\(layer 0\): SAE input width 16 differs from the width 32 of hook site"):
        sae_run(tiny_llama, texts_file, tmp_path / "a", tmp_path / "narrow", layers="0")
    write_sae_lens_dir(tmp_path / "resid" / "sae_0", 32, D_SAE, hook_name="blocks.0.hook_resid_post")
    from raygrad.config import RunConfig
    from raygrad.engine import run

    said = []
    config = RunConfig(model=str(tiny_llama), dataset=str(texts_file), num_samples=2, max_length=16, workers=0,
                       output_dir=str(tmp_path / "b"), target="sae", sae_path=str(tmp_path / "resid" / "sae_{layer}"),
                       layers="0")
    run(config, echo=said.append, progress=False)
    assert any("warning: layer 0: the SAE was trained on blocks.0.hook_resid_post (resid_post), applied here to "
               "--hook-site mlp_out" in line for line in said)


@pytest.mark.parametrize("options, message", [
    (dict(target="sae"), "--target sae: needs --sae-path TEMPLATE or --sae-release R --sae-id TEMPLATE"),
    (dict(sae_path="x_{layer}"), "--sae-path x_{layer}: only used with --target sae"),
    (dict(target="sae", sae_release="r"), "--sae-release/--sae-id: give both"),
    (dict(aggregate_by=("gradients", "votes")), "--aggregate-by 'votes': choose from gradients, values, attribution"),
    (dict(position_stride=0), "--position-stride 0: must be an integer >= 1"),
])
def test_bad_sae_options(options, message):
    from raygrad.config import RunConfig

    with pytest.raises(RaygradError, match=message.replace("(", r"\(").replace("{", r"\{").replace("|", r"\|")):
        RunConfig(**options)


def test_chunked_projection_matches_and_bounds_memory(tiny_llama, tmp_path):
    """65,536 features on the tiny model: a small chunk budget gives the same
    sums as one big chunk, and no (tokens x features) tensor of the projection
    ever exceeds the budget, however many tokens the batch has."""
    from raygrad.compute.accumulator import DeviceAccumulator
    from raygrad.compute.batch import Aggregation, make_batch
    from raygrad.compute.grads import accumulate_batch
    from raygrad.model.loading import load_model_and_tokenizer, resolve_hook_sites
    from raygrad.model.saes import load_sae

    width = 65536
    write_sae_lens_dir(tmp_path / "wide", 32, width, hook_name="blocks.1.hook_mlp_out", seed=3)
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama), torch.device("cpu"), torch.float32)
    module = model.get_submodule(resolve_hook_sites(model, [1], "mlp_out")[0].path)
    sae = load_sae(1, path=str(tmp_path / "wide"))
    batch = tokenizer([" ".join(KEPT_TEXTS)] * 6, truncation=True, max_length=64, padding="longest",
                      return_tensors="pt")
    tokens = int(batch["attention_mask"][:, 1:].sum())
    shapes = []
    encode, decode = sae.encode, sae.decode
    sae.encode = lambda z: shapes.append(z.shape) or encode(z)
    sae.decode = lambda f: shapes.append(f.shape) or decode(f)

    def sums(chunk_elements):
        shapes.clear()
        acc = DeviceAccumulator(1, {"grad": width, "value": width, "attr": width, "site_grad": 32}, "cpu")
        agg = Aggregation(kinds=("gradients", "values", "attribution"), chunk_elements=chunk_elements)
        accumulate_batch(model, [module], make_batch(batch["input_ids"], batch["attention_mask"], agg), acc, agg,
                         [sae])
        return acc.to_partial(), list(shapes)

    chunk = 2**20  # 16 tokens x 65,536 features: 4 MiB per float32 tensor
    small, small_shapes = sums(chunk)
    whole, whole_shapes = sums(tokens * width)
    for name in small.sums:
        assert max_relative_error(small.sums[name], whole.sums[name]) < 1e-5, name
    assert tokens > 300
    assert max(s[0] for s in small_shapes) * width <= chunk  # every chunk within budget
    assert sum(s[0] for s in small_shapes if s[-1] == 32) == tokens  # every token projected once
    assert max(s[0] for s in whole_shapes) == tokens  # one chunk when the budget allows


def test_clean_mode_with_a_dictionary_learning_sae(tiny_llama, texts_file, tmp_path):
    """The engine with ae.pt weights (saes.py keeps them as buffers): dLoss/df = g @ decoder.weight
    (nn.Linear stores W_dec transposed), features as AutoEncoder encodes them."""
    write_dictionary_learning_dir(tmp_path / "dl" / "layer_1", 32, D_SAE, dict_class="AutoEncoder",
                                  submodule_name="mlp_out_layer_1", seed=5)
    _, totals = sae_run(tiny_llama, texts_file, tmp_path / "out", tmp_path / "dl", layers="1",
                        sae_path=str(tmp_path / "dl" / "layer_{layer}"), aggregate_by=("gradients", "values"))
    state = {k: v.double() for k, v in torch.load(tmp_path / "dl" / "layer_1" / "ae.pt", weights_only=True).items()}
    grad_sum, value_sum = np.zeros(D_SAE), np.zeros(D_SAE)
    for _, z, g in reference_site_tokens(tiny_llama, KEPT_TEXTS, 1, max_length=24):
        z, g = z[:-1], g[:-1]
        f = torch.relu((z - state["bias"]) @ state["encoder.weight"].T + state["encoder.bias"])
        grad_sum += (g @ state["decoder.weight"]).sum(0).numpy()
        value_sum += f.sum(0).numpy()
    assert max_relative_error(totals.sums["grad_sum"][0], grad_sum) < 1e-6
    assert max_relative_error(totals.sums["value_sum"][0], value_sum) < 1e-6
    assert (value_sum > 0).sum() > D_SAE // 4  # features fire


# An SAE run on a Ray worker actor equals one in this process: test_local_ray (its one run is an SAE run).


def original_splice_means(model_dir, sae_dir, texts, layer, length, stride):
    """sae_gradient_analysis.py's algorithm (issue 7, steps 1 to 6) in float64, one text per batch:
    capture z without gradients; take every stride-th of the batch's valid positions (with one text
    and no padding: t = 0, stride, 2 stride, ... up to the last position); f = encode(z there) as a
    leaf; a second forward with the output replaced by decode(f) at those positions only; the
    model's mean cross-entropy (labels = input ids); per batch the mean over the selected positions
    of dLoss/df and |dLoss/df|; the mean over batches. -> (mean, mean_abs, positions per text)."""
    from reference import explicit_module, load_float64

    model, tokenizer = load_float64(model_dir)
    weights, cfg = read_sae_lens_weights(sae_dir)
    module = explicit_module(model, layer, "mlp_out")
    means, abs_means = [], []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=length, return_tensors="pt").input_ids
        assert ids.shape[1] == length  # every text fills the length: no padding
        captured = {}
        handle = module.register_forward_hook(lambda mod, args, out: captured.setdefault("z", out.detach()))
        with torch.no_grad():
            model(ids)
        handle.remove()
        chosen = torch.arange(length)[::stride]
        f = relu_sae_encode(weights, cfg, captured["z"][0, chosen]).requires_grad_(True)

        def splice_chosen(mod, args, out):
            out = out.clone()
            out[0, chosen] = f @ weights["W_dec"] + weights["b_dec"]
            return out

        handle = module.register_forward_hook(splice_chosen)
        try:
            # The model's loss with labels = input ids: the mean over the length - 1 shifted targets
            # (written out: transformers' own loss casts logits to float32).
            loss = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
        finally:
            handle.remove()
        (g,) = torch.autograd.grad(loss, f)
        means.append(g.mean(0))
        abs_means.append(g.abs().mean(0))
    return torch.stack(means).mean(0).numpy(), torch.stack(abs_means).mean(0).numpy(), len(chosen)


@pytest.mark.parametrize("stride", [1, 4])
def test_splice_mode_reproduces_the_original_script(stride, tiny_llama, texts_file, sae_dirs, tmp_path,
                                                    monkeypatch):
    """Summed loss vs the original's mean: raygrad's sums are the original's per-text means x the
    positions it selected x (L - 1). The means agree x (L - 1) exactly when the original does not
    select the last position (it predicts nothing: its gradient is 0, but the original counts it)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm_float64)  # float64 throughout, in both
    length, texts = 24, KEPT_TEXTS
    _, totals = sae_run(tiny_llama, texts_file, tmp_path, sae_dirs, layers="0-2", sae_mode="splice",
                        position_stride=stride, batch_size=1, max_length=length)
    for row in range(3):  # layers 0 and 1 are where splicing only some positions matters
        mean, mean_abs, chosen = original_splice_means(tiny_llama, sae_dirs / f"sae_{row}", texts, row, length, stride)
        scale = len(texts) * chosen * (length - 1)
        np.testing.assert_allclose(totals.sums["grad_sum"][row], mean * scale, rtol=1e-8, atol=1e-12 * scale)
        np.testing.assert_allclose(totals.sums["grad_abs_sum"][row], mean_abs * scale, rtol=1e-8)
        if (length - 1) % stride:  # the last position is not selected: the same positions are counted
            assert totals.tokens[row] == len(texts) * chosen
            np.testing.assert_allclose(totals.sums["grad_abs_sum"][row] / totals.tokens[row],
                                       mean_abs * (length - 1), rtol=1e-8)


def test_splice_and_splice_all_differ_before_the_last_layer(tiny_llama, texts_file, sae_dirs, tmp_path):
    runs = {mode: sae_run(tiny_llama, texts_file, tmp_path / mode, sae_dirs, layers="0-2", sae_mode=mode,
                          position_stride=4)[1] for mode in ("splice", "splice-all")}
    a, b = runs["splice"].sums["grad_abs_sum"], runs["splice-all"].sums["grad_abs_sum"]
    for row in (0, 1):  # other positions' outputs reach the selected ones through later attention
        assert max_relative_error(a[row], b[row]) > 1e-3
    # At the last layer nothing downstream mixes positions: the gradient at a selected position
    # does not depend on what the other positions hold.
    assert max_relative_error(a[2], b[2]) < 1e-9


@pytest.mark.parametrize("mode", ["clean", "splice"])
def test_sae_layers_in_several_passes_equal_one_pass(mode, tiny_llama, texts_file, sae_dirs, tmp_path):
    """SAEs that do not fit beside the model go in groups, one forward+backward per group, the
    waiting SAEs in CPU memory: the sums equal one pass over all layers (the loss counted once)."""
    _, one_pass = sae_run(tiny_llama, texts_file, tmp_path / "one", sae_dirs, layers="0-2", sae_mode=mode,
                          aggregate_by=("gradients", "values"))
    _, grouped = sae_run(tiny_llama, texts_file, tmp_path / "groups", sae_dirs, layers="0-2", sae_mode=mode,
                         aggregate_by=("gradients", "values"), sae_layers_per_pass=2)
    assert_same_totals(grouped, one_pass, rtol=1e-12)


def test_the_worker_splits_sae_layers_by_its_gpu_memory(monkeypatch):
    """The decision itself, with a GPU's free memory given: 5 layers' SAEs of 1 GiB each; of what is
    free after the model, 2 GiB go to one batch's activations and 2 GiB (10% of 20) stay free."""
    from types import SimpleNamespace

    from raygrad.compute.worker import ShardRunner
    from raygrad.model.memory import sae_layer_groups

    gib = 2**30
    assert sae_layer_groups(5, gib, None) == [[0, 1, 2, 3, 4]]  # memory unknown (CPU): one pass
    assert sae_layer_groups(5, gib, 2 * gib) == [[0, 1], [2, 3], [4]]
    assert sae_layer_groups(5, gib, 0) == [[0], [1], [2], [3], [4]]  # at least one layer a pass
    assert sae_layer_groups(5, gib, 100 * gib, requested=3) == [[0, 1, 2], [3, 4]]

    plan = SimpleNamespace(sae_layers_per_pass=None, layers=list(range(5)), sae_bytes_per_layer=gib,
                           activation_bytes=lambda: 2 * gib)  # one batch's activations
    runner = SimpleNamespace(device=torch.device("cuda", 0))
    for free, expected in ((12 * gib, 1), (7 * gib, 2), (5 * gib, 5)):  # 8, 3 and 1 SAEs a pass
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 20 * gib))
        groups = ShardRunner._sae_groups(runner, plan, placement=None)
        assert len(groups) == expected, (free, groups)
        assert sorted(row for group in groups for row in group) == list(range(5))


def test_sae_layers_per_pass_is_checked():
    from raygrad.config import RunConfig

    with pytest.raises(RaygradError, match="--sae-layers-per-pass 0: must be an integer >= 1"):
        RunConfig(target="sae", sae_path="x_{layer}", sae_layers_per_pass=0)
    with pytest.raises(RaygradError, match="--sae-layers-per-pass 2: only used with --target sae"):
        RunConfig(sae_layers_per_pass=2)


def test_a_resume_may_change_the_sae_layers_per_pass(tiny_llama, texts_file, sae_dirs, tmp_path):
    from helpers import build_config, killed_run

    from raygrad import engine
    from raygrad.store.zarr_store import ResultStore

    options = dict(target="sae", sae_path=str(sae_dirs / "sae_{layer}"), layers="0-2", num_samples=4,
                   shard_size=1, checkpoint_seconds=0)
    _, one_pass = run_tiny(tiny_llama, texts_file, tmp_path / "one", **options)
    run_dir = killed_run(build_config(tiny_llama, texts_file, tmp_path / "killed", **options), dies_at_call=3)
    from raygrad.compute.worker import ShardComputer

    real_rows, passes = ShardComputer._compute_rows, []

    def recording(self, token_ids, text_rows, group, *prompt_lengths):
        passes.append(list(group))
        return real_rows(self, token_ids, text_rows, group, *prompt_lengths)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ShardComputer, "_compute_rows", recording)
        engine.resume(run_dir, echo=lambda _: None, progress=False, execution={"sae_layers_per_pass": 1})
    assert passes[:3] == [[0], [1], [2]]  # the resumed shards ran one layer a pass
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    assert_same_totals(resumed, one_pass, rtol=1e-12)
