"""The head's planning pass with --prompt-column/--completion-column against the same texts plain.

A prompt/completion run's planning pass tokenizes every row's prompt (a row whose prompt fills --max-length
keeps no completion token and is skipped, counted in the plan); a plain run's tokenizes only its first 500
texts (the tokens-per-character sample). This times raygrad.dataset.shards.plan_shards on N rows of JSON
Lines, each a 30-word prompt and a 60-word completion (seeded common English words), the plain file
holding each prompt + completion as one text, with SmolLM2's tokenizer (the bundled model's; its first
use converts the model, tens of seconds, not timed). Plain and pairs run interleaved, --repeats times;
printed: each pass's seconds and rows/s, then the median ratio pairs / plain.

The tokenizer threads as `tokenizers` decides (TOKENIZERS_PARALLELISM): set it to false for one core.

    python benchmarks/completion_planning.py [--rows 20000] [--repeats 3] [--max-length 128]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not which but they "
         "one you all we can her has there been if more when will would who so no").split()


def write_files(root: Path, rows: int) -> tuple[Path, Path]:
    rng = random.Random(0)
    pairs = [(" ".join(rng.choice(WORDS) for _ in range(30)), " " + " ".join(rng.choice(WORDS) for _ in range(60)))
             for _ in range(rows)]
    pairs_file, plain_file = root / "pairs.jsonl", root / "plain.jsonl"
    pairs_file.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    plain_file.write_text("".join(json.dumps({"text": p + c}) + "\n" for p, c in pairs))
    return pairs_file, plain_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from raygrad.dataset.formats import describe_source
    from raygrad.dataset.shards import plan_shards
    from raygrad.model.loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    with tempfile.TemporaryDirectory() as tmp:
        pairs_file, plain_file = write_files(Path(tmp), args.rows)
        sources = {"plain": describe_source(str(plain_file)),
                   "pairs": describe_source(str(pairs_file), prompt_column="prompt", completion_column="completion")}
        seconds = {name: [] for name in sources}
        for repeat in range(args.repeats):
            for name, source in sources.items():  # interleaved: a load on the machine hits both alike
                started = time.perf_counter()
                layout = plan_shards(source, None, tokenizer, args.max_length)
                seconds[name].append(time.perf_counter() - started)
                print(f"{name:5}  repeat {repeat}  {seconds[name][-1]:6.2f} s  {args.rows / seconds[name][-1]:8.0f} "
                      f"rows/s  ({layout.samples} texts, {len(layout.shards)} shards)", flush=True)
    ratio = statistics.median(seconds["pairs"]) / statistics.median(seconds["plain"])
    print(f"pairs / plain: {ratio:.2f}x the time (median of {args.repeats})")


if __name__ == "__main__":
    main()
