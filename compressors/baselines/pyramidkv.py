"""PyramidKV: SnapKV selection with per-layer budgets that shrink from the bottom to the top layer.

Paper: "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
Cai et al. 2024, https://arxiv.org/abs/2406.02069 (PyramidInfer, https://arxiv.org/abs/2405.12532,
motivates the same pyramid shape).

What it does here: the average per-layer budget is ``B = budget_for(n, ratio)`` (``ceil(n / ratio)``
by default); layer budgets form an arithmetic sequence from ``2B - B/beta`` (bottom) to ``B/beta``
(top), as the reference code does, clamped to ``[1, n]`` and rounded so that they sum to exactly
``L * B`` (any excess of a clamped layer goes to the layers below the top that still have room).
Each layer then keeps its top positions per KV head by SnapKV scores (exact recomputed window
queries, pooling, window kept).

``uniform_fallback`` (default False): when the top layer's budget ``B/beta`` is under ``window`` (or
the bottom one exceeds the context), every layer keeps ``B`` (plain SnapKV). kvpress's
``PyramidKVPress`` does this; the reference code (Zefan-Cai/PyramidKV, ``PyramidKVCluster``) does
not (it falls back to a uniform budget only when the context is shorter than twice the budget),
hence the default. ``budget_rounding="kvpress"`` computes the schedule as kvpress 0.5.5 does
instead: average ``n * (1 - compression_ratio)`` unrounded, the bottom capped at ``n - window``,
each layer ``round()``-ed on its own (so the sum is ``L * B`` only up to rounding), and the
fallback, when on, keeps ``round(n * (1 - compression_ratio))`` per layer.

Memory layout (documented padding): one Memory has a single slot axis, so every layer is stored
with ``S = max`` layer budget slots, its real slots right-aligned and left-padded with zeros.
``meta['layer_slots']`` (per row, per layer) records the real counts. ``reading(memory)``
overrides each layer's attention (``compressors.attention``) to mask that layer's padding (a
per-layer mask; the decoder builds one mask for all layers), so padded slots are never read. ``meta['layer_slots']`` is what ``Memory.ratio`` counts (``memory.KindRules``: context tokens per
real slot, averaged over layers, so exactly ``n / B`` up to rounding, not ``n / S``). ``Memory.nbytes`` counts the padded tensors: it is what this
Memory really holds in RAM; ``meta['real_bytes']`` is the KV that a ragged per-layer cache would hold.

Faithful: pyramid budget schedule with ``beta``, per-layer SnapKV selection. Matches kvpress 0.5.5's
``PyramidKVPress`` exactly (kept positions per layer and KV head, ``scripts/kvpress_parity``) with
``pooling="avg"``, ``budget_rounding="kvpress"``, ``uniform_fallback=True`` and kvpress's
``window``/``kernel_size`` (64 and 5 by default there).
Not faithful: ratio-based budget; padded storage instead of ragged per-layer caches; the
observation window is the end of the context (not the question); the reference code adds the
window on top of each layer's budget, here (as in kvpress) the window is part of it. Ratio 1
keeps everything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from ..attention import Override, attention_modules, block_keys, overriding_attention
from ..base import register_compressor
from ..memory import Memory
from .selection import KVSelection, KVSelectionConfig, gather_positions, keep_fraction, topk_sorted


@dataclass
class PyramidKVConfig(KVSelectionConfig):
    beta: float = 20.0
    uniform_fallback: bool = False  # every layer keeps B when B/beta < window (kvpress); see the docstring

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")


def pyramid_budgets(length: int, budget: int, layers: int, beta: float, window: int = 0,
                    uniform_fallback: bool = False) -> list[int]:
    """Per-layer slot counts, bottom to top, summing to exactly ``layers * budget`` (each in [1, length]).

    With ``uniform_fallback``, every layer gets ``budget`` when the top layer's ``budget / beta`` is
    under ``window`` or the bottom layer's ``2 * budget - budget / beta`` exceeds ``length``."""
    total = layers * min(budget, length)
    if layers == 1:
        return [min(budget, length)]
    if uniform_fallback and (budget / beta < window or 2 * budget - budget / beta > length):
        return [min(budget, length)] * layers
    low = budget / beta
    high = 2 * budget - low
    raw = [high - layer * (high - low) / (layers - 1) for layer in range(layers)]
    counts = [min(length, max(1, int(r))) for r in raw]
    deficit = total - sum(counts)
    order = sorted(range(layers), key=lambda i: -(raw[i] - int(raw[i])))  # largest remainders first
    while deficit > 0:
        moved = False
        for i in order + list(range(layers)):
            if deficit == 0:
                break
            if counts[i] < length:
                counts[i] += 1
                deficit -= 1
                moved = True
        if not moved:
            break
    while deficit < 0:  # clamping up to 1 can overshoot when beta is huge: take from the bottom
        for i in range(layers):
            if deficit == 0:
                break
            if counts[i] > 1:
                counts[i] -= 1
                deficit += 1
    return counts


