"""Every export: names, keys, shapes, values, and regeneration from the store."""

import json

import numpy as np
import pytest
from helpers import run_tiny

import raygrad
from raygrad import constants as names
from raygrad.analysis.export import write_exports


@pytest.fixture(scope="module")
def both_run(tiny_llama, texts_file, tmp_path_factory):
    run_dir, totals = run_tiny(tiny_llama, texts_file, tmp_path_factory.mktemp("exports"), layers="0,2",
                               aggregation_mode="both", save_outputs=True)
    return run_dir, totals


def test_run_directory_name_follows_the_original_pattern(both_run):
    run_dir, _ = both_run
    assert run_dir.name.startswith("layer_activations_model_")
    assert "_num_samples_6_batch_size_3_layers_0_2_" in run_dir.name


def test_every_export_exists_with_the_right_names_and_shapes(both_run):
    run_dir, totals = both_run
    for layer in (0, 2):
        for mode in ("mean_abs", "mean"):
            array = np.load(run_dir / f"layer_{layer}_{mode}_gradients.npy")
            assert array.shape == (32,) and array.dtype == np.float32
        assert (run_dir / "plots" / f"layer_{layer}_mean_abs_histogram.png").stat().st_size > 0
        assert (run_dir / "plots" / f"layer_{layer}_mean_scatter.png").exists()
        assert (run_dir / "plots" / f"layer_{layer}_combined.png").exists()
    for name in ("all_layers_mean_abs_heatmap.png", "all_layers_mean_summary.png", "all_layers_combined.png"):
        assert (run_dir / "plots" / name).exists()
    for name in (names.METADATA_JSON, names.TIMING_JSON, names.TIMING_TXT):
        assert (run_dir / name).stat().st_size > 0
    assert not list(run_dir.glob("layer_1_*"))
    timing = json.loads((run_dir / names.TIMING_JSON).read_text())
    summary = (run_dir / names.TIMING_TXT).read_text()  # what the head received, as the JSON says
    assert timing["partials_received"] >= 1 and timing["bytes_received"] > 0
    assert f"partials received:     {timing['partials_received']} ({timing['bytes_received'] / 2**20:.1f} MiB)" \
        in summary
    assert f"checkpoints:           {timing['checkpoints']} (" in summary


def test_npz_loads_without_pickle_and_holds_the_means(both_run):
    run_dir, totals = both_run
    with np.load(run_dir / "consolidated_results.npz", allow_pickle=False) as data:
        assert sorted(data.files) == sorted(
            ["metadata", "layer_0_mean_abs", "layer_0_mean", "layer_2_mean_abs", "layer_2_mean"])
        metadata = json.loads(data["metadata"].item())
        expected = totals.sums[names.GRAD_ABS_SUM][1] / totals.tokens[1]
        np.testing.assert_allclose(data["layer_2_mean_abs"], expected, rtol=1e-6)
        np.testing.assert_allclose(data["layer_0_mean"], totals.sums[names.GRAD_SUM][0] / totals.tokens[0],
                                   rtol=1e-6)
    assert metadata["layers"] == [0, 2]
    assert metadata["dimension_sizes"] == {"0": 32, "2": 32}
    assert metadata["num_samples"] == 6
    stats = metadata["layer_statistics"]["2"]["mean_abs"]
    assert stats["max"] == pytest.approx(expected.max(), rel=1e-6)
    assert stats["sum_abs"] == pytest.approx(np.abs(expected).sum(), rel=1e-6)
    assert stats["std"] == pytest.approx(expected.std(), rel=1e-5)
    assert metadata["mean_loss_nats_per_token"] == pytest.approx(totals.loss_sum / totals.loss_tokens)


def test_export_command_reproduces_every_file(both_run):
    run_dir, _ = both_run
    before = {p.name: np.load(p) for p in run_dir.glob("*.npy")}
    with np.load(run_dir / names.CONSOLIDATED_NPZ) as data:
        npz_before = {k: data[k] for k in data.files}
    for path in list(run_dir.glob("*.npy")) + [run_dir / names.CONSOLIDATED_NPZ, run_dir / names.METADATA_JSON]:
        path.unlink()
    write_exports(run_dir)
    assert {p.name for p in run_dir.glob("*.npy")} == set(before)
    for name, array in before.items():
        np.testing.assert_array_equal(np.load(run_dir / name), array)
    with np.load(run_dir / names.CONSOLIDATED_NPZ) as data:
        for key in npz_before:
            if key != "metadata":
                np.testing.assert_array_equal(data[key], npz_before[key])
    assert json.loads((run_dir / names.METADATA_JSON).read_text())["layers"] == [0, 2]


