"""Text sources: local files of each kind, the bundled corpus, the length filter."""

import json
import os
import types

import pytest
from tiny import SAMPLE_TEXTS

from raygrad.dataset.shards import load_texts
from raygrad.dataset.text import stdlib_paragraphs
from raygrad.errors import RaygradError

KEPT = [t for t in SAMPLE_TEXTS if len(t.strip()) > 50]


def test_txt_file_is_one_text_per_line_filtered_by_length(texts_file):
    assert load_texts(str(texts_file), 100) == KEPT
    assert load_texts(str(texts_file), 2) == KEPT[:2]
    assert load_texts(str(texts_file), 100, min_chars=0) == SAMPLE_TEXTS


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_tabular_files_read_the_text_column(suffix, tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"body": SAMPLE_TEXTS, "id": range(len(SAMPLE_TEXTS))})
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(row) for row in frame.to_dict("records")))
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    assert load_texts(str(path), 100, text_column="body") == KEPT
    with pytest.raises(RaygradError, match="--text-column text: not in dataset .*; its columns are body, id"):
        load_texts(str(path), 100)


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "notes.docx"
    path.write_text("x")
    with pytest.raises(RaygradError, match="unknown file type"):
        load_texts(str(path), 3)


def test_bundled_corpus_is_english_prose_in_a_fixed_order():
    first = load_texts("stdlib-docs", 40)
    assert first == load_texts("stdlib-docs", 40)
    assert len(first) == 40 and len(set(first)) == 40
    for text in first:
        assert len(text) > 50 and text[0].isupper() and text.endswith((".", "!", "?"))
        assert ">>>" not in text and "\n" not in text
    letters = sum(c.isalpha() or c.isspace() for text in first for c in text)
    assert letters / sum(len(t) for t in first) > 0.9


def test_bundled_corpus_has_enough_paragraphs_for_the_default_run():
    count = sum(1 for _ in zip(range(600), stdlib_paragraphs()))
    assert count == 600


def test_dataset_directory_goes_through_the_hub_loader(tmp_path):
    import pandas as pd

    (tmp_path / "repo").mkdir()
    pd.DataFrame({"text": SAMPLE_TEXTS}).to_parquet(tmp_path / "repo" / "train.parquet")
    assert load_texts(str(tmp_path / "repo"), 3, split="train") == KEPT[:3]


# --- tokenized from a prefix: what tokenizing the whole text then truncating gives


