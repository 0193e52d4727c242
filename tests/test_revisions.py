"""Pinned revisions: a run and every resume compute on the model, SAEs and dataset the plan pinned."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same_totals, build_config, killed_run, run_tiny
from sae_factory import write_sae_lens_dir
from tiny import build_model_dir

from raygrad import constants as names
from raygrad.engine import resume
from raygrad.errors import RaygradError
from raygrad.model import pins as revisions
from raygrad.plan import Plan, make_plan
from raygrad.store.zarr_store import ResultStore

REPO = "org/tiny"
FIRST, SECOND = "1" * 40, "2" * 40  # the cache's two commits of REPO


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> dict[str, Path]:
    """Two tiny llamas with different weights, built once: commit -> files."""
    root = tmp_path_factory.mktemp("snapshots")
    return {FIRST: build_model_dir(root / FIRST, "llama", seed=0),
            SECOND: build_model_dir(root / SECOND, "llama", seed=1)}


@pytest.fixture
def hub_cache(tmp_path, snapshots, monkeypatch) -> Path:
    """HF_HOME/hub/models--org--tiny/{snapshots/FIRST, snapshots/SECOND, refs/main -> FIRST}, offline."""
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    for commit, files in snapshots.items():
        shutil.copytree(files, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FIRST)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def _main_is(repo: Path, commit: str) -> None:
    (repo / "refs" / "main").write_text(commit)


def _totals(run_dir: Path):
    totals, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    return totals


def _saved_plan(run_dir: Path) -> Plan:
    return Plan.from_dict(ResultStore.open(run_dir / names.STORE_NAME).attrs[names.ATTR_PLAN])


def _resume(run_dir: Path) -> Path:
    return resume(run_dir, echo=lambda _: None, progress=False)


def test_resume_after_refs_main_moved_computes_on_the_pinned_commit(hub_cache, texts_file, tmp_path):
    options = dict(shard_size=1, checkpoint_seconds=0, num_samples=4)
    _, on_first = run_tiny(REPO, texts_file, tmp_path / "first", **options)
    _main_is(hub_cache, SECOND)
    _, on_second = run_tiny(REPO, texts_file, tmp_path / "second", **options)
    _main_is(hub_cache, FIRST)

    run_dir = killed_run(build_config(REPO, texts_file, tmp_path / "killed", **options), dies_at_call=3)
    plan = _saved_plan(run_dir)
    assert plan.model_revision == {"kind": "hub", "repo": REPO, "commit": FIRST}
    assert f"pinned   model commit {FIRST}" in plan.describe()  # `raygrad info` and the run print it
    _main_is(hub_cache, SECOND)  # a push to main between the kill and the resume
    resumed = _totals(_resume(run_dir))

    assert_same_totals(resumed, on_first, rtol=1e-12)
    assert not np.allclose(on_first.sums["grad_sum"], on_second.sums["grad_sum"], rtol=1e-3)


def test_a_pinned_commit_missing_from_the_offline_cache_is_one_line(hub_cache, texts_file, tmp_path):
    run_dir = killed_run(build_config(REPO, texts_file, tmp_path / "killed", shard_size=1, num_samples=4),
                         dies_at_call=2)
    shutil.rmtree(hub_cache / "snapshots" / FIRST)
    _main_is(hub_cache, SECOND)
    with pytest.raises(RaygradError) as refused:
        _resume(run_dir)
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith(f"--model {REPO}: revision {FIRST} (pinned when the run started) is not in the hub cache")
    assert "HF_HUB_OFFLINE is set" in line


def test_resume_refuses_a_local_model_whose_files_changed(tiny_llama, texts_file, tmp_path):
    model_dir = shutil.copytree(tiny_llama, tmp_path / "model")
    run_dir = killed_run(build_config(model_dir, texts_file, tmp_path / "killed", shard_size=1, num_samples=4),
                         dies_at_call=2)
    assert _saved_plan(run_dir).model_revision["kind"] == "local"
    config = model_dir / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"note": "edited", "rms_norm_eps"'))
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / names.STORE_NAME).rglob("*")}
    with pytest.raises(RaygradError) as refused:
        _resume(run_dir)
    assert str(refused.value) == (f"--model {model_dir}: its files changed since the run started (config.json "
                                  "differs); resuming would mix two models: start a new run")
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / names.STORE_NAME).rglob("*")} == before


def test_a_worker_refuses_a_local_model_changed_after_planning(tiny_llama, texts_file, tmp_path):
    """A cluster node may hold its own copy: each worker checks it before loading."""
    from raygrad.compute.worker import ShardRunner

    model_dir = shutil.copytree(tiny_llama, tmp_path / "model")
    plan = make_plan(build_config(model_dir, texts_file, tmp_path / "out"), 4)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(RaygradError, match=r"\(tokenizer.json is missing\); going on would mix two models"):
        ShardRunner(plan)


def test_resume_refuses_an_sae_whose_weights_changed(tiny_llama, texts_file, tmp_path):
    for layer in (0, 2):
        write_sae_lens_dir(tmp_path / "saes" / f"sae_{layer}", 32, 16, hook_name=f"blocks.{layer}.hook_mlp_out",
                           seed=layer)
    options = dict(target="sae", sae_path=str(tmp_path / "saes" / "sae_{layer}"), layers="0,2", num_samples=4,
                   shard_size=1)
    run_dir = killed_run(build_config(tiny_llama, texts_file, tmp_path / "killed", **options), dies_at_call=2)
    pins = _saved_plan(run_dir).sae_revisions
    assert [pin["kind"] for pin in pins] == ["local", "local"]
    assert "sae_weights.safetensors" in pins[1]["files"]
    write_sae_lens_dir(tmp_path / "saes" / "sae_2", 32, 16, hook_name="blocks.2.hook_mlp_out", seed=7)
    with pytest.raises(RaygradError) as refused:
        _resume(run_dir)
    assert str(refused.value) == (f"--sae-path (layer 2) {tmp_path / 'saes' / 'sae_2'}: its files changed since the "
                                  "run started (sae_weights.safetensors differs); resuming would mix two SAEs: "
                                  "start a new run")


def test_the_plan_pins_a_local_dataset_and_an_unchanged_model_resumes(tiny_llama, texts_file, tmp_path):
    options = dict(shard_size=1, num_samples=4)
    _, whole = run_tiny(tiny_llama, texts_file, tmp_path / "whole", **options)
    run_dir = killed_run(build_config(tiny_llama, texts_file, tmp_path / "killed", **options), dies_at_call=2)
    plan = _saved_plan(run_dir)
    assert plan.dataset_revision == {"kind": "local", "path": str(texts_file),
                                     "digest": revisions.file_digest(texts_file)}
    assert plan.model_revision["files"].keys() >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert_same_totals(_totals(_resume(run_dir)), whole, rtol=1e-12)


def test_a_large_file_is_digested_by_size_header_and_sampled_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(revisions, "FULL_DIGEST_BYTES", 1024)
    monkeypatch.setattr(revisions, "SAMPLE_BYTES", 16)
    path = tmp_path / "weights.bin"
    data = bytearray(range(256)) * 64  # 16 KiB: sampled, 16 blocks of 16 bytes
    path.write_bytes(bytes(data))
    digests = {revisions.file_digest(path)}
    data[-1] ^= 1  # the last block is always read
    path.write_bytes(bytes(data))
    digests.add(revisions.file_digest(path))
    path.write_bytes(bytes(data) + b"\0")  # and the size counts
    digests.add(revisions.file_digest(path))
    assert len(digests) == 3
