"""Bad input and a failing disk through the command line: one line, a non-zero exit, nothing
overwritten; rows that cannot be used are counted, not fatal."""

import errno
import json
import time

import numpy as np
import pytest
from helpers import build_config, killed_run, run_cli, tiny_args, tree_digest
from tiny import SAMPLE_TEXTS

from raygrad import constants as names
from raygrad import engine
from raygrad import store as store_module
from raygrad.data import REPLACED_BYTES, SKIP_NOT_TEXT, load_texts
from raygrad.store import ResultStore

LONG = [t for t in SAMPLE_TEXTS if len(t.strip()) > 50]


def one_line(code, err, *expected, exit_code=2):
    lines = err.strip().splitlines()
    assert code == exit_code and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for text in expected:
        assert text in lines[0], (text, lines[0])


def metadata_of(out_dir):
    (run_dir,) = out_dir.iterdir()
    return run_dir, json.loads((run_dir / names.METADATA_JSON).read_text())


def test_bytes_that_are_not_utf8_are_replaced_and_counted(tiny_llama, tmp_path, capsys, monkeypatch):
    path = tmp_path / "latin1.txt"
    lines = [text.encode() for text in LONG]
    lines[1] = "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9: a line written in Latin-1.".encode("latin-1")
    path.write_bytes(b"\n".join(lines))
    texts = load_texts(str(path), 100)
    assert "\ufffd" in texts[1] and texts[0] == LONG[0]
    code, out, err = run_cli(tiny_args(tiny_llama, path, tmp_path / "out"), capsys, monkeypatch)
    assert code == 0, err
    assert "1 lines kept with bytes that are not UTF-8" in out
    _, metadata = metadata_of(tmp_path / "out")
    assert metadata["plan"]["skipped_texts"][REPLACED_BYTES] == 1


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_null_and_missing_texts_are_skipped_and_counted(tiny_llama, tmp_path, capsys, monkeypatch, suffix):
    import pandas as pd

    rows = [{"text": LONG[0]}, {"text": None}, {"text": LONG[1]}, {"other": "no text key"}, {"text": LONG[2]},
            {"text": LONG[3]}]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(row) for row in rows))
    else:
        pd.DataFrame(rows).to_parquet(path)
    code, out, err = run_cli(tiny_args(tiny_llama, path, tmp_path / "out"), capsys, monkeypatch)
    assert code == 0, err
    assert "2 rows whose text is null, missing or not a string" in out
    _, metadata = metadata_of(tmp_path / "out")
    assert metadata["plan"]["skipped_texts"][SKIP_NOT_TEXT] == 2 and metadata["num_samples"] == 4


def test_a_numeric_text_column_is_one_line(tiny_llama, tmp_path, capsys, monkeypatch):
    path = tmp_path / "numbers.csv"
    path.write_text("text,label\n" + "\n".join(f"{i},{i % 2}" for i in range(10)))
    code, _, err = run_cli(tiny_args(tiny_llama, path, tmp_path / "out"), capsys, monkeypatch)
    one_line(code, err, f"--dataset {path}", "10 values of --text-column text are not text")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_output_dir_that_is_a_file_is_one_line(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    target = tmp_path / "results"
    target.write_text("my notes")
    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, target), capsys, monkeypatch)
    one_line(code, err, f"--output-dir {target}: is a file")
    assert target.read_text() == "my notes"


def test_an_unwritable_output_dir_is_one_line(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path / "out"), capsys, monkeypatch)
    one_line(code, err, f"--output-dir {tmp_path / 'out'}: cannot write there (Read-only file system)")


