"""LoRA adapters of the learned compressors, through PEFT's public API (one place builds them)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel


def add_named_lora(model: PreTrainedModel, ranks: dict[str, int], alpha: int, dropout: float,
                   target_modules: list[str]) -> Any:
    """``model`` wrapped as a ``PeftModel`` with one LoRA adapter per name in ``ranks`` (name -> rank), all on
    ``target_modules``; the first is active. PEFT freezes every non-LoRA weight; every adapter is trainable
    (a method that runs several in one step, e.g. an encoder and a decoder, switches them itself)."""
    from peft import LoraConfig, get_peft_model

    def config(rank: int) -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                          bias="none", task_type="CAUSAL_LM")

    (first, first_rank), *rest = ranks.items()
    peft_model = get_peft_model(model, config(first_rank), adapter_name=first)
    for name, rank in rest:
        peft_model.add_adapter(name, config(rank))
    if rest:
        peft_model.set_requires_grad(list(ranks), requires_grad=True)
    return peft_model
