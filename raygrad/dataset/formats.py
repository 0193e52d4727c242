"""Dataset formats, read as rows: one streaming pass over all of them (for planning),
or one row range (a shard, read by a worker).

A source is plain data (a dict, saved in the plan): {"kind", "path", "text_column",
"config", "split", "min_chars"}, with --prompt-column/--completion-column also "prompt_column" and
"completion_column" (a row's value is then the pair of their values), a hub dataset's pinned
"revision", and a URL's "objects" (each {"url", "identity"}: remote.py, and what planning read
from it: a parquet object's "rows", a .txt's "lone_cr_ends_lines", a CSV's "csv_columns" and
"csv_body") (a plan saved by an older raygrad may also hold a "fingerprint", which nothing reads).
A row is a record of the dataset as read, numbered from 0 before any filtering; its value is what the
text column holds (any type: the filter in shards.py decides what is usable). Line
formats (.txt, .jsonl, .csv) also give each row's byte span, so a shard records where
its rows start and a worker seeks there (a URL's objects are numbered one after another, as if
concatenated, so a shard's bytes may span two, and each is read in ranged reads of the shard's bytes
alone). A CSV file's records are those Python's csv
module reads from it opened with newline="" and encoding utf-8-sig (pandas and
`datasets` read the same).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import errno
import json
import os
import re
import stat
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

from ..constants import BUNDLED_CORPUS
from ..errors import RaygradError, first_line
from . import hub_parquet, remote
from .text import DEFAULT_CONFIGS, LOCAL_FORMATS, REPLACED_BYTES, check_column, stdlib_paragraphs

COLUMN_OPTIONS = {"text_column": "--text-column", "prompt_column": "--prompt-column",
                  "completion_column": "--completion-column"}

MISSING = object()  # a row without the text column (a JSON object without the key, a short CSV record)
UNREADABLE = object()  # a CSV record that csv cannot read (a field over CSV_FIELD_CHARS characters)
_PARQUET_BATCH = 8192  # rows per batch read from a parquet file or an Arrow dataset


@dataclass(frozen=True)
class Row:
    row: int
    value: object
    byte_start: int | None = None  # the row's span in the file, for line formats
    byte_stop: int | None = None


@dataclass(frozen=True)
class Format:
    scan: Callable[[dict, Counter], Iterator[Row]]  # every row from the start, in order
    read: Callable[[dict, object, Counter], Iterator[Row]]  # the rows of one shard (row and byte range)
    size_hint: Callable[[dict], tuple[str, int] | None]  # ("rows" | "bytes", n) when known without reading


FORMATS: dict[str, Format] = {}


def register_format(kind: str, fmt: Format) -> None:
    if kind in FORMATS:
        raise ValueError(f"format {kind!r} is already registered")
    FORMATS[kind] = fmt


def describe_source(dataset: str, text_column: str = "text", config: str | None = None, split: str = "train",
                    min_chars: int = 50, prompt_column: str | None = None, completion_column: str | None = None
                    ) -> dict:
    """The source a run reads, as plain data; a local file is checked here (a regular file, of a known type)."""
    source = {"path": dataset, "text_column": text_column, "config": config, "split": split, "min_chars": min_chars}
    if completion_column is not None:  # only then, so a plain run's plan is as before
        source.update(prompt_column=prompt_column, completion_column=completion_column)
    source = _with_kind(source, dataset, config)
    if completion_column is not None and source["kind"] in ("text", "bundled"):
        raise RaygradError(f"--completion-column {completion_column}: --dataset {dataset} is plain text, one text "
                           "a line, with no columns; give a .jsonl, .csv or .parquet file or a hub dataset")
    return source


def value_columns(source: dict) -> list[str]:
    """The columns a row's value is read from: the text column, or the prompt and completion columns."""
    if source.get("completion_column") is not None:
        return [source["prompt_column"], source["completion_column"]]
    return [source["text_column"]]


def check_columns(source: dict, columns: Iterable[str], name: str | None = None) -> None:
    """Each column a row is read from is among `columns` (of the dataset `name`), else one line naming its option."""
    columns = list(columns)
    for key in ("prompt_column", "completion_column") if source.get("completion_column") is not None \
            else ("text_column",):
        check_column(name or source["path"], source[key], columns, COLUMN_OPTIONS[key])


