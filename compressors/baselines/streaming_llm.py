"""StreamingLLM: attention sinks (the first tokens) plus a window of the most recent tokens.

Paper: "Efficient Streaming Language Models with Attention Sinks", Xiao et al. 2023,
https://arxiv.org/abs/2309.17453

What it does here: one full prefill of the context, then the KV cache keeps the first ``sinks``
positions and the last ``B - sinks`` positions of every layer and head (exactly ``B =
budget_for(n, ratio)`` slots, ``ceil(n / ratio)`` by default; when the budget is smaller than ``sinks + 1`` it keeps ``budget - 1``
sinks and one recent token). Query-agnostic: no scores are computed, so one prefill serves every
ratio (``compress_ratios``).

Faithful: the kept set (sinks + recent window) and its size. Matches kvpress 0.5.5's
``StreamingLLMPress`` exactly (``scripts/kvpress_parity``) with ``budget_rounding="kvpress"``
(``int(n * (1 - compression_ratio))`` slots instead of ``ceil(n / ratio)``) and ``sinks=4`` (its
``n_sink``).
Not faithful: StreamingLLM evicts while it streams (each token is encoded with the bounded cache
it had at that time) and re-assigns cache-relative positions; here the whole context is
prefilled with full attention first and the kept keys keep their original rotary positions
(the decoder continues at position ``n``), as kvpress's StreamingLLMPress does. Ratio 1 keeps
everything, i.e. exactly the full KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import register_compressor
from .selection import KVSelection, KVSelectionConfig


@dataclass
class StreamingLLMConfig(KVSelectionConfig):
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")


def sink_and_recent(length: int, budget: int, sinks: int) -> list[int]:
    """Positions kept out of ``length``: ``min(sinks, budget - 1)`` first ones, the rest most recent."""
    budget = min(budget, length)
    head = min(sinks, budget - 1) if budget > 1 else min(sinks, budget)
    return list(range(head)) + list(range(length - (budget - head), length))


@register_compressor
class StreamingLLM(KVSelection):
    compressor_type = "streaming_llm"
    config_class = StreamingLLMConfig
    needs_scores = False

    def layer_indices(self, layer: int, scores: torch.Tensor | None, key: torch.Tensor,
                      budget: int) -> torch.Tensor:
        kept = sink_and_recent(key.shape[2], budget, self.compressor_config.sinks)
        index = torch.tensor(kept, device=key.device)
        return index.expand(key.shape[0], key.shape[1], -1)
