"""A decode loop that starts from a Memory: one prefill of the prompt reading the memory, then tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .base import Compressor
from .compat import cache_of, with_cache
from .memory import Memory


@dataclass
class GenerationSettings:
    """The subset of ``transformers.GenerationConfig`` that the memory decode loop honours."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> GenerationSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unsupported generation arguments {unknown}; supported: {sorted(known)}")
        return cls(**kwargs)  # type: ignore[arg-type]

    def warpers(self) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if self.do_sample:
            if self.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                warpers.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


@torch.no_grad()
def generate_from_memory(compressor: Compressor, memory: Memory, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, eos_token_ids: list[int],
                         settings: GenerationSettings) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` for each (left-padded) prompt row; returns the new tokens.

    Rows that produced an end-of-sequence token are padded with its id afterwards.
    """
    generator = torch.Generator(device=input_ids.device)
    if settings.seed is not None:
        generator.manual_seed(settings.seed)
    warpers = settings.warpers()
    model = compressor.base_lm
    batch = input_ids.shape[0]
    eos = torch.tensor(eos_token_ids, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens: list[torch.Tensor] = []
    with compressor.reading(memory):
        step = compressor.decoder_forward(memory, input_ids, attention_mask)
        logits, cache, mask, position = step.logits[:, -1], step.cache, step.attention_mask, step.next_position
        for _ in range(settings.max_new_tokens):
            token = _pick(logits.float(), settings, warpers, generator, input_ids)
            token = torch.where(finished, eos[0], token)
            new_tokens.append(token)
            finished |= torch.isin(token, eos)
            if bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                        use_cache=True, **with_cache(cache))
            logits, cache, position = out.logits[:, -1], cache_of(out), position + 1
    if not new_tokens:
        return input_ids.new_zeros(batch, 0)
    return torch.stack(new_tokens, dim=1)


def _pick(logits: torch.Tensor, settings: GenerationSettings, warpers: LogitsProcessorList,
          generator: torch.Generator, input_ids: torch.Tensor) -> torch.Tensor:
    if not settings.do_sample:
        return logits.argmax(-1)
    scores = warpers(input_ids, logits)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
