"""`raygrad report`: the page is self-contained (no reference outside it but Neuronpedia links), and every
feature it lists carries its statistics (recomputed here from the store's float64 sums) and its examples
exactly as RunExamples returns them; a comparison's page lists A's and B's features with both runs'
examples; a changed dataset still gives a page, its contexts marked unavailable; bad input is one line."""

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import run_cli, run_tiny, tree_digest
from sae_factory import write_sae_lens_dir
from tiny import SAMPLE_TEXTS

from raygrad import constants as names
from raygrad.analysis.compare import compare_runs
from raygrad.analysis.examples import RunExamples
from raygrad.analysis.report import shown

NEURONPEDIA = "https://www.neuronpedia.org/"
EXAMPLES = dict(top_examples=8, aggregate_by=("gradients", "attribution"))


class PageParser(HTMLParser):
    """Every tag with its attributes, and per listed feature (layer, feature, side): its statistic cells by
    column, its link, its examples per source (the <li> attributes, full text and <mark> text) and any
    'examples unavailable' note."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.features = [], {}
        self.feature = self.cell = self.source = self.item = self.note = None
        self.in_mark = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = {key: value or "" for key, value in attrs}
        self.tags.append((tag, a))
        classes = a.get("class", "").split()
        if tag == "tbody" and "feature" in classes:
            key = (int(a["data-layer"]), int(a["data-feature"]), a["data-side"])
            assert key not in self.features, f"{key} listed twice"
            self.feature = self.features[key] = {"cells": {}, "url": None, "examples": {}, "unavailable": {}}
        elif self.feature is None:
            return
        elif tag == "td" and classes:
            self.cell = classes[0]
            self.feature["cells"][self.cell] = ""
        elif tag == "a":
            self.feature["url"] = a["href"]
        elif tag == "div" and "data-source" in a:
            self.source = a["data-source"]
            self.feature["examples"][self.source] = []
        elif tag == "li":
            self.item = {**a, "mark": "", "text": ""}
            self.feature["examples"][self.source].append(self.item)
        elif tag == "mark":
            self.in_mark = True
        elif tag == "p" and "unavailable" in classes:
            self.note = self.source
            self.feature["unavailable"][self.source] = ""

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.feature = None
        elif tag == "td":
            self.cell = None
        elif tag == "li":
            self.item = None
        elif tag == "mark":
            self.in_mark = False
        elif tag == "p":
            self.note = None

    def handle_data(self, data):
        if self.feature is None:
            return
        if self.cell is not None:
            self.feature["cells"][self.cell] += data
        if self.item is not None:
            self.item["text"] += data
            if self.in_mark:
                self.item["mark"] += data
        if self.note is not None:
            self.feature["unavailable"][self.note] += data


def read_page(path: Path) -> PageParser:
    text = path.read_text(encoding="utf-8")
    page = PageParser(text)
    assert_self_contained(text, page)
    return page


def assert_self_contained(text: str, page: PageParser):
    """Nothing the browser would fetch: no script, stylesheet, frame or font; every src a data: URI; every
    href an anchor on the page or a Neuronpedia link."""
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed", "base", "form"), tag
        for name in ("src", "srcset", "href", "action", "poster", "data", "xlink:href"):
            value = attrs.get(name)
            if value is None:
                continue
            if tag == "a" and name == "href" and (value.startswith("#") or value.startswith(NEURONPEDIA)):
                continue
            assert name == "src" and value.startswith("data:image/png;base64,"), (tag, name, value[:80])
        assert "url(" not in attrs.get("style", ""), attrs["style"]
    for css in re.findall(r"<style>(.*?)</style>", text, re.S):
        assert "url(" not in css and "@import" not in css and "@font-face" not in css


def sums(run_dir: Path, prefix: str, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(sum x, sum |x|, sum x^2, n) of one layer row, read straight from the Zarr store."""
    group = zarr.open_group(str(run_dir / names.STORE_NAME), mode="r")
    total, abs_total, sq_total = (np.asarray(group[f"{prefix}_{s}"][row], dtype=np.float64)
                                  for s in ("sum", "abs_sum", "sq_sum"))
    return total, abs_total, sq_total, int(group[names.TOKENS][row])


