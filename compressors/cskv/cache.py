"""The bi-branch CSKV cache (transformers 5.x ``Cache`` API).

Per layer, tokens older than the last ``window`` are held only as latents (``[batch, T, rank]`` for
K and for V, in the model dtype or packed to 8 / 4 bits); the last ``window`` tokens are held as
full keys (rotated) and values, plus their float latents, which move to the latent branch (and are
quantized) when the tokens leave the window. Token positions are held once for the whole cache
(int32), because pre-RoPE latent keys are rotated at their positions after reconstruction.

Every byte reported by ``nbytes`` is a tensor this object holds; nothing is simulated. The model
writes the cache through the ``Cache.update`` API while its compressor is installed (``attention.py``
says how); outside, the cache cannot make latents and refuses the update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import NOT_READING, DecodeRequest, LatentReader
from .quant import LatentStore, num_groups, padded_channels, store

EVICT_BLOCK = 32  # decoded tokens leave the window together (``CSKVLayer.append`` says why)


@dataclass(frozen=True)
class LayerSpec:
    """The shape facts of one layer's cache."""

    key_rank: int
    value_rank: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class CacheSpec:
    layers: tuple[LayerSpec, ...]
    window: int
    quant_bits: int | None
    quant_group_size: int
    dtype: torch.dtype


