"""Where a whole process's seconds go before its first batch and after its last: the default
`raygrad run` (in-process) beside the bare loop of benchmarks/whole_process.py, each a fresh Python
process on the same texts (the bundled corpus joined into texts of --max-length tokens), the bundled
SmolLM2-135M, all 30 layers.

Each process is timed from inside: a wrapper records when each phase starts and ends, and the phases
are printed side by side (wall seconds; the machine's load stretches them, so processes alternate
and each row keeps its best of --repeats). `exit` is the end of the last phase to the process's end
as the parent saw it (interpreter and thread shutdown).

    python benchmarks/startup.py [--samples 32] [--max-length 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHASES_ENV = "RAYGRAD_STARTUP_PHASES"  # where a traced process writes its phases (JSON)


class Phases:
    """Phase name -> (first start, last end), seconds since the process's clock origin."""

    def __init__(self):
        self.spans: dict[str, list[float]] = {}

    def timed(self, name: str, function):
        @functools.wraps(function)
        def timed_call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                span = self.spans.setdefault(name, [started, started])
                span[1] = time.perf_counter()
        return timed_call

    def patch(self, owner, attribute: str, name: str) -> None:
        setattr(owner, attribute, self.timed(name, getattr(owner, attribute)))

    def save(self, started: float) -> None:
        spans = {name: [start - started, end - started] for name, (start, end) in self.spans.items()}
        Path(os.environ[PHASES_ENV]).write_text(json.dumps({"spans": spans, "end": time.perf_counter() - started}))


def traced_raygrad(argv: list[str], started: float) -> None:
    """`raygrad run ARGS` with its phases recorded (run with --traced-raygrad)."""
    phases = Phases()
    import_started = time.perf_counter()
    from raygrad import cli, engine, plan
    from raygrad.compute.worker import ShardComputer, ShardRunner
    from raygrad.store.zarr_store import ResultStore
    phases.spans["import raygrad (torch)"] = [import_started, time.perf_counter()]

    phases.patch(plan, "load_model_config", "plan: model config (transformers)")
    phases.patch(plan, "_skeleton", "plan: meta skeleton")
    phases.patch(engine, "make_plan", "plan (resolve, pins)")
    phases.patch(engine, "_plan_shards", "shards (tokenizer, one pass)")
    phases.patch(ResultStore, "create", "store created")
    phases.patch(ShardRunner, "__init__", "model load")
    phases.patch(ShardComputer, "compute_tokens", "compute (every batch)")
    phases.patch(ResultStore, "finalize", "finalize")
    phases.patch(engine, "_export", "export")
    sys.argv = ["raygrad", *argv]
    try:
        cli.main()
    except SystemExit as done:
        if done.code:
            raise
    finally:
        phases.save(started)


def traced_bare(path: str, max_length: int, started: float) -> None:
    """whole_process.py's bare loop with its phases recorded (run with --traced-bare)."""
    phases = Phases()
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch  # noqa: F401
    phases.spans["import torch"] = [started, time.perf_counter()]
    at = time.perf_counter()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 (resolved lazily by transformers)
    phases.spans["import transformers"] = [at, time.perf_counter()]
    phases.patch(transformers.AutoTokenizer, "from_pretrained", "tokenizer")
    phases.patch(transformers.AutoModelForCausalLM, "from_pretrained", "model load")
    import whole_process

    at = time.perf_counter()
    try:
        whole_process.bare(path, max_length)
    finally:
        phases.spans["compute (every batch)"] = [phases.spans.get("model load", [at, at])[1], time.perf_counter()]
        phases.save(started)


def timed(command: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as record:
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", PHASES_ENV: record.name})
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        phases = json.loads(Path(record.name).read_text())
    phases["total"] = seconds
    return phases


def rows(phases: dict) -> dict[str, float]:
    """Phase -> seconds; 'before the first batch' and 'after the last' from the spans themselves."""
    spans, out = phases["spans"], {}
    compute = spans["compute (every batch)"]
    for name, (start, end) in sorted(spans.items(), key=lambda item: item[1][0]):
        out[name] = end - start
    out["before the first batch"] = compute[0]
    out["after the last batch"] = phases["total"] - compute[1]
    out["whole process"] = phases["total"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="each process this many times; the best is kept")
    parser.add_argument("--traced-raygrad", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--traced-bare", default=None, help=argparse.SUPPRESS)
    started = time.perf_counter()
    args = parser.parse_args()
    if args.traced_raygrad is not None:
        traced_raygrad(args.traced_raygrad, started)
        return
    if args.traced_bare:
        traced_bare(args.traced_bare, args.max_length, started)
        return

    sys.path.insert(0, str(REPO / "benchmarks"))
    from one_pass_vs_per_layer import long_texts

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "texts.txt"
        data.write_text("\n".join(long_texts(args.samples, chars=8 * args.max_length)) + "\n")
        run = ["run", "--model", "smollm2-135m", "--dataset", str(data), "--num-samples", str(args.samples),
               "--max-length", str(args.max_length), "--no-progress"]
        commands = {
            "bare": [sys.executable, __file__, "--max-length", str(args.max_length), "--traced-bare", str(data)],
            "default": [sys.executable, __file__, "--traced-raygrad", *run],
        }
        timed(commands["bare"])  # first use converts the bundled model and warms the file cache
        best: dict[str, dict[str, float]] = {name: {} for name in commands}
        for attempt in range(args.repeats):
            for name, command in commands.items():  # interleaved, so drift hits both alike
                if name == "default":
                    command = [*command, "--output-dir", f"{tmp}/run{attempt}"]
                for phase, seconds in rows(timed(command)).items():
                    best[name][phase] = min(best[name].get(phase, float("inf")), seconds)
    print(f"{args.samples} texts x {args.max_length} tokens, smollm2-135m, 30 layers, best of {args.repeats} "
          "(wall seconds per phase)")
    for name, phases in best.items():
        print(f"\n{name}")
        for phase, seconds in phases.items():
            print(f"  {phase:32} {seconds:7.2f}")
    for edge in ("before the first batch", "after the last batch", "whole process"):
        print(f"{edge}: default - bare = {best['default'][edge] - best['bare'][edge]:+.2f} s")


if __name__ == "__main__":
    main()