def moments(run_dir: Path, prefix: str, row: int) -> dict[str, np.ndarray]:
    """mean, mean |x|, ddof-1 std and (mean |x|, ddof-1 variance of |x|) per dimension, by the textbook formulas."""
    total, abs_total, sq_total, n = sums(run_dir, prefix, row)
    return {"mean": total / n, "mean_abs": abs_total / n,
            "std": np.sqrt(np.maximum(sq_total - total**2 / n, 0) / (n - 1)),
            "var_abs": np.maximum(sq_total - abs_total**2 / n, 0) / (n - 1), "n": n}


def assert_printed(cell: str, want: float):
    """A number printed with 4 significant digits (%, where it says so) equals `want` to that precision."""
    got = float(cell.replace("%", "")) / (100 if cell.endswith("%") else 1)
    assert got == pytest.approx(want, rel=5.01e-4, abs=1e-300), (cell, want)


def assert_examples(listed: list[dict], run: RunExamples, layer: int, feature: int, kind: str, count: int):
    """The page's <li> of one source are RunExamples' examples, in order: row, position, exact score, the
    token (attribute and highlighted text), the context around it; or the reason it is unavailable."""
    want = run.examples(layer, feature, kind, count, context=8, strict=False)
    assert want, f"layer {layer} feature {feature}: no examples to check"
    assert len(listed) == len(want)
    for item, example in zip(listed, want):
        assert (int(item["data-row"]), int(item["data-position"])) == (example.row, example.position)
        assert float(item["data-score"]) == example.score
        assert f"{example.score:+.4g}" in item["text"] and f"row {example.row}:{example.position}" in item["text"]
        if example.unavailable:
            assert "unavailable" in item["class"] and example.unavailable in item["text"]
            continue
        assert item["data-token"] == example.token and item["mark"] == shown(example.token)
        assert shown(example.context_before + example.token + example.context_after) in item["text"]
        assert f"→ {shown(example.next_token)}" in item["text"]


def assert_run_page(page: PageParser, run_dir: Path, k: int, count: int, kind: str = "gradients"):
    """Per layer the k features of largest mean |x| (from the sums), with their statistics and examples."""
    run = RunExamples(run_dir)
    prefix = names.KIND_PREFIX[kind]
    assert {side for *_, side in page.features} == {"run"}
    for row, layer in enumerate(run.plan.layers):
        m = moments(run_dir, prefix, row)
        want = list(np.argsort(-m["mean_abs"], kind="stable")[:k])
        listed = sorted((key for key in page.features if key[0] == layer),
                        key=lambda key: int(page.features[key]["cells"]["rank"]))
        assert [feature for _, feature, _ in listed] == want, f"layer {layer}"
        for feature in want:
            entry = page.features[(layer, int(feature), "run")]
            cells = entry["cells"]
            for column, statistic in (("mean", "mean"), ("mean_abs", "mean_abs"), ("std", "std")):
                assert_printed(cells[f"{prefix}_{column}"], m[statistic][feature])
            assert_printed(cells["share"], m["mean_abs"][feature] / m["mean_abs"].sum())
            assert_examples(entry["examples"]["run"], run, layer, int(feature), kind, count)


@pytest.fixture(scope="module")
def neuron_run(tiny_llama, texts_file, tmp_path_factory):
    return run_tiny(tiny_llama, texts_file, tmp_path_factory.mktemp("neuron"), **EXAMPLES)[0]


@pytest.fixture(scope="module")
def plain_runs(tiny_llama, texts_file, tmp_path_factory):
    """Two runs that kept no examples (2 and 4 texts), comparable with neuron_run."""
    root = tmp_path_factory.mktemp("plain")
    return tuple(run_tiny(tiny_llama, texts_file, root / str(count), num_samples=count,
                          aggregate_by=EXAMPLES["aggregate_by"])[0] for count in (2, 4))