def run_merging_tokenizer():
    """Byte-level BPE trained on long runs: a token holds up to 1024 '=' or spaces (far more characters
    than data.CUT_CHARS_PER_TOKEN), so a first cut holds too few tokens and must widen."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["=" * 1024, " " * 1024 + "x", "a few words of text"] * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def word_level_tokenizer(specials: bool = True):
    """One token per whitespace-separated word, <unk> for any unknown one: a 100k-character word is one
    token; with <s> and </s> around every text (`specials`), else none (whitespace alone: no token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{word: 3 + i for i, word in enumerate("the a model reads".split())}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if specials:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                                 special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class Recording:
    """A tokenizer that records the longest text it was given; `is_fast` as asked (False: no offsets)."""

    def __init__(self, tokenizer, is_fast: bool = True):
        self.tokenizer, self.is_fast, self.longest, self.calls = tokenizer, is_fast, 0, 0

    def __call__(self, texts, **kwargs):
        self.longest, self.calls = max([self.longest, *map(len, texts)]), self.calls + 1
        return self.tokenizer(texts, **kwargs)


PROSE = " ".join(SAMPLE_TEXTS)
LONG_TEXTS = {
    "prose": PROSE * 300,
    "a run of '=' first": "=" * 200_000 + PROSE,
    "a run of spaces first": " " * 100_000 + PROSE,
    "a run of spaces cut": PROSE + " " * 100_000 + "x",
    "one 100k-character word": "model" * 20_000 + " the model reads",
    "newlines": "\n" * 50_000 + PROSE * 20,
}


@pytest.mark.parametrize("max_length", [2, 8, 32])
@pytest.mark.parametrize("fast", [True, False])
def test_tokenized_from_a_prefix_as_tokenized_whole_then_truncated(max_length, fast, tmp_path):
    """The reference: tokenizer(text, truncation=True, max_length); by a fast tokenizer (offsets) and one
    without offsets, each text long enough to be cut, one too short to be."""
    from tiny import build_tokenizer

    from raygrad.compute.worker import ShardComputer
    from raygrad.dataset.text import CUT_CHARS_PER_TOKEN, CUT_MARGIN_CHARS, tokenize_truncated

    texts = [*LONG_TEXTS.values(), SAMPLE_TEXTS[0]]
    for tokenizer in (build_tokenizer(tmp_path), run_merging_tokenizer(), word_level_tokenizer(),
                      word_level_tokenizer(specials=False)):
        whole = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        recording = Recording(tokenizer, is_fast=fast)
        assert tokenize_truncated(recording, texts, max_length) == whole
        computer = types.SimpleNamespace(tokenizer=tokenizer, max_length=max_length)
        assert ShardComputer.tokenize(computer, texts) == whole  # what a worker runs
        prose = Recording(tokenizer, is_fast=fast)
        tokenize_truncated(prose, [LONG_TEXTS["prose"]], max_length)
        assert prose.longest == max_length * CUT_CHARS_PER_TOKEN + CUT_MARGIN_CHARS, "the prose was cut"


def test_a_cut_holding_too_few_tokens_widens(tmp_path):
    """'=' * 200,000 by the run-merging tokenizer (1024 characters a token): the first cut (max_length x 32
    + 256 characters) holds one token, so the cut doubles until the kept tokens end in its first half."""
    from raygrad.dataset.text import CUT_CHARS_PER_TOKEN, CUT_MARGIN_CHARS, tokenize_truncated

    tokenizer = Recording(run_merging_tokenizer())
    text = "=" * 200_000
    whole = tokenizer.tokenizer([text], truncation=True, max_length=8)["input_ids"]
    assert tokenize_truncated(tokenizer, [text], 8) == whole == [[tokenizer.tokenizer.convert_tokens_to_ids(
        "=" * 1024)] * 8]
    first = 8 * CUT_CHARS_PER_TOKEN + CUT_MARGIN_CHARS
    assert tokenizer.calls == 6 and tokenizer.longest == first * 2 ** 5 < len(text)  # 8 x 1024 <= 16384 / 2


MEASURE = """
import sys
from transformers import AutoTokenizer
from raygrad.dataset.shards import plan_shards, read_rows
from raygrad.dataset.formats import describe_source
from raygrad.compute.worker import ShardComputer

def peak_rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))

tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
source = describe_source(sys.argv[1])
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # the peak RSS starts again from the RSS now (Linux 4.0+): imports' peaks are not the work's
before = peak_rss()
layout = plan_shards(source, 1, tokenizer, 32)
texts, rows, _ = read_rows(source, layout.shards[0])
ids = ShardComputer.tokenize(type("Computer", (), {"tokenizer": tokenizer, "max_length": 32}), texts)
print(len(texts[0]), len(ids[0]), peak_rss() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resets the peak RSS through Linux's /proc")
def test_one_huge_line_is_planned_read_and_tokenized_in_little_memory(tmp_path):
    """A 20 MB one-line .txt with --max-length 32, planned, read and tokenized as a worker does, in a process
    of its own: its peak RSS grows by less than 8 bytes a character (the line's bytes, its text, and a
    few passing copies); tokenized whole, that line took about 4 GB (200 bytes a character)."""
    import subprocess
    import sys

    from tiny import build_tokenizer

    build_tokenizer(tmp_path / "tokenizer")
    path = tmp_path / "line.txt"
    path.write_text((PROSE + " ") * (20_000_000 // (len(PROSE) + 1)) + "\n")
    size = path.stat().st_size
    done = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(tmp_path / "tokenizer")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    chars, tokens, grown = map(int, done.stdout.split())
    assert chars == size - 1 and tokens == 32
    assert grown < 8 * size, f"RSS grew {grown / 2 ** 20:.0f} MiB for a {size / 2 ** 20:.0f} MiB line"
