"""--top-examples K: the K tokens of largest |score| per dimension, against a brute-force float64 reference
(every token's score from tests/reference.py, sorted by |score| descending, then row, then position), and
the same lists for any batching, sharding, worker count or resume."""

import json

import numpy as np
import pytest
import torch
from helpers import build_config, killed_run, run_cli, run_tiny
from reference import read_sae_lens_weights, reference_site_tokens, relu_sae_encode
from sae_factory import write_sae_lens_dir
from tiny import SAMPLE_TEXTS

from raygrad import constants as names
from raygrad.compute.accumulator import DeviceAccumulator
from raygrad.engine import resume
from raygrad.store import topk
from raygrad.store.zarr_store import ResultStore

LAYERS, WIDTH, D_SAE = 3, 32, 64
KEPT_ROWS = [row for row, text in enumerate(SAMPLE_TEXTS) if len(text.strip()) > 50][:6]  # build_config's 6 texts


def brute_force(scores: list[tuple[int, np.ndarray]], k: int) -> list[list[tuple[int, int, float]]]:
    """scores: per text, (dataset row, (positions, width) score of every aggregated token) -> per dimension
    the best k (row, position, score), zeros left out, by the rule spelled out directly."""
    width = scores[0][1].shape[1]
    best = []
    for dim in range(width):
        tokens = [(row, position, float(s[position, dim])) for row, s in scores for position in range(s.shape[0])
                  if s[position, dim] != 0]
        tokens.sort(key=lambda t: (-abs(t[2]), t[0], t[1]))
        best.append(tokens[:k])
    return best


def site_scores(model_dir, layer: int, kind: str, sae_dir=None) -> list[tuple[int, np.ndarray]]:
    """Every aggregated token's score at `layer` (the last position predicts nothing), float64."""
    texts = [SAMPLE_TEXTS[row] for row in KEPT_ROWS]
    out = []
    for row, (_, z, g) in zip(KEPT_ROWS, reference_site_tokens(model_dir, texts, layer, 24)):
        z, g = z[:-1], g[:-1]
        if sae_dir is not None:  # clean mode: dLoss/df = W_dec dLoss/dz; f = the SAE's features
            weights, cfg = read_sae_lens_weights(sae_dir)
            z, g = relu_sae_encode(weights, cfg, z), g @ weights["W_dec"].T
        out.append((row, (g if kind == "gradients" else z * g).numpy()))
    return out


def got_lists(totals, prefix: str, layer_row: int) -> list[list[tuple[int, int, float]]]:
    score, row, position = (totals.examples[name][layer_row] for name in topk.array_names(prefix))
    return [[(int(r), int(p), float(s)) for s, r, p in zip(score[dim], row[dim], position[dim]) if r != topk.EMPTY]
            for dim in range(score.shape[0])]


def assert_lists_equal(got, want):
    assert len(got) == len(want)
    for dim, (g, w) in enumerate(zip(got, want)):
        assert [(r, p) for r, p, _ in g] == [(r, p) for r, p, _ in w], f"dimension {dim}"
        np.testing.assert_allclose([s for *_, s in g], [s for *_, s in w], rtol=1e-9, atol=0, err_msg=f"dim {dim}")


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    for layer in range(LAYERS):
        write_sae_lens_dir(root / f"sae_{layer}", WIDTH, D_SAE, hook_name=f"blocks.{layer}.hook_mlp_out", seed=layer)
    return root


@pytest.mark.parametrize("k, batch_size", [(8, 4), (8, 1), (1, 4)])
def test_neuron_examples_are_the_brute_force_top_k(tiny_llama, texts_file, tmp_path, k, batch_size):
    _, totals = run_tiny(tiny_llama, texts_file, tmp_path, top_examples=k, batch_size=batch_size,
                         aggregate_by=("gradients", "attribution"))
    for layer in (0, 2):
        for kind in ("gradients", "attribution"):
            want = brute_force(site_scores(tiny_llama, layer, kind), k)
            assert_lists_equal(got_lists(totals, names.KIND_PREFIX[kind], layer), want)


