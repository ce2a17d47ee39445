"""How the base model reads and writes a CSKV cache, through public transformers extension points only.

While a CSKV compressor is ``installed()`` (``CompressedLM`` and ``compressor.reading`` do it):
- forward hooks on every layer's ``k_proj`` / ``v_proj`` compute the new tokens' latents (the down
  projections of the same input ``x``) and leave them in a ``LatentReader``;
- the model's attention modules call ``CSKVCache.update`` (the ``Cache`` API) with the new tokens'
  rotated keys and values; the cache takes the latents from the reader and appends the tokens;
- several new tokens (prefill of a context or a prompt): the cache returns the past reconstructed
  from latents (keys rotated at their positions), the window and the new tokens, and the model's
  own attention function (SDPA / eager) attends over them with the model's own mask;
- one new token (decoding): the cache leaves a ``DecodeRequest`` and the attention override
  (``compressors.attention``: a function registered with ``AttentionInterface``) computes the step
  from the latents directly, with the fused Triton kernel on a GPU and the PyTorch reference elsewhere
  (post-RoPE keys: scored in rank space, with fused CPU kernels for 8-bit latents, ``cpu_kernel.py``);
  on a layer with a key norm (Qwen3, OLMo2) or logit soft-capping (Gemma2), which that step does not
  compute, the override reconstructs the keys and values and calls the model's own attention function.
With an empty cache (compressing a context) the attention is exactly the base model's. Any other
cache (or none) goes through the model's own attention unchanged.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .factorization import LowRankKV
from .quant import LatentStore
from .reference import decode_attention_rank_space, decode_attention_reference, latent_keys_values

NOT_READING = ("a CSKV cache stores latents, which plain attention cannot make: run the model inside "
               "`with compressor.reading(memory):` (CompressedLM and the decode loop do this)")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception as error:  # ImportError, or a broken install
        if torch.cuda.is_available():  # only there does the fallback cost speed
            warnings.warn(f"triton cannot be imported ({error!r}): CSKV decodes with the PyTorch reference, "
                          "not the fused kernel", RuntimeWarning, stacklevel=2)
        return False
    return True


def kernels_enabled() -> bool:
    """Fused kernels are used unless ``CTXZIP_DISABLE_KERNELS=1``."""
    return os.environ.get("CTXZIP_DISABLE_KERNELS", "0") in ("", "0")


def use_kernel(device: torch.device) -> bool:
    """The fused kernel runs on CUDA devices with Triton, unless ``CTXZIP_DISABLE_KERNELS=1``."""
    return kernels_enabled() and device.type == "cuda" and triton_available()


def decode_attention(q: torch.Tensor, *args: Any, post_rope: bool = False, **kwargs: Any) -> torch.Tensor:
    """Decode attention over a bi-branch cache: the Triton kernel where it can run, else the reference (post-RoPE
    keys: the rank-space step, with the fused CPU kernels for 8-bit latents on the CPU)."""
    if post_rope:
        return decode_attention_rank_space(q, *args, fused=kernels_enabled(), **kwargs)
    if use_kernel(q.device):
        from .kernel import decode_attention_triton

        return decode_attention_triton(q, *args, **kwargs)
    return decode_attention_reference(q, *args, **kwargs)


def key_mask_for_decode(attention_mask: Any, batch: int, kv_length: int) -> torch.Tensor | None:
    """``[batch, kv_length]`` bool (True = attend) from the mask the model passes to attention."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"CSKV attention supports tensor masks (sdpa / eager), not {type(attention_mask).__name__}")
    row = attention_mask[:, 0, -1, :] if attention_mask.dim() == 4 else attention_mask
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2  # additive masks: 0 = attend, min = blocked
    row = row[:, -kv_length:]
    if bool(row.all()):  # no key is masked: the step need not mask anything
        return None
    return row.expand(batch, -1)


@dataclass
class DecodeRequest:
    """One layer's decode step, left by the cache for the attention override."""

    latent_k: LatentStore
    latent_v: LatentStore
    positions: torch.Tensor  # [batch, latent tokens]
    window_k: torch.Tensor  # [batch, kv_heads, window + 1, head_dim], the new token last
    window_v: torch.Tensor


