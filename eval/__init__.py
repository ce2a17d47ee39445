"""Evaluation of compressors against the full context and training-free baselines."""

from .metrics import bleu, exact_match, rouge_l, substring_match, text_metrics
from .scoring import Summary, markdown_table, score_rows

__all__ = ["Summary", "bleu", "exact_match", "markdown_table", "rouge_l", "score_rows", "substring_match",
           "text_metrics"]
