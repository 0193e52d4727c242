"""raygrad ablate (issue 27): every reported number against a float64 brute force, text by text, with
plain autograd and its own hooks (no code of raygrad.compute.ablation); the report's interval and
correlation against scipy; the JSON contract; bad input; 2 Ray workers; killed and resumed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from helpers import rms_norm_float64, run_cli, run_tiny, tree_digest
from reference import explicit_module, load_float64, read_sae_lens_weights, relu_sae_encode
from sae_factory import write_sae_lens_dir
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from raygrad import constants as names
from raygrad.analysis.ablation import JSON_KEYS, Mode, parse_mode, report
from raygrad.store.partial import Partial

RUN = dict(num_samples=6, max_length=24, batch_size=3, shard_size=2, layers="0,2")
TOLERANCE = 1e-9
TRANSFORMERS_NORM = LlamaRMSNorm.forward


@pytest.fixture(autouse=True)
def float64_norm(monkeypatch):
    """transformers' RMSNorm rounds through float32 even in a float64 model; the reference and raygrad then
    round texts padded differently apart by ~1e-7 (helpers.rms_norm_float64)."""
    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm_float64)


@pytest.fixture(scope="module")
def mlp_run(tiny_llama, texts_file, tmp_path_factory):
    run_dir, _ = run_tiny(tiny_llama, texts_file, tmp_path_factory.mktemp("ablate-mlp"),
                          aggregate_by=("gradients", "values", "attribution"), **RUN)
    return run_dir


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate-saes")
    for layer in (0, 2):
        write_sae_lens_dir(root / f"sae_{layer}", 32, 48, hook_name=f"blocks.{layer}.hook_mlp_out", seed=layer)
    return root


@pytest.fixture(scope="module")
def sae_run(tiny_llama, texts_file, sae_dirs, tmp_path_factory):
    run_dir, _ = run_tiny(tiny_llama, texts_file, tmp_path_factory.mktemp("ablate-sae"), target="sae",
                          sae_path=str(sae_dirs / "sae_{layer}"), aggregate_by=("gradients", "values"), **RUN)
    return run_dir


@pytest.fixture(scope="module")
def retain_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("retain") / "retain.txt"
    path.write_text("\n".join([
        "Retained text number one talks about gardens, rivers and the long walk home.",
        "A second retained text: the weather was mild and the market opened early today.",
        "Third of the retained set, a note on trains that leave the station every hour.",
    ]) + "\n")
    return path


# --- the brute force: one text at a time, no padding, its own hooks


def _texts(path: Path, limit: int) -> list[str]:
    return [line for line in path.read_text().splitlines() if len(line.strip()) > 50][:limit]


class Reference:
    """Per text: clean summed loss, target count, first-order prediction per entry; per variant the ablated
    summed loss. Entries are (layer, index); `sae_dirs` given: SAE features (ReLU sae-lens weights)."""

    def __init__(self, model_dir, texts, entries, mode: Mode, each: bool, sae_dirs=None, mean_texts=None):
        self.model, self.tokenizer = load_float64(model_dir)
        self.entries, self.mode = entries, mode
        self.layers = sorted({layer for layer, _ in entries})
        self.saes = {layer: read_sae_lens_weights(sae_dirs / f"sae_{layer}") for layer in self.layers} \
            if sae_dirs else None
        self.modules = {layer: explicit_module(self.model, layer, "mlp_out") for layer in self.layers}
        self.means = self._means(mean_texts) if mode.name == "mean" else None
        self.variants = [list(range(len(entries)))] + ([[k] for k in range(len(entries))] if each else [])
        rows = [self._text(text) for text in texts]
        self.clean = np.array([r[0] for r in rows])
        self.counts = np.array([r[1] for r in rows])
        self.predicted = np.array([r[2] for r in rows])  # (texts, entries)
        self.ablated = np.array([r[3] for r in rows])  # (texts, variants)

    def _ids(self, text):
        return self.tokenizer(text, truncation=True, max_length=24, return_tensors="pt").input_ids

    def _values(self, layer, z):
        """(T, D or F): the site's output or the SAE's features."""
        if self.saes is None:
            return z
        weights, cfg = self.saes[layer]
        return relu_sae_encode(weights, cfg, z)

    def _means(self, texts):
        """The mean value of each entry over the run's aggregated positions (t < T - 1)."""
        sums, count = {}, 0
        for text in texts:
            captured = {}
            handles = [self.modules[layer].register_forward_hook(
                lambda m, a, out, layer=layer: captured.__setitem__(layer, out.detach()[0])) for layer in self.layers]
            with torch.no_grad():
                self.model(self._ids(text))
            for h in handles:
                h.remove()
            for layer, index in self.entries:
                sums[layer, index] = sums.get((layer, index), 0.0) + float(
                    self._values(layer, captured[layer])[:-1, index].sum())
            count += captured[self.layers[0]].shape[0] - 1
        return {key: value / count for key, value in sums.items()}

    def _target(self, layer, index, a):
        """a' for the values a (T,) of entry (layer, index)."""
        if self.mode.name == "zero":
            return torch.zeros_like(a)
        if self.mode.name == "mean":
            return torch.full_like(a, self.means[layer, index])
        if self.saes is not None:
            return torch.where(a > 0, torch.full_like(a, self.mode.clamp), a)
        return torch.full_like(a, self.mode.clamp)

    def _text(self, text):
        ids = self._ids(text)
        leaves = {}
        for layer in self.layers:  # one layer's output a leaf at a time: its whole dLoss/dz
            def leaf(m, a, out, layer=layer):
                leaves[layer] = out.detach().requires_grad_(True)
                return leaves[layer]

            handle = self.modules[layer].register_forward_hook(leaf)
            logits = self.model(ids).logits
            handle.remove()
            clean = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            clean.backward()
        predicted = []
        for layer, index in self.entries:
            z, g_z = leaves[layer].detach()[0], leaves[layer].grad[0]
            a = self._values(layer, z)[:, index]
            g = g_z[:, index] if self.saes is None else g_z @ self.saes[layer][0]["W_dec"][index]
            predicted.append(float((g * (self._target(layer, index, a) - a))[:-1].sum()))
        ablated = [self._ablated(ids, variant) for variant in self.variants]
        return clean.item(), ids.shape[1] - 1, predicted, ablated

    def _ablated(self, ids, variant):
        chosen = [self.entries[k] for k in variant]

        def set_entries(m, a, out, layer):
            hidden = out.clone()
            for entry_layer, index in chosen:
                if entry_layer != layer:
                    continue
                if self.saes is None:
                    hidden[0, :, index] = self._target(layer, index, out[0, :, index])
                else:
                    f = self._values(layer, out[0])[:, index]  # from the output as it reaches this layer
                    hidden[0] += (self._target(layer, index, f) - f)[:, None] * self.saes[layer][0]["W_dec"][index]
            return hidden

        handles = [self.modules[layer].register_forward_hook(lambda m, a, o, layer=layer: set_entries(m, a, o, layer))
                   for layer in self.layers]
        with torch.no_grad():
            logits = self.model(ids).logits
        for h in handles:
            h.remove()
        return float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))

    def expected(self) -> dict:
        """The report as defined in raygrad.analysis.ablation's docstring, computed with scipy."""
        n, texts = self.counts.sum(), len(self.counts)
        d = self.ablated[:, 0] - self.clean
        delta = d.sum() / n
        linearized = delta + (d - delta * self.counts) / (n / texts)
        low, high = scipy.stats.ttest_1samp(linearized, 0.0).confidence_interval(0.95)
        each = [{"layer": layer, "feature": index, "delta": (self.ablated[:, v] - self.clean).sum() / n,
                 "predicted_delta": self.predicted[:, k].sum() / n}
                for v, (k, (layer, index)) in enumerate(enumerate(self.entries), start=1)] \
            if len(self.variants) > 1 else []
        pearson = scipy.stats.pearsonr([e["predicted_delta"] for e in each], [e["delta"] for e in each]).statistic \
            if len(each) > 2 else None
        return {"mode": self.mode.label, "features": [{"layer": la, "feature": i} for la, i in self.entries],
                "tokens": int(n), "loss": self.clean.sum() / n, "loss_ablated": self.ablated[:, 0].sum() / n,
                "delta": delta, "delta_ci95": [low, high], "predicted_delta": self.predicted.sum() / n,
                "each": each, "pearson": pearson}


