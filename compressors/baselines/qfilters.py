"""Q-Filters: keep, per KV head, the keys with the largest projection on a fixed query direction.

Paper: "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression", Godey et al.
2025, https://arxiv.org/abs/2503.02812 (kvpress ships it as ``QFilterPress`` with filters
downloaded from the Hub; here they are computed locally).

Calibration (once per base model, ``compute_qfilters``): the base model reads calibration text
(default: the ``pydoc_data`` topics, ``calibration_tokens`` tokens in chunks of
``calibration_seq_len``); every layer's queries are caught where the layer attends with them
(``attention.QueryCapture``, an ``AttentionInterface`` function: the rotated queries attention really
uses, after any q-norm, from a ``q_proj`` or a fused ``qkv_proj`` alike). For
each layer and KV head, the queries of its GQA group are pooled and the first right singular
vector ``u`` of that (uncentred) query matrix is taken (the top eigenvector of ``Q^T Q``); its sign
is fixed so that the queries project positively on average (``mean <q, u> > 0``). The filters
``[layers, kv_heads, head_dim]`` are saved as a safetensors artifact (``calibration.py``) under
``$CTXZIP_HOME/calibration/qfilters/`` keyed by the base model (name, shape signature, weight
fingerprint), the tokenizer and the calibration settings, or at ``filters_path`` when given
(computed there when the file does not exist). Filters made for a model of another shape are
refused with ``BaseModelMismatchError``.

Compression: one full prefill of the context; each key is scored by ``<k, u>`` for its layer and
KV head (the paper's estimate of the mean attention logit the key will receive, since
``E_q <q, k> ~ E<q, u> <k, u>`` for anisotropic queries); the top ``budget_for(n, ratio)`` positions per
KV head are gathered into a smaller, real KV cache, keeping their original rotary positions
(the decoder continues at ``n``). No attention scores are needed, so one prefill serves every
ratio (``compress_ratios``). Ratio 1 keeps every position, i.e. exactly the full KV cache.

Faithful: SVD of calibration queries per head, positive-sign convention, context-agnostic
scoring of keys by their projection, top-k per KV head, no attention maps.
Not faithful / differences: the paper computes filters per query head and averages them for
GQA; here one SVD per KV head over its group's pooled queries. The calibration corpus is small
(default 8k tokens of Python documentation vs. the paper's Pile samples; the paper reports
robustness to the calibration data). The paper compresses while generating (streaming
eviction); here compression is a one-time top-k after the prefill (as kvpress's
``QFilterPress``). The budget is a ratio of the context, not a token count. ``window`` (default 0,
as the paper) optionally protects the most recent tokens. kvpress scores ``-<k, f>`` with
the Hub filters' own sign convention; with the sign fixed as above, ``+<k, u>`` is the estimate
of the attention logit. The two are the same ranking for ``u = -f``: kvpress 0.5.5's
``QFilterPress`` is matched exactly (``scripts/kvpress_parity``) by giving its filters ``f`` as
``filters_path`` (a ``calibration.save_artifact`` file) with ``filters_convention="kvpress"`` (keys
scored ``-<k, f>``), or ``-f`` with the default convention, and ``budget_rounding="kvpress"``. Checked on SmolLM2-135M-Instruct (filters from 2k calibration tokens,
``expected_logit_correlation`` on 300 other tokens): the per-head correlation between ``<k, u>``
and the mean logit a key receives is positive in all 30 layers (0.15 to 0.96, median 0.85).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import QueryCapture
from ..base import CompressorConfig, register_compressor
from ..compat import cache_of
from .calibration import calibration_ids, get_tokenizer, load_or_compute
from .selection import KVSelection, check_budget_rounding, protect_window, topk_sorted

KIND = "qfilters"


@dataclass
class QFiltersConfig(CompressorConfig):
    ratio: float = 4.0
    window: int = 0  # most recent positions always kept (0 = none, as the paper)
    filters_path: str | None = None  # explicit artifact file (computed there if missing)
    calibration_tokens: int = 8192
    calibration_seq_len: int = 1024
    budget_rounding: str = "ceil"  # "ceil": ceil(n / ratio) slots; "kvpress": int(n * (1 - compression_ratio))
    # "ctxzip": filters point where the queries do, keys scored +<k, u> (what compute_qfilters makes);
    # "kvpress": filters in kvpress's / the Hub's sign convention, keys scored -<k, f>
    filters_convention: str = "ctxzip"

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {self.ratio}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        check_budget_rounding(self.budget_rounding)
        if self.filters_convention not in ("ctxzip", "kvpress"):
            raise ValueError(f"filters_convention must be 'ctxzip' or 'kvpress', got {self.filters_convention!r}")
        if self.calibration_tokens < 1 or self.calibration_seq_len < 1:
            raise ValueError("calibration_tokens and calibration_seq_len must be >= 1")

    def calibration_settings(self) -> dict[str, Any]:
        return {"corpus": "pydoc_data.topics", "tokens": self.calibration_tokens,
                "seq_len": self.calibration_seq_len}


@torch.no_grad()
def compute_qfilters(model: Any, token_ids: list[int], seq_len: int = 1024) -> torch.Tensor:
    """Q-Filters of ``model`` from calibration tokens: ``[layers, kv_heads, head_dim]`` (fp32).

    ``token_ids`` is read in chunks of ``seq_len`` (a last, shorter chunk included).
    """
    if not token_ids:
        raise ValueError("no calibration tokens")
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads)
    device = next(model.parameters()).device
    gram: torch.Tensor | None = None
    total: torch.Tensor | None = None
    for start in range(0, len(token_ids), seq_len):
        chunk = torch.tensor([token_ids[start:start + seq_len]], device=device)
        with QueryCapture(model, chunk.shape[1]) as catcher:
            model.model(input_ids=chunk, use_cache=False)
        for layer in range(layers):
            q = catcher.queries[layer][0].float()  # [Hq, w, D]
            q = q.reshape(kv_heads, -1, q.shape[-1])  # the queries of each GQA group, pooled
            if gram is None:
                d = q.shape[-1]
                gram = torch.zeros(layers, kv_heads, d, d, device=device)
                total = torch.zeros(layers, kv_heads, d, device=device)
            gram[layer] += q.transpose(1, 2) @ q
            total[layer] += q.sum(1)
    assert gram is not None and total is not None
    # the top eigenvector of Q^T Q is the first right singular vector of Q
    _, vectors = torch.linalg.eigh(gram.double())
    filters = vectors[..., -1].float()  # [L, Hkv, D]
    sign = torch.sign((filters * total).sum(-1, keepdim=True))
    return (filters * torch.where(sign == 0, torch.ones_like(sign), sign)).cpu()


def calibration_tokens(tokenizer: Any, count: int) -> list[int]:
    return calibration_ids(tokenizer)[:count]


@register_compressor
class QFilters(KVSelection):
    compressor_type = "qfilters"
    config_class = QFiltersConfig
    needs_scores = False
    # ``tokenizer`` (from ``use_tokenizer``) reads the calibration text; without it, the base model's name's

    def prepare(self) -> torch.Tensor:
        """Load the filters for this base model (computing and saving them on first use); once: a second call
        returns them without reading the artifact again."""
        if getattr(self, "_filters", None) is not None:
            return self._filters
        cfg = self.compressor_config

        def compute() -> dict[str, torch.Tensor]:
            ids = calibration_tokens(get_tokenizer(self), cfg.calibration_tokens)
            return {"filters": compute_qfilters(self.base_lm, ids, cfg.calibration_seq_len)}

        tensors, self.filters_file = load_or_compute(KIND, self, cfg.filters_path, cfg.calibration_settings(),
                                                     compute)
        filters = tensors.get("filters")
        sig = self.base_signature
        expected = (sig["num_hidden_layers"], sig["num_key_value_heads"], sig["head_dim"])
        if filters is None or tuple(filters.shape) != expected:
            raise ValueError(f"{self.filters_file}: filters of shape "
                             f"{None if filters is None else tuple(filters.shape)}, expected {expected}")
        self._filters = filters
        return filters

    @property
    def filters(self) -> torch.Tensor:
        if getattr(self, "_filters", None) is None:
            self.prepare()
        return self._filters

    def key_scores(self, layer: int, key: torch.Tensor) -> torch.Tensor:
        """``<k, u>`` per position (``-<k, f>`` with ``filters_convention="kvpress"``): ``[B, kv_heads, n]`` (fp32)."""
        u = self.filters[layer].to(key.device).float()
        if self.compressor_config.filters_convention == "kvpress":
            u = -u
        return torch.einsum("bhnd,hd->bhn", key.float(), u)

    def layer_indices(self, layer: int, scores: torch.Tensor | None, key: torch.Tensor,
                      budget: int) -> torch.Tensor:
        s = self.key_scores(layer, key)
        window = self.compressor_config.window
        if window:
            s = protect_window(s, torch.ones(s.shape[0], s.shape[-1], device=s.device), min(window, budget))
        return topk_sorted(s, budget)


def expected_logit_correlation(model: Any, filters: torch.Tensor, token_ids: list[int]) -> list[float]:
    """Per layer: correlation between ``<k, u>`` and the mean causal attention logit each key gets.

    A diagnostic for the filters' sign (it should be positive): the mean over the later queries
    of ``<q, k> / sqrt(d)`` against the key's projection on the filter, per query head, averaged
    over the heads.
    """
    ids = torch.tensor([token_ids], device=next(model.parameters()).device)
    n = ids.shape[1]
    with torch.no_grad(), QueryCapture(model, n) as catcher:
        out = model(input_ids=ids, use_cache=True)
    result = []
    for layer in range(model.config.num_hidden_layers):
        q = catcher.queries[layer][0].float()  # [Hq, n, D]
        k = cache_of(out).layers[layer].keys[0].float()  # [Hkv, n, D]
        k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
        logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # [Hq, n(query), n(key)]
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        mean_logit = (logits * causal).sum(1) / causal.sum(0)  # mean over the queries that see each key
        proj = torch.einsum("hnd,hd->hn", k, filters[layer].to(k.device).repeat_interleave(
            q.shape[0] // filters.shape[1], 0))
        keep = slice(0, n // 2)  # keys seen by at least half the queries
        per_head = [torch.corrcoef(torch.stack([proj[h, keep], mean_logit[h, keep]]))[0, 1]
                    for h in range(proj.shape[0])]
        result.append(float(torch.stack(per_head).nanmean()))
    return result
