"""The CSKV attention path, installed on the base model's attention modules while it reads a cache.

For a forward over ``n`` new tokens with a ``CSKVCache``:
- queries, keys and values of the new tokens are the base model's own (exact), keys rotated;
- the past is read from the cache: latents are reconstructed by the up-projections (keys rotated
  at their positions), window keys / values are read as they are;
- one new token (decoding): the fused Triton kernel on a GPU, the PyTorch reference elsewhere;
  several new tokens (prefill of a context or a prompt): reconstruct, then the model's own
  attention function (SDPA / eager) with the model's mask;
- the new tokens are appended to the cache (their latents made by the down-projections); tokens
  pushed out of the window keep only their latents.
With an empty cache (compressing a context) the attention is exactly the base model's.
Any other cache (or none) goes through the module's original forward.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .cache import CSKVCache, CSKVLayer
from .factorization import LowRankKV
from .reference import decode_attention_reference, latent_keys_values, rotate_half


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def use_kernel(device: torch.device) -> bool:
    """The fused kernel runs on CUDA devices with Triton, unless ``CTXZIP_DISABLE_KERNELS=1``."""
    if os.environ.get("CTXZIP_DISABLE_KERNELS", "0") not in ("", "0"):
        return False
    return device.type == "cuda" and triton_available()


def decode_attention(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Decode attention over a bi-branch cache: the Triton kernel where it can run, else the reference."""
    if use_kernel(q.device):
        from .kernel import decode_attention_triton

        return decode_attention_triton(q, *args, **kwargs)
    return decode_attention_reference(q, *args, **kwargs)


def key_mask_for_decode(attention_mask: Any, batch: int, kv_length: int) -> torch.Tensor | None:
    """``[batch, kv_length]`` bool (True = attend) from the mask a decoder layer passes to attention."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"CSKV attention supports tensor masks (sdpa / eager), not {type(attention_mask).__name__}")
    row = attention_mask[:, 0, -1, :] if attention_mask.dim() == 4 else attention_mask
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2  # additive masks: 0 = attend, min = blocked
    return row[:, -kv_length:].expand(batch, -1)


def _attention_function(attn: nn.Module) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)


def cskv_attention_forward(attn: nn.Module, factors: LowRankKV, layer_index: int, cache: CSKVCache,
                           rope: tuple[torch.Tensor, float], hidden_states: torch.Tensor,
                           position_embeddings: tuple[torch.Tensor, torch.Tensor],
                           attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    batch, length, _ = hidden_states.shape
    head_dim = attn.head_dim
    q = attn.q_proj(hidden_states).view(batch, length, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(batch, length, -1, head_dim).transpose(1, 2)
    v = attn.v_proj(hidden_states).view(batch, length, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    latent_k, latent_v = factors.k.down(hidden_states), factors.v.down(hidden_states)

    layer: CSKVLayer = cache.layer(layer_index)
    if layer_index == 0:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            start = layer.get_seq_length()
            position_ids = torch.arange(start, start + length, device=hidden_states.device)[None]
        cache.add_positions(position_ids)
    inv_freq, rope_scaling = rope
    kv_heads = k.shape[1]
    past = layer.get_seq_length()
    if length == 1 and past > 0:
        key_mask = key_mask_for_decode(attention_mask, batch, past + 1)
        out = decode_attention(
            q[:, :, 0], layer.latent_k, layer.latent_v, factors.k.up.weight, factors.k.up.bias,
            factors.v.up.weight, factors.v.up.bias, cache.latent_positions(layer_index), inv_freq,
            torch.cat([layer.window_k, k.to(layer.window_k.dtype)], dim=2),
            torch.cat([layer.window_v, v.to(layer.window_v.dtype)], dim=2),
            sm_scale=attn.scaling, rope_scaling=rope_scaling, key_mask=key_mask)
        attn_output = out[:, None].to(hidden_states.dtype)  # [batch, 1, q_heads, head_dim]
    else:
        keys, values = [layer.window_k.to(k.dtype), k], [layer.window_v.to(v.dtype), v]
        if layer.latent_len:
            old_k, old_v = latent_keys_values(
                layer.latent_k, layer.latent_v, factors.k.up.weight, factors.k.up.bias, factors.v.up.weight,
                factors.v.up.bias, cache.latent_positions(layer_index), inv_freq, rope_scaling, kv_heads, head_dim)
            keys, values = [old_k.to(k.dtype), *keys], [old_v.to(v.dtype), *values]
        attn_output, _ = _attention_function(attn)(
            attn, q, torch.cat(keys, dim=2), torch.cat(values, dim=2), attention_mask,
            dropout=0.0, scaling=attn.scaling, **kwargs)
    layer.append(k, v, latent_k, latent_v)
    attn_output = attn_output.reshape(batch, length, -1).contiguous()
    return attn.o_proj(attn_output), None


def make_forward(attn: nn.Module, factors: LowRankKV, layer_index: int,
                 rope: Callable[[], tuple[torch.Tensor, float]]) -> Callable[..., Any]:
    """A replacement ``forward`` for ``attn``: the CSKV path for a CSKVCache, the original otherwise."""
    original = type(attn).forward

    def forward(hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None,
                past_key_values: Any = None, **kwargs: Any) -> Any:
        if not isinstance(past_key_values, CSKVCache):
            return original(attn, hidden_states, position_embeddings=position_embeddings,
                            attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        return cskv_attention_forward(attn, factors, layer_index, past_key_values, rope(), hidden_states,
                                      position_embeddings, attention_mask, **kwargs)

    return forward