def test_a_read_only_filesystem_is_one_line(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    """The real thing where this machine lets a test mount one."""
    import subprocess

    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here")
    try:
        code, _, err = run_cli(tiny_args(tiny_llama, texts_file, mount / "out"), capsys, monkeypatch)
        one_line(code, err, "--output-dir", "Read-only file system")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_while_checkpointing_stops_with_the_resume_command(tiny_llama, texts_file, tmp_path, capsys,
                                                                       monkeypatch, in_process_totals):
    expected = in_process_totals(shard_size=1)
    capsys.readouterr()  # the undisturbed run's own output (transformers' loading bar) is not the command's
    real_stage = store_module._stage

    def disk_fills_on_third_checkpoint(pending, arrays):
        # By what a checkpoint holds, not by how many were written: the writer thread may merge
        # checkpoints, but the last one (every shard done) always comes.
        if arrays[names.SHARDS_DONE].sum() >= 3:
            (pending.with_suffix(".tmp.npz")).write_bytes(b"half")  # as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_stage(pending, arrays)

    monkeypatch.setattr(store_module, "_stage", disk_fills_on_third_checkpoint)
    out_dir = tmp_path / "full"
    code, out, err = run_cli(tiny_args(tiny_llama, texts_file, out_dir, "--shard-size", "1",
                                       "--checkpoint-seconds", "0", "--num-samples", "6", "--batch-size", "3",
                                       "--max-length", "24", "--dtype", "float64"), capsys, monkeypatch)
    (run_dir,) = out_dir.iterdir()
    one_line(code, err, "checkpoint failed (No space left on device)", f"raygrad run --resume {run_dir}")
    monkeypatch.setattr(store_module, "_stage", real_stage)
    code, _, err = run_cli(["run", "--resume", str(run_dir), "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    for name in expected.sums:
        np.testing.assert_array_equal(resumed.sums[name], expected.sums[name])


def test_a_full_disk_while_exporting_is_reported_and_resume_rewrites_the_exports(tiny_llama, texts_file, tmp_path,
                                                                                  capsys, monkeypatch):
    import contextlib

    from raygrad import export

    real_replacing = export.replacing

    @contextlib.contextmanager
    def disk_fills_in_the_npz(path):
        with real_replacing(path) as handle:
            if path.name == names.CONSOLIDATED_NPZ:
                handle.write(b"the first bytes")
                raise OSError(errno.ENOSPC, "No space left on device")
            yield handle

    monkeypatch.setattr(export, "replacing", disk_fills_in_the_npz)
    code, out, err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path), capsys, monkeypatch)
    (run_dir,) = tmp_path.iterdir()
    one_line(code, err, "writing the exports failed (No space left on device)", f"raygrad run --resume {run_dir}")
    monkeypatch.setattr(export, "replacing", real_replacing)
    assert not (run_dir / names.CONSOLIDATED_NPZ).exists()
    assert not (run_dir / names.METADATA_JSON).exists()
    assert not list(run_dir.glob("*.partial"))  # no truncated export left behind
    code, out, _ = run_cli(["info", str(run_dir)], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["exports"] == [f"{names.METADATA_JSON} is missing"]
    code, out, err = run_cli(["run", "--resume", str(run_dir), "--no-progress"], capsys, monkeypatch)
    assert code == 0 and "writing them again" in out, err
    code, out, _ = run_cli(["info", str(run_dir)], capsys, monkeypatch)
    assert json.loads(out)["exports"] == "whole"
    (run_dir / names.CONSOLIDATED_NPZ).write_bytes(b"damaged")
    code, out, _ = run_cli(["info", str(run_dir)], capsys, monkeypatch)
    assert json.loads(out)["exports"] == [f"{names.CONSOLIDATED_NPZ} is damaged"]
    code, _, err = run_cli(["run", "--resume", str(run_dir), "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    before = tree_digest(run_dir)
    code, _, err = run_cli(["run", "--resume", str(run_dir), "--no-progress"], capsys, monkeypatch)
    one_line(code, err, "already complete, and its exports are whole")
    assert tree_digest(run_dir) == before


def test_runs_started_in_the_same_second_get_their_own_directories(tiny_llama, texts_file, tmp_path, monkeypatch):
    from datetime import datetime

    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 11, 27, 12, 0, 0)

    monkeypatch.setattr(engine, "datetime", FrozenClock)
    first = engine.run(build_config(tiny_llama, texts_file, tmp_path), echo=lambda _: None, progress=False)
    second = engine.run(build_config(tiny_llama, texts_file, tmp_path), echo=lambda _: None, progress=False)
    assert second.name == first.name + "_2"
    assert (first / names.METADATA_JSON).exists() and (second / names.METADATA_JSON).exists()


def test_a_dataset_changed_before_resume_is_refused(tiny_llama, tmp_path, capsys, monkeypatch):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(LONG) + "\n")
    run_dir = killed_run(build_config(tiny_llama, path, tmp_path / "out", shard_size=1, num_samples=4,
                                      checkpoint_seconds=0), dies_at_call=3)
    edited = list(LONG)
    edited[2] = edited[2].replace("the", "a", 1)  # same line count, one text changed
    path.write_text("\n".join(edited) + "\n")
    before = tree_digest(run_dir)
    code, _, err = run_cli(["run", "--resume", str(run_dir), "--no-progress"], capsys, monkeypatch)
    one_line(code, err, "the dataset changed since the run was planned: shard 2, rows 2-2 differ")
    assert tree_digest(run_dir) == before


def test_an_unreachable_hub_is_one_line_within_seconds(texts_file, tmp_path, capsys, monkeypatch):
    import socket

    from raygrad import hub

    def no_route(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", no_route)
    hub._hub_answers.cache_clear()
    started = time.monotonic()
    code, _, err = run_cli(tiny_args("nobody/no-such-model", texts_file, tmp_path), capsys, monkeypatch)
    hub._hub_answers.cache_clear()
    assert time.monotonic() - started < 20  # not half a minute of retries
    one_line(code, err, "--model nobody/no-such-model: not a local path, and not in the hub cache",
             "huggingface.co does not answer", "--model smollm2-135m")


def test_local_paths_that_are_not_models_and_gated_repositories_are_named(texts_file, tmp_path, capsys,
                                                                          monkeypatch):
    from raygrad.hub import load_error

    (tmp_path / "not-a-model").mkdir()
    code, _, err = run_cli(tiny_args(tmp_path / "not-a-model", texts_file, tmp_path / "o"), capsys, monkeypatch)
    one_line(code, err, "this directory is not a model (it has no config.json)")
    (tmp_path / "weights.bin").write_bytes(b"x")
    code, _, err = run_cli(tiny_args(tmp_path / "weights.bin", texts_file, tmp_path / "o"), capsys, monkeypatch)
    one_line(code, err, "is a file; expected a model directory")
    gated = OSError("You are trying to access a gated repo.\nMake sure to have access to it.")
    assert "a gated repository on the hub" in load_error("--model", "meta-llama/Llama-3.1-8B", gated)
    assert "HF_TOKEN" in load_error("--model", "meta-llama/Llama-3.1-8B", gated)


def test_an_unreachable_address_is_one_line_within_the_connect_timeout(tiny_llama, texts_file, tmp_path, capsys,
                                                                       monkeypatch):
    started = time.monotonic()
    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path, "--workers", "1", "--address",
                                     "127.0.0.1:1", "--connect-timeout", "2"), capsys, monkeypatch)
    assert time.monotonic() - started < 30
    one_line(code, err, "--address 127.0.0.1:1: nothing answered within --connect-timeout 2 s")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("option, value, expected", [
    ("--checkpoint-seconds", "-1", "--checkpoint-seconds -1.0: must be a number of seconds >= 0"),
    ("--connect-timeout", "-5", "--connect-timeout -5.0: must be a number of seconds >= 0"),
])
def test_negative_durations_are_one_line(tiny_llama, texts_file, tmp_path, capsys, monkeypatch, option, value,
                                         expected):
    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path, option, value), capsys, monkeypatch)
    one_line(code, err, expected)


def test_out_of_memory_in_a_batch_that_cannot_shrink_is_one_line(tiny_llama, texts_file, tmp_path, capsys,
                                                                 monkeypatch):
    """A fixed --batch-size that does not fit (auto shrinks by itself): one line saying what would fit,
    the finished shards kept, the resume command said; not a traceback from the allocator."""
    import torch

    from raygrad import worker

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 79.1 GiB of which 1.2 GiB is free.")

    monkeypatch.setattr(worker, "accumulate_batch", no_memory)
    code, out, err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path), capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: CUDA out of memory on cpu in a batch of 2 text(s),") and (
        "--tokens-per-batch" in lines[0] and "GiB" not in lines[0])
    (run_dir,) = tmp_path.iterdir()
    assert f"continue with: raygrad run --resume {run_dir}" in out
