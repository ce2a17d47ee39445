"""The model-editing yardstick (InComeS): efficacy, generalisation and locality of edits read from a pool.

For each pool size k, pools of k edits are compressed once each; the first queries of each pool are asked:
- **efficacy**: the edit's own question must get the edit's answer;
- **generalisation**: the rephrased question must get it too;
- **locality**: unrelated questions must get what the unedited base model answers.
Each is measured by teacher forcing (token accuracy of the answer: the fraction of answer tokens that are the
argmax; for locality, the fraction whose argmax equals the unedited base's, as the paper) and by greedy
generation (the reply contains the answer; for locality, of the unrelated questions whose answer the unedited
base's reply contains, the share whose reply still contains it: the base's long free-form replies are rarely
identical word for word even when nothing changed, so their answers are compared).

Beside each pool method: **in-context editing** (the plain base with all k edits of the pool in the context, one
per line, before the question: the ceiling while they fit the base's window; ``fits`` says when they do not)
and **no editing** (the plain base with the question alone: the floor of efficacy, locality 1 by definition).
Locality is read against the unedited *base* model, stricter than the public code's reference (the trained
model with an empty pool): adapter drift counts against it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ctxzip.compressors import EMBEDDED_MODEL, CompressedLM, Memory
from ctxzip.compressors.baselines import FullContext, FullContextConfig
from ctxzip.compressors.io import write_json_atomic, write_text_atomic
from ctxzip.compressors.tables import Column, missing
from ctxzip.compressors.tables import markdown_table as render_table
from ctxzip.eval.metrics import substring_match
from ctxzip.eval.runner import kind_of_method, label_for
from ctxzip.eval.scoring import teacher_forced

IN_CONTEXT = "in-context editing"
NO_EDIT = "no editing"


@dataclass
class EditSummary:
    """One method at one pool size: means over the asked queries."""

    method: str
    pool_size: int
    n: int  # queries asked (each: one rewrite, one rephrase, its locality questions)
    efficacy: float  # teacher-forced answer-token accuracy of the edit's question
    generalisation: float  # the same on the rephrased question
    locality: float  # fraction of answer positions whose argmax is the unedited base's
    efficacy_generate: float  # greedy reply contains the answer
    generalisation_generate: float
    locality_generate: float  # of the unrelated questions the base answers right, the share still answered right
    bytes_per_edit: float  # what the method holds per edit (pool bytes, or the context's KV bytes)
    fits: bool = True  # in-context editing: the k edits and the question fit the base's window

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = [Column("method", "method"), Column("pool", "pool_size"), Column("n", "n"),
           Column("efficacy (tf)", "efficacy"), Column("generalisation (tf)", "generalisation"),
           Column("locality (tf)", "locality"), Column("efficacy (gen)", "efficacy_generate"),
           Column("generalisation (gen)", "generalisation_generate"), Column("locality (gen)", "locality_generate"),
           Column("bytes / edit", cell=lambda row: f"{row['bytes_per_edit']:,.0f}")]


def markdown_table(summaries: Sequence[EditSummary]) -> str:
    rows = [s.as_row() for s in summaries]
    for row in rows:
        if not row["fits"]:
            row["method"] += " (does not fit)"
    return render_table(rows, COLUMNS)


def pools_for(records: Sequence[dict[str, Any]], pool_size: int, queries: int) -> list[tuple[list[str], list[dict]]]:
    """``(edits of the pool, records asked)`` pairs: consecutive pools of ``pool_size`` records until ``queries``
    records are asked (the first ones of each pool)."""
    count = math.ceil(queries / pool_size)
    if count * pool_size > len(records):
        raise ValueError(f"{count} pools of {pool_size} edits need {count * pool_size} records, got {len(records)}")
    pools, left = [], queries
    for start in range(0, count * pool_size, pool_size):
        group = list(records[start:start + pool_size])
        pools.append(([r["edit"] for r in group], group[:min(left, pool_size)]))
        left -= pool_size
    return pools


class _Scorer:
    """Scores queries for one method against the unedited base's predictions on the locality questions (the
    reference, computed once for every query, before any method runs)."""

    def __init__(self, base: CompressedLM, asked: Sequence[dict[str, Any]], max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens
        # (question, answer) -> (the base's argmax answer tokens, whether its greedy reply holds the answer)
        self.reference: dict[tuple[str, str], tuple[list[int], bool]] = {}
        with base.compressor.plain_base():  # one context: PEFT's adapter switch does not nest
            for record in asked:
                for item in record["locality"]:
                    key = (item["question"], item["answer"])
                    if key not in self.reference:
                        forced = teacher_forced(base, None, *key)
                        reply = str(base.generate(item["question"], max_new_tokens=max_new_tokens))
                        self.reference[key] = (forced.predicted_ids, bool(substring_match(reply, item["answer"])))

    def query(self, clm: CompressedLM, memory: Memory | None, record: dict[str, Any]) -> dict[str, float]:
        scores: dict[str, float] = {}
        for name, question in (("efficacy", record["question"]), ("generalisation", record["rephrase"])):
            scores[name] = teacher_forced(clm, memory, question, record["answer"]).token_accuracy
            reply = str(clm.generate(question, memory=memory, max_new_tokens=self.max_new_tokens))
            scores[f"{name}_generate"] = substring_match(reply, record["answer"])
        forced, replies = [], []
        for item in record["locality"]:
            expected_ids, base_knows = self.reference[(item["question"], item["answer"])]
            got = teacher_forced(clm, memory, item["question"], item["answer"]).predicted_ids
            forced.append(sum(a == b for a, b in zip(got, expected_ids)) / max(1, len(expected_ids)))
            if base_knows:  # an answer the edit must not take away
                reply = str(clm.generate(item["question"], memory=memory, max_new_tokens=self.max_new_tokens))
                replies.append(substring_match(reply, item["answer"]))
        scores["locality"] = sum(forced) / len(forced) if forced else float("nan")
        scores["locality_generate"] = sum(replies) / len(replies) if replies else float("nan")
        return scores


def evaluate_edits(methods: dict[str, CompressedLM], records: Sequence[dict[str, Any]], pool_sizes: Sequence[int],
                   queries_per_size: int = 16, max_new_tokens: int = 16, references: bool = True,
                   unedited: CompressedLM | None = None) -> list[EditSummary]:
    """Every pool method in ``methods`` (label -> a CompressedLM whose compressor makes ``pool`` memories), and with
    ``references`` in-context editing and no editing, at every pool size. The unedited base (the locality reference,
    in-context and no editing) is ``unedited``'s ``plain_base()``, by default the first method's: pass an untrained
    compressor when a method trains the base's own weights (InComeS with ``train_mode: upper``)."""
    if not methods:
        raise ValueError("evaluate_edits needs at least one pool method")
    for label, clm in methods.items():
        if clm.compressor.memory_kind != "pool":
            raise ValueError(f"{label}: a {clm.compressor.compressor_type} compressor does not make pools of edits")
    first = unedited or next(iter(methods.values()))
    plans = {size: pools_for(records, size, queries_per_size) for size in pool_sizes}
    scorer = _Scorer(first, [r for pools in plans.values() for _, asked in pools for r in asked], max_new_tokens)
    full = CompressedLM(FullContext(FullContextConfig(), first.model), first.tokenizer)
    window = getattr(first.model.config, "max_position_embeddings", None)
    summaries: list[EditSummary] = []
    for size, pools in plans.items():
        for label, clm in methods.items():
            summaries.append(_score_pools(label, size, pools, scorer, lambda edits, c=clm: (c, c.compress(edits))))
        if references:
            with first.compressor.plain_base():
                summaries.append(_score_pools(IN_CONTEXT, size, pools, scorer,
                                              lambda edits: (full, full.compress("\n".join(edits))), window))
                summaries.append(_score_pools(NO_EDIT, size, pools, scorer, lambda edits: (full, None)))
    return summaries