def _row_value(values: list):
    """A row's value: its one column's, or (prompt, completion) (shards.py decides what is usable)."""
    return values[0] if len(values) == 1 else tuple(values)


def _with_kind(source: dict, dataset: str, config: str | None) -> dict:
    if dataset == BUNDLED_CORPUS:
        return {**source, "kind": "bundled"}
    if remote.is_url(dataset):
        return _describe_url(source)
    path = Path(dataset).expanduser()
    if path.is_dir() or not _looks_local(dataset):
        source = {**source, "kind": "datasets", "config": config or DEFAULT_CONFIGS.get(dataset)}
        return source if path.is_dir() else hub_parquet.describe(source)  # parquet at a pinned commit
    problem = _not_a_file(path)
    if problem == _NO_SUCH_FILE:
        raise RaygradError(f"--dataset {path}: {problem}")
    if problem:
        raise RaygradError(f"--dataset {path}: {problem}; give a file ({', '.join(LOCAL_FORMATS)}), a dataset "
                           f"directory, a hub dataset id or {BUNDLED_CORPUS}")
    kind = LOCAL_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise RaygradError(f"--dataset {path}: unknown file type; use one of {', '.join(LOCAL_FORMATS)}")
    return {**source, "kind": kind, "path": str(path)}


def _describe_url(source: dict) -> dict:
    """A URL's objects of one format, each pinned by its identity and carrying what a worker needs to
    start reading at its shard's rows: a parquet object's rows (from its footer, so a worker opens only
    the objects its rows are in), a .txt's line ends, a CSV's header."""
    url = source["path"]
    objects = remote.list_objects(url)
    kinds = [LOCAL_FORMATS.get(PurePosixPath(obj["url"]).suffix.lower()) for obj in objects]
    if len(objects) == 1 and kinds[0] is None:
        raise RaygradError(f"--dataset {url}: unknown file type; use one of {', '.join(LOCAL_FORMATS)}")
    found = sorted({kind for kind in kinds if kind})
    if not found:
        raise RaygradError(f"--dataset {url}: no dataset files ({', '.join(LOCAL_FORMATS)}) in it")
    if len(found) > 1:
        raise RaygradError(f"--dataset {url}: holds files of several formats ({', '.join(found)}); name the "
                           f"files of one with a glob, e.g. {url.rstrip('/')}/*.parquet")
    objects = [obj for obj, kind in zip(objects, kinds) if kind == found[0]]
    for obj in objects:
        obj.update(_object_facts(found[0], obj, source))
    return {**source, "kind": found[0], "objects": objects}


def _object_facts(kind: str, obj: dict, source: dict) -> dict:
    """What planning reads from one object, in ranged reads of its footer or of its first bytes."""
    if kind == "parquet":
        with remote.open_object(obj, "planning") as handle:
            return {"rows": _parquet_file(handle, obj["url"], source, _pinned(obj)).metadata.num_rows}
    if kind == "text":
        with remote.open_span(obj, "planning", stop=SNIFF_BYTES) as handle:
            return {"lone_cr_ends_lines": _lone_cr_ends_lines(handle)}
    if kind == "csv":
        with remote.open_span(obj, "planning", buffer_bytes=SNIFF_BYTES) as handle:
            indices, body = _csv_header(handle, obj["url"], source)
        return {"csv_columns": indices, "csv_body": body}
    return {}


def _looks_local(dataset: str) -> bool:
    """A path rather than a hub id: something is there (a dangling or looping link too), or it is written as one."""
    path = Path(dataset).expanduser()
    return os.path.lexists(path) or path.suffix.lower() in LOCAL_FORMATS or dataset.startswith((".", "/", "~"))


_NO_SUCH_FILE = "no such file"
_NOT_REGULAR = {stat.S_IFIFO: "is a FIFO (named pipe), not a regular file", stat.S_IFCHR: "is a character "
                "device, not a regular file", stat.S_IFBLK: "is a block device, not a regular file",
                stat.S_IFSOCK: "is a socket, not a regular file"}


