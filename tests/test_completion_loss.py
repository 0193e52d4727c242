"""--prompt-column/--completion-column: the loss, and every statistic, over the completion's target tokens only.

The reference shares no code with raygrad: per text, in float64 with plain autograd, the prompt's ids as the
tokenizer gives them (BOS included) followed by the completion's (no special tokens), cut to --max-length;
a leaf replaces the hooked module's output, the loss sums cross-entropy over the positions that predict a
completion token, and those positions are the ones aggregated."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_totals, build_config, run_cli, run_tiny
from reference import explicit_module, load_float64, read_sae_lens_weights, reference_sums, relu_sae_encode
from sae_factory import write_sae_lens_dir
from test_hub_datasets import hub  # noqa: F401 (the fixture: a hub on 127.0.0.1)
from tiny import SAMPLE_TEXTS

from raygrad import constants as names
from raygrad.engine import run
from raygrad.plan import Plan
from raygrad.store import topk
from raygrad.store.zarr_store import ResultStore

MAX_LENGTH = 32
LAYERS = [0, 2]
PROMPT_CHARS = 14  # of each sample text: the prompt (~10 tokens of the tiny tokenizer); the rest is the completion
LONG_PROMPT = "A prompt long enough to fill every position the run keeps for it, and more. " * 2


def usable_pairs() -> list[dict]:
    """Rows that are kept: each long sample text cut into a prompt and its completion (the completions of the
    longer ones cut by --max-length). Empty prompts: test_empty_prompts_give_the_plain_run."""
    return [{"prompt": t[:PROMPT_CHARS], "completion": t[PROMPT_CHARS:]} for t in SAMPLE_TEXTS if len(t.strip()) > 50]


def dataset_rows() -> list[dict]:
    """usable_pairs() with a row of each kind that is skipped between them (same types per column, so
    every format holds them: no number, a missing key only in JSON Lines)."""
    rows = usable_pairs()
    skipped = [{"prompt": "What now?", "completion": None},  # no completion
               {"prompt": "What now?", "completion": ""},
               {"prompt": "What now?", "completion": "   "},
               {"prompt": LONG_PROMPT, "completion": " and the answer."},  # the prompt fills --max-length
               {"prompt": "Hi", "completion": " there."}]  # 50 characters or fewer with its prompt
    return [rows[0], skipped[0], rows[1], skipped[1], rows[2], skipped[2], skipped[3], rows[3], skipped[4],
            *rows[4:]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", dataset_rows())


def pair_options(**overrides) -> dict:
    options = dict(prompt_column="prompt", completion_column="completion", num_samples="all", layers="0,2",
                   max_length=MAX_LENGTH)
    options.update(overrides)
    return options


# --- the reference


def reference_tokens(model, tokenizer, module, prompt: str, completion: str):
    """(positions, z, g, loss) of one pair: the aggregated positions t (those predicting a completion
    token), the module's output and dLoss/dz there (float64), and the summed loss over those targets."""
    prompt_ids = tokenizer(prompt).input_ids
    ids = (prompt_ids + tokenizer(completion, add_special_tokens=False).input_ids)[:MAX_LENGTH]
    positions = list(range(max(len(prompt_ids), 1) - 1, len(ids) - 1))
    leaf = {}

    def replace_with_leaf(mod, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        leaf["z"] = hidden.detach().requires_grad_(True)
        return (leaf["z"], *output[1:]) if isinstance(output, tuple) else leaf["z"]

    handle = module.register_forward_hook(replace_with_leaf)
    try:
        logits = model(torch.tensor([ids])).logits[0]
    finally:
        handle.remove()
    loss = sum(F.cross_entropy(logits[t], torch.tensor(ids[t + 1]), reduction="sum") for t in positions)
    loss.backward()
    return positions, leaf["z"].detach()[0, positions], leaf["z"].grad[0, positions], float(loss.detach())


def reference_scores(model_dir, rows: list[dict], layers, sae_dirs=None):
    """Per layer: [(dataset row, positions, g, value)] of every usable pair; g and the value are an SAE's
    features' (clean mode: dLoss/df = dLoss/dz W_dec^T, f = encode(z)) when `sae_dirs` is given. Plus the
    summed loss over all completion targets."""
    model, tokenizer = load_float64(model_dir)
    kept = {row: pair for row, pair in enumerate(rows) if pair in usable_pairs()}
    per_layer, loss = [], 0.0
    for index, layer in enumerate(layers):
        module, scores = explicit_module(model, layer, "mlp_out"), []
        for row, pair in kept.items():
            positions, z, g, text_loss = reference_tokens(model, tokenizer, module, pair["prompt"], pair["completion"])
            if sae_dirs is not None:
                weights, cfg = read_sae_lens_weights(sae_dirs / f"sae_{layer}")
                z, g = relu_sae_encode(weights, cfg, z), g @ weights["W_dec"].T
            scores.append((row, positions, g.numpy(), z.numpy()))
            loss += text_loss if index == 0 else 0.0
        per_layer.append(scores)
    return per_layer, loss


def assert_sums_match(totals, per_layer, loss, prefixes=(("grad", False), ("value", True))):
    for prefix, is_value in prefixes:
        for stat, reduce in (("sum", lambda x: x.sum(0)), ("abs_sum", lambda x: np.abs(x).sum(0)),
                             ("sq_sum", lambda x: (x ** 2).sum(0))):
            want = np.stack([sum(reduce(z if is_value else g) for _, _, g, z in scores) for scores in per_layer])
            np.testing.assert_allclose(totals.sums[f"{prefix}_{stat}"], want, rtol=1e-10, atol=1e-14,
                                       err_msg=f"{prefix}_{stat}")
    tokens = [sum(len(positions) for _, positions, _, _ in scores) for scores in per_layer]
    np.testing.assert_array_equal(totals.tokens, tokens)
    assert totals.loss_tokens == tokens[0]
    np.testing.assert_allclose(totals.loss_sum, loss, rtol=1e-10)


def best_tokens(scores, k: int) -> list[list[tuple[int, int, float]]]:
    """Per dimension, the k (row, position, g) with the largest |g|, ties by row then position."""
    width = scores[0][2].shape[1]
    best = []
    for dim in range(width):
        found = [(row, position, float(g[i, dim])) for row, positions, g, _ in scores
                 for i, position in enumerate(positions) if g[i, dim] != 0]
        found.sort(key=lambda t: (-abs(t[2]), t[0], t[1]))
        best.append(found[:k])
    return best


def assert_top_k_match(totals, per_layer, k: int):
    for layer_row, scores in enumerate(per_layer):
        score, row, position = (totals.examples[name][layer_row] for name in topk.array_names("grad"))
        for dim, want in enumerate(best_tokens(scores, k)):
            got = [(int(r), int(p), float(s)) for s, r, p in zip(score[dim], row[dim], position[dim])
                   if r != topk.EMPTY]
            assert [(r, p) for r, p, _ in got] == [(r, p) for r, p, _ in want], f"layer row {layer_row} dim {dim}"
            np.testing.assert_allclose([s for *_, s in got], [s for *_, s in want], rtol=1e-9, atol=0)


# --- site dimensions, SAE features, top-K


@pytest.fixture(scope="module")
def site_reference(tiny_llama):
    return reference_scores(tiny_llama, dataset_rows(), LAYERS)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_site_gradients_values_counts_and_top_k_match_brute_force(batch_size, tiny_llama, pairs_file,
                                                                  site_reference, tmp_path):
    _, totals = run_tiny(tiny_llama, pairs_file, tmp_path, **pair_options(
        batch_size=batch_size, aggregate_by=("gradients", "values"), top_examples=3))
    per_layer, loss = site_reference
    assert_sums_match(totals, per_layer, loss)
    assert_top_k_match(totals, per_layer, 3)
    # the prompts are context only: fewer targets than the same texts whole
    assert 0 < totals.loss_tokens < sum(MAX_LENGTH - 1 for _ in usable_pairs())


def test_sae_features_match_brute_force(tiny_llama, pairs_file, tmp_path):
    for layer in LAYERS:
        write_sae_lens_dir(tmp_path / f"sae_{layer}", 32, 48, hook_name=f"blocks.{layer}.hook_mlp_out", seed=layer)
    _, totals = run_tiny(tiny_llama, pairs_file, tmp_path / "out", **pair_options(
        target="sae", sae_path=str(tmp_path / "sae_{layer}"), aggregate_by=("gradients", "values"), top_examples=2))
    per_layer, loss = reference_scores(tiny_llama, dataset_rows(), LAYERS, sae_dirs=tmp_path)
    assert_sums_match(totals, per_layer, loss)
    assert_top_k_match(totals, per_layer, 2)


# --- the plain mode, and the pair mode's special case of empty prompts


def test_plain_mode_is_unchanged(tiny_llama, texts_file, tmp_path):
    """No prompt/completion columns: the sums are the plain reference's (every target of every text), and a
    shard's fingerprint is the digest of (row, text) it always was."""
    run_dir, totals = run_tiny(tiny_llama, texts_file, tmp_path, layers="0,2", max_length=24)
    kept = [t for t in SAMPLE_TEXTS if len(t.strip()) > 50][:6]
    want = reference_sums(tiny_llama, kept, LAYERS, max_length=24)
    for name in ("grad_sum", "grad_abs_sum", "grad_sq_sum"):
        np.testing.assert_allclose(totals.sums[name], want[name], rtol=1e-10, atol=1e-14, err_msg=name)
    np.testing.assert_array_equal(totals.tokens, want["tokens"])
    np.testing.assert_allclose(totals.loss_sum, want["loss_sum"], rtol=1e-10)
    plan = Plan.from_dict(ResultStore.open(run_dir / names.STORE_NAME).attrs[names.ATTR_PLAN])
    assert "completion_column" not in plan.source and not plan.skipped_texts.get("no_completion")
    digest = hashlib.blake2b(digest_size=8)
    for row, text in enumerate(SAMPLE_TEXTS):
        if len(text.strip()) > 50:
            encoded = text.encode()
            digest.update(row.to_bytes(8, "little") + len(encoded).to_bytes(8, "little") + encoded)
    assert [shard.fingerprint for shard in plan.shards] == [digest.hexdigest()]


def test_empty_prompts_give_the_plain_run(tiny_llama, texts_file, in_process_totals, tmp_path):
    """A pair with an empty prompt has only the BOS as context, which the plain mode's first target has too:
    a run over (empty prompt, text) pairs equals the plain run over the texts."""
    rows = [{"prompt": "", "completion": text} for text in SAMPLE_TEXTS]
    _, totals = run_tiny(tiny_llama, write_jsonl(tmp_path / "empty.jsonl", rows), tmp_path / "out",
                         prompt_column="prompt", completion_column="completion")
    assert_same_totals(totals, in_process_totals(), rtol=1e-12)


# --- skipped rows, formats, Ray


def test_skipped_rows_are_counted_and_said(tiny_llama, tmp_path):
    rows = dataset_rows()
    rows.insert(3, {"prompt": "What now?"})  # no completion key
    rows.insert(5, {"prompt": "What now?", "completion": 42})  # not text
    rows.insert(6, {"prompt": None, "completion": " an answer long enough to pass the filter on its own."})
    lines = []
    run_dir = run(build_config(tiny_llama, write_jsonl(tmp_path / "pairs.jsonl", rows), tmp_path / "out",
                               **pair_options()), echo=lines.append, progress=False)
    plan = Plan.from_dict(ResultStore.open(run_dir / names.STORE_NAME).attrs[names.ATTR_PLAN])
    # counted here from the rows themselves, by the documented rules
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    want = {}
    for row in rows:
        prompt, completion = row.get("prompt"), row.get("completion")
        if completion is None or isinstance(completion, str) and not completion.strip():
            reason = "no_completion"
        elif not isinstance(prompt, str) or not isinstance(completion, str):
            reason = "not_text"
        elif len((prompt + completion).strip()) <= 50:
            reason = "short"
        elif len(tokenizer(prompt).input_ids) >= MAX_LENGTH:
            reason = "completion_cut"
        else:
            continue
        want[reason] = want.get(reason, 0) + 1
    assert want == {"no_completion": 4, "not_text": 2, "short": 1, "completion_cut": 1}
    assert plan.skipped_texts == want
    assert plan.samples == len(usable_pairs())
    lines = "\n".join(lines).splitlines()
    (said,) = [line for line in lines if line.startswith("skipped")]
    assert "4 rows without a completion" in said and "1 rows whose prompt fills --max-length 32" in said
    assert any(line.startswith("loss     on the completion's tokens only") for line in lines)


def test_a_pass_that_stops_early_counts_only_the_rows_it_took(tiny_llama, tmp_path):
    """Pairs are checked against --max-length PAIR_BATCH rows at a time, read ahead; what a row read ahead
    but not taken would count (a skip, bytes replaced) is not counted."""
    from collections import Counter

    from transformers import AutoTokenizer

    from raygrad.dataset.formats import describe_source
    from raygrad.dataset.shards import PAIR_BATCH, plan_shards

    good = b'"What is said here?","%s"\r\n' % (b" an answer long enough for the filter." * 2)
    lines = [b"prompt,completion\r\n", good, b'"What now?",\r\n', good, good,
             *[b'"Bytes \xff\xfe that are not UTF-8",""\r\n'] * 3]
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"".join(lines))
    source = describe_source(str(path), prompt_column="prompt", completion_column="completion")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert PAIR_BATCH > len(lines)
    taken = plan_shards(source, 3, tokenizer, MAX_LENGTH)
    assert (taken.samples, taken.skipped) == (3, {"no_completion": 1})
    whole = plan_shards(source, None, tokenizer, MAX_LENGTH)
    assert (whole.samples, Counter(whole.skipped)) == (3, Counter(no_completion=4, undecodable_bytes=3))


