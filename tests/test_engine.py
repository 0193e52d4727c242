"""Sharding over Ray workers, checkpoints and resume."""

import numpy as np
import pytest
from helpers import assert_same_totals, build_config, killed_run, run_tiny

from raygrad import constants as names
from raygrad import engine
from raygrad.compute.worker import ShardRunner
from raygrad.errors import RaygradError
from raygrad.store.partial import Partial, array_widths
from raygrad.store.zarr_store import ResultStore

# Two Ray workers give every array of an in-process run, examples included: test_cluster's
# test_gpu_workers_across_nodes_equal_in_process (conftest.two_ray_workers); one: test_local_ray.py.


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_llama, texts_file, tmp_path, in_process_totals):
    expected = in_process_totals(shard_size=1)
    config = build_config(tiny_llama, texts_file, tmp_path / "killed", shard_size=1, checkpoint_seconds=0)
    run_dir = killed_run(config, dies_at_call=4)  # as if the process were killed mid-run
    _, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.tolist() == [True, True, True, False, False, False]

    engine.resume(run_dir, echo=lambda _: None, progress=False)
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    assert_same_totals(resumed, expected)
    assert (run_dir / names.CONSOLIDATED_NPZ).exists()


def test_a_new_store_records_what_zarr_reads_back_and_reads_many_arrays_as_it_reads_one(tmp_path):
    """create() makes its arrays together and records their digests from what it wrote (fill values, the
    layer rows) without reading them back: the digests are those of each array as Zarr reads it alone.
    read_many (one round trip) gives what reading each array alone gives: values, dtypes, 0-d shapes."""
    import json

    import zarr

    from raygrad.store import digests as store_module
    from raygrad.store.topk import RANKED_PREFIXES

    path = tmp_path / "s.zarr"
    ResultStore.create(path, {"grad": 3, "value": 5}, 4, [0, 2], {}, layer_sums=names.LAYER_SUMS, top_k=2,
                       ranked=RANKED_PREFIXES[:1], score_dtype=np.dtype(np.float32))
    group = zarr.open_group(str(path), mode="r")
    alone = {name: np.asarray(group[name][...]) for name in group.array_keys()}
    recorded = json.loads((path / names.CHECKPOINT_STATE).read_text())["arrays"]
    assert set(recorded) == set(alone) and len(alone) == 3 + 3 + 3 + len(names.LAYER_SUMS) + 2 + 4
    for name, digest in recorded.items():
        assert digest == store_module.digest(alone[name]), name
    np.testing.assert_array_equal(alone[names.LAYERS], [0, 2])
    assert group[names.TOKENS].attrs["units"] == "positions"
    assert group["grad_sum"].metadata.dimension_names == (names.LAYER_COORD, "dim")

    together = ResultStore.open(path).read_many(sorted(alone))  # open verifies every digest first
    for name, value in alone.items():
        assert together[name].dtype == value.dtype and together[name].shape == value.shape, name
        np.testing.assert_array_equal(together[name], value)


def test_committed_checkpoint_is_replayed_after_a_crash(tmp_path):
    store = ResultStore.create(tmp_path / "s.zarr", {"grad": 3}, 2, [0, 1], {})
    totals = Partial.zeros(2, array_widths({"grad": 3}))
    totals.sums[names.GRAD_SUM] += 1.5
    totals.tokens += 4
    done = np.array([True, False])
    # Crash between the commit point and applying it: the redo log is on disk.
    np.savez(tmp_path / "s.zarr" / names.PENDING_CHECKPOINT,
             **{names.GRAD_SUM: totals.sums[names.GRAD_SUM], names.TOKENS: totals.tokens,
                names.SHARDS_DONE: done})
    (tmp_path / "s.zarr" / "pending_checkpoint.tmp.npz").write_bytes(b"half-written")
    reopened = ResultStore.open(store.path, writable=True)
    got, got_done = reopened.totals()
    np.testing.assert_array_equal(got.sums[names.GRAD_SUM], totals.sums[names.GRAD_SUM])
    np.testing.assert_array_equal(got.tokens, [4, 4])
    assert got_done.tolist() == [True, False]
    assert not list((tmp_path / "s.zarr").glob("*.npz"))


