"""Text sources, token-exact filler and synthetic long-context tasks.

>>> from data import build_task
>>> ds = build_task("passkey", tokenizer, num_samples=8, context_tokens=2048, seed=0)
>>> edits = build_edit_task(64, seed=0, split="train")  # counterfactual edits (data.edits)

This package must not import ``compressors``, ``trainers`` or ``eval``.
"""

from .edits import (
    EDIT_FEATURES,
    EDIT_FIELDS,
    build_edit_task,
    edit_records,
    load_edit_records,
    validate_edit_record,
)
from .sources import Haystack, count_tokens, load_texts
from .tasks import FEATURES, TASKS, TaskSpec, build_task, register_task

__all__ = [
    "EDIT_FEATURES",
    "EDIT_FIELDS",
    "FEATURES",
    "TASKS",
    "Haystack",
    "TaskSpec",
    "build_edit_task",
    "build_task",
    "edit_records",
    "count_tokens",
    "load_edit_records",
    "load_texts",
    "register_task",
    "validate_edit_record",
]