def _write_formats(root: Path) -> dict[str, str]:
    """The same rows as .jsonl, .csv, .parquet, a dataset directory, and each file by a file:// URL."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = dataset_rows()
    paths = {"jsonl": str(write_jsonl(root / "pairs.jsonl", rows))}
    with open(root / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "prompt", "completion"])
        writer.writerows([i, row["prompt"], "" if row["completion"] is None else row["completion"]]
                         for i, row in enumerate(rows))
    paths["csv"] = str(root / "pairs.csv")
    table = pa.table({"prompt": [row["prompt"] for row in rows], "completion": [row["completion"] for row in rows],
                      "id": list(range(len(rows)))})
    pq.write_table(table, root / "pairs.parquet", row_group_size=4)
    paths["parquet"] = str(root / "pairs.parquet")
    (root / "hub").mkdir()
    write_jsonl(root / "hub" / "train.jsonl", rows)
    paths["datasets"] = str(root / "hub")
    for kind in ("parquet", "jsonl", "csv"):  # read by URL (fsspec), as on a cluster
        paths[f"url-{kind}"] = (root / f"pairs.{kind}").as_uri()
    return paths


def test_every_format_with_columns_gives_the_same_sums(tiny_llama, pairs_file, tmp_path):
    _, want = run_tiny(tiny_llama, pairs_file, tmp_path / "jsonl", **pair_options(shard_size=2))
    for kind, dataset in _write_formats(tmp_path).items():
        run_dir, got = run_tiny(tiny_llama, dataset, tmp_path / f"out-{kind}", **pair_options(shard_size=2))
        assert_same_totals(got, want, rtol=1e-12)
        plan = Plan.from_dict(ResultStore.open(run_dir / names.STORE_NAME).attrs[names.ATTR_PLAN])
        assert sum(plan.skipped_texts.values()) == 5, kind


def test_a_hub_dataset_equals_the_local_parquet(hub, tiny_llama, tmp_path):  # noqa: F811 (the fixture)
    """A hub id (read as parquet at a pinned commit) with prompt/completion columns, as the same local file."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = dataset_rows()
    buffer = io.BytesIO()
    pq.write_table(pa.table({"prompt": [row["prompt"] for row in rows],
                             "completion": [row["completion"] for row in rows]}), buffer, row_group_size=3)
    hub.commit("org/pairs", {"README.md": b"# pairs\n", "data/train-00000-of-00001.parquet": buffer.getvalue()})
    (tmp_path / "local.parquet").write_bytes(buffer.getvalue())
    _, want = run_tiny(tiny_llama, tmp_path / "local.parquet", tmp_path / "local", **pair_options(shard_size=2))
    run_dir, got = run_tiny(tiny_llama, "org/pairs", tmp_path / "hub-run", **pair_options(shard_size=2))
    assert_same_totals(got, want, rtol=0)
    plan = Plan.from_dict(ResultStore.open(run_dir / names.STORE_NAME).attrs[names.ATTR_PLAN])
    assert plan.source["completion_column"] == "completion" and sum(plan.skipped_texts.values()) == 5


