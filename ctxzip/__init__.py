"""ctxzip: train, export and serve learned context compressors for LLMs.

One import name; its subpackages are the repository's folders:

- ``ctxzip.compressors``: memories, the compressor contract, every method (one package each), the training-free
  baselines, the inference wrapper ``CompressedLM``, base models and Hub I/O;
- ``ctxzip.trainers``: the Trainer subclasses, objectives and recipe bodies every method shares;
- ``ctxzip.data``: text sources, token-exact filler and the synthetic long-context tasks;
- ``ctxzip.eval``: the evaluation runner (``python -m ctxzip.eval``), scoring and reports.

The names below are the public API (``from ctxzip import CompressedLM, Memory``). They load on first use, so
that ``import ctxzip.data`` does not import torch models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = (
    "COMPRESSORS", "EMBEDDED_MODEL", "TINY_MODEL", "BaseModelMismatchError", "CompressedLM", "Compressor",
    "CompressorConfig", "ContextTooLongError", "CorruptArtifactError", "CtxzipError", "EmptyInputError", "Memory",
    "UnknownCompressorError", "UnsupportedModelError", "compressor_class", "load_base", "load_compressor", "register_compressor",
    "save_compressor", "shipped_names",
)

__all__ = ["__version__", *_PUBLIC]

if TYPE_CHECKING:  # pragma: no cover
    from .compressors import *  # noqa: F403


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module("ctxzip.compressors"), name)
    raise AttributeError(f"module 'ctxzip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