@pytest.mark.parametrize("k, batch_size", [(8, 4), (1, 1)])
def test_sae_examples_are_the_brute_force_top_k(tiny_llama, texts_file, tmp_path, sae_dirs, k, batch_size):
    run_dir, totals = run_tiny(tiny_llama, texts_file, tmp_path, target="sae", sae_path=str(sae_dirs / "sae_{layer}"),
                               layers="0,2", top_examples=k, batch_size=batch_size,
                               aggregate_by=("gradients", "attribution"))
    xr = pytest.importorskip("xarray")  # the tables read lazily, by layer and feature, as the store holds them
    ds = xr.open_zarr(run_dir / names.STORE_NAME)
    assert ds.attr_top_row.dims == ("layer", "feature", "k") and ds.sizes["k"] == k
    np.testing.assert_array_equal(ds.grad_top_position.sel(layer=2).values, totals.examples["grad_top_position"][1])
    for row, layer in enumerate((0, 2)):
        for kind in ("gradients", "attribution"):
            want = brute_force(site_scores(tiny_llama, layer, kind, sae_dirs / f"sae_{layer}"), k)
            got = got_lists(totals, names.KIND_PREFIX[kind], row)
            assert_lists_equal(got, want)
            if kind == "attribution":  # inactive features score 0 and leave their slots empty
                assert any(len(g) < k for g in got) or k == 1


def test_packed_batches_shards_of_one_and_a_resume_give_the_same_examples(tiny_llama, texts_file, tmp_path,
                                                                          in_process_totals):
    want = in_process_totals(top_examples=8, aggregate_by=("gradients", "values"))
    assert want.examples
    _, packed = run_tiny(tiny_llama, texts_file, tmp_path / "packed", top_examples=8,
                         aggregate_by=("gradients", "values"), tokens_per_batch=40, batch_size=None, shard_size=1)
    run_dir = killed_run(build_config(tiny_llama, texts_file, tmp_path / "killed", top_examples=8, shard_size=2,
                                      aggregate_by=("gradients", "values")), dies_at_call=2)
    assert 0 < ResultStore.open(run_dir / names.STORE_NAME).shards_done().sum() < 3
    resume(run_dir, echo=lambda _: None, progress=False, execution={"batch_size": "1"})
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    for got in (packed, resumed):
        assert set(got.examples) == set(want.examples)
        for name, value in want.examples.items():
            np.testing.assert_array_equal(got.examples[name], value, err_msg=name)


def test_two_ray_workers_give_the_in_process_examples(in_process_totals, two_ray_workers):
    from conftest import TWO_WORKERS

    want = in_process_totals(**TWO_WORKERS)
    assert set(want.examples) == {f"{kind}_top_{part}" for kind in ("grad", "value") for part in
                                  ("score", "row", "position")}
    for name, value in want.examples.items():
        np.testing.assert_array_equal(two_ray_workers.totals.examples[name], value, err_msg=name)


# --- the merge rule itself, with ties and zeros that a model seldom produces


def _tables_from(scores: np.ndarray, rows: np.ndarray, positions: np.ndarray, k: int, dtype, batches: int,
                 chunks: int, seed: int):
    """Scores (N, width) of tokens (rows, positions), offered in random batches, each in `chunks` calls."""
    rng = np.random.default_rng(seed)
    kept = torch.float64 if dtype == torch.float64 else torch.float32  # as a run keeps scores (examples.score_dtype)
    acc = DeviceAccumulator(1, {"grad": scores.shape[1]}, torch.device("cpu"), top_k=k, score_dtype=kept)
    for part in np.array_split(rng.permutation(len(rows)), batches):
        part = part[np.lexsort((positions[part], rows[part]))]  # a batch's positions are in (row, position) order

        class Batch:
            token_rows, token_positions = rows[part], positions[part]

        staged = acc.empty_like()
        staged.begin_batch(Batch)
        x = torch.tensor(scores[part], dtype=dtype)
        for piece in np.array_split(np.arange(len(part)), chunks):
            if len(piece):
                staged.add("grad", 0, x[piece[0]:piece[-1] + 1], int(piece[0]))
        acc.merge(staged)
    return acc.to_partial()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_ties_and_zeros_follow_the_rule_for_any_batching(dtype, k):
    rng = np.random.default_rng(k)
    pairs = rng.choice(40 * 50, size=120, replace=False)  # distinct (row, position)
    rows, positions = pairs // 50, pairs % 50
    # Many equal |scores| (and a seventh zeros), each value exact in bfloat16 with all its mantissa bits in use
    values = torch.tensor(rng.normal(size=3)).bfloat16().double().numpy()
    scores = np.concatenate([-values, [0.0], values])[rng.integers(0, 7, size=(120, 9))]
    scores[:, 8] = 0  # a dimension no token moves: every slot empty
    tokens = list(zip(rows, positions, scores))
    want = []
    for dim in range(9):
        cands = sorted(((int(r), int(p), float(s[dim])) for r, p, s in tokens if s[dim] != 0),
                       key=lambda t: (-abs(t[2]), t[0], t[1]))
        want.append(cands[:k])
    for batches, chunks, seed in [(1, 1, 0), (4, 3, 1), (120, 1, 2)]:
        got = _tables_from(scores, rows, positions, k, dtype, batches, chunks, seed)
        assert got_lists(got, "grad", 0) == want, (batches, chunks)
        assert (got.examples["grad_top_row"][0, 8] == topk.EMPTY).all()


