"""Texts to aggregate over: hub datasets, local files, the bundled corpus.

Every source yields plain strings; only texts longer than `min_chars`
characters (after stripping) are kept, as the original scripts did.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import logging
import os
import re
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from .errors import RaygradError, first_line

log = logging.getLogger(__name__)

BUNDLED_CORPUS = "stdlib-docs"
DEFAULT_CONFIGS = {"wikitext": "wikitext-2-raw-v1"}  # the original scripts' dataset
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# Why a row of the source was not used (counted in the plan, printed before the run).
SKIP_SHORT = "short"  # min_chars or fewer after stripping
SKIP_NOT_TEXT = "not_text"  # null, missing, or a number/list in the text column
REPLACED_BYTES = "undecodable_bytes"  # .txt lines with bytes that are not UTF-8: kept, decoded with U+FFFD


def load_texts(dataset: str, num_samples: int, *, text_column: str = "text", config: str | None = None,
               split: str = "train", min_chars: int = 50, skipped: Counter | None = None,
               rows: list[int] | None = None) -> list[str]:
    """Up to `num_samples` texts, in source order. Fewer means the source ran out.

    `skipped` (if given) counts, among the rows read, those left out (SKIP_*) and
    those kept with replaced bytes (REPLACED_BYTES). `rows` (if given) receives each
    kept text's row: its 0-based index in the source as read, before any filtering."""
    skipped = Counter() if skipped is None else skipped
    if dataset == BUNDLED_CORPUS:
        source = stdlib_paragraphs()
    elif _looks_local(dataset):
        source = _local_texts(Path(dataset), text_column, skipped)
    else:
        source = _hub_texts(dataset, config or DEFAULT_CONFIGS.get(dataset), split, text_column)
    texts = []
    rows = [] if rows is None else rows
    for row, text in enumerate(source):
        if not isinstance(text, str):
            skipped[SKIP_NOT_TEXT] += 1
        elif len(text.strip()) <= min_chars:
            skipped[SKIP_SHORT] += 1
        else:
            texts.append(text)
            rows.append(row)
            if len(texts) == num_samples:
                break
    if not texts:
        found = f" ({skipped[SKIP_NOT_TEXT]} values of --text-column {text_column} are not text)" \
            if skipped[SKIP_NOT_TEXT] else ""
        raise RaygradError(f"--dataset {dataset}: no text longer than {min_chars} characters was found{found}")
    return texts


def shard_fingerprints(texts: list[str], shards: list[tuple[int, int]]) -> list[str]:
    """A short digest of each shard's texts, so a resume can tell that the dataset changed."""
    return [_fingerprint(texts[start:stop]) for start, stop in shards]


def first_changed_shard(texts: list[str], shards: list[tuple[int, int]], fingerprints: list[str]) -> int | None:
    """The first shard whose texts differ from those the run was planned on (None: all equal;
    a run saved without fingerprints is not checked)."""
    for index, (fingerprint, now) in enumerate(zip(fingerprints, shard_fingerprints(texts, shards))):
        if fingerprint != now:
            return index
    return None


def _fingerprint(texts: list[str]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for text in texts:
        encoded = text.encode("utf-8", "surrogatepass")
        h.update(len(encoded).to_bytes(8, "little"))  # lengths first: no two lists hash alike by concatenation
        h.update(encoded)
    return h.hexdigest()


def absolute_if_local(dataset: str) -> str:
    """A local file or directory made absolute (a resumed run may start in another
    directory); a hub id or the bundled corpus as given."""
    path = Path(dataset).expanduser()
    return os.path.abspath(path) if dataset != BUNDLED_CORPUS and path.exists() else dataset


def _looks_local(dataset: str) -> bool:
    """A single file. A directory goes to `datasets.load_dataset` like a hub
    repository (it reads a local dataset directory the same way)."""
    path = Path(dataset).expanduser()
    if path.is_file():
        return True
    return not path.is_dir() and (path.suffix.lower() in LOCAL_FORMATS or dataset.startswith((".", "/", "~")))


def _local_texts(path: Path, text_column: str, skipped: Counter) -> Iterator[str]:
    path = path.expanduser()
    if not path.is_file():
        raise RaygradError(f"--dataset {path}: no such file")
    kind = LOCAL_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise RaygradError(f"--dataset {path}: unknown file type; use one of {', '.join(LOCAL_FORMATS)}")
    if kind == "text":  # one text per line, like wikitext's rows
        return _text_lines(path, skipped)
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" bars say nothing about a local file
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # the file is unreadable: report it as bad input
        raise RaygradError(f"--dataset {path}: cannot be read as {kind} ({first_line(err)})") from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    _check_column(str(path), text_column, table.column_names)
    return iter(table[text_column])


def _text_lines(path: Path, skipped: Counter) -> Iterator[str]:
    """Lines of a text file as UTF-8; bytes that are not UTF-8 become U+FFFD (and are counted)
    rather than stopping the run on one bad byte."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RaygradError(f"--dataset {path}: cannot be read ({err.strerror})") from None
    for raw in data.splitlines():
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped[REPLACED_BYTES] += 1
            yield raw.decode("utf-8", errors="replace")


def _hub_texts(name: str, config: str | None, split: str, text_column: str) -> Iterator[str]:
    from .hub import hub_offline, why_offline

    if not Path(name).expanduser().is_dir() and hub_offline():
        # streaming needs the hub; without this, datasets retries for half a minute
        raise RaygradError(f"--dataset {name}: not a local file and could not be loaded from the hub "
                           f"({why_offline()}); for the offline demo use --dataset stdlib-docs")
    import datasets

    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        columns = stream.column_names or list(next(iter(stream)).keys())
    except Exception as err:  # no network, unknown name or config: one line for the user
        raise RaygradError(
            f"--dataset {name}: not a local file and could not be loaded from the hub ({first_line(err)}); "
            "for the offline demo use --dataset stdlib-docs"
        ) from None
    _check_column(name, text_column, columns)
    return (row[text_column] for row in stream)


def _check_column(dataset: str, column: str, columns: Iterable[str]) -> None:
    columns = list(columns)
    if column not in columns:
        raise RaygradError(f"--text-column {column}: not in dataset {dataset}; its columns are {', '.join(columns)}")


# --- the bundled corpus: English prose from the standard library's docstrings

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
_PROSE = re.compile(r"^[A-Z][A-Za-z ,;:'()\-.\"!?0-9]+[.!?]$")


def stdlib_paragraphs() -> Iterator[str]:
    """Paragraphs of English prose from the docstrings of the running Python's
    standard library, in a fixed order (sorted files, source order inside).

    Built at run time so the repository carries no copied text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        for paragraph in _docstring_paragraphs(path):
            if paragraph not in seen:
                seen.add(paragraph)
                yield paragraph


def _docstring_paragraphs(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return  # a file this Python cannot parse has no docstrings for us
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
                    if any(line.startswith((" ", "\t", ">>>")) for line in block.splitlines()):
                        continue  # code samples and indented tables are not prose
                    text = " ".join(block.split())
                    if len(text.split()) >= 8 and _PROSE.match(text):
                        yield text
