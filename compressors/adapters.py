"""LoRA adapters of the learned compressors, through PEFT's public API: the one place their fields are declared
(``LoraSettings``, a base of every config that trains an adapter) and their ``LoraConfig`` is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel

from .errors import UnsupportedModelError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = (*ATTENTION_PROJECTIONS, "gate_proj", "up_proj", "down_proj")
#: Where a family fuses projections (Phi3: qkv_proj, gate_up_proj), a target names the fused module instead.
FUSED_PROJECTIONS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                     "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


@dataclass
class LoraSettings:
    """The LoRA fields of a compressor config. A method whose adapter differs redeclares a field with its own
    default and help (dataclass fields keep their place); ``lora_config`` is the one ``LoraConfig`` builder."""

    lora_r: int = field(default=8, metadata={"help": "rank of the compressor's LoRA adapter"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / rank)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input during training"})
    lora_target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS),
                                           metadata={"help": "modules of the base model that get LoRA layers"})

    def lora_config(self, rank: int | None = None, model: PreTrainedModel | None = None) -> Any:
        """PEFT's ``LoraConfig`` for an adapter of ``rank`` (default ``lora_r``) with these settings; given the
        ``model``, the targets are the modules it really has (``lora_targets``)."""
        from peft import LoraConfig

        targets = lora_targets(model, self.lora_target_modules) if model is not None else self.lora_target_modules
        return LoraConfig(r=self.lora_r if rank is None else rank, lora_alpha=self.lora_alpha,
                          lora_dropout=self.lora_dropout, target_modules=list(targets),
                          bias="none", task_type="CAUSAL_LM")


def lora_targets(model: PreTrainedModel, targets: list[str]) -> list[str]:
    """``targets`` as module names of ``model``: a projection the family fuses is its fused module (Phi3's
    ``qkv_proj`` for ``q_proj``/``k_proj``/``v_proj``); a target the model has in no form is an error."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    resolved = list(dict.fromkeys(t if t in names else FUSED_PROJECTIONS.get(t, t) for t in targets))
    missing = [t for t in resolved if t not in names]
    if missing:
        raise UnsupportedModelError(f"LoRA targets {missing} are not modules of this "
                                    f"{getattr(model.config, 'model_type', type(model).__name__)} model: set "
                                    "lora_target_modules to module names it has")
    return resolved


def add_named_lora(model: PreTrainedModel, ranks: dict[str, int], settings: LoraSettings) -> Any:
    """``model`` wrapped as a ``PeftModel`` with one LoRA adapter per name in ``ranks`` (name -> rank), all with
    ``settings``; the first is active. PEFT freezes every non-LoRA weight; every adapter is trainable (a method
    that runs several in one step, e.g. an encoder and a decoder, switches them itself)."""
    from peft import get_peft_model

    (first, first_rank), *rest = ranks.items()
    peft_model = get_peft_model(model, settings.lora_config(first_rank, model), adapter_name=first)
    for name, rank in rest:
        peft_model.add_adapter(name, settings.lora_config(rank, model))
    if rest:
        peft_model.set_requires_grad(list(ranks), requires_grad=True)
    return peft_model
