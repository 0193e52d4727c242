"""Issue 11: spread and Fisher statistics, --power and --normalize-mode, export sets, compare, the
xarray-native store and the one naming scheme; each against numbers computed here from per-token
samples or from the runs' raw float64 sums."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_tiny
from reference import reference_site_tokens
from sae_factory import write_sae_lens_dir
from tiny import SAMPLE_TEXTS

import raygrad
from raygrad import constants as names
from raygrad.analysis.compare import compare_runs
from raygrad.cli import main
from raygrad.store.stats import transform
from raygrad.store.zarr_store import ResultStore

KEPT_TEXTS = [t for t in SAMPLE_TEXTS if len(t.strip()) > 50]
LAYERS = [0, 2]
D_SAE = 64


@pytest.fixture(scope="module")
def runs(tiny_llama, texts_file, tmp_path_factory):
    """A (6 texts of up to 24 tokens) and B (3 texts of up to 16): the same measurement, different
    token counts; gradients and values; every statistic exported, as .npy files too (not plotted: 63
    figures a run, which test_exports and the export set below check)."""
    root = tmp_path_factory.mktemp("runs")
    common = dict(layers="0,2", aggregate_by=("gradients", "values"), aggregation_mode="all", save_outputs=True,
                  plots=False)
    run_a, totals_a = run_tiny(tiny_llama, texts_file, root / "a", **common)
    run_b, totals_b = run_tiny(tiny_llama, texts_file, root / "b", num_samples=3, max_length=16, **common)
    return root, (run_a, totals_a), (run_b, totals_b)


@pytest.fixture(scope="module")
def sae_runs(tiny_llama, texts_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("sae_runs")
    for layer in LAYERS:
        write_sae_lens_dir(root / "saes" / f"sae_{layer}", 32, D_SAE, hook_name=f"blocks.{layer}.hook_mlp_out",
                           seed=layer, neuronpedia_id=f"tiny-llama/{layer}-mlp-test")
    common = dict(target="sae", sae_path=str(root / "saes" / "sae_{layer}"), layers="0,2")
    run_a, totals_a = run_tiny(tiny_llama, texts_file, root / "a", num_samples=4, **common)
    run_b, totals_b = run_tiny(tiny_llama, texts_file, root / "b", num_samples=3, max_length=16, **common)
    return root, (run_a, totals_a), (run_b, totals_b)


def per_token_samples(model_dir, texts, layer, max_length):
    """(N, D) float64 gradients and values at every aggregated position (the last of each text predicts
    nothing), one text at a time, from the independent reference."""
    tokens = reference_site_tokens(model_dir, texts, layer, max_length)
    return (np.concatenate([g[:-1].numpy() for _, _, g in tokens]),
            np.concatenate([z[:-1].numpy() for _, z, _ in tokens]))


# --- spread and Fisher


def test_mean_sq_std_sem_equal_per_token_statistics(runs, tiny_llama):
    _, (run_dir, _), _ = runs
    results = raygrad.load_results(run_dir)
    group = raygrad.open_results(run_dir)
    with np.load(run_dir / names.CONSOLIDATED_NPZ) as npz:
        exported = {k: npz[k] for k in npz.files}
    for row, layer in enumerate(LAYERS):
        grads, values = per_token_samples(tiny_llama, KEPT_TEXTS, layer, 24)
        for kind, x in (("gradients", grads), ("values", values)):
            expected = {"mean_abs": np.abs(x).mean(0), "mean": x.mean(0), "mean_sq": (x**2).mean(0),
                        "std": x.std(0, ddof=1), "sem": x.std(0, ddof=1) / np.sqrt(len(x))}
            for statistic, want in expected.items():
                key = names.export_key(kind, statistic)
                npy = np.load(run_dir / f"layer_{layer}_{statistic}_{kind}.npy")
                for got in (npy, exported[f"layer_{layer}_{key}"], results.layer(layer, key),
                            results["data"][f"layer_{layer}_{key}"],
                            group[names.store_name(names.KIND_PREFIX[kind], statistic)][row]):
                    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12 * np.abs(want).max(),
                                               err_msg=f"{kind} {statistic} layer {layer}")
    assert results["metadata"]["layers"] == LAYERS and isinstance(results["metadata"], dict)
    assert results["metadata"]["aggregation_modes"] == list(names.STATISTICS)
    with pytest.raises(KeyError):
        results["nothing"]


def test_the_original_helpers_shape_from_the_npz(runs):
    _, (run_dir, totals), _ = runs
    results = raygrad.load_results(run_dir / names.CONSOLIDATED_NPZ)
    np.testing.assert_allclose(results["data"]["layer_0_mean_abs"], totals.sums["grad_abs_sum"][0] / totals.tokens[0],
                               rtol=1e-6)
    assert set(results["data"]) >= {"layer_2_std", "layer_2_sem_values", "layer_0_mean_sq"}
    assert results["metadata"]["layers"] == LAYERS


# --- power and normalize modes


def test_transform_against_the_formulas_including_zero_sums():
    x = np.array([[1.0, -2.0, 3.0, 0.5], [1.0, -1.0, 2.0, -2.0], [0.0, 0.0, 0.0, 0.0]])  # row 2: sum 0
    for power in (1.0, 0.5, 2.0, 3.0):
        powered = np.sign(x) * np.abs(x) ** power
        np.testing.assert_allclose(transform(x, power, "none"), powered)
        abs_sum = np.abs(powered).sum(1, keepdims=True)
        np.testing.assert_allclose(transform(x, power, "sum_abs")[:2], powered[:2] * 4 / abs_sum[:2])
        signed_sum = powered.sum(1, keepdims=True)
        want_sum = np.where(signed_sum != 0, powered * 4 / np.where(signed_sum != 0, signed_sum, 1), powered)
        np.testing.assert_allclose(transform(x, power, "sum"), want_sum)
        np.testing.assert_array_equal(transform(x, power, "sum")[2], powered[2])  # sum 0: as it was
        np.testing.assert_array_equal(transform(x, power, "sum_abs")[2], powered[2])
    np.testing.assert_array_equal(transform(x, 2.0, "sum")[1], np.sign(x[1]) * x[1] ** 2)  # 1 - 1 + 4 - 4 = 0
    assert np.abs(transform(x, 1.5, "sum_abs")[0]).sum() == pytest.approx(4)


def run_cli(args, capsys, monkeypatch):
    """-> (exit code, stdout, stderr) of `raygrad ARGS` in this process."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["raygrad", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_export_set_with_power_and_every_normalize_mode(runs, capsys, monkeypatch):
    _, (run_dir, totals), _ = runs
    before = digest(run_dir, skip=names.EXPORT_SETS_DIR)
    code, out, err = run_cli(["export", run_dir, "--aggregation-mode", "mean,mean_abs", "--power", "2",
                              "--normalize-mode", "all", "--save-outputs"], capsys, monkeypatch)
    assert code == 0, err
    export_set = run_dir / names.EXPORT_SETS_DIR / "mean-mean_abs_power2_norm_all"
    assert f"in {export_set}" in out
    assert digest(run_dir, skip=names.EXPORT_SETS_DIR) == before  # the run's own exports are untouched
    metadata = json.loads((export_set / names.METADATA_JSON).read_text())
    assert metadata["power"] == 2 and metadata["normalize_mode"] == "all"
    assert metadata["export_set"] == "mean-mean_abs_power2_norm_all"
    with np.load(export_set / names.CONSOLIDATED_NPZ) as npz:
        keys = set(npz.files) - {"metadata"}
        for row, layer in enumerate(LAYERS):
            for kind, prefix in (("gradients", "grad"), ("values", "value")):
                n = totals.tokens[row]
                raw = {"mean": totals.sums[f"{prefix}_sum"][row] / n,
                       "mean_abs": totals.sums[f"{prefix}_abs_sum"][row] / n}
                for statistic, v in raw.items():
                    powered = np.sign(v) * np.abs(v) ** 2 if statistic == "mean" else v**2
                    expected = {"none": powered, "sum_abs": powered * v.size / np.abs(powered).sum(),
                                "sum": powered * v.size / powered.sum()}
                    for mode, want in expected.items():
                        suffix = "" if kind == "gradients" else f"_{kind}"
                        key = f"layer_{layer}_{statistic}{suffix}_norm_{mode}"
                        np.testing.assert_allclose(npz[key], want, rtol=1e-5, err_msg=key)
                        np.testing.assert_array_equal(
                            np.load(export_set / f"layer_{layer}_{statistic}_{kind}_norm_{mode}.npy"), npz[key])
                        keys.discard(key)
    assert keys == set()  # nothing but those 2 layers x 2 kinds x 2 statistics x 3 modes
    assert not (export_set / "plots").exists()  # as the run asked (runs: no plots)
    code, _, err = run_cli(["export", run_dir, "--aggregation-mode", "mean_abs", "--power", "2", "--normalize-mode",
                            "all", "--save-outputs", "--plots", "--name", "plotted"], capsys, monkeypatch)
    assert code == 0, err  # the plots of an export set are named as its files are
    assert (run_dir / names.EXPORT_SETS_DIR / "plotted" / "plots" / "layer_0_mean_abs_norm_sum_histogram.png").exists()
    loaded = raygrad.load_results(export_set)
    assert "mean_abs_values_norm_sum" in loaded.arrays and loaded["metadata"]["power"] == 2

    # a single mode keeps the original's names; --normalize-gradients is sum_abs
    code, _, err = run_cli(["export", run_dir, "--normalize-mode", "sum", "--aggregation-mode", "mean",
                            "--name", "signed_sum"], capsys, monkeypatch)
    assert code == 0, err
    with np.load(run_dir / names.EXPORT_SETS_DIR / "signed_sum" / names.CONSOLIDATED_NPZ) as npz:
        v = totals.sums["grad_sum"][1] / totals.tokens[1]
        np.testing.assert_allclose(npz["layer_2_mean"], v * v.size / v.sum(), rtol=1e-5)
        assert "layer_2_mean_abs" not in npz.files


