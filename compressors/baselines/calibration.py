"""Calibration artifacts of the training-free baselines that learn something once per base model.

Q-Filters (query directions) and EHPC (evaluator heads) compute a small tensor set from
calibration text once per base model and reuse it. This module holds what they share:

- ``calibration_text()``: the offline default corpus, the topic help of ``pydoc_data`` (it ships
  with CPython; ``compressors`` must not import ``data``, so it is read here directly), and
  ``calibration_ids(tokenizer)``, its tokens (tokenized once per tokenizer object: ~1 s each time);
- ``artifact_path(kind, model, tokenizer, settings)``: ``$CTXZIP_HOME/calibration/<kind>/`` +
  a file name keyed by the base model (its name, shape signature and a fingerprint of its
  weights), the tokenizer and the calibration settings, so that changing any of them computes
  a new artifact instead of silently reusing a stale one;
- ``save_artifact`` / ``load_artifact``: one safetensors file whose metadata records the kind,
  the base model id, its shape signature, the weight fingerprint and the settings. Loading an
  artifact made for a base model of another shape raises ``BaseModelMismatchError``; one made
  for a model of the same shape but other weights (e.g. the base vs. the instruct variant) loads
  with a warning, since the file was named explicitly;
- an in-process memo, so that the eval runner (which builds a fresh compressor per ratio and
  sample) reads each artifact once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import BaseModelMismatchError, CorruptArtifactError, CtxzipError
from ..io import atomic_path
from ..models import base_model_id, ctxzip_home, load_tokenizer, model_signature, tokenizer_hash

_FORMAT = "ctxzip.calibration/1"
_MEMO: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
# per model / tokenizer object: hashing weights and a 49k-token vocabulary costs ~0.1 s, and the
# eval runner builds a fresh compressor for every ratio and sample
_FINGERPRINTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_TOKENIZER_HASHES: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_CORPUS_IDS: weakref.WeakKeyDictionary[Any, tuple[int, ...]] = weakref.WeakKeyDictionary()


def calibration_text() -> str:
    """The default calibration corpus: every ``pydoc_data`` topic, in key order (~65k words)."""
    from pydoc_data.topics import topics

    return "\n\n".join(re.sub(r"[ \t]+", " ", topics[key]).strip() for key in sorted(topics))


def calibration_ids(tokenizer: Any) -> list[int]:
    """The tokens of ``calibration_text()`` (no special tokens), tokenized once per tokenizer object."""
    try:
        ids = _CORPUS_IDS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return list(tokenizer(calibration_text(), add_special_tokens=False)["input_ids"])
    if ids is None:
        ids = _CORPUS_IDS[tokenizer] = tuple(tokenizer(calibration_text(), add_special_tokens=False)["input_ids"])
    return list(ids)


def _projection_weight(attention: Any, name: str) -> torch.Tensor:
    """The weight of ``attention``'s ``name`` projection (``q_proj``, ``k_proj``), or of its fused ``qkv_proj``."""
    projection = getattr(attention, name, None)
    if projection is None:
        projection = getattr(attention, "qkv_proj", None)
    if projection is None:
        return next(attention.parameters())
    return projection.weight


def model_fingerprint(model: Any) -> str:
    """A short hash of the base model's identity: name, shape and a few of its weights.

    Memoized per model object (weights changed in place afterwards are not noticed)."""
    if model in _FINGERPRINTS:
        return _FINGERPRINTS[model]
    h = hashlib.sha256()
    h.update(base_model_id(model).encode())
    h.update(json.dumps(model_signature(model.config), sort_keys=True).encode())
    layers = model.model.layers
    first, last = layers[0].self_attn, layers[-1].self_attn
    for weight in (_projection_weight(first, "q_proj"), _projection_weight(last, "k_proj")):
        h.update(weight.detach().float().cpu().contiguous().numpy().tobytes())
    _FINGERPRINTS[model] = h.hexdigest()[:16]
    return _FINGERPRINTS[model]


def _tokenizer_hash(tokenizer: Any) -> str:
    try:
        if tokenizer not in _TOKENIZER_HASHES:
            _TOKENIZER_HASHES[tokenizer] = tokenizer_hash(tokenizer)
        return _TOKENIZER_HASHES[tokenizer]
    except TypeError:  # not weak-referenceable
        return tokenizer_hash(tokenizer)


