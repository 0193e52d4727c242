"""raygrad.model.saes: each format encodes and decodes as its own library defines, in model units.

Expected values come from the files on disk through few-line formulas written here, not from raygrad."""

import json

import pytest
import torch
from sae_factory import CHECKPOINT_NORMALIZATIONS, write_dictionary_learning_dir, write_sae_lens_dir
from safetensors.torch import load_file

from raygrad.errors import RaygradError
from raygrad.model.saes import DICT_CLASSES, load_sae, site_of_hook

D_IN, D_SAE = 8, 24
F64 = torch.float64


def _inputs(*shape, scale=1.0):
    return scale * torch.randn(*shape, D_IN, dtype=F64)  # norm ~ scale * sqrt(d_in), as the factory assumes


def _sae_lens_tensors(directory):
    return {name: value.to(F64) for name, value in load_file(directory / "sae_weights.safetensors").items()}


def _dl_tensors(directory):
    return {name: value.to(F64) if value.is_floating_point() else value
            for name, value in torch.load(directory / "ae.pt", weights_only=True).items()}


def _keep_top(post, k):
    rank = post.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = largest of its token
    return post * (rank < k)


def _raised(call) -> str:
    with pytest.raises(RaygradError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- sae-lens


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_sae_lens_directory_encodes_as_sae_lens(tmp_path, architecture):
    directory = write_sae_lens_dir(tmp_path / "sae", D_IN, D_SAE, architecture=architecture, k=3)
    sae = load_sae(0, path=str(directory), dtype=F64)
    w = _sae_lens_tensors(directory)
    z = _inputs(2, 5)  # any leading shape

    pre = (z - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # apply_b_dec_to_input
    if architecture == "standard":
        expected = torch.relu(pre)
    elif architecture == "topk":  # the k largest pre-activations, then ReLU
        expected = _keep_top(torch.relu(pre), 3)
    else:
        expected = torch.relu(pre) * (pre > w["threshold"])
    features = sae.encode(z)
    assert features.dtype == F64 and features.shape == (2, 5, D_SAE)
    assert (features > 0).any(dim=-1).all()  # realistic scale: every token fires something
    torch.testing.assert_close(features, expected, rtol=1e-12, atol=1e-12)
    if architecture == "topk":
        assert ((features != 0).sum(-1) == 3).all()
    torch.testing.assert_close(sae.decode(features), expected @ w["W_dec"] + w["b_dec"], rtol=1e-12, atol=1e-12)


def test_expected_average_only_in_checkpoint_is_in_model_units(tmp_path):
    directory = write_sae_lens_dir(tmp_path / "ckpt", D_IN, D_SAE, normalize_activations="expected_average_only_in")
    scale = json.loads((directory / "activation_scaler.json").read_text())["scaling_factor"]
    assert scale != 1
    sae = load_sae(0, path=str(directory), dtype=F64)
    w = _sae_lens_tensors(directory)
    z = _inputs(6, scale=1 / scale)  # model units: the SAE was trained on scale * z

    features = sae.encode(z)
    expected = torch.relu((scale * z - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert (expected > 0).any(dim=-1).all()
    torch.testing.assert_close(features, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sae.decode(features), (expected @ w["W_dec"] + w["b_dec"]) / scale,
                               rtol=1e-12, atol=1e-12)
    f = features.detach().requires_grad_(True)
    upstream = torch.randn(6, D_IN, dtype=F64)
    grad, = torch.autograd.grad((sae.decode(f) * upstream).sum(), f)
    torch.testing.assert_close(grad, upstream @ w["W_dec"].T / scale, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", CHECKPOINT_NORMALIZATIONS)
@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
def test_checkpoint_normalization_matches_sae_lens_training_path(tmp_path, norm, architecture):
    """sae-lens trains on scaler.scale(x) and reports scaler.unscale(decode(...)): the same features,
    reconstruction and gradients through decode, all in model units."""
    from sae_lens import SAE
    from sae_lens.training.activation_scaler import ActivationScaler

    directory = write_sae_lens_dir(tmp_path / "ckpt", D_IN, D_SAE, architecture=architecture,
                                   normalize_activations=norm)
    sae = load_sae(0, path=str(directory), dtype=F64)
    library = SAE.load_from_disk(directory, dtype="float64")  # unfolded, as training sees it
    scaler = ActivationScaler()
    scaler.load(directory / "activation_scaler.json")
    z = _inputs(6, scale=4.0)

    features = sae.encode(z)
    expected = library.encode(scaler.scale(z))
    assert (expected > 0).any(dim=-1).all()
    torch.testing.assert_close(features, expected, rtol=1e-10, atol=1e-10)
    f = expected.detach().requires_grad_(True)
    ours, theirs = sae.decode(f), scaler.unscale(library.decode(f))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    upstream = torch.randn(6, D_IN, dtype=F64)
    torch.testing.assert_close(torch.autograd.grad((ours * upstream).sum(), f)[0],
                               torch.autograd.grad((theirs * upstream).sum(), f)[0], rtol=1e-10, atol=1e-10)


def test_exact_sae_reconstructs_input_exactly(tmp_path):
    eye = torch.eye(D_IN)
    weights = {"W_enc": torch.cat([eye, -eye], dim=1), "W_dec": torch.cat([eye, -eye], dim=0),
               "b_enc": torch.zeros(2 * D_IN), "b_dec": torch.zeros(D_IN)}  # relu(z) - relu(-z) = z
    directory = write_sae_lens_dir(tmp_path / "exact", D_IN, 2 * D_IN, weights=weights)
    sae = load_sae(0, path=str(directory), dtype=F64)
    z = _inputs(3, 4)
    torch.testing.assert_close(sae.decode(sae.encode(z)), z, rtol=0, atol=0)


def test_float64_round_trip_and_later_moves(tmp_path):
    directory = write_sae_lens_dir(tmp_path / "sae", D_IN, D_SAE)
    w = _sae_lens_tensors(directory)
    z = _inputs(4)
    expected = torch.relu((z - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]

    loaded = load_sae(0, path=str(directory), dtype=F64)
    assert {p.dtype for p in loaded.state_dict().values()} == {F64}
    torch.testing.assert_close(loaded(z), expected, rtol=1e-13, atol=1e-13)

    moved = load_sae(0, path=str(directory)).to(F64)  # loaded as float32, moved after: sae-lens must follow
    out = moved(z)
    assert out.dtype == F64
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------- dictionary_learning


def _dl_expected(dict_class, t, z):
    """(features, reconstruction) as dictionary_learning's current encode()/decode() compute them."""
    if dict_class == "AutoEncoder":
        f = torch.relu((z - t["bias"]) @ t["encoder.weight"].T + t["encoder.bias"])
        return f, f @ t["decoder.weight"].T + t["bias"]
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input False; no decoder-norm rescaling
        pre = z @ t["W_enc"] + t["b_enc"]
        f = torch.relu(pre) * (pre > t["threshold"])
        return f, f @ t["W_dec"] + t["b_dec"]
    post = torch.relu((z - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    if dict_class == "AutoEncoderTopK":  # per-token top k; the saved threshold is not used
        f = _keep_top(post, int(t["k"]))
    else:  # BatchTopKSAE at inference: the saved threshold, no top-k
        f = post * (post > t["threshold"])
    return f, f @ t["decoder.weight"].T + t["b_dec"]


@pytest.mark.parametrize("dict_class", sorted(DICT_CLASSES))
def test_dictionary_learning_directory_encodes_as_the_library(tmp_path, dict_class):
    directory = write_dictionary_learning_dir(tmp_path / "trainer_0", D_IN, D_SAE, dict_class=dict_class, k=3)
    sae = load_sae(0, path=str(directory), dtype=F64)
    t = _dl_tensors(directory)
    z = _inputs(2, 16)
    features, reconstruction = _dl_expected(dict_class, t, z)

    out = sae.encode(z)
    assert out.dtype == F64 and out.shape == (2, 16, D_SAE)
    assert (features > 0).any(dim=-1).all()
    torch.testing.assert_close(out, features, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sae.decode(out), reconstruction, rtol=1e-12, atol=1e-12)

    counts = (out != 0).sum(-1)
    if dict_class == "AutoEncoderTopK":
        assert (counts == 3).all()
    if dict_class == "BatchTopKSAE":  # the threshold decides, so tokens differ in how many fire
        assert len(counts.unique()) > 1
        post = torch.relu((z - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
        assert ((post > 0) & (post <= t["threshold"])).any()  # and it removed some positive values

    f = out.detach().requires_grad_(True)
    upstream = torch.randn(2, 16, D_IN, dtype=F64)
    grad, = torch.autograd.grad((sae.decode(f) * upstream).sum(), f)
    W_dec = t["W_dec"] if "W_dec" in t else t["decoder.weight"].T
    torch.testing.assert_close(grad, upstream @ W_dec.T, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- metadata


def test_metadata_from_both_formats(tmp_path):
    lens = load_sae(3, path=str(write_sae_lens_dir(tmp_path / "lens", D_IN, D_SAE, hook_name="blocks.3.hook_resid_post",
                                                   neuronpedia_id="gpt2-small/3-res-jb")))
    assert (lens.d_in, lens.d_sae, lens.hook_name) == (D_IN, D_SAE, "blocks.3.hook_resid_post")
    assert (lens.trained_site, lens.neuronpedia_id) == ("resid_post", "gpt2-small/3-res-jb")
    assert "sae-lens" in lens.source and str(tmp_path / "lens") in lens.source

    dl = load_sae(2, path=str(write_dictionary_learning_dir(tmp_path / "dl", D_IN, D_SAE, dict_class="BatchTopKSAE",
                                                            submodule_name="attn_out_layer_2")))
    assert (dl.d_in, dl.d_sae, dl.hook_name, dl.trained_site, dl.neuronpedia_id) == (
        D_IN, D_SAE, "attn_out_layer_2", "attn_out", None)
    assert "BatchTopKSAE" in dl.source
    assert not any(p.requires_grad for p in [*lens.parameters(), *dl.parameters()])


@pytest.mark.parametrize("hook_name, site", [
    ("blocks.0.hook_mlp_out", "mlp_out"), ("blocks.11.hook_attn_out", "attn_out"), ("mlp_out_layer_4", "mlp_out"),
    ("resid_post_layer_11", "resid_post"), ("model.layers.4.mlp", "mlp"), ("blocks.2.hook_resid_pre", None),
    ("blocks.2.hook_mlp_out.extra", None), (None, None)])
def test_site_of_hook(hook_name, site):
    assert site_of_hook(hook_name) == site


def test_layer_template_picks_each_layers_directory(tmp_path):
    for layer in (1, 2):
        write_dictionary_learning_dir(tmp_path / f"mlp_out_layer_{layer}", D_IN, D_SAE, seed=layer,
                                      submodule_name=f"mlp_out_layer_{layer}")
    template = str(tmp_path / "mlp_out_layer_{layer}")
    assert [load_sae(layer, path=template).hook_name for layer in (1, 2)] == ["mlp_out_layer_1", "mlp_out_layer_2"]


# ---------------------------------------------------------------- bad input


def test_missing_directory(tmp_path):
    message = _raised(lambda: load_sae(3, path=str(tmp_path / "x_{layer}")))
    assert message == f"--sae-path {tmp_path}/x_{{layer}} (layer 3 -> {tmp_path}/x_3): no such directory"


def test_directory_in_neither_format(tmp_path):
    (tmp_path / "cfg.json").write_text("{}")  # half of sae-lens's pair
    message = _raised(lambda: load_sae(0, path=str(tmp_path)))
    assert message == (f"--sae-path {tmp_path}: neither cfg.json + sae_weights.safetensors (sae-lens) "
                       "nor ae.pt + config.json (dictionary_learning) found")


def test_unknown_dict_class(tmp_path):
    directory = write_dictionary_learning_dir(tmp_path / "dl", D_IN, D_SAE)
    config = json.loads((directory / "config.json").read_text())
    config["trainer"]["dict_class"] = "GatedAutoEncoder"
    (directory / "config.json").write_text(json.dumps(config))
    message = _raised(lambda: load_sae(0, path=str(directory)))
    assert "dict_class 'GatedAutoEncoder'" in message
    assert "supported: AutoEncoder, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder" in message


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_per_token_normalization_is_refused(tmp_path, norm):
    directory = write_sae_lens_dir(tmp_path / "sae", D_IN, D_SAE, normalize_activations=norm)
    message = _raised(lambda: load_sae(0, path=str(directory)))
    assert f"normalize_activations {norm!r}" in message and "supported: none" in message


def test_checkpoint_without_its_scaler_is_refused(tmp_path):
    directory = write_sae_lens_dir(tmp_path / "ckpt", D_IN, D_SAE, normalize_activations="expected_average_only_in")
    (directory / "activation_scaler.json").unlink()
    assert "activation_scaler.json" in _raised(lambda: load_sae(0, path=str(directory)))


def test_training_only_architecture_is_refused(tmp_path):
    from sae_lens import TrainingSAE

    # sae-lens saves a finished BatchTopK SAE as jumprelu; a mid-training checkpoint keeps "batchtopk"
    TrainingSAE.from_dict({"architecture": "batchtopk", "d_in": D_IN, "d_sae": D_SAE, "k": 3}).save_model(tmp_path)
    message = _raised(lambda: load_sae(0, path=str(tmp_path)))
    assert "'batchtopk'" in message and "supported: standard, " in message


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # nothing cached to fall back on


def test_release_unreachable_offline(offline_hub):
    message = _raised(lambda: load_sae(5, release="gpt2-small-res-jb", sae_id="blocks.{layer}.hook_resid_pre"))
    assert message.startswith("--sae-release gpt2-small-res-jb --sae-id blocks.{layer}.hook_resid_pre "
                              "(layer 5 -> blocks.5.hook_resid_pre): sae-lens could not load it")


def test_unknown_release(offline_hub):
    message = _raised(lambda: load_sae(0, release="no-such-release", sae_id="x"))
    assert message.startswith("--sae-release no-such-release --sae-id x: sae-lens could not load it")
    assert "no-such-release" in message.split(":", 1)[1]


def test_source_options_must_be_one_or_the_other(tmp_path):
    assert "not both" in _raised(lambda: load_sae(0, path=str(tmp_path), release="r", sae_id="i"))
    assert "give both" in _raised(lambda: load_sae(0, release="r"))
    assert "give both" in _raised(lambda: load_sae(0))


def test_ae_pt_that_is_not_a_plain_state_dict(tmp_path):
    directory = write_dictionary_learning_dir(tmp_path / "dl", D_IN, D_SAE)
    (directory / "ae.pt").write_bytes(b"not a torch file")
    message = _raised(lambda: load_sae(0, path=str(directory)))
    assert "ae.pt is not a plain tensor state dict" in message and "weights_only" not in message


def test_bad_dtype(tmp_path):
    directory = write_dictionary_learning_dir(tmp_path / "dl", D_IN, D_SAE)
    assert "float32, float64" in _raised(lambda: load_sae(0, path=str(directory), dtype=torch.int32))


def test_release_neuronpedia_id_falls_back_to_the_packaged_registry():
    from raygrad.model.saes import _registry_neuronpedia_id

    assert _registry_neuronpedia_id("gpt2-small-res-jb", "blocks.0.hook_resid_pre") == "gpt2-small/0-res-jb"
    assert _registry_neuronpedia_id("no-such-release", "x") is None


def test_the_plan_reads_sae_metadata_without_weights(tiny_llama, tmp_path, monkeypatch):
    """The driver reads cfg.json / config.json only; reading any weights file fails this test."""
    import sae_lens
    import safetensors.torch

    from raygrad.config import RunConfig
    from raygrad.plan import make_plan

    write_sae_lens_dir(tmp_path / "lens" / "sae_0", 32, 64, hook_name="blocks.0.hook_mlp_out", neuronpedia_id="t/0")
    write_sae_lens_dir(tmp_path / "lens" / "sae_1", 32, 64, hook_name="blocks.1.hook_mlp_out", neuronpedia_id="t/1")
    write_dictionary_learning_dir(tmp_path / "dl" / "sae_0", 32, 128, submodule_name="mlp_out_layer_0")

    def no_weights(*args, **kwargs):
        raise AssertionError("SAE weights were read")

    monkeypatch.setattr(torch, "load", no_weights)
    monkeypatch.setattr(safetensors.torch, "load_file", no_weights)
    monkeypatch.setattr(sae_lens.SAE, "load_from_disk", no_weights)
    plan = make_plan(RunConfig(model=str(tiny_llama), target="sae", layers="0,1",
                               sae_path=str(tmp_path / "lens" / "sae_{layer}")), 4)
    assert [(e["d_in"], e["d_sae"], e["hook_name"], e["trained_site"], e["neuronpedia_id"]) for e in plan.saes] == [
        (32, 64, "blocks.0.hook_mlp_out", "mlp_out", "t/0"), (32, 64, "blocks.1.hook_mlp_out", "mlp_out", "t/1")]
    assert plan.width == 64 and plan.saes[0]["source"].startswith("sae-lens standard directory")
    plan = make_plan(RunConfig(model=str(tiny_llama), target="sae", layers="0",
                               sae_path=str(tmp_path / "dl" / "sae_{layer}")), 4)
    assert (plan.width, plan.saes[0]["trained_site"]) == (128, "mlp_out")
    assert plan.saes[0]["source"].startswith("dictionary_learning AutoEncoder directory")
