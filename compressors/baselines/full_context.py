"""Full context: the KV cache of every context token (ratio 1). The ceiling every method is measured against.

It is a ``PrefillSelection`` that keeps everything: from the eval runner's shared prefill of a sample, its memory
is that prefill's cache (``compress_from``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Compressor, CompressorConfig, register_compressor
from ..compat import cache_of
from ..memory import Memory, kv_tensors
from .selection import ContextPrefill, PrefillSelection


@dataclass
class FullContextConfig(CompressorConfig):
    pass


def prefill_kv(compressor: Compressor, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the base LM over ``ids`` (positions from 0, left padding masked) and return its per-layer KV."""
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    # the body only: the LM head over every position would be a fifth of the prefill's cost, for nothing
    out = compressor.base_lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    return kv_tensors(cache_of(out), mask)


@register_compressor
class FullContext(PrefillSelection):
    compressor_type = "full_context"
    config_class = FullContextConfig
    memory_kind = "kv"

    @torch.no_grad()
    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
        mask = self.check_context(context_ids, attention_mask)
        lengths = mask.sum(-1).tolist()
        return self.new_memory(prefill_kv(self, context_ids, mask), source_tokens=lengths,
                               slots=context_ids.shape[1], position_offset=lengths)

    def prefill_needs(self) -> tuple[int, bool]:
        return 0, False

    def compress_from(self, prefill: ContextPrefill, ratios: list[float]) -> list[Memory]:
        """The full cache of a shared ``ContextPrefill`` (every requested ratio is 1 here)."""
        n = prefill.length
        return [self.new_memory(dict(prefill.kv), source_tokens=[n], slots=n, position_offset=[n])
                for _ in ratios]
