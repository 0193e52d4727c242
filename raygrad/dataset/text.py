"""What a usable text is, how it is tokenized, and the bundled corpus.

Only texts longer than `min_chars` characters (after stripping) are kept, as the
original scripts did; formats.py reads each format, shards.py plans and reads shards (and reads a
whole source, for tests and benchmarks: load_texts).
A text is tokenized from a prefix long enough for its first --max-length tokens
(`tokenize_truncated`), never whole.

With --prompt-column/--completion-column a row is a Pair: the prompt tokenized as a text is (with the
BOS the tokenizer adds), the completion alone without special tokens, their ids concatenated and cut
to --max-length from the right (`pair_token_ids`); the prompt's tokens are context only, the loss and
every statistic cover the positions that predict a completion token.
"""

from __future__ import annotations

import ast
import inspect
import logging
import os
import re
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from ..config import URL_SCHEME
from ..constants import BUNDLED_CORPUS
from ..errors import RaygradError

log = logging.getLogger(__name__)

DEFAULT_CONFIGS = {"wikitext": "wikitext-2-raw-v1"}  # the original scripts' dataset
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# Why a row of the source was not used (counted in the plan, printed before the run).
SKIP_SHORT = "short"  # min_chars or fewer after stripping
SKIP_NOT_TEXT = "not_text"  # null, missing, or a number/list in the text column
SKIP_UNREADABLE = "unreadable"  # a CSV record csv cannot read (a field over sources.CSV_FIELD_CHARS characters)
REPLACED_BYTES = "undecodable_bytes"  # .txt lines with bytes that are not UTF-8: kept, decoded with U+FFFD
SKIP_NO_COMPLETION = "no_completion"  # --completion-column: missing, null or empty (whitespace only)
SKIP_COMPLETION_CUT = "completion_cut"  # the prompt fills --max-length: no completion token is left to predict


class Pair(NamedTuple):
    """A usable prompt/completion row (--prompt-column/--completion-column)."""
    prompt: str
    completion: str


CUT_CHARS_PER_TOKEN = 32  # characters of a text tokenized per --max-length token: more than a token holds
CUT_MARGIN_CHARS = 256  # characters added to that cut, so a short --max-length still cuts far from the tokens kept


