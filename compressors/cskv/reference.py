"""PyTorch reference for CSKV attention: reconstruct keys from latents, rotate them, attend; read values in
rank space (the attention-weighted sum of the latents, then the up-projection: the same sum reassociated).
Post-RoPE key latents (``decode_attention_rank_space``) are scored in rank space as well: ``q . (U z) = (U^T q) . z``.

``decode_attention_reference`` is the oracle the Triton kernel (``kernel.py``) must match, with the
same arguments; it is also the decode path on machines without a GPU. Keys are stored before
RoPE (a latent cannot be rotated) and rotated at their own positions after reconstruction, with
``cos / sin = cos / sin(position * inv_freq) * rope_scaling`` exactly as transformers' rotary
embedding computes them (default, linear, llama3 and yarn RoPE are all of this form).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .quant import LatentStore


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, rope_scaling: float = 1.0,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[batch, tokens, head_dim]`` (float32) for integer ``positions``."""
    freqs = positions.float()[..., None] * inv_freq.float().to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * rope_scaling, emb.sin() * rope_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[batch, heads, tokens, head_dim]`` with ``cos / sin`` ``[batch, tokens, head_dim]``."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def reconstruct(latent: torch.Tensor, up_weight: torch.Tensor, up_bias: torch.Tensor | None,
                num_heads: int, head_dim: int) -> torch.Tensor:
    """``[batch, tokens, rank]`` latents -> ``[batch, heads, tokens, head_dim]`` keys or values."""
    out = torch.nn.functional.linear(latent.to(up_weight.dtype), up_weight, up_bias)
    batch, tokens = latent.shape[:2]
    return out.view(batch, tokens, num_heads, head_dim).transpose(1, 2)


def latent_keys(latent_k: LatentStore, up_k: torch.Tensor, bias_k: torch.Tensor | None, positions: torch.Tensor,
                inv_freq: torch.Tensor, rope_scaling: float, num_heads: int, head_dim: int,
                key_norm: Callable[[torch.Tensor], torch.Tensor] | None = None, post_rope: bool = False,
                ) -> torch.Tensor:
    """Rotated keys ``[batch, kv_heads, tokens, head_dim]`` (in ``up_k.dtype``) of latents.

    ``key_norm`` (the layer's key norm: ``[batch, tokens, kv_heads * head_dim]`` to ``[batch, tokens, kv_heads,
    head_dim]``) runs on the reconstructed keys before RoPE, as the layer runs it on ``k_proj``'s output.
    ``post_rope``: the latents project keys already normed and rotated; they are only up-projected."""
    dtype = up_k.dtype
    if post_rope:
        return reconstruct(latent_k.dequantize(dtype), up_k, bias_k, num_heads, head_dim)
    if key_norm is None:
        keys = reconstruct(latent_k.dequantize(dtype), up_k, bias_k, num_heads, head_dim)
    else:
        flat = torch.nn.functional.linear(latent_k.dequantize(dtype), up_k, bias_k)
        keys = key_norm(flat).to(dtype).transpose(1, 2)
    cos, sin = rope_cos_sin(positions, inv_freq, rope_scaling)
    return apply_rope(keys, cos, sin)


