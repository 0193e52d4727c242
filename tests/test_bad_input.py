"""Bad input and a failing disk through the command line: one line, a non-zero exit, nothing
overwritten; rows that cannot be used are counted, not fatal."""

import errno
import json
import os
import time

import numpy as np
import pytest
from helpers import build_config, killed_run, run_cli, tiny_args, tree_digest
from tiny import SAMPLE_TEXTS

from raygrad import constants as names
from raygrad import engine
from raygrad.dataset.shards import load_texts
from raygrad.dataset.text import REPLACED_BYTES, SKIP_NOT_TEXT
from raygrad.store import checkpoint as store_module
from raygrad.store.zarr_store import ResultStore

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


@pytest.fixture
def read_only_mount(tmp_path):
    """A read-only filesystem: the real thing, where this machine lets a test mount one."""
    import subprocess

    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_read_only_filesystem_is_one_line(tiny_llama, texts_file, read_only_mount, capsys, monkeypatch):
    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, read_only_mount / "out"), capsys, monkeypatch)
    one_line(code, err, "--output-dir", "Read-only file system")


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

    from raygrad.analysis import export

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

    from raygrad.model import hub

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
    from raygrad.model.hub import load_error

    (tmp_path / "not-a-model").mkdir()
    code, _, err = run_cli(tiny_args(tmp_path / "not-a-model", texts_file, tmp_path / "o"), capsys, monkeypatch)
    one_line(code, err, "this directory is not a model (it has no config.json)")
    (tmp_path / "weights.bin").write_bytes(b"x")
    code, _, err = run_cli(tiny_args(tmp_path / "weights.bin", texts_file, tmp_path / "o"), capsys, monkeypatch)
    one_line(code, err, "is a file; expected a model directory")
    gated = OSError("You are trying to access a gated repo.\nMake sure to have access to it.")
    assert "a gated repository on the hub" in load_error("--model", "meta-llama/Llama-3.1-8B", gated)
    import socket

    # on a cluster, the node that could not load it (credentials are each node's own, never forwarded)
    assert load_error("--model", "meta-llama/Llama-3.1-8B", gated).endswith(
        f"log in (`hf auth login`) or set HF_TOKEN on host {socket.gethostname()}, which reads its own")


def test_an_unreachable_address_is_one_line_within_the_connect_timeout(tiny_llama, texts_file, tmp_path, capsys,
                                                                       monkeypatch):
    started = time.monotonic()
    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path, "--workers", "1", "--address",
                                     "127.0.0.1:1", "--connect-timeout", "2"), capsys, monkeypatch)
    assert time.monotonic() - started < 30
    one_line(code, err, "--address 127.0.0.1:1: nothing answered within --connect-timeout 2 s")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("address", ["127.0.0.1:²", "127.0.0.1:١٢", "127.0.0.1:99999", "127.0.0.1:0", "6379",
                                     "ray://host:port"])
def test_an_address_without_a_port_of_ascii_digits_is_one_line(tiny_llama, texts_file, tmp_path, capsys, monkeypatch,
                                                               address):
    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path, "--workers", "1", "--address", address),
                           capsys, monkeypatch)
    one_line(code, err, f"--address {address}: expected HOST:PORT (a port 1-65535), ray://HOST:PORT or auto")
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

    from raygrad.compute import worker

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


# --- issue 24: the right cause, and counts in ASCII digits only


def test_a_model_directory_whose_config_lacks_model_type_is_named_so(tiny_llama, texts_file, tmp_path, capsys,
                                                                     monkeypatch):
    """It was reported as "not in the hub cache": a directory is never looked up on the hub."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    del config["model_type"]
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(tiny_args(model, texts_file, tmp_path / "out"), capsys, monkeypatch)
    one_line(code, err, f"--model {model}: its config.json has no model_type, which names the architecture "
                        "transformers builds (e.g. \"llama\")")
    assert "hub" not in err
    (model / "config.json").write_text("{not json")
    code, _, err = run_cli(tiny_args(model, texts_file, tmp_path / "out"), capsys, monkeypatch)
    one_line(code, err, f"--model {model}: its config.json cannot be read as JSON")


def save_consolidated_refused(tiny_llama, texts_file, tmp_path, target, capsys, monkeypatch):
    """Run with --save-consolidated TARGET; -> stderr. No shard may be computed first."""
    from raygrad.compute.worker import ShardRunner

    def computes(*args, **kwargs):
        raise AssertionError("a shard was computed before the output paths were checked")

    monkeypatch.setattr(ShardRunner, "run", computes)
    out_dir = tmp_path / "out"
    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, out_dir, "--save-consolidated", str(target)), capsys,
                           monkeypatch)
    assert not out_dir.exists() or not list(out_dir.iterdir())  # no run directory: nothing was started
    return code, err


def test_an_unwritable_save_consolidated_directory_is_one_line_before_any_compute(tiny_llama, texts_file, tmp_path,
                                                                                 capsys, monkeypatch):
    """It failed only after the whole run had computed, and said "free space". (Root writes through a
    directory's mode bits, so the refusal is simulated: the next test uses a real read-only mount.)"""
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.TemporaryFile

    def read_only_there(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, locked):
            raise OSError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_there)
    target = locked / "sub" / "all.npz"
    code, err = save_consolidated_refused(tiny_llama, texts_file, tmp_path, target, capsys, monkeypatch)
    one_line(code, err, f"--save-consolidated {target}: cannot write in {locked} (Permission denied); give a path in "
                        "a writable directory")
    assert not (locked / "sub").exists()


