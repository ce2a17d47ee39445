"""The KV-selection framework shared by the training-free eviction baselines.

``prefill_context`` runs ONE full prefill of a context row and returns it as a value (``ContextPrefill``:
the KV cache, the observation window's queries caught by ``attention.QueryCapture``, optionally every
token's self-information), so that the eval runner can do one prefill per sample for every method that
starts from it. ``PrefillSelection`` is the type of those methods (the full context, the KV-selection
methods, Selective Context, EHPC): ``prefill_needs`` / ``compress_from`` (memories from a prefill made by
someone else), ``compress_ratios`` (several ratios from one pass of their own) and ``prefill_is_own_cost``
(how the eval runner times a memory made from a shared prefill). ``KVSelection`` is the base of the
methods that keep, per layer and KV head, a subset of the cached positions (SnapKV, StreamingLLM,
ChunkKV, PyramidKV, Q-Filters): one prefill, a score per position, the top ``budget_for(n, ratio)``
positions gathered into a smaller real KV cache.
``budget_rounding`` (every selection config) picks that budget: ``"ceil"`` (default,
``ceil(n / ratio)``) or ``"kvpress"`` (``int(n * (1 - compression_ratio))`` with
``compression_ratio = 1 - 1 / ratio``, as kvpress's presses; one slot less when ``n / ratio`` is not
whole). ``scripts/kvpress_parity`` checks the kept positions against kvpress 0.5.5.
The helpers (window scores, pooling, window protection, top-k, padded stacking) are shared by EHPC and
Selective Context too.

The context a method receives is the beginning of a conversation (the chat template's prefix, then the
context, see ``compressors.conversation``); selection methods score those template tokens like any other
position (as kvpress does), so they keep them only when they score high enough (StreamingLLM always
keeps them as its sink tokens).
"""


from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from ..attention import QueryCapture
from ..base import Compressor, CompressorConfig
from ..compat import cache_of
from ..memory import Memory, kv_tensors

KEEP_SCORE = 1.0e4  # score given to always-kept positions (attention scores are <= 1)


BUDGET_ROUNDINGS = ("ceil", "kvpress")


def check_budget_rounding(rounding: str) -> None:
    if rounding not in BUDGET_ROUNDINGS:
        raise ValueError(f"budget_rounding must be one of {BUDGET_ROUNDINGS}, got {rounding!r}")


def keep_fraction(ratio: float) -> float:
    """kvpress's kept fraction ``1 - compression_ratio`` for ``compression_ratio = 1 - 1 / ratio``
    (computed that way, so the float is the one kvpress multiplies by)."""
    return 1 - (1 - 1 / ratio)


def budget_for(length: int, ratio: float, rounding: str = "ceil") -> int:
    """Slots kept from ``length`` tokens at ``ratio``, at least 1 and at most ``length``:
    ``ceil(length / ratio)`` (``rounding="ceil"``) or kvpress's ``int(length * (1 - compression_ratio))``
    (``rounding="kvpress"``)."""
    check_budget_rounding(rounding)
    if rounding == "kvpress":
        return min(length, max(1, int(length * keep_fraction(ratio))))
    return min(length, max(1, math.ceil(length / ratio)))


@dataclass
class KVSelectionConfig(CompressorConfig):
    ratio: float = 4.0
    window: int = 32  # observation window: the last ``window`` context tokens score the rest
    kernel_size: int = 5  # pooling width along the sequence (1 = no pooling)
    pooling: str = "max"  # "max" (SnapKV reference) or "avg" (kvpress)
    budget_rounding: str = "ceil"  # "ceil": ceil(n / ratio) slots; "kvpress": int(n * (1 - compression_ratio))

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {self.ratio}")
        if self.window < 1 or self.kernel_size < 1:
            raise ValueError("window and kernel_size must be >= 1")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        check_budget_rounding(self.budget_rounding)


