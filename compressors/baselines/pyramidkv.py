"""PyramidKV: SnapKV selection with per-layer budgets that shrink from the bottom to the top layer.

Paper: "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
Cai et al. 2024, https://arxiv.org/abs/2406.02069 (PyramidInfer, https://arxiv.org/abs/2405.12532,
motivates the same pyramid shape).

What it does here: the average per-layer budget is ``B = ceil(n / ratio)``; layer budgets form an
arithmetic sequence from ``2B - B/beta`` (bottom) to ``B/beta`` (top), as the reference code does,
clamped to ``[1, n]`` and rounded so that they sum to exactly ``L * B`` (any excess of a clamped
layer goes to the layers below the top that still have room). Each layer then keeps its top
positions per KV head by SnapKV scores (exact recomputed window queries, pooling, window kept).

Memory layout (documented padding): one Memory has a single slot axis, so every layer is stored
with ``S = max`` layer budget slots, its real slots right-aligned and left-padded with zeros.
``meta['layer_slots']`` (per row, per layer) records the real counts. ``reading(memory)``
installs forward pre-hooks on the attention modules that mask each layer's padding in the
attention mask (a per-layer mask; the decoder builds one mask for all layers), so padded slots
are never read. ``meta['real_slots']`` is the mean real slots per layer, from which the achieved
ratio is ``n / real_slots`` (exactly ``n / B`` up to rounding): use it, not ``Memory.ratio`` (which
divides by the padded ``S``). ``Memory.nbytes`` counts the padded tensors: it is what this
Memory really holds in RAM; ``meta['real_bytes']`` is the KV that a ragged per-layer cache would hold.

Faithful: pyramid budget schedule with ``beta``, per-layer SnapKV selection.
Not faithful: ratio-based budget; padded storage instead of ragged per-layer caches; the
observation window is the end of the context (not the question). Ratio 1 keeps everything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from ..base import register_compressor
from ..memory import Memory
from .snapkv import KVSelection, KVSelectionConfig, budget_for, gather_positions, topk_sorted


@dataclass
class PyramidKVConfig(KVSelectionConfig):
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")


def pyramid_budgets(length: int, budget: int, layers: int, beta: float) -> list[int]:
    """Per-layer slot counts, bottom to top, summing to exactly ``layers * budget`` (each in [1, length])."""
    total = layers * min(budget, length)
    if layers == 1:
        return [min(budget, length)]
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


@register_compressor
class PyramidKV(KVSelection):
    compressor_type = "pyramidkv"
    config_class = PyramidKVConfig

    def select(self, kv: dict[str, torch.Tensor], scores: list[torch.Tensor] | None, n: int,
               ratio: float) -> Memory:
        assert scores is not None
        layers = self.base_lm.config.num_hidden_layers
        budget = budget_for(n, ratio)
        counts = pyramid_budgets(n, budget, layers, self.compressor_config.beta)
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
    def reading(self, memory: Memory) -> Iterator[None]:
        """Mask each layer's padded slots (they differ per layer) while the LM reads ``memory``."""
        counts = memory.meta.get("layer_slots")
        if not counts or all(c == memory.slots for row in counts for c in row):
            yield
            return
        handles = []
        for layer, block in enumerate(self.base_lm.model.layers):
            hook = _layer_padding_hook(layer, [row[layer] for row in counts], memory.slots)
            handles.append(block.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _layer_padding_hook(layer: int, counts: list[int], slots: int) -> Any:
    def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, q_len = hidden.shape[0], hidden.shape[1]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length(layer) if cache is not None else 0
        kv_len = past + q_len
        mask = kwargs.get("attention_mask")
        if mask is None:  # the model skipped the mask (pure causal): build it
            qpos = torch.arange(past, kv_len, device=hidden.device)
            mask = (torch.arange(kv_len, device=hidden.device)[None, :] <= qpos[:, None])
            mask = mask[None, None].expand(batch, 1, q_len, kv_len).clone()
        else:
            mask = mask.clone()
        rows = counts if len(counts) == batch else counts * batch
        for row, count in enumerate(rows):
            hidden_pad = slots - count
            if hidden_pad:
                if mask.dtype == torch.bool:
                    mask[row, :, :, :hidden_pad] = False
                else:
                    mask[row, :, :, :hidden_pad] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs
    return hook