def _not_a_file(path: Path) -> str | None:
    """Why `path` is not a regular file to read, from its status alone: nothing is opened (opening a
    FIFO for reading waits for a writer)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symlink loop (the link never reaches a file)"
        if err.errno == errno.ENOENT and os.path.islink(path):
            return f"is a symlink to {os.readlink(path)}, which does not exist"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return _NO_SUCH_FILE
        return f"cannot be read ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    return _NOT_REGULAR.get(stat.S_IFMT(mode), "is not a regular file")


def scan(source: dict, counts: Counter) -> Iterator[Row]:
    return FORMATS[source["kind"]].scan(source, counts)


def read(source: dict, shard, counts: Counter) -> Iterator[Row]:
    return FORMATS[source["kind"]].read(source, shard, counts)


def size_hint(source: dict) -> tuple[str, int] | None:
    return FORMATS[source["kind"]].size_hint(source)


# --- line formats: .txt, .jsonl/.json, .csv: one local file, or a URL's objects one after another

@dataclass(frozen=True)
class _Part:
    """One file of a line format's source: its name (a path or URL), its first byte in the source's
    numbering, its size (None: a local file, read to its end) and, for an object, its plan entry."""
    name: str
    base: int = 0
    size: int | None = None
    obj: dict | None = None


def _parts(source: dict) -> list[_Part]:
    if "objects" not in source:
        return [_Part(source["path"])]
    parts, base = [], 0
    for obj in source["objects"]:
        parts.append(_Part(obj["url"], base, obj["identity"]["size"], obj))
        base += obj["identity"]["size"]
    return parts


def _open_part(part: _Part, reading: str, stop: int | None = None):
    """A local file, or an object's bytes up to `stop` (None: its end), fetched in ranged reads."""
    if part.obj is not None:
        return remote.open_span(part.obj, reading, stop)
    try:
        return open(part.name, "rb")
    except OSError as err:
        raise RaygradError(f"--dataset {part.name}: cannot be read ({err.strerror})") from None


# (source, part, its open file, counts, start, stop, first row) -> the part's rows from byte `start`
# (None: its first row) to `stop` (None: its end), in the part's own bytes
RowsInPart = Callable[[dict, _Part, object, Counter, "int | None", "int | None", int], Iterator[Row]]


def _rows_across(source: dict, counts: Counter, start: int | None, stop: int | None, row: int, reading: str,
                 rows_in: RowsInPart) -> Iterator[Row]:
    """The rows that start in the source's bytes [start, stop) (None: from its first row, to its end),
    numbered from `row`, each part's spans moved into the source's numbering; only the parts that
    overlap [start, stop) are opened, each only up to `stop`."""
    for part in _parts(source):
        end = None if part.size is None else part.base + part.size
        if stop is not None and part.base >= stop:
            return
        if start is not None and end is not None and end <= start:
            continue
        part_start = None if start is None or start <= part.base else start - part.base
        part_stop = None if stop is None or (end is not None and stop >= end) else stop - part.base
        with _open_part(part, reading, part_stop) as handle:
            for item in rows_in(source, part, handle, counts, part_start, part_stop, row):
                yield Row(item.row, item.value, item.byte_start + part.base, item.byte_stop + part.base) \
                    if part.base else item
                row = item.row + 1


def _line_format(rows_in: RowsInPart, check_scan: Callable[[dict, Iterator[Row]], Iterator[Row]] | None = None,
                 ) -> Format:
    """A line format: the planning pass reads every part from its start; a shard, its bytes alone."""
    def scan(source: dict, counts: Counter) -> Iterator[Row]:
        rows = _rows_across(source, counts, None, None, 0, "the planning pass", rows_in)
        return check_scan(source, rows) if check_scan else rows

    def read_shard(source: dict, shard, counts: Counter) -> Iterator[Row]:
        return _rows_across(source, counts, shard.byte_start, shard.byte_stop, shard.row_start,
                            f"the shard of {shard.rows_text()}", rows_in)

    return Format(scan, read_shard, _file_bytes)


