"""CoLoR's held-out evaluation: recall@1 and compression ratio per reader, before and after training.

``ReaderPool`` builds each reader once, on first use (the ``lm`` reader reads with a plain copy of the
base model, loaded by the caller's ``load_model``); ``evaluate_compressions`` scores the uncompressed
corpus and each compressed version of it with every reader; ``report`` prints the table and writes
``color_eval.json`` and ``color_examples.json`` beside the exported compressor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ctxzip.compressors import ColorCompressor
from ctxzip.compressors.io import write_json_atomic
from ctxzip.data.retrieval import RetrievalCorpus, corpus_texts

from .retrieval import RetrievalResult, build_reader, evaluate_corpus, markdown_table


class ReaderPool:
    """Readers by name (``dense``, ``lm``), built once. ``load_model()`` returns the base model the ``lm``
    reader reads with (called at most once, only when that reader is first used)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, load_model: Callable[[], Any]) -> None:
        self.tokenizer, self.load_model = tokenizer, load_model
        self._made: dict[str, Any] = {}

    def lazy(self, name: str) -> Any:
        """A reader that is only built when it ranks something (cached stages need none)."""
        pool = self

        class Lazy:
            def __init__(self) -> None:
                self.name = name

            def rank(self, passages: list[str], queries: list[str]) -> list[list[int]]:
                return pool[name].rank(passages, queries)

        return Lazy()

    def __getitem__(self, name: str) -> Any:
        if name not in self._made:
            model = self.load_model() if name == "lm" else None
            self._made[name] = build_reader(name, model, self.tokenizer)
        return self._made[name]


def compress_corpus(compressor: ColorCompressor, corpus: RetrievalCorpus,
                    tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """The compressor's (greedy) compression of every passage of ``corpus``, by passage id."""
    from tqdm.auto import tqdm

    out: dict[str, list[int]] = {}
    size = compressor.compressor_config.generation_batch_size
    for start in tqdm(range(0, len(corpus.passages), size), desc="compressing held-out passages", unit="batch"):
        batch = corpus.passages[start:start + size]
        ids = [tokenizer(p["passage"], add_special_tokens=False)["input_ids"] for p in batch]
        for p, row in zip(batch, compressor.generate(ids)):
            out[p["passage_id"]] = row
    return out


def evaluate_compressions(corpus: RetrievalCorpus, tokenizer: PreTrainedTokenizerBase, readers: ReaderPool,
                          reader_names: list[str], compressed: dict[str, dict[str, list[int]]],
                          ) -> list[RetrievalResult]:
    """recall@1 / ratio per reader for the uncompressed corpus and each compressed one (label -> ids by
    passage id)."""
    source = {p["passage_id"]: len(tokenizer(p["passage"], add_special_tokens=False)["input_ids"])
              for p in corpus.passages}
    total = sum(source.values())
    results = []
    for name in reader_names:
        reader = readers[name]
        results.append(evaluate_corpus(corpus, corpus_texts(corpus, None, None), reader, "uncompressed", total, total))
        for label, rows in compressed.items():
            texts = {pid: tokenizer.decode(ids, skip_special_tokens=True).strip() for pid, ids in rows.items()}
            results.append(evaluate_corpus(corpus, texts, reader, label, total, sum(len(r) for r in rows.values())))
    return results


def report(results: list[RetrievalResult], corpus: RetrievalCorpus, tokenizer: PreTrainedTokenizerBase,
           compressed: dict[str, dict[str, list[int]]], output_dir: str | Path,
           num_examples: int = 4) -> list[dict[str, Any]]:
    """Print the table, write ``color_eval.json`` (its rows) and ``color_examples.json`` (the first passages
    with each compression) to ``output_dir``; return the rows (the model card's table)."""
    print(f"\nheld-out retrieval ({len(corpus.queries)} queries, windows of {corpus.corpus_size} passages)\n")
    print(markdown_table(results) + "\n")
    rows = [r.as_row() for r in results]
    out = Path(output_dir)
    write_json_atomic(out / "color_eval.json", rows, indent=1)
    examples = [{"passage": p["passage"], **{label: tokenizer.decode(ids.get(p["passage_id"], []))
                                             for label, ids in compressed.items()}}
                for p in corpus.passages[:num_examples]]
    write_json_atomic(out / "color_examples.json", examples, indent=1)
    return rows
