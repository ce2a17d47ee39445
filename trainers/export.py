"""After training: rebuild the compressor with its trained tensors on a fresh base, save, push."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from compressors import Compressor, CompressorConfig, load_base, save_compressor
from compressors.hub import push_folder


def train_resumable(trainer: Any) -> dict[str, torch.Tensor]:
    """Train from the last complete checkpoint in ``output_dir`` (if any); return the trained tensors.

    Every process must call this: gathering the tensors is a collective under ZeRO-3.
    """
    from .memory_trainer import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(trainer.args.output_dir)
    if checkpoint:
        print(f"resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer.trained_state_dict()


@contextlib.contextmanager
def process_local_models() -> Iterator[None]:
    """Models loaded inside are plain, whole copies for this process alone, even under a ZeRO-3
    launch: transformers would otherwise partition them at construction (``deepspeed.zero.Init``),
    a collective that hangs when only one rank loads (data stages, the final export)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter; restored on exit
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def rebuild_trained(compressor_cls: type[Compressor], config: CompressorConfig, base_model: str,
                    trained: dict[str, torch.Tensor], dtype: str = "float32") -> Compressor:
    """A plain (unsharded, unwrapped) compressor holding ``trained``; what gets evaluated and exported.

    Rebuilding on a fresh base model works the same after DDP, ZeRO-2 and ZeRO-3 (where the
    training module's own parameters are partitioned across processes).
    """
    with process_local_models():
        model, _ = load_base(base_model, dtype=dtype)
    compressor = compressor_cls(config, model)
    expected = {n for n, p in compressor.named_parameters() if p.requires_grad}
    missing = expected - set(trained)
    if missing:
        raise ValueError(f"trained state lacks {sorted(missing)[:5]} (of {len(missing)})")
    compressor.load_state_dict(trained, strict=False)
    return compressor.eval()


def save_and_push(compressor: Compressor, tokenizer: PreTrainedTokenizerBase, output_dir: str,
                  eval_results: list[dict[str, Any]] | None, push: bool, hub_model_id: str | None) -> Path:
    folder = save_compressor(compressor, output_dir, tokenizer, eval_results)
    if push:
        if not hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. user/gist-smollm2)")
        print(f"pushed to {push_folder(folder, hub_model_id)}")
    return folder