def kvpress_pyramid_budgets(length: int, ratio: float, layers: int, beta: float, window: int,
                            uniform_fallback: bool = True) -> list[int]:
    """Per-layer slot counts, bottom to top, computed as kvpress 0.5.5's ``PyramidKVPress`` does (same
    float operations, so the same ``round()`` results): average ``length * (1 - compression_ratio)``,
    bottom capped at ``length - window``, each layer rounded on its own; with ``uniform_fallback``,
    ``round(length * (1 - compression_ratio))`` for every layer unless
    ``length >= bottom >= top >= window``. Ratio 1 keeps everything (kvpress does not compress then)."""
    if ratio == 1:
        return [length] * layers
    capacity = window + length * keep_fraction(ratio)
    low = (capacity - window) / beta
    high = (capacity - window) * 2 - low
    if high >= length - window:
        high = length - window
        low = (capacity - window) * 2 - high
    if uniform_fallback and not (length >= high >= low >= window):
        return [min(length, max(1, round(length * keep_fraction(ratio))))] * layers
    step = (high - low) / (layers - 1) if layers > 1 else 0.0
    return [min(length, max(1, round(high - layer * step))) for layer in range(layers)]


@register_compressor
class PyramidKV(KVSelection):
    compressor_type = "pyramidkv"
    config_class = PyramidKVConfig

    def select(self, kv: dict[str, torch.Tensor], scores: list[torch.Tensor] | None, n: int,
               ratio: float) -> Memory:
        assert scores is not None
        layers = self.base_lm.config.num_hidden_layers
        cfg = self.compressor_config
        if cfg.budget_rounding == "kvpress":
            counts = kvpress_pyramid_budgets(n, ratio, layers, cfg.beta, cfg.window, cfg.uniform_fallback)
        else:
            counts = pyramid_budgets(n, self.budget(n, ratio), layers, cfg.beta, cfg.window, cfg.uniform_fallback)
        slots = max(counts)
        tensors: dict[str, torch.Tensor] = {}
        real_bytes = 0
        for layer, count in enumerate(counts):
            key, value = kv[f"key.{layer}"], kv[f"value.{layer}"]
            if count < n:
                index = topk_sorted(scores[layer], count)
                key, value = gather_positions(key, index), gather_positions(value, index)
            real_bytes += 2 * key.numel() * key.element_size()
            pad = slots - count
            tensors[f"key.{layer}"] = F.pad(key, (0, 0, pad, 0)) if pad else key
            tensors[f"value.{layer}"] = F.pad(value, (0, 0, pad, 0)) if pad else value
        return self.new_memory(tensors, source_tokens=[n], slots=slots, position_offset=[n],
                               meta={"ratio_requested": ratio, "layer_slots": [counts],
                                     "real_slots": [sum(counts) / layers], "real_bytes": real_bytes})

    @contextlib.contextmanager
    def reading(self, memory: Memory | None) -> Iterator[None]:
        """Mask each layer's padded slots (they differ per layer) while the LM reads ``memory``."""
        counts = memory.meta.get("layer_slots") if memory is not None else None
        if not counts or all(c == memory.slots for row in counts for c in row):
            yield
            return
        modules = attention_modules(self.base_lm)
        overrides = {module: _padding_override([row[layer] for row in counts], memory.slots)
                     for layer, module in enumerate(modules)}
        with overriding_attention(self.base_lm, overrides):
            yield


def _padding_override(counts: list[int], slots: int) -> Override:
    """Attention that never reads the first ``slots - count`` keys of each row (this layer's padding)."""
    def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, fallback: Any, **kwargs: Any) -> Any:
        batch, kv_len = query.shape[0], key.shape[2]
        rows = counts if len(counts) == batch else counts * batch
        pads = torch.tensor([slots - count for count in rows], device=key.device)
        blocked = torch.arange(kv_len, device=key.device)[None, :] < pads[:, None]
        mask = block_keys(attention_mask, blocked, query.shape[2])
        return fallback(module, query, key, value, mask, **kwargs)
    return attend
