"""Text sources and token-exact filler text ("haystacks") for synthetic tasks.

`load_texts` turns a source name into a list of cleaned texts: the offline default
``"pydoc"`` (the topic help that ships with CPython), the second offline corpus ``"stdlib"``
(the docstrings of the standard library's public modules, classes and functions, a different
text: a corpus to hold out whole), a local ``.txt`` / ``.jsonl`` / ``.json`` file or a folder
of them, or anything ``datasets.load_dataset`` accepts.
`Haystack` concatenates such texts into filler of a requested number of tokens.
`load_table` reads one split of a table (a local .jsonl / .json / .csv / .parquet file, a Hub
dataset or a ``datasets.Dataset``) for loaders that need whole rows rather than texts.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import sysconfig
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["BUILTIN_SOURCES", "HELD_OUT_FRACTION", "Haystack", "count_tokens", "load_table", "load_texts"]

#: The offline corpora that ship with Python itself (no file, no download).
BUILTIN_SOURCES = ("pydoc", "stdlib")

#: Hash threshold: the expected share of pydoc topics (and local texts) held out as "test".
HELD_OUT_FRACTION = 0.15
# The salt only decides which items are held out.  On CPython 3.11 it holds out 11 of the 79
# pydoc topics: after filtering and de-duplication, 7.5k of 37.7k words (~10.6k SmolLM2
# tokens), and keeps the largest topic in "train".  Membership depends on the topic key
# alone, so a topic keeps its split when other Python versions add topics.
_SPLIT_SALT = "heldout-7:"
_SPLITS = ("train", "test", "all")
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")
_PATH_PREFIXES = ("/", "./", "../", "~")


def load_texts(
    source: str = "pydoc",
    *,
    split: str = "train",
    text_column: str = "text",
    min_words: int = 20,
    **load_kwargs: Any,
) -> list[str]:
    """Load cleaned texts from a named source.

    Args:
        source: ``"pydoc"`` (offline default: the paragraphs of
            ``pydoc_data.topics.topics``, about 65k words), ``"stdlib"`` (offline: the docstrings
            of the standard library, read from its ``.py`` files without importing them, about
            135k words on CPython 3.11; no text shares an 8-word run with pydoc, nor a train text
            with a held-out one), a path to a local ``.txt`` file
            (paragraphs separated by blank lines), ``.jsonl`` / ``.json`` file (one text per
            record, read from ``text_column``), a folder of such files, or any other name,
            which is passed to ``datasets.load_dataset(source, split=split, **load_kwargs)``.
        split: ``"train"``, ``"test"`` (held out) or ``"all"`` for pydoc, stdlib and local files;
            for pydoc the split is by topic, for stdlib by module, for local files by text, all by a stable hash,
            so the same item always lands in the same split.  A folder that holds files
            named after the split (``test.jsonl``, ``train.txt``...) uses those files whole.
            For ``datasets`` sources it is the dataset split name.
        text_column: column (or JSON key) holding the text.
        min_words: texts with fewer whitespace-separated words are dropped (headings,
            one-line notes).
        **load_kwargs: extra arguments for ``datasets.load_dataset`` only.

    Returns:
        The texts, whitespace-normalised, in a deterministic order.

    Raises:
        FileNotFoundError: a local path does not exist.
        ValueError: unknown split, missing column, or no text left after filtering.
        TypeError: ``load_kwargs`` given for a source that is not a ``datasets`` one.
    """
    if source in BUILTIN_SOURCES or _is_local(source):
        if load_kwargs:
            raise TypeError(
                f"load_kwargs {sorted(load_kwargs)} only apply to datasets.load_dataset "
                f"sources, not to {source!r}"
            )
        _check_split(split, source)
        if source in BUILTIN_SOURCES:
            texts = list(_pydoc_split(split) if source == "pydoc" else _stdlib_split(split))
        else:
            texts = _local_texts(Path(source), split, text_column)
    else:
        texts = _dataset_texts(source, split, text_column, load_kwargs)
    kept = [t for t in texts if len(t.split()) >= min_words]
    if not kept:
        raise ValueError(
            f"source {source!r} (split {split!r}) has no text with at least {min_words} words "
            f"({len(texts)} texts before filtering)"
        )
    return kept


def load_table(source: str | datasets.Dataset, split: str, what: str, subset: str | None = None) -> datasets.Dataset:
    """One split of a table: a ``Dataset`` as it is, a local .jsonl/.json/.csv/.parquet file (whole), or
    anything ``datasets.load_dataset(source, subset, split=split)`` accepts (a Hub name, a folder).
    ``what`` names the table in error messages."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    path = Path(source).expanduser()
    if path.is_file():
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{what} file {str(path)!r}: use .jsonl, .json, .csv or .parquet")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    table = datasets.load_dataset(str(source), subset, split=split)
    if not isinstance(table, datasets.Dataset):
        raise ValueError(f"{what} {source!r} did not give one split; pass a split name")
    return table


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Number of tokens ``tokenizer`` makes of ``text``, without special tokens."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


