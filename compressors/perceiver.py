"""Perceiver-style building blocks shared by the compressors that read a set of vectors by cross-attention.

- ``CrossAttention``: queries attend (without a causal mask) to a set of inputs, with a padding mask; the
  keys/values of a set can be computed once (``keys_values``) and reused by many forwards.
- ``GatedCrossAttentionBlock``: Flamingo's ``x + tanh(a) * XAttn(LN(x), H)`` then ``x + tanh(b) * FFN(x)``,
  gates at zero at initialisation (the block is then exactly the identity).
- ``LearnedLatents``: learned vectors (an initial state, learned queries) read through a module call;
- ``PerceiverResampler``: latents attend to a segment of input vectors plus a learned position embedding
  sized by the longest segment, layer after layer (attention then feed-forward, both residual), then a
  final LayerNorm.

LCIRC (``compressors.lcirc``) compresses with the resampler and injects with the gated blocks; SoftPromptComp
(``compressors.softpromptcomp``) turns the frozen LM's hidden states into its soft vectors with the same
resampler and learned queries.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def feed_forward(width: int, inner: int) -> nn.Sequential:
    """LayerNorm, Linear, SiLU, Linear (no biases): the feed-forward of every block here."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, inner, bias=False), nn.SiLU(),
                         nn.Linear(inner, width, bias=False))


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` (LayerNorm-ed) over a set of input vectors; no causal mask.

    ``key_mask`` ([batch, inputs], 1 = real) hides padded inputs; a row with no real input gets a zero
    output (and no NaN, in either direction).
    """

    def __init__(self, width: int, heads: int, head_dim: int, input_width: int | None = None,
                 norm_inputs: bool = False) -> None:
        super().__init__()
        input_width = input_width or width
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(width)
        self.input_norm = nn.LayerNorm(input_width) if norm_inputs else nn.Identity()
        self.to_q = nn.Linear(width, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(input_width, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, width, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.heads, self.head_dim).transpose(1, 2)

    def keys_values(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[batch, heads, inputs, head_dim]`` of a set of input vectors."""
        keys, values = self.to_kv(self.input_norm(inputs)).chunk(2, dim=-1)
        return self._split(keys), self._split(values)

    def forward(self, x: torch.Tensor, inputs: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                keys_values: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        keys, values = keys_values if keys_values is not None else self.keys_values(inputs)
        queries = self._split(self.to_q(self.norm(x)))
        mask = empty = None
        if key_mask is not None:
            real = key_mask.bool()
            empty = ~real.any(-1)
            # a row with nothing to attend to attends to everything (no NaN), and its output is zeroed below
            mask = (real | empty[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(queries, keys.to(queries.dtype), values.to(queries.dtype),
                                             attn_mask=mask)
        out = self.to_out(out.transpose(1, 2).reshape(*x.shape[:2], -1))
        if empty is not None and bool(empty.any()):
            out = out.masked_fill(empty[:, None, None], 0.0)
        return out


class GatedCrossAttentionBlock(nn.Module):
    """``x + tanh(a) * XAttn(LN(x), H)``, then ``x + tanh(b) * FFN(x)``; ``a = b = 0`` at initialisation."""

    def __init__(self, width: int, heads: int, head_dim: int, inner: int) -> None:
        super().__init__()
        # shape (1,), not a 0-d scalar: DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot view
        self.attn = CrossAttention(width, heads, head_dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(width, inner)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, inputs: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                keys_values: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn_gate.tanh() * self.attn(x, inputs, key_mask, keys_values)
        return x + self.ff_gate.tanh() * self.ff(x)


class PerceiverResampler(nn.Module):
    """Latents ``[batch, K, width]`` attend to a segment of input vectors ``[batch, n, width]`` (plus a
    learned position embedding of ``max_inputs`` rows; ``max_inputs=0``: none, for inputs that carry their
    positions already, e.g. an LM's hidden states), ``num_layers`` times; returns the new latents."""

    def __init__(self, width: int, num_layers: int, heads: int, head_dim: int, inner: int, max_inputs: int) -> None:
        super().__init__()
        self.max_inputs = max_inputs
        self.positions = nn.Parameter(torch.randn(max_inputs, width) * 0.02) if max_inputs else None
        self.layers = nn.ModuleList(
            nn.ModuleList([CrossAttention(width, heads, head_dim, norm_inputs=True), feed_forward(width, inner)])
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, latents: torch.Tensor, inputs: torch.Tensor, input_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        if self.positions is not None:
            if inputs.shape[1] > self.max_inputs:
                raise ValueError(f"a segment of {inputs.shape[1]} inputs is longer than the position table "
                                 f"({self.max_inputs} rows): cut it into segments of at most {self.max_inputs}")
            inputs = inputs + self.positions[: inputs.shape[1]].to(inputs.dtype)
        for attention, ff in self.layers:
            latents = latents + attention(latents, inputs, input_mask)
            latents = latents + ff(latents)
        return self.norm(latents)


class LearnedLatents(nn.Module):
    """``count`` learned vectors ``[count, width]`` (an initial state, or learned queries); a module, so that
    DeepSpeed ZeRO-3 gathers them when they are read."""

    def __init__(self, count: int, width: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(count, width) * 0.02)

    def forward(self) -> torch.Tensor:
        return self.latents
