"""Truncation: keep only part of the context's tokens, so the model never reads the rest.

The floor of every comparison at a memory budget. ``keep="recent"`` keeps the last
``ceil(n / ratio)`` tokens; ``keep="first_last"`` keeps half the budget from each end. The kept
tokens are re-encoded on their own at positions ``0..budget-1`` (true truncation, not KV eviction).
The chat template's prefix at the start of the context (``Compressor.template_tokens``) is always kept
and counts toward the budget: a truncated conversation is still a conversation. Only the kept tokens are
read, so the context may be longer than the base model's positions as long as the kept part fits them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..base import Compressor, CompressorConfig, register_compressor
from ..errors import ContextTooLongError
from ..memory import Memory
from .full_context import prefill_kv


@dataclass
class TruncationConfig(CompressorConfig):
    ratio: float = 4.0
    keep: str = "recent"  # or "first_last"

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {self.ratio}")
        if self.keep not in ("recent", "first_last"):
            raise ValueError(f"keep must be 'recent' or 'first_last', got {self.keep!r}")


def kept_indices(length: int, budget: int, keep: str, protected: int = 0) -> list[int]:
    """Indices of the tokens kept out of ``length`` under ``budget``; the first ``protected`` always."""
    budget = min(max(budget, protected), length)
    protected = min(protected, budget)
    body, room = length - protected, budget - protected
    if keep == "recent":
        picked = list(range(body - room, body))
    else:
        head = room // 2
        picked = list(range(head)) + list(range(body - (room - head), body))
    return list(range(protected)) + [protected + i for i in picked]


@register_compressor
class Truncation(Compressor):
    compressor_type = "truncation"
    config_class = TruncationConfig
    memory_kind = "kv"
    reads_beyond_window = True

    def budget(self, length: int) -> int:
        return max(1, math.ceil(length / self.compressor_config.ratio))

    @torch.no_grad()
    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
        mask = self.check_context(context_ids, attention_mask)
        rows, lengths = [], mask.sum(-1).tolist()
        for row, length in enumerate(lengths):
            real = context_ids[row][mask[row].bool()]
            kept = kept_indices(length, self.budget(length), self.compressor_config.keep, self.template_tokens)
            rows.append(real[kept])
        slots = max(len(r) for r in rows)
        limit = getattr(self.base_lm.config, "max_position_embeddings", None)
        if limit is not None and slots > limit:
            raise ContextTooLongError(f"truncation keeps {slots} tokens, more than the base model's {limit} positions: "
                                      f"use a ratio above {max(lengths) / limit:.2f}")
        pad = self.base_lm.config.pad_token_id or 0
        ids = torch.full((len(rows), slots), pad, dtype=context_ids.dtype, device=context_ids.device)
        kept_mask = torch.zeros_like(ids)
        for row, kept in enumerate(rows):  # left-pad so that every row ends at the same slot
            ids[row, slots - len(kept):], kept_mask[row, slots - len(kept):] = kept, 1
        return self.new_memory(prefill_kv(self, ids, kept_mask), source_tokens=lengths, slots=slots,
                               position_offset=[len(r) for r in rows])
