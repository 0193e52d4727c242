"""Text sources: local files of each kind, the bundled corpus, the length filter."""

import json

import pytest
from tiny import SAMPLE_TEXTS

from raygrad.data import load_texts, stdlib_paragraphs
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