def test_killed_and_resumed_equals_uninterrupted(tiny_llama, pairs_file, tmp_path):
    from helpers import killed_run

    from raygrad.engine import resume

    options = pair_options(shard_size=2, top_examples=2)
    _, want = run_tiny(tiny_llama, pairs_file, tmp_path / "whole", **options)
    run_dir = killed_run(build_config(tiny_llama, pairs_file, tmp_path / "killed", **options), dies_at_call=2)
    resume(run_dir, echo=lambda _: None, progress=False)
    got, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all() and len(done) > 2
    assert_same_totals(got, want, rtol=1e-12)
    for name, table in want.examples.items():
        np.testing.assert_array_equal(got.examples[name], table, err_msg=name)


def test_examples_show_the_completion_token_the_run_took(tiny_llama, pairs_file, tmp_path):
    """raygrad examples re-reads a pair and tokenizes it as the worker did: the token at each example's
    position, and the one it predicts, are the reference's (prompt ids, then the completion's)."""
    from transformers import AutoTokenizer

    from raygrad.analysis.examples import RunExamples

    run_dir, _ = run_tiny(tiny_llama, pairs_file, tmp_path, **pair_options(top_examples=3))
    tokenizer, rows = AutoTokenizer.from_pretrained(tiny_llama), dataset_rows()
    found = RunExamples(run_dir).examples(2, 7)
    assert len(found) == 3
    for example in found:
        pair = rows[example.row]
        prompt_ids = tokenizer(pair["prompt"]).input_ids
        ids = (prompt_ids + tokenizer(pair["completion"], add_special_tokens=False).input_ids)[:MAX_LENGTH]
        assert len(prompt_ids) - 1 <= example.position < len(ids) - 1  # it predicts a completion token
        assert example.token == tokenizer.decode(ids[example.position:example.position + 1])
        assert example.next_token == tokenizer.decode(ids[example.position + 1:example.position + 2])


