"""The texts behind a run's --top-examples: each example's token, the token it predicts, and the tokens
around it, re-read from the dataset by row. A shard's rows are read whole and checked against the
fingerprint the run recorded for them, so a text that is not the one computed is never shown: a
changed or missing dataset leaves the example without its context, saying why.

`raygrad examples` prints these; `raygrad report` puts them in its page."""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import constants as names
from ..dataset.shards import read_rows
from ..dataset.text import completion_filter, token_ids
from ..errors import RaygradError, first_line
from ..plan import Plan, layer_span
from ..store import topk
from ..store.zarr_store import ResultStore

DEFAULT_CONTEXT = 8  # tokens shown before and after an example's token


@dataclass(frozen=True)
class Example:
    rank: int  # 1 = the largest |score|
    row: int  # the text's dataset row (before filtering)
    position: int  # the token's index in its tokenized text (BOS included where the tokenizer adds it)
    score: float  # the signed gradient, attribution or value at that token
    token: str | None = None  # None: the context is unavailable (`unavailable` says why)
    next_token: str | None = None  # the token it predicts (position + 1)
    context_before: str | None = None
    context_after: str | None = None
    unavailable: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RunExamples:
    """One run's example tables and the means to show them: opened once, read per (layer, feature)."""

    def __init__(self, run_dir: str | Path, option: str = "RUN_DIR"):
        self.run_dir, self.option = Path(run_dir), option  # the argument naming it (RUN_DIR, RUN_A, RUN_B)
        store_path = self.run_dir / names.STORE_NAME
        if not store_path.is_dir():
            raise RaygradError(f"{option} {run_dir}: not a raygrad run directory (no {names.STORE_NAME})")
        self.store = ResultStore.open(store_path)
        attrs = self.store.attrs
        if names.ATTR_CONFIG not in attrs:  # a comparison keeps run A's plan, but no examples of its own
            compared = attrs.get(names.ATTR_COMPARE) or {}
            runs = (f": raygrad examples {compared['run_a']} (A) or {compared['run_b']} (B)"
                    if {"run_a", "run_b"} <= set(compared) else "")
            raise RaygradError(f"{option} {run_dir}: a comparison (raygrad compare), not a run; the examples are "
                               f"kept by the runs it compares{runs}")
        self.plan = Plan.from_dict(attrs[names.ATTR_PLAN])
        self.kinds = [names.kind_of(prefix) for prefix in self.store.example_prefixes()]
        self.k = self.store.array(topk.array_names(self.store.example_prefixes()[0])[0]).shape[-1] \
            if self.kinds else 0
        self._tokenizer = None
        self._texts: dict[int, tuple] = {}  # shard -> _read_shard's answer
        self._row_starts = [shard.row_start for shard in self.plan.shards]  # ascending: bisected per example

    def unfinished(self) -> str | None:
        """A note when the run is not complete (its tables hold the examples of its finished shards only);
        None when it is."""
        if self.store.attrs.get(names.ATTR_STATUS) == names.STATUS_COMPLETE:
            return None
        done = self.store.shards_done()
        shards = f"{int(done.sum())} of {len(done)} shards done"
        return (f"{self.option} {self.run_dir}: the run is not complete ({shards}); these are the top examples of "
                f"its finished shards only, not of the whole dataset (finish it with raygrad run --resume "
                f"{self.run_dir})")

    @property
    def has_examples(self) -> bool:
        return bool(self.kinds)

    def require_examples(self) -> None:
        if not self.kinds:
            raise RaygradError(f"{self.option} {self.run_dir}: this run kept no examples; run it again with "
                               f"--top-examples K (1 to {names.MAX_TOP_EXAMPLES}, e.g. 16) to keep each feature's "
                               "top K tokens")

    def layer_row(self, layer: int) -> int:
        if layer not in self.plan.layers:
            raise RaygradError(f"--layer {layer}: the run has layers {layer_span(self.plan.layers)}")
        return self.plan.layers.index(layer)

    def check_feature(self, feature: int) -> None:
        what = "features" if self.plan.target == "sae" else "dimensions"
        if not 0 <= feature < self.plan.width:
            raise RaygradError(f"--feature {feature}: the run's layers have {self.plan.width} {what} "
                               f"(0-{self.plan.width - 1})")

    def check_kind(self, by: str, option: str = "--by") -> str:
        if by not in self.kinds:
            raise RaygradError(f"{option} {by}: this run kept examples of {', '.join(self.kinds)}; for {by}, run it "
                               f"again with --aggregate-by {by} --top-examples K")
        return names.KIND_PREFIX[by]

    def table(self, layer: int, feature: int, by: str = "gradients", k: int | None = None
              ) -> list[tuple[float, int, int]]:
        """(score, row, position) of the feature's best examples, best first (empty slots left out)."""
        self.require_examples()
        row_index = self.layer_row(layer)
        self.check_feature(feature)
        prefix = self.check_kind(by)
        if k is not None and not 1 <= k <= self.k:
            raise RaygradError(f"--k {k}: must be from 1 to {self.k}, the examples the run kept per feature")
        score, row, position = (np.asarray(self.store.array(name)[row_index, feature, :k])
                                for name in topk.array_names(prefix))
        return [(float(s), int(r), int(p)) for s, r, p in zip(score, row, position) if r != topk.EMPTY]

    def examples(self, layer: int, feature: int, by: str = "gradients", k: int | None = None,
                 context: int = DEFAULT_CONTEXT, strict: bool = True) -> list[Example]:
        """The best examples with their tokens. `strict`: a text that cannot be shown (the dataset changed
        or is gone) is one RaygradError naming its row; else that example says why it has no context."""
        if context < 0:
            raise RaygradError(f"--context {context}: must be an integer >= 0 (tokens before and after)")
        found = []
        for rank, (score, row, position) in enumerate(self.table(layer, feature, by, k), start=1):
            text, reason = self._text(row)
            if text is None:
                if strict:
                    raise RaygradError(f"row {row}: {reason}")
                found.append(Example(rank, row, position, score, unavailable=reason))
                continue
            found.append(self._with_context(rank, row, position, score, text, context, strict))
        return found

    def _with_context(self, rank, row, position, score, text, context, strict) -> Example:
        ((ids,), _) = token_ids(self.tokenizer, [text], self.plan.max_length)  # as the worker tokenized it
        if position + 1 >= len(ids):  # the tokenizer no longer gives the run's tokens
            reason = (f"its text has {len(ids)} tokens now, but the run took position {position}: the model's "
                      "tokenizer changed since the run")
            if strict:
                raise RaygradError(f"row {row}: {reason}")
            return Example(rank, row, position, score, unavailable=reason)
        decode = self.tokenizer.decode
        return Example(rank, row, position, score, token=decode(ids[position:position + 1]),
                       next_token=decode(ids[position + 1:position + 2]),
                       context_before=decode(ids[max(0, position - context):position]),
                       context_after=decode(ids[position + 1:position + 1 + context]))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from ..model.loading import load_tokenizer
            from ..model.pins import model_commit

            self._tokenizer = load_tokenizer(self.plan.model, self.plan.model_path, model_commit(self.plan))
        return self._tokenizer

    def _text(self, row: int) -> tuple[str | None, str | None]:
        """(the text of a dataset row as the run computed it, None), or (None, why it cannot be shown)."""
        shards = self.plan.shards
        index = bisect.bisect_right(self._row_starts, row) - 1
        if index < 0 or row >= shards[index].row_stop:
            return None, "not in the run's shards"
        if index not in self._texts:
            self._texts[index] = self._read_shard(index)
        texts, reason = self._texts[index]
        if texts is not None and row not in texts:
            return None, "not a text the run computed"
        return (texts[row], None) if texts is not None else (None, reason)

    def _read_shard(self, index: int) -> tuple[dict[int, str] | None, str | None]:
        """({row: text} of a shard, None) if its rows still hold what the run computed, else (None, why)."""
        shard = self.plan.shards[index]
        try:
            paired = self.plan.source.get("completion_column") is not None  # the rows the run kept
            texts, rows, fingerprint = read_rows(self.plan.source, shard, keeps=completion_filter(
                self.tokenizer, self.plan.max_length) if paired else None)
        except (OSError, RaygradError, ValueError) as err:
            return None, f"the dataset cannot be read ({first_line(err)})"
        if fingerprint != shard.fingerprint:
            return None, (f"the dataset changed since the run: its {shard.rows_text()} no longer hold the texts "
                          "the run computed")
        return dict(zip(rows, texts)), None


def format_examples(found: list[Example], layer: int, feature: int, by: str) -> str:
    """One line per example: rank, score, row:position, then the text with the token in [brackets] and the
    token it predicts after an arrow."""
    lines = [f"layer {layer} feature {feature}: top {len(found)} tokens by |{by}|"]
    for example in found:
        where = f"{example.rank:>3}  {example.score:+.6g}  row {example.row}:{example.position}"
        if example.unavailable:
            lines.append(f"{where}  (context unavailable: {example.unavailable})")
        else:
            lines.append(f"{where}  {_visible(example.context_before)}[{_visible(example.token)}]"
                         f"{_visible(example.context_after)}  -> {_visible(example.next_token)!r}")
    if not found:
        lines.append("  (no token has a nonzero score)")
    return "\n".join(lines)


def _visible(text: str) -> str:
    """Newlines and tabs as escapes, so an example stays on one line (the command escapes every other
    control character as it prints: cli.printable)."""
    return text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
