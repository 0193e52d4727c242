""".txt, .jsonl and .csv datasets by URL, on a real S3 API served from 127.0.0.1 (moto's server):
planned and read by shard exactly as the same bytes read from a local file, a prefix's or glob's
objects numbered (rows and bytes) one after another, a shard read in ranged reads of its own bytes
alone (as the server saw them), and an object changed after planning refused with one line."""

import codecs
import dataclasses
import json

import pytest
from helpers import read_by_shard
from s3_server import CharTokenizer, RecordingS3Server, fresh_bucket

from raygrad.dataset.formats import describe_source
from raygrad.dataset.shards import load_texts, plan_shards, read_rows
from raygrad.errors import RaygradError

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

MAX_LENGTH = 24
SUFFIX = {"text": "txt", "json": "jsonl", "csv": "csv"}


def long_text(i: int) -> str:
    return f"Text number {i}: a sentence long enough to pass the length filter of fifty characters."


def text_bytes(first: int, count: int) -> bytes:
    """Lines of one text each, among blank and short lines, a CRLF and a byte that is not UTF-8."""
    lines = []
    for i in range(first, first + count):
        lines.append(long_text(i).encode())
        lines.append(b"short" if i % 3 == 0 else b"" if i % 3 == 1 else long_text(-i).encode() + b" \xff")
    return b"\r\n".join(lines[:2]) + b"\r\n" + b"\n".join(lines[2:]) + b"\n"


def json_bytes(first: int, count: int) -> bytes:
    """One object a line, among blank lines, objects without the column and values that are not text."""
    lines = []
    for i in range(first, first + count):
        lines.append(json.dumps({"id": i, "text": long_text(i)}))
        lines.append(["", json.dumps({"id": i}), json.dumps({"text": None}), json.dumps({"text": 7})][i % 4])
    return ("\n".join(lines) + "\n").encode()


def csv_bytes(first: int, count: int, bom: bool = True) -> bytes:
    """A header, quoted fields holding commas and line ends, empty and numeric cells, a BOM."""
    rows = ["id,text,note"]
    for i in range(first, first + count):
        rows.append(f'{i},"{long_text(i)}, with a comma\nand a second line",x')
        rows.append([f"{i},,empty", f"{i},3.5,number", f'{i},"{long_text(-i)}",y', ""][i % 4])
    data = ("\r\n".join(rows) + "\r\n").encode()
    return codecs.BOM_UTF8 + data if bom else data


MAKE = {"text": text_bytes, "json": json_bytes, "csv": csv_bytes}


@pytest.fixture(scope="module")
def server():
    server = RecordingS3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3(server, monkeypatch, tmp_path):
    """-> (s3fs filesystem, a fresh bucket's name), reached as a node would: the environment alone."""
    yield from fresh_bucket(server, monkeypatch, tmp_path)


def plan(source, **options):
    return plan_shards(source, None, CharTokenizer(), MAX_LENGTH, **options)




def without_bytes(layout):
    return dataclasses.replace(layout, shards=[dataclasses.replace(s, byte_start=None, byte_stop=None)
                                               for s in layout.shards])


@pytest.mark.parametrize("shard_texts", [1, 3, None])
@pytest.mark.parametrize("kind", ["text", "json", "csv"])
def test_an_object_plans_and_reads_as_the_local_file(s3, tmp_path, kind, shard_texts):
    fs, bucket = s3
    data = MAKE[kind](0, 12)
    local = tmp_path / f"texts.{SUFFIX[kind]}"
    local.write_bytes(data)
    url = f"s3://{bucket}/corpus/texts.{SUFFIX[kind]}"
    fs.pipe(url, data)

    remote, here = describe_source(url), describe_source(str(local))
    assert remote["kind"] == here["kind"] == kind
    assert remote["objects"][0]["identity"]["size"] == len(data) and remote["objects"][0]["identity"]["ETag"]
    remote_layout, local_layout = plan(remote, shard_texts=shard_texts), plan(here, shard_texts=shard_texts)
    assert remote_layout == local_layout  # rows, bytes, texts, token estimates, fingerprints, skipped counts
    assert len(remote_layout.shards) > 1 or shard_texts is None
    assert sum(remote_layout.skipped.values()) > 0  # the filter saw what the local read sees
    assert read_by_shard(remote, remote_layout) == read_by_shard(here, local_layout)
    assert load_texts(url, None) == load_texts(str(local), None)


