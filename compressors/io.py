"""Atomic writes: a file (or folder) appears whole under its name, or not at all.

Every writer in ctxzip that must never leave half a file behind (a crash, a full disk, a process killed
mid-write, a concurrent reader under ``accelerate launch``) goes through ``atomic_path``: the content is
written to a temporary sibling in the same folder (same file system, so the final ``os.replace`` is an
atomic rename) and renamed over the target only once the writer returned; on an error the temporary
sibling is removed and the previous file, if any, is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path of ``path``; on success it replaces ``path`` (``os.replace``).

    The caller writes the temporary path (``safetensors.torch.save_file(tensors, tmp)``, ...). With
    ``folder=True`` the temporary path is an empty folder created here (a folder replaces ``path`` only
    where ``path`` does not exist or is an empty folder: ``os.replace`` raises ``OSError`` otherwise,
    e.g. when another process won a race to create it). The parent folder is created if needed. On any
    error the temporary path is removed and the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh unique name (not mkstemp's 0600 file): the written file gets the usual permissions.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` is replaced only when the block succeeds.

    ``mode`` is ``"w"`` (text, ``encoding``) or ``"wb"`` (bytes).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int | None = 2, sort_keys: bool = False,
                      **json_kwargs: Any) -> Path:
    """Serialize ``payload`` first (an unserializable payload never touches ``path``), then write it atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys, **json_kwargs))


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[Any], **json_kwargs: Any) -> Path:
    """Write ``records`` as JSON Lines (one ``json.dumps`` per line, each ending with a newline) atomically.

    Every record is serialized first (an unserializable record never touches ``path``); returns the path.
    """
    return write_text_atomic(path, "".join(json.dumps(r, **json_kwargs) + "\n" for r in records))
