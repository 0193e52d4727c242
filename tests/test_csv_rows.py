"""A CSV file's rows are the records Python's csv module reads from it (csv.DictReader over the file
opened with newline="" and encoding utf-8-sig: the reference in every test), however it is quoted or
ends its lines, read whole or by shards of 1, 2 texts or a token budget; a record csv cannot read is
counted, and the rows after it read on."""

import csv
import random
from collections import Counter

import pytest
from test_sources import LONG, MAX_LENGTH, CharTokenizer, assert_contiguous, read_all_shards

from raygrad.dataset.formats import CSV_FIELD_CHARS, describe_source
from raygrad.dataset.shards import load_texts, plan_shards
from raygrad.dataset.text import SKIP_NOT_TEXT, SKIP_SHORT, SKIP_UNREADABLE


def dict_reader(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return list(csv.DictReader(handle))


def is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def reference_rows(path, column: str = "text", min_chars: int = 50) -> list[tuple[int, str]]:
    """(row, text) of each usable row as DictReader reads the file: a string cell that is neither empty
    nor a number (as pandas reads a cell) and longer than min_chars once stripped."""
    return [(row, record[column]) for row, record in enumerate(dict_reader(path))
            if isinstance(record[column], str) and record[column] and not is_number(record[column])
            and len(record[column].strip()) > min_chars]


def assert_reads_as_dict_reader(path, min_chars: int = 50) -> list[tuple[int, str]]:
    """A whole read, and shards of 1, 2 texts and of a token budget, give the reference's rows, texts and
    counts: every record DictReader reads is a text or a counted skip."""
    expected = reference_rows(path, min_chars=min_chars)
    assert expected, "a case with no usable row checks little"
    skipped, whole_rows = Counter(), []
    texts = load_texts(str(path), None, min_chars=min_chars, skipped=skipped, rows=whole_rows)
    assert list(zip(whole_rows, texts)) == expected
    assert skipped[SKIP_SHORT] + skipped[SKIP_NOT_TEXT] + len(texts) == len(dict_reader(path))
    source = describe_source(str(path), min_chars=min_chars)
    for shard_texts in (1, 2, None):
        layout = plan_shards(source, None, CharTokenizer(), MAX_LENGTH, shard_texts=shard_texts, token_budget=40)
        assert_contiguous(layout, len(expected))
        got_texts, got_rows = read_all_shards(source, layout)
        assert list(zip(got_rows, got_texts)) == expected, f"shards of {shard_texts or 'a token budget'}"
        assert layout.skipped == dict(skipped)
    return expected


def lines(*records: str, end: str = "\n") -> bytes:
    return "".join(record + end for record in records).encode()


CASES = {
    "stray quotes inside unquoted fields": lines(
        "id,text", f"0,{LONG[0]}", f'1,He is 6" tall: {LONG[1]}', f"2,{LONG[2]}", f'3,A 12" record: {LONG[3]}',
        f"4,{LONG[4]}"),
    "stray quotes at the ends of unquoted fields": lines(
        "id,text,note", f'0,{LONG[0]}",x', f'1,{LONG[1]}""', f'2,{LONG[2]},"', f"3,{LONG[3]}", f'4,a"b"c {LONG[4]}'),
    "quoted fields with newlines and doubled quotes": lines(
        "id,text", f'0,"{LONG[0]}\nand a second line"', f'1,"He said ""{LONG[1]}"""', "2,short",
        f'3,"{LONG[2]}\n\nafter a blank line, with a comma"', f'4,"""quoted"" at the start: {LONG[3]}"'),
    "CRLF line ends, kept inside quoted fields": lines(
        "id,text", f"0,{LONG[0]}", f'1,"{LONG[1]}\r\nits second line"', f"2,{LONG[2]}", end="\r\n"),
    "a BOM before the first column name": b"\xef\xbb\xbf" + lines("text,id", f"{LONG[0]},0", f"{LONG[1]},1"),
    "an empty last line and blank lines between records": lines(
        "id,text", f"0,{LONG[0]}", "", f"1,{LONG[1]}", "", "", f"2,{LONG[2]}", "") + b"\n",
    "no newline after the last record": lines("id,text", f"0,{LONG[0]}") + f"1,{LONG[1]}".encode(),
    "CR-only line ends (an old Mac file)": lines(
        "id,text", *(f"{i},{LONG[i]}" for i in range(9)), f'9,"{LONG[0]}\rits second line"', end="\r"),
    "a lone CR in an unquoted field of a LF file": lines("id,text", f"0,{LONG[0]}\r1,{LONG[1]}", f"2,{LONG[2]}"),
    "empty cells, numbers, short and long records": lines(
        "id,text,note", f"0,{LONG[0]},n", "1,,n", "2,12345,n", "3", f"4,{LONG[1]},n,extra,fields", '""',
        f"5,{LONG[2]}"),
    "a quote that is never closed": lines("id,text", f"0,{LONG[0]}", f'1,"{LONG[1]}', f"2,{LONG[2]}"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rows_are_those_csv_reads(case, tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(CASES[case])
    assert_reads_as_dict_reader(path)


def test_a_stray_quote_swallows_no_row(tmp_path):
    """A 200-row file with a quote inside an unquoted field of every 7th row plans 200 texts (102 before,
    the rows after each quote swallowed unseen)."""
    path = tmp_path / "data.csv"
    records = [f'{i},He is 6" tall: {LONG[i % 9]}' if i % 7 == 3 else f"{i},{LONG[i % 9]}" for i in range(200)]
    path.write_bytes(lines("id,text", *records))
    assert len(dict_reader(path)) == 200
    layout = plan_shards(describe_source(str(path)), None, CharTokenizer(), MAX_LENGTH)
    assert layout.samples == 200 and layout.skipped == {}
    assert len(assert_reads_as_dict_reader(path)) == 200


PIECES = ["word", "\u00e9t\u00e9", " ", ",", '"', '""', "\n", "\r\n", "\r", "a sentence of a few words", "12.5", ""]


def random_field(rng: random.Random) -> str:
    body = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 8)))
    kind = rng.random()
    if kind < 0.4:  # well quoted
        return '"' + body.replace('"', '""') + '"'
    if kind < 0.8:  # unquoted: stray quotes, no separators
        return body.replace(",", " ").replace("\n", " ").replace("\r", " ")
    return body  # anything: raw commas, quotes and line ends


def random_csv(rng: random.Random) -> bytes:
    ends = rng.choice(["\n", "\r\n", "\r", None])  # None: each record its own
    header = rng.sample(["id", "text", "note"], 3)
    records = [",".join(header)]
    for _ in range(rng.randint(5, 40)):
        records.append("" if rng.random() < 0.1 else ",".join(random_field(rng) for _ in range(rng.randint(1, 4))))
    text = "".join(record + (ends or rng.choice(["\n", "\r\n", "\r"])) for record in records)
    if rng.random() < 0.3:
        text = text.rstrip("\r\n")  # no line end after the last record
    return (b"\xef\xbb\xbf" if rng.random() < 0.2 else b"") + text.encode()


def test_generated_files_read_as_csv_reads_them(tmp_path):
    """Seeded random files of well quoted, stray-quoted and raw fields, with \\n, \\r\\n, lone \\r or mixed
    line ends, blank records, a BOM or none, a last line end or none."""
    rng, checked = random.Random(24), 0
    for case in range(150):
        path = tmp_path / f"case{case}.csv"
        path.write_bytes(random_csv(rng))
        if not reference_rows(path, min_chars=10):
            continue  # nothing usable: plan_shards refuses it (its own test)
        assert_reads_as_dict_reader(path, min_chars=10)
        checked += 1
    assert checked >= 100, checked


def test_a_record_csv_cannot_read_is_counted_and_the_rows_after_it_read_on(tmp_path):
    """A quoted field over CSV_FIELD_CHARS characters, over several lines: its record is one row counted as
    unreadable, and the records after it are those DictReader reads once that field is short."""
    head, tail = lines("id,text", f"0,{LONG[0]}"), lines("1,x", f"2,{LONG[1]}", f'3,"{LONG[2]}\nits second line"')
    huge = f'9,"{"a" * CSV_FIELD_CHARS}\nanother ""line"",\n{LONG[3]}",note\n'.encode()
    path, short = tmp_path / "data.csv", tmp_path / "short.csv"
    path.write_bytes(head + huge + tail)
    short.write_bytes(head + huge.replace(b"a" * CSV_FIELD_CHARS, b"a") + tail)
    expected = [(0, LONG[0]), (3, LONG[1]), (4, f"{LONG[2]}\nits second line")]
    assert [(row, text) for row, text in reference_rows(short) if row != 1] == expected
    skipped, rows = Counter(), []
    assert load_texts(str(path), None, skipped=skipped, rows=rows) == [text for _, text in expected]
    assert rows == [row for row, _ in expected]
    assert skipped == {SKIP_UNREADABLE: 1, SKIP_SHORT: 1}
    source = describe_source(str(path))
    layout = plan_shards(source, None, CharTokenizer(), MAX_LENGTH, shard_texts=1)
    assert layout.skipped == dict(skipped)
    texts, rows = read_all_shards(source, layout)
    assert list(zip(rows, texts)) == expected


def test_a_header_csv_cannot_read_is_one_line(tmp_path):
    from raygrad.errors import RaygradError

    path = tmp_path / "data.csv"
    path.write_bytes(lines(f'"{"a" * (CSV_FIELD_CHARS + 1)}",text', f"0,{LONG[0]}"))  # one over the limit
    with pytest.raises(RaygradError, match=r"^--dataset .*: the CSV header cannot be read \(a field over 16777216 "
                                           r"characters\); the first record must name the columns$"):
        load_texts(str(path), None)
