"""Runs on two Ray workers over s3:// (moto's S3 API on 127.0.0.1, reached through the environment
alone, as each node would) equal the same files read locally in this process: counts and top-K tables
exactly, sums to float64 rounding, for parquet, .jsonl, .txt and .csv. The server's request log, each
read traced to the process that sent it, shows what every worker fetched: a line format's shard ranges
exactly, each once; of a parquet object, its footer and its shards' text column chunks, never the rest
of the object. One local Ray for the module (its processes inherit the endpoint, as a node's would)."""

import csv
import io
import json
import logging
import os
import random
import uuid

import numpy as np
import pytest
from helpers import assert_same_totals, run_tiny
from s3_server import RecordingS3Server, use_endpoint
from tiny import SAMPLE_TEXTS

from raygrad import constants as names
from raygrad.plan import Plan
from raygrad.store.zarr_store import ResultStore

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

# 12 usable texts among 2 short ones; a shard of 2 texts: 6 shards for the 2 workers
TEXTS = [f"{text} (copy {i})" for i in range(2) for text in SAMPLE_TEXTS]
RUN = dict(num_samples=12, batch_size=2, max_length=16, shard_size=2, top_examples=4, layers="0,2")
PADDING_BYTES = 20_000  # a parquet row's second column, never read: most of the object's bytes
FOOTER_READ_BYTES = 64 << 10  # what pyarrow reads from a parquet file's end to find its footer


def parquet_bytes() -> bytes:
    noise = random.Random(0)
    padding = [noise.randbytes(PADDING_BYTES) for _ in TEXTS]  # incompressible
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": TEXTS, "padding": padding}), buffer, row_group_size=2)  # rows 2g, 2g + 1
    return buffer.getvalue()


def csv_bytes() -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "text"])
    writer.writerows(enumerate(TEXTS))
    return buffer.getvalue().encode()


OBJECTS = {
    "parquet": parquet_bytes,
    "jsonl": lambda: "".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(TEXTS)).encode(),
    "txt": lambda: "".join(text + "\n" for text in TEXTS).encode(),
    "csv": csv_bytes,
}


@pytest.fixture(scope="module")
def ray_over_s3(tmp_path_factory):
    """-> (the server, its s3fs filesystem, a bucket), with this module's local Ray on 127.0.0.1
    started after the endpoint is in the environment, so its workers reach the server too."""
    import ray

    from raygrad.cluster.runtime import local_runtime_env

    server = RecordingS3Server(who_asked=True).start()
    with pytest.MonkeyPatch.context() as patch:
        use_endpoint(patch, server.endpoint, tmp_path_factory.mktemp("aws"))
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        bucket = f"raygrad-{uuid.uuid4().hex[:12]}"
        fs.mkdir(bucket)
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
                 log_to_driver=False, logging_level=logging.ERROR, runtime_env=local_runtime_env())
        try:
            yield server, fs, bucket
        finally:
            ray.shutdown()
            server.stop()
            s3fs.S3FileSystem.clear_instance_cache()


def text_column_chunks(data: bytes) -> list[tuple[int, int]]:
    """Each row group's text column chunk, [start, stop) in the file, by its metadata."""
    metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    chunks = []
    for group in range(metadata.num_row_groups):
        column = metadata.row_group(group).column(0)
        start = column.dictionary_page_offset or column.data_page_offset
        chunks.append((start, start + column.total_compressed_size))
    return chunks


@pytest.mark.parametrize("suffix", ["parquet", "jsonl", "txt", "csv"])
def test_two_ray_workers_over_s3_equal_the_local_file(ray_over_s3, tiny_llama, tmp_path, suffix):
    server, fs, bucket = ray_over_s3
    data = OBJECTS[suffix]()
    local = tmp_path / f"texts.{suffix}"
    local.write_bytes(data)
    key = f"{bucket}/corpus/texts.{suffix}"
    fs.pipe(key, data)
    server.clear()

    _, here = run_tiny(tiny_llama, local, tmp_path / "local", workers=0, **RUN)
    run_dir, there = run_tiny(tiny_llama, f"s3://{key}", tmp_path / "s3", workers=2, **RUN)
    assert_same_totals(here, there)  # tokens and loss tokens exactly, sums to float64 rounding
    assert set(here.examples) == set(there.examples) and here.examples
    for name, table in here.examples.items():
        np.testing.assert_array_equal(table, there.examples[name], err_msg=name)

    plan = Plan.from_dict(ResultStore.open(run_dir / names.STORE_NAME).attrs[names.ATTR_PLAN])
    assert len(plan.shards) == 6 and plan.samples == 12
    reads = server.reads(f"/{key}")
    assert all(read.pid is not None for read in reads)  # every read traced to this process or a worker
    by_worker = [read for read in reads if read.pid != os.getpid()]
    assert by_worker and all(read.range is not None for read in by_worker)
    print(f"{suffix}: {len(data)} bytes; workers {sorted({r.pid for r in by_worker})} read "
          f"{sum(r.sent for r in by_worker)} bytes in {len(by_worker)} ranged reads")
    if suffix == "parquet":
        tail = (len(data) - min(len(data), FOOTER_READ_BYTES), len(data))
        chunks = text_column_chunks(data)
        for read in by_worker:  # the footer, or one row group's text column: never another column's bytes
            start, stop = read.range
            assert (tail[0] <= start and stop <= tail[1]) or any(a <= start and stop <= b for a, b in chunks), \
                read
        assert tail[1] - tail[0] < len(data) / 3  # the footer read is a small part of the object
        # each shard's row groups' text columns, one read each (a group two shards share: once for each)
        wanted = [chunks[group] for shard in plan.shards for group in range(len(chunks))
                  if shard.row_start < 2 * group + 2 and 2 * group < shard.row_stop]
        assert sorted(read.range for read in by_worker if read.range[0] < tail[0]) == \
            sorted(chunk for chunk in wanted if chunk[0] < tail[0])
    else:  # each shard's bytes, each once, and nothing else
        assert sorted(read.range for read in by_worker) == [(s.byte_start, s.byte_stop) for s in plan.shards]
        assert sum(read.sent for read in by_worker) == plan.shards[-1].byte_stop - plan.shards[0].byte_start
