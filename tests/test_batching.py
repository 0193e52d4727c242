"""Batches packed by tokens, the auto budget and its out-of-memory retry, the
chunked loss, half-precision sums and the affine-decoder shortcut."""

import dataclasses
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_totals, load_script, run_tiny
from sae_factory import random_weights, write_sae_lens_dir

from raygrad import constants as names
from raygrad.compute import worker
from raygrad.compute.accumulator import DeviceAccumulator
from raygrad.compute.batch import IGNORE_INDEX, Aggregation
from raygrad.compute.batching import AUTO_GPU_TOKENS, BatchSizer, MemoryProbe, pack_by_tokens
from raygrad.compute.sae_paths import add_clean_features
from raygrad.compute.sites import summed_loss
from raygrad.compute.worker import ShardComputer
from raygrad.errors import RaygradError
from raygrad.model.loading import load_model_and_tokenizer, resolve_hook_sites
from raygrad.model.saes import DictionaryLearningSAE, load_sae


@pytest.mark.parametrize("seed", range(5))
def test_every_text_lands_in_exactly_one_batch_within_the_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 200))]
    budget = rng.choice([64, 100, 500, 4096])
    batches = pack_by_tokens(lengths, budget)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget or len(batch) == 1  # a text longer than the budget runs alone


@pytest.mark.parametrize("batching", [dict(batch_size="auto"), dict(batch_size=None, tokens_per_batch=30),
                                      dict(batch_size=None, tokens_per_batch=64, shard_size=4), dict(batch_size=4)])
def test_every_batching_equals_one_text_per_batch(batching, tiny_llama, texts_file, tmp_path):
    _, one = run_tiny(tiny_llama, texts_file, tmp_path / "one", batch_size=1, layers="0-2")
    _, other = run_tiny(tiny_llama, texts_file, tmp_path / "other", layers="0-2", **batching)
    assert_same_totals(one, other, rtol=1e-9)


def fake_probe(available: int, bytes_per_token: int, state: dict) -> MemoryProbe:
    """A device whose batches peak at `bytes_per_token` x the tokens of the batch in `state`."""
    return MemoryProbe(available=lambda: available, reset_peak=lambda: None,
                       peak=lambda: 1000 + bytes_per_token * state["tokens"], allocated=lambda: 1000)


def test_auto_budget_shrinks_to_what_memory_fits_and_stays():
    state = {}
    sizer = BatchSizer("auto", probe=fake_probe(available=10_000_000, bytes_per_token=3000, state=state))
    assert sizer.tokens == AUTO_GPU_TOKENS
    state["tokens"] = 4096
    sizer.before_batch()
    sizer.after_batch(4096)
    assert sizer.tokens == int(10_000_000 * 0.6 / 3000)  # 60% of free memory at 3000 bytes per token
    assert not sizer.measuring
    roomy = BatchSizer("auto", probe=fake_probe(available=10**12, bytes_per_token=3000, state=state))
    roomy.before_batch()
    roomy.after_batch(1000)  # a part-filled batch measures nothing
    assert roomy.measuring and roomy.tokens == AUTO_GPU_TOKENS
    roomy.before_batch()
    roomy.after_batch(4096)
    assert roomy.tokens == AUTO_GPU_TOKENS and not roomy.measuring


def test_out_of_memory_batch_is_retried_smaller_and_counted_once(tiny_llama, texts_file, monkeypatch):
    from tiny import SAMPLE_TEXTS

    texts = [t for t in SAMPLE_TEXTS if len(t) > 50] * 3  # 18 texts, about 20 tokens each
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama), torch.device("cpu"), torch.float64)
    modules = [model.get_submodule(s.path) for s in resolve_hook_sites(model, [0, 1, 2], "mlp_out")]

    def computer(sizer):
        return ShardComputer(model, tokenizer, modules, {"grad": 32}, Aggregation(), sizer, 24,
                             torch.device("cpu"))

    expected = computer(BatchSizer("texts", batch_size=1)).compute(texts)
    real, attempts = worker.accumulate_batch, []

    def fails_above_100_tokens(model, modules, batch, acc, *args):
        attempts.append(batch.padded_tokens)
        real(model, modules, batch, acc, *args)  # sums were added to the staged accumulator ...
        if batch.padded_tokens > 100:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")  # ... and must be dropped

    monkeypatch.setattr(worker, "accumulate_batch", fails_above_100_tokens)
    sizer = BatchSizer("auto", probe=fake_probe(10**12, 1, {"tokens": 0}))
    got = computer(sizer).compute(texts)
    # 18 texts x 24 tokens in one batch fails, half of it fails again, then every batch fits.
    assert [a for a in attempts if a > 100] == [432, 216] and sizer.tokens == 108
    assert sum(attempts) - 432 - 216 == 18 * 24  # every text computed once more, none twice
    assert_same_totals(got, expected, rtol=1e-9)


