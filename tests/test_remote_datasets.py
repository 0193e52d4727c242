"""Parquet datasets by URL, on a real S3 API served from 127.0.0.1 (moto's server, as s3fs tests
itself): planned and read by shard exactly as the same file read locally, a glob's objects numbered
across, an object changed after planning refused, and a worker reading only its own row groups."""

import io
import random
import sys

import numpy as np
import pytest
from helpers import read_by_shard, run_tiny
from s3_server import CharTokenizer, RecordingS3Server, fresh_bucket

from raygrad.dataset.formats import describe_source
from raygrad.dataset.shards import load_texts, plan_shards, read_rows
from raygrad.dataset.text import absolute_if_local
from raygrad.errors import RaygradError
from raygrad.model.pins import pin_dataset

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

LONG = [f"Text number {i}: a sentence long enough to pass the length filter of fifty characters." for i in range(40)]
MAX_LENGTH = 24


@pytest.fixture(scope="module")
def server():
    server = RecordingS3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3(server, monkeypatch, tmp_path):
    """-> (s3fs filesystem, a fresh bucket's name); credentials and endpoint only as a node would give
    them, in its environment."""
    yield from fresh_bucket(server, monkeypatch, tmp_path)


def parquet_bytes(values, row_group_size=3) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": values}), buffer, row_group_size=row_group_size)
    return buffer.getvalue()


def mixed_values(offset=0):
    """Usable texts among nulls and short ones, over several row groups."""
    long = LONG[offset:]
    return [long[0], None, "short", long[1], long[2], None, long[3], long[4], "x", long[5], long[6], long[7],
            long[8], "tiny", long[9]]


def plan(source, **options):
    return plan_shards(source, None, CharTokenizer(), MAX_LENGTH, **options)




@pytest.mark.parametrize("shard_texts", [1, 2, 4, None])
def test_s3_parquet_plans_and_reads_as_the_local_file(s3, tmp_path, shard_texts):
    fs, bucket = s3
    data = parquet_bytes(mixed_values())
    local = tmp_path / "texts.parquet"
    local.write_bytes(data)
    fs.pipe(f"{bucket}/corpus/texts.parquet", data)

    remote = describe_source(f"s3://{bucket}/corpus/texts.parquet")
    here = describe_source(str(local))
    assert remote["kind"] == "parquet" and [obj["rows"] for obj in remote["objects"]] == [15]
    assert remote["objects"][0]["identity"]["size"] == len(data) and remote["objects"][0]["identity"]["ETag"]
    remote_layout, local_layout = plan(remote, shard_texts=shard_texts), plan(here, shard_texts=shard_texts)
    assert remote_layout == local_layout  # rows, texts, token estimates, fingerprints, skipped counts
    assert len(remote_layout.shards) > 1 or shard_texts is None
    assert read_by_shard(remote, remote_layout) == read_by_shard(here, local_layout)
    assert load_texts(f"s3://{bucket}/corpus/texts.parquet", None) == load_texts(str(local), None)


@pytest.mark.parametrize("named", ["corpus/*.parquet", "corpus/", "corpus"])
def test_a_glob_or_prefix_numbers_rows_across_its_objects_in_sorted_order(s3, tmp_path, named):
    fs, bucket = s3
    first, second = mixed_values(), mixed_values(20)
    fs.pipe(f"{bucket}/corpus/b.parquet", parquet_bytes(second, row_group_size=4))  # written first, read second
    fs.pipe(f"{bucket}/corpus/a.parquet", parquet_bytes(first))
    fs.pipe(f"{bucket}/corpus/notes.md", b"not a dataset file")
    local = tmp_path / "both.parquet"
    local.write_bytes(parquet_bytes(first + second, row_group_size=5))  # other row groups, the same rows

    remote = describe_source(f"s3://{bucket}/{named}")
    assert [obj["url"] for obj in remote["objects"]] == [f"s3://{bucket}/corpus/a.parquet",
                                                         f"s3://{bucket}/corpus/b.parquet"]
    here = describe_source(str(local))
    remote_layout, local_layout = plan(remote, shard_texts=3), plan(here, shard_texts=3)
    assert remote_layout == local_layout
    results = read_by_shard(remote, remote_layout)
    assert results == read_by_shard(here, local_layout)
    rows = [row for _, shard_rows, _, _ in results for row in shard_rows]
    assert rows[-1] == len(first) + len(second) - 1  # the second object's rows follow the first's