@dataclass
class LatentReader:
    """What a CSKV cache needs from its compressor while the model runs."""

    factors: nn.ModuleList
    rope: Callable[[], tuple[torch.Tensor, float]]  # (inv_freq, attention scaling)
    # per layer: None, or its key norm (``[..., kv_heads * head_dim]`` -> ``[..., kv_heads, head_dim]``)
    key_norms: list[Callable[[torch.Tensor], torch.Tensor] | None] = field(default_factory=list)
    installed: bool = False
    latents: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    requests: dict[int, DecodeRequest] = field(default_factory=dict)
    post_rope: bool = False  # key latents project the rotated keys (made here), not k_proj's input (a hook)

    def take_latents(self, layer: int, tokens: int, key_states: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new tokens' key and value latents ``[batch, tokens, rank]`` (``key_states``: their rotated keys
        ``[batch, kv_heads, tokens, head_dim]``, what post-RoPE latents project)."""
        try:
            latent_v = self.latents.pop((layer, "v"))
            if self.post_rope:
                flat = key_states.detach().transpose(1, 2).flatten(2)
                factors: LowRankKV = self.factors[layer]
                latent_k = factors.k.down(flat.to(factors.k.down.weight.dtype)).detach()
            else:
                latent_k = self.latents.pop((layer, "k"))
        except KeyError:
            raise RuntimeError(f"layer {layer}'s k_proj / v_proj did not run before its cache update: "
                               "CSKV supports Llama-style attention") from None
        if latent_k.shape[1] != tokens:
            raise RuntimeError(f"layer {layer}: latents of {latent_k.shape[1]} tokens for {tokens} new keys")
        return latent_k, latent_v

    def reconstruct(self, layer: int, latent_k: LatentStore, latent_v: LatentStore, positions: torch.Tensor,
                    kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values ``[batch, kv_heads, tokens, head_dim]`` of latent tokens."""
        factors: LowRankKV = self.factors[layer]
        inv_freq, scaling = self.rope()
        return latent_keys_values(latent_k, latent_v, factors.k.up.weight, factors.k.up.bias, factors.v.up.weight,
                                  factors.v.up.bias, positions, inv_freq, scaling, kv_heads, head_dim,
                                  key_norm=self.key_norm(layer), post_rope=self.post_rope)

    def key_norm(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.key_norms[layer] if self.key_norms else None

    # ----- hooks and the attention override (installed by CSKVCompressor.installed) -----------
    def latent_hook(self, layer: int, branch: str) -> Callable[..., None]:
        """A forward hook for ``k_proj`` (``branch="k"``) or ``v_proj``: the latents of its input."""
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            factors: LowRankKV = self.factors[layer]
            self.latents[(layer, branch)] = getattr(factors, branch).down(args[0]).detach()
        return hook

    def attention_override(self, layer: int) -> Callable[..., Any]:
        """Decode steps with a ``DecodeRequest`` read the latents directly; anything else is untouched."""
        def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Any, fallback: Callable[..., Any], **kwargs: Any) -> tuple[torch.Tensor, None]:
            request = self.requests.pop(layer, None)
            if request is None:
                return fallback(module, query, key, value, attention_mask, **kwargs)
            # post-RoPE latents hold keys after the norm and the rotation: only soft-capping needs the fallback
            if (self.key_norm(layer) is not None and not self.post_rope) or kwargs.get("softcap") is not None:
                # what the fused step does not compute (a key norm, logit soft-capping): the model's own attention
                # over the keys and values reconstructed from the latents, then the window's
                window_k, window_v = request.window_k, request.window_v
                old_k, old_v = self.reconstruct(layer, request.latent_k, request.latent_v, request.positions,
                                                window_k.shape[1], window_k.shape[3])
                keys = torch.cat([old_k.to(window_k.dtype), window_k], dim=2)
                values = torch.cat([old_v.to(window_v.dtype), window_v], dim=2)
                return fallback(module, query, keys, values, attention_mask, **kwargs)
            factors: LowRankKV = self.factors[layer]
            inv_freq, scaling = self.rope()
            batch = query.shape[0]
            kv_length = request.latent_k.length + request.window_k.shape[2]
            out = decode_attention(
                query[:, :, 0], request.latent_k, request.latent_v, factors.k.up.weight, factors.k.up.bias,
                factors.v.up.weight, factors.v.up.bias, request.positions, inv_freq, request.window_k,
                request.window_v, sm_scale=kwargs.get("scaling") or module.head_dim ** -0.5,
                rope_scaling=scaling, key_mask=key_mask_for_decode(attention_mask, batch, kv_length),
                post_rope=self.post_rope)
            return out[:, None].to(query.dtype), None  # [batch, 1, q_heads, head_dim], as SDPA returns
        return attend