def latent_keys_values(latent_k: LatentStore, latent_v: LatentStore, up_k: torch.Tensor,
                       bias_k: torch.Tensor | None, up_v: torch.Tensor, bias_v: torch.Tensor | None,
                       positions: torch.Tensor, inv_freq: torch.Tensor, rope_scaling: float, num_heads: int,
                       head_dim: int, key_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       post_rope: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated keys and values ``[batch, kv_heads, tokens, head_dim]`` (in ``up_k.dtype``) of latents
    (``latent_keys`` says what ``key_norm`` and ``post_rope`` are)."""
    keys = latent_keys(latent_k, up_k, bias_k, positions, inv_freq, rope_scaling, num_heads, head_dim, key_norm,
                       post_rope)
    values = reconstruct(latent_v.dequantize(up_k.dtype), up_v, bias_v, num_heads, head_dim)
    return keys, values


def valid_keys(batch: int, latent_len: int, window_len: int, device: torch.device,
               key_mask: torch.Tensor | None = None, latent_lens: torch.Tensor | None = None,
               window_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean ``[batch, latent_len + window_len]``: which keys each row attends to."""
    lat = torch.arange(latent_len, device=device)[None].expand(batch, -1)
    win = torch.arange(window_len, device=device)[None].expand(batch, -1)
    lat_ok = lat < (latent_lens.to(device)[:, None] if latent_lens is not None else latent_len)
    win_ok = win < (window_lens.to(device)[:, None] if window_lens is not None else window_len)
    valid = torch.cat([lat_ok, win_ok], dim=1)
    if key_mask is not None:
        valid = valid & key_mask.to(device).bool()
    return valid


def decode_attention_reference(
    q: torch.Tensor, latent_k: LatentStore, latent_v: LatentStore, up_k: torch.Tensor,
    bias_k: torch.Tensor | None, up_v: torch.Tensor, bias_v: torch.Tensor | None, positions: torch.Tensor,
    inv_freq: torch.Tensor, window_k: torch.Tensor, window_v: torch.Tensor, *, sm_scale: float,
    rope_scaling: float = 1.0, key_mask: torch.Tensor | None = None, latent_lens: torch.Tensor | None = None,
    window_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of attention over a bi-branch cache; returns ``[batch, q_heads, head_dim]``.

    Args:
        q: ``[batch, q_heads, head_dim]`` rotated queries of the new token.
        latent_k, latent_v: latents of the old tokens ``[batch, T, rank]`` (float or packed).
        up_k, bias_k, up_v, bias_v: up-projections ``[kv_heads * head_dim, rank]`` and biases.
        positions: ``[batch, T]`` positions of the latent tokens (for RoPE).
        inv_freq: ``[head_dim // 2]`` RoPE inverse frequencies; ``rope_scaling`` multiplies cos / sin.
        window_k, window_v: ``[batch, kv_heads, W, head_dim]`` full keys (already rotated) / values.
        key_mask: optional ``[batch, T + W]``, nonzero where a key may be read.
        latent_lens, window_lens: optional ``[batch]`` valid lengths of each branch (ragged rows).
    """
    batch, q_heads, head_dim = q.shape
    kv_heads = window_k.shape[1]
    group = q_heads // kv_heads
    keys = latent_keys(latent_k, up_k.float(), _f(bias_k), positions, inv_freq, rope_scaling, kv_heads, head_dim)
    old = torch.einsum("bhgd,bhtd->bhgt", q.float().view(batch, kv_heads, group, head_dim), keys) * sm_scale
    return _attend(q, old.reshape(batch, q_heads, -1), latent_v, up_v, bias_v, window_k, window_v, sm_scale=sm_scale,
                   key_mask=key_mask, latent_lens=latent_lens, window_lens=window_lens)


def decode_attention_rank_space(
    q: torch.Tensor, latent_k: LatentStore, latent_v: LatentStore, up_k: torch.Tensor,
    bias_k: torch.Tensor | None, up_v: torch.Tensor, bias_v: torch.Tensor | None, positions: torch.Tensor,
    inv_freq: torch.Tensor, window_k: torch.Tensor, window_v: torch.Tensor, *, sm_scale: float,
    rope_scaling: float = 1.0, key_mask: torch.Tensor | None = None, latent_lens: torch.Tensor | None = None,
    window_lens: torch.Tensor | None = None, fused: bool = False,
) -> torch.Tensor:
    """One decode step over a cache of post-RoPE key latents (the arguments of ``decode_attention_reference``;
    ``positions``, ``inv_freq`` and ``rope_scaling`` are not needed: the latents were rotated before projection).

    Each query is projected into the key latents' space once, ``U^T q``, and scored against every latent without a
    key being rebuilt. ``fused``: the latents' scores and value sums come from the CPU kernels (``cpu_kernel.py``)
    where they apply (8-bit latents on the CPU, once built); the results are the same sums."""
    from . import cpu_kernel

    batch, q_heads, head_dim = q.shape
    kv_heads = window_k.shape[1]
    group = q_heads // kv_heads
    projected = torch.einsum("bhgd,hdr->bhgr", q.float().view(batch, kv_heads, group, head_dim),
                             up_k.float().view(kv_heads, head_dim, -1)).reshape(batch, q_heads, -1)
    bias_score = 0.0
    if bias_k is not None:
        bias_score = torch.einsum("bhgd,hd->bhg", q.float().view(batch, kv_heads, group, head_dim),
                                  bias_k.float().view(kv_heads, head_dim)).reshape(batch, q_heads, 1)
    if fused and latent_k.length and cpu_kernel.supports(latent_k) and cpu_kernel.available():
        old = cpu_kernel.latent_scores(projected, latent_k)
    else:
        old = cpu_kernel.latent_scores_reference(projected, latent_k)
    mix = cpu_kernel.latent_mix if fused and cpu_kernel.supports(latent_v) and cpu_kernel.available() else None
    return _attend(q, (old + bias_score) * sm_scale, latent_v, up_v, bias_v, window_k, window_v, sm_scale=sm_scale,
                   key_mask=key_mask, latent_lens=latent_lens, window_lens=window_lens, mix=mix)


def _attend(q: torch.Tensor, old_scores: torch.Tensor, latent_v: LatentStore, up_v: torch.Tensor,
            bias_v: torch.Tensor | None, window_k: torch.Tensor, window_v: torch.Tensor, *, sm_scale: float,
            key_mask: torch.Tensor | None, latent_lens: torch.Tensor | None, window_lens: torch.Tensor | None,
            mix: Callable[[torch.Tensor, LatentStore], torch.Tensor] | None = None) -> torch.Tensor:
    """The rest of a decode step, given the latent tokens' scaled scores ``[batch, q_heads, T]``: the window's
    scores, the masked softmax over both branches, values read in rank space for the latents (``mix``: a fused
    ``sum_t p_t z_t``, else PyTorch) and in full for the window; returns ``[batch, q_heads, head_dim]``."""
    batch, q_heads, head_dim = q.shape
    kv_heads = window_k.shape[1]
    group = q_heads // kv_heads
    latent_len = old_scores.shape[-1]
    recent_scores = torch.einsum("bhgd,bhtd->bhgt", q.float().view(batch, kv_heads, group, head_dim),
                                 window_k.float()) * sm_scale
    scores = torch.cat([old_scores.view(batch, kv_heads, group, latent_len), recent_scores], dim=-1)
    if key_mask is not None or latent_lens is not None or window_lens is not None:  # else every key is read
        valid = valid_keys(batch, latent_len, window_k.shape[2], q.device, key_mask, latent_lens, window_lens)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no valid key reads nothing
    else:
        probs = torch.softmax(scores, dim=-1)
    old, recent = probs.split([latent_len, window_k.shape[2]], dim=-1)
    # The latent tokens' values are read in rank space: sum_t p_t (U l_t + b) = U (sum_t p_t l_t) + b sum_t p_t,
    # the same sum reassociated, so no [tokens, kv_heads * head_dim] values are ever reconstructed.
    if mix is not None and latent_len:
        mixed = mix(old.reshape(batch, q_heads, latent_len), latent_v).view(batch, kv_heads, group, -1)
    else:
        mixed = torch.einsum("bhgt,btr->bhgr", old, latent_v.dequantize(torch.float32))
    out = torch.einsum("bhgr,hdr->bhgd", mixed, up_v.float().view(kv_heads, head_dim, -1))
    if bias_v is not None:
        out = out + old.sum(-1, keepdim=True) * bias_v.float().view(kv_heads, 1, head_dim)
    out = out + torch.einsum("bhgt,bhtd->bhgd", recent, window_v.float())
    return out.reshape(batch, q_heads, head_dim).to(q.dtype)


def _f(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()
