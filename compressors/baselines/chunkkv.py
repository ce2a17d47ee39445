"""ChunkKV: keep whole chunks of consecutive tokens, chosen by their attention score.

Paper: "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
Inference", Liu et al. 2025, https://arxiv.org/abs/2502.00299

What it does here: the SnapKV observation-window scores (see ``snapkv.py``: exact recomputed
queries of the last ``window`` tokens, pooled) are averaged over KV heads and summed inside
chunks of ``chunk_size`` consecutive positions; the best chunks are kept, the same chunks for
every head of the layer, until the budget ``budget_for(n, ratio)`` (``ceil(n / ratio)``, or kvpress's
``int(n * (1 - compression_ratio))`` with ``budget_rounding="kvpress"``) is reached exactly (the last chosen
chunk is trimmed to its best tokens when it does not fit whole). Layer-wise index reuse: the
indices chosen on layer ``l`` are reused for the next ``reuse_layers - 1`` layers (1 = no reuse).
The observation window is always kept, as in the paper's SnapKV-based implementation.

Faithful: chunk-level scoring and selection shared by all heads of a layer, fixed chunk size,
layer-wise index reuse (fixed reuse stride, as the paper's default; the paper picks the stride
from index similarity measured offline). Not faithful: the exact-budget trimming of one chunk,
the ratio-based budget, and that reuse saves no compute here (all layers' queries are caught
in the same prefill anyway). Not compared with kvpress's ``ChunkKVPress`` (which wraps another
press's scores and has no exact-budget trimming nor index reuse). Kept keys keep their original
positions. Ratio 1 keeps everything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..base import register_compressor
from .selection import KVSelection, KVSelectionConfig


@dataclass
class ChunkKVConfig(KVSelectionConfig):
    chunk_size: int = 10
    reuse_layers: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size < 1 or self.reuse_layers < 1:
            raise ValueError("chunk_size and reuse_layers must be >= 1")


def chunk_indices(scores: torch.Tensor, budget: int, chunk_size: int) -> torch.Tensor:
    """Token scores ``[B, n]`` -> kept positions ``[B, budget]`` (sorted) made of whole chunks."""
    b, n = scores.shape
    chunks = math.ceil(n / chunk_size)
    padded = torch.nn.functional.pad(scores, (0, chunks * chunk_size - n), value=0.0)
    chunk_scores = padded.view(b, chunks, chunk_size).sum(-1)
    wanted = min(chunks, math.ceil(budget / chunk_size) + 1)
    order = chunk_scores.topk(wanted, dim=-1).indices
    rows = []
    for row in range(b):
        kept: list[int] = []
        for c in order[row].tolist():
            members = list(range(c * chunk_size, min(n, (c + 1) * chunk_size)))
            room = budget - len(kept)
            if room <= 0:
                break
            if len(members) > room:  # trim the last chunk to its best tokens
                best = scores[row, members].topk(room).indices.tolist()
                members = [members[i] for i in best]
            kept += members
        rows.append(sorted(kept))
    return torch.tensor(rows, device=scores.device)


@register_compressor
class ChunkKV(KVSelection):
    compressor_type = "chunkkv"
    config_class = ChunkKVConfig

    def select(self, kv, scores, n, ratio):  # type: ignore[override]
        self._reused: torch.Tensor | None = None
        return super().select(kv, scores, n, ratio)

    def layer_indices(self, layer: int, scores: torch.Tensor | None, key: torch.Tensor,
                      budget: int) -> torch.Tensor:
        assert scores is not None
        cfg = self.compressor_config
        if layer % cfg.reuse_layers == 0 or self._reused is None:
            self._reused = chunk_indices(scores.mean(1), budget, cfg.chunk_size)
        return self._reused[:, None, :].expand(-1, key.shape[1], -1)