def test_normalize_gradients_is_sum_abs(tiny_llama, texts_file, tmp_path):
    run_dir, totals = run_tiny(tiny_llama, texts_file, tmp_path, normalize_gradients=True, aggregation_mode="std")
    metadata = json.loads((run_dir / names.METADATA_JSON).read_text())
    assert metadata["normalize_mode"] == "sum_abs" and metadata["normalized"] is True
    with np.load(run_dir / names.CONSOLIDATED_NPZ) as npz:
        assert np.abs(npz["layer_1_std"]).sum() == pytest.approx(32, rel=1e-5)
        assert set(npz.files) == {"metadata", "layer_0_std", "layer_1_std", "layer_2_std"}


# --- compare


def welch_reference(sums_a, n_a, sums_b, n_b):
    """Welch's t and df written out from sums: sample means and ddof-1 variances."""
    mean_a, mean_b = sums_a[0] / n_a, sums_b[0] / n_b
    var_a = (sums_a[1] - n_a * mean_a**2) / (n_a - 1)
    var_b = (sums_b[1] - n_b * mean_b**2) / (n_b - 1)
    se = var_a / n_a + var_b / n_b
    df = se**2 / ((var_a / n_a) ** 2 / (n_a - 1) + (var_b / n_b) ** 2 / (n_b - 1))
    return (mean_a - mean_b) / np.sqrt(se), df, mean_a, var_a, mean_b, var_b