def assert_report_equal(actual: dict, expected: dict) -> None:
    assert list(actual) == list(JSON_KEYS)
    for key in ("mode", "features", "tokens"):
        assert actual[key] == expected[key], key
    numbers = ["loss", "loss_ablated", "delta", "predicted_delta"]
    got = [actual[k] for k in numbers] + actual["delta_ci95"]
    want = [expected[k] for k in numbers] + list(expected["delta_ci95"])
    for row_a, row_e in zip(actual["each"], expected["each"], strict=True):
        assert (row_a["layer"], row_a["feature"]) == (row_e["layer"], row_e["feature"])
        got += [row_a["delta"], row_a["predicted_delta"]]
        want += [row_e["delta"], row_e["predicted_delta"]]
    if expected["pearson"] is not None:
        got.append(actual["pearson"])
        want.append(expected["pearson"])
    np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=1e-13)
    assert any(abs(x) > 1e-6 for x in got[2:]), "an ablation that changes nothing tests nothing"


def _ablate(run_dir, args, capsys, monkeypatch):
    code, out, err = run_cli(["ablate", str(run_dir), "--json", "--no-progress", *args], capsys, monkeypatch)
    assert code == 0, err
    return json.loads(out)


def _firing(run_dir, k_per_layer=2):
    """SAE features that fire most on the run's texts: the largest mean values, per layer."""
    from raygrad.store.zarr_store import ResultStore

    totals, _ = ResultStore.open(run_dir / names.STORE_NAME).totals()
    means = totals.sums["value_sum"] / totals.tokens[:, None]
    return [(layer, int(i)) for row, layer in enumerate((0, 2)) for i in np.argsort(-means[row])[:k_per_layer]]