def get_tokenizer(compressor: Any) -> Any:
    """The tokenizer given with ``use_tokenizer``, else the one of the base model's name."""
    tokenizer = getattr(compressor, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    name = compressor.base_name
    try:
        tokenizer = load_tokenizer(name)
    except Exception as exc:  # noqa: BLE001 - any loader failure means the same thing to the user
        raise CtxzipError(
            f"{compressor.compressor_type} needs a tokenizer to read its calibration text and could not "
            f"load one for the base model {name!r} ({exc}); call .use_tokenizer(tokenizer) first") from exc
    compressor.tokenizer = tokenizer
    return tokenizer


def artifact_path(kind: str, model: Any, tokenizer: Any, settings: dict[str, Any],
                  root: str | os.PathLike | None = None) -> Path:
    """Default location of the ``kind`` artifact for this model, tokenizer and settings."""
    key = hashlib.sha256(json.dumps(
        {"model": model_fingerprint(model), "tokenizer": _tokenizer_hash(tokenizer), "settings": settings},
        sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^\w.-]+", "_", base_model_id(model).strip("/").split("/")[-1] or "model")
    base = Path(root) if root is not None else ctxzip_home() / "calibration" / kind
    return base / f"{slug}-{key}.safetensors"


def save_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], kind: str, model: Any,
                  settings: dict[str, Any]) -> Path:
    """Write the artifact atomically (a crash never leaves half a file) and memoize it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": _FORMAT, "kind": kind, "base_model": base_model_id(model),
            "base_signature": model_signature(model.config), "fingerprint": model_fingerprint(model),
            "settings": settings}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"ctxzip": json.dumps(meta)})
    _MEMO[str(path.resolve())] = (tensors, meta)
    return path


def load_artifact(path: str | os.PathLike, kind: str, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a ``kind`` artifact and check that it was made for a base model of ``model``'s shape."""
    path = Path(path)
    memo = _MEMO.get(str(path.resolve()))
    if memo is None:
        if not path.is_file():
            raise CorruptArtifactError(f"no {kind} artifact at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = (f.metadata() or {}).get("ctxzip")
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CorruptArtifactError(f"{path} is not a readable safetensors file: {exc}") from exc
        try:
            meta = json.loads(header) if header else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise CorruptArtifactError(f"{path} is not a ctxzip calibration artifact")
        memo = (tensors, meta)
    tensors, meta = memo
    if meta.get("kind") != kind:
        raise CorruptArtifactError(f"{path} holds a {meta.get('kind')!r} artifact, not {kind!r}")
    signature = model_signature(model.config)
    if meta.get("base_signature") != signature:
        saved = meta.get("base_signature") or {}
        diff = {k: (saved.get(k), signature.get(k)) for k in sorted(set(saved) | set(signature))
                if saved.get(k) != signature.get(k)}
        raise BaseModelMismatchError(
            f"the {kind} artifact {path} was computed for base model {meta.get('base_model')!r} of another "
            f"shape (artifact vs model: {diff}); compute it for this model (delete the path or pass another)")
    if meta.get("fingerprint") != model_fingerprint(model):
        warnings.warn(f"the {kind} artifact {path} was computed for {meta.get('base_model')!r}, a model of the "
                      f"same shape but other weights than {base_model_id(model)!r}", stacklevel=3)
    _MEMO[str(path.resolve())] = memo
    return tensors, meta


def load_or_compute(kind: str, compressor: Any, explicit: str | None, settings: dict[str, Any],
                    compute: Any) -> tuple[dict[str, torch.Tensor], Path]:
    """The artifact at ``explicit`` (computed and saved there if missing) or at the default path."""
    model = compressor.base_lm
    if explicit:
        path = Path(explicit).expanduser()
    else:
        path = artifact_path(kind, model, get_tokenizer(compressor), settings)
    if path.is_file() or str(path.resolve()) in _MEMO:
        return load_artifact(path, kind, model)[0], path
    tensors = compute()
    try:
        save_artifact(path, tensors, kind, model, settings)
    except OSError as exc:  # read-only cache: keep the result for this process only
        warnings.warn(f"could not save the {kind} artifact to {path}: {exc}", stacklevel=3)
        _MEMO[str(path.resolve())] = (tensors, {"kind": kind, "base_signature": model_signature(model.config),
                                               "fingerprint": model_fingerprint(model)})
    return tensors, path