def _score_pools(label: str, size: int, pools: list[tuple[list[str], list[dict]]], scorer: _Scorer, make: Any,
                 window: int | None = None) -> EditSummary:
    rows: list[dict[str, float]] = []
    held: list[float] = []
    for edits, asked in pools:
        clm, memory = make(edits)
        if memory is not None and window is not None and memory.source_tokens[0] + 64 > window:
            return EditSummary(label, size, 0, *[float("nan")] * 6, bytes_per_edit=memory.nbytes / len(edits),
                               fits=False)
        held.append(memory.nbytes / len(edits) if memory is not None else 0.0)
        rows += [scorer.query(clm, memory, record) for record in asked]

    def mean(key: str) -> float:
        values = [r[key] for r in rows if not missing(r[key])]
        return sum(values) / len(values) if values else float("nan")

    return EditSummary(label, size, len(rows), mean("efficacy"), mean("generalisation"), mean("locality"),
                       mean("efficacy_generate"), mean("generalisation_generate"), mean("locality_generate"),
                       bytes_per_edit=sum(held) / len(held))


def load_method(name: str, base_model: str | None, dtype: str) -> CompressedLM:
    """A saved compressor (folder or Hub id), or a registered type built fresh (untrained) on ``base_model``:
    the names ``python -m ctxzip.eval`` accepts (``ctxzip.eval.runner.kind_of_method``)."""
    if kind_of_method(name) in ("untrained", "baseline"):
        return CompressedLM.from_base(name, base_model=base_model or EMBEDDED_MODEL, dtype=dtype)
    return CompressedLM.from_pretrained(name, base_model=base_model, dtype=dtype)