@pytest.mark.parametrize("target, mode, batch_size, other_texts", [
    ("mlp", "zero", 1, False),
    ("mlp", "mean", 4, False),
    ("mlp", "clamp=0.05", 4, True),
    ("sae", "zero", 4, False),
    ("sae", "mean", 1, True),
    ("sae", "clamp=-0.5", 4, False),
])
def test_matches_brute_force(target, mode, batch_size, other_texts, request, tiny_llama, texts_file, retain_file,
                             capsys, monkeypatch):
    """Jointly and each alone, on the run's texts or another dataset, batch sizes 1 and 4."""
    run_dir = request.getfixturevalue(f"{target}_run")
    sae_dirs = request.getfixturevalue("sae_dirs") if target == "sae" else None
    entries = [(0, 3), (2, 5), (2, 7)] if target == "mlp" else _firing(run_dir)
    args = ["--features", ",".join(f"{la}:{i}" for la, i in entries), "--mode", mode, "--each",
            "--batch-size", str(batch_size)]
    if other_texts:
        args += ["--dataset", str(retain_file)]
    actual = _ablate(run_dir, args, capsys, monkeypatch)
    texts = _texts(retain_file if other_texts else texts_file, 6)
    expected = Reference(tiny_llama, texts, entries, parse_mode(mode), True, sae_dirs, _texts(texts_file, 6))
    assert_report_equal(actual, expected.expected())
    saved = [json.loads(path.read_text()) for path in (run_dir / names.ABLATIONS_DIR).glob("*.json")]
    assert any({key: one[key] for key in JSON_KEYS} == actual for one in saved)  # what --json printed is saved