def test_two_ray_workers_equal_one_process(tiny_llama, pairs_file, gpu_clusters, tmp_path):
    import ray
    from conftest import connect_to

    options = pair_options(shard_size=2, batch_size=2, aggregate_by=("gradients", "values"), top_examples=3)
    _, want = run_tiny(tiny_llama, pairs_file, tmp_path / "in-process", **options)
    cluster, _ = gpu_clusters.get()
    connect_to(cluster.address)
    try:
        _, got = run_tiny(tiny_llama, pairs_file, tmp_path / "ray", workers=2, gpus_per_worker=1, **options)
    finally:
        ray.shutdown()
    assert_same_totals(got, want, rtol=1e-12)
    for name, table in want.examples.items():
        np.testing.assert_allclose(got.examples[name], table, rtol=1e-12, err_msg=name)


# --- bad input: one line, nothing written


@pytest.mark.parametrize("extra, said", [
    (["--prompt-column", "prompt"], "--prompt-column prompt: give --completion-column too"),
    (["--completion-column", "completion"], "--completion-column completion: give --prompt-column too"),
    (["--prompt-column", "prompt", "--completion-column", "prompt"],
     "--completion-column prompt: the same column as --prompt-column"),
    (["--text-column", "body", "--prompt-column", "prompt", "--completion-column", "completion"],
     "--text-column body: give it (one text per row) or --prompt-column/--completion-column"),
    (["--prompt-column", "prompt", "--completion-column", "answer"], "--completion-column answer: not in dataset"),
    (["--prompt-column", "question", "--completion-column", "completion"], "--prompt-column question: not in dataset"),
])
@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_bad_columns_get_one_line(kind, extra, said, tiny_llama, tmp_path, capsys, monkeypatch):
    dataset = _write_formats(tmp_path)[kind]
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["run", "--model", str(tiny_llama), "--dataset", dataset, "--workers", "0",
                                    "--output-dir", str(out), "--no-progress", *extra], capsys, monkeypatch)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0] and "Traceback" not in stderr, stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("dataset, said", [
    ("texts", "is plain text, one text a line, with no columns"),
    ("stdlib-docs", "is plain text, one text a line, with no columns"),
    ("long", "no row with a completion"),
])
def test_datasets_without_usable_pairs_get_one_line(dataset, said, tiny_llama, texts_file, tmp_path, capsys,
                                                    monkeypatch):
    paths = {"texts": str(texts_file), "stdlib-docs": "stdlib-docs",
             "long": str(write_jsonl(tmp_path / "long.jsonl", [{"prompt": LONG_PROMPT, "completion": " yes."}] * 3))}
    out = tmp_path / "out"
    code, _, stderr = run_cli(["run", "--model", str(tiny_llama), "--dataset", paths[dataset], "--workers", "0",
                               "--max-length", str(MAX_LENGTH), "--prompt-column", "prompt", "--completion-column",
                               "completion", "--output-dir", str(out), "--no-progress"], capsys, monkeypatch)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0] and "Traceback" not in stderr, stderr
    assert not out.exists() or not any(out.iterdir())


