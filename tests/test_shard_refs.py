"""Shards are references: the driver sends row ranges, never texts; a worker reads its rows and
stops the run when they are not the rows the run was planned on; a resume reads no dataset on the
driver; a Ray worker reads its next shard while the current one computes."""

import inspect
import pickle
import threading
import time

import numpy as np
import pytest
from helpers import build_config, killed_run, run_cli, run_tiny, tiny_args
from tiny import SAMPLE_TEXTS

from raygrad import constants as names
from raygrad import engine
from raygrad.cluster.pool import RemoteWorker, WorkerPool
from raygrad.compute.folding import SendOrder
from raygrad.config import RunConfig
from raygrad.dataset import formats as sources
from raygrad.errors import RaygradError
from raygrad.store.partial import ShardResult
from raygrad.store.zarr_store import ResultStore

LONG = [t for t in SAMPLE_TEXTS if len(t.strip()) > 50]


def test_the_driver_sends_references_and_reads_rows_only_inside_a_worker(tiny_llama, texts_file, tmp_path,
                                                                         monkeypatch):
    sent, reads = [], []
    real_map, real_read = WorkerPool.map, sources.read

    def records_map(self, work):
        sent.extend(work)
        return real_map(self, work)

    def records_read(source, shard, counts):
        reads.append([frame.function for frame in inspect.stack()])
        return real_read(source, shard, counts)

    monkeypatch.setattr(WorkerPool, "map", records_map)
    monkeypatch.setattr(sources, "read", records_read)
    run_tiny(tiny_llama, texts_file, tmp_path, shard_size=2)
    assert len(sent) == 3 and len(reads) == 3
    wire = pickle.dumps(sent)  # what a Ray worker receives
    for text in LONG:
        assert text.encode() not in wire and text[:20].encode() not in wire
    assert all("prepare" in stack for stack in reads), "rows are read by the worker's prepare, nowhere else"


