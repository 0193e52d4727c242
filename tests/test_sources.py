"""Each format planned in one pass and read by shard: every usable text exactly once, in the
order a whole read gives, with its dataset row (skipped, short, null rows, multi-line CSV records
and undecodable bytes included)."""

import json
from collections import Counter

import pytest

from raygrad.dataset.formats import describe_source
from raygrad.dataset.shards import load_texts, plan_shards, read_rows, target_tokens
from raygrad.dataset.text import REPLACED_BYTES, SKIP_NOT_TEXT, SKIP_SHORT, stdlib_paragraphs
from raygrad.errors import RaygradError

LONG = [f"Text number {i}: a sentence long enough to pass the length filter of fifty characters." for i in range(9)]
MAX_LENGTH = 24


class CharTokenizer:
    """One token per 4 characters, plus BOS: the planner needs the tokenizer alone."""

    def __call__(self, texts):
        return {"input_ids": [[0] * (1 + len(text) // 4) for text in texts]}


def rows_of(values):
    """(row, text) of each usable value, as the filter decides (min_chars 50)."""
    return [(row, value) for row, value in enumerate(values) if isinstance(value, str) and len(value.strip()) > 50]


def write_txt(path):
    lines = [LONG[0].encode(), b"", b"too short", LONG[1].encode(),
             "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9: a line written in Latin-1, long enough.".encode(
                 "latin-1"),
             LONG[2].encode() + b"\r", LONG[3].encode(), b"   ", LONG[4].encode(), LONG[5].encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return [line.rstrip(b"\r").decode("utf-8", errors="replace") for line in lines]


def write_jsonl(path):
    records = [{"text": LONG[0]}, {"text": None}, {"text": LONG[1]}, {"other": "no text key"}, {"text": 12345},
               [LONG[2]], {"text": "short"}, {"text": LONG[3]}, {"text": LONG[4]}, {"text": LONG[5] + "\n" + LONG[6]}]
    lines = [json.dumps(record) for record in records]
    lines.insert(3, "")  # a blank line is not a row
    path.write_text("\n".join(lines) + "\n")
    return [r.get("text") if isinstance(r, dict) else None for r in records]


def write_csv(path):
    import pandas as pd

    values = [LONG[0], "short", LONG[1] + '\nwith a second line, "quoted", and a comma', None, LONG[2],
              'He said "' + LONG[3] + '"\n\nthen two newlines', LONG[4], "12345", LONG[5]]
    pd.DataFrame({"id": range(len(values)), "text": values}).to_csv(path, index=False)
    return [None if v is None or v == "12345" else v for v in values]


def write_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = [LONG[0], None, "short", LONG[1], LONG[2], None, LONG[3], LONG[4], "x", LONG[5], LONG[6], LONG[7]]
    pq.write_table(pa.table({"text": values}), path, row_group_size=3)
    return values


WRITERS = {".txt": write_txt, ".jsonl": write_jsonl, ".csv": write_csv, ".parquet": write_parquet}


def read_all_shards(source, layout):
    texts, rows = [], []
    for shard in layout.shards:
        got, got_rows, fingerprint = read_rows(source, shard)
        assert fingerprint == shard.fingerprint and len(got) == shard.texts
        texts += got
        rows += got_rows
    return texts, rows


def assert_contiguous(layout, samples):
    assert layout.shards[0].row_start == 0
    for before, after in zip(layout.shards, layout.shards[1:]):
        assert before.row_stop == after.row_start
        if before.byte_stop is not None:
            assert before.byte_stop == after.byte_start
    assert sum(shard.texts for shard in layout.shards) == layout.samples == samples


@pytest.mark.parametrize("suffix", list(WRITERS))
@pytest.mark.parametrize("shard_texts", [1, 2, 3, None])
def test_every_usable_text_once_in_order_with_its_row(suffix, shard_texts, tmp_path):
    path = tmp_path / f"data{suffix}"
    expected = rows_of(WRITERS[suffix](path))
    source = describe_source(str(path))
    layout = plan_shards(source, None, CharTokenizer(), MAX_LENGTH, shard_texts=shard_texts, token_budget=40)
    assert_contiguous(layout, len(expected))
    texts, rows = read_all_shards(source, layout)
    whole_rows = []
    assert texts == load_texts(str(path), None, rows=whole_rows) == [text for _, text in expected]
    assert rows == whole_rows == [row for row, _ in expected]
    if shard_texts:
        assert all(shard.texts == shard_texts for shard in layout.shards[:-1])
    else:  # a token budget: full shards, none over it unless one text is
        assert all(shard.est_tokens <= 40 or shard.texts == 1 for shard in layout.shards)


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_num_samples_takes_the_first_usable_texts(suffix, tmp_path):
    path = tmp_path / f"data{suffix}"
    expected = rows_of(WRITERS[suffix](path))[:3]
    source = describe_source(str(path))
    layout = plan_shards(source, 3, CharTokenizer(), MAX_LENGTH, shard_texts=2)
    assert_contiguous(layout, 3)
    assert layout.shards[-1].row_stop == expected[-1][0] + 1  # the pass stops at the third text
    texts, rows = read_all_shards(source, layout)
    assert list(zip(rows, texts)) == expected


def test_skipped_rows_are_counted_as_a_whole_read_counts_them(tmp_path):
    path = tmp_path / "data.txt"
    write_txt(path)
    whole = Counter()
    load_texts(str(path), None, skipped=whole)
    layout = plan_shards(describe_source(str(path)), None, CharTokenizer(), MAX_LENGTH, shard_texts=2)
    assert layout.skipped == dict(whole) == {SKIP_SHORT: 3, REPLACED_BYTES: 1}
    texts, _ = read_all_shards(describe_source(str(path)), layout)
    assert "\ufffd" in texts[2]


def test_jsonl_counts_nulls_missing_keys_and_other_types_as_not_text(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path)
    layout = plan_shards(describe_source(str(path)), None, CharTokenizer(), MAX_LENGTH)
    assert layout.skipped == {SKIP_NOT_TEXT: 4, SKIP_SHORT: 1}


def test_token_estimates_and_the_minimum_shard_count(tmp_path):
    path = tmp_path / "data.parquet"
    expected = rows_of(write_parquet(path))
    source = describe_source(str(path))
    one = plan_shards(source, None, CharTokenizer(), MAX_LENGTH, token_budget=1 << 20)
    ratio = one.tokens_per_char
    assert len(one.shards) == 1
    assert one.shards[0].est_tokens == sum(target_tokens(len(t), ratio, MAX_LENGTH) for _, t in expected)
    spread = plan_shards(source, None, CharTokenizer(), MAX_LENGTH, token_budget=1 << 20, min_shards=4)
    assert len(spread.shards) >= 4
    assert read_all_shards(source, spread) == read_all_shards(source, one)


def test_bundled_corpus_by_shard(tmp_path):
    source = describe_source("stdlib-docs")
    layout = plan_shards(source, 30, CharTokenizer(), MAX_LENGTH, shard_texts=7)
    texts, rows = read_all_shards(source, layout)
    whole_rows = []
    assert texts == load_texts("stdlib-docs", 30, rows=whole_rows)
    assert rows == whole_rows
    corpus = [p for _, p in zip(range(rows[-1] + 1), stdlib_paragraphs())]
    assert [corpus[row] for row in rows] == texts


def test_dataset_directory_by_shard(tmp_path):
    import pandas as pd

    values = [LONG[0], None, "short", LONG[1], LONG[2], LONG[3]]
    (tmp_path / "repo").mkdir()
    pd.DataFrame({"text": values}).to_parquet(tmp_path / "repo" / "train.parquet")
    source = describe_source(str(tmp_path / "repo"))
    assert source["kind"] == "datasets"
    layout = plan_shards(source, None, CharTokenizer(), MAX_LENGTH, shard_texts=2)
    texts, rows = read_all_shards(source, layout)
    assert list(zip(rows, texts)) == rows_of(values)


def test_a_column_missing_from_every_json_row_is_one_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": text, "id": i}) for i, text in enumerate(LONG)))
    with pytest.raises(RaygradError, match="--text-column text: not in dataset .*; its columns are body, id"):
        plan_shards(describe_source(str(path)), None, CharTokenizer(), MAX_LENGTH)


def test_a_json_array_file_is_one_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": text} for text in LONG], indent=1))
    with pytest.raises(RaygradError, match="is not one JSON object .*one object per line"):
        plan_shards(describe_source(str(path)), None, CharTokenizer(), MAX_LENGTH)


def test_skipped_rows_before_the_sample_are_not_held(tmp_path):
    """The planner holds its first RATIO_SAMPLE_TEXTS usable texts (the tokens-per-character sample), not the
    skipped rows among them: 100,000 short rows around three usable ones plan in little memory, into the
    shards and counts a whole read gives."""
    import tracemalloc

    path = tmp_path / "data.txt"
    short = b"too short\n" * 50_000
    path.write_bytes(b"\n".join([LONG[0].encode(), short + LONG[1].encode(), short + LONG[2].encode(), b"x\n"]))
    source = describe_source(str(path))
    tracemalloc.start()
    try:
        layout = plan_shards(source, None, CharTokenizer(), MAX_LENGTH, shard_texts=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # bytes; holding the skipped rows took 32 MB
    assert [(shard.row_start, shard.row_stop) for shard in layout.shards] == \
        [(0, 50_001), (50_001, 100_002), (100_002, 100_004)]
    texts, rows = read_all_shards(source, layout)
    whole = Counter()
    assert texts == load_texts(str(path), None, skipped=whole) == LONG[:3] and rows == [0, 50_001, 100_002]
    assert layout.skipped == dict(whole) == {SKIP_SHORT: 100_001}


@pytest.mark.parametrize("shard_texts", [1, 2, None])
def test_an_old_mac_file_ends_its_lines_at_a_lone_carriage_return(shard_texts, tmp_path):
    """A lone \\r in a .txt file's start makes \\r a line end (mixed with \\n and \\r\\n here, shards that end
    inside a \\n-line included): the rows are those Python's universal newlines read (the reference)."""
    path = tmp_path / "data.txt"
    path.write_bytes(b"\r".join(text.encode() for text in LONG[:3]) + b"\r\n" + b"short\r" + LONG[3].encode() + b"\n"
                     + LONG[4].encode() + b"\r\r" + LONG[5].encode() + b"\r" + LONG[6].encode())  # no final newline
    with open(path, encoding="utf-8", newline=None) as handle:  # \r, \n and \r\n each end a line
        reference = rows_of([line.rstrip("\n") for line in handle])
    assert [row for row, _ in reference] == [0, 1, 2, 4, 5, 7, 8]
    source = describe_source(str(path))
    layout = plan_shards(source, None, CharTokenizer(), MAX_LENGTH, shard_texts=shard_texts, token_budget=40)
    assert_contiguous(layout, len(reference))
    texts, rows = read_all_shards(source, layout)
    assert list(zip(rows, texts)) == reference and texts == load_texts(str(path), None)


def test_a_stray_carriage_return_past_the_files_start_stays_in_its_text(tmp_path):
    """Only a lone \\r in the first SNIFF_BYTES makes \\r a line end: in a \\n file, one further on is text."""
    from raygrad.dataset.formats import SNIFF_BYTES

    filler = [LONG[0]] * (SNIFF_BYTES // len(LONG[0]) + 1)
    path = tmp_path / "data.txt"
    path.write_text("\n".join([*filler, LONG[1] + "\r" + LONG[2], LONG[3]]) + "\n", newline="")
    texts = load_texts(str(path), None)
    assert texts[len(filler):] == [LONG[1] + "\r" + LONG[2], LONG[3]]


def fifo(tmp_path):
    import os

    path = tmp_path / "pipe.txt"
    os.mkfifo(path)
    return path


def symlink_loop(tmp_path):
    path = tmp_path / "loop.txt"
    path.symlink_to(tmp_path / "loop.txt")
    return path


def dangling_symlink(tmp_path):
    path = tmp_path / "gone.txt"
    path.symlink_to(tmp_path / "nothing.txt")
    return path


NOT_FILES = {  # (a maker of the path, its cause)
    "FIFO": (fifo, "is a FIFO (named pipe), not a regular file"),
    "/dev/null": (lambda tmp_path: "/dev/null", "is a character device, not a regular file"),
    "/dev/zero": (lambda tmp_path: "/dev/zero", "is a character device, not a regular file"),
    "symlink loop": (symlink_loop, "is a symlink loop (the link never reaches a file)"),
    "dangling symlink": (dangling_symlink, "is a symlink to {tmp_path}/nothing.txt, which does not exist"),
}


@pytest.mark.parametrize("case", list(NOT_FILES))
def test_a_dataset_path_that_is_not_a_regular_file_is_named_for_what_it_is(case, tmp_path):
    """In one line, without opening it (a FIFO's open would wait for a writer: the call runs in a thread
    that must finish)."""
    import re
    import threading

    make, cause = NOT_FILES[case]
    path = make(tmp_path)
    raised = []
    thread = threading.Thread(target=lambda: raised.append(pytest.raises(RaygradError, describe_source, str(path))),
                              daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "describe_source blocked"
    message = str(raised[0].value)
    assert message == (f"--dataset {path}: {cause.format(tmp_path=tmp_path)}; give a file (.txt, .jsonl, .json, "
                       ".parquet, .csv), a dataset directory, a hub dataset id or stdlib-docs")
    assert re.fullmatch(r"[^\n]+", message)


def test_a_missing_dataset_file_is_no_such_file(tmp_path):
    for name in ("nope.txt", "nope", "dir/nope.csv"):
        path = tmp_path / name
        with pytest.raises(RaygradError, match=f"^--dataset {path}: no such file$"):
            describe_source(str(path))


def test_the_token_estimate_counts_every_row_read_skipped_runs_included(tmp_path):
    """600 usable texts, each followed by 4 short rows (a run the planner holds as one entry): sampled
    to the 500th text, --num-samples all is estimated from the rows read (2496) of the 3000 the parquet
    holds, so min_shards 4 gives 4 shards of the true total's quarter (counting the held entries, 999,
    gave 2)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = [LONG[i % 9] if i % 5 == 0 else "short" for i in range(3000)]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": values}), path, row_group_size=1000)
    source = describe_source(str(path))
    layout = plan_shards(source, None, CharTokenizer(), MAX_LENGTH, min_shards=4)
    usable = [text for _, text in rows_of(pq.read_table(path).column("text").to_pylist())]
    total = sum(target_tokens(len(text), layout.tokens_per_char, MAX_LENGTH) for text in usable)
    assert len(usable) == layout.samples == 600 and layout.skipped == {SKIP_SHORT: 2400}
    assert len(layout.shards) == 4
    assert all(shard.est_tokens <= total / 4 * 1.01 for shard in layout.shards)
    assert sum(shard.est_tokens for shard in layout.shards) == total
