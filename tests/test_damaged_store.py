"""A damaged store never yields a number: every reader stops with one line naming the part."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import build_config, killed_run, run_cli, tree_digest

from raygrad import constants as names
from raygrad import engine, load_results, open_results
from raygrad.errors import RaygradError
from raygrad.store import checkpoint as store_module
from raygrad.store.zarr_store import DamagedStore, ResultStore

SUM_AND_STATE = [names.GRAD_SUM, names.GRAD_ABS_SUM, "grad_sq_sum", names.TOKENS, names.SHARDS_DONE,
                 names.LOSS_SUM, names.LOSS_TOKENS, names.LAYERS, names.LAYER_COORD]
MEANS = ["grad_mean_abs", "grad_mean", "grad_std"]  # statistics derived at finalize


@pytest.fixture(scope="module")
def pristine(tiny_llama, texts_file, tmp_path_factory):
    """A complete run and an interrupted one (3 of 6 shards), made once and copied per test."""
    root = tmp_path_factory.mktemp("pristine")
    complete = engine.run(build_config(tiny_llama, texts_file, root / "complete", shard_size=1,
                                       aggregation_mode="both"), echo=lambda _: None, progress=False)
    killed = killed_run(build_config(tiny_llama, texts_file, root / "killed", shard_size=1, checkpoint_seconds=0),
                        dies_at_call=4)
    return {"complete": complete, "killed": killed}


def copy_of(pristine, which, tmp_path) -> Path:
    target = tmp_path / which
    shutil.copytree(pristine[which], target)
    return target


def chunk_files(run_dir: Path, array: str) -> list[Path]:
    files = [p for p in (run_dir / names.STORE_NAME / array).rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert files, f"{array} has no chunk file to damage"
    return files


def damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    else:  # bytes changed, same length
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def readers(run_dir: Path) -> list[list[str]]:
    return [["info", str(run_dir)], ["export", str(run_dir)], ["top", str(run_dir)],
            ["run", "--resume", str(run_dir), "--no-progress"]]


def assert_one_line_error(args, capsys, monkeypatch, *expected):
    code, out, err = run_cli(args, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2, (args, code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.mark.parametrize("how", ["missing", "truncated", "changed"])
@pytest.mark.parametrize("array", SUM_AND_STATE + MEANS)
def test_a_damaged_chunk_stops_every_reader(pristine, tmp_path, capsys, monkeypatch, array, how):
    run_dir = copy_of(pristine, "complete", tmp_path)
    damage(chunk_files(run_dir, array)[0], how)
    before = tree_digest(run_dir)
    remedy = f"raygrad repair {run_dir}" if array in MEANS else "re-run it"
    for args in readers(run_dir):
        assert_one_line_error(args, capsys, monkeypatch, f"{names.STORE_NAME}/{array}", remedy)
    with pytest.raises(DamagedStore, match=array):
        load_results(run_dir)
    with pytest.raises(DamagedStore, match=array):
        open_results(run_dir)
    assert tree_digest(run_dir) == before  # a reader that refuses writes nothing


@pytest.mark.parametrize("array", [names.SHARDS_DONE, names.GRAD_SUM, names.TOKENS])
def test_an_interrupted_run_with_a_missing_chunk_is_not_resumed(pristine, tmp_path, capsys, monkeypatch, array):
    """The issue's case: shards_done's chunk deleted read back as 'no shard done' and was recounted."""
    run_dir = copy_of(pristine, "killed", tmp_path)
    damage(chunk_files(run_dir, array)[0], "missing")
    assert_one_line_error(["run", "--resume", str(run_dir), "--no-progress"], capsys, monkeypatch,
                          f"{names.STORE_NAME}/{array}", "re-run it")
    assert_one_line_error(["info", str(run_dir)], capsys, monkeypatch, array)


@pytest.mark.parametrize("part", ["zarr.json", f"{names.GRAD_SUM}/zarr.json", names.CHECKPOINT_STATE])
def test_truncated_metadata_is_one_line(pristine, tmp_path, capsys, monkeypatch, part):
    run_dir = copy_of(pristine, "complete", tmp_path)
    damage(run_dir / names.STORE_NAME / part, "truncated")
    for args in readers(run_dir):
        assert_one_line_error(args, capsys, monkeypatch, str(run_dir / names.STORE_NAME))


def test_a_changed_plan_is_caught(pristine, tmp_path, capsys, monkeypatch):
    run_dir = copy_of(pristine, "killed", tmp_path)
    group = ResultStore.open(run_dir / names.STORE_NAME, writable=True, verify=False).group
    plan = dict(group.attrs[names.ATTR_PLAN])
    plan["shards"] = plan["shards"][::-1]
    group.attrs[names.ATTR_PLAN] = plan
    assert_one_line_error(["run", "--resume", str(run_dir), "--no-progress"], capsys, monkeypatch,
                          "configuration or plan changed")


def test_a_damaged_redo_file_is_one_line_and_a_stale_staging_file_is_ignored(pristine, tmp_path, capsys,
                                                                              monkeypatch):
    run_dir = copy_of(pristine, "killed", tmp_path)
    store_dir = run_dir / names.STORE_NAME
    (store_dir / "pending_checkpoint.tmp.npz").write_bytes(b"a staging file cut short by a kill")
    totals, done = ResultStore.open(store_dir).totals()  # the staging file is not a checkpoint: ignored
    assert done.sum() == 3
    (store_dir / names.PENDING_CHECKPOINT).write_bytes(b"PK\x03\x04 truncated")
    for args in (["info", str(run_dir)], ["run", "--resume", str(run_dir), "--no-progress"]):
        assert_one_line_error(args, capsys, monkeypatch, str(store_dir), "cannot be read")


def test_repair_rebuilds_damaged_means_from_verified_sums(pristine, tmp_path, capsys, monkeypatch):
    run_dir = copy_of(pristine, "complete", tmp_path)
    expected = {key: value.copy() for key, value in load_results(run_dir).arrays.items()}
    damage(chunk_files(run_dir, "grad_mean_abs")[0], "missing")
    code, out, err = run_cli(["repair", str(run_dir)], capsys, monkeypatch)
    assert code == 0, err
    assert "rebuilt 5 derived statistics" in out
    repaired = load_results(run_dir)
    for key, value in expected.items():
        np.testing.assert_array_equal(repaired.arrays[key], value)
    code, out, _ = run_cli(["info", str(run_dir)], capsys, monkeypatch)
    assert code == 0 and '"exports": "whole"' in out


def test_repair_refuses_damaged_sums(pristine, tmp_path, capsys, monkeypatch):
    run_dir = copy_of(pristine, "complete", tmp_path)
    damage(chunk_files(run_dir, names.GRAD_SUM)[0], "missing")
    assert_one_line_error(["repair", str(run_dir)], capsys, monkeypatch, names.GRAD_SUM, "re-run it")


class Killed(BaseException):
    """A SIGKILL, in process: nothing after it runs."""


def test_readers_see_a_committed_checkpoint_that_was_not_yet_applied(pristine, tmp_path, monkeypatch):
    run_dir = copy_of(pristine, "killed", tmp_path)
    store_dir = run_dir / names.STORE_NAME
    writer = ResultStore.open(store_dir, writable=True)
    totals, done = writer.totals()
    totals.sums[names.GRAD_SUM] = totals.sums[names.GRAD_SUM] * 2 + 1
    totals.tokens = totals.tokens + 7
    done[3] = True
    real_write, written = store_module._write_array, []

    def killed_after_one_array(store, name, value):
        if written:
            raise Killed
        written.append(name)
        real_write(store, name, value)

    monkeypatch.setattr(store_module, "_write_array", killed_after_one_array)
    with pytest.raises(Killed):
        writer.checkpoint(totals, done)
    monkeypatch.setattr(store_module, "_write_array", real_write)
    assert (store_dir / names.PENDING_CHECKPOINT).exists()
    before = tree_digest(run_dir)

    group = open_results(run_dir)
    np.testing.assert_array_equal(group[names.GRAD_SUM][:], totals.sums[names.GRAD_SUM])
    np.testing.assert_array_equal(group[names.TOKENS][:], totals.tokens)
    np.testing.assert_array_equal(group[names.SHARDS_DONE][:], done)
    read_totals, read_done = ResultStore.open(store_dir).totals()
    np.testing.assert_array_equal(read_totals.sums[names.GRAD_SUM], totals.sums[names.GRAD_SUM])
    np.testing.assert_array_equal(read_done, done)
    assert tree_digest(run_dir) == before  # reading applied nothing

    replayed = ResultStore.open(store_dir, writable=True)  # a writer applies it, then the arrays agree
    assert not (store_dir / names.PENDING_CHECKPOINT).exists()
    np.testing.assert_array_equal(replayed.group[names.GRAD_SUM][:], totals.sums[names.GRAD_SUM])


def test_export_of_an_incomplete_run_is_one_line(pristine, tmp_path, capsys, monkeypatch):
    run_dir = copy_of(pristine, "killed", tmp_path)
    assert_one_line_error(["export", str(run_dir)], capsys, monkeypatch, "not complete", "--resume")
    with pytest.raises(RaygradError, match="not complete"):
        load_results(run_dir)


def test_a_store_from_before_digests_is_refused_until_trusted(pristine, tmp_path, capsys, monkeypatch):
    run_dir = copy_of(pristine, "complete", tmp_path)
    expected = load_results(run_dir).arrays["mean_abs"].copy()
    (run_dir / names.STORE_NAME / names.CHECKPOINT_STATE).unlink()  # as raygrad wrote stores before
    assert_one_line_error(["info", str(run_dir)], capsys, monkeypatch, "missing or unreadable",
                          f"raygrad repair --trust-unrecorded {run_dir}")
    code, out, err = run_cli(["repair", "--trust-unrecorded", str(run_dir)], capsys, monkeypatch)
    assert code == 0, err
    np.testing.assert_array_equal(load_results(run_dir).arrays["mean_abs"], expected)
    assert_one_line_error(["repair", "--trust-unrecorded", str(run_dir)], capsys, monkeypatch,
                          "its digests are checked, not replaced")
