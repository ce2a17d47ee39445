"""Text sources, token-exact filler and synthetic long-context tasks.

>>> from ctxzip.data import build_mixture, build_task
>>> ds = build_task("passkey", tokenizer, num_samples=8, context_tokens=2048, seed=0)
>>> mix = build_mixture(tokenizer, num_samples=200, split="test", min_tokens=128, max_tokens=2048)

`build_mixture` (``data/mixture.py``) mixes retrieval families whose needle, question and instruction
wordings are split into train and held-out templates; its docstring names the split rules.

A learned method's own data lives in its package (``compressors/<method>/data.py``).
This package must not import ``compressors``, ``trainers`` or ``eval``.
"""

from .mixture import MIXTURE_FAMILIES, build_mixture
from .sources import Haystack, count_tokens, load_texts
from .tasks import FEATURES, TASKS, TaskSpec, build_task, register_task

__all__ = [
    "FEATURES",
    "MIXTURE_FAMILIES",
    "TASKS",
    "Haystack",
    "TaskSpec",
    "build_mixture",
    "build_task",
    "count_tokens",
    "load_texts",
    "register_task",
]
