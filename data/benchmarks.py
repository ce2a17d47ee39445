"""Loaders for the long-context benchmarks users already run, as rows of the synthetic tasks' schema.

Each loader reads its benchmark's published format through ``datasets`` (a Hub name with a subset, or a
local file) and returns a ``datasets.Dataset`` with ``data.tasks.FEATURES``, so ``eval.scoring.score_rows``
and the eval runner read it like a synthetic task:

- ``load_longbench``: LongBench (``input`` is the question, ``context`` the document, ``answers`` the accepted
  answers). THUDM/LongBench on the Hub ships a loading script, which ``datasets`` >= 4 no longer runs: pass a
  local jsonl / parquet export of a subset, or a Hub mirror that stores data files.
- ``load_ruler``: RULER's prepared ``.jsonl`` (``input`` is the whole templated prompt, ``outputs`` the
  accepted answers, ``answer_prefix`` how the reply starts). RULER does not store the context apart from
  the question: the question is the prompt's last line (RULER's templates end with it), the context is
  everything before it.
- ``load_scbench``: SCBench (microsoft/SCBench; one ``context`` and its ``multi_turns``, each an ``input``
  question and its ``answer``): the first turn is the row's question and every turn goes to
  ``metadata['questions']``, the shared-context mode's format (one memory, every question).

Every accepted answer is kept in ``metadata['answers']``; ``answer`` is the first. Nothing downloads at
import or test time: a Hub name is only fetched when a loader is called with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from .sources import load_table
from .tasks import FEATURES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["is_benchmark", "load_benchmark", "load_longbench", "load_ruler", "load_scbench"]

Converter = Callable[[dict[str, Any]], dict[str, Any]]


def load_longbench(source: str, tokenizer: PreTrainedTokenizerBase, subset: str | None = None,
                   split: str = "test", limit: int | None = None) -> datasets.Dataset:
    """LongBench rows (``context``, ``input``, ``answers``, ``_id``) as task rows named ``longbench/<subset>``."""
    def convert(row: dict[str, Any]) -> dict[str, Any]:
        answers = _answers(row, "answers")
        return {"id": str(row.get("_id", "")), "context": row["context"], "question": row["input"],
                "answer": answers[0], "metadata": {"answers": answers, "dataset": row.get("dataset", subset)}}

    table = load_table(source, split, "LongBench", subset)
    return _convert(table, f"longbench/{subset or Path(source).stem}", tokenizer, limit,
                    ("context", "input", "answers"), convert)


def load_ruler(path: str, tokenizer: PreTrainedTokenizerBase, task: str = "ruler",
               limit: int | None = None) -> datasets.Dataset:
    """RULER's prepared jsonl (``index``, ``input``, ``outputs``, ``answer_prefix``): the question is the
    prompt's last line, the context the lines before it."""
    def convert(row: dict[str, Any]) -> dict[str, Any]:
        prompt = row["input"].rstrip()
        if "\n" not in prompt:
            raise ValueError(f"RULER row {row.get('index')}: its input has no line break between the context "
                             "and the question")
        context, question = prompt.rsplit("\n", 1)
        answers = _answers(row, "outputs")
        return {"id": str(row.get("index", "")), "context": context.rstrip(), "question": question.strip(),
                "answer": answers[0], "answer_prefix": str(row.get("answer_prefix") or "").strip(),
                "metadata": {"answers": answers}}

    return _convert(load_table(path, "train", "RULER file"), task, tokenizer, limit, ("input", "outputs"), convert)


def load_scbench(source: str, tokenizer: PreTrainedTokenizerBase, subset: str | None = None,
                 split: str = "test", limit: int | None = None) -> datasets.Dataset:
    """SCBench rows (``id``, ``context``, ``multi_turns``: ``input`` / ``answer``) as shared-context rows:
    every turn in ``metadata['questions']``."""
    def convert(row: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(row["context"], str):
            raise ValueError(f"SCBench row {row.get('id')}: this subset stores its context as "
                             f"{type(row['context']).__name__}, not text; use a subset whose context is text")
        turns = row["multi_turns"]
        if not turns:
            raise ValueError(f"SCBench row {row.get('id')} has no turns")
        questions = [{"question": str(t["input"]), "answer": _first(t["answer"]), "answer_prefix": ""} for t in turns]
        return {"id": str(row.get("id", "")), "context": row["context"], "question": questions[0]["question"],
                "answer": questions[0]["answer"], "metadata": {"questions": questions}}

    table = load_table(source, split, "SCBench", subset)
    return _convert(table, f"scbench/{subset or Path(source).stem}", tokenizer, limit,
                    ("context", "multi_turns"), convert)


# ----- shared ----------------------------------------------------------------------------------
def _convert(table: datasets.Dataset, task: str, tokenizer: PreTrainedTokenizerBase, limit: int | None,
             columns: tuple[str, ...], convert: Converter) -> datasets.Dataset:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{task}: the table has no column(s) {missing}; its columns are {table.column_names}")
    rows = []
    for index, record in enumerate(table.select(range(min(limit, len(table)))) if limit else table):
        row = {"task": task, "answer_prefix": "", "depth": -1.0, "needle": "", **convert(record)}
        row["id"] = f"{task}-{row['id'] or index}"
        row["context_tokens"] = len(tokenizer(row["context"], add_special_tokens=False)["input_ids"])
        row["metadata"] = json.dumps(row["metadata"], sort_keys=True)
        rows.append(row)
    return datasets.Dataset.from_list(rows, features=FEATURES)


def _answers(row: dict[str, Any], key: str) -> list[str]:
    value = row[key]
    answers = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    if not answers or not answers[0].strip():
        raise ValueError(f"a row has no answer in {key!r}: {value!r}")
    return answers


def _first(value: Any) -> str:
    return str(value[0]) if isinstance(value, list) and value else str(value)


LOADERS = {"longbench": load_longbench, "ruler": load_ruler, "scbench": load_scbench}


def is_benchmark(spec: str) -> bool:
    """Whether a task name names an external benchmark (``longbench:SOURCE[:SUBSET]``, ``ruler:FILE``,
    ``scbench:SOURCE[:SUBSET]``) rather than a synthetic task."""
    return spec.split(":", 1)[0] in LOADERS and ":" in spec


def load_benchmark(spec: str, tokenizer: PreTrainedTokenizerBase, limit: int | None = None) -> datasets.Dataset:
    """The rows of ``spec`` (``longbench:hotpotqa.jsonl``, ``ruler:niah.jsonl``,
    ``scbench:microsoft/SCBench:multi_turn_kv``, or local files)."""
    kind, _, rest = spec.partition(":")
    if kind not in LOADERS or not rest:
        raise ValueError(f"unknown benchmark {spec!r}: use longbench:SOURCE[:SUBSET], ruler:FILE or "
                         "scbench:SOURCE[:SUBSET]")
    if kind == "ruler":
        return load_ruler(rest, tokenizer, task=f"ruler/{Path(rest).stem}", limit=limit)
    source, _, subset = rest.partition(":") if not Path(rest).exists() else (rest, "", "")
    return LOADERS[kind](source, tokenizer, subset=subset or None, limit=limit)