def test_an_object_changed_after_planning_is_refused_with_one_line(s3):
    fs, bucket = s3
    url = f"s3://{bucket}/texts.parquet"
    fs.pipe(f"{bucket}/texts.parquet", parquet_bytes(mixed_values()))
    source = describe_source(url)
    layout = plan(source, shard_texts=2)
    read_rows(source, layout.shards[1])  # as planned: read

    fs.pipe(f"{bucket}/texts.parquet", parquet_bytes(mixed_values(1)))  # same size, other texts
    with pytest.raises(RaygradError) as changed:
        read_rows(source, layout.shards[1])
    message = str(changed.value)
    assert "\n" not in message
    assert url in message and "changed since the run was planned" in message and "ETag" in message
    assert layout.shards[1].rows_text() in message

    fs.rm(f"{bucket}/texts.parquet")
    with pytest.raises(RaygradError, match="the object is gone since the run was planned") as gone:
        read_rows(source, layout.shards[0])
    assert url in str(gone.value) and layout.shards[0].rows_text() in str(gone.value)


def test_a_url_is_never_a_path_nor_a_hub_id(s3, monkeypatch, tmp_path):
    fs, bucket = s3
    missing = f"s3://{bucket}/corpus/texts.parquet"
    with pytest.raises(RaygradError, match=f"^--dataset {missing}: no such object$"):
        describe_source(missing)  # not "s3:/..."
    assert absolute_if_local(missing) == missing
    assert pin_dataset(missing) == {"kind": "url", "url": missing}

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as where gcsfs is not installed
    with pytest.raises(RaygradError, match=r"^--dataset gs://b/dir: reading gs:// URLs needs the gcsfs package "
                                           r"on every node \(pip install gcsfs\)$"):
        describe_source("gs://b/dir")  # not taken for a hub id

    local = tmp_path / "texts.parquet"
    local.write_bytes(parquet_bytes(mixed_values()))
    through_fsspec = describe_source(f"file://{local}")
    assert through_fsspec["objects"][0]["url"] == f"file://{local}"
    assert plan(through_fsspec, shard_texts=2) == plan(describe_source(str(local)), shard_texts=2)


def test_a_prefix_of_several_formats_is_one_line(s3):
    fs, bucket = s3
    fs.pipe(f"{bucket}/mixed/a.jsonl", b'{"text": "a"}\n')
    fs.pipe(f"{bucket}/mixed/b.parquet", parquet_bytes(mixed_values()))
    with pytest.raises(RaygradError, match=rf"^--dataset s3://{bucket}/mixed: holds files of several formats "
                                           rf"\(json, parquet\); name the files of one with a glob, e\.g\. "
                                           rf"s3://{bucket}/mixed/\*\.parquet$"):
        describe_source(f"s3://{bucket}/mixed")
    assert describe_source(f"s3://{bucket}/mixed/*.jsonl")["kind"] == "json"


def test_a_worker_reads_only_its_own_row_groups(s3, server):
    """One shard of an object of 32 row groups: ranged reads of its row group's text column (its footer
    was read here when planning, and the object is still the one pinned), a small part of the object."""
    fs, bucket = s3
    words = random.Random(0)
    texts = [" ".join(f"{words.getrandbits(40):x}" for _ in range(40)) for _ in range(32 * 64)]
    data = parquet_bytes(texts, row_group_size=64)
    fs.pipe(f"{bucket}/big.parquet", data)
    source = describe_source(f"s3://{bucket}/big.parquet")
    layout = plan(source, shard_texts=64)
    assert len(layout.shards) == 32

    server.clear()
    got, rows, fingerprint = read_rows(source, layout.shards[17])
    assert rows == list(range(17 * 64, 18 * 64)) and fingerprint == layout.shards[17].fingerprint
    fetched = server.reads(f"/{bucket}/big.parquet")  # as the server saw them
    read_bytes = sum(request.sent for request in fetched)
    print(f"one shard of 32: {read_bytes} bytes in {len(fetched)} ranged reads of a {len(data)}-byte object")
    column = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(17).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    assert [request.range for request in fetched] == [(start, start + column.total_compressed_size)]
    assert read_bytes < len(data) / 16


def test_a_run_on_an_s3_parquet_equals_the_run_on_the_local_file(s3, tiny_llama, texts_file, tmp_path):
    fs, bucket = s3
    data = parquet_bytes(load_texts(str(texts_file), None, min_chars=0), row_group_size=2)
    local = tmp_path / "texts.parquet"
    local.write_bytes(data)
    fs.pipe(f"{bucket}/texts.parquet", data)

    _, here = run_tiny(tiny_llama, local, tmp_path / "local", shard_size=2)
    run_dir, there = run_tiny(tiny_llama, f"s3://{bucket}/texts.parquet", tmp_path / "s3", shard_size=2)
    assert set(here.sums) == set(there.sums)
    for name in here.sums:  # the same texts in the same shards: the same sums, bit for bit
        np.testing.assert_array_equal(here.sums[name], there.sums[name], err_msg=name)
    np.testing.assert_array_equal(here.tokens, there.tokens)
    assert here.loss_tokens == there.loss_tokens and here.loss_sum == there.loss_sum
    assert not (tmp_path / "s3:").exists() and not any(path.name == "s3:" for path in tmp_path.rglob("*"))