def test_a_shard_whose_rows_changed_stops_the_run_with_one_line_and_adds_nothing(tiny_llama, tmp_path, capsys,
                                                                                  monkeypatch):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(LONG) + "\n")
    real_plan = engine._plan_shards

    def plans_then_edits(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        edited = list(LONG)
        edited[1] = edited[1].replace("e", "a", 1)  # same length: only the digest can tell
        path.write_text("\n".join(edited) + "\n")
        return plan

    monkeypatch.setattr(engine, "_plan_shards", plans_then_edits)
    args = tiny_args(tiny_llama, path, tmp_path / "out", "--shard-size", "2", "--checkpoint-seconds", "0")
    code, _, err = run_cli(args, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and lines == ["error: the dataset changed since the run was planned: shard 0, rows 0-1 differ; "
                                   "resuming would mix two datasets: start a new run"], err
    (run_dir,) = (tmp_path / "out").iterdir()
    totals, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert not done.any() and not np.asarray(totals.tokens).any()


def test_resume_reads_no_dataset_on_the_driver(tiny_llama, texts_file, tmp_path, monkeypatch):
    _, expected = run_tiny(tiny_llama, texts_file, tmp_path / "full", shard_size=1)
    run_dir = killed_run(build_config(tiny_llama, texts_file, tmp_path / "killed", shard_size=1,
                                      checkpoint_seconds=0), dies_at_call=3)
    real_read = sources.read
    reads = []

    def no_scan(*args):
        raise AssertionError("the driver scanned the dataset on --resume")

    def records_read(source, shard, counts):
        reads.append(shard.row_start)
        return real_read(source, shard, counts)

    monkeypatch.setattr(sources, "scan", no_scan)
    monkeypatch.setattr(sources, "read", records_read)
    engine.resume(run_dir, echo=lambda _: None, progress=False)
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all() and len(reads) == 4  # the 4 shards not done, each read once by its worker
    np.testing.assert_array_equal(resumed.tokens, expected.tokens)
    for name in expected.sums:
        np.testing.assert_allclose(resumed.sums[name], expected.sums[name], rtol=1e-10, atol=1e-14)


def test_num_samples_all_takes_every_usable_text(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    assert RunConfig(num_samples="ALL").num_samples == "all" and RunConfig(num_samples="7").num_samples == 7
    for bad in ("0", "some", -1):
        with pytest.raises(RaygradError, match=f"--num-samples {bad}: must be an integer >= 1 or 'all'"):
            RunConfig(num_samples=bad)
    args = tiny_args(tiny_llama, texts_file, tmp_path / "out")
    args[args.index("--num-samples") + 1] = "all"
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert f"samples  {len(LONG)} (requested all)" in out


class StubRunner:
    """Records when each shard is prepared and computed."""

    def __init__(self):
        self.events, self.clock = [], time.monotonic

    def prepare(self, shard, source, ref):
        self.events.append(("prepare", shard, self.clock()))
        time.sleep(0.05)
        return shard

    def compute(self, shard):
        self.events.append(("compute", shard, self.clock()))
        time.sleep(0.5)
        self.events.append(("computed", shard, self.clock()))
        return ShardResult(shard, StubPartial([shard]), 0.5, 0.0)


class StubPartial:
    """Adds as a Partial does (the worker folds its shards with `add`): here, the shards in it."""

    def __init__(self, shards):
        self.shards = shards

    def add(self, other):
        self.shards = self.shards + other.shards


def test_a_remote_worker_reads_the_next_shard_while_one_computes():
    worker = RemoteWorker(plan=None, seed=0)
    worker.runner = StubRunner()
    answers = {}

    def call(shard, ticket, after, send):
        answers[shard] = worker.run(shard, None, None, ticket, after, SendOrder(1, send))

    first = threading.Thread(target=call, args=(0, 0, None, False))  # ticket 0, a head; folded, not sent
    first.start()
    time.sleep(0.15)  # shard 0 is computing
    second = threading.Thread(target=call, args=(1, 1, 0, True))  # ticket 1, after ticket 0; sends both
    second.start()
    first.join()
    second.join()
    assert answers[0].partial is None and answers[0].shard == 0, "an acknowledgement"
    assert answers[1].partial.shards == [0, 1] and set(answers[1].shards) == {0, 1}, "both shards, in order"
    at = {(kind, shard): when for kind, shard, when in worker.runner.events}
    assert at[("prepare", 1)] < at[("computed", 0)], "shard 1 was read while shard 0 computed"
    assert at[("compute", 1)] >= at[("computed", 0)], "one shard computes at a time"



def test_a_plan_saved_with_the_old_source_fingerprint_still_resumes(tiny_llama, tmp_path, monkeypatch):
    """An older raygrad wrote the `datasets` fingerprint into a hub or directory dataset's source (read by
    nothing): a run it planned, killed after a shard, resumes to the sums of an undisturbed run."""
    import dataclasses

    import pandas as pd

    (tmp_path / "repo").mkdir()
    pd.DataFrame({"text": LONG}).to_parquet(tmp_path / "repo" / "train.parquet")
    dataset = tmp_path / "repo"
    _, expected = run_tiny(tiny_llama, dataset, tmp_path / "full", shard_size=2)
    real_plan = engine._plan_shards

    def plans_as_before(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        assert "fingerprint" not in plan.source and plan.source["kind"] == "datasets"
        return dataclasses.replace(plan, source={**plan.source, "fingerprint": "0123456789abcdef"})

    monkeypatch.setattr(engine, "_plan_shards", plans_as_before)
    run_dir = killed_run(build_config(tiny_llama, dataset, tmp_path / "killed", shard_size=2, checkpoint_seconds=0),
                         dies_at_call=2)
    monkeypatch.undo()
    store = ResultStore.open(run_dir / names.STORE_NAME)
    assert store.attrs[names.ATTR_PLAN]["source"]["fingerprint"] == "0123456789abcdef"
    assert store.totals()[1].sum() == 1
    engine.resume(run_dir, echo=lambda _: None, progress=False)
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    np.testing.assert_array_equal(resumed.tokens, expected.tokens)
    for name in expected.sums:
        np.testing.assert_allclose(resumed.sums[name], expected.sums[name], rtol=1e-10, atol=1e-14)
