"""Planning a dataset by URL: `raygrad run --dry-run` on a ~100M-token parquet served by a local S3
API (moto's, on 127.0.0.1), against the same file read from the local disk, run side by side.

It writes the corpus (benchmarks/head.py's rows: 125 common English words, row groups of 8,192 rows),
sized to --tokens target tokens by the planning tokenizer (the tiny model's, tests/tiny.py, measured
on the corpus's own rows at --max-length 512, which cuts none of them), puts it in a bucket, then runs
the whole `raygrad run --dry-run` process, alternately on the local path and on s3://..., --repeats
times each (AWS_ENDPOINT_URL and dummy keys in its environment, as a node would have them). Printed
per run: wall time, the process's peak RSS (its VmHWM when it exits), and for s3:// the bytes the
server sent and its requests, against the object's size; then the median ratios s3 / local.

What planning reads: every row's text (one streaming pass, a row group at a time): the shards are cut
by each usable text's characters, the --min-chars filter needs each text's length, and each shard's
fingerprint digests its texts. Parquet metadata (row counts, column sizes) could size an estimate,
not the cuts or the fingerprints, so the pass reads the text column whole: the bytes read are about
the object's size. moto's server copies the whole object on every ranged GET (FakeKey.value), so
on s3:// part of the wall time is the test server's, in this process, on the same cores (printed:
its seconds handling the run's requests, before sending each answer).

    python benchmarks/remote_dry_run.py [--tokens 1e8] [--repeats 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from head import TOKENS_PER_ROW, tiny_model, write_corpus  # noqa: E402 (after the path)
from s3_server import RecordingS3Server  # noqa: E402

# `raygrad run` as its console script runs it, writing the process's peak RSS (VmHWM, kB) when it exits:
# ru_maxrss from wait4 would also count the forked copy of this process (the server and its object)
CLI_REPORTING_PEAK = """
import atexit, sys
peak_file = sys.argv.pop(1)
def write_peak():
    with open("/proc/self/status") as status, open(peak_file, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(write_peak)
sys.argv[0] = "raygrad"
from raygrad.cli import main
main()
"""
MAX_LENGTH = 512  # longer than any row by the tiny tokenizer: every token counts
SAMPLE_ROWS = 2000  # rows tokenized to learn the corpus's tokens per row


def target_tokens_per_row(model: Path, workdir: Path) -> float:
    """The planning tokenizer's target tokens per row of this corpus (its first SAMPLE_ROWS rows)."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    sample = workdir / "sample.parquet"
    write_corpus(sample, SAMPLE_ROWS * TOKENS_PER_ROW)
    texts = pq.read_table(sample).column("text").to_pylist()
    ids = AutoTokenizer.from_pretrained(model)(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    return sum(len(row) - 1 for row in ids) / len(ids)


def node_environment(endpoint: str, scratch: Path) -> dict:
    """A node's environment: the endpoint and (dummy) keys in the standard variables, no AWS files."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="benchmark", AWS_SECRET_ACCESS_KEY="benchmark",
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=str(scratch / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(scratch / "none"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def dry_run(model: Path, dataset: str, output_dir: Path, env: dict, log: Path) -> dict:
    """One whole `raygrad run --dry-run` process -> wall seconds, peak RSS bytes, the plan's figures."""
    peak_file = log.with_suffix(".peak")
    command = [sys.executable, "-c", CLI_REPORTING_PEAK, str(peak_file), "run", "--dry-run", "--model", str(model),
               "--dataset", dataset, "--num-samples", "all", "--max-length", str(MAX_LENGTH), "--workers", "0",
               "--output-dir", str(output_dir), "--no-progress"]
    with open(log, "w") as out:
        started = time.perf_counter()
        returncode = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - started
    text = log.read_text()
    if returncode:
        sys.exit(f"raygrad {' '.join(command[4:])} exited {returncode}:\n{text[-2000:]}")
    texts = re.search(r"^texts\s+([\d,]+)", text, re.M)
    tokens = re.search(r"^tokens\s+about ([\d,]+)", text, re.M)
    shards = re.search(r"^shards\s+(\d+)", text, re.M)
    return {"seconds": seconds, "peak_rss": int(peak_file.read_text()) * 1024, "texts": int(texts[1].replace(",", "")),
            "tokens": int(tokens[1].replace(",", "")), "shards": int(shards[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, default=1e8, help="target tokens by the planning tokenizer")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved")
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the model and corpus (default: temporary)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        model = tiny_model(workdir)
        per_row = target_tokens_per_row(model, workdir)
        rows = round(args.tokens / per_row)
        corpus = workdir / f"corpus_{rows}_rows.parquet"
        if not corpus.exists():
            write_corpus(corpus, rows * TOKENS_PER_ROW)
        size = corpus.stat().st_size
        print(f"corpus   {corpus.name}: {rows:,} rows, {size / 2**20:,.1f} MiB, about {per_row:.1f} target tokens "
              f"a row by the tiny model's tokenizer")

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
        server = RecordingS3Server().start()
        try:
            env = node_environment(server.endpoint, Path(scratch))
            import s3fs

            fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, key="benchmark", secret="benchmark")
            bucket = f"raygrad-{uuid.uuid4().hex[:8]}"
            fs.mkdir(bucket)
            fs.put_file(str(corpus), f"{bucket}/corpus.parquet")
            url, key = f"s3://{bucket}/corpus.parquet", f"/{bucket}/corpus.parquet"
            results = {"local": [], "s3": []}
            for repeat in range(args.repeats):
                for case, dataset in (("local", str(corpus)), ("s3", url)):
                    server.clear()
                    figures = dry_run(model, dataset, workdir / "runs", env, workdir / f"{case}-{repeat}.log")
                    reads = server.reads(key)
                    figures.update(read=sum(r.sent for r in reads), gets=len(reads),
                                   requests=len(server.requests), server=sum(r.seconds for r in server.requests))
                    results[case].append(figures)
                    print(f"{case:<6} run {repeat + 1}: {figures['seconds']:6.1f} s, peak RSS "
                          f"{figures['peak_rss'] / 2**20:7.1f} MiB, {figures['texts']:,} texts, about "
                          f"{figures['tokens']:,} target tokens in {figures['shards']} shards"
                          + (f"; read {figures['read']:,} bytes of {size:,} ({figures['read'] / size:.3f}) "
                             f"in {figures['gets']} GETs ({figures['requests']} requests, {figures['server']:.1f} s "
                             "in the server)" if case == "s3" else ""))
        finally:
            server.stop()
        median = {case: {name: statistics.median(run[name] for run in runs) for name in ("seconds", "peak_rss")}
                  for case, runs in results.items()}
        print(f"median   local {median['local']['seconds']:.1f} s, {median['local']['peak_rss'] / 2**20:.1f} MiB; "
              f"s3 {median['s3']['seconds']:.1f} s, {median['s3']['peak_rss'] / 2**20:.1f} MiB")
        print(f"ratio    s3 / local: wall {median['s3']['seconds'] / median['local']['seconds']:.2f}, peak RSS "
              f"{median['s3']['peak_rss'] / median['local']['peak_rss']:.2f}; bytes read / object size "
              f"{statistics.median(run['read'] for run in results['s3']) / size:.3f}")


if __name__ == "__main__":
    main()