def _lines(handle, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(offset, line with its newline) from byte `start` to `stop` (exclusive)."""
    handle.seek(start)
    offset = start
    for raw in handle:
        if stop is not None and offset >= stop:
            return
        yield offset, raw
        offset += len(raw)


def _decode(raw: bytes, counts: Counter) -> str:
    """UTF-8; bytes that are not become U+FFFD (counted) rather than stopping the run on one bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        counts[REPLACED_BYTES] += 1
        return raw.decode("utf-8", errors="replace")


def _strip_newline(raw: bytes) -> bytes:
    return raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw


SNIFF_BYTES = 1 << 16  # the start of a .txt file that says whether a lone \r ends its lines
_LONE_CR = re.compile(rb"\r[^\n]")
_AFTER_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")


def _lone_cr_ends_lines(handle) -> bool:
    """Whether the file's first SNIFF_BYTES hold a lone \r (an old Mac file's line end): then \r ends a
    line too, as Python's universal newlines and `datasets` read it; else only \n does, and a stray \r
    stays in its text. Decided from the file alone, so a plan and every later read of a shard agree."""
    handle.seek(0)
    return _LONE_CR.search(handle.read(SNIFF_BYTES)) is not None


def _text_rows(source: dict, part: _Part, handle, counts: Counter, start: int | None, stop: int | None,
               row: int) -> Iterator[Row]:
    """One text per line, every line a row (blank ones are too short to use)."""
    lone_cr = part.obj["lone_cr_ends_lines"] if part.obj is not None else _lone_cr_ends_lines(handle)
    start = start or 0
    if not lone_cr:
        for offset, raw in _lines(handle, start, stop):
            yield Row(row, _decode(_strip_newline(raw), counts), offset, offset + len(raw))
            row += 1
        return
    for offset, line in _lines(handle, start, stop):
        for raw in _AFTER_LONE_CR.split(line):
            if stop is not None and offset >= stop:  # a shard may end inside a \n-line
                return
            if raw:
                text = raw[:-1] if raw.endswith(b"\r") else _strip_newline(raw)
                yield Row(row, _decode(text, counts), offset, offset + len(raw))
                row += 1
                offset += len(raw)


def _json_rows(source: dict, part: _Part, handle, counts: Counter, start: int | None, stop: int | None,
               row: int) -> Iterator[Row]:
    """One JSON object per line; blank lines are not rows (as `datasets` reads JSON Lines)."""
    columns = value_columns(source)
    for offset, raw in _lines(handle, start or 0, stop):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as err:
            raise RaygradError(f"--dataset {part.name}: the line at byte {offset} is not one JSON object "
                               f"({first_line(err)}); a .json/.jsonl file holds one object per line") from None
        value = _row_value([record.get(column, MISSING) if isinstance(record, dict) else MISSING
                            for column in columns])
        yield Row(row, value, offset, offset + len(raw))
        row += 1


def _check_json_columns(source: dict, rows: Iterator[Row]) -> Iterator[Row]:
    """Every row; a column that no row has is refused when the pass ends."""
    columns = value_columns(source)
    found = [False] * len(columns)
    for item in rows:
        values = item.value if len(columns) > 1 else (item.value,)
        found = [seen or value is not MISSING for seen, value in zip(found, values)]
        yield item
    keys = None if all(found) else _first_keys(source)
    if keys:
        check_columns(source, keys)  # a column no row has is not among the first row's keys either


def _first_keys(source: dict) -> list[str] | None:
    with _open_part(_parts(source)[0], "the planning pass") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    record = json.loads(raw)
                except ValueError:
                    return None
                return list(record) if isinstance(record, dict) else None
    return None


CSV_FIELD_CHARS = 1 << 24  # characters a CSV field may hold (csv's default, 131072, refuses long texts); a
# field longer than this is a row csv cannot read (SKIP_UNREADABLE): it caps csv's buffer (4 bytes a character)
_CSV_PLAIN_RUN = re.compile(r'[^",\r\n]+')  # a run of these moves csv's parser (default dialect) as one of them does


def _csv_line_bytes(handle, start: int) -> Iterator[bytes]:
    """The file's lines from byte `start`, each with its line end, as open(newline="") gives them to csv:
    \n, \r\n and a lone \r each end a line (the last line may have none)."""
    handle.seek(start)
    for raw in handle:
        first_cr = raw.find(b"\r")
        if first_cr == -1 or first_cr == len(raw) - 2 and raw.endswith(b"\n"):  # no \r but a \r\n line end
            yield raw
        else:
            yield from (part for part in _AFTER_LONE_CR.split(raw) if part)


class _CsvFeed:
    """The decoded lines csv.reader pulls, one at a time, from byte `start`; `offset` is the byte after the
    last line pulled. csv.reader pulls no line past the record it returns, so after each record `offset`
    is where that record ends. `plain` squeezes each run of characters that are not quotes, commas or
    line ends into one (the parser's states, hence its record ends, stay the same)."""

    def __init__(self, handle, start: int, counts: Counter, plain: bool = False):
        self.offset, self._counts, self._plain = start, counts, plain
        self._lines = _csv_line_bytes(handle, start)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = next(self._lines)
        at_start, self.offset = self.offset == 0, self.offset + len(raw)
        if at_start and raw.startswith(codecs.BOM_UTF8):  # read as utf-8-sig: not part of the first column name
            raw = raw[len(codecs.BOM_UTF8):]
        line = _decode(raw, self._counts)
        return _CSV_PLAIN_RUN.sub("x", line) if self._plain else line


def _csv_records(handle, start: int, stop: int | None, counts: Counter
                 ) -> Iterator[tuple[int, int, list[str] | None]]:
    """(start, stop, fields) of each record that starts in bytes [start, stop), as csv.reader splits the
    file opened with newline=""; fields is None for a record csv cannot read (a field over CSV_FIELD_CHARS)."""
    if csv.field_size_limit() < CSV_FIELD_CHARS:
        csv.field_size_limit(CSV_FIELD_CHARS)
    feed = _CsvFeed(handle, start, counts)
    reader = csv.reader(feed)
    while stop is None or feed.offset < stop:
        begin = feed.offset
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error:  # it stopped inside the record: find the record's end, read on from there
            end = _csv_record_end(handle, begin)
            yield begin, end, None
            feed = _CsvFeed(handle, end, counts)
            reader = csv.reader(feed)
            continue
        yield begin, feed.offset, fields


def _csv_record_end(handle, start: int) -> int:
    """Where the record at byte `start` ends, parsed again with its plain runs squeezed (_CsvFeed), so its
    fields are short; a field of quotes and commas alone over the limit ends it at the line of the error."""
    feed = _CsvFeed(handle, start, Counter(), plain=True)
    try:
        next(csv.reader(feed), None)
    except csv.Error:
        pass
    return feed.offset


def _csv_header(handle, name: str, source: dict) -> tuple[list[int], int]:
    """-> (the value columns' indices in the header of the CSV file `name`, the byte where its records
    start). Blank lines before the header are skipped, as pandas skips them; the header is not a row
    (its replaced bytes are not counted)."""
    for _, stop, header in _csv_records(handle, 0, None, Counter()):
        if header is None:
            raise RaygradError(f"--dataset {name}: the CSV header cannot be read (a field over "
                               f"{CSV_FIELD_CHARS} characters); the first record must name the columns")
        if not header:
            continue
        check_columns(source, header, name)
        return [header.index(column) for column in value_columns(source)], stop
    raise RaygradError(f"--dataset {name}: an empty CSV file (no header)")


def _csv_value(fields: list[str] | None, index: int):
    """As pandas reads a cell: an empty one is null, a number is not text."""
    if fields is None:
        return UNREADABLE
    if index >= len(fields) or fields[index] == "":
        return MISSING
    value = fields[index]
    try:
        float(value)
    except ValueError:
        return value
    return None


def _csv_rows(source: dict, part: _Part, handle, counts: Counter, start: int | None, stop: int | None,
              row: int) -> Iterator[Row]:
    """Records after the header, as csv.DictReader reads them: a blank line is not a row."""
    indices, body = (part.obj["csv_columns"], part.obj["csv_body"]) if part.obj is not None else \
        _csv_header(handle, part.name, source)
    for begin, end, fields in _csv_records(handle, body if start is None else start, stop, counts):
        if fields == []:
            continue
        yield Row(row, _row_value([_csv_value(fields, index) for index in indices]), begin, end)
        row += 1


def _file_bytes(source: dict) -> tuple[str, int]:
    if "objects" in source:
        return "bytes", sum(obj["identity"]["size"] for obj in source["objects"])
    return "bytes", Path(source["path"]).stat().st_size


register_format("text", _line_format(_text_rows))
register_format("json", _line_format(_json_rows, _check_json_columns))
register_format("csv", _line_format(_csv_rows))


# --- parquet: read by row groups, only the text column; a local file, or a URL's objects (rows numbered
# across them in order), each opened for ranged reads and checked against its pinned identity

_FOOTERS_KEPT = 64  # parquet footers a process keeps: its later reads of an object need not fetch them again
_footers: dict[str, object] = {}  # an object as pinned (_pinned) -> its pyarrow FileMetaData
_footers_lock = threading.Lock()


def _pinned(obj: dict) -> str:
    """A URL's object as the plan pins it: opened only while it still is (remote.open_object), so its
    footer read once stands for every later read."""
    return json.dumps([obj["url"], obj["identity"]], sort_keys=True)


def _parquet_file(file, name: str, source: dict, pinned: str | None = None):
    import pyarrow.parquet as pq

    with _footers_lock:
        metadata = _footers.get(pinned) if pinned else None
    try:
        parquet = pq.ParquetFile(file, metadata=metadata)
    except Exception as err:  # not parquet, truncated: one line for the user
        raise RaygradError(f"--dataset {name}: cannot be read as parquet ({first_line(err)})") from None
    check_columns(source, parquet.schema_arrow.names, name)
    if pinned and metadata is None:
        with _footers_lock:
            while len(_footers) >= _FOOTERS_KEPT:
                _footers.pop(next(iter(_footers)))
            _footers[pinned] = parquet.metadata
    return parquet


def _parquet_parts(source: dict) -> list[tuple[str, int | None, Callable, str | None]]:
    """(name, rows or None when unknown, opener, pinned or None) of each file, in row order: one local
    file, or a URL's objects."""
    if "objects" not in source:
        return [(source["path"], None, lambda reading: contextlib.nullcontext(source["path"]), None)]
    return [(obj["url"], obj["rows"], lambda reading, obj=obj: remote.open_object(obj, reading), _pinned(obj))
            for obj in source["objects"]]


def _parquet_values(parquet, groups, columns: list[str]) -> Iterator:
    """The rows' values (_row_value of `columns`) in `groups`, one row group at a time: iter_batches over
    many groups reads ahead and held a whole 213 MB file in Arrow's memory pool by the end of a pass; this
    holds one group."""
    for group in groups:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[group], columns=columns):
            yield from _zipped([batch.column(i).to_pylist() for i in range(len(columns))])