def latent_layout_ok(latent: LatentStore, rank: int) -> bool:
    """Whether a store's tensors have the shapes of ``rank`` channels in its format."""
    if latent.bits is None:
        return latent.data.shape[-1] == rank
    width = padded_channels(rank, latent.bits) // (2 if latent.bits == 4 else 1)
    groups = num_groups(rank, latent.bits, latent.group_size)
    return (latent.data.dtype == torch.uint8 and latent.data.shape[-1] == width
            and latent.scale is not None and latent.zero is not None
            and latent.scale.shape == (*latent.data.shape[:2], groups) and latent.zero.shape == latent.scale.shape)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CSKVLayer(CacheLayerMixin):
    """One layer: latents of old tokens + full K/V (and pending latents) of the recent window."""

    is_sliding = False
    is_croppable = False

    def __init__(self, spec: LayerSpec, cache_spec: CacheSpec, batch: int, device: torch.device | str) -> None:
        super().__init__()
        self.spec, self.cache_spec = spec, cache_spec
        bits, group, dtype = cache_spec.quant_bits, cache_spec.quant_group_size, cache_spec.dtype
        self.latent_k = LatentStore.empty(batch, spec.key_rank, bits, group, dtype, device)
        self.latent_v = LatentStore.empty(batch, spec.value_rank, bits, group, dtype, device)
        full = torch.zeros(batch, spec.kv_heads, 0, spec.head_dim, dtype=dtype, device=device)
        self.window_k, self.window_v = full, full.clone()
        self.window_latent_k = torch.zeros(batch, 0, spec.key_rank, dtype=dtype, device=device)
        self.window_latent_v = torch.zeros(batch, 0, spec.value_rank, dtype=dtype, device=device)
        self.is_initialized = True

    # ----- CacheLayerMixin ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError(NOT_READING)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.latent_len + self.window_len

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("build a new CSKVCache instead of resetting one")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a CSKV cache cannot be cropped (latents are not reversible)")

    def offload(self) -> None:  # the CacheLayerMixin default would touch self.keys
        return None

    def prefetch(self) -> None:
        return None

    # ----- CSKV -----------------------------------------------------------------------------
    @property
    def latent_len(self) -> int:
        return self.latent_k.length

    @property
    def window_len(self) -> int:
        return self.window_k.shape[2]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.latent_k, self.latent_v = self.latent_k.map(fn), self.latent_v.map(fn)
        self.window_k, self.window_v = fn(self.window_k), fn(self.window_v)
        self.window_latent_k, self.window_latent_v = fn(self.window_latent_k), fn(self.window_latent_v)

    def append(self, keys: torch.Tensor, values: torch.Tensor, latent_k: torch.Tensor,
               latent_v: torch.Tensor) -> None:
        """Add new tokens: full rotated ``keys`` / ``values`` ``[batch, kv_heads, n, head_dim]`` and
        their latents ``[batch, n, rank]``; tokens pushed out of the window keep only their latents.

        Several tokens at once (a prefill) leave exactly ``window`` in the window. Decoded one at a time, tokens
        leave it in blocks of ``EVICT_BLOCK``: moving tokens to the latent branch copies the whole latent store
        (``torch.cat``), and once per block instead of once per token keeps a decode step's cost from growing with
        the context through that copy. Meanwhile up to ``EVICT_BLOCK - 1`` more tokens stay in full (and are held,
        so ``nbytes`` counts them)."""
        dtype = self.cache_spec.dtype
        self.window_k = torch.cat([self.window_k, keys.detach().to(dtype)], dim=2)
        self.window_v = torch.cat([self.window_v, values.detach().to(dtype)], dim=2)
        self.window_latent_k = torch.cat([self.window_latent_k, latent_k.detach().to(dtype)], dim=1)
        self.window_latent_v = torch.cat([self.window_latent_v, latent_v.detach().to(dtype)], dim=1)
        overflow = self.window_len - self.cache_spec.window
        if overflow > 0 and (keys.shape[2] > 1 or overflow >= EVICT_BLOCK):
            bits, group = self.cache_spec.quant_bits, self.cache_spec.quant_group_size
            self.latent_k = self.latent_k.append(store(self.window_latent_k[:, :overflow], bits, group, dtype))
            self.latent_v = self.latent_v.append(store(self.window_latent_v[:, :overflow], bits, group, dtype))
            # clone(): a slice would keep the evicted full keys / values alive in its storage
            self.window_k = self.window_k[:, :, overflow:].clone()
            self.window_v = self.window_v[:, :, overflow:].clone()
            self.window_latent_k = self.window_latent_k[:, overflow:].clone()
            self.window_latent_v = self.window_latent_v[:, overflow:].clone()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds, by name."""
        out = {f"latent_k{k}": v for k, v in self.latent_k.parts().items()}
        out.update({f"latent_v{k}": v for k, v in self.latent_v.parts().items()})
        out.update(window_k=self.window_k, window_v=self.window_v, window_latent_k=self.window_latent_k,
                   window_latent_v=self.window_latent_v)
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        bits, group, dtype = self.cache_spec.quant_bits, self.cache_spec.quant_group_size, self.cache_spec.dtype
        # A Memory moved with .to(dtype=...) casts every float tensor: put each back in its format.
        tensors = {k: v.to(torch.float16 if k.endswith((".scale", ".zero")) else dtype)
                   if v.is_floating_point() else v for k, v in tensors.items()}
        self.latent_k = LatentStore.from_parts(
            {k[len("latent_k"):]: v for k, v in tensors.items() if k.startswith("latent_k")},
            bits, self.spec.key_rank, group)
        self.latent_v = LatentStore.from_parts(
            {k[len("latent_v"):]: v for k, v in tensors.items() if k.startswith("latent_v")},
            bits, self.spec.value_rank, group)
        self.window_k, self.window_v = tensors["window_k"], tensors["window_v"]
        self.window_latent_k, self.window_latent_v = tensors["window_latent_k"], tensors["window_latent_v"]
        self._check()

    def _check(self) -> None:
        s = self.spec
        problems = []
        if self.latent_v.length != self.latent_len:
            problems.append("K and V latents hold different token counts")
        for name, latent, rank in (("K", self.latent_k, s.key_rank), ("V", self.latent_v, s.value_rank)):
            if not latent_layout_ok(latent, rank):
                problems.append(f"{name} latents do not have the layout of rank {rank} at "
                                f"{latent.bits or 'full'} bits")
        if self.window_k.shape[1:] != (s.kv_heads, self.window_len, s.head_dim) or \
                self.window_v.shape != self.window_k.shape:
            problems.append(f"window K/V have shapes {tuple(self.window_k.shape)} / {tuple(self.window_v.shape)}")
        if self.window_latent_k.shape[1:] != (self.window_len, s.key_rank) or \
                self.window_latent_v.shape[1:] != (self.window_len, s.value_rank):
            problems.append("pending window latents do not match the window or the ranks")
        if problems:
            raise ValueError("this latent_kv memory does not fit the compressor: " + "; ".join(problems))

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in self.tensors().values())


class CSKVCache(Cache):
    """Bi-branch cache of a CSKV compressor: one ``CSKVLayer`` per decoder layer + token positions."""

    def __init__(self, spec: CacheSpec, batch: int, device: torch.device | str,
                 reader: LatentReader | None = None) -> None:
        layers = [CSKVLayer(layer, spec, batch, device) for layer in spec.layers]
        super().__init__(layers=layers)
        self.spec = spec
        self.reader = reader  # set by the compressor that made the cache
        self.positions = torch.zeros(batch, 0, dtype=torch.int32, device=device)
        self.staged_positions: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens of layer ``layer_idx`` (their rotated keys / values from the model, their
        latents from the reader) and return what the layer attends over (see ``attention.py``)."""
        if self.reader is None or not self.reader.installed:
            raise RuntimeError(NOT_READING)
        tokens = key_states.shape[2]
        latent_k, latent_v = self.reader.take_latents(layer_idx, tokens, key_states)
        if layer_idx == 0:
            self._record_positions(tokens)
        layer = self.layer(layer_idx)
        keys = [layer.window_k.to(key_states.dtype), key_states]
        values = [layer.window_v.to(value_states.dtype), value_states]
        if tokens == 1 and layer.get_seq_length() > 0:  # a decode step: the attention override reads latents
            window_k, window_v = torch.cat(keys, dim=2), torch.cat(values, dim=2)
            self.reader.requests[layer_idx] = DecodeRequest(
                layer.latent_k, layer.latent_v, self.latent_positions(layer_idx), window_k, window_v)
            layer.append(key_states, value_states, latent_k, latent_v)
            return window_k, window_v  # what the model's attention passes on to the override
        if layer.latent_len:
            old_k, old_v = self.reader.reconstruct(layer_idx, layer.latent_k, layer.latent_v,
                                                   self.latent_positions(layer_idx), key_states.shape[1],
                                                   key_states.shape[3])
            keys, values = [old_k.to(key_states.dtype), *keys], [old_v.to(value_states.dtype), *values]
        layer.append(key_states, value_states, latent_k, latent_v)
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    def stage_positions(self, position_ids: torch.Tensor) -> None:
        """The positions of the tokens the next forward adds (by default each row continues by one)."""
        self.staged_positions = position_ids

    def _record_positions(self, tokens: int) -> None:
        staged, self.staged_positions = self.staged_positions, None
        if staged is None:
            last = self.positions[:, -1:] if self.positions.shape[1] else self.positions.new_full(
                (self.batch_size, 1), -1)
            staged = last + torch.arange(1, tokens + 1, device=last.device, dtype=last.dtype)
        elif staged.shape[-1] != tokens:
            raise ValueError(f"staged positions for {staged.shape[-1]} tokens, the forward adds {tokens}")
        self.add_positions(staged)

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def layer(self, index: int) -> CSKVLayer:
        return self.layers[index]  # type: ignore[return-value]

    def add_positions(self, position_ids: torch.Tensor) -> None:
        """Record the positions of the tokens being added (once per forward, by layer 0)."""
        position_ids = position_ids.to(device=self.positions.device, dtype=torch.int32)
        if position_ids.shape[0] != self.batch_size:
            position_ids = position_ids.expand(self.batch_size, -1)
        self.positions = torch.cat([self.positions, position_ids], dim=1)

    def latent_positions(self, index: int) -> torch.Tensor:
        return self.positions[:, : self.layer(index).latent_len]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.positions = self.positions[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    # ----- what is held ---------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the cache holds: ``positions`` and ``<name>.<layer>`` per layer."""
        out = {"positions": self.positions}
        for index, layer in enumerate(self.layers):
            out.update({f"{name}.{index}": t for name, t in layer.tensors().items()})  # type: ignore[attr-defined]
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds."""
        return sum(_nbytes(t) for t in self.tensors().values())

    def full_cache_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes a plain K/V cache of the same tokens would hold (in ``dtype``, default the model's)."""
        size = torch.empty(0, dtype=dtype or self.spec.dtype).element_size()
        tokens = self.positions.shape[1]
        return sum(2 * self.batch_size * s.kv_heads * tokens * s.head_dim * size for s in self.spec.layers)

    @classmethod
    def from_tensors(cls, spec: CacheSpec, tensors: dict[str, torch.Tensor], repeat: int = 1,
                     reader: LatentReader | None = None) -> CSKVCache:
        """A fresh cache holding ``tensors`` (as made by ``tensors()``), rows repeated ``repeat`` times."""
        positions = tensors["positions"]
        cache = cls(spec, positions.shape[0], positions.device, reader)
        cache.positions = positions.to(torch.int32)
        for index, layer in enumerate(cache.layers):
            suffix = f".{index}"
            mine = {k[: -len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}
            layer.load(mine)  # type: ignore[attr-defined]
            if layer.get_seq_length() != positions.shape[1]:
                raise ValueError(f"layer {index} holds {layer.get_seq_length()} tokens, positions "
                                 f"{positions.shape[1]}")
        if repeat > 1:
            cache.batch_repeat_interleave(repeat)
        return cache
