"""Memory: what a compressor produces and a decoder consumes, and the only thing passed between them."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import BaseModelMismatchError, CorruptArtifactError

MEMORY_KINDS = ("embeds", "kv", "layer_states", "latents", "pool", "text", "latent_kv")
_FORMAT = "ctxzip.memory/1"


@dataclass
class Memory:
    """A compressed context for a batch of ``batch_size`` rows.

    ``tensors`` holds the payload; its layout depends on ``kind`` (for ``kv``: ``key.{layer}`` and
    ``value.{layer}`` of shape ``[batch, kv_heads, slots, head_dim]``, already rotated at their
    positions). ``source_tokens[i]`` is how many context tokens row ``i`` summarises, ``slots`` how
    many memory positions each row holds, ``position_offset[i]`` the position the decoder must
    continue from. ``base_signature`` identifies the base model the memory is valid for.
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    source_tokens: list[int]
    slots: int
    position_offset: list[int]
    compressor_type: str
    base_signature: dict[str, Any] = field(default_factory=dict)
    texts: list[str] | None = None  # payload of kind "text"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in MEMORY_KINDS:
            raise ValueError(f"unknown memory kind {self.kind!r}; expected one of {MEMORY_KINDS}")
        if len(self.source_tokens) != len(self.position_offset):
            raise ValueError("source_tokens and position_offset must have one entry per row")

    # ----- facts ---------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return len(self.source_tokens)

    @property
    def ratio(self) -> float:
        """Achieved compression ratio: context tokens per memory slot (mean over rows)."""
        return sum(self.source_tokens) / max(1, self.slots * self.batch_size)

    @property
    def nbytes(self) -> int:
        """Bytes the memory really holds (tensor storage, plus UTF-8 text for kind ``text``)."""
        total = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return total + sum(len(t.encode()) for t in self.texts or [])

    @property
    def num_layers(self) -> int:
        return sum(1 for name in self.tensors if name.startswith("key."))

    # ----- kv helpers ----------------------------------------------------------------------
    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[f"key.{layer}"], self.tensors[f"value.{layer}"]

    def to_cache(self, repeat: int = 1) -> Any:
        """A fresh ``DynamicCache`` holding this ``kv`` memory (decoding mutates caches: never share one)."""
        from transformers import DynamicCache

        if self.kind != "kv":
            raise ValueError(f"only kv memories become a KV cache, this one is {self.kind!r}")
        cache = DynamicCache()
        for layer in range(self.num_layers):
            key, value = self.layer_kv(layer)
            if repeat > 1:
                key, value = key.repeat_interleave(repeat, 0), value.repeat_interleave(repeat, 0)
            cache.update(key, value, layer)
        return cache

    # ----- transforms ----------------------------------------------------------------------
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Memory:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return self._replace(tensors={k: move(v) for k, v in self.tensors.items()})

    def detach(self) -> Memory:
        return self._replace(tensors={k: v.detach() for k, v in self.tensors.items()})

    def select(self, row: int) -> Memory:
        """Row ``row`` as a batch-1 memory."""
        return self._replace(
            tensors={k: v[row : row + 1] for k, v in self.tensors.items()},
            source_tokens=[self.source_tokens[row]], position_offset=[self.position_offset[row]],
            texts=[self.texts[row]] if self.texts is not None else None)

    def cat(self, other: Memory) -> Memory:
        """Append ``other`` along the slot axis (recurrent methods: segment by segment)."""
        self, other = _with_common_slot_mask([self, other])
        self._check_compatible(other)
        if self.batch_size != other.batch_size:
            raise ValueError("cannot concatenate memories with different batch sizes")
        tensors = {k: torch.cat([v, other.tensors[k]], dim=2 if v.dim() == 4 else 1)
                   for k, v in self.tensors.items()}
        texts = None
        if self.texts is not None and other.texts is not None:
            texts = [a + "\n" + b for a, b in zip(self.texts, other.texts)]
        return self._replace(
            tensors=tensors, slots=self.slots + other.slots, texts=texts,
            source_tokens=[a + b for a, b in zip(self.source_tokens, other.source_tokens)],
            position_offset=list(other.position_offset))

    @staticmethod
    def stack(memories: list[Memory]) -> Memory:
        """Join batch-1 memories with equal slot counts into one batch."""
        memories = _with_common_slot_mask(memories)
        first = memories[0]
        for m in memories[1:]:
            first._check_compatible(m)
            if m.slots != first.slots:
                raise ValueError("memories with different slot counts cannot be batched")
        return first._replace(
            tensors={k: torch.cat([m.tensors[k] for m in memories]) for k in first.tensors},
            source_tokens=[s for m in memories for s in m.source_tokens],
            position_offset=[p for m in memories for p in m.position_offset],
            texts=[t for m in memories for t in m.texts] if first.texts is not None else None)

    def _check_compatible(self, other: Memory) -> None:
        if other.kind != self.kind or set(other.tensors) != set(self.tensors):
            raise ValueError(f"cannot combine a {self.kind!r} memory with a {other.kind!r} memory")

    def _replace(self, **changes: Any) -> Memory:
        fields = dict(kind=self.kind, tensors=self.tensors, source_tokens=list(self.source_tokens),
                      slots=self.slots, position_offset=list(self.position_offset),
                      compressor_type=self.compressor_type, base_signature=dict(self.base_signature),
                      texts=list(self.texts) if self.texts is not None else None, meta=dict(self.meta))
        fields.update(changes)
        return Memory(**fields)

    def check_base(self, signature: dict[str, Any]) -> None:
        """Raise if this memory was made for a base model of another shape."""
        if self.base_signature and self.base_signature != signature:
            diff = {k: (self.base_signature.get(k), signature.get(k))
                    for k in set(signature) | set(self.base_signature)
                    if self.base_signature.get(k) != signature.get(k)}
            raise BaseModelMismatchError(
                f"this Memory was made for another base model (memory vs model: {diff})")

    # ----- persistence ---------------------------------------------------------------------
    def _header(self) -> dict[str, str]:
        info = dict(format=_FORMAT, kind=self.kind, source_tokens=self.source_tokens, slots=self.slots,
                    position_offset=self.position_offset, compressor_type=self.compressor_type,
                    base_signature=self.base_signature, texts=self.texts, meta=self.meta)
        return {"ctxzip": json.dumps(info)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the memory as one safetensors file (atomically: a crash never leaves half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=self._header())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Memory:
        path = Path(path)
        if not path.is_file():
            raise CorruptArtifactError(f"no memory file at {path}")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                header = (f.metadata() or {}).get("ctxzip")
            tensors = load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CorruptArtifactError(f"{path} is not a readable safetensors memory file: {exc}") from exc
        if header is None:
            raise CorruptArtifactError(f"{path} is a safetensors file but not a ctxzip Memory")
        try:
            info = json.loads(header)
            if not isinstance(info, dict) or info.pop("format", None) != _FORMAT:
                raise CorruptArtifactError(f"{path}: unsupported memory format")
            return cls(tensors=tensors, **info)
        except (ValueError, TypeError) as exc:  # bad JSON, missing or unknown fields
            raise CorruptArtifactError(f"{path} has a corrupt ctxzip memory header: {exc}") from exc


def _with_common_slot_mask(memories: list[Memory]) -> list[Memory]:
    """Give every memory a ``slot_mask`` when any has one (no mask means every slot is real)."""
    if all("slot_mask" in m.tensors for m in memories) or not any("slot_mask" in m.tensors for m in memories):
        return memories
    out = []
    for m in memories:
        if "slot_mask" not in m.tensors:
            device = next(iter(m.tensors.values())).device
            ones = torch.ones(m.batch_size, m.slots, dtype=torch.int8, device=device)
            m = m._replace(tensors={**m.tensors, "slot_mask": ones})
        out.append(m)
    return out
