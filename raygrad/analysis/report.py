"""`raygrad report RUN [-o FILE.html]`: one static HTML page that opens from disk (no network, no
script; CSS inline, figures as PNG data URIs, the system's fonts). Per layer: a histogram of the ranking
statistic over the layer's features, the top features with their statistics and Neuronpedia link, and
each feature's top contexts (analysis/examples.py) with the token highlighted by its score. For a comparison
(`raygrad compare`): per layer the features specific to A and to B, with examples from both runs.

Every text from a dataset or a tokenizer goes through html.escape."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import constants as names
from ..config import refuse_url
from ..errors import RaygradError, first_line
from ..plan import Plan, layer_span
from ..store import stats
from ..store.files import replacing
from ..store.zarr_store import ResultStore
from .ablation import ablation_files
from .examples import DEFAULT_CONTEXT, Example, RunExamples
from .plots import histogram_png
from .top import NEURONPEDIA_URL, neuronpedia_ids, ranked, row_reader

DEFAULT_K = 10  # features per layer (per side in a comparison)
DEFAULT_EXAMPLES = 5  # contexts per feature (at most the run's --top-examples K)
DEFAULT_RUN_BY = "mean_abs"
DEFAULT_COMPARE_BY = "welch_t_abs"
REPORT_NAME = "report.html"  # the default page, in RUN_DIR
SHARE = "share"  # the run page's column: a feature's mean |x| over the layer's sum of mean |x|, shown in %
SYMBOL = {"gradients": "g", "attribution": "g·z", "values": "z"}  # how the page names x of each kind
POSITIVE_RGB, NEGATIVE_RGB = "207,34,46", "9,105,218"  # the highlight's red and blue


def number(value: float) -> str:
    """The page's statistics: 4 significant digits (the test reads them back at this precision)."""
    return f"{value:.4g}"


def shown(text: str) -> str:
    """A context as one line: a newline is shown as ↵, a tab as ⇥ (the text itself is not changed)."""
    return text.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


@dataclass(frozen=True)
class Column:
    key: str  # the statistic's store name
    header: str
    tooltip: str  # what it is, with units


@dataclass
class Feature:
    rank: int  # 1 = first in its table
    index: int  # the feature (SAE) or dimension
    values: dict[str, float]  # column key -> value
    url: str | None  # its Neuronpedia page, when the SAE release names one
    examples: dict[str, list[Example] | str]  # source label -> its examples, or why there are none


@dataclass
class Table:
    side: str  # "run", or "a" / "b" in a comparison
    title: str
    features: list[Feature]


@dataclass
class Layer:
    layer: int
    summary: str
    histogram: bytes  # PNG
    tables: list[Table]


