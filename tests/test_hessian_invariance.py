"""--aggregate-by hessian gives the same estimate however a run is executed.

Each probe entry is drawn from (--seed, dataset row, layer, probe, position, dimension), and texts in a batch
do not interact, so batching, packing, sharding, Ray workers, SAE passes and a resume must all reproduce the
estimate to float64 rounding. (Unlike test_hessian.py, the model keeps transformers' own RMSNorm: Ray workers
run it too, and it is the same function in every execution compared here.)"""

import numpy as np
import pytest
from helpers import build_config, killed_run, run_tiny
from sae_factory import write_sae_lens_dir

from raygrad import constants as names
from raygrad.store.zarr_store import ResultStore

LENGTH = 12  # tokens per text
WIDTH = 32  # the tiny model's site width

INVARIANT = dict(layers="0,2", num_samples=6, max_length=LENGTH, aggregate_by=("gradients", "hessian"),
                 hessian_probes=2)


@pytest.fixture(scope="module")
def one_text_per_batch(tiny_llama, texts_file, tmp_path_factory):
    """The reference: one text per batch, one shard, in this process."""
    return run_tiny(tiny_llama, texts_file, tmp_path_factory.mktemp("one"), batch_size=1, **INVARIANT)[1]


def assert_same_estimate(got, expected):
    for name in expected.sums:
        np.testing.assert_allclose(got.sums[name], expected.sums[name], rtol=1e-9, atol=1e-13, err_msg=name)
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    assert np.abs(expected.sums["hess_abs_sum"]).min() > 0


@pytest.mark.parametrize("execution", [dict(batch_size=2), dict(batch_size=4, shard_size=1),
                                       dict(batch_size=None, tokens_per_batch=30, shard_size=4)],
                         ids=["batch-2", "batch-4-shards-of-1", "packed"])
def test_the_estimate_does_not_depend_on_batching_or_sharding(execution, one_text_per_batch, tiny_llama,
                                                               texts_file, tmp_path):
    _, got = run_tiny(tiny_llama, texts_file, tmp_path, **{**INVARIANT, **execution})
    assert_same_estimate(got, one_text_per_batch)


def test_the_estimate_of_a_killed_and_resumed_run_is_the_uninterrupted_one(one_text_per_batch, tiny_llama,
                                                                            texts_file, tmp_path):
    from raygrad import engine

    config = build_config(tiny_llama, texts_file, tmp_path, batch_size=3, shard_size=2, checkpoint_seconds=0,
                          **INVARIANT)
    run_dir = killed_run(config, dies_at_call=2)
    engine.resume(run_dir, echo=lambda _: None, progress=False, execution={"workers": 0})
    got, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    assert_same_estimate(got, one_text_per_batch)


def test_the_estimate_of_two_ray_workers_is_the_in_process_one(one_text_per_batch, two_ray_workers):
    from conftest import TWO_WORKERS

    assert {key: TWO_WORKERS[key] for key in INVARIANT if key != "aggregate_by"} == {
        key: value for key, value in INVARIANT.items() if key != "aggregate_by"}  # the same estimate asked for
    assert set(INVARIANT["aggregate_by"]) <= set(TWO_WORKERS["aggregate_by"])
    assert_same_estimate(two_ray_workers.totals, one_text_per_batch)


def test_the_estimate_depends_on_the_seed_and_the_texts_row(one_text_per_batch, tiny_llama, texts_file, tmp_path):
    """The key is real: another --seed, or the same texts at other dataset rows (one line inserted before
    them), draws other probes; the gradients, which have no probe, stay the same."""
    _, reseeded = run_tiny(tiny_llama, texts_file, tmp_path / "seed", batch_size=1, seed=43, **INVARIANT)
    moved_file = tmp_path / "moved.txt"
    moved_file.write_text("short line\n" + texts_file.read_text())  # too short to be kept: rows shift by one
    _, moved = run_tiny(tiny_llama, moved_file, tmp_path / "moved", batch_size=1, **INVARIANT)
    for other in (reseeded, moved):
        np.testing.assert_allclose(other.sums["grad_sum"], one_text_per_batch.sums["grad_sum"], rtol=1e-9)
        assert not np.allclose(other.sums["hess_sum"], one_text_per_batch.sums["hess_sum"], rtol=1e-3)


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    for layer in range(3):
        write_sae_lens_dir(root / f"sae_{layer}", WIDTH, 64, hook_name=f"blocks.{layer}.hook_mlp_out", seed=layer)
    return root


@pytest.mark.parametrize("mode", ["clean", "splice"])
def test_the_sae_estimate_does_not_depend_on_layers_per_pass(mode, tiny_llama, texts_file, sae_dirs, tmp_path):
    """SAE passes (memory) change which SAEs are loaded in a forward+backward, not the estimate: in clean
    mode every pass's double backward still mixes every layer's site probe (the other layers are hooked
    too), in splice modes each layer has its own."""
    options = dict(INVARIANT, layers="0-2", target="sae", sae_path=str(sae_dirs / "sae_{layer}"), sae_mode=mode,
                   num_samples=3)
    _, one_pass = run_tiny(tiny_llama, texts_file, tmp_path / "one", batch_size=3, **options)
    _, per_layer = run_tiny(tiny_llama, texts_file, tmp_path / "per", batch_size=1, sae_layers_per_pass=1,
                            **options)
    assert_same_estimate(per_layer, one_pass)