def _zipped(values: list[list]) -> Iterator:
    """Rows' values from one list per column: one column's as they are, two as (prompt, completion)."""
    return iter(values[0]) if len(values) == 1 else zip(*values)


def _parquet_scan(source: dict, counts: Counter) -> Iterator[Row]:
    row = 0
    for name, _, opener, pinned in _parquet_parts(source):
        with opener("the planning pass") as file:
            parquet = _parquet_file(file, name, source, pinned)
            for value in _parquet_values(parquet, range(parquet.metadata.num_row_groups), value_columns(source)):
                yield Row(row, value)
                row += 1


def _parquet_read(source: dict, shard, counts: Counter) -> Iterator[Row]:
    """The row groups that overlap the shard's rows, then the rows themselves; a URL's objects that
    hold none of them are not opened."""
    offset = 0  # the first row of this file
    for name, rows, opener, pinned in _parquet_parts(source):
        if offset >= shard.row_stop:
            return
        if rows is not None and offset + rows <= shard.row_start:
            offset += rows
            continue
        with opener(f"the shard of {shard.rows_text()}") as file:
            parquet = _parquet_file(file, name, source, pinned)
            groups, first, start = [], None, offset
            for group in range(parquet.metadata.num_row_groups):
                stop = start + parquet.metadata.row_group(group).num_rows
                if start < shard.row_stop and stop > shard.row_start:
                    groups.append(group)
                    first = start if first is None else first
                start = stop
            for row, value in enumerate(_parquet_values(parquet, groups, value_columns(source)), start=first or 0):
                if shard.row_start <= row < shard.row_stop:
                    yield Row(row, value)
            offset = start


