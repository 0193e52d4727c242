"""Shards as references: the driver plans them in one streaming pass over the source
(rows, usable texts, estimated tokens, a fingerprint), holding no texts; a worker
reads its shard's rows, filters them the same way and checks the fingerprint.

A shard covers the rows [row_start, row_stop) of the source (skipped rows included)
and, in a line format, the bytes [byte_start, byte_stop) that hold them.

A prompt/completion source's rows are Pairs; one is usable when its completion has text and keeps at
least one target under --max-length, which takes the tokenizer: the planning pass and every read of a
shard are given the same filter (`completion_filter`), so they keep the same rows.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from ..errors import RaygradError
from . import formats
from .formats import describe_source
from .text import (
    SKIP_COMPLETION_CUT,
    SKIP_NO_COMPLETION,
    SKIP_NOT_TEXT,
    SKIP_SHORT,
    SKIP_UNREADABLE,
    Pair,
    as_text,
    completion_filter,
)

RATIO_SAMPLE_TEXTS = 500  # usable texts tokenized to learn the source's tokens per character
RATIO_SAMPLE_CHARS = 16  # of each sampled text, at most this many characters per --max-length token


@dataclass(frozen=True)
class Shard:
    row_start: int
    row_stop: int  # exclusive
    texts: int  # usable texts in the rows
    est_tokens: int  # estimated target tokens (characters x the tokenizer's tokens per character)
    fingerprint: str  # digest of the usable texts and their rows (Fingerprint)
    byte_start: int | None = None  # line formats: where the rows start in the file
    byte_stop: int | None = None

    @classmethod
    def from_dict(cls, data) -> "Shard":
        """From the plan as saved; an older raygrad saved [start, stop) ranges of its texts."""
        if isinstance(data, (list, tuple)):
            return cls(data[0], data[1], data[1] - data[0], 0, "")
        return cls(**data)

    def rows_text(self) -> str:
        return f"rows {self.row_start}-{self.row_stop - 1}"


@dataclass(frozen=True)
class Layout:
    """What the planning pass found."""
    shards: list[Shard]
    samples: int  # usable texts
    skipped: dict[str, int]  # text.SKIP_* / REPLACED_BYTES -> rows
    tokens_per_char: float


class Fingerprint:
    """A short digest of (row, text) pairs in order: a shard's, so a worker can tell that the dataset changed."""

    def __init__(self):
        self._hash = hashlib.blake2b(digest_size=8)

    def add(self, row: int, text: "str | Pair") -> None:
        # row, then each part's length before it: no two lists hash alike by concatenation
        self._hash.update(row.to_bytes(8, "little"))
        for part in text if isinstance(text, Pair) else (text,):  # a Pair: its prompt, then its completion
            encoded = part.encode("utf-8", "surrogatepass")
            self._hash.update(len(encoded).to_bytes(8, "little"))
            self._hash.update(encoded)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def unusable(value, min_chars: int) -> str | None:
    """Why a row's value cannot be used (SKIP_*), or None for a usable text. A (prompt, completion) value:
    a completion missing, null or blank is SKIP_NO_COMPLETION; a prompt that is not a string (an empty
    one is fine) or a completion that is not text is SKIP_NOT_TEXT; --min-chars applies to the two together."""
    if value is formats.UNREADABLE:
        return SKIP_UNREADABLE
    if isinstance(value, tuple):
        prompt, completion = value
        if completion in (None, formats.MISSING) or isinstance(completion, str) and not completion.strip():
            return SKIP_NO_COMPLETION
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return SKIP_NOT_TEXT
        return SKIP_SHORT if len((prompt + completion).strip()) <= min_chars else None
    if not isinstance(value, str):
        return SKIP_NOT_TEXT
    if len(value.strip()) <= min_chars:
        return SKIP_SHORT
    return None


def usable_rows(source: dict, rows: Iterator, counts: Counter, keeps=None
                ) -> Iterator[tuple[object, "str | Pair | None"]]:
    """(row, its text or Pair, or None when skipped, counted in `counts`). `keeps` (a prompt/completion
    source's, text.completion_filter): pairs -> whether each keeps a completion target (else SKIP_COMPLETION_CUT)."""
    if source.get("completion_column") is not None:
        if keeps is None:
            raise ValueError("a prompt/completion source is read with its filter (text.completion_filter)")
        yield from _usable_pairs(source, iter(rows), counts, keeps)
        return
    for item in rows:
        reason = unusable(item.value, source["min_chars"])
        if reason:
            counts[reason] += 1
        yield item, None if reason else item.value


PAIR_BATCH = 256  # rows read ahead so that their pairs are tokenized in one call (one call a row: ~1,000 rows/s)