def test_lone_cr_line_ends_are_read_as_the_local_file(s3, tmp_path):
    """An old Mac file (a lone \\r ends a line): planning records it, so a worker need not read the start."""
    fs, bucket = s3
    data = b"\r".join(long_text(i).encode() for i in range(9)) + b"\r\n" + long_text(9).encode() + b"\r"
    local = tmp_path / "mac.txt"
    local.write_bytes(data)
    fs.pipe(f"{bucket}/mac.txt", data)
    remote, here = describe_source(f"s3://{bucket}/mac.txt"), describe_source(str(local))
    assert remote["objects"][0]["lone_cr_ends_lines"] is True
    remote_layout, local_layout = plan(remote, shard_texts=2), plan(here, shard_texts=2)
    assert remote_layout == local_layout and len(remote_layout.shards) == 5
    assert read_by_shard(remote, remote_layout) == read_by_shard(here, local_layout)


@pytest.mark.parametrize("named", ["corpus/*.{suffix}", "corpus/", "corpus"])
@pytest.mark.parametrize("kind", ["text", "json", "csv"])
def test_a_prefix_numbers_rows_and_bytes_across_its_objects_in_sorted_order(s3, tmp_path, kind, named):
    """Rows and bytes run on from one object to the next, as in the objects concatenated (CSV: one
    header, then every object's records); a shard may span two objects."""
    fs, bucket = s3
    suffix = SUFFIX[kind]
    parts = {"b": MAKE[kind](5, 4), "a": MAKE[kind](0, 5), "c": MAKE[kind](9, 3)}  # written out of order
    for name, data in parts.items():
        fs.pipe(f"{bucket}/corpus/{name}.{suffix}", data)
    fs.pipe(f"{bucket}/corpus/notes.md", b"not a dataset file")
    ordered = [parts[name] for name in "abc"]
    local = tmp_path / f"all.{suffix}"
    if kind == "csv":  # one header: each object's records after it
        header = ordered[0].index(b"\r\n") + 2
        local.write_bytes(ordered[0] + b"".join(data[header:] for data in ordered[1:]))
    else:
        local.write_bytes(b"".join(ordered))

    remote = describe_source(f"s3://{bucket}/{named.format(suffix=suffix)}")
    assert [obj["url"] for obj in remote["objects"]] == [f"s3://{bucket}/corpus/{name}.{suffix}" for name in "abc"]
    here = describe_source(str(local))
    remote_layout, local_layout = plan(remote, shard_texts=4), plan(here, shard_texts=4)
    if kind == "csv":  # the objects' own headers shift their bytes
        assert without_bytes(remote_layout) == without_bytes(local_layout)
    else:
        assert remote_layout == local_layout
    sizes = [len(data) for data in ordered]
    assert any(s.byte_start < sizes[0] < s.byte_stop for s in remote_layout.shards)  # one spans two objects
    results = read_by_shard(remote, remote_layout)
    assert results == read_by_shard(here, local_layout)
    assert [row for _, rows, _, _ in results for row in rows] == \
        [row for _, rows, _, _ in read_by_shard(here, local_layout) for row in rows]