class Haystack:
    """Filler text of a requested token length, cut from a fixed list of texts.

    Each text is tokenized once (lazily, on first use) and its token ids cached, so building
    a filler costs a few list look-ups and one ``decode`` of the trimmed last text.  Texts
    are taken in order from a start index and wrap around, so a request longer than the
    whole corpus repeats it.

    Joining texts can merge tokens across the separator, so the real count of a filler may
    differ from the request by a few tokens; callers that need an exact count measure the
    final text with `count_tokens` (the tasks do, and correct for it).
    """

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        *,
        separator: str = "\n\n",
    ) -> None:
        """Args:
        texts: the paragraphs or documents to cut filler from (empty ones are dropped).
        tokenizer: a Hugging Face tokenizer; all lengths are in its tokens.
        separator: placed between consecutive texts.
        """
        self.texts = [t for t in texts if t.strip()]
        if not self.texts:
            raise ValueError("Haystack needs at least one non-empty text")
        self.tokenizer = tokenizer
        self.separator = separator
        self._ids: list[list[int]] | None = None
        self._sep_tokens = count_tokens(tokenizer, separator) if separator else 0

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def token_ids(self) -> list[list[int]]:
        """Token ids of every text (computed once, in one batched tokenizer call)."""
        if self._ids is None:
            self._ids = self.tokenizer(self.texts, add_special_tokens=False).input_ids
            if not any(self._ids):
                raise ValueError("the tokenizer makes no tokens of any Haystack text")
        return self._ids

    @property
    def total_tokens(self) -> int:
        """Tokens in the whole corpus, not counting separators."""
        return sum(len(ids) for ids in self.token_ids)

    def count_tokens(self, text: str) -> int:
        """Real token count of ``text`` for this haystack's tokenizer."""
        return count_tokens(self.tokenizer, text)

    def decode(self, ids: Sequence[int]) -> str:
        """Decode token ids exactly as they were (no clean-up of spaces)."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        # A cut inside a multi-byte character decodes to U+FFFD; drop the partial character.
        return text.rstrip("\ufffd")

    def text(self, num_tokens: int, start: int = 0) -> str:
        """Filler of about ``num_tokens`` tokens, from text ``start`` onwards (deterministic)."""
        if num_tokens <= 0:
            return ""
        ids = self.token_ids
        pieces: list[str] = []
        used = 0
        index = start % len(ids)
        while used < num_tokens:
            sep = self._sep_tokens if pieces else 0
            room = num_tokens - used - sep
            if len(ids[index]) <= room:
                pieces.append(self.texts[index])
                used += sep + len(ids[index])
            else:
                # Cut the last text by tokens so the filler lands on the target.
                cut = self.decode(ids[index][:room]).rstrip() if room > 0 else ""
                if cut:
                    pieces.append(cut)
                break
            index = (index + 1) % len(ids)
        return self.separator.join(pieces)

    def sample(self, num_tokens: int, rng: random.Random) -> str:
        """Filler of about ``num_tokens`` tokens from a start chosen by ``rng``."""
        return self.text(num_tokens, self.random_start(rng))

    def random_start(self, rng: random.Random) -> int:
        """A start index for `text`, drawn from ``rng``."""
        return rng.randrange(len(self.texts))


# ---------------------------------------------------------------------------------------
# helpers


def _check_split(split: str, source: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS} for source {source!r}, got {split!r}")


def _is_local(source: str) -> bool:
    """Whether ``source`` names a local file or folder rather than a datasets name."""
    return (
        source.lower().endswith(_LOCAL_SUFFIXES) or source.startswith(_PATH_PREFIXES) or Path(source).is_dir()
    )


def _held_out(key: str) -> bool:
    """Stable (process- and platform-independent) membership of ``key`` in the test split."""
    digest = hashlib.sha256((_SPLIT_SALT + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_FRACTION


def _in_split(key: str, split: str) -> bool:
    return split == "all" or _held_out(key) == (split == "test")


def _paragraphs(text: str) -> list[str]:
    """Split on blank lines and collapse the whitespace inside each paragraph."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _clean(text: str) -> str:
    """Whitespace-normalise a document, keeping its paragraph breaks."""
    return "\n\n".join(_paragraphs(text))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _looks_like_code(paragraph: str) -> bool:
    """Heuristic for code, grammar, tables and sessions in the pydoc text.

    Collapsing whitespace ruins those, and they make poor prose filler.
    """
    if any(marker in paragraph for marker in (">>>", "::=", "(Pdb)")):
        return True
    lines = [line for line in paragraph.split("\n") if line.strip()]
    if any(line.lstrip().startswith(("+-", "|", "+=")) for line in lines):
        return True
    # Prose (even a hanging-indent list item) has one indentation after its first line.
    if len({_indent(line) for line in lines[1:]}) > 1:
        return True
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return letters < 0.75 * len(paragraph)