def test_no_plots_writes_the_npy_files_only_and_export_can_draw_them_later(tiny_llama, texts_file, tmp_path,
                                                                          capsys, monkeypatch):
    from helpers import run_cli, tiny_args, tree_digest

    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path, "--save-outputs", "--no-plots",
                                     "--aggregation-mode", "both"), capsys, monkeypatch)
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    assert {p.name for p in run_dir.glob("*.npy")} == {f"layer_{layer}_{mode}_gradients.npy"
                                                       for layer in (0, 1, 2) for mode in ("mean_abs", "mean")}
    assert not (run_dir / "plots").exists()
    metadata = json.loads((run_dir / names.METADATA_JSON).read_text())
    assert metadata["configuration"]["plots"] is False
    assert not [name for name in metadata[names.EXPORT_FILES_KEY] if name.startswith("plots")]

    code, out, err = run_cli(["export", str(run_dir), "--plots"], capsys, monkeypatch)
    assert code == 0, err
    drawn = {p.name for p in (run_dir / "plots").iterdir()}
    assert {"layer_0_mean_abs_histogram.png", "layer_2_mean_scatter.png", "all_layers_combined.png"} <= drawn
    assert len(drawn) == 2 * (3 * 2 + 2) + 3 + 1  # per mode: 3 layers x (histogram, scatter), heatmap, summary
    listed = json.loads((run_dir / names.METADATA_JSON).read_text())[names.EXPORT_FILES_KEY]
    assert {f"plots/{name}" for name in drawn} <= set(listed)  # `info` checks them as any other export

    plain_dir, _ = run_tiny(tiny_llama, texts_file, tmp_path / "plain")
    before = tree_digest(plain_dir)
    for extra in ([], ["--power", "2"]):  # the run's exports again, or a new export set
        code, _, err = run_cli(["export", str(plain_dir), "--plots", *extra], capsys, monkeypatch)
        assert code == 2 and err.strip().splitlines() == [
            "error: --plots: plots are drawn beside the per-layer .npy files; add --save-outputs (this run was "
            "made without it)"]
        assert tree_digest(plain_dir) == before and not (plain_dir / names.EXPORT_SETS_DIR).exists()

    code, _, err = run_cli(["export", str(run_dir), "--aggregation-mode", "mean_sq", "--no-plots"], capsys,
                           monkeypatch)
    assert code == 0, err
    (export_set,) = (run_dir / names.EXPORT_SETS_DIR).iterdir()
    assert (export_set / "layer_1_mean_sq_gradients.npy").exists() and not (export_set / "plots").exists()

def test_load_results_accepts_npz_directory_and_store(both_run):
    run_dir, totals = both_run
    expected = totals.sums[names.GRAD_ABS_SUM][0] / totals.tokens[0]
    for path in (run_dir / names.CONSOLIDATED_NPZ, run_dir, run_dir / names.STORE_NAME):
        results = raygrad.load_results(path)
        assert results.layers == [0, 2]
        np.testing.assert_allclose(results.layer(0, "mean_abs"), expected, rtol=1e-6)
        assert results.metadata["layers"] == [0, 2]
    lazy = raygrad.open_results(run_dir)
    np.testing.assert_allclose(lazy["grad_mean_abs"][0], expected, rtol=1e-6)
    assert lazy["grad_sum"].metadata.dimension_names == ("layer", "dim")


def test_normalization_makes_sum_of_abs_equal_dimension(tiny_llama, texts_file, tmp_path):
    run_dir, totals = run_tiny(tiny_llama, texts_file, tmp_path, normalize_gradients=True, save_outputs=True,
                               plots=False)
    for layer in range(3):
        v = np.load(run_dir / f"layer_{layer}_mean_abs_gradients.npy")
        assert np.abs(v).sum() == pytest.approx(32, rel=1e-5)
        raw = totals.sums[names.GRAD_ABS_SUM][layer]
        np.testing.assert_allclose(v, raw * 32 / raw.sum(), rtol=1e-5)
    assert raygrad.load_results(run_dir).metadata["normalized"] is True


def test_save_consolidated_writes_a_second_copy(tiny_llama, texts_file, tmp_path):
    target = tmp_path / "elsewhere" / "all.npz"
    run_dir, _ = run_tiny(tiny_llama, texts_file, tmp_path / "out", save_consolidated=str(target))
    with np.load(target, allow_pickle=False) as copy, np.load(run_dir / names.CONSOLIDATED_NPZ) as own:
        assert copy.files == own.files
        np.testing.assert_array_equal(copy["layer_1_mean_abs"], own["layer_1_mean_abs"])


def test_a_failed_export_leaves_the_earlier_files_whole(tiny_llama, texts_file, tmp_path, monkeypatch):
    """A full disk while writing the npz: the earlier consolidated file and metadata.json stay as
    they were, and no partial file is left behind."""
    run_dir, _ = run_tiny(tiny_llama, texts_file, tmp_path)
    before = {name: (run_dir / name).read_bytes() for name in (names.CONSOLIDATED_NPZ, names.METADATA_JSON)}
    real_savez = np.savez

    def disk_full(handle, **arrays):
        real_savez(handle, **{k: v for k, v in list(arrays.items())[:1]})  # part of it reached the disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_exports(run_dir)
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".partial")]


def test_export_of_an_incomplete_run_is_one_line(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    import sys

    from raygrad.cli import main
    from raygrad.store.zarr_store import ResultStore

    run_dir, _ = run_tiny(tiny_llama, texts_file, tmp_path)
    ResultStore.open(run_dir / names.STORE_NAME, writable=True).group.attrs["status"] = "running"
    capsys.readouterr()  # the run's own output
    monkeypatch.setattr(sys, "argv", ["raygrad", "export", str(run_dir)])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2
    assert err == [f"error: {run_dir}: the run is not complete; finish it with: raygrad run --resume {run_dir}"]