def tokenize_truncated(tokenizer, texts: list[str], max_length: int, special_tokens: bool = True
                       ) -> list[list[int]]:
    """Each text's ids as tokenizer(text, truncation=True, max_length=max_length) gives them, from a
    prefix of the text: tokenized whole, a 10 MB text took 2.2 GB (about 200 bytes a character).

    The prefix is max_length x CUT_CHARS_PER_TOKEN + CUT_MARGIN_CHARS characters, doubled until the
    tokens kept lie in its first half (by a fast tokenizer's offsets; by a slow one's tokens of that
    half, which must be the same), so where it was cut changes none of them; a text no longer than its
    prefix is tokenized whole. Memory: the prefixes, whatever the texts' lengths, unless one token
    holds more than CUT_CHARS_PER_TOKEN / 2 characters."""
    ids: list[list[int] | None] = [None] * len(texts)
    todo, chars = list(range(len(texts))), max_length * CUT_CHARS_PER_TOKEN + CUT_MARGIN_CHARS
    fast = getattr(tokenizer, "is_fast", False)  # only a fast tokenizer maps tokens to characters
    while todo:
        cut = [texts[i][:chars] for i in todo]
        # where the prefix was cut is checked only for texts that were cut (and is costly: ~40% of a call)
        was_cut = any(len(texts[i]) > chars for i in todo)
        offsets = fast and was_cut
        encoded = tokenizer(cut, truncation=True, max_length=max_length, add_special_tokens=special_tokens,
                            return_attention_mask=False, **({"return_offsets_mapping": True} if offsets else {}))
        if not was_cut:
            in_first_half = [True] * len(todo)  # every text is whole: kept as it is
        elif offsets:
            # a prefix of whitespace alone may give no token at all (a word-level tokenizer without specials)
            in_first_half = [max((end for _, end in spans), default=0) <= chars // 2
                             for spans in encoded["offset_mapping"]]
        else:
            halves = tokenizer([text[:chars // 2] for text in cut], truncation=True, max_length=max_length,
                               add_special_tokens=special_tokens)
            in_first_half = [list(half) == list(full) for half, full in zip(halves["input_ids"], encoded["input_ids"])]
        again = []
        for i, text_ids, kept_far in zip(todo, encoded["input_ids"], in_first_half):
            if len(texts[i]) <= chars or len(text_ids) >= max_length and kept_far:
                ids[i] = list(text_ids)
            else:
                again.append(i)
        todo, chars = again, chars * 2
    return ids


def pair_token_ids(tokenizer, pairs: list[Pair], max_length: int) -> list[tuple[list[int], int]]:
    """Each pair's (ids, context): the prompt's ids as a text's (BOS included where the tokenizer adds it)
    followed by the completion's (no special tokens), the first max_length of them; context = the
    prompt's tokens, so position t counts iff t + 1 >= context (it predicts a completion token).
    Tokenized apart, so no token spans the boundary and the completion's tokens are its own."""
    prompts = tokenize_truncated(tokenizer, [pair.prompt for pair in pairs], max_length)
    completions = tokenize_truncated(tokenizer, [pair.completion for pair in pairs], max_length, special_tokens=False)
    return [((prompt + completion)[:max_length], len(prompt)) for prompt, completion in zip(prompts, completions)]


def token_ids(tokenizer, texts: list, max_length: int) -> tuple[list[list[int]], list[int] | None]:
    """(ids, contexts) of a shard's texts as a worker computes them: plain texts (contexts None: every
    target counts) or Pairs (each one's prompt tokens, context only)."""
    if texts and isinstance(texts[0], Pair):
        ids, contexts = zip(*pair_token_ids(tokenizer, texts, max_length))
        return list(ids), list(contexts)
    return tokenize_truncated(tokenizer, texts, max_length), None


def completion_filter(tokenizer, max_length: int):
    """pairs -> whether each keeps a completion target under --max-length (False: SKIP_COMPLETION_CUT): the
    filter the planning pass and every read of a shard apply alike. Only the prompts are tokenized (the
    head tokenizes every row's prompt): a completion with text has a token, so a pair keeps a target
    unless its prompt fills max_length; a prompt with no token at all (empty, and no BOS) needs two."""
    def keeps(pairs: list[Pair]) -> list[bool]:
        prompts = tokenize_truncated(tokenizer, [pair.prompt for pair in pairs], max_length)
        kept = [0 < len(ids) < max_length for ids in prompts]
        bare = [i for i, ids in enumerate(prompts) if not ids]
        if bare:
            completions = tokenize_truncated(tokenizer, [pairs[i].completion for i in bare], 2, special_tokens=False)
            for i, ids in zip(bare, completions):
                kept[i] = len(ids) >= 2
        return kept
    return keeps


def as_text(text) -> str:
    """A plain text as it is; a Pair as its prompt followed by its completion (for character counts)."""
    return text.prompt + text.completion if isinstance(text, Pair) else text


def absolute_if_local(dataset: str) -> str:
    """A local file or directory made absolute (a resumed run may start in another
    directory); a hub id, a URL or the bundled corpus as given."""
    if URL_SCHEME.match(dataset):  # Path would collapse s3://b/k to s3:/b/k
        return dataset
    path = Path(dataset).expanduser()
    return os.path.abspath(path) if dataset != BUNDLED_CORPUS and path.exists() else dataset


def check_column(dataset: str, column: str, columns: Iterable[str], option: str = "--text-column") -> None:
    columns = list(columns)
    if column not in columns:
        raise RaygradError(f"{option} {column}: not in dataset {dataset}; its columns are {', '.join(columns)}")


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