def test_out_of_memory_on_one_text_is_raised(tiny_llama, monkeypatch):
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama), torch.device("cpu"), torch.float64)
    modules = [model.get_submodule(resolve_hook_sites(model, [0], "mlp_out")[0].path)]

    def always_fails(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(worker, "accumulate_batch", always_fails)
    sizer = BatchSizer("auto", probe=fake_probe(10**12, 1, {"tokens": 0}))
    computer = ShardComputer(model, tokenizer, modules, {"grad": 32}, Aggregation(), sizer, 24, torch.device("cpu"))
    with pytest.raises(RaygradError, match=r"^CUDA out of memory \(injected\) on cpu in a batch of 1 text\(s\), "):
        computer.compute(["one text that can never fit, however it is batched"])


def test_chunked_loss_equals_the_plain_float64_loss():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 50, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11), generator=gen)
    labels[1, 6:] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
    plain = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    chunked = summed_loss(logits, labels, chunk_elements=4 * 50)  # 4 positions per chunk: 9 chunks
    assert chunked.dtype == torch.float64
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-14)
    (g_plain,) = torch.autograd.grad(plain, logits)
    (g_chunked,) = torch.autograd.grad(chunked, logits)
    torch.testing.assert_close(g_chunked, g_plain, rtol=1e-13, atol=1e-15)


