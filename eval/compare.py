"""Compare a compressor with the untrained one, truncation at the same budget and the full context."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from ctxzip.compressors import CompressedLM, Compressor
from ctxzip.compressors.baselines import FullContext, FullContextConfig, Truncation, TruncationConfig

from .report import learned_vs_training_free
from .scoring import Summary, markdown_table, score_rows


def compare_with_baselines(compressor: Compressor, tokenizer: PreTrainedTokenizerBase, rows: Any,
                           scoring: str = "loglik", untrained: Compressor | None = None,
                           baselines: bool = True, others: dict[str, Compressor] | None = None,
                           untrained_label: str = "untrained") -> list[Summary]:
    """Score ``compressor`` on ``rows``, then each of ``others`` (other learned compressors, by label: e.g. a
    shipped one) on the same rows; with ``baselines``, also the untrained compressor (``untrained_label``: the
    compressor before this training, which may have started from an export), truncation to the
    compressor's achieved ratio (the same memory budget in tokens), the full context (the ceiling) and the
    question alone (no context: the floor)."""
    trained, _ = score_rows(CompressedLM(compressor, tokenizer), rows, "trained", scoring)
    summaries = [trained]
    for label, other in (others or {}).items():
        summaries.append(score_rows(CompressedLM(other.eval(), tokenizer), rows, label, scoring)[0])
    if not baselines:
        return summaries
    if untrained is not None:
        summaries.append(score_rows(CompressedLM(untrained.eval(), tokenizer), rows, untrained_label, scoring)[0])
    # The baselines read the plain base: the untrained compressor's when there is one (a method that trains
    # the base's own weights, e.g. RCC with train_mode full, has no plain base of its own).
    reference = untrained if untrained is not None else compressor
    base = reference.base_lm
    with reference.plain_base():
        truncation = Truncation(TruncationConfig(ratio=max(1.0, trained.achieved_ratio)), base)
        summaries.append(score_rows(CompressedLM(truncation, tokenizer), rows, "truncation", scoring)[0])
        full = CompressedLM(FullContext(FullContextConfig(), base), tokenizer)
        summaries.append(score_rows(full, rows, "full_context", scoring)[0])
        summaries.append(score_rows(full, rows, "no_context", scoring, with_context=False)[0])
    return summaries


def print_table(summaries: list[Summary], title: str = "") -> str:
    """Print the summaries, each mean with its 95% interval, then (when there is a learned compressor) each
    learned one beside the training-free methods within its memory bytes with a verdict that counts a
    difference inside the intervals as a tie. Returns what it printed, without the title."""
    versus = learned_vs_training_free(summaries)
    table = markdown_table(summaries) + (f"\n\n{versus}" if versus else "")
    print(("\n" + title + "\n" if title else "\n") + table + "\n")
    return table
