"""Artifacts: save / load / push a compressor as a folder in the PEFT-style layout.

A folder holds ``compressor_config.json`` (type, hyper-parameters, base model id, revision and
shape, tokenizer hash, ctxzip version), ``compressor.safetensors`` (the compressor's own weights),
the LoRA parts as standard PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``: at the
top for an adapter named ``default``, in a subfolder named after every other adapter, as PEFT saves
several named adapters) and a model card ``README.md``. Safetensors only, no pickles, no remote code.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctxzip import __version__

from .base import Compressor, compressor_class
from .errors import BaseModelMismatchError, CorruptArtifactError, CtxzipError
from .io import atomic_path, write_json_atomic, write_text_atomic
from .model_card import render_model_card
from .models import load_base, model_signature, public_model_id, tokenizer_hash

CONFIG_NAME = "compressor_config.json"
WEIGHTS_NAME = "compressor.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CTXZIP_VERSION = __version__  # recorded in every export


class StateMismatchError(CorruptArtifactError, ValueError):
    """Saved or trained tensors do not fit the module they are loaded into (names or shapes)."""


def load_exact(module: nn.Module, tensors: dict[str, torch.Tensor], expected: Iterable[str], source: str) -> None:
    """Load ``tensors`` into ``module``: exactly the names in ``expected``, each with its module shape.

    ``module.load_state_dict(strict=False)`` alone would silently skip a tensor the module does not have
    (a renamed or misspelled key, another compressor's weights) and keep the module's value for one that
    is absent; here both are an error naming the keys, and so is a shape mismatch. ``expected`` is a
    subset of ``module.state_dict()`` (a compressor's own or trained tensors, never the frozen base).
    """
    expected = set(expected)
    current = module.state_dict()
    unknown = sorted(expected - set(current))
    if unknown:
        raise ValueError(f"{type(module).__name__} has no tensors {_few(unknown)} to load")
    params = dict(module.named_parameters())
    if any(hasattr(params.get(k), "ds_id") for k in expected):
        raise ValueError("cannot load into parameters partitioned by DeepSpeed ZeRO-3; load a process-local "
                         "copy (trainers.export.process_local_models) or let DeepSpeed resume its checkpoint")
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    shapes = sorted(f"{k}: {tuple(tensors[k].shape)} vs {tuple(current[k].shape)}" for k in expected & set(tensors)
                    if tensors[k].shape != current[k].shape)
    if missing or unexpected or shapes:
        raise StateMismatchError(
            f"{source} does not match the {type(module).__name__} it is loaded into: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}, wrong shapes (saved vs expected) {_few(shapes)}")
    result = module.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # checked above; a state_dict hook would break it


def _few(keys: list[str], limit: int = 8) -> str:
    return "[]" if not keys else f"{keys[:limit]}" + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def compressor_metadata(compressor: Compressor, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any]:
    base = compressor.base_lm
    return {
        "compressor_type": compressor.compressor_type,
        "memory_kind": compressor.memory_kind,
        "config": compressor.compressor_config.to_dict(),
        "base_model": public_model_id(compressor.base_name),  # the Hub id, not the embedded alias
        "base_signature": model_signature(base.config),
        "tokenizer_hash": tokenizer_hash(tokenizer) if tokenizer is not None else None,
        "has_adapter": hasattr(compressor.model, "peft_config"),
        "adapters": sorted(getattr(compressor.model, "peft_config", {})),
        "ctxzip_version": CTXZIP_VERSION,
        "method_note": compressor.card_note,
    }


def save_compressor(compressor: Compressor, folder: str | os.PathLike,
                    tokenizer: PreTrainedTokenizerBase | None = None,
                    eval_results: list[dict[str, Any]] | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the artifact folder. Each file lands atomically; the config is written last.

    ``state_dict`` (optional) supplies the trained tensors when the module's own parameters are
    sharded (DeepSpeed ZeRO-3): keys as in ``compressor.state_dict()``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = compressor_metadata(compressor, tokenizer)
    source = compressor.own_state_dict() if state_dict is None else {
        k: v for k, v in state_dict.items() if not k.startswith("model.")}
    own = {k: v.detach().contiguous().cpu() for k, v in source.items()}
    if own:
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file(own, str(tmp), metadata={"format": "pt"})
    if meta["has_adapter"]:
        _save_adapters(compressor, folder, meta, state_dict)
    write_text_atomic(folder / "README.md", render_model_card(meta, eval_results))
    write_json_atomic(folder / CONFIG_NAME, meta, sort_keys=True)  # last: a folder with it is complete
    return folder


def adapter_folder(folder: Path, name: str) -> Path:
    """Where PEFT keeps adapter ``name`` of a saved model: the folder itself for ``default``, else a
    subfolder named after it (what ``PeftModel.save_pretrained`` writes and ``load_adapter`` reads)."""
    return folder if name == "default" else folder / name


def _save_adapters(compressor: Compressor, folder: Path, meta: dict[str, Any],
                   state_dict: dict[str, torch.Tensor] | None) -> None:
    """Every named adapter in PEFT's folder format (``adapter_folder``), each file landing atomically."""
    adapter_state = None if state_dict is None else {
        k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".staging-") as staging:  # PEFT writes folders
        for name in meta["adapters"]:
            compressor.model.save_pretrained(staging, safe_serialization=True, state_dict=adapter_state,
                                             selected_adapters=[name],
                                             save_embedding_layers=False)  # no Hub lookup of the base
            source, target = adapter_folder(Path(staging), name), adapter_folder(folder, name)
            target.mkdir(parents=True, exist_ok=True)
            adapter_config = json.loads((source / ADAPTER_CONFIG).read_text())
            os.replace(source / ADAPTER_WEIGHTS, target / ADAPTER_WEIGHTS)  # a rename: atomic
            # PEFT records the base by the name it was loaded under; the artifact names it by the public id
            # (the card's ``base_model``), which AutoPeftModelForCausalLM and ctxzip's load_base both resolve.
            adapter_config["base_model_name_or_path"] = meta["base_model"]
            write_json_atomic(target / ADAPTER_CONFIG, adapter_config, sort_keys=True)


def resolve_folder(name_or_path: str | os.PathLike, revision: str | None = None, *, token: str | bool | None = None,
                   cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:
    """A local folder as is; a shipped compressor's short name (``ctxzip/<name>``, see ``compressors.shipped``) as
    its folder in the package; anything else is treated as a Hub repo id and downloaded with ``snapshot_download``
    (``revision``: a branch, tag or commit; ``token``, ``cache_dir`` and ``local_files_only`` as there)."""
    from .shipped import shipped_folder  # imports this module's CONFIG_NAME

    path = Path(name_or_path)
    if path.is_dir():
        return path
    shipped = shipped_folder(name_or_path)
    if shipped is not None:
        if revision is not None:
            raise CtxzipError(f"{name_or_path!r} is a compressor shipped with ctxzip {CTXZIP_VERSION}: it has no revisions "
                              f"(got revision={revision!r})")
        return shipped
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, token=token, cache_dir=cache_dir,
                                      local_files_only=local_files_only))
    except (RepositoryNotFoundError, HFValidationError) as exc:
        raise CtxzipError(f"{name_or_path!r} is neither a local folder nor a Hub repo: {exc}") from exc
    except RevisionNotFoundError as exc:  # not a RepositoryNotFoundError: the repo exists
        raise CtxzipError(f"the Hub repo {name_or_path!r} has no revision {revision!r}: {exc}") from exc
    except LocalEntryNotFoundError as exc:  # local_files_only, HF_HUB_OFFLINE, or the Hub cannot be reached
        raise CtxzipError(f"{name_or_path!r} is not a local folder, and its Hub snapshot (revision {revision!r}) is "
                          f"not in the local cache while the Hub is not reached: {exc}") from exc


def read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CorruptArtifactError(f"{folder} has no {CONFIG_NAME}: not a ctxzip compressor folder")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise CorruptArtifactError(f"{path} must hold a JSON object, not {type(meta).__name__}")
    for key in ("compressor_type", "config", "base_model", "base_signature"):
        if key not in meta:
            raise CorruptArtifactError(f"{path} lacks the field {key!r}")
    for key in ("config", "base_signature"):
        if not isinstance(meta[key], dict):
            raise CorruptArtifactError(f"{path}: the field {key!r} must be a JSON object")
    return meta


def check_base_model(meta: dict[str, Any], model: PreTrainedModel,
                     tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Refuse a base model (or tokenizer) other than the one the compressor was trained for."""
    signature = model_signature(model.config)
    if signature != meta["base_signature"]:
        diff = {k: (meta["base_signature"].get(k), signature.get(k)) for k in signature
                if meta["base_signature"].get(k) != signature.get(k)}
        raise BaseModelMismatchError(
            f"this compressor was trained for base model {meta['base_model']!r}; the given base model "
            f"has a different shape (saved vs given: {diff})")
    saved_hash = meta.get("tokenizer_hash")
    if tokenizer is not None and saved_hash and saved_hash != tokenizer_hash(tokenizer):
        raise BaseModelMismatchError(
            f"the tokenizer differs from the one the compressor was trained with ({meta['base_model']!r})")


def load_compressor(name_or_path: str | os.PathLike, model: PreTrainedModel | None = None,
                    tokenizer: PreTrainedTokenizerBase | None = None, base_model: str | None = None,
                    dtype: str | torch.dtype | None = "float32", revision: str | None = None, *,
                    device_map: str | dict[str, Any] | None = None, token: str | bool | None = None,
                    cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                    config_overrides: dict[str, Any] | None = None,
                    ) -> tuple[Compressor, PreTrainedTokenizerBase]:
    """Load a saved compressor onto ``model`` (or onto its recorded base model, loaded here).

    ``config_overrides`` replaces settings of the saved config that say how a context is read, not what the
    weights are (a gist compressor's ``recent_tokens``); an unknown key is refused, and one that changes a trained
    tensor's shape fails when the weights load.
    ``name_or_path`` is a folder or a Hub repo id (``revision``: its branch, tag or commit). ``token``,
    ``cache_dir`` and ``local_files_only`` go to ``huggingface_hub.snapshot_download`` for the compressor and to
    transformers' ``from_pretrained`` for the base model; ``dtype`` and ``device_map`` load the base model (the
    compressor's own tensors follow its embeddings' device and dtype), so they need ``model=None``.
    """
    if model is not None and device_map is not None:
        raise ValueError("device_map places the base model loaded here; with model= given, place that model yourself")
    folder = resolve_folder(name_or_path, revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    meta = read_metadata(folder)
    if model is None:
        model, loaded_tokenizer = load_base(base_model or meta["base_model"], dtype=dtype, device_map=device_map,
                                            token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        tokenizer = tokenizer or loaded_tokenizer
    check_base_model(meta, model, tokenizer)
    cls = compressor_class(meta["compressor_type"])
    compressor = cls(cls.config_class.from_dict({**meta["config"], **(config_overrides or {})}), model)
    _load_own_weights(compressor, folder)
    if meta.get("has_adapter"):
        _load_adapter(compressor, folder, meta.get("adapters") or ["default"])
    compressor.release_training_state()
    compressor.eval()
    return compressor, tokenizer  # type: ignore[return-value]


def init_from_export(compressor: Compressor, name_or_path: str | os.PathLike, revision: str | None = None) -> list[str]:
    """Start ``compressor``'s trained tensors from an exported compressor (QD-LCIRC from an LCIRC export, a gist
    fine-tuning stage from its pre-training stage): every tensor the export holds must exist here with its shape;
    the ones only this compressor has (QD-LCIRC's query mixer, an adapter the export lacks) keep their
    initialisation and are returned. The export must be for the same base model; its PEFT adapters are loaded into
    this compressor's adapters of the same name, which must have the same rank, scaling and target modules."""
    folder = resolve_folder(name_or_path, revision)
    meta = read_metadata(folder)
    check_base_model(meta, compressor.base_lm, compressor.tokenizer)
    path = folder / WEIGHTS_NAME
    saved = _read_safetensors(path)
    load_exact(compressor, saved, saved, str(path))
    fresh = set(compressor.own_state_dict()) - set(saved)
    ours = dict(getattr(compressor.model, "peft_config", {}))
    theirs = (meta.get("adapters") or ["default"]) if meta.get("has_adapter") else []
    for name in theirs:
        _check_same_adapter(folder, name, ours.get(name))
    _load_adapter(compressor, folder, theirs)
    fresh |= {f"adapter {name}" for name in ours if name not in theirs}
    return sorted(fresh)


def _check_same_adapter(folder: Path, name: str, ours: Any) -> None:
    """An export's adapter ``name`` can start ours only when both are the same LoRA: same rank, scaling and targets."""
    theirs = json.loads((adapter_folder(folder, name) / ADAPTER_CONFIG).read_text())
    if ours is None:
        raise StateMismatchError(f"{folder} holds a PEFT adapter {name!r} that this compressor does not have")
    mine = {"r": ours.r, "lora_alpha": ours.lora_alpha, "target_modules": sorted(ours.target_modules or [])}
    saved = {"r": theirs.get("r"), "lora_alpha": theirs.get("lora_alpha"),
             "target_modules": sorted(theirs.get("target_modules") or [])}
    if mine != saved:
        raise StateMismatchError(f"{folder}'s adapter {name!r} is {saved}, this compressor's is {mine}: start from an "
                                 "export with the same lora_r, lora_alpha and lora_target_modules")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CorruptArtifactError(f"missing weight file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptArtifactError(f"{path} is corrupt or not a safetensors file: {exc}") from exc


def _load_own_weights(compressor: Compressor, folder: Path) -> None:
    expected = compressor.own_state_dict()
    if not expected:
        return
    path = folder / WEIGHTS_NAME
    load_exact(compressor, _read_safetensors(path), expected, str(path))


def _load_adapter(compressor: Compressor, folder: Path, names: list[str]) -> None:
    from peft import set_peft_model_state_dict

    for name in names:
        path = adapter_folder(folder, name) / ADAPTER_WEIGHTS
        weights = _read_safetensors(path)
        result = set_peft_model_state_dict(compressor.model, weights, adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        missing_lora = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k and f".{name}." in k]
        if unexpected or missing_lora:
            raise StateMismatchError(
                f"{path} does not match the {name!r} adapter: unexpected {unexpected[:5]}, missing {missing_lora[:5]}")


def check_push_revision(revision: str | None) -> None:
    """A push commits to a branch: ``None`` / ``"main"``, or another branch (created from main when it does not
    exist). A commit hash names no branch and is refused."""
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        raise ValueError(f"cannot push to the commit {revision}: a push needs a branch name (main, or a branch "
                         "that is created from main when it does not exist)")


def artifact_files(folder: str | os.PathLike) -> list[str]:
    """The files of the exported compressor in ``folder``, as paths relative to it.

    Only the artifact, each file by its exact path: an output_dir also holds checkpoints and logs that must stay
    local, and a PEFT checkpoint (checkpoint-N/adapter_model.safetensors) looks like a named adapter's subfolder,
    so the adapters are the ones the artifact lists, never a "*/" pattern."""
    meta = read_metadata(Path(folder))
    adapters = (meta.get("adapters") or ["default"]) if meta.get("has_adapter") else []
    return [WEIGHTS_NAME, "README.md", CONFIG_NAME] + [
        (adapter_folder(Path(), name) / file).as_posix() for name in adapters for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)]

def push_folder(folder: str | os.PathLike, repo_id: str, private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload ctxzip compressor",
                revision: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload exactly the artifact folder as one commit; returns the commit URL.

    ``private`` applies when the repo is created (an existing repo keeps its visibility); ``token`` is the one
    ``HfApi`` uses (default: the logged-in token); ``revision`` is the branch the commit goes to, created from
    main when it does not exist (``None``: main). A ``repo_id`` without a namespace lands in the token's user
    namespace, as ``HfApi.create_repo`` does it.
    """
    from huggingface_hub import HfApi

    check_push_revision(revision)
    artifact = [glob.escape(name) for name in artifact_files(folder)]  # refuses a folder that is no artifact
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # "name" -> "user/name"
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                             allow_patterns=artifact, revision=revision)
    return str(getattr(info, "commit_url", info))