def test_the_pruned_host_merge_equals_the_full_merge():
    """merge_sorted skips the cells a partial cannot enter and sorts the others by |score| alone where no two
    are equal; it must give what the exact merge of every cell gives."""
    rng = np.random.default_rng(0)

    def random_tables(fill: float, ties: bool):
        shape = (2, 30, 50)
        score = (rng.integers(-5, 6, size=shape) if ties else rng.normal(size=shape)).astype(np.float32)
        row = rng.integers(0, 20, size=score.shape)
        position = rng.integers(0, 10, size=score.shape).astype(np.int32)
        row[rng.random(score.shape) > fill] = topk.EMPTY
        full = topk.merge(topk.empty(2, 30, 6, np.float32), {"score": score, "row": row, "position": position}, 6)
        return full

    for fill in (1.0, 0.3, 0.05):
        for ties in (True, False):  # the exact path for equal |scores|, the sort by |score| alone otherwise
            a, b = random_tables(fill, ties), random_tables(fill, ties)
            weak = {**b, "score": (b["score"] / 4).astype(np.float32)}  # enters few cells: those alone merged
            for partial in (b, weak):
                want = topk.merge(a, partial, 6)
                got = topk.merge_sorted(a, partial)
                for name in topk.TABLES:
                    np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} fill {fill} ties {ties}")
                    assert got[name].dtype == want[name].dtype


# --- raygrad examples: the contexts, and one line for bad input


@pytest.fixture(scope="module")
def example_run(tiny_llama, tmp_path_factory):
    """A run keeping 4 examples of gradients and attribution, on its own copy of the texts (a test edits it)."""
    root = tmp_path_factory.mktemp("examples")
    texts = root / "texts.txt"
    texts.write_text("\n".join(SAMPLE_TEXTS) + "\n")
    run_dir, totals = run_tiny(tiny_llama, texts, root / "out", top_examples=4, layers="0,2",
                               aggregate_by=("gradients", "attribution"))
    return run_dir, totals, texts