def test_save_consolidated_on_a_read_only_filesystem_is_one_line_before_any_compute(tiny_llama, texts_file, tmp_path,
                                                                                   read_only_mount, capsys,
                                                                                   monkeypatch):
    mount = read_only_mount
    code, err = save_consolidated_refused(tiny_llama, texts_file, tmp_path, mount / "all.npz", capsys, monkeypatch)
    one_line(code, err, f"--save-consolidated {mount / 'all.npz'}: cannot write in {mount} (Read-only file system)")


@pytest.mark.parametrize("option, value, expected", [
    ("--num-samples", "\u00b2", "--num-samples \u00b2: must be an integer >= 1 or 'all', in ASCII digits 0-9"),
    ("--batch-size", "\u00b3", "--batch-size \u00b3: must be an integer >= 1 or 'auto', in ASCII digits 0-9"),
    ("--num-samples", "\u0661\u0662", "--num-samples \u0661\u0662: must be an integer >= 1 or"),  # Arabic-Indic 12
    ("--batch-size", "\uff12", "--batch-size \uff12: must be an integer >= 1 or 'auto'"),  # full-width 2
    ("--max-length", "\u0661\u0662", "'--max-length' / '--max_length': \u0661\u0662: must be an integer written in "
                                     "ASCII digits 0-9"),
    ("--shard-size", "1_0", "'--shard-size' / '--shard_size': 1_0: must be an integer written in ASCII digits"),
    ("--layers", "\u0661", "--layers '\u0661': use a range like '0-23'"),
    ("--shard-size", "-+5", "'--shard-size' / '--shard_size': -+5: must be an integer written in ASCII digits"),
])
def test_counts_accept_ascii_digits_only(option, value, expected, tiny_llama, texts_file, tmp_path, capsys,
                                         monkeypatch):
    """'²' and '³' pass str.isdigit() and then crash int(); Arabic-Indic and full-width digits were read as
    numbers by int()."""
    code, _, err = run_cli(tiny_args(tiny_llama, texts_file, tmp_path / "out", option, value), capsys, monkeypatch)
    one_line(code, err, expected)
    assert not (tmp_path / "out").exists()


def test_the_config_refuses_counts_in_other_digits():
    from raygrad.config import RunConfig
    from raygrad.errors import RaygradError

    for value in ("\u00b2", "\u0661\u0662", "\uff18", "1_000", "+8"):
        with pytest.raises(RaygradError, match="in ASCII digits 0-9"):
            RunConfig(num_samples=value)
    assert RunConfig(num_samples=" 12 ").num_samples == 12 and RunConfig(batch_size="8").batch_size == 8


@pytest.mark.parametrize("command", [
    ["run", "--output-dir", "s3://bucket/runs"],
    ["run", "--save-consolidated", "gs://bucket/all.npz"],
    ["run", "--resume", "s3://bucket/runs/run_1"],
    ["run", "--output-dir", "file:///tmp/runs"],
    ["compare", "A", "B", "--output-dir", "s3://bucket/cmp"],
    ["report", "A", "--output", "https://example.org/page.html"],
])
def test_a_url_for_an_output_is_one_line_and_no_local_look_alike(command, tiny_llama, texts_file, tmp_path, capsys,
                                                                  monkeypatch):
    """Results are written locally: a URL given for one was made into a local ./s3:/bucket/... directory."""
    monkeypatch.chdir(tmp_path)
    for name in ("A", "B"):
        (tmp_path / name).mkdir()
    if command[0] == "run":
        command = [*tiny_args(tiny_llama, texts_file, tmp_path / "out"), *command[1:]]
    url = command[command.index(next(arg for arg in command if "://" in arg))]
    option = command[command.index(url) - 1]
    code, _, err = run_cli(command, capsys, monkeypatch)
    one_line(code, err, f"{option} {url}: raygrad writes its results to local paths, not URLs")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["A", "B"]  # no out/, no s3:/, gs:/, https:/