def test_a_run_page_lists_each_feature_with_its_statistics_and_examples(neuron_run, capsys, monkeypatch):
    code, out, err = report(capsys, monkeypatch, str(neuron_run), "-k", "4", "--examples", "3")
    assert (code, err) == (0, "")
    assert out == f"report   {neuron_run / 'report.html'}\n"
    page = read_page(neuron_run / "report.html")
    assert len(page.features) == 3 * 4  # every layer, k features
    assert_run_page(page, neuron_run, k=4, count=3)
    assert all(entry["url"] is None for entry in page.features.values())  # a site's dimensions: no pages


def test_attribution_and_a_second_run_of_the_command_replace_the_page(neuron_run, tmp_path, capsys, monkeypatch):
    output = tmp_path / "attribution.html"
    output.write_text("an earlier page")
    code, _, err = report(capsys, monkeypatch, str(neuron_run), "-o", str(output), "--kind", "attribution",
                          "-k", "2", "--examples", "20")  # more than the run kept: its 8
    assert (code, err) == (0, "")
    assert_run_page(read_page(output), neuron_run, k=2, count=8, kind="attribution")


def test_sae_features_link_to_neuronpedia(tiny_llama, texts_file, tmp_path, capsys, monkeypatch):
    for layer in (0, 2):
        write_sae_lens_dir(tmp_path / f"sae_{layer}", 32, 64, hook_name=f"blocks.{layer}.hook_mlp_out", seed=layer,
                           neuronpedia_id=f"tiny-model/{layer}-res")
    run_dir, _ = run_tiny(tiny_llama, texts_file, tmp_path / "run", target="sae", layers="0,2",
                          sae_path=str(tmp_path / "sae_{layer}"), **EXAMPLES)
    code, _, err = report(capsys, monkeypatch, str(run_dir), "-k", "3", "--examples", "2")
    assert (code, err) == (0, "")
    page = read_page(run_dir / "report.html")
    assert_run_page(page, run_dir, k=3, count=2)
    for (layer, feature, _), entry in page.features.items():
        assert entry["url"] == f"{NEURONPEDIA}tiny-model/{layer}-res/{feature}"


def test_a_comparison_page_lists_features_of_a_and_of_b_with_both_runs_examples(
        neuron_run, tiny_llama, tmp_path, capsys, monkeypatch):
    other_texts = tmp_path / "other.txt"  # the same words backwards: another dataset, the same vocabulary
    other_texts.write_text("\n".join(" ".join(reversed(text.split())) for text in SAMPLE_TEXTS) + "\n")
    run_b, _ = run_tiny(tiny_llama, other_texts, tmp_path / "b", **EXAMPLES)
    compare_dir, _ = compare_runs(neuron_run, run_b, tmp_path / "compare", k=3)
    code, out, err = report(capsys, monkeypatch, str(compare_dir), "-k", "3", "--examples", "2")
    assert (code, err) == (0, "") and out == f"report   {compare_dir / 'report.html'}\n"
    page = read_page(compare_dir / "report.html")
    runs = {"a": RunExamples(neuron_run), "b": RunExamples(run_b)}
    for row, layer in enumerate(runs["a"].plan.layers):
        a, b = moments(neuron_run, "grad", row), moments(run_b, "grad", row)
        t = (a["mean_abs"] - b["mean_abs"]) / np.sqrt(a["var_abs"] / a["n"] + b["var_abs"] / b["n"])
        want = {"a": list(np.argsort(-t, kind="stable")[:3]), "b": list(np.argsort(t, kind="stable")[:3])}
        for side, features in want.items():
            assert sorted(f for (lay, f, s) in page.features if lay == layer and s == side) == sorted(features)
            for feature in features:
                entry = page.features[(layer, int(feature), side)]
                assert_printed(entry["cells"]["grad_welch_t_abs"], t[feature])
                assert_printed(entry["cells"]["grad_mean_abs_a"], a["mean_abs"][feature])
                assert_printed(entry["cells"]["grad_mean_abs_b"], b["mean_abs"][feature])
                assert_printed(entry["cells"]["grad_mean_diff"], a["mean"][feature] - b["mean"][feature])
                for source, run in runs.items():
                    assert_examples(entry["examples"][source], run, layer, int(feature), "gradients", 2)