def _usable_pairs(source: dict, rows: Iterator, counts: Counter, keeps) -> Iterator[tuple[object, Pair | None]]:
    """usable_rows of a prompt/completion source, PAIR_BATCH rows at a time. What the format counted while
    reading a row (replaced bytes) is counted when that row is yielded, as its skip is: a pass that stops
    early has counted no row it did not take."""
    while True:
        batch = []  # (row, why it is skipped or None, what reading it added to counts)
        while len(batch) < PAIR_BATCH:
            before = dict(counts)
            item = next(rows, None)
            if item is None:
                break
            added = {key: value - before.get(key, 0) for key, value in counts.items() if value != before.get(key, 0)}
            for key, value in added.items():  # given back when the row is yielded
                counts[key] -= value
                if not counts[key]:
                    del counts[key]
            batch.append((item, unusable(item.value, source["min_chars"]), added))
        if not batch:
            return
        pairs = [Pair(*item.value) for item, reason, _ in batch if reason is None]
        kept = iter(keeps(pairs) if pairs else ())
        for item, reason, added in batch:
            counts.update(added)
            if reason is None and not next(kept):
                reason = SKIP_COMPLETION_CUT
            if reason:
                counts[reason] += 1
            yield item, None if reason else Pair(*item.value)


def load_texts(dataset: str, num_samples: int | None, *, text_column: str = "text", config: str | None = None,
               split: str = "train", min_chars: int = 50, skipped: Counter | None = None,
               rows: list[int] | None = None, prompt_column: str | None = None,
               completion_column: str | None = None, tokenizer=None, max_length: int | None = None) -> list:
    """Up to `num_samples` texts (None: all), in source order, read whole: for tests and
    benchmarks (a run plans shards and its workers read them, below). Fewer means the
    source ran out. With `completion_column`, Pairs, kept as a run with `tokenizer` and `max_length` keeps them.

    `skipped` (if given) counts, among the rows read, those left out (SKIP_*) and
    those kept with replaced bytes (REPLACED_BYTES). `rows` (if given) receives each
    kept text's row: its 0-based index in the source as read, before any filtering."""
    skipped = Counter() if skipped is None else skipped
    source = describe_source(dataset, text_column, config, split, min_chars, prompt_column, completion_column)
    keeps = completion_filter(tokenizer, max_length) if completion_column is not None else None
    texts = []
    rows = [] if rows is None else rows
    for item, text in usable_rows(source, formats.scan(source, skipped), skipped, keeps):
        if text is not None:
            texts.append(text)
            rows.append(item.row)
            if len(texts) == num_samples:
                break
    if not texts:
        found = f" ({skipped[SKIP_NOT_TEXT]} values of --text-column {text_column} are not text)" \
            if skipped[SKIP_NOT_TEXT] else ""
        raise RaygradError(f"--dataset {dataset}: no text longer than {min_chars} characters was found{found}")
    return texts


def read_rows(source: dict, shard: Shard, counts: Counter | None = None, keeps=None
              ) -> tuple[list, list[int], str]:
    """A shard's usable texts (or Pairs, kept by `keeps` as in usable_rows), their rows, and the
    fingerprint of what was read."""
    counts = Counter() if counts is None else counts
    texts, rows, digest = [], [], Fingerprint()
    for item, text in usable_rows(source, formats.read(source, shard, counts), counts, keeps):
        if text is not None:
            texts.append(text)
            rows.append(item.row)
            digest.add(item.row, text)
    return texts, rows, digest.hexdigest()


def check_fingerprint(index: int, shard: Shard, fingerprint: str) -> None:
    if fingerprint != shard.fingerprint:
        raise RaygradError(
            f"the dataset changed since the run was planned: shard {index}, {shard.rows_text()} differ; "
            "resuming would mix two datasets: start a new run"
        )


def target_tokens(chars: int, tokens_per_char: float, max_length: int) -> int:
    """A text's estimated target tokens: its tokens after truncation, less the first (nothing predicts it)."""
    return max(0, min(max_length, max(1, round(chars * tokens_per_char))) - 1)


def estimated_targets(text: "str | Pair", tokens_per_char: float, max_length: int) -> int:
    """A text's estimated target tokens (target_tokens); a Pair's, those of its completion only."""
    if not isinstance(text, Pair):
        return target_tokens(len(text), tokens_per_char, max_length)
    whole = min(max_length, max(1, round(len(as_text(text)) * tokens_per_char)))
    return max(0, whole - max(1, round(len(text.prompt) * tokens_per_char)))


def tokens_per_char(tokenizer, texts: list[str], max_length: int) -> float:
    """Tokens per character of `texts` (each cut to what --max-length could use), by the tokenizer alone."""
    if not texts:
        return 0.25
    cut = [as_text(text)[:RATIO_SAMPLE_CHARS * max_length] for text in texts]
    tokens = sum(len(ids) for ids in tokenizer(cut)["input_ids"])
    return tokens / max(1, sum(map(len, cut)))