def test_half_precision_sums_of_squares_do_not_underflow():
    values = torch.tensor([[1e-4, -5e-5, 3e-3], [1e-4, 5e-5, -1e-2]], dtype=torch.float16)
    exact = values.double()
    assert (values.square().sum(0)[:2] == 0).all()  # in float16 these squares vanish (below 3e-8)
    assert exact.float().square().sum(0).min() > 0  # in float32 they do not
    acc = DeviceAccumulator(1, {"grad": 3}, torch.device("cpu"))
    acc.add("grad", 0, values)
    partial = acc.to_partial()
    np.testing.assert_allclose(partial.sums["grad_sq_sum"][0], exact.square().sum(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(partial.sums["grad_abs_sum"][0], exact.abs().sum(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(partial.sums["grad_sum"][0], exact.sum(0).numpy(), rtol=1e-6)


class _AutogradOnly:
    """An SAE seen without its affine shortcut: features' gradients by autograd through decode."""

    def __init__(self, sae):
        self.sae, self.d_sae, self.affine_decoder_weight = sae, sae.d_sae, None

    def encode(self, z):
        return self.sae.encode(z)

    def decode(self, f):
        return self.sae.decode(f)


@pytest.mark.parametrize("source", ["dictionary_learning", "sae-lens"])
@pytest.mark.parametrize("kinds", [("gradients",), ("gradients", "values", "attribution")])
def test_affine_decoder_shortcut_equals_encode_and_decode(source, kinds, tmp_path):
    if source == "sae-lens":
        sae = load_sae(0, path=str(write_sae_lens_dir(tmp_path / "sae", 16, 64, seed=2)), dtype=torch.float64)
    else:
        tensors = {k: v.double() for k, v in random_weights(16, 64, seed=2).items()}
        sae = DictionaryLearningSAE("AutoEncoder", tensors, hook_name=None, source="test")
    assert sae.affine_decoder_weight is not None
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 9, 16, generator=gen, dtype=torch.float64)
    g = torch.randn(13, 16, generator=gen, dtype=torch.float64)
    selected = torch.tensor([0, 1, 2, 4, 5, 8, 9, 10, 11, 12, 14, 15, 16])
    prefixes = {names.KIND_PREFIX[kind]: 64 for kind in kinds}
    results = []
    for seen in (sae, _AutogradOnly(sae)):
        acc = DeviceAccumulator(1, prefixes, torch.device("cpu"))
        add_clean_features(acc, 0, Aggregation(kinds=kinds, chunk_elements=5 * 64), seen, z, selected, g)
        results.append(acc.to_partial())
    for name in results[1].sums:
        np.testing.assert_allclose(results[0].sums[name], results[1].sums[name], rtol=1e-12, err_msg=name)
    assert np.abs(results[0].sums["grad_abs_sum"]).min() > 0


def test_gpu_benchmark_dry_run_runs_on_the_cpu(tiny_llama, tmp_path, monkeypatch):
    """benchmarks/gpu.py cannot rot: its dry run (tiny model, CPU) goes through every step."""
    gpu = load_script("benchmarks/gpu.py", monkeypatch)
    record = gpu.main(["--dry-run", "--tokenizer", str(tiny_llama), "--out", str(tmp_path / "gpu.json")])
    assert record["check"]["max_relative_error"] < 1e-12  # packed + shortcut vs 1 text per batch + autograd
    assert [row["case"] for row in record["rows"]] == [case.name for case in gpu.DRY_CASES]  # each one ran
    assert {"tiny-llama-fp32", "tiny-llama-fp32-sae", "tiny-llama-fp32-hessian", "tiny-llama-fp32-sae-2passes",
            "tiny-llama-fp32-sae-top16", "tiny-llama-fp32-ablate8-each"} <= {case.name for case in gpu.DRY_CASES}
    for row in record["rows"]:
        assert "error" not in row and row["raygrad_tok_s"] > 0 and row["target_tokens"] > 0
    assert record["rows"][0]["vs_per_layer"] > 0
    assert (tmp_path / "gpu.json").exists()


def test_default_on_one_device_runs_in_process_without_ray(tiny_llama, texts_file, tmp_path, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    run_dir, _ = run_tiny(tiny_llama, texts_file, tmp_path, workers=None)
    from raygrad.analysis.results import open_results

    assert open_results(run_dir).attrs["plan"]["workers"] == 0


def test_the_plan_estimates_worker_memory_and_refuses_what_cannot_fit(tiny_llama, tmp_path):
    from raygrad.config import RunConfig
    from raygrad.model.loading import load_model_and_tokenizer
    from raygrad.model.memory import GIB, MemoryEstimate, check_fits
    from raygrad.plan import make_plan

    write_sae_lens_dir(tmp_path / "sae_0", 32, 64)
    config = RunConfig(model=str(tiny_llama), dtype="float64", target="sae", layers="0",
                       sae_path=str(tmp_path / "sae_{layer}"), batch_size=2, max_length=24)
    plan = make_plan(config, 4)
    model, _ = load_model_and_tokenizer(str(tiny_llama), torch.device("cpu"), torch.float64)
    assert plan.weight_bytes == sum(p.numel() for p in model.parameters()) * 8  # read from the meta skeleton
    assert plan.sae_bytes == 2 * 32 * 64 * 8  # W_enc and W_dec, float64 under a float64 model
    memory = plan.memory()
    assert memory.batch_tokens == 2 * 24 and memory.activations == plan.token_bytes * 48
    assert "memory   about" in plan.describe()
    hessian = make_plan(dataclasses.replace(config, aggregate_by=("gradients", "hessian")), 4)
    assert hessian.memory().activations == 3 * memory.activations  # the double backward's graph
    assert check_fits(memory, 10 * GIB, "m") is None
    big = MemoryEstimate(weights=70 * GIB, saes=31 * GIB, activations=20 * GIB, batch_tokens=4096)
    line = check_fits(big, 80 * GIB, "google/gemma-2-27b")
    assert line.startswith("--model google/gemma-2-27b: about 121.0 GiB per worker (weights 70.0, SAEs 31.0, "
                           "activations 20.0 for 4096 tokens) does not fit the 80 GiB of this GPU; try ")
    assert "--gpus-per-worker 2 or more" in line and "--sae-dtype bfloat16" in line