def test_compare_against_statistics_from_the_raw_sums(runs, capsys, monkeypatch):
    from scipy.stats import ttest_ind_from_stats

    root, (run_a, totals_a), (run_b, totals_b) = runs
    assert (totals_a.tokens != totals_b.tokens).all()
    out_dir = root / "a_vs_b"
    code, out, err = run_cli(["compare", run_a, run_b, "--output-dir", out_dir, "--k", "3"], capsys, monkeypatch)
    assert code == 0, err
    group = raygrad.open_results(out_dir)
    np.testing.assert_array_equal(group["tokens_a"][:], totals_a.tokens)
    np.testing.assert_array_equal(group["tokens_b"][:], totals_b.tokens)
    with np.load(out_dir / names.CONSOLIDATED_NPZ) as npz:
        exported = {k: npz[k] for k in npz.files}
    for kind, prefix in (("gradients", "grad"), ("values", "value")):
        suffix = "" if kind == "gradients" else f"_{kind}"
        for row, layer in enumerate(LAYERS):
            n_a, n_b = totals_a.tokens[row], totals_b.tokens[row]
            sums_a = [totals_a.sums[f"{prefix}_{s}"][row] for s in ("sum", "abs_sum", "sq_sum")]
            sums_b = [totals_b.sums[f"{prefix}_{s}"][row] for s in ("sum", "abs_sum", "sq_sum")]
            t, df, mean_a, var_a, mean_b, var_b = welch_reference(sums_a[::2], n_a, sums_b[::2], n_b)
            t_abs, df_abs, abs_a, var_abs_a, abs_b, var_abs_b = welch_reference(sums_a[1:], n_a, sums_b[1:], n_b)
            scipy_t = ttest_ind_from_stats(mean_a, np.sqrt(var_a), n_a, mean_b, np.sqrt(var_b), n_b, equal_var=False)
            scipy_abs = ttest_ind_from_stats(abs_a, np.sqrt(var_abs_a), n_a, abs_b, np.sqrt(var_abs_b), n_b,
                                             equal_var=False)
            np.testing.assert_allclose(t, scipy_t.statistic, rtol=1e-10)  # the two references agree
            np.testing.assert_allclose(t_abs, scipy_abs.statistic, rtol=1e-10)
            expected = {"mean_diff": mean_a - mean_b, "mean_abs_diff": abs_a - abs_b,
                        "mean_abs_ratio": (abs_a + 1e-10) / (abs_b + 1e-10), "welch_t": t, "welch_t_abs": t_abs,
                        "welch_df": df, "welch_df_abs": df_abs, "mean_abs_a": abs_a, "mean_abs_b": abs_b}
            for statistic, want in expected.items():
                key = f"layer_{layer}_{statistic}{suffix}"
                np.testing.assert_allclose(exported[key], want, rtol=2e-5, err_msg=key)
                np.testing.assert_allclose(group[f"{prefix}_{statistic}"][row], want, rtol=2e-5, err_msg=key)
            if kind == "gradients":
                lines = out.split("specific to B")
                for side, order in ((0, np.argsort(-t_abs, kind="stable")), (1, np.argsort(t_abs, kind="stable"))):
                    listed = [int(line.split()[2]) for line in lines[side].splitlines()
                              if line.split()[:1] == [str(layer)]]
                    assert listed == list(order[:3]), (side, layer)
    assert out.startswith(f"specific to A ({run_a}): largest grad_welch_t_abs")
    assert out.strip().endswith(f"results  {out_dir}")
    assert (out_dir / "top_specific.txt").read_text() in out
    for name in ("layer_0_mean_abs_a_vs_b.png", "layer_2_mean_abs_a_vs_b.png", "all_layers_welch_t_abs.png"):
        assert (out_dir / "plots" / name).stat().st_size > 0
    metadata = json.loads((out_dir / names.METADATA_JSON).read_text())
    assert metadata["compare"]["epsilon"] == 1e-10 and metadata["tokens_b"] == totals_b.tokens.tolist()
    # `raygrad top` reads a comparison too
    code, out, _ = run_cli(["top", out_dir, "--by", "mean_abs_ratio_values", "--k", "2", "--layer", "2"],
                           capsys, monkeypatch)
    ratio = (totals_a.sums["value_abs_sum"][1] / totals_a.tokens[1] + 1e-10) / (
        totals_b.sums["value_abs_sum"][1] / totals_b.tokens[1] + 1e-10)
    assert code == 0 and [int(line.split()[2]) for line in out.splitlines()[1:]] == list(
        np.argsort(-np.abs(ratio), kind="stable")[:2])
    # `raygrad info` says what a comparison compared (after verifying it like a run)
    code, out, err = run_cli(["info", out_dir], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["compare"]["run_a"] == str(Path(run_a).resolve())


def test_compare_knows_one_model_named_two_ways(runs, tiny_llama, tiny_qwen2, texts_file, capsys, monkeypatch,
                                                 tmp_path):
    root, (run_a, totals_a), _ = runs
    common = dict(layers="0,2", aggregate_by=("gradients", "values"), num_samples=3, max_length=16)
    spelled_otherwise, totals = run_tiny(f"{tiny_llama}/.", texts_file, tmp_path / "b", **common)
    code, _, err = run_cli(["compare", run_a, spelled_otherwise, "--output-dir", tmp_path / "cmp"], capsys,
                           monkeypatch)
    assert code == 0, err
    np.testing.assert_array_equal(raygrad.open_results(tmp_path / "cmp")["tokens_b"][:], totals.tokens)
    other_model = tmp_path / "other"  # another model's files: still refused
    shutil.copytree(tiny_qwen2, other_model)
    other, _ = run_tiny(other_model, texts_file, tmp_path / "c", **common)
    code, _, err = run_cli(["compare", run_a, other, "--output-dir", tmp_path / "cmp2"], capsys, monkeypatch)
    assert code == 2 and f"--model {tiny_llama} vs {other_model}" in err, err


def test_compare_of_sae_runs_links_features_and_ranks_by_any_statistic(sae_runs, capsys, monkeypatch):
    root, (run_a, totals_a), (run_b, totals_b) = sae_runs
    output, text = compare_runs(run_a, run_b, root / "cmp", k=2, by="mean_abs_ratio")
    assert output == root / "cmp"
    a_part = text.split("specific to B")[0]
    assert "https://www.neuronpedia.org/tiny-llama/2-mlp-test/" in a_part
    ratio = (totals_a.sums["grad_abs_sum"][1] / totals_a.tokens[1] + 1e-10) / (
        totals_b.sums["grad_abs_sum"][1] / totals_b.tokens[1] + 1e-10)
    top = [int(line.split()[2]) for line in a_part.splitlines() if line.split()[:1] == ["2"]]
    assert top == list(np.argsort(-ratio, kind="stable")[:2])
    group = raygrad.open_results(output)
    assert group["site_grad_welch_t"].shape == (2, 32) and group["grad_welch_t"].shape == (2, D_SAE)
    # the default output directory lies beside RUN_A
    default, _ = compare_runs(run_a, run_b)
    assert default == root / "a" / f"compare_{run_a.name[-15:]}_vs_{run_b.name[-15:]}"


# --- xarray


def test_xarray_opens_mlp_sae_and_compare_runs(runs, sae_runs):
    xr = pytest.importorskip("xarray")
    root, (run_a, totals_a), (run_b, _) = runs
    out_dir = root / "for_xarray"
    compare_runs(run_a, run_b, out_dir)
    _, (sae_a, sae_totals), _ = sae_runs
    for path, totals, feature_dim in ((run_a, totals_a, "dim"), (sae_a, sae_totals, "feature")):
        ds = xr.open_zarr(path / names.STORE_NAME)
        assert ds.layer.values.tolist() == LAYERS
        row = ds.grad_mean_abs.sel(layer=2)
        np.testing.assert_allclose(row.values, totals.sums["grad_abs_sum"][1] / totals.tokens[1], rtol=1e-6)
        assert ds.grad_mean_abs.dims == ("layer", feature_dim) and ds.grad_std.attrs["units"]
        assert row.to_series().nlargest(3).index.tolist() == list(np.argsort(-row.values, kind="stable")[:3])
        assert ds.tokens.sel(layer=0).item() == totals.tokens[0]
    ds = xr.open_zarr(sae_a / names.STORE_NAME)
    assert ds.site_grad_mean.dims == ("layer", "dim") and ds.sizes["feature"] == D_SAE and ds.sizes["dim"] == 32
    ds = xr.open_zarr(out_dir / names.STORE_NAME)
    assert ds.value_welch_t.sel(layer=0).shape == (32,) and ds.grad_welch_t.attrs["description"]


# --- bad input: one line, exit 2, nothing written


def digest(root, skip=None):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not (skip and skip in p.parts)}


