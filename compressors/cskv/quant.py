"""Latent storage: in the model dtype, or quantized to 8 / 4 bits in packed form.

Quantization is asymmetric (min / max), per token and per group of ``group_size`` consecutive
latent channels, with an fp16 scale and zero point per group. SVD orders latent channels by
singular value, so neighbouring channels have similar ranges and small channel groups fit well.

Packed layouts (``rank`` = latent channels R):
- 8 bits: ``codes`` uint8 ``[batch, tokens, R]``;
- 4 bits: R is padded to an even ``Rq``; ``codes`` uint8 ``[batch, tokens, Rq // 2]`` where byte ``j``
  holds channel ``j`` in its low nibble and channel ``j + Rq // 2`` in its high nibble (so a kernel
  unpacks two contiguous channel halves without interleaving);
- ``scale`` / ``zero`` fp16 ``[batch, tokens, ceil(Rq / group_size)]``; channel ``c`` uses group
  ``c // group_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def padded_channels(rank: int, bits: int | None) -> int:
    """Channels stored per token: the rank, rounded up to even for 4-bit packing."""
    return rank + (rank % 2) if bits == 4 else rank


def num_groups(rank: int, bits: int | None, group_size: int) -> int:
    return math.ceil(padded_channels(rank, bits) / group_size)


@dataclass
class LatentStore:
    """Latents of one projection (K or V) of one layer for ``[batch, tokens]``.

    ``data`` is the float latent ``[batch, tokens, rank]`` when ``bits`` is None, else the packed
    uint8 codes; ``scale`` / ``zero`` are the per-group fp16 quantization parameters.
    """

    bits: int | None
    rank: int
    group_size: int
    data: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.data.shape[1]

    @property
    def batch_size(self) -> int:
        return self.data.shape[0]

    def parts(self) -> dict[str, torch.Tensor]:
        """The tensors held, by name suffix (what a Memory stores)."""
        if self.bits is None:
            return {"": self.data}
        assert self.scale is not None and self.zero is not None
        return {".codes": self.data, ".scale": self.scale, ".zero": self.zero}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    def map(self, fn) -> LatentStore:  # noqa: ANN001 - a tensor -> tensor function
        return LatentStore(self.bits, self.rank, self.group_size, fn(self.data),
                           None if self.scale is None else fn(self.scale),
                           None if self.zero is None else fn(self.zero))

    def append(self, other: LatentStore) -> LatentStore:
        """Tokens of ``other`` after those of ``self`` (same format)."""
        if (other.bits, other.rank, other.group_size) != (self.bits, self.rank, self.group_size):
            raise ValueError("cannot append latents of another format")
        cat = lambda a, b: None if a is None else torch.cat([a, b], dim=1)  # noqa: E731
        return LatentStore(self.bits, self.rank, self.group_size, cat(self.data, other.data),
                           cat(self.scale, other.scale), cat(self.zero, other.zero))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The latents as floats ``[batch, tokens, rank]``."""
        if self.bits is None:
            return self.data.to(dtype)
        return dequantize(self.data, self.scale, self.zero, self.bits, self.rank, self.group_size).to(dtype)

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], bits: int | None, rank: int, group_size: int,
                   ) -> LatentStore:
        if bits is None:
            return cls(None, rank, group_size, parts[""])
        return cls(bits, rank, group_size, parts[".codes"], parts[".scale"], parts[".zero"])

    @classmethod
    def empty(cls, batch: int, rank: int, bits: int | None, group_size: int, dtype: torch.dtype,
              device: torch.device | str) -> LatentStore:
        if bits is None:
            return cls(None, rank, group_size, torch.zeros(batch, 0, rank, dtype=dtype, device=device))
        width = padded_channels(rank, bits) // (2 if bits == 4 else 1)
        groups = num_groups(rank, bits, group_size)
        half = torch.zeros(batch, 0, groups, dtype=torch.float16, device=device)
        return cls(bits, rank, group_size, torch.zeros(batch, 0, width, dtype=torch.uint8, device=device),
                   half, half.clone())


def store(latent: torch.Tensor, bits: int | None, group_size: int, dtype: torch.dtype) -> LatentStore:
    """Float latents ``[batch, tokens, rank]`` as a LatentStore (quantized when ``bits`` is set)."""
    rank = latent.shape[-1]
    if bits is None:
        return LatentStore(None, rank, group_size, latent.to(dtype))
    codes, scale, zero = quantize(latent, bits, group_size)
    return LatentStore(bits, rank, group_size, codes, scale, zero)


def _grouped(latent: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``[..., rank]`` -> ``[..., groups, group_size]``, padding by repeating the last channel
    (padding never widens a group's range)."""
    rank = latent.shape[-1]
    total = num_groups(rank, bits, group_size) * group_size
    if total > rank:
        latent = torch.cat([latent, latent[..., -1:].expand(*latent.shape[:-1], total - rank)], dim=-1)
    return latent.reshape(*latent.shape[:-1], total // group_size, group_size)


def quantize(latent: torch.Tensor, bits: int, group_size: int,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero)`` of float latents ``[batch, tokens, rank]`` in the packed layout."""
    if bits not in (8, 4):
        raise ValueError(f"quantization to {bits} bits is not supported; use 8 or 4")
    rank, qmax = latent.shape[-1], (1 << bits) - 1
    groups = _grouped(latent.detach().float(), bits, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / qmax).to(torch.float16)
    zero = low.to(torch.float16)
    # Quantize with the fp16-rounded parameters that dequantization will read.
    s, z = scale.float()[..., None], zero.float()[..., None]
    codes = torch.where(s > 0, torch.round((groups - z) / s.clamp(min=1e-30)), torch.zeros_like(groups))
    codes = codes.clamp(0, qmax).to(torch.uint8).flatten(-2)[..., : padded_channels(rank, bits)]
    if bits == 4:
        half = codes.shape[-1] // 2
        codes = codes[..., :half] | (codes[..., half:] << 4)
    return codes.contiguous(), scale.contiguous(), zero.contiguous()


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes as one uint8 per channel ``[..., Rq]``."""
    if bits == 8:
        return codes
    return torch.cat([codes & 0x0F, codes >> 4], dim=-1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, rank: int,
               group_size: int) -> torch.Tensor:
    """Float32 latents ``[batch, tokens, rank]`` from the packed layout."""
    values = unpack_codes(codes, bits).float()
    group = torch.arange(values.shape[-1], device=values.device) // group_size
    return (values * scale.float()[..., group] + zero.float()[..., group])[..., :rank]


def fake_quantize(latent: torch.Tensor, bits: int | None, group_size: int) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (quantization-aware training)."""
    if bits is None:
        return latent
    codes, scale, zero = quantize(latent, bits, group_size)
    rounded = dequantize(codes, scale, zero, bits, latent.shape[-1], group_size).to(latent.dtype)
    return latent + (rounded - latent).detach()
