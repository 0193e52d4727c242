"""SAE reconstruction quality per layer (FVU, mean L0, the loss with the SAE spliced in) against
numpy on activations captured independently, and as `raygrad info` and metadata.json show it."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rms_norm_float64, run_tiny
from reference import explicit_module, load_float64, read_sae_lens_weights, reference_site_tokens, relu_sae_encode
from sae_factory import write_sae_lens_dir
from tiny import SAMPLE_TEXTS

from raygrad import constants as names
from raygrad.analysis.sae_quality import sae_quality
from raygrad.store.zarr_store import ResultStore

KEPT_TEXTS = [t for t in SAMPLE_TEXTS if len(t.strip()) > 50][:4]
D_SAE = 64
LENGTH = 24


@pytest.fixture(autouse=True)
def float64_norm(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm_float64)


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    for layer in range(3):
        write_sae_lens_dir(root / f"sae_{layer}", 32, D_SAE, hook_name=f"blocks.{layer}.hook_mlp_out", seed=layer)
    return root


def sae_run(model_dir, texts_file, out, sae_dirs, **overrides):
    options = dict(target="sae", sae_path=str(sae_dirs / "sae_{layer}"), num_samples=4, max_length=LENGTH)
    options.update(overrides)
    run_dir, totals = run_tiny(model_dir, texts_file, out, **options)
    return run_dir, totals, sae_quality(ResultStore.open(run_dir / names.STORE_NAME))


def numpy_quality(model_dir, sae_dir, layer, stride):
    """FVU and mean L0 over every stride-th position (the last, which predicts nothing, left out) of the
    texts, from float64 activations captured by the independent reference and the SAE's own files."""
    weights, cfg = read_sae_lens_weights(sae_dir)
    xs, fs = [], []
    for _, z, _ in reference_site_tokens(model_dir, KEPT_TEXTS, layer, max_length=LENGTH):
        x = z[:-1][::stride]
        xs.append(x.numpy())
        fs.append(relu_sae_encode(weights, cfg, x).numpy())
    x, f = np.concatenate(xs), np.concatenate(fs)
    x_hat = f @ weights["W_dec"].numpy() + weights["b_dec"].numpy()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()  # two-pass: the mean first
    return fvu, (f != 0).sum(1).mean(), x.shape[0]


def test_clean_mode_fvu_and_l0_equal_numpy(tiny_llama, texts_file, sae_dirs, tmp_path):
    """One shard per text: the sums are merged across shards before the ratio is taken."""
    _, totals, quality = sae_run(tiny_llama, texts_file, tmp_path, sae_dirs, layers="0,2", position_stride=3,
                                 shard_size=1)
    for row, layer in enumerate((0, 2)):
        fvu, l0, tokens = numpy_quality(tiny_llama, sae_dirs / f"sae_{layer}", layer, 3)
        entry = quality[str(layer)]
        assert entry["tokens"] == tokens == totals.tokens[row]
        assert entry["fvu"] == pytest.approx(fvu, rel=1e-6)
        assert entry["mean_l0"] == pytest.approx(l0, rel=1e-12)
        assert 0 < entry["fvu"] and 0 < entry["mean_l0"] < D_SAE
        assert "spliced_loss_nats_per_token" not in entry  # clean mode never splices


def reference_spliced_loss(model_dir, sae_dir, layer, stride):
    """(summed CE with the SAE's reconstruction at positions t < T-1, t % stride == 0, of every text;
    the unmodified model's summed CE; target tokens), float64, one text at a time."""
    model, tokenizer = load_float64(model_dir)
    weights, cfg = read_sae_lens_weights(sae_dir)
    module = explicit_module(model, layer, "mlp_out")
    spliced = clean = 0.0
    targets = 0
    for text in KEPT_TEXTS:
        ids = tokenizer(text, truncation=True, max_length=LENGTH, return_tensors="pt").input_ids
        chosen = torch.arange(ids.shape[1] - 1)[::stride]

        def splice(mod, args, out):
            out = out.clone()
            out[0, chosen] = relu_sae_encode(weights, cfg, out[0, chosen]) @ weights["W_dec"] + weights["b_dec"]
            return out

        with torch.no_grad():
            clean += F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum").item()
            handle = module.register_forward_hook(splice)
            try:
                spliced += F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum").item()
            finally:
                handle.remove()
        targets += ids.shape[1] - 1
    return spliced, clean, targets


def test_splice_mode_records_each_layers_spliced_loss(tiny_llama, texts_file, sae_dirs, tmp_path, capsys,
                                                      monkeypatch):
    import sys

    from raygrad.cli import main

    run_dir, totals, quality = sae_run(tiny_llama, texts_file, tmp_path, sae_dirs, layers="0-2", sae_mode="splice",
                                       position_stride=4)
    for layer in range(3):
        spliced, clean, targets = reference_spliced_loss(tiny_llama, sae_dirs / f"sae_{layer}", layer, 4)
        entry = quality[str(layer)]
        assert totals.loss_tokens == targets
        np.testing.assert_allclose(totals.sums[names.SPLICED_LOSS_SUM][layer], spliced, rtol=1e-9)
        assert entry["spliced_loss_nats_per_token"] == pytest.approx(spliced / targets, rel=1e-9)
        assert entry["clean_loss_nats_per_token"] == pytest.approx(clean / targets, rel=1e-9)
        assert entry["loss_increase_nats_per_token"] == pytest.approx((spliced - clean) / targets, rel=1e-6,
                                                                      abs=1e-12)
        assert entry["spliced_loss_nats_per_token"] != entry["clean_loss_nats_per_token"]
        # the splice pass encodes the same positions: the same FVU and L0 as numpy's
        fvu, l0, _ = numpy_quality(tiny_llama, sae_dirs / f"sae_{layer}", layer, 4)
        assert entry["fvu"] == pytest.approx(fvu, rel=1e-6) and entry["mean_l0"] == pytest.approx(l0, rel=1e-12)

    metadata = json.loads((run_dir / names.METADATA_JSON).read_text())
    assert metadata["sae_quality"] == json.loads(json.dumps(quality))
    monkeypatch.setattr(sys, "argv", ["raygrad", "info", str(run_dir)])
    with pytest.raises(SystemExit) as exited:
        main()
        raise SystemExit(0)
    assert exited.value.code == 0
    assert json.loads(capsys.readouterr().out)["sae_quality"] == metadata["sae_quality"]