def test_resume_refuses_a_complete_run(tiny_llama, texts_file, tmp_path):
    run_dir, _ = run_tiny(tiny_llama, texts_file, tmp_path)
    with pytest.raises(RaygradError, match="already complete"):
        engine.resume(run_dir, echo=lambda _: None, progress=False)


def fail_shard_call(monkeypatch, call: int) -> None:
    """The `call`-th shard a worker runs (1-based) fails as a GPU out of memory would."""
    real_run, calls = ShardRunner.run, []

    def fails(self, shard, *args):
        calls.append(shard)
        if len(calls) == call:
            raise RuntimeError("CUDA out of memory")
        return real_run(self, shard, *args)

    monkeypatch.setattr(ShardRunner, "run", fails)


def test_a_failing_shard_stops_the_run_and_keeps_finished_shards(tiny_llama, texts_file, tmp_path, monkeypatch):
    said = []
    fail_shard_call(monkeypatch, 3)
    config = build_config(tiny_llama, texts_file, tmp_path, shard_size=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.run(config, echo=said.append, progress=False)  # checkpoint interval not reached
    (run_dir,) = tmp_path.iterdir()
    _, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.tolist() == [True, True, False]
    assert said[-1].startswith("stopped  after 2 of 3 shards saved (RuntimeError: CUDA out of memory)")
    assert said[-1].endswith(f"raygrad run --resume {run_dir}")


def test_ctrl_c_inside_an_add_never_counts_a_shard_twice(tiny_llama, texts_file, tmp_path, monkeypatch,
                                                        in_process_totals):
    """Ctrl-C after some of a shard's arrays were added to the totals but before its done flag:
    the checkpoint written on the way out must not hold that half-added shard."""
    expected = in_process_totals(shard_size=1)
    real_add, calls = Partial.add, []

    def interrupted_on_third_shard(self, other):
        calls.append(1)
        if len(calls) == 3:
            first = next(iter(self.sums))
            self.sums[first] += other.sums[first]  # one array in, then the signal
            raise KeyboardInterrupt
        return real_add(self, other)

    monkeypatch.setattr(Partial, "add", interrupted_on_third_shard)
    config = build_config(tiny_llama, texts_file, tmp_path / "killed", shard_size=1, checkpoint_seconds=0)
    with pytest.raises(KeyboardInterrupt):
        engine.run(config, echo=lambda _: None, progress=False)
    monkeypatch.setattr(Partial, "add", real_add)
    (run_dir,) = (tmp_path / "killed").iterdir()
    _, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.tolist() == [True, True, False, False, False, False]
    engine.resume(run_dir, echo=lambda _: None, progress=False)
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    assert_same_totals(resumed, expected)


def test_a_run_on_relative_paths_resumes_from_another_directory(tiny_llama, texts_file, tmp_path, monkeypatch):
    """Relative --model, --dataset and --sae-path are made absolute when a run starts: Ray workers
    and a resumed run may start in another directory, where those words name other files or none."""
    import shutil

    from sae_factory import write_sae_lens_dir

    work = tmp_path / "work"
    shutil.copytree(tiny_llama, work / "model")
    shutil.copy(texts_file, work / "texts.txt")
    for layer in (0, 2):
        write_sae_lens_dir(work / "saes" / f"sae_{layer}", 32, 48, hook_name=f"blocks.{layer}.hook_mlp_out",
                           seed=layer)
    options = dict(target="sae", sae_path="saes/sae_{layer}", layers="0,2", shard_size=1)
    monkeypatch.chdir(work)
    _, expected = run_tiny("model", "texts.txt", tmp_path / "undisturbed", **options)
    run_dir = killed_run(build_config("model", "texts.txt", tmp_path / "killed", **options), dies_at_call=3)
    monkeypatch.chdir(tmp_path)  # no model, texts or saes here
    engine.resume(run_dir, echo=lambda _: None, progress=False)
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    assert_same_totals(resumed, expected, rtol=1e-12)


def test_a_request_this_machine_cannot_meet_stops_the_ray_it_started(tiny_llama, texts_file, tmp_path):
    import os

    import ray

    from raygrad.cluster.pool import WorkerPool

    config = build_config(tiny_llama, texts_file, tmp_path, workers=1, device="cuda")  # no GPU here
    with pytest.raises(RaygradError, match="this machine has 0 GPUs"):
        with WorkerPool(config):
            pass
    assert not ray.is_initialized()  # the error left no Ray running in this process
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"  # as conftest set it: put back


def test_progress_off_hides_every_bar_and_leaves_the_process_as_it_was(tiny_llama, texts_file, tmp_path, capsys):
    """progress=False (the CLI's --no-progress, raygrad.run) hides transformers' "Loading weights" bar
    of an in-process worker too, and puts transformers' own setting back after; progress=True shows both."""
    from transformers.utils import logging as transformers_logging

    was_shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()  # as in a fresh process
    try:
        capsys.readouterr()
        engine.run(build_config(tiny_llama, texts_file, tmp_path / "quiet"), echo=lambda _: None, progress=False)
        assert capsys.readouterr().err == ""
        assert transformers_logging.is_progress_bar_enabled()

        engine.run(build_config(tiny_llama, texts_file, tmp_path / "shown"), echo=lambda _: None, progress=True)
        err = capsys.readouterr().err
        assert "Loading weights" in err and "shard" in err  # transformers' bar and the run's
    finally:
        if not was_shown:
            transformers_logging.disable_progress_bar()


def test_the_resume_hint_survives_any_error_of_the_last_checkpoint(tiny_llama, texts_file, tmp_path, monkeypatch):
    """A shard fails, then the checkpoint on the way out fails too, with something other than a disk's
    OSError: the shard's error is what is raised, and the stop line still says how to go on."""
    from raygrad.store.reducer import Reducer

    said = []

    def keep_fails(self):
        raise RaygradError("the lock was taken over")

    fail_shard_call(monkeypatch, 2)
    monkeypatch.setattr(Reducer, "keep_finished", keep_fails)
    config = build_config(tiny_llama, texts_file, tmp_path, shard_size=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.run(config, echo=said.append, progress=False)
    (run_dir,) = tmp_path.iterdir()
    assert said[-2] == ("warning: the last checkpoint could not be written (RaygradError: the lock was taken "
                        "over); the one before it stands")
    assert said[-1].startswith("stopped  after 0 of 3 shards saved (RuntimeError: CUDA out of memory)")
    assert said[-1].endswith(f"continue with: raygrad run --resume {run_dir}")


def test_the_resume_hint_survives_any_error_while_finishing(tiny_llama, texts_file, tmp_path, monkeypatch):
    said = []

    def finalize_fails(self, timing):
        raise RuntimeError("stale file handle")

    monkeypatch.setattr(ResultStore, "finalize", finalize_fails)
    config = build_config(tiny_llama, texts_file, tmp_path, shard_size=2)
    with pytest.raises(RuntimeError, match="stale file handle"):
        engine.run(config, echo=said.append, progress=False)
    (run_dir,) = tmp_path.iterdir()
    assert said[-1] == ("stopped  with every shard saved, while finishing the run (RuntimeError: stale file "
                        f"handle); continue with: raygrad run --resume {run_dir}")
    _, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    monkeypatch.undo()
    engine.resume(run_dir, echo=lambda _: None, progress=False)  # the hint works: it only finalizes
    assert ResultStore.open(run_dir / names.STORE_NAME).attrs[names.ATTR_STATUS] == names.STATUS_COMPLETE