@cache
def _pydoc_split(split: str) -> tuple[str, ...]:
    from pydoc_data.topics import topics

    seen: set[str] = set()
    held_out = {p for key, doc in topics.items() if _held_out(key) for p in _pydoc_paragraphs(doc)}
    out: list[str] = []
    for key in sorted(topics):
        if not _in_split(key, split):
            continue
        for paragraph in _pydoc_paragraphs(topics[key]):
            # A paragraph repeated in a held-out topic must not leak into "train".
            if paragraph in seen or (split == "train" and paragraph in held_out):
                continue
            seen.add(paragraph)
            out.append(paragraph)
    return tuple(out)


def _pydoc_paragraphs(doc: str) -> list[str]:
    raw = [p for p in re.split(r"\n\s*\n", doc) if p.strip()]
    return [" ".join(p.split()) for p in raw if not _looks_like_code(p.strip("\n"))]


# --- the stdlib corpus: docstrings of the standard library, parsed (never imported: importing
# every module is slow, has side effects, and some need a display or a platform).

# Folders left out: tests, IDLE, installed packages, the pydoc corpus itself, and code generated
# from tables (the ~100 codec modules of ``encodings`` share one boilerplate docstring).
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__",
                               "pydoc_data", "encodings", "lib2to3", "turtledemo"})
# A stdlib text sharing a run of this many words with pydoc is dropped: the two corpora are disjoint.
_OVERLAP_WORDS = 8
_Definition = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def _private(name: str) -> bool:
    """``_x`` is private; dunder names (``__init__.py``, ``__future__``) are not."""
    return name.startswith("_") and not name.startswith("__")


def _stdlib_files(root: Path) -> list[tuple[str, Path]]:
    """``(module name, file)`` of every public stdlib module under ``root``, in sorted order."""
    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS and not _private(d) and "-" not in d)
        for name in sorted(files):
            if name.endswith(".py") and not _private(name):
                parts = (Path(folder) / name).relative_to(root).with_suffix("").parts
                module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                found.append((module, Path(folder) / name))
    return found


def _docstrings(node: _Definition) -> Iterable[str]:
    """The docstring of ``node`` and of its public classes and functions (not of nested functions' locals)."""
    doc = ast.get_docstring(node)
    if doc:
        yield doc
    if isinstance(node, ast.Module | ast.ClassDef):
        for child in node.body:
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and not _private(child.name):
                yield from _docstrings(child)