def test_examples_json_gives_each_token_its_prediction_and_context(tiny_llama, example_run, capsys, monkeypatch):
    from transformers import AutoTokenizer

    run_dir, totals, texts = example_run
    texts.write_text("\n".join(SAMPLE_TEXTS) + "\n")  # as the run read it (another test edits it)
    code, out, err = run_cli(["examples", str(run_dir), "--layer", "2", "--feature", "5", "--by", "attribution",
                              "--context", "3", "--json"], capsys, monkeypatch)
    assert code == 0, err
    found = json.loads(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    want = got_lists(totals, "attr", 1)[5]
    assert [(e["row"], e["position"], e["score"]) for e in found] == [(r, p, s) for r, p, s in want]
    for example in found:  # the text of its row, tokenized here
        ids = tokenizer(SAMPLE_TEXTS[example["row"]], truncation=True, max_length=24)["input_ids"]
        p = example["position"]
        assert example["token"] == tokenizer.decode(ids[p:p + 1])
        assert example["next_token"] == tokenizer.decode(ids[p + 1:p + 2])
        assert example["context_before"] == tokenizer.decode(ids[max(0, p - 3):p])
        assert example["context_after"] == tokenizer.decode(ids[p + 1:p + 4])
    code, out, _ = run_cli(["examples", str(run_dir), "--layer", "2", "--feature", "5", "--by", "attribution",
                            "--k", "2"], capsys, monkeypatch)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3 and lines[1].split()[:4] == ["1", f"{found[0]['score']:+.6g}", "row",
                                                                       f"{found[0]['row']}:{found[0]['position']}"]


def test_examples_bad_input_is_one_line(tiny_llama, texts_file, example_run, tmp_path, capsys, monkeypatch):
    run_dir, _, texts = example_run
    plain, _ = run_tiny(tiny_llama, texts_file, tmp_path, num_samples=2)
    capsys.readouterr()  # the run's own output
    base = ["examples", str(run_dir), "--layer", "0", "--feature", "1"]
    cases = [
        (["examples", str(plain), "--layer", "0", "--feature", "1"], "this run kept no examples; run it again with "
                                                                      "--top-examples K"),
        (base[:3] + ["1", "--feature", "1"], "--layer 1: the run has layers 0,2"),
        (base[:5] + ["32"], "--feature 32: the run's layers have 32 dimensions (0-31)"),
        (base + ["--by", "values"], "--by values: this run kept examples of gradients, attribution"),
        (base + ["--k", "5"], "--k 5: must be from 1 to 4"),
        (base + ["--context", "-1"], "--context -1: must be an integer >= 0"),
    ]
    for args, line in cases:
        code, out, err = run_cli(args, capsys, monkeypatch)
        assert code == 2 and err.startswith("error: ") and line in err and err.count("\n") == 1, (args, err)
    texts.write_text(texts.read_text().replace("Layers near", "LAYERS near"))  # the dataset changed since the run
    code, _, err = run_cli(base, capsys, monkeypatch)
    assert code == 2 and "the dataset changed since the run: its rows 0-6 no longer hold the texts" in err
    assert err.startswith("error: row ") and err.count("\n") == 1


def test_sae_passes_and_the_hessian_leave_the_examples_unchanged(tiny_llama, texts_file, tmp_path, sae_dirs):
    """SAE layers in passes of one (each pass's tables merged into the shard's rows) and a run that also takes
    the Hessian's double backward keep the same examples as one plain pass."""
    common = dict(target="sae", sae_path=str(sae_dirs / "sae_{layer}"), layers="0,2", top_examples=4)
    _, one_pass = run_tiny(tiny_llama, texts_file, tmp_path / "one", **common)
    _, passes = run_tiny(tiny_llama, texts_file, tmp_path / "passes", sae_layers_per_pass=1, **common)
    _, hessian = run_tiny(tiny_llama, texts_file, tmp_path / "hessian", aggregate_by=("gradients", "hessian"),
                          **common)
    assert set(one_pass.examples) == {"grad_top_score", "grad_top_row", "grad_top_position"}
    for got in (passes, hessian):  # the Hessian's forward runs PyTorch's math attention: scores to 1e-12
        assert set(got.examples) == set(one_pass.examples)
        for name in ("grad_top_row", "grad_top_position"):
            np.testing.assert_array_equal(got.examples[name], one_pass.examples[name], err_msg=name)
        np.testing.assert_allclose(got.examples["grad_top_score"], one_pass.examples["grad_top_score"], rtol=1e-12)


@pytest.mark.parametrize("sae_mode", ["splice", "splice-all"])
def test_splice_modes_rank_the_same_tokens_for_any_batch_size(tiny_llama, texts_file, tmp_path, sae_dirs, sae_mode):
    common = dict(target="sae", sae_path=str(sae_dirs / "sae_{layer}"), layers="0,2", top_examples=4,
                  sae_mode=sae_mode, aggregate_by=("gradients", "attribution"))
    _, one = run_tiny(tiny_llama, texts_file, tmp_path / "one", batch_size=1, **common)
    _, four = run_tiny(tiny_llama, texts_file, tmp_path / "four", batch_size=4, **common)
    assert (one.examples["grad_top_row"] != topk.EMPTY).all()  # every feature has a gradient at every token
    for name, value in one.examples.items():
        if name.endswith("_score"):
            np.testing.assert_allclose(four.examples[name], value, rtol=1e-9, err_msg=name)
        else:
            np.testing.assert_array_equal(four.examples[name], value, err_msg=name)


def test_the_python_api_gives_what_the_command_prints(example_run, capsys, monkeypatch):
    import raygrad

    run_dir, _, texts = example_run
    texts.write_text("\n".join(SAMPLE_TEXTS) + "\n")  # as the run read it (another test edits it)
    found = raygrad.top_examples(run_dir, layer=0, feature=7, by="attribution", k=3, context=2)
    code, out, _ = run_cli(["examples", str(run_dir), "--layer", "0", "--feature", "7", "--by", "attribution",
                            "--k", "3", "--context", "2", "--json"], capsys, monkeypatch)
    assert code == 0 and [example.to_dict() for example in found] == json.loads(out) and len(found) == 3


# --- issue 24: what `examples` prints is text, and says what it shows

ESCAPES = "\x1b[31mred\x1b[0m \x1b]0;pwned\x07 "  # an ANSI colour, and an OSC sequence setting the terminal title


@pytest.fixture(scope="module")
def escape_run(tiny_llama, tmp_path_factory):
    """A run over texts that each start with terminal escape sequences."""
    root = tmp_path_factory.mktemp("escapes")
    texts = root / "texts.txt"
    texts.write_text("\n".join(ESCAPES + text for text in SAMPLE_TEXTS if len(text.strip()) > 50) + "\n")
    run_dir, _ = run_tiny(tiny_llama, texts, root / "out", num_samples=3, top_examples=2, layers="0")
    return run_dir


def test_examples_print_control_characters_escaped(escape_run, capsys, monkeypatch):
    """The whole truncated text is the context (--context 24 = --max-length), so every example shows the escapes;
    newlines in a context are shown as \\n as before."""
    code, out, err = run_cli(["examples", str(escape_run), "--layer", "0", "--feature", "0", "--context", "24"],
                             capsys, monkeypatch)
    assert code == 0, err
    assert not {"\x1b", "\x07"} & set(out + err)
    lines = out.splitlines()
    # the example's token is in [brackets], wherever it falls in the sequences
    assert len(lines) == 3 and all("\\x1b[0m \\x1b]0;pwned\\x07" in line for line in lines[1:]), out


def test_examples_json_escapes_control_characters_and_keeps_the_text(escape_run, capsys, monkeypatch):
    code, out, err = run_cli(["examples", str(escape_run), "--layer", "0", "--feature", "0", "--context", "24",
                              "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\\u001b" in out
    found = json.loads(out)
    assert len(found) == 2 and all(ESCAPES.strip() in e["context_before"] + e["token"] + e["context_after"]
                                   for e in found)


def test_an_error_line_escapes_what_the_dataset_put_in_it(tiny_llama, tmp_path, capsys, monkeypatch):
    """A column name is the dataset's text too: the one-line error naming it stays text."""
    from helpers import tiny_args

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"\x1b]0;pwned\x07body": "x" * 80}) for _ in range(3)))
    code, _, err = run_cli(tiny_args(tiny_llama, data, tmp_path / "out"), capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "\x1b" not in err and "\x07" not in err
    assert "its columns are \\x1b]0;pwned\\x07body" in err


def test_printable_escapes_controls_as_repr_does_and_keeps_newlines():
    from raygrad.cli import printable

    text = "a\x1b[31mb\x07c\x9bd\u202eе\u2028f\tg\rh\x00\n caf\u00e9 \u65e5\u672c \U0001f600 \\x"
    assert printable(text) == ("a\\x1b[31mb\\x07c\\x9bd\\u202eе\\u2028f\\tg\\rh\\x00\n caf\u00e9 \u65e5\u672c "
                               "\U0001f600 \\x")


def test_examples_of_a_comparison_say_it_is_one(tiny_llama, example_run, tmp_path, capsys, monkeypatch):
    """It said the comparison "kept no examples"."""
    from raygrad.analysis.compare import compare_runs

    run_dir, _, texts = example_run
    texts.write_text("\n".join(SAMPLE_TEXTS) + "\n")  # as the run read it (another test edits it)
    other, _ = run_tiny(tiny_llama, texts, tmp_path / "b", num_samples=3, top_examples=4, layers="0,2",
                        aggregate_by=("gradients", "attribution"))
    comparison, _ = compare_runs(run_dir, other, tmp_path / "cmp")
    capsys.readouterr()
    code, _, err = run_cli(["examples", str(comparison), "--layer", "0", "--feature", "1"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: RUN_DIR {comparison}: a comparison (raygrad compare), not a run; the examples are "
                          f"kept by the runs it compares: raygrad examples {run_dir.resolve()} (A) or "
                          f"{other.resolve()} (B)"), err


def test_examples_of_an_unfinished_run_say_so(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    """They are the top examples of the finished shards only; it printed them as if they were the run's."""
    run_dir = killed_run(build_config(tiny_llama, texts_file, tmp_path, top_examples=4, shard_size=2,
                                      aggregate_by=("gradients",)), dies_at_call=2)
    done = ResultStore.open(run_dir / names.STORE_NAME).shards_done()
    assert done.tolist() == [True, False, False]
    capsys.readouterr()
    for extra in ([], ["--json"]):
        code, out, err = run_cli(["examples", str(run_dir), "--layer", "0", "--feature", "3", *extra], capsys,
                                 monkeypatch)
        assert code == 0, err
        assert err.strip().splitlines() == [
            f"warning: RUN_DIR {run_dir}: the run is not complete (1 of 3 shards done); these are the top examples "
            f"of its finished shards only, not of the whole dataset (finish it with raygrad run --resume {run_dir})"]
        if extra:
            assert json.loads(out)  # --json's output stays JSON
        else:
            assert out.startswith("layer 0 feature 3: top ")
    import raygrad

    with pytest.warns(UserWarning, match=r"the run is not complete \(1 of 3 shards done\); these are the top"):
        assert raygrad.top_examples(run_dir, layer=0, feature=3)  # the Python API says so too