@dataclass
class Page:
    title: str
    facts: list[tuple[str, str]]  # shown under the title
    columns: list[Column]
    sources: dict[str, str]  # example source label -> its heading ("in A")
    legend: list[str]  # HTML, written here
    layers: list[Layer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # also printed by the CLI
    ablations: list[tuple[str, dict]] = field(default_factory=list)  # RUN/ablations/*.json: (file name, report)

    @property
    def links(self) -> bool:
        """Whether the tables have a Neuronpedia column (an SAE release that names its pages)."""
        return any(f.url for layer in self.layers for table in layer.tables for f in table.features)


# --- what goes in the page


def write_report(run_dir: str | Path, output: str | Path | None = None, by: str | None = None, k: int = DEFAULT_K,
                 num_examples: int = DEFAULT_EXAMPLES, kind: str = "gradients",
                 context: int = DEFAULT_CONTEXT) -> tuple[Path, list[str]]:
    """Write the page of a run or a comparison; returns (its path, notes such as unavailable contexts)."""
    refuse_url("--output", output)
    run_dir = Path(run_dir)
    if k < 1:
        raise RaygradError(f"-k {k}: must be >= 1 (features per layer)")
    if num_examples < 1:
        raise RaygradError(f"--examples {num_examples}: must be >= 1 (contexts per feature)")
    if context < 0:
        raise RaygradError(f"--context {context}: must be an integer >= 0 (tokens before and after)")
    if kind not in names.EXAMPLE_KINDS:
        raise RaygradError(f"--kind {kind}: one of {', '.join(names.EXAMPLE_KINDS)}")
    store_path = run_dir / names.STORE_NAME
    if not store_path.is_dir():
        raise RaygradError(f"RUN_DIR {run_dir}: not a raygrad run directory (no {names.STORE_NAME})")
    attrs = ResultStore.open(store_path, verify=False).attrs  # which page; the builders verify the store
    comparison = attrs.get(names.ATTR_COMPARE)
    protected = [store_path] + ([Path(comparison[side]) / names.STORE_NAME for side in ("run_a", "run_b")]
                                if comparison else [])
    output = check_output(Path(output) if output is not None else run_dir / REPORT_NAME, protected)
    options = dict(k=k, num_examples=num_examples, kind=kind, context=context)
    page = (compare_page(run_dir, by or DEFAULT_COMPARE_BY, **options) if comparison
            else run_page(run_dir, by or DEFAULT_RUN_BY, **options))
    with replacing(output) as handle:
        handle.write(render(page).encode("utf-8"))
    return output, page.notes


def check_output(output: Path, protected: list[Path]) -> Path:
    """-o: a .html file in an existing directory, outside the run's store (an existing page is replaced)."""
    if output.is_dir():
        raise RaygradError(f"-o {output}: is a directory; name the page's file, e.g. {output / REPORT_NAME}")
    if not output.parent.is_dir():
        raise RaygradError(f"-o {output}: the directory {output.parent} does not exist")
    if output.suffix.lower() not in (".html", ".htm"):
        raise RaygradError(f"-o {output}: name a .html file (the page replaces an existing file of that name)")
    for store in protected:
        if output.resolve().is_relative_to(store.resolve()):
            raise RaygradError(f"-o {output}: inside the run's store {store}; write the page elsewhere")
    return output


def run_page(run_dir: Path, by: str, k: int, num_examples: int, kind: str, context: int) -> Page:
    run = RunExamples(run_dir)
    run.require_examples()
    run.check_kind(kind, "--kind")
    prefix = names.KIND_PREFIX[kind]
    group = run.store.committed_group()
    if group.attrs.get(names.ATTR_STATUS) != names.STATUS_COMPLETE:
        raise RaygradError(f"RUN_DIR {run_dir}: the run is not complete; finish it with: raygrad run --resume "
                           f"{run_dir}")
    name, read = row_reader(group, _statistic_name(by, prefix, names.STATISTICS))
    shown_stats = [names.store_name(prefix, s) for s in ("mean", "mean_abs", "std")]
    x = SYMBOL[kind]
    columns = [] if name in shown_stats else [_column(name, group)]
    columns += [_column(shown_stats[0], group, f"mean {x}"), _column(shown_stats[1], group, f"mean |{x}|"),
                _column(shown_stats[2], group, f"std {x}"),
                Column(SHARE, f"share of Σ mean |{x}|",
                       f"the feature's mean |{x}| over the sum of mean |{x}| of the layer's {run.plan.width} "
                       "features (the store keeps sums over tokens, not how often a feature is active, so this is "
                       "not a share of tokens)")]
    page = Page(f"raygrad report: {run_dir.name}", _run_facts(run_dir, run.plan, group, kind, run.k), columns,
                {"run": ""}, _legend(kind, name, "largest |value| first", k, min(num_examples, run.k), run.k))
    layers = [int(layer) for layer in group[names.LAYERS][:]]
    tokens = group[names.TOKENS][:]
    urls = neuronpedia_ids(group, name, len(layers))
    for row, layer in enumerate(layers):
        values = read(row)  # the ranking statistic over the layer's features
        sums = [group[array][row] for array in names.sum_names(prefix)]
        derived = {key: stats.derive(statistic, *sums, tokens[row])
                   for key, statistic in zip(shown_stats, ("mean", "mean_abs", "std"))}
        total_abs = derived[shown_stats[1]].sum()
        derived[SHARE] = derived[shown_stats[1]] / total_abs if total_abs > 0 else np.zeros_like(values)
        derived[name] = values
        chosen = ranked(values, k, "magnitude")
        features = [Feature(rank, int(index), {c.key: float(derived[c.key][index]) for c in columns},
                            _url(urls[row], index),
                            {"run": _examples(run, layer, int(index), kind, num_examples, context)})
                    for rank, index in enumerate(chosen, start=1)]
        page.layers.append(Layer(layer, f"{int(tokens[row]):,} tokens, {values.size:,} features",
                                 histogram_png(values, f"layer {layer}: {name} over features", name, values[chosen]),
                                 [Table("run", f"top {len(chosen)} by |{name}|", features)]))
    page.notes = _unavailable_notes(page, {"run": str(run_dir)})
    page.ablations = [(path.name, json.loads(path.read_text())) for path in ablation_files(run_dir)]
    return page


def compare_page(compare_dir: Path, by: str, k: int, num_examples: int, kind: str, context: int) -> Page:
    from .results import open_results

    group = open_results(compare_dir)
    info = group.attrs[names.ATTR_COMPARE]
    prefix = names.KIND_PREFIX[kind]
    compared_kinds = [names.kind_of(p) for p in names.MEAN_ARRAYS if names.store_name(p, "welch_t") in group]
    if kind not in compared_kinds:
        raise RaygradError(f"--kind {kind}: the compared runs collected {', '.join(compared_kinds)}")
    name, read = row_reader(group, _statistic_name(by, prefix, names.COMPARE_STATISTICS))
    shown_stats = [names.store_name(prefix, s) for s in ("mean_abs_a", "mean_abs_b", "mean_diff", "mean_abs_ratio")]
    x = SYMBOL[kind]
    headers = [f"mean |{x}| in A", f"mean |{x}| in B", f"mean {x}: A − B", f"mean |{x}| ratio A/B"]
    columns = ([] if name in shown_stats else [_column(name, group)])
    columns += [_column(key, group, header) for key, header in zip(shown_stats, headers)]
    runs = {side: _open_side(side, Path(info[f"run_{side}"]), kind) for side in ("a", "b")}
    kept = [run.k for run in runs.values() if isinstance(run, RunExamples)]
    plan = Plan.from_dict(group.attrs[names.ATTR_PLAN])
    page = Page(f"raygrad report: {compare_dir.name}", _compare_facts(compare_dir, info, plan, group, kind), columns,
                {"a": "in A", "b": "in B"},
                _legend(kind, name, "A: largest first; B: smallest first", k,
                        min([num_examples, *kept]) if kept else num_examples, max(kept, default=0)))
    layers = [int(layer) for layer in group[names.LAYERS][:]]
    tokens_a, tokens_b = group[names.TOKENS_A][:], group[names.TOKENS_B][:]
    urls = neuronpedia_ids(group, name, len(layers))
    for row, layer in enumerate(layers):
        values = {column.key: group[column.key][row].astype(np.float64) for column in columns if column.key != name}
        values[name] = read(row)
        tables = []
        for side, order, words in (("a", "largest", "specific to A: largest"), ("b", "smallest",
                                                                                  "specific to B: smallest")):
            chosen = ranked(values[name], k, order)
            features = [Feature(rank, int(index), {c.key: float(values[c.key][index]) for c in columns},
                                _url(urls[row], index),
                                {label: _examples(run, layer, int(index), kind, num_examples, context)
                                 for label, run in runs.items()})
                        for rank, index in enumerate(chosen, start=1)]
            tables.append(Table(side, f"{words} {name}", features))
        marked = np.concatenate([values[name][[f.index for f in t.features]] for t in tables])
        page.layers.append(Layer(layer, f"{int(tokens_a[row]):,} tokens in A, {int(tokens_b[row]):,} in B, "
                                        f"{values[name].size:,} features",
                                 histogram_png(values[name], f"layer {layer}: {name} over features", name, marked),
                                 tables))
    unavailable = [f"examples in {side.upper()}: {run}" for side, run in runs.items() if isinstance(run, str)]
    page.notes = unavailable + _unavailable_notes(page, {side: info[f"run_{side}"] for side in runs})
    return page


def _statistic_name(by: str, prefix: str, statistics: tuple[str, ...]) -> str:
    """A bare statistic ('mean_abs', 'welch_t_abs') is the chosen kind's; any other spelling is top.py's."""
    return names.store_name(prefix, by) if by in statistics else by


def _column(key: str, group, header: str | None = None) -> Column:
    """A statistic's column; its tooltip is the array's description and units (just its name in a store
    written before arrays carried them)."""
    attrs = dict(group[key].attrs) if key in group else {}
    units = f" [{attrs['units']}]" if attrs.get("units") else ""
    return Column(key, header or key, attrs.get("description", key) + units)


def _url(neuronpedia_id: str | None, index) -> str | None:
    return NEURONPEDIA_URL.format(model_and_sae=neuronpedia_id, feature=int(index)) if neuronpedia_id else None


def _open_side(side: str, path: Path, kind: str) -> RunExamples | str:
    """One compared run's examples, or why the page shows none of them (it still shows the statistics)."""
    label = f"RUN_{side.upper()}"
    if not (path / names.STORE_NAME).is_dir():
        return f"{label} {path} is gone"
    try:
        run = RunExamples(path, option=label)
        run.require_examples()
        run.check_kind(kind, "--kind")
    except RaygradError as err:  # a page of statistics is still worth writing; the reason is shown
        return first_line(err)
    return run


def _examples(run: RunExamples | str, layer: int, feature: int, kind: str, num_examples: int,
              context: int) -> list[Example] | str:
    if isinstance(run, str):
        return run
    return run.examples(layer, feature, kind, min(num_examples, run.k), context, strict=False)


def _unavailable_notes(page: Page, where: dict[str, str]) -> list[str]:
    """One line per source whose contexts could not be shown (a changed or missing dataset)."""
    notes = []
    for label, path in where.items():
        found = [example for layer in page.layers for table in layer.tables for feature in table.features
                 if isinstance(feature.examples.get(label), list) for example in feature.examples[label]]
        missing = [example for example in found if example.unavailable]
        if missing:
            notes.append(f"{len(missing)} of {len(found)} contexts from {path} unavailable: "
                         f"{missing[0].unavailable}")
    return notes


def _run_facts(run_dir: Path, plan: Plan, group, kind: str, k: int) -> list[tuple[str, str]]:
    config = group.attrs.get(names.ATTR_CONFIG, {})
    facts = [("run", str(run_dir.resolve())), ("model", f"{plan.model} ({plan.family}, {plan.dtype})"),
             ("target", _target(plan)), ("dataset", f"{config.get('dataset', '?')}: {plan.samples} texts, "
                                                    f"up to {plan.max_length} tokens each"),
             ("examples", f"top {k} tokens per feature by |{kind}| (--top-examples {k})")]
    return facts + [("raygrad", _versions(group))]


def _compare_facts(compare_dir: Path, info: dict, plan: Plan, group, kind: str) -> list[tuple[str, str]]:
    return [("comparison", str(compare_dir.resolve())), ("run A", info["run_a"]), ("run B", info["run_b"]),
            ("model", f"{plan.model} ({plan.family}, {plan.dtype})"), ("target", _target(plan)),
            ("kind", kind), ("raygrad", _versions(group))]


def _versions(group) -> str:
    """The raygrad that wrote the store, and this one (which wrote the page) where they differ."""
    stored = group.attrs.get(names.ATTR_VERSION, "?")
    return stored if stored == names.VERSION else f"{stored} (this page: {names.VERSION})"


def _target(plan: Plan) -> str:
    layers = f"layers {layer_span(plan.layers, ', ')}"
    if plan.target == "sae":
        source = plan.sae_source or {}
        sae = source.get("release") and f"{source['release']} {source.get('sae_id', '')}" or source.get("path")
        return f"SAE features ({plan.width:,} per layer, {sae}) at {plan.hook_site}; {layers}"
    return f"{plan.hook_site} ({plan.width:,} dimensions); {layers}"


def _legend(kind: str, name: str, order: str, k: int, num_examples: int, kept: int) -> list[str]:
    x = SYMBOL[kind]
    unit, what = stats.UNITS[names.KIND_PREFIX[kind]]
    return [
        f"{html.escape(x)} = {html.escape(what)} [{html.escape(unit)}]. Statistics are over a layer's aggregated "
        "tokens (positions); std is the sample standard deviation (ddof 1).",
        f"Each table lists {k} features ranked by <code>{html.escape(name)}</code> ({html.escape(order)}); the "
        "histogram shows it over all the layer's features (log counts), the listed ones ticked in red under it.",
        f"Contexts: up to {num_examples} of the {kept} tokens kept per feature (--top-examples), best |score| first, "
        f"re-read from the dataset. The token is <mark style=\"background:rgba({POSITIVE_RGB},0.6)\">red</mark> "
        f"for a positive score and <mark style=\"background:rgba({NEGATIVE_RGB},0.6)\">blue</mark> for a negative "
        "one, its opacity |score| / the feature's largest |score|; row r:p is the text's dataset row and the token's "
        "position in it; → the token it predicts; ↵ a newline.",
    ]


# --- the page


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1f2328;
 max-width:1240px;margin:20px auto;padding:0 16px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:18px;margin:26px 0 6px;border-bottom:1px solid #d0d7de;
 padding-bottom:3px}h3{font-size:14px;margin:10px 0 4px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:1px 14px;margin:6px 0 10px}dt{color:#59636e}dd{margin:0}
.legend,.notice{border:1px solid #d0d7de;border-radius:6px;padding:6px 12px;font-size:13px;margin:8px 0}
.legend{background:#f6f8fa}.notice{background:#fff8c5;border-color:#d4a72c}.legend p{margin:3px 0}
nav{margin:8px 0;font-size:13px}nav a{margin-right:9px}
.summary{color:#59636e;font-size:13px;margin:2px 0 4px}img.histogram{display:block;max-width:600px;width:100%}
table{border-collapse:collapse;font-size:13px;margin-bottom:6px;min-width:720px}
th,td{padding:2px 8px;text-align:right;border-bottom:1px solid #eaeef2;white-space:nowrap}
th{background:#f6f8fa;cursor:help}tr.stats td{border-top:1px solid #d0d7de;font-variant-numeric:tabular-nums}
td.examples{text-align:left;white-space:normal;padding:1px 8px 6px 28px}
table.ablations th{white-space:normal}table.ablations td:first-child{white-space:normal;overflow-wrap:anywhere}
.sources{display:grid;grid-template-columns:repeat(var(--sources),minmax(0,1fr));gap:14px}
ol{margin:0;padding:0;list-style:none;font:12px/1.5 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
li{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.score{display:inline-block;min-width:7.5em;text-align:right;color:#59636e}
.where{display:inline-block;min-width:7.5em;padding-left:8px;color:#59636e}.ctx{white-space:pre}
mark{color:inherit;border-radius:3px;padding:0 1px}.next{color:#59636e}.unavailable{color:#9a6700}
.label{font:12px system-ui,sans-serif;color:#59636e}
"""


def render(page: Page) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{_text(page.title)}</title>", f"<style>{STYLE}</style></head><body>",
             f"<h1>{_text(page.title)}</h1>", "<dl>"]
    parts += [f"<dt>{_text(key)}</dt><dd>{_text(value)}</dd>" for key, value in page.facts]
    parts.append("</dl>")
    parts += [f'<div class="notice">{_text(note)}</div>' for note in page.notes]
    parts.append('<div class="legend">' + "".join(f"<p>{line}</p>" for line in page.legend) + "</div>")
    if page.ablations:
        parts.append(_ablations_html(page.ablations))
    parts.append("<nav>layers: " + " ".join(f'<a href="#layer-{layer.layer}">{layer.layer}</a>'
                                            for layer in page.layers) + "</nav>")
    for layer in page.layers:
        parts.append(_layer_html(layer, page))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _ablations_html(ablations: list[tuple[str, dict]]) -> str:
    """raygrad ablate's results beside the ranking: per file, the joint ablation (nats per target token)."""
    def shown_number(value) -> str:
        return "n/a" if value is None else f"{value:+.6f}"

    parts = ['<section id="ablations"><h2>Ablations (raygrad ablate)</h2><table class="ablations"><thead><tr>',
             "".join(f"<th>{_text(h)}</th>" for h in ("file", "mode", "features", "target tokens", "loss", "ablated",
                                                      "delta", "95% interval (paired over texts)", "predicted",
                                                      "pearson (each alone)")), "</tr></thead>"]
    for name, result in ablations:
        listed = ", ".join(f"{e['layer']}:{e['feature']}" for e in result["features"])
        low, high = result["delta_ci95"]
        cells = (name, result["mode"], listed, f"{result['tokens']:,}", f"{result['loss']:.6f}",
                 f"{result['loss_ablated']:.6f}", shown_number(result["delta"]),
                 f"[{shown_number(low)}, {shown_number(high)}]", shown_number(result["predicted_delta"]),
                 shown_number(result["pearson"]))
        parts.append("<tr>" + "".join(f"<td>{_text(cell)}</td>" for cell in cells) + "</tr>")
    return "\n".join(parts) + "</table></section>"


def _layer_html(layer: Layer, page: Page) -> str:
    image = base64.b64encode(layer.histogram).decode("ascii")
    parts = [f'<section id="layer-{layer.layer}"><h2>Layer {layer.layer}</h2>',
             f'<p class="summary">{_text(layer.summary)}</p>',
             f'<img class="histogram" alt="histogram of layer {layer.layer}" src="data:image/png;base64,{image}">']
    for table in layer.tables:
        parts.append(f"<h3>{_text(table.title)}</h3><table><thead><tr><th>rank</th><th>feature</th>")
        parts += [f'<th title="{_attr(c.tooltip)}">{_text(c.header)}</th>' for c in page.columns]
        if page.links:
            parts.append('<th title="the feature\'s page on Neuronpedia">Neuronpedia</th>')
        parts.append("</tr></thead>")
        for feature in table.features:
            parts.append(_feature_html(feature, layer.layer, table.side, page))
        parts.append("</table>")
    return "\n".join(parts) + "</section>"


def _feature_html(feature: Feature, layer: int, side: str, page: Page) -> str:
    cells = "".join(f'<td class="{_attr(c.key)}">{_cell(c.key, feature.values[c.key])}</td>' for c in page.columns)
    link = f'<td class="url"><a href="{_attr(feature.url)}">{feature.index}</a></td>' if page.links else ""
    sources = "".join(_examples_html(label, heading, feature.examples[label])
                      for label, heading in page.sources.items())
    return (f'<tbody class="feature" data-layer="{layer}" data-feature="{feature.index}" data-side="{side}">'
            f'<tr class="stats"><td class="rank">{feature.rank}</td><td class="index">{feature.index}</td>{cells}'
            f'{link}</tr>'
            f'<tr><td class="examples" colspan="{len(page.columns) + 2 + page.links}">'
            f'<div class="sources" style="--sources:{len(page.sources)}">{sources}</div></td></tr></tbody>')


def _examples_html(label: str, heading: str, examples: list[Example] | str) -> str:
    head = f'<div class="label">{_text(heading)}</div>' if heading else ""
    if isinstance(examples, str):
        return f'<div data-source="{label}">{head}<p class="unavailable">examples unavailable: {_text(examples)}</p>' \
               "</div>"
    if not examples:
        return f'<div data-source="{label}">{head}<p class="label">no token has a nonzero score</p></div>'
    largest = max(abs(example.score) for example in examples) or 1.0
    items = []
    for example in examples:
        data = (f'data-source="{label}" data-row="{example.row}" data-position="{example.position}" '
                f'data-score="{example.score!r}"')
        where = (f'<span class="score">{example.score:+.4g}</span>'
                 f'<span class="where">row {example.row}:{example.position}</span> ')
        if example.unavailable:
            items.append(f'<li class="example unavailable" {data}>{where}context unavailable: '
                         f"{_text(example.unavailable)}</li>")
            continue
        rgb = POSITIVE_RGB if example.score > 0 else NEGATIVE_RGB
        opacity = abs(example.score) / largest
        items.append(f'<li class="example" {data} data-token="{_attr(example.token)}" title="{_attr(example.token)}'
                     f' → {_attr(example.next_token)}">{where}<span class="ctx">{_text(shown(example.context_before))}'
                     f'<mark style="background:rgba({rgb},{opacity:.2f});outline:1px solid rgb({rgb})">'
                     f"{_text(shown(example.token))}</mark>{_text(shown(example.context_after))}</span>"
                     f' <span class="next">→ {_text(shown(example.next_token))}</span></li>')
    return f'<div data-source="{label}">{head}<ol>{"".join(items)}</ol></div>'


def _cell(key: str, value: float) -> str:
    return f"{number(100 * value)} %" if key == SHARE else number(value)


def _text(value: str) -> str:
    return html.escape(value, quote=False)


def _attr(value: str) -> str:
    return html.escape(value, quote=True)