@dataclass
class ContextPrefill:
    """One full prefill of ONE context row (no padding), reusable by every selection method."""

    ids: torch.Tensor  # [1, n]
    kv: dict[str, torch.Tensor]  # key.{i} / value.{i}: [1, kv_heads, n, head_dim]
    queries: dict[int, torch.Tensor]  # per layer: rotated queries of the last ``window`` positions
    window: int
    token_nll: list[float] | None  # -log p(x_t | x_<t) per token (the first is +inf); None if not asked
    seconds: float  # wall time of the prefill

    @property
    def length(self) -> int:
        return self.ids.shape[1]


@torch.no_grad()
def prefill_context(model: Any, ids: torch.Tensor, window: int = 0, token_nll: bool = False,
                    chunk: int = 512) -> ContextPrefill:
    """Prefill ``ids`` ``[1, n]`` once: its KV cache (exactly what ``prefill_kv`` returns), the queries
    of the last ``window`` positions per layer (0: none), and, if asked, each token's
    self-information (the LM head is applied in chunks, so the ``[n, vocab]`` logits never exist)."""
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"prefill_context takes one non-empty row [1, n], got shape {tuple(ids.shape)}")
    start = time.perf_counter()
    position_ids = torch.arange(ids.shape[1], device=ids.device)[None]
    catcher = QueryCapture(model, window) if window > 0 else None
    with catcher or contextlib.nullcontext():
        out = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=position_ids,
                          use_cache=True)
    kv = kv_tensors(cache_of(out))
    nll = None
    if token_nll:
        hidden, values = out.last_hidden_state[0, :-1], [math.inf]
        for at in range(0, hidden.shape[0], chunk):
            logits = model.lm_head(hidden[at:at + chunk]).float()
            values += F.cross_entropy(logits, ids[0, at + 1:at + 1 + chunk], reduction="none").tolist()
        nll = values
    return ContextPrefill(ids=ids, kv=kv, queries=dict(catcher.queries) if catcher else {}, window=window,
                          token_nll=nll, seconds=time.perf_counter() - start)


