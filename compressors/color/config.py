"""Hyper-parameters of the CoLoR compressor: the writer's prompt, generation settings and LoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..adapters import LoraSettings
from ..base import CompressorConfig

DEFAULT_PROMPT = ("Rewrite the passage below as briefly as possible. Keep every name, number and fact in it.\n\n"
                  "Passage:\n{passage}")


@dataclass
class ColorConfig(CompressorConfig, LoraSettings):
    """Hyper-parameters of the CoLoR compressor (the writer's prompt, generation and LoRA)."""

    prompt_template: str = field(default=DEFAULT_PROMPT,
                                 metadata={"help": "compression instruction; must contain {passage}"})
    max_new_tokens: int = field(default=48, metadata={"help": "longest compression, in tokens"})
    do_sample: bool = field(default=False, metadata={"help": "sample the compression (False: greedy)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (with do_sample)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold (with do_sample)"})
    generation_batch_size: int = field(default=16, metadata={"help": "passages compressed per generate call"})
    lora_r: int = field(default=8, metadata={"help": "rank of the writer's LoRA adapter, saved with the compressor"})

    def __post_init__(self) -> None:
        if "{passage}" not in self.prompt_template:
            raise ValueError("prompt_template must contain the placeholder {passage}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.lora_r < 1:
            raise ValueError("CoLoR trains a LoRA adapter: lora_r must be >= 1")
        if self.generation_batch_size < 1:
            raise ValueError("generation_batch_size must be >= 1")