def _parquet_rows(source: dict) -> tuple[str, int]:
    if "objects" in source:
        return "rows", sum(obj["rows"] for obj in source["objects"])
    return "rows", _parquet_file(source["path"], source["path"], source).metadata.num_rows


register_format("parquet", Format(_parquet_scan, _parquet_read, _parquet_rows))


# --- the bundled corpus: regenerated, then sliced

_corpus: list[str] = []
_corpus_lock = threading.Lock()
_corpus_source: Iterator[str] | None = None


def _bundled_scan(source: dict, counts: Counter) -> Iterator[Row]:
    return (Row(row, text) for row, text in enumerate(stdlib_paragraphs()))


def _bundled_read(source: dict, shard, counts: Counter) -> Iterator[Row]:
    """The corpus is generated once per process, as far as the shards read reach."""
    global _corpus_source
    with _corpus_lock:
        if _corpus_source is None:
            _corpus_source = stdlib_paragraphs()
        while len(_corpus) < shard.row_stop:
            text = next(_corpus_source, None)
            if text is None:
                break
            _corpus.append(text)
        texts = _corpus[shard.row_start:shard.row_stop]
    return (Row(shard.row_start + i, text) for i, text in enumerate(texts))


register_format("bundled", Format(_bundled_scan, _bundled_read, lambda source: None))


