"""After training: rebuild the compressor with its trained tensors on a fresh base, save, push."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.integrations.deepspeed import deepspeed_config, unset_hf_deepspeed_config

from ctxzip.compressors import Compressor, CompressorConfig, load_base, save_compressor
from ctxzip.compressors.hub import load_exact, push_folder

from .memory_trainer import last_complete_checkpoint


def resolve_resume(output_dir: str | os.PathLike, value: str | bool | None) -> str | None:
    """The checkpoint a run resumes from, given ``TrainingArguments.resume_from_checkpoint``.

    - ``None`` (the default): the last complete checkpoint in ``output_dir``, if any (auto-resume);
    - ``True`` / ``"true"``: the last complete checkpoint, and an error when there is none;
    - ``False`` / ``"false"``: none, start afresh even where checkpoints exist;
    - a path (or a ``checkpoint-N`` folder name inside ``output_dir``): that checkpoint, which must be complete.
    """
    if value is None:
        return last_complete_checkpoint(output_dir)
    text = str(value).strip()
    if text.lower() in ("false", "no", "none", ""):
        return None
    if text.lower() in ("true", "yes", "last"):
        last = last_complete_checkpoint(output_dir)
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir}")
        return last
    path = Path(text)
    if not path.is_dir() and (Path(output_dir) / text).is_dir():
        path = Path(output_dir) / text
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: {path} is not a complete checkpoint "
                                "(a checkpoint-N folder with trainer_state.json)")
    return str(path)


def train_resumable(trainer: Any) -> dict[str, torch.Tensor]:
    """Train, resuming as ``trainer.args.resume_from_checkpoint`` says (see ``resolve_resume``); return
    the trained tensors.

    Every process must call this: gathering the tensors is a collective under ZeRO-3.
    """
    checkpoint = resolve_resume(trainer.args.output_dir, trainer.args.resume_from_checkpoint)
    if checkpoint:
        print(f"resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer.trained_state_dict()


@contextlib.contextmanager
def process_local_models() -> Iterator[None]:
    """Models loaded inside are plain, whole copies for this process alone, even under a ZeRO-3
    launch: transformers would otherwise partition them at construction (``deepspeed.zero.Init``),
    a collective that hangs when only one rank loads (data stages, the final export)."""
    config = deepspeed_config()  # the run's DeepSpeed config (a dict), or None outside DeepSpeed
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            _restore_deepspeed_config(config)


_restored: list[Any] = []  # keeps the restored config alive: transformers only holds a weak reference


def _restore_deepspeed_config(config: dict[str, Any]) -> None:
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, set_hf_deepspeed_config

    restored = HfDeepSpeedConfig(config)  # equal to the one the launch set; registers itself globally
    set_hf_deepspeed_config(restored)
    _restored[:] = [restored]


def rebuild_trained(compressor_cls: type[Compressor], config: CompressorConfig, base_model: str,
                    trained: dict[str, torch.Tensor], dtype: str = "float32",
                    frozen: dict[str, torch.Tensor] | None = None, **load_kwargs: Any) -> Compressor:
    """A plain (unsharded, unwrapped) compressor holding ``trained``; what gets evaluated and exported.

    Rebuilding on a fresh base model works the same after DDP, ZeRO-2 and ZeRO-3 (where the
    training module's own parameters are partitioned across processes). ``trained`` must hold exactly
    the compressor's trainable tensors; ``frozen``, own tensors fitted before training and left out of it
    (calibrated factors), taken as they were then. ``load_kwargs`` go to ``load_base`` (``revision``,
    ``attn_implementation``; see ``trainers.script_args.base_model_kwargs(model_args, quantized=False)``).
    """
    with process_local_models():
        model, _ = load_base(base_model, dtype=dtype, **load_kwargs)
    compressor = compressor_cls(config, model)
    frozen = frozen or {}
    expected = {n for n, p in compressor.named_parameters() if p.requires_grad} | set(frozen)
    load_exact(compressor, {**frozen, **trained}, expected, "the trained state")
    return compressor.eval()


@dataclass(frozen=True)
class HubPush:
    """The one push of a recipe: the exported artifact folder, uploaded once at the end of training.

    Made from ``TrainingArguments``' ``hub_*`` fields by ``trainers.script_args.export_push`` (which checks them
    before training starts): ``repo_id`` (``hub_model_id``, default the name of ``output_dir`` in the token's
    namespace, as transformers does), ``private`` (``hub_private_repo``: applies when the repo is created),
    ``token`` (``hub_token``), ``revision`` (``hub_revision``: the branch the commit goes to, created from main
    when needed) and the commit message.
    """

    repo_id: str
    private: bool | None = None
    token: str | None = field(default=None, repr=False)  # never printed or logged
    revision: str | None = None
    commit_message: str = "End of training: the exported ctxzip compressor"


def save_and_push(compressor: Compressor, tokenizer: PreTrainedTokenizerBase, output_dir: str,
                  eval_results: list[dict[str, Any]] | None, push: HubPush | None) -> Path:
    """Export to ``output_dir`` (config, weights, adapters, model card with ``eval_results``) and, with ``push``,
    upload exactly that artifact (never the checkpoints or logs beside it) as one commit."""
    folder = save_compressor(compressor, output_dir, tokenizer, eval_results)
    if push is not None:
        url = push_folder(folder, push.repo_id, private=push.private, token=push.token,
                          commit_message=push.commit_message, revision=push.revision)
        print(f"pushed to {url}")
    return folder


def check_export_reloads(final: Compressor, tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike,
                         context: str | list[str], dtype: str = "float32",
                         prompt: str = "Summarise the text in one sentence.", max_new_tokens: int = 12) -> str:
    """The exported ``folder`` must reload and generate exactly what the trained compressor generates
    (greedy, from a memory of ``context``); returns that generation, raises ``RuntimeError`` otherwise."""
    from ctxzip.compressors import CompressedLM

    before = CompressedLM(final, tokenizer)
    expected = before.generate(prompt, memory=before.compress(context), max_new_tokens=max_new_tokens)
    after = CompressedLM.from_pretrained(folder, dtype=dtype)
    got = after.generate(prompt, memory=after.compress(context), max_new_tokens=max_new_tokens)
    if got != expected:
        raise RuntimeError(f"the export at {folder} generates {got!r}, the trained compressor {expected!r}")
    print(f"reload check: {folder} reloads and generates identically ({got!r})")
    return got