def test_a_changed_dataset_still_gives_the_page_with_its_contexts_unavailable(tiny_llama, texts_file, tmp_path,
                                                                             capsys, monkeypatch):
    texts = tmp_path / "texts.txt"
    texts.write_text(texts_file.read_text())
    run_dir, _ = run_tiny(tiny_llama, texts, tmp_path / "run", **EXAMPLES)
    texts.write_text(texts_file.read_text().replace("the", "a"))
    code, out, err = report(capsys, monkeypatch, str(run_dir), "-k", "2", "--examples", "2")
    assert code == 0 and out.startswith("report   ")
    assert err.startswith("warning: 12 of 12 contexts from") and "the dataset changed since the run" in err
    page = read_page(run_dir / "report.html")
    assert_run_page(page, run_dir, k=2, count=2)  # the statistics, and each example's row, position and score
    items = [item for entry in page.features.values() for item in entry["examples"]["run"]]
    assert items and all("unavailable" in item["class"] for item in items)


def test_a_comparison_whose_run_kept_no_examples_or_is_gone_shows_the_statistics(neuron_run, plain_runs, tmp_path,
                                                                                 capsys, monkeypatch):
    run_b = plain_runs[1]
    compare_dir, _ = compare_runs(neuron_run, run_b, tmp_path / "compare")
    code, _, err = report(capsys, monkeypatch, str(compare_dir), "-k", "2", "--examples", "1")
    assert code == 0 and err == (f"warning: examples in B: RUN_B {run_b.resolve()}: this run kept no examples; run it "
                                 "again with --top-examples K (1 to 64, e.g. 16) to keep each feature's top K tokens\n")
    page = read_page(compare_dir / "report.html")
    assert len(page.features) == 3 * 2 * 2  # layers, sides, k
    runs = RunExamples(neuron_run)
    for (layer, feature, _), entry in page.features.items():
        assert entry["cells"]["grad_welch_t_abs"] and entry["examples"]["b"] == []
        assert_examples(entry["examples"]["a"], runs, layer, feature, "gradients", 1)
        assert "--top-examples K" in entry["unavailable"]["b"]
    moved = run_b.rename(tmp_path / "moved")
    try:
        code, _, err = report(capsys, monkeypatch, str(compare_dir))
    finally:
        moved.rename(run_b)
    assert (code, err) == (0, f"warning: examples in B: RUN_B {run_b.resolve()} is gone\n")


def report(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `raygrad report ARGS`, without what earlier runs printed."""
    capsys.readouterr()
    return run_cli(["report", *args], capsys, monkeypatch)


def one_line(code: int, out: str, err: str, *words: str):
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (code, out, err)
    assert "Traceback" not in err and all(word in err for word in words), err


def test_bad_input_is_one_line_and_exit_2(neuron_run, plain_runs, tmp_path, capsys, monkeypatch):
    plain = plain_runs[0]
    one_line(*report(capsys, monkeypatch, str(plain)), "kept no examples", "--top-examples K")
    assert not (plain / "report.html").exists()
    before = tree_digest(neuron_run)
    for output, words in ((tmp_path / "missing" / "r.html", ("does not exist",)),
                          (tmp_path, ("is a directory",)),
                          (neuron_run / names.STORE_NAME / "r.html", ("inside the run's store",)),
                          (neuron_run / names.METADATA_JSON, ("name a .html file",))):
        one_line(*report(capsys, monkeypatch, str(neuron_run), "-o", str(output)), f"-o {output}",
                 *words)
    for option, words in ((["--examples", "0"], ("--examples 0",)), (["-k", "0"], ("-k 0",)),
                          (["--context", "-1"], ("--context -1",)), (["--by", "nonsense"], ("--by nonsense",)),
                          (["--kind", "values"], ("--kind values", "--aggregate-by values"))):
        one_line(*report(capsys, monkeypatch, str(neuron_run), *option), *words)
    assert tree_digest(neuron_run) == before  # no page, nothing changed
