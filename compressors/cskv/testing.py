"""Inputs for checking the CSKV decode kernel against its reference: named odd-shaped cases and a builder.

Shared by ``tests/test_cskv_kernel.py`` (CPU, ``TRITON_INTERPRET=1``) and the GPU suite
(``benchmarks/gpu/``), so that both check the same shapes: odd head dims and ranks, ragged rows,
key masks with holes, GQA ratios, biases, float / 8-bit / 4-bit latents. Only torch is imported
here (no triton), so building inputs never decides how triton is imported.
"""

from __future__ import annotations

from typing import Any

import torch

from .quant import LatentStore, store

# name: batch, kv_heads, group, head_dim, latent T, window W, key rank, value rank, bits, dtype, bias,
#       key mask, ragged lengths, split size
KERNEL_CASES: dict[str, tuple[Any, ...]] = {
    "mha-float": (1, 2, 1, 16, 40, 4, 8, 8, None, torch.float32, False, False, False, 16),
    "gqa3-odd-ranks": (2, 2, 3, 16, 37, 5, 7, 9, None, torch.float32, True, True, True, 16),
    "gqa4-8bit-d24": (3, 1, 4, 24, 50, 3, 13, 6, 8, torch.float32, False, True, True, 32),
    "gqa2-4bit-odd-rank": (2, 3, 2, 16, 29, 7, 11, 5, 4, torch.float32, True, True, True, 16),
    "gqa7-4bit-fp16": (2, 1, 7, 32, 45, 2, 20, 17, 4, torch.float16, False, True, True, 16),
    "fp16-float-latents": (2, 2, 2, 16, 33, 6, 10, 10, None, torch.float16, True, False, True, 16),
    "no-window": (2, 2, 2, 16, 21, 0, 6, 6, 8, torch.float32, False, False, True, 16),
    "window-only": (2, 2, 2, 16, 0, 9, 6, 6, None, torch.float32, True, True, False, 16),
}


def kernel_inputs(batch: int, kv_heads: int, group: int, head_dim: int, length: int, window: int, rank_k: int,
                  rank_v: int, bits: int | None, dtype: torch.dtype, bias: bool, masked: bool, ragged: bool,
                  seed: int = 0, group_size: int = 4, device: torch.device | str = "cpu",
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(args, kwargs)`` for ``decode_attention_reference`` / ``decode_attention_triton``.

    Values are drawn on the CPU from one seeded generator (the same case gives the same numbers on
    every machine), then moved to ``device``.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    out = head_dim * kv_heads
    # SVD-like latents: a few large channels, many small ones
    spread_k = torch.linspace(2.0, 0.2, rank_k)
    spread_v = torch.linspace(2.0, 0.2, rank_v)
    args: dict[str, Any] = dict(
        q=randn(batch, kv_heads * group, head_dim),
        latent_k=store(torch.randn(batch, length, rank_k, generator=g) * spread_k, bits, group_size, dtype),
        latent_v=store(torch.randn(batch, length, rank_v, generator=g) * spread_v, bits, group_size, dtype),
        up_k=randn(out, rank_k, scale=0.4), bias_k=randn(out, scale=0.1) if bias else None,
        up_v=randn(out, rank_v, scale=0.4), bias_v=randn(out, scale=0.1) if bias else None,
        positions=torch.randint(0, 4000, (batch, length), generator=g),
        inv_freq=1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)),
        window_k=randn(batch, kv_heads, window, head_dim), window_v=randn(batch, kv_heads, window, head_dim),
    )
    kwargs: dict[str, Any] = dict(sm_scale=head_dim ** -0.5, rope_scaling=1.0)
    if masked:
        kwargs["key_mask"] = torch.rand(batch, length + window, generator=g) > 0.25
    if ragged:
        kwargs["latent_lens"] = torch.randint(0, length + 1, (batch,), generator=g)
        kwargs["window_lens"] = torch.randint(0, window + 1, (batch,), generator=g)
        kwargs["latent_lens"][0] = length  # one full row
    return to_device(args, device), to_device(kwargs, device)


def to_device(values: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Every tensor (and LatentStore) of ``values`` on ``device``; other values unchanged."""
    moved: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, LatentStore):
            value = value.map(lambda t: t.to(device))
        elif isinstance(value, torch.Tensor):
            value = value.to(device)
        moved[name] = value
    return moved
