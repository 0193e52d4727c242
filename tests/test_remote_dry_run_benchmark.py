"""benchmarks/remote_dry_run.py on a small corpus: the whole `raygrad run --dry-run` process plans the
same texts, tokens and shards from s3:// as from the local file, and reads the object about once
(by the server's log), with its figures printed."""

import re
import sys

import pytest
from helpers import load_script

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


def test_remote_dry_run_plans_as_the_local_file_reading_the_object_once(tmp_path, monkeypatch, capsys):
    script = load_script("benchmarks/remote_dry_run.py", monkeypatch)
    monkeypatch.setattr(sys, "argv", ["remote_dry_run.py", "--tokens", "3e5", "--repeats", "1",
                                      "--workdir", str(tmp_path)])
    script.main()
    out = capsys.readouterr().out
    plans = {case: re.search(rf"^{case}\s+run 1: .*?MiB, (.*? shards)", out, re.M)[1] for case in ("local", "s3")}
    assert plans["local"] == plans["s3"] and "texts, about" in plans["s3"]
    read, size = (int(n.replace(",", "")) for n in re.search(r"read ([\d,]+) bytes of ([\d,]+)", out).groups())
    # every row group's text column once (the column is all the object holds: [4, footer)) and the 64 KiB
    # pyarrow reads from the end for the footer (once: kept for the pass), overlapping the last group
    assert size - 4 <= read <= size + (64 << 10)
    assert re.search(r"^ratio\s+s3 / local: wall \d+\.\d\d, peak RSS \d+\.\d\d", out, re.M)