@pytest.fixture(scope="module")
def other_site(tiny_llama, texts_file, runs):
    root = runs[0]
    run_dir, _ = run_tiny(tiny_llama, texts_file, root / "c", layers="0,2", aggregate_by=("gradients", "values"),
                          hook_site="resid_post", num_samples=2)
    incomplete = root / "incomplete"
    shutil.copytree(runs[2][0], incomplete)
    ResultStore.open(incomplete / names.STORE_NAME, writable=True).group.attrs["status"] = "running"
    (root / "taken").mkdir()
    return run_dir, incomplete


BAD = [
    (["compare", "{a}", "{c}"], "RUN_A and RUN_B measured different things: --hook-site mlp_out vs resid_post"),
    (["compare", "{a}", "{incomplete}"], "RUN_B {incomplete}: the run is not complete"),
    (["compare", "{a}", "{a}"], "RUN_B {a}: is RUN_A itself; compare two different runs"),
    (["compare", "{a}", "{b}", "--output-dir", "{a}/inside"], "--output-dir {a}/inside: inside RUN_A {a}"),
    (["compare", "{a}", "{b}", "--output-dir", "{b}/x/y"], "--output-dir {b}/x/y: inside RUN_B {b}"),
    (["compare", "{a}", "{b}", "--output-dir", "{root}/taken"], "--output-dir {root}/taken: exists"),
    (["compare", "{a}", "{b}", "--by", "loudest", "--output-dir", "{root}/new"], "--by loudest: choose from"),
    (["compare", "{a}", "{b}", "--epsilon", "0", "--output-dir", "{root}/new"], "--epsilon 0.0: must be a number > 0"),
    (["export", "{a}", "--power", "0"], "--power 0.0: must be a number > 0"),
    (["export", "{a}", "--power", "-2"], "--power -2.0: must be a number > 0"),
    (["export", "{a}", "--normalize-mode", "max"], "--normalize-mode 'max': choose one of sum_abs, sum, none, all"),
    (["export", "{a}", "--aggregation-mode", "mean,median"], "--aggregation-mode mean,median: 'median' is not a"),
    (["export", "{a}", "--name", "../escape"], "--name '../escape': must be a plain directory name"),
    (["export", "{incomplete}", "--power", "2"], "{incomplete}: the run is not complete"),
    (["top", "{a}", "--by", "median"], "--by median: this run has grad_mean, grad_mean_abs"),
]