# --- hub datasets and dataset directories: the `datasets` Arrow cache, memory-mapped

_arrow_cache: dict = {}
_arrow_lock = threading.Lock()


def arrow_dataset(source: dict):
    """The split as `datasets` keeps it on disk (downloaded once per node), with only the text
    column; loaded once per process."""
    key = (source["path"], source["config"], source["split"], *value_columns(source), source.get("revision"))
    with _arrow_lock:
        if key not in _arrow_cache:
            _arrow_cache[key] = _load_arrow(source)
        return _arrow_cache[key]


def _load_arrow(source: dict):
    from ..model.hub import hub_offline, why_offline

    name = source["path"]
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        # A plan names a local directory by its absolute path (text.absolute_if_local), a hub id never
        # starts with "/": one missing on this node is not looked up on the hub.
        raise RaygradError(f"--dataset {name}: no such directory on this node; each node reads a local path on "
                           "its own disk: give an object-store URI (s3://, gs://, hf://...), or put the same "
                           "directory at that path on every node")
    if not Path(name).expanduser().is_dir() and hub_offline():
        raise RaygradError(f"--dataset {name}: not a local file and could not be loaded from the hub "
                           f"({why_offline()}); for the offline demo use --dataset stdlib-docs")
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" bars say nothing here
    try:
        table = datasets.load_dataset(name, source["config"], split=source["split"], revision=source.get("revision"))
    except Exception as err:  # no network, unknown name or config: one line for the user
        raise RaygradError(
            f"--dataset {name}: not a local file and could not be loaded from the hub ({first_line(err)}); "
            "for the offline demo use --dataset stdlib-docs"
        ) from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    check_columns(source, table.column_names)
    return table.select_columns(value_columns(source))


def _arrow_rows(source: dict, start: int, stop: int) -> Iterator[Row]:
    table, columns = arrow_dataset(source), value_columns(source)
    for begin in range(start, stop, _PARQUET_BATCH):
        rows = table[begin:min(stop, begin + _PARQUET_BATCH)]
        for offset, value in enumerate(_zipped([rows[column] for column in columns])):
            yield Row(begin + offset, value)


register_format("datasets", Format(
    lambda source, counts: _arrow_rows(source, 0, len(arrow_dataset(source))),
    lambda source, shard, counts: _arrow_rows(source, shard.row_start, min(shard.row_stop,
                                                                           len(arrow_dataset(source)))),
    lambda source: ("rows", len(arrow_dataset(source))),
))
