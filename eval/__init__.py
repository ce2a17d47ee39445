"""Evaluation of compressors against the full context and training-free baselines."""

from .scoring import Summary, markdown_table, score_rows

__all__ = ["Summary", "markdown_table", "score_rows"]