@pytest.mark.parametrize("args, expected", BAD, ids=[" ".join(a[:1] + a[3:]) or a[0] for a, _ in BAD])
def test_bad_input_is_one_line_and_changes_nothing(args, expected, runs, other_site, capsys, monkeypatch):
    root, (run_a, _), (run_b, _) = runs
    run_c, incomplete = other_site
    where = dict(a=run_a, b=run_b, c=run_c, incomplete=incomplete, root=root)
    before = digest(root)
    code, _, err = run_cli([arg.format(**where) for arg in args], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.format(**where) in lines[0]
    assert digest(root) == before


def test_export_into_an_existing_set_is_refused(runs, capsys, monkeypatch):
    root, (run_a, _), _ = runs
    code, _, err = run_cli(["export", run_a, "--power", "3", "--name", "cubed"], capsys, monkeypatch)
    assert code == 0, err
    before = digest(root)
    for args in (["--power", "3", "--name", "cubed"], ["--aggregation-mode", "std", "--name", "cubed"]):
        code, _, err = run_cli(["export", run_a, *args], capsys, monkeypatch)
        target = run_a / names.EXPORT_SETS_DIR / "cubed"
        assert code == 2 and err.strip().splitlines() == [
            f"error: --name cubed: {target} exists; export sets are never overwritten (give another --name)"]
    assert digest(root) == before


@pytest.mark.parametrize("extra, expected", [
    (["--power", "0"], "--power 0.0: must be a number > 0"),
    (["--normalize-mode", "l2"], "--normalize-mode 'l2': choose one of sum_abs, sum, none, all"),
    (["--normalize-gradients", "--normalize-mode", "sum"], "--normalize-mode sum: --normalize-gradients means --"),
    (["--aggregation-mode", "all,std"], "--aggregation-mode all,std: each statistic once"),
])
def test_bad_run_options_are_one_line(extra, expected, tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    args = ["run", "--model", tiny_llama, "--dataset", texts_file, "--workers", "0", "--output-dir", tmp_path / "out",
            "--no-progress", *extra]
    code, _, err = run_cli(args, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected}"), err
    assert not (tmp_path / "out").exists()
