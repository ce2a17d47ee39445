"""Text sources, token-exact filler and synthetic long-context tasks.

>>> from ctxzip.data import build_task
>>> ds = build_task("passkey", tokenizer, num_samples=8, context_tokens=2048, seed=0)

A learned method's own data lives in its package (``compressors/<method>/data.py``).
This package must not import ``compressors``, ``trainers`` or ``eval``.
"""

from .sources import Haystack, count_tokens, load_texts
from .tasks import FEATURES, TASKS, TaskSpec, build_task, register_task

__all__ = [
    "FEATURES",
    "TASKS",
    "Haystack",
    "TaskSpec",
    "build_task",
    "count_tokens",
    "load_texts",
    "register_task",
]