def _module_texts(path: Path) -> list[str]:
    """The cleaned docstrings of one module (prose paragraphs only, as for pydoc); [] if it does not parse."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # a file for another Python version
        return []
    texts = ("\n\n".join(_pydoc_paragraphs(doc)) for doc in _docstrings(tree))
    return [t for t in texts if t]


def _word_runs(text: str, n: int = _OVERLAP_WORDS) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@cache
def _stdlib_modules() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(module, its texts)`` for the whole stdlib corpus, parsed once per process (~2 s)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pydoc_runs = set().union(*(_word_runs(p) for p in _pydoc_split("all")))
    # A text that repeats a run of pydoc words (pdb's commands are in both) is left out.
    return tuple((module, tuple(t for t in _module_texts(path) if _word_runs(t).isdisjoint(pydoc_runs)))
                 for module, path in _stdlib_files(root))


@cache
def _stdlib_split(split: str) -> tuple[str, ...]:
    """One split of the stdlib corpus, by module (a stable hash of its name, like pydoc's topics)."""
    modules = _stdlib_modules()
    held_out = set().union(*(_word_runs(t) for module, texts in modules if _held_out(module) for t in texts))
    seen: set[str] = set()
    out: list[str] = []
    for module, texts in modules:
        if not _in_split(module, split):
            continue
        for text in texts:
            # A repeated docstring (an override's) once; in "train", nothing that repeats a run of held-out
            # words (gzip, bz2 and lzma document their open() modes in the same sentences).
            if text in seen or (split == "train" and not _word_runs(text).isdisjoint(held_out)):
                continue
            seen.add(text)
            out.append(text)
    return tuple(out)


def _local_texts(path: Path, split: str, text_column: str) -> list[str]:
    path = path.expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text source {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _LOCAL_SUFFIXES)
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no {'/'.join(_LOCAL_SUFFIXES)} files")
        named = [p for p in files if p.stem == split]
        if named:  # train.jsonl / test.jsonl layout: the files are the split.
            return [t for p in named for t in _read_file(p, text_column)]
    else:
        files = [path]
    return [t for p in files for t in _read_file(p, text_column) if _in_split(t, split)]


def _read_file(path: Path, text_column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _paragraphs(path.read_text(encoding="utf-8"))
    if suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    elif suffix == ".json":
        records = _json_records(json.loads(path.read_text(encoding="utf-8")), text_column)
    else:
        raise ValueError(f"unsupported file type {suffix!r} for {str(path)!r}; use one of {_LOCAL_SUFFIXES}")
    return [_clean(t) for t in _column(records, text_column, str(path))]


def _json_records(data: Any, text_column: str) -> list[Any]:
    """Accept a list of records/strings or a column mapping ``{text_column: [...]}``."""
    if isinstance(data, dict):
        if isinstance(data.get(text_column), list):
            return [{text_column: t} for t in data[text_column]]
        return [data]
    if isinstance(data, list):
        return data
    raise ValueError(f"JSON must hold a list of records or a column mapping, got {type(data).__name__}")


def _column(records: Iterable[Any], text_column: str, where: str) -> list[str]:
    """Read ``text_column`` from every record (plain strings are texts themselves)."""
    texts: list[str] = []
    for i, record in enumerate(records):
        if isinstance(record, str):
            texts.append(record)
            continue
        if not isinstance(record, dict) or text_column not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"record {i} of {where} has no column {text_column!r}; available columns: {keys}"
            )
        if isinstance(record[text_column], str):
            texts.append(record[text_column])
    return texts


def _dataset_texts(source: str, split: str, text_column: str, load_kwargs: dict[str, Any]) -> list[str]:
    import datasets

    ds = datasets.load_dataset(source, split=split, **load_kwargs)
    columns = getattr(ds, "column_names", None)
    if isinstance(columns, dict):  # a DatasetDict: the split did not select one
        raise ValueError(f"{source!r} gave several splits {sorted(columns)}; pass split=<one of them>")
    if columns is not None and text_column not in columns:
        raise ValueError(
            f"dataset {source!r} (split {split!r}) has no column {text_column!r}; "
            f"available columns: {sorted(columns)}"
        )
    return [_clean(t) for t in _column(ds, text_column, repr(source))]
