"""Memory: what a compressor produces and a decoder consumes, and the only thing passed between them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import BaseModelMismatchError, CorruptArtifactError
from .io import atomic_path

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

    # ----- facts (the kind's rules say how its payload counts) -------------------------------
    @property
    def rules(self) -> KindRules:
        return KIND_RULES[self.kind]

    @property
    def batch_size(self) -> int:
        return len(self.source_tokens)

    @property
    def real_slots(self) -> list[float]:
        """Memory positions each row really holds (padding excluded; mean over layers when they differ)."""
        return self.rules.real_slots(self)

    @property
    def ratio(self) -> float:
        """Achieved compression ratio of the whole batch, by the kind's rule (``KindRules.ratio``)."""
        return self.rules.ratio(self)

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

    def to_cache(self) -> Any:
        """A fresh ``DynamicCache`` holding this ``kv`` memory (decoding mutates caches: never share one;
        ``expand`` first for one row read by many prompts)."""
        return self.rules.to_cache(self)

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
            texts=[self.texts[row]] if self.texts is not None else None,
            meta=_select_meta(self.meta, row))

    def expand(self, rows: int) -> Memory:
        """This memory for a batch of ``rows`` prompts: one row is repeated for every prompt (one memory,
        many prompts); a memory with ``rows`` rows is returned as it is; any other count is an error."""
        if self.batch_size == rows:
            return self
        if self.batch_size != 1:
            raise ValueError(f"memory has {self.batch_size} rows but the prompts have {rows}")
        return self._replace(
            tensors={k: v.repeat(rows, *[1] * (v.dim() - 1)) for k, v in self.tensors.items()},  # copies: caches grow in place
            source_tokens=self.source_tokens * rows, position_offset=self.position_offset * rows,
            texts=self.texts * rows if self.texts is not None else None,
            meta=_repeat_meta(self.meta, rows))

    def slot_mask(self) -> torch.Tensor:
        """``[batch, slots]`` (int8): 1 for the memory positions a decoder reads, 0 for padding."""
        mask = self.tensors.get("slot_mask")
        if mask is not None:
            return mask.to(torch.int8)
        device = next(iter(self.tensors.values())).device if self.tensors else None
        return torch.ones(self.batch_size, self.slots, dtype=torch.int8, device=device)

    def cat(self, other: Memory) -> Memory:
        """Append ``other`` along the slot axis (recurrent methods: segment by segment)."""
        self, other = _with_common_slot_mask([self, other])
        self._check_compatible(other)
        if self.batch_size != other.batch_size:
            raise ValueError("cannot concatenate memories with different batch sizes")
        tensors = {k: self.rules.cat(k, v, other.tensors[k]) for k, v in self.tensors.items()}
        texts = None
        if self.texts is not None and other.texts is not None:
            texts = [a + "\n" + b for a, b in zip(self.texts, other.texts)]
        return self._replace(
            tensors=tensors, slots=self.slots + other.slots, texts=texts,
            source_tokens=[a + b for a, b in zip(self.source_tokens, other.source_tokens)],
            position_offset=list(other.position_offset))

    def pooled(self) -> Memory:
        """The rows of a ``pool`` memory united into one row: every real entry of every row (a union, so the
        order of rows and entries never matters to a decoder)."""
        return self.rules.pooled(self)

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
        if other.kind != self.kind:
            raise ValueError(f"cannot combine a {self.kind!r} memory with a {other.kind!r} memory")
        if set(other.tensors) != set(self.tensors):
            raise ValueError(f"cannot combine two {self.kind!r} memories holding different tensors (only in one: "
                             f"{sorted(set(self.tensors) ^ set(other.tensors))}): they were made by compressors "
                             "of another configuration")
        if self.base_signature and other.base_signature:
            other.check_base(self.base_signature)

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
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=self._header())
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


def _select_meta(meta: dict[str, Any], row: int) -> dict[str, Any]:
    """Per-row meta lists (``layer_slots``, ``real_slots``) cut to one row; the rest is shared."""
    return {k: ([v[row]] if k in _PER_ROW_META and isinstance(v, list) else v) for k, v in meta.items()}


def _repeat_meta(meta: dict[str, Any], rows: int) -> dict[str, Any]:
    return {k: (v * rows if k in _PER_ROW_META and isinstance(v, list) else v) for k, v in meta.items()}


_PER_ROW_META = ("layer_slots", "real_slots")