@pytest.mark.parametrize("kind", ["text", "json", "csv"])
def test_a_shard_is_read_in_ranged_reads_of_its_own_bytes(s3, server, kind):
    """As the server saw it: a shard's read asks for its bytes and no others (one object; and a shard
    across two objects, the end of one and the start of the next)."""
    fs, bucket = s3
    suffix = SUFFIX[kind]
    first, second = MAKE[kind](0, 40), MAKE[kind](40, 40, **({"bom": False} if kind == "csv" else {}))
    fs.pipe(f"{bucket}/two/a.{suffix}", first)
    fs.pipe(f"{bucket}/two/b.{suffix}", second)
    source = describe_source(f"s3://{bucket}/two/")
    layout = plan(source, shard_texts=7)
    assert len(layout.shards) > 8

    one = next(s for s in layout.shards[2:] if s.byte_stop < len(first))
    server.clear()
    texts, rows, fingerprint = read_rows(source, one)
    assert fingerprint == one.fingerprint and len(texts) == 7
    reads = server.reads(f"/{bucket}/two/a.{suffix}")
    assert reads and all(r.range is not None for r in reads)
    assert sorted(r.range for r in reads) == [(one.byte_start, one.byte_stop)]
    assert sum(r.sent for r in reads) == one.byte_stop - one.byte_start < len(first) / 5
    assert not server.reads(f"/{bucket}/two/b.{suffix}")

    across = next(s for s in layout.shards if s.byte_start < len(first) < s.byte_stop)
    server.clear()
    assert read_rows(source, across)[2] == across.fingerprint
    assert [r.range for r in server.reads(f"/{bucket}/two/a.{suffix}")] == [(across.byte_start, len(first))]
    body = source["objects"][1].get("csv_body", 0)  # a CSV's header was read when planning
    assert [r.range for r in server.reads(f"/{bucket}/two/b.{suffix}")] == \
        [(body, across.byte_stop - len(first))]


@pytest.mark.parametrize("change", ["same size", "longer", "gone"])
@pytest.mark.parametrize("kind", ["text", "json", "csv"])
def test_an_object_changed_after_planning_is_refused_with_one_line(s3, kind, change):
    fs, bucket = s3
    url = f"s3://{bucket}/texts.{SUFFIX[kind]}"
    data = MAKE[kind](0, 12)
    fs.pipe(url, data)
    source = describe_source(url)
    layout = plan(source, shard_texts=2)
    shard = layout.shards[2]
    read_rows(source, shard)  # as planned: read

    if change == "gone":
        fs.rm(url)
    else:
        changed = MAKE[kind](1, 12)  # other texts: one digit more in one number
        fs.pipe(url, changed[:len(data)] if change == "same size" else changed + b"\n")
    with pytest.raises(RaygradError) as refused:
        read_rows(source, shard)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--dataset {url}: ")
    assert shard.rows_text() in message
    if change == "gone":
        assert "the object is gone since the run was planned" in message
    else:
        assert "changed since the run was planned" in message and "ETag" in message


def sample_object(suffix: str, texts: list[str]) -> bytes:
    if suffix == "parquet":
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.table({"text": texts}), buffer, row_group_size=2)
        return buffer.getvalue()
    if suffix == "jsonl":
        return "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
    if suffix == "csv":
        return ("text\n" + "".join(f'"{text}"\n' for text in texts)).encode()
    return "".join(text + "\n" for text in texts).encode()


@pytest.mark.parametrize("suffix", ["parquet", "jsonl", "txt", "csv"])
def test_a_resume_after_the_object_changed_stops_with_one_line(s3, tiny_llama, tmp_path, capsys, monkeypatch,
                                                               suffix):
    """The whole CLI: a run stopped after its first shard, its object replaced, then resumed: the
    resume stops at the first shard it reads, with one line naming the object and the shard's rows."""
    from helpers import build_config, killed_run, run_cli

    fs, bucket = s3
    url = f"s3://{bucket}/corpus/texts.{suffix}"
    texts = [long_text(i) for i in range(4)]
    fs.pipe(url, sample_object(suffix, texts))
    run_dir = killed_run(build_config(tiny_llama, url, tmp_path / "out", shard_size=1, num_samples=4), 2)
    fs.pipe(url, sample_object(suffix, [text.replace("sentence", "Sentence") for text in texts]))  # same size

    code, out, err = run_cli(["run", "--resume", str(run_dir), "--no-progress"], capsys, monkeypatch)
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert f"--dataset {url}: the object changed since the run was planned (ETag " in errors[0]
    assert "the shard of rows 1-1 cannot be read as planned" in errors[0]