@dataclass
class Arguments:
    """The edit evaluation's own flags of ``python -m ctxzip.eval --tasks edits`` (beside ``EvalConfig``'s:
    ``--num_samples`` queries are asked at each pool size)."""

    pool_sizes: list[int] = field(default_factory=lambda: [1, 8, 32, 128], metadata={
        "help": "--tasks edits: edits per pool (each pool is compressed once; its first queries are asked)"})
    edit_source: str = field(default="offline", metadata={
        "help": "--tasks edits: offline (generated counterfactual edits) or a zsRE / CounterFact-style file or "
                "Hub dataset"})
    edit_style: str = field(default="auto", metadata={
        "help": "--tasks edits: the records' format: auto (detected from the columns), native, zsre, counterfact"})


def run(config: Any, arguments: Arguments) -> Path:
    """``python -m ctxzip.eval --tasks edits``: ``run_edit_eval`` with the CLI's settings; returns the report."""
    run_edit_eval(config.compressors, config.output_dir, arguments.pool_sizes, config.num_samples,
                  arguments.edit_source, arguments.edit_style, seed=config.seed,
                  max_new_tokens=config.max_new_tokens, dtype=config.dtype, references=config.references,
                  base_model=config.base_model)
    return Path(config.output_dir) / "report.md"


def run_edit_eval(compressors: list[str], output_dir: str | Path, pool_sizes: Sequence[int], queries: int,
                  source: str = "offline", style: str = "auto", seed: int = 0, max_new_tokens: int = 16,
                  dtype: str = "float32", references: bool = True, base_model: str | None = None,
                  ) -> list[EditSummary]:
    """``python -m ctxzip.eval --tasks edits``: InComeS compressors (saved folders or Hub ids; ``incomes``: an untrained
    one on ``base_model``) on held-out edits at every pool size, beside in-context editing and no editing;
    ``report.md`` and ``results.json`` in ``output_dir``."""
    from .data import edit_records

    if not pool_sizes or min(pool_sizes) < 1 or queries < 1:
        raise ValueError(f"the edit evaluation needs pool sizes >= 1 and queries >= 1, got {pool_sizes}, {queries}")
    needed = max(math.ceil(queries / size) * size for size in pool_sizes)
    records = edit_records(source, "test", needed, seed + 1, style)
    methods = {label_for(name): load_method(name, base_model, dtype) for name in compressors}
    untrained = [clm for name, clm in zip(compressors, methods.values()) if kind_of_method(name) == "untrained"]
    first = next(iter(methods.values())).compressor
    # the unedited base: an untrained compressor's plain base (a trained one may have trained the base's own layers)
    unedited = untrained[0] if untrained else load_method(first.compressor_type, base_model or first.base_name, dtype)
    summaries = evaluate_edits(methods, records, pool_sizes, queries, max_new_tokens, references, unedited)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# Held-out edits ({source}, seed {seed}): {queries} queries per pool size, greedy replies of "
              f"{max_new_tokens} tokens\n\n")
    write_text_atomic(out / "report.md", header + markdown_table(summaries) + "\n")
    write_json_atomic(out / "results.json", [s.as_row() for s in summaries], indent=1)
    return summaries
