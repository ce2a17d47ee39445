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

__all__ = ["SHIPPED_MAX_BYTES", "SHIPPED_PREFIX", "ship", "shipped_folder", "shipped_names", "shipped_root"]

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
    return sorted(SHIPPED_PREFIX + child.name for child in root.iterdir()
                  if not child.name.startswith(".") and (child / CONFIG_NAME).is_file())


def shipped_folder(name: str | os.PathLike) -> Path | None:
    """The folder of the shipped compressor ``name`` (``ctxzip/<name>``), or ``None`` when ``name`` is not one."""
    text = str(name)
    if not text.startswith(SHIPPED_PREFIX):
        return None
    short = text[len(SHIPPED_PREFIX):]
    folder = shipped_root() / short
    return folder if not short.startswith(".") and (folder / CONFIG_NAME).is_file() else None



SHIPPED_MAX_BYTES = 8 * 2**20  # adapter-sized: the artifacts live in the package, not on a hub


def ship(export: str | os.PathLike, name: str, card_section: str = "") -> Path:
    """Copy the exported compressor in folder ``export`` into the shipped folder as ``ctxzip/<name>``.

    Only the artifact's files are copied (no checkpoints). ``card_section`` (markdown: the measured table against
    the baselines and the commands that made it) is appended to its model card. An existing shipped compressor of
    that name is replaced once the new copy is complete. Refuses a name that is not one folder name and artifacts
    over ``SHIPPED_MAX_BYTES``; a folder that is no export is refused by ``artifact_files``."""
    import shutil

    from .hub import artifact_files
    from .io import atomic_path

    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"a shipped name is one folder name such as 'gist-smollm2-135m', got {name!r}")
    source = Path(export)
    files = artifact_files(source)
    size = sum((source / file).stat().st_size for file in files)
    if size > SHIPPED_MAX_BYTES:
        raise ValueError(f"{source} holds {size / 2**20:.1f} MiB of artifact; a shipped compressor stays under "
                         f"{SHIPPED_MAX_BYTES / 2**20:.0f} MiB (adapters and small tensors)")
    target = shipped_root() / name
    staged = target.with_name(f".{name}.new")  # a dot name: shipped_names never lists it
    shutil.rmtree(staged, ignore_errors=True)
    with atomic_path(staged, folder=True) as staging:
        for file in files:
            (staging / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / file, staging / file)
        if card_section:
            card = staging / "README.md"
            card.write_text(card.read_text().rstrip("\n") + "\n\n" + card_section.strip("\n") + "\n")
    if target.exists():  # the old copy steps aside only once the new one is whole
        retired = target.with_name(f".{name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
        os.replace(staged, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staged, target)
    return target
