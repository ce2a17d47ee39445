"""Compressors that ship inside the ctxzip package, loadable offline by a short name.

A shipped compressor is an exported folder (``save_compressor``'s layout: config, its own safetensors weights,
a PEFT adapter, a model card with its measured table) under ``ctxzip/shipped/<name>/``. It is named
``ctxzip/<name>`` everywhere a compressor folder or Hub id is accepted::

    CompressedLM.from_pretrained("ctxzip/gist-smollm2-135m")
    python -m ctxzip.eval --compressor ctxzip/gist-smollm2-135m ...

The short name is looked up here before the Hub is asked, so nothing downloads: the artifacts are a few MB
(adapters and gist embeddings; the base model is the embedded one). A ``ctxzip/<name>`` that is not shipped is
left to the Hub, where a user may have pushed one under that namespace.
"""

from __future__ import annotations

import os
from pathlib import Path

from .hub import CONFIG_NAME

__all__ = ["SHIPPED_PREFIX", "shipped_folder", "shipped_names", "shipped_root"]

SHIPPED_PREFIX = "ctxzip/"
# Where the artifacts live: the ``shipped`` folder of the ``ctxzip`` package. The environment variable moves it
# (tests point it at a folder of their own; a user may keep further artifacts of their own there).
_ROOT_VARIABLE = "CTXZIP_SHIPPED_DIR"


def shipped_root() -> Path:
    """The folder that holds the shipped compressors, one sub-folder each."""
    override = os.environ.get(_ROOT_VARIABLE)
    if override:
        return Path(override)
    import ctxzip

    return Path(ctxzip.__file__).resolve().parent / "shipped"


def shipped_names() -> list[str]:
    """The short names of the shipped compressors (``ctxzip/<name>``), sorted."""
    root = shipped_root()
    if not root.is_dir():
        return []
    return sorted(SHIPPED_PREFIX + child.name for child in root.iterdir() if (child / CONFIG_NAME).is_file())


def shipped_folder(name: str | os.PathLike) -> Path | None:
    """The folder of the shipped compressor ``name`` (``ctxzip/<name>``), or ``None`` when ``name`` is not one."""
    text = str(name)
    if not text.startswith(SHIPPED_PREFIX):
        return None
    folder = shipped_root() / text[len(SHIPPED_PREFIX):]
    return folder if (folder / CONFIG_NAME).is_file() else None
