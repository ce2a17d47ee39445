"""SnapKV: keep, per KV head, the context positions the observation window attends to most.

Paper: "SnapKV: LLM Knows What You are Looking for Before Generation", Li et al. 2024,
https://arxiv.org/abs/2404.14469 (SAGE-KV, https://arxiv.org/abs/2503.08879, is the same
one-time top-k after a full prefill, so it is covered by this file with the same knobs).

What it does here: one full prefill of the context (``prefill_context``) while forward pre-hooks on
every attention module catch the hidden states of the last ``window`` tokens; their queries are
recomputed exactly (``q_proj`` + the rotary embedding the layer received), and softmax attention
of those queries over all cached keys (causal inside the window) is computed in fp32. Scores are
averaged over the window's queries and over the query heads of each KV group (GQA), pooled along
the sequence (``pooling``/``kernel_size``), and the top ``budget_for(n, ratio)`` positions per KV head
are gathered into a smaller, real KV cache. The window itself is always kept (most recent first
when the budget is smaller than the window). Kept keys keep their original rotary positions and
the decoder continues at position ``n``.

Faithful: observation-window scoring, GQA-group averaging, 1-D pooling (max by default, as the
reference code; ``avg`` as kvpress), one-time top-k per head, window always kept. Matches kvpress
0.5.5's ``SnapKVPress`` exactly (kept positions per layer and KV head, ``scripts/kvpress_parity``)
with ``pooling="avg"``, ``window=64``, ``kernel_size=5`` (its defaults) and
``budget_rounding="kvpress"``; as there, the pooling reads the pre-window scores only (zero padded).
Not faithful / differences: the budget is a ratio of the context (``ceil(n / ratio)`` slots by
default, ``int(n * (1 - compression_ratio))`` with ``budget_rounding="kvpress"``; window
included) rather than a fixed token count; the observation window is the end of the
context, not the question (the question is not seen at compression time, so one memory serves
many prompts; ``query_ids`` is ignored); selection runs after the prefill rather than inside
the attention kernel. Ratio 1 keeps every position in order, i.e. exactly the full KV cache.

The prefill, scoring helpers and top-k selection are shared with the other baselines (``selection.py``).
"""

from __future__ import annotations

import torch

from ..base import register_compressor
from .selection import KVSelection, KVSelectionConfig, topk_sorted


@register_compressor
class SnapKV(KVSelection):
    compressor_type = "snapkv"
    config_class = KVSelectionConfig

    def layer_indices(self, layer: int, scores: torch.Tensor | None, key: torch.Tensor,
                      budget: int) -> torch.Tensor:
        assert scores is not None
        return topk_sorted(scores, budget)