# ----- per-kind payload rules -------------------------------------------------------------
class KindRules:
    """How a memory kind's payload concatenates, becomes a cache, and counts toward its ratio.

    The default ratio is *context tokens per memory position*: ``sum(source_tokens) / sum(real_slots)``,
    real slots excluding padding (``slot_mask``) and averaged over layers when a method keeps a different
    number per layer (``meta['layer_slots']``, PyramidKV). A template prefix the decoder reads as text beside
    the payload (``meta['prefix_ids']``: LCIRC, SoftPromptComp) counts as memory positions too.
    """

    kind: ClassVar[str] = ""
    slot_axis: ClassVar[int] = 1  # of a payload tensor shaped [batch, slots, ...]

    def cat(self, name: str, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return torch.cat([first, second], dim=self.slot_axis if name != "slot_mask" else 1)

    def real_slots(self, memory: Memory) -> list[float]:
        prefix = len(memory.meta.get("prefix_ids", []))
        layer_slots = memory.meta.get("layer_slots")
        if layer_slots:
            return [prefix + sum(row) / len(row) for row in layer_slots]
        mask = memory.tensors.get("slot_mask")
        if mask is not None:
            return [prefix + float(v) for v in mask.long().sum(-1).tolist()]
        return [prefix + float(memory.slots)] * memory.batch_size

    def ratio(self, memory: Memory) -> float:
        return sum(memory.source_tokens) / max(1e-9, sum(self.real_slots(memory)))

    def to_cache(self, memory: Memory) -> Any:
        raise ValueError(f"a {memory.kind!r} memory is not a KV cache; its compressor's decoder reads it")

    def pooled(self, memory: Memory) -> Memory:
        raise ValueError(f"a {memory.kind!r} memory is not a pool: its rows are separate contexts")


class KVRules(KindRules):
    """``key.{layer}`` / ``value.{layer}``: ``[batch, kv_heads, slots, head_dim]``, rotated at their positions."""

    kind = "kv"

    def cat(self, name: str, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return torch.cat([first, second], dim=2 if first.dim() == 4 else 1)

    def to_cache(self, memory: Memory) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer in range(memory.num_layers):
            cache.update(*memory.layer_kv(layer), layer)
        return cache


def kv_tensors(cache: Any, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A ``kv`` memory's payload from a transformers cache (the inverse of ``KVRules.to_cache``): ``key.{layer}``
    and ``value.{layer}`` per layer, and a ``slot_mask`` when ``mask`` ([batch, slots]) holds padding."""
    tensors: dict[str, torch.Tensor] = {}
    for layer, item in enumerate(cache.layers):
        tensors[f"key.{layer}"], tensors[f"value.{layer}"] = item.keys, item.values
    if mask is not None and not bool(mask.all()):
        tensors["slot_mask"] = mask.to(torch.int8)  # padded rows: the decoder must not read the pads
    return tensors


class TextRules(KindRules):
    """``input_ids`` ``[batch, tokens]`` of a shorter text (``texts`` holds it decoded); ratio in tokens."""

    kind = "text"


class EmbedsRules(KindRules):
    """``embeds`` ``[batch, slots, hidden]``: vectors read as input embeddings."""

    kind = "embeds"


class LayerStatesRules(KindRules):
    """``state.{layer}`` ``[batch, slots, hidden]``: per-layer states injected into the residual stream."""

    kind = "layer_states"


class LatentsRules(KindRules):
    """``latents`` ``[batch, slots, width]``: read through cross-attention."""

    kind = "latents"


class PoolRules(KindRules):
    """An unordered set of per-item entries (InComeS: ``key.{layer}`` / ``value.{layer}`` ``[rows, entries,
    kv_heads, head_dim]`` and ``edit_id`` ``[rows, entries]``); concatenation is a union, so order never matters.
    The ratio is item tokens per entry (a template prefix the decoder reads as text is not an entry)."""

    kind = "pool"

    def real_slots(self, memory: Memory) -> list[float]:
        return [float(n) for n in memory.slot_mask().long().sum(-1).tolist()]

    def pooled(self, memory: Memory) -> Memory:
        keep = memory.slot_mask().bool()
        tensors = {name: torch.cat([t[row][keep[row]] for row in range(memory.batch_size)])[None]
                   for name, t in memory.tensors.items() if name != "slot_mask"}
        return memory._replace(tensors=tensors, slots=int(keep.sum()), source_tokens=[sum(memory.source_tokens)],
                               position_offset=memory.position_offset[:1], texts=None,
                               meta=_select_meta(memory.meta, 0))


class LatentKVRules(KindRules):
    """A low-rank (optionally quantized) K/V cache of every context token (CSKV).

    No token is dropped, so the ratio is that of bytes: what a plain K/V cache of the same tokens holds
    (``meta['full_kv_nbytes']``) over what this memory holds.
    """

    kind = "latent_kv"

    def cat(self, name: str, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        raise ValueError("latent_kv memories cannot be concatenated: compress the whole context at once")

    def real_slots(self, memory: Memory) -> list[float]:
        return [float(n) for n in memory.source_tokens]

    def ratio(self, memory: Memory) -> float:
        full = memory.meta.get("full_kv_nbytes")
        return float(full) / max(1, memory.nbytes) if full else 1.0


KIND_RULES: dict[str, KindRules] = {rules.kind: rules for rules in (
    KVRules(), TextRules(), EmbedsRules(), LayerStatesRules(), LatentsRules(), PoolRules(), LatentKVRules())}
MEMORY_KINDS = tuple(KIND_RULES)