def test_nothing_changed_is_exactly_unchanged(tiny_llama, sae_dirs):
    """An SAE feature changed in its own term only: a copy with nothing chosen comes back bit for bit, and
    a chosen feature moves the output by exactly (f' - f) W_dec[feature]."""
    from raygrad.compute.ablation import AblationSpec, ListedEntries
    from raygrad.model.saes import load_sae

    sae = load_sae(0, path=str(sae_dirs / "sae_{layer}"), dtype=torch.float64)
    spec = AblationSpec((0, 0), (3, 9), "clamp", (2.0, 2.0), each=True)
    entries = ListedEntries(spec, 0, sae, torch.device("cpu"))
    hidden = torch.randn(6, 5, 32, dtype=torch.float64)  # 3 variants x 2 texts
    chosen = entries.chosen  # joint, 3 alone, 9 alone
    nothing = torch.zeros_like(chosen)
    assert torch.equal(entries.apply(hidden, nothing, "clamp"), hidden)
    out = entries.apply(hidden, chosen, "clamp")
    weights, cfg = read_sae_lens_weights(sae_dirs / "sae_0")
    f = relu_sae_encode(weights, cfg, hidden)
    change = torch.where(f > 0, torch.full_like(f, 2.0), f) - f
    expected = hidden.clone()
    for copy, listed in enumerate(([3, 9], [3], [9])):
        for feature in listed:
            rows = slice(2 * copy, 2 * copy + 2)
            expected[rows] += change[rows, :, feature, None] * weights["W_dec"][feature]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_interval_is_the_paired_t_test_when_texts_are_equally_long():
    """With every text as long, the interval is exactly scipy's paired t-test (ttest_rel) on per-token losses;
    Pearson is scipy's."""
    rng = np.random.default_rng(0)
    clean, n = rng.normal(50, 5, 9), np.full(9, 12.0)
    ablated = clean + rng.normal(1, 2, (3, 9))  # joint, then two entries alone
    predicted = rng.normal(0.5, 1, (3, 9))
    d = ablated - clean
    sums = {names.ABLATED_LOSS_SUM: ablated.sum(1), names.ABLATED_DELTA_SUM: d.sum(1),
            names.ABLATED_DELTA_SQ_SUM: (d * d).sum(1), names.ABLATED_DELTA_TOKENS_SUM: (d * n).sum(1),
            names.ABLATED_PREDICTED_SUM: predicted.sum(1), names.ABLATED_TEXTS: np.full(3, 9.0),
            names.ABLATED_TOKENS_SQ_SUM: np.full(3, (n * n).sum())}
    totals = Partial(sums, np.full(3, 108), loss_sum=float(clean.sum()), loss_tokens=108)
    result = report(totals, Mode("zero"), [(0, 1), (1, 2)], each=True)
    test = scipy.stats.ttest_rel(ablated[0] / n, clean / n)
    np.testing.assert_allclose(result["delta_ci95"], test.confidence_interval(0.95), rtol=1e-12)
    np.testing.assert_allclose(result["delta"], np.mean(ablated[0] / n - clean / n), rtol=1e-12)
    three = report(Partial({k: np.append(v, v[-1:] + 1) for k, v in sums.items()}, np.full(4, 108),
                           loss_sum=float(clean.sum()), loss_tokens=108), Mode("zero"), [(0, 1), (1, 2), (1, 3)], True)
    each = three["each"]
    np.testing.assert_allclose(three["pearson"], scipy.stats.pearsonr(
        [e["predicted_delta"] for e in each], [e["delta"] for e in each]).statistic, rtol=1e-12)