# --- raygrad ablate on prompt/completion texts: the loss per completion token, the intervention everywhere


class AblationReference:
    """Per pair, in float64 with plain autograd: the clean and ablated summed loss over the completion's
    targets, their count, and the first-order prediction sum_t g_t (a'_t - a_t) over every position the
    intervention changes (the prompt's too: the completion's loss depends on them), per entry; site
    dimensions set to `value` at every position, jointly (variant 0) and each alone."""

    def __init__(self, model_dir, entries, value: float):
        self.model, self.tokenizer = load_float64(model_dir)
        self.entries, self.value = entries, value
        self.layers = sorted({layer for layer, _ in entries})
        self.modules = {layer: explicit_module(self.model, layer, "mlp_out") for layer in self.layers}
        variants = [entries] + [[entry] for entry in entries]
        rows = [self._pair(pair, variants) for pair in usable_pairs()]
        self.clean, self.counts = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
        self.predicted, self.ablated = np.array([r[2] for r in rows]), np.array([r[3] for r in rows])

    def _pair(self, pair, variants):
        prompt_ids = self.tokenizer(pair["prompt"]).input_ids
        ids = torch.tensor([(prompt_ids + self.tokenizer(pair["completion"], add_special_tokens=False).input_ids
                             )[:MAX_LENGTH]])
        targets = list(range(len(prompt_ids) - 1, ids.shape[1] - 1))
        leaves, values = {}, {}

        def leaf(module, args, output, layer):  # a zero added: dLoss/dz through every path, later layers' too
            values[layer], leaves[layer] = output.detach(), torch.zeros_like(output, requires_grad=True)
            return output + leaves[layer]

        handles = [self.modules[layer].register_forward_hook(lambda m, a, o, layer=layer: leaf(m, a, o, layer))
                   for layer in self.layers]
        logits = self.model(ids).logits[0]
        for handle in handles:
            handle.remove()
        clean = F.cross_entropy(logits[targets], ids[0, [t + 1 for t in targets]], reduction="sum")
        clean.backward()
        predicted = [float((leaves[layer].grad[0, :, index] * (self.value - values[layer][0, :, index])).sum())
                     for layer, index in self.entries]
        ablated = [self._ablated(ids, targets, variant) for variant in variants]
        return float(clean.detach()), len(targets), predicted, ablated

    def _ablated(self, ids, targets, variant):
        def set_entries(output, layer):
            hidden = output.clone()
            for entry_layer, index in variant:
                if entry_layer == layer:
                    hidden[0, :, index] = self.value
            return hidden

        handles = [self.modules[layer].register_forward_hook(lambda m, a, o, layer=layer: set_entries(o, layer))
                   for layer in self.layers]
        with torch.no_grad():
            logits = self.model(ids).logits[0]
        for handle in handles:
            handle.remove()
        return float(F.cross_entropy(logits[targets], ids[0, [t + 1 for t in targets]], reduction="sum"))

    def numbers(self) -> dict:
        n = self.counts.sum()
        return {"tokens": int(n), "loss": self.clean.sum() / n, "loss_ablated": self.ablated[:, 0].sum() / n,
                "delta": (self.ablated[:, 0] - self.clean).sum() / n, "predicted_delta": self.predicted.sum() / n,
                "each": [((self.ablated[:, v] - self.clean).sum() / n, self.predicted[:, v - 1].sum() / n)
                         for v in range(1, len(self.entries) + 1)]}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_ablate_on_completions_matches_brute_force(batch_size, tiny_llama, pairs_file, tmp_path, capsys,
                                                   monkeypatch):
    from helpers import rms_norm_float64
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    # transformers' RMSNorm rounds through float32 even in float64; texts padded differently then differ by ~1e-7
    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm_float64)
    run_dir, _ = run_tiny(tiny_llama, pairs_file, tmp_path, **pair_options(batch_size=batch_size, shard_size=2))
    entries = [(0, 3), (2, 5), (2, 17)]
    code, out, err = run_cli(["ablate", str(run_dir), "--features", ",".join(f"{la}:{i}" for la, i in entries),
                              "--mode", "clamp=0.25", "--each", "--json", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    got, want = json.loads(out), AblationReference(tiny_llama, entries, 0.25).numbers()
    assert got["tokens"] == want["tokens"]
    numbers = ["loss", "loss_ablated", "delta", "predicted_delta"]
    np.testing.assert_allclose([got[k] for k in numbers] + [x for e in got["each"] for x in (e["delta"],
                                                                                          e["predicted_delta"])],
                               [want[k] for k in numbers] + [x for pair in want["each"] for x in pair],
                               rtol=1e-9, atol=1e-13)
    assert abs(want["delta"]) > 1e-6 and abs(want["predicted_delta"]) > 1e-6


def test_ablate_takes_the_columns_for_other_texts(tiny_llama, texts_file, pairs_file, tmp_path, capsys, monkeypatch):
    """A plain run ablated on prompt/completion texts (--dataset with both columns) measures the loss per
    completion token, as a completion run on those texts does; without the columns on a run that has
    them, a .txt dataset (no columns) is one line."""
    plain_dir, _ = run_tiny(tiny_llama, texts_file, tmp_path / "plain", layers="0,2", max_length=MAX_LENGTH)
    _, pairs = run_tiny(tiny_llama, pairs_file, tmp_path / "pairs", **pair_options())
    code, out, err = run_cli(["ablate", str(plain_dir), "--features", "0:3", "--json", "--no-progress", "--dataset",
                              str(pairs_file), "--prompt-column", "prompt", "--completion-column", "completion",
                              "--num-samples", "all"], capsys, monkeypatch)
    assert code == 0, err
    got = json.loads(out)
    assert got["tokens"] == pairs.loss_tokens
    np.testing.assert_allclose(got["loss"], pairs.loss_sum / pairs.loss_tokens, rtol=1e-12)

    pairs_dir = next((tmp_path / "pairs").iterdir())
    code, out, err = run_cli(["ablate", str(pairs_dir), "--features", "0:3", "--json", "--no-progress", "--dataset",
                              str(texts_file)], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "with no columns" in err, err