def plan_shards(source: dict, num_samples: int | None, tokenizer, max_length: int, *, shard_texts: int | None = None,
                token_budget: int = 1 << 20, min_shards: int = 1) -> Layout:
    """One streaming pass: the first `num_samples` usable texts (None: all), cut into shards of
    `shard_texts` texts or, by default, of about `token_budget` estimated target tokens, smaller when
    that makes fewer than `min_shards` shards of the run's estimated size. Memory: one shard's digest
    and the first RATIO_SAMPLE_TEXTS texts (to learn the tokens per character), whatever the source's size."""
    counts = Counter()
    keeps = completion_filter(tokenizer, max_length) if source.get("completion_column") is not None else None
    stream = usable_rows(source, formats.scan(source, counts), counts, keeps)
    head, sample, ended = [], [], True
    for item, text in stream:
        if text is None and len(head) > 1 and head[-1][1] is None:
            # Of a run of skipped rows the cutter needs only the last (and of the source, its first row):
            # a source that skips millions of rows before its RATIO_SAMPLE_TEXTS-th text holds none of them.
            head[-1] = (item, None)
        else:
            head.append((item, text))
        if text is not None:
            sample.append(text)
            if len(sample) in (RATIO_SAMPLE_TEXTS, num_samples):
                ended = False
                break
    ratio = tokens_per_char(tokenizer, sample, max_length)
    exact = ended or len(sample) == num_samples  # the sample holds every text the run takes
    if shard_texts is None:
        total = _estimated_tokens(source, head, sample, ratio, max_length, num_samples, exhausted=exact)
        if total:
            token_budget = max(1, min(token_budget, math.ceil(total / max(1, min_shards))))
    cutter = _Cutter(ratio, max_length, shard_texts, token_budget)
    for item, text in _chain(head, stream):
        cutter.add(item, text)
        if text is not None and cutter.samples == num_samples:
            break
    shards = cutter.finish()
    if not cutter.samples:
        found = f" ({counts[SKIP_NOT_TEXT]} values of --text-column {source['text_column']} are not text)" \
            if counts[SKIP_NOT_TEXT] else ""
        if source.get("completion_column") is not None:
            found = f" ({_skipped_pairs(counts)})" if counts else ""
            raise RaygradError(f"--dataset {source['path']}: no row with a completion, longer than "
                               f"{source['min_chars']} characters with its prompt and with a completion token "
                               f"within --max-length {max_length}, was found{found}")
        raise RaygradError(f"--dataset {source['path']}: no text longer than {source['min_chars']} characters was "
                           f"found{found}")
    return Layout(shards, cutter.samples, dict(counts), ratio)


def _skipped_pairs(counts: Counter) -> str:
    said = {SKIP_NO_COMPLETION: "without a completion", SKIP_NOT_TEXT: "whose prompt or completion is not text",
            SKIP_SHORT: "too short", SKIP_COMPLETION_CUT: "whose prompt fills --max-length",
            SKIP_UNREADABLE: "unreadable"}
    return ", ".join(f"{count} rows {said.get(reason, reason)}" for reason, count in counts.items() if reason in said)


def _chain(head: list, stream: Iterator) -> Iterator:
    yield from head
    head.clear()  # the sample is not kept through the pass
    yield from stream


def _estimated_tokens(source, head, sample, ratio, max_length, num_samples, exhausted) -> int | None:
    """The run's target tokens, estimated from the sample: exact when the sample holds every text taken,
    else its mean per text times the texts asked for, or (--num-samples all) the rows or bytes the
    source holds by its metadata; None when unknown."""
    per_text = [estimated_targets(text, ratio, max_length) for text in sample]
    if exhausted:
        return sum(per_text)
    mean = sum(per_text) / len(per_text)
    if num_samples is not None:
        return int(mean * num_samples)
    hint = formats.size_hint(source)
    if hint is None:
        return None
    unit, size = hint
    # rows read: the last one's number + 1 (head holds one entry per run of skipped rows)
    read = head[-1][0].row + 1 if unit == "rows" else (head[-1][0].byte_stop or 0)
    return int(sum(per_text) * size / max(1, read))


class _Cutter:
    """Closes a shard where the next usable text would overflow it; its rows run to the next shard's first."""

    def __init__(self, ratio: float, max_length: int, shard_texts: int | None, token_budget: int):
        self.ratio, self.max_length, self.shard_texts, self.budget = ratio, max_length, shard_texts, token_budget
        self.shards: list[Shard] = []
        self.samples = 0
        self._open(0, 0)
        self.last = None

    def _open(self, row: int, byte: int | None) -> None:
        self.row_start, self.byte_start, self.texts, self.tokens, self.digest = row, byte, 0, 0, Fingerprint()

    def add(self, item, text: str | None) -> None:
        if self.last is None and item.byte_start is not None:
            self.byte_start = item.byte_start  # a header or blank lines come before the first row
        self.last = item
        if text is None:
            return
        tokens = estimated_targets(text, self.ratio, self.max_length)
        full = self.texts >= self.shard_texts if self.shard_texts else self.tokens + tokens > self.budget
        if self.texts and full:
            self._close(item.row, item.byte_start)
            self._open(item.row, item.byte_start)
        self.texts += 1
        self.tokens += tokens
        self.samples += 1
        self.digest.add(item.row, text)

    def _close(self, row_stop: int, byte_stop: int | None) -> None:
        self.shards.append(Shard(self.row_start, row_stop, self.texts, self.tokens, self.digest.hexdigest(),
                                 self.byte_start, byte_stop))

    def finish(self) -> list[Shard]:
        if self.texts:
            self._close(self.last.row + 1, self.last.byte_stop)
        return self.shards