def window_scores(queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean attention of the window's queries on every position: ``[batch, kv_heads, n]`` (fp32).

    ``queries`` ``[B, Hq, w, D]`` are the last ``w`` positions; ``mask`` ``[B, n]`` marks real
    tokens (left padding). Query heads of one KV group are averaged.
    """
    b, hq, w, d = queries.shape
    hkv, n = keys.shape[1], keys.shape[2]
    q = queries.float().view(b, hkv, hq // hkv, w, d)
    logits = torch.einsum("bhgwd,bhnd->bhgwn", q, keys.float()) / math.sqrt(d)
    pos = torch.arange(n, device=keys.device)
    qpos = torch.arange(n - w, n, device=keys.device)
    allowed = (pos[None, :] <= qpos[:, None])[None, None, None] & mask.bool()[:, None, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    qmask = mask[:, n - w:].float()[:, None, None, :, None]  # pad queries (short rows) do not vote
    probs = torch.nan_to_num(probs) * qmask
    return probs.sum(dim=(2, 3)) / (qmask.sum(dim=(3,)).clamp(min=1) * (hq // hkv)).view(b, 1, 1)


def pool(scores: torch.Tensor, kernel_size: int, kind: str, window: int = 0) -> torch.Tensor:
    """Pool ``scores`` ``[B, H, n]`` along the sequence, all but the last ``window`` positions: the window's
    own scores (always kept anyway) must not leak into the positions just before it (kvpress pools the
    pre-window scores alone too, with the same edge padding)."""
    if kernel_size <= 1:
        return scores
    if window > 0:
        cut = max(0, scores.shape[-1] - window)
        return torch.cat([pool(scores[..., :cut], kernel_size, kind), scores[..., cut:]], dim=-1)
    b, h, n = scores.shape
    if n == 0:
        return scores
    flat = scores.reshape(b * h, 1, n)
    pad = kernel_size // 2
    if kind == "max":
        out = F.max_pool1d(F.pad(flat, (pad, kernel_size - 1 - pad), value=float("-inf")), kernel_size, stride=1)
    else:
        out = F.avg_pool1d(F.pad(flat, (pad, kernel_size - 1 - pad), value=0.0), kernel_size, stride=1)
    return out.view(b, h, n)


def protect_window(scores: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """Give the last ``window`` real positions the highest scores (most recent highest) and pads -inf."""
    n = scores.shape[-1]
    pos = torch.arange(n, device=scores.device, dtype=scores.dtype)
    in_window = pos >= n - window
    boosted = torch.where(in_window, KEEP_SCORE + pos / n, scores)
    return boosted.masked_fill(~mask.bool()[:, None, :], float("-inf"))


def keep_template(scores: torch.Tensor, template_tokens: int) -> torch.Tensor:
    """``scores`` ``[..., n]`` with the chat template's prefix (the first ``template_tokens`` positions) above
    everything else: a method that re-encodes its kept tokens as a plain context must keep the user turn the
    context sits in, or the instruct model reads the kept text as unrelated (as truncation keeps it)."""
    if template_tokens <= 0:
        return scores
    scores = scores.clone()
    scores[..., :template_tokens] = 2 * KEEP_SCORE
    return scores


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best positions along the last axis, in increasing position order."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def gather_positions(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor`` ``[B, H, n, D]`` at ``index`` ``[B, H, k]`` -> ``[B, H, k, D]``."""
    return tensor.gather(2, index[..., None].expand(-1, -1, -1, tensor.shape[-1]))


def stack_padded(memories: list[Memory]) -> Memory:
    """Join batch-1 kv memories of different slot counts: shorter rows are left-padded with
    zero slots that ``slot_mask`` hides from the decoder (``meta['layer_slots']`` rows are joined)."""
    if len(memories) == 1:
        return memories[0]
    slots = max(m.slots for m in memories)
    padded = []
    for m in memories:
        extra = slots - m.slots
        tensors = {}
        for name, t in m.tensors.items():
            if name == "slot_mask":
                continue
            tensors[name] = F.pad(t, (0, 0, extra, 0)) if extra else t
        old = m.tensors.get("slot_mask")
        old = torch.ones(1, m.slots, dtype=torch.int8, device=m.tensors["key.0"].device) if old is None else old
        tensors["slot_mask"] = F.pad(old.to(torch.int8), (extra, 0))
        padded.append(m._replace(tensors=tensors, slots=slots))
    joined = Memory.stack(padded)
    if "layer_slots" in memories[0].meta:
        joined.meta["layer_slots"] = [row for m in memories for row in m.meta["layer_slots"]]
    joined.meta["real_slots"] = [s for m in memories for s in m.meta.get("real_slots", [m.slots])]
    return joined


class PrefillSelection(Compressor):
    """A training-free method whose memories come from ONE full prefill of the context (``ContextPrefill``):
    its whole KV (the full context), a per-head selection of it (``KVSelection``), or the kept tokens
    re-encoded (Selective Context, EHPC).

    Being one says three things the eval runner relies on: ``compress_from`` makes the memories at any
    number of ratios from a prefill made by someone else (the runner prefills each sample ONCE for every such
    method, holding ``prefill_needs()``); ``compress_ratios`` makes them from one pass of its own; and
    ``prefill_is_own_cost`` says whether a full prefill + ``compress_from`` is exactly what the method runs
    alone (then the time of a memory made from a shared prefill is the prefill's plus the selection's). A
    subclass implements ``prefill_needs`` and ``compress_from``; ``compress_ratios`` defaults to a prefill of
    each context row of its own, then ``compress_from``.
    """

    #: A full prefill + ``compress_from`` is the method's own path (False: its own pass differs, e.g. EHPC's
    #: early exit, so the runner times it alone on the timed samples).
    prefill_is_own_cost: ClassVar[bool] = True

    def prefill_needs(self) -> tuple[int, bool]:
        """(observation window, whether token self-information is needed) of a prefill ``compress_from`` takes."""
        raise NotImplementedError

    def compress_from(self, prefill: ContextPrefill, ratios: list[float]) -> list[Memory]:
        """Memories at ``ratios`` from ``prefill`` (made by ``prefill_context`` with at least ``prefill_needs()``)."""
        raise NotImplementedError

    @torch.no_grad()
    def compress_ratios(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        ratios: list[float]) -> list[Memory]:
        """Memories at several ratios from ONE prefill (and one scoring pass) of each context row."""
        for ratio in ratios:
            if ratio < 1:
                raise ValueError(f"ratio must be >= 1, got {ratio}")
        mask = self.check_context(context_ids, attention_mask)
        window, token_nll = self.prefill_needs()
        rows = []
        for row in range(context_ids.shape[0]):  # rows have their own length, hence their own budget
            ids = context_ids[row:row + 1, mask[row].bool()]
            rows.append(self.compress_from(prefill_context(self.base_lm, ids, window, token_nll), ratios))
        return [stack_padded([r[i] for r in rows]) for i in range(len(ratios))]


class KVSelection(PrefillSelection):
    """Base of the KV-eviction baselines: one prefill, then per-layer, per-head kept positions.

    Subclasses implement ``layer_indices(layer, scores, budget) -> [B, Hkv, budget]`` (sorted
    positions in the padded context; each row of a batch gets its own budget, so batches are
    processed row by row) and say whether they need attention scores (``needs_scores``).
    """

    config_class = KVSelectionConfig
    memory_kind = "kv"
    needs_scores = True

    @torch.no_grad()
    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
        return self.compress_ratios(context_ids, attention_mask, [self.compressor_config.ratio])[0]

    def prefill_needs(self) -> tuple[int, bool]:
        """(observation window, whether token self-information is needed) of a shared prefill."""
        return (self.compressor_config.window if self.needs_scores else 0), False

    @torch.no_grad()
    def compress_from(self, prefill: ContextPrefill, ratios: list[float]) -> list[Memory]:
        """Memories at ``ratios`` from a prefill made by ``prefill_context`` (with at least
        ``prefill_needs()``): the selection only, no forward pass of the model."""
        n, kv, scores = prefill.length, prefill.kv, None
        if self.needs_scores:
            window = self.compressor_config.window
            if prefill.window < min(window, n):
                raise ValueError(f"{self.compressor_type} needs a prefill with window >= {window}, "
                                 f"got {prefill.window}")
            mask = torch.ones_like(prefill.ids)
            layers = self.base_lm.config.num_hidden_layers
            scores = [self.score_layer(prefill.queries[i][:, :, -window:], kv[f"key.{i}"], mask)
                      for i in range(layers)]
        return [self.select(kv, scores, n, ratio) for ratio in ratios]

    def score_layer(self, queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cfg = self.compressor_config
        scores = pool(window_scores(queries, keys, mask), cfg.kernel_size, cfg.pooling, window=cfg.window)
        return protect_window(scores, mask, cfg.window)

    def budget(self, n: int, ratio: float) -> int:
        """Slots kept from ``n`` context tokens at ``ratio`` (``budget_rounding`` of the config)."""
        return budget_for(n, ratio, self.compressor_config.budget_rounding)

    def select(self, kv: dict[str, torch.Tensor], scores: list[torch.Tensor] | None, n: int,
               ratio: float) -> Memory:
        budget = self.budget(n, ratio)
        tensors: dict[str, torch.Tensor] = {}
        layers = self.base_lm.config.num_hidden_layers
        for layer in range(layers):
            key, value = kv[f"key.{layer}"], kv[f"value.{layer}"]
            if budget == n:  # ratio 1 (or tiny contexts): the whole cache, untouched
                tensors[f"key.{layer}"], tensors[f"value.{layer}"] = key, value
                continue
            index = self.layer_indices(layer, None if scores is None else scores[layer], key, budget)
            tensors[f"key.{layer}"] = gather_positions(key, index)
            tensors[f"value.{layer}"] = gather_positions(value, index)
        return self.new_memory(tensors, source_tokens=[n], slots=budget, position_offset=[n],
                               meta={"ratio_requested": ratio, "real_slots": [budget]})

    def layer_indices(self, layer: int, scores: torch.Tensor | None, key: torch.Tensor,
                      budget: int) -> torch.Tensor:
        raise NotImplementedError