def test_json_contract_table_and_no_overwrite(mlp_run, capsys, monkeypatch):
    args = ["ablate", str(mlp_run), "--features", "0:1", "--no-progress"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert "jointly" in out and "95% interval" in out and "predicted" in out
    code, out, err = run_cli([*args, "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert list(result) == list(JSON_KEYS)
    assert result["mode"] == "zero" and result["features"] == [{"layer": 0, "feature": 1}]
    assert isinstance(result["tokens"], int) and len(result["delta_ci95"]) == 2
    assert result["each"] == [] and result["pearson"] is None
    folder = mlp_run / names.ABLATIONS_DIR
    assert (folder / "zero_0-1_run.json").is_file() and (folder / "zero_0-1_run_2.json").is_file()
    first = json.loads((folder / "zero_0-1_run.json").read_text())
    assert {k: first[k] for k in JSON_KEYS} == result  # the same command, the same numbers, both kept


def test_from_top_and_from_compare(mlp_run, tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    from raygrad.analysis.compare import compare_runs
    from raygrad.analysis.results import open_results
    from raygrad.store import stats

    group = open_results(mlp_run)
    attribution = np.stack([stats.from_group(group, "attr", "mean", row) for row in range(2)])
    order = np.argsort(-np.abs(attribution), axis=None, kind="stable")[:2]
    expected = [{"layer": (0, 2)[i // 32], "feature": int(i % 32)} for i in order]
    code, out, err = run_cli(["ablate", str(mlp_run), "--from-top", "--k", "2", "--dry-run"], capsys, monkeypatch)
    assert code == 0, err and "dry run" in out
    assert _ablate(mlp_run, ["--from-top", "--k", "2"], capsys, monkeypatch)["features"] == expected

    other, _ = run_tiny(tiny_llama, texts_file, tmp_path / "b", aggregate_by=("gradients", "values", "attribution"),
                        **{**RUN, "num_samples": 4})
    comparison, _ = compare_runs(mlp_run, other, tmp_path / "cmp")
    welch = open_results(comparison)["grad_welch_t_abs"][:].astype(np.float64)
    top = np.argsort(-welch, axis=None, kind="stable")[:3]
    wanted = {((0, 2)[i // 32], int(i % 32)) for i in top}
    got = _ablate(mlp_run, ["--from-compare", str(comparison), "--k", "3"], capsys, monkeypatch)["features"]
    assert {(e["layer"], e["feature"]) for e in got} == wanted


def test_bad_input_one_line_nothing_changed(mlp_run, sae_run, tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    from helpers import killed_run

    from raygrad.config import RunConfig

    no_values, _ = run_tiny(tiny_llama, texts_file, tmp_path / "plain", **{**RUN, "num_samples": 2})
    changing = tmp_path / "changing.txt"
    shutil.copy(texts_file, changing)
    changed, _ = run_tiny(tiny_llama, changing, tmp_path / "changed", **{**RUN, "num_samples": 2})
    changing.write_text(changing.read_text() + "One more line of text, long enough to be kept by the filter.\n")
    incomplete = killed_run(RunConfig(model=str(tiny_llama), dataset=str(texts_file), workers=0, dtype="float64",
                                      output_dir=str(tmp_path / "killed"), checkpoint_seconds=0, **RUN), 2)
    cases = [
        (mlp_run, ["--features", "0:32"], "--features 0:32: dimension 32 (in 0:32) is outside 0-31"),
        (mlp_run, ["--features", "1:3"], "layer 1 (in 1:3) was not collected by this run"),
        (sae_run, ["--features", "2:48"], "feature 48 (in 2:48) is outside 0-47"),
        (mlp_run, ["--features", "0:3", "--mode", "clamp=abc"], "--mode clamp=abc: clamp= takes a finite number"),
        (mlp_run, ["--features", "0:3", "--mode", "half"], "--mode half: choose zero, mean or clamp=VALUE"),
        (no_values, ["--features", "0:3", "--mode", "mean"], "--mode mean: RUN"),
        (mlp_run, ["--from-compare", str(no_values), "--k", "2"], "a run, not a comparison"),
        (mlp_run, ["--from-compare", str(tmp_path), "--k", "2"], "not a comparison"),
        (mlp_run, ["--features", "0:3", "--from-top", "--k", "2"], "give exactly one of"),
        (changed, ["--features", "0:3"], "changed since the run"),
        (incomplete, ["--features", "0:3"], "the run is not complete"),
    ]
    for run_dir, args, message in cases:
        before = tree_digest(run_dir), sorted(run_dir.rglob("*"))
        code, out, err = run_cli(["ablate", str(run_dir), *args, "--no-progress"], capsys, monkeypatch)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, err)
        assert (tree_digest(run_dir), sorted(run_dir.rglob("*"))) == before, args


def test_two_ray_workers_and_killed_then_resumed(mlp_run, tmp_path, capsys, monkeypatch):
    """The same sums on 2 Ray workers and after a kill and a resume as in one uninterrupted process."""
    from raygrad.compute.worker import ShardRunner
    from raygrad.store.zarr_store import ResultStore

    monkeypatch.setattr(LlamaRMSNorm, "forward", TRANSFORMERS_NORM)  # as on the Ray workers
    run_dir = tmp_path / "run"
    shutil.copytree(mlp_run, run_dir)
    base = ["--features", "0:3,2:5", "--each", "--mode", "clamp=0.1"]
    in_process = _ablate(run_dir, base, capsys, monkeypatch)
    stores = run_dir / names.ABLATIONS_DIR
    reference_totals, _ = ResultStore.open(stores / "clamp-0.1_0-3_2-5_each_run" / names.STORE_NAME).totals()

    real_run, calls = ShardRunner.run, []

    def dies(self, shard, *args):
        calls.append(shard)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(self, shard, *args)

    with monkeypatch.context() as patch:
        patch.setattr(ShardRunner, "run", dies)
        code, _, err = run_cli(["ablate", str(run_dir), *base, "--checkpoint-seconds", "0",
                                "--no-progress"], capsys, monkeypatch)
    assert code != 0
    killed = stores / "clamp-0.1_0-3_2-5_each_run_2"
    assert not (stores / "clamp-0.1_0-3_2-5_each_run_2.json").exists()
    assert ResultStore.open(killed / names.STORE_NAME).shards_done().sum() == 1
    code, out, err = run_cli(["ablate", str(run_dir), *base, "--no-progress"], capsys, monkeypatch)
    assert code == 0 and "resuming" in out, err
    resumed = json.loads((stores / "clamp-0.1_0-3_2-5_each_run_2.json").read_text())
    np.testing.assert_allclose([resumed[k] for k in ("loss", "loss_ablated", "delta", "predicted_delta")],
                               [in_process[k] for k in ("loss", "loss_ablated", "delta", "predicted_delta")],
                               rtol=1e-12)

    on_ray = _ablate(run_dir, [*base, "--workers", "2"], capsys, monkeypatch)
    ray_totals, _ = ResultStore.open(stores / "clamp-0.1_0-3_2-5_each_run_3" / names.STORE_NAME).totals()
    for name in names.ABLATION_SUMS:
        np.testing.assert_allclose(ray_totals.sums[name], reference_totals.sums[name], rtol=1e-10, atol=1e-14)
    assert ray_totals.loss_tokens == reference_totals.loss_tokens
    assert on_ray["features"] == in_process["features"]


def test_report_shows_the_ablations(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    run_dir, _ = run_tiny(tiny_llama, texts_file, tmp_path, top_examples=2, **{**RUN, "num_samples": 3})
    code, out, err = run_cli(["report", str(run_dir)], capsys, monkeypatch)
    assert code == 0 and "Ablations" not in (run_dir / "report.html").read_text(), err
    result = _ablate(run_dir, ["--features", "2:4,0:1", "--mode", "clamp=1"], capsys, monkeypatch)
    code, out, err = run_cli(["report", str(run_dir)], capsys, monkeypatch)
    assert code == 0, err
    page = (run_dir / "report.html").read_text()
    row = page[page.index("clamp-1_2-4_0-1_run.json"):].split("</tr>")[0]
    for shown in ("clamp=1", "2:4, 0:1", f"{result['tokens']:,}", f"{result['loss']:.6f}",
                  f"{result['loss_ablated']:.6f}", f"{result['delta']:+.6f}", f"{result['delta_ci95'][0]:+.6f}",
                  f"{result['predicted_delta']:+.6f}"):
        assert shown in row, shown


@pytest.mark.parametrize("each", [False, True])
def test_a_feature_that_never_fires_leaves_the_loss_exactly(each, tiny_llama, texts_file, sae_dirs):
    """clamp sets a feature only where it is active: one inactive everywhere changes nothing, so the ablated
    loss equals the clean loss bit for bit (its term adds an exact zero; both losses take the same path)."""
    from transformers import AutoTokenizer

    from raygrad.compute.ablation import AblationSpec, ablate_batch
    from raygrad.compute.accumulator import DeviceAccumulator
    from raygrad.compute.batch import Aggregation, make_batch
    from raygrad.compute.batching import collate
    from raygrad.model.saes import load_sae

    model, _ = load_float64(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    sae = load_sae(0, path=str(sae_dirs / "sae_{layer}"), dtype=torch.float64)
    module = explicit_module(model, 0, "mlp_out")
    input_ids, mask = collate([tokenizer(t).input_ids for t in _texts(texts_file, 3)], tokenizer.pad_token_id)
    batch = make_batch(input_ids, mask, Aggregation())
    captured = []
    handle = module.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=mask)
    handle.remove()
    active = (sae.encode(captured[0])[mask.bool()] > 0).any(0)
    silent, firing = int((~active).nonzero()[0]), int(active.nonzero()[0])
    deltas = {}
    for feature in (silent, firing):
        spec = AblationSpec((0, 0), (feature, feature if not each else silent), "clamp", (3.0, 3.0), each) \
            if each else AblationSpec((0,), (feature,), "clamp", (3.0,), False)
        acc = DeviceAccumulator(spec.num_variants, {}, torch.device("cpu"), names.ABLATION_SUMS)
        ablate_batch(model, [module], batch, acc, spec, [sae])
        assert float(acc.sums[names.ABLATED_LOSS_SUM][0] - acc.sums[names.ABLATED_DELTA_SUM][0]) == float(
            acc.loss_sum) or feature == firing
        deltas[feature] = acc.sums[names.ABLATED_DELTA_SUM].tolist()
    assert all(d == 0.0 for d in deltas[silent])
    assert deltas[firing][0] != 0.0
