"""EHPC: evaluator heads found on a retrieval probe choose the context tokens to keep.

Paper: "Efficient Prompt Compression with Evaluator Heads for Long-Context Transformer
Inference", Fei et al. 2025 (NeurIPS 2025), https://arxiv.org/abs/2501.12959

Finding the evaluator heads (once per base model, ``find_evaluator_heads``): a synthetic
pass-key probe is built at the token level (``probe_samples`` contexts of ``probe_tokens``
tokens of ``pydoc_data`` filler, a pass-key needle at evenly spread depths, and the question
"What is the pass key? The pass key is" at the end; ``compressors`` must not import ``data``, so
the probe is built here, with its own template and keys). The base model reads each probe; for
every layer and query head, the exact attention of the question's queries (recomputed from the
caught hidden states, fp32 softmax) is averaged over the question, and the mass that falls on
the needle tokens is that head's score, averaged over the probes. The score matrix
``[layers, heads]`` is saved as a safetensors artifact (``calibration.py``) under
``$CTXZIP_HOME/calibration/ehpc/`` keyed by the base model, tokenizer and probe settings, or at
``heads_path`` (computed there when missing); an artifact made for a model of another shape is
refused with ``BaseModelMismatchError``. The evaluator heads are then, as in the paper, the
``num_heads`` best heads of the single best layer (the layer whose best ``num_heads`` heads score
highest, among the first ``search_layers`` fraction of layers).

Compressing: the base model reads the context only up to the evaluator layer (the forward
pass stops there: the paper's "skim with the first few layers"); the evaluator heads' attention
of the observation window (the last ``window`` context tokens, or the question when
``compress(..., query_ids=...)`` gets one) over the context is averaged over the window and the
heads, pooled along the sequence (``pooling``/``kernel_size``), and the top ``ceil(n / ratio)``
tokens are kept (without a question, the window itself is always kept, most recent first).
The chat template's prefix at the start of the context (``Compressor.template_tokens``) is always kept,
as truncation keeps it: the kept tokens are re-read as the user turn's content, and without the turn's
opening the instruct model treats them as unrelated text. Token level, then re-encoding: the kept
tokens, in their original order, are read by the full
model as a plain shorter context (positions ``0..budget-1``, like truncation and Selective
Context), and their KV cache is the memory. The paper's prompt-compression mode does exactly
this (the compressed prompt goes to the LLM); its KV variant (keeping the selected KV) is not
implemented. One scoring pass serves every ratio (``compress_ratios``); only the re-encoding
depends on the ratio. Ratio 1 keeps every token and skips the scoring: exactly the full context.

Faithful: evaluator heads chosen by attention on a synthetic needle probe, heads of one layer,
early-exit scoring pass, window-to-context attention scores with pooling, token-level selection
re-read by the LLM. Not faithful: the probe is small (default 8 probes of 1k tokens, one needle
template, pydoc filler) rather than the paper's needle-in-a-haystack suite at long lengths; the
probe task is close to this repository's passkey task (heads are found on other keys, fillers
and a different template, but the evaluation is favourable to EHPC on retrieval); the budget is
an exact token count ``ceil(n / ratio)`` rather than a rate of the prompt; without a question
the observation window is the end of the context (one memory serves many prompts; the eval
runner passes no question), so EHPC is then question-agnostic (and the runner scores it from its
shared prefill, which holds the same evaluator-layer queries and keys; the memories are the same); the pooling kernel is SnapKV's
default, not a value from the paper.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import QueryCapture
from ..base import CompressorConfig, register_compressor
from ..compat import cache_of, with_cache
from ..memory import Memory
from .calibration import calibration_ids, get_tokenizer, load_or_compute
from .full_context import prefill_kv
from .selection import (
    ContextPrefill,
    PrefillSelection,
    budget_for,
    keep_template,
    pool,
    protect_window,
    stack_padded,
    topk_sorted,
    window_scores,
)

KIND = "ehpc"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class EHPCConfig(CompressorConfig):
    ratio: float = 4.0
    num_heads: int = 8  # evaluator heads (of one layer; capped by the heads per layer)
    search_layers: float = 1.0  # fraction of the layers, from the bottom, where heads are searched
    window: int = 32  # observation window when no question is given
    kernel_size: int = 5
    pooling: str = "max"
    heads_path: str | None = None  # explicit artifact file (computed there if missing)
    probe_samples: int = 8
    probe_tokens: int = 1024
    probe_seed: int = 0

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {self.ratio}")
        if self.num_heads < 1 or self.window < 1 or self.kernel_size < 1:
            raise ValueError("num_heads, window and kernel_size must be >= 1")
        if not 0 < self.search_layers <= 1:
            raise ValueError(f"search_layers must be in (0, 1], got {self.search_layers}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        if self.probe_samples < 1 or self.probe_tokens < 64:
            raise ValueError("probe_samples must be >= 1 and probe_tokens >= 64")

    def probe_settings(self) -> dict[str, Any]:
        return {"corpus": "pydoc_data.topics", "samples": self.probe_samples, "tokens": self.probe_tokens,
                "seed": self.probe_seed, "needle": NEEDLE, "question": QUESTION}


def build_probes(tokenizer: Any, samples: int, tokens: int, seed: int = 0) -> list[dict[str, Any]]:
    """Pass-key probes: ``ids`` (``tokens`` long), the needle span and the question length."""
    corpus = calibration_ids(tokenizer)
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    probes = []
    for index in range(samples):
        rng = random.Random(f"ctxzip/ehpc/{seed}/{index}")
        key = rng.randrange(10000, 100000)
        needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
        filler = tokens - len(needle) - len(question)
        if filler < 1 or filler > len(corpus):
            raise ValueError(f"probe_tokens={tokens} cannot hold the needle and question of the probe")
        start = rng.randrange(len(corpus) - filler + 1)
        text = corpus[start:start + filler]
        at = int((index + 0.5) / samples * filler)  # depths spread evenly
        probes.append({"ids": text[:at] + needle + text[at:] + question, "needle": (at, at + len(needle)),
                       "question": len(question)})
    return probes


@torch.no_grad()
def find_evaluator_heads(model: Any, probes: list[dict[str, Any]]) -> torch.Tensor:
    """Per layer and query head, the question's mean attention mass on the needle: ``[L, Hq]``."""
    config = model.config
    device = next(model.parameters()).device
    scores = torch.zeros(config.num_hidden_layers, config.num_attention_heads)
    for probe in probes:
        ids = torch.tensor([probe["ids"]], device=device)
        with QueryCapture(model, probe["question"]) as catcher:
            out = model.model(input_ids=ids, use_cache=True)
        start, end = probe["needle"]
        for layer in range(config.num_hidden_layers):
            attn = head_attention(catcher.queries[layer], cache_of(out).layers[layer].keys)
            scores[layer] += attn[0, :, start:end].sum(-1).cpu()
    return scores / len(probes)


def head_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean attention of the window's queries per query head: ``[B, Hq, n]`` (fp32, causal)."""
    group = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1) if group > 1 else keys
    mask = torch.ones(keys.shape[0], keys.shape[2], device=keys.device)
    return window_scores(queries, keys, mask)


def evaluator_heads(scores: torch.Tensor, num_heads: int, search_layers: float) -> tuple[int, list[int]]:
    """The best layer (by the sum of its best ``num_heads`` head scores) and those heads."""
    layers, heads = scores.shape
    k = min(num_heads, heads)
    searched = max(1, math.ceil(search_layers * layers))
    best = scores[:searched].topk(k, dim=-1).values.sum(-1)
    layer = int(best.argmax())
    return layer, sorted(scores[layer].topk(k).indices.tolist())


class _Stop(Exception):
    """Raised by a forward hook to end the scoring pass after the evaluator layer."""


@register_compressor
class EHPC(PrefillSelection):
    compressor_type = "ehpc"
    config_class = EHPCConfig
    memory_kind = "kv"
    uses_query = True  # with query_ids, the evaluator heads score the context from the question
    # ``tokenizer`` (from ``use_tokenizer``) builds the probe; without it, the base model's name's is loaded

    def prepare(self) -> torch.Tensor:
        """Load the head scores for this base model (probing and saving them on first use); once: a second call
        returns them without reading the artifact again."""
        if getattr(self, "head_scores", None) is not None:
            return self.head_scores
        cfg = self.compressor_config

        def compute() -> dict[str, torch.Tensor]:
            probes = build_probes(get_tokenizer(self), cfg.probe_samples, cfg.probe_tokens, cfg.probe_seed)
            return {"head_scores": find_evaluator_heads(self.base_lm, probes)}

        tensors, self.heads_file = load_or_compute(KIND, self, cfg.heads_path, cfg.probe_settings(), compute)
        scores = tensors.get("head_scores")
        sig = self.base_signature
        expected = (sig["num_hidden_layers"], sig["num_attention_heads"])
        if scores is None or tuple(scores.shape) != expected:
            raise ValueError(f"{self.heads_file}: head scores of shape "
                             f"{None if scores is None else tuple(scores.shape)}, expected {expected}")
        self.head_scores = scores
        self.layer, self.heads = evaluator_heads(scores, cfg.num_heads, cfg.search_layers)
        return scores

    @property
    def evaluator(self) -> tuple[int, list[int]]:
        """``(layer, heads)`` of the evaluator heads."""
        if getattr(self, "head_scores", None) is None:
            self.prepare()
        return self.layer, self.heads

    @torch.no_grad()
    def token_scores(self, ids: torch.Tensor, query_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Score of every context token ``[n]`` from the evaluator heads (window kept if no query),
        from a forward pass that stops after the evaluator layer."""
        cfg = self.compressor_config
        layer, _ = self.evaluator
        n = ids.shape[1]
        full = ids if query_ids is None else torch.cat([ids, query_ids.to(ids.device)], dim=1)
        w = min(cfg.window, n) if query_ids is None else query_ids.shape[1]
        from transformers import DynamicCache

        cache = DynamicCache(config=self.base_lm.config)
        stop = self.base_lm.model.layers[layer].register_forward_hook(_raise_stop)
        try:
            with QueryCapture(self.base_lm, w) as catcher:
                self.base_lm.model(input_ids=full, use_cache=True, **with_cache(cache))
        except _Stop:
            pass
        finally:
            stop.remove()
        return self.scores_from(catcher.queries[layer], cache.layers[layer].keys, n, query_ids is None)

    def scores_from(self, queries: torch.Tensor, keys: torch.Tensor, n: int, protect: bool) -> torch.Tensor:
        """Token scores ``[n]`` from the evaluator layer's window queries ``[1, Hq, w, D]`` (all heads)
        and keys ``[1, Hkv, n + w', D]``."""
        cfg = self.compressor_config
        _, heads = self.evaluator
        group = self.base_lm.config.num_attention_heads // self.base_lm.config.num_key_value_heads
        keys = keys[:, [h // group for h in heads]]
        scores = head_attention(queries[:, heads], keys).mean(1, keepdim=True)[..., :n]  # [1, 1, n]
        scores = pool(scores, cfg.kernel_size, cfg.pooling, window=queries.shape[2] if protect else 0)
        if protect:
            scores = protect_window(scores, torch.ones(1, n, device=keys.device), queries.shape[2])
        return scores[0, 0]

    # A shared prefill holds more than EHPC's own early-exit pass computes, so the time of a
    # compression made from one is not EHPC's cost (the eval runner times EHPC alone instead).
    prefill_is_own_cost = False

    def prefill_needs(self) -> tuple[int, bool]:
        return self.compressor_config.window, False

    @torch.no_grad()
    def compress_from(self, prefill: ContextPrefill, ratios: list[float]) -> list[Memory]:
        """The memories ``compress_ratios`` makes without a question, scored from a shared
        ``ContextPrefill`` (the evaluator layer's queries and keys are in it) instead of an
        early-exit pass; only the re-encoding of the kept tokens runs the model."""
        n, window = prefill.length, min(self.compressor_config.window, prefill.length)
        if prefill.window < window:
            raise ValueError(f"ehpc needs a prefill with window >= {window}, got {prefill.window}")
        layer, _ = self.evaluator
        budgets = [budget_for(n, ratio) for ratio in ratios]
        scores = None
        if min(budgets) < n:
            scores = self.scores_from(prefill.queries[layer][:, :, -window:], prefill.kv[f"key.{layer}"], n, True)
        return [self.reencode(prefill.ids, scores, ratio, budget) for ratio, budget in zip(ratios, budgets)]

    def reencode(self, ids: torch.Tensor, scores: torch.Tensor | None, ratio: float, budget: int) -> Memory:
        """The KV of the ``budget`` best-scored tokens of ``ids`` ``[1, n]``, read as a plain context."""
        n = ids.shape[1]
        kept = ids if budget == n else ids[:, topk_sorted(keep_template(scores, self.template_tokens)[None], budget)[0]]
        return self.new_memory(prefill_kv(self, kept, torch.ones_like(kept)), source_tokens=[n], slots=budget,
                               position_offset=[budget], meta={"ratio_requested": ratio, "real_slots": [budget]})

    @torch.no_grad()
    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
        return self.compress_ratios(context_ids, attention_mask, [self.compressor_config.ratio],
                                    query_ids=query_ids)[0]

    @torch.no_grad()
    def compress_ratios(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        ratios: list[float], query_ids: torch.Tensor | None = None) -> list[Memory]:
        """Memories at several ratios from ONE scoring pass per context row."""
        if any(r < 1 for r in ratios):
            raise ValueError(f"ratio must be >= 1, got {ratios}")
        mask = self.check_context(context_ids, attention_mask)
        if query_ids is not None and query_ids.shape[0] not in (1, context_ids.shape[0]):
            raise ValueError(f"query_ids has {query_ids.shape[0]} rows, the contexts {context_ids.shape[0]}")
        per_row = []
        for row in range(context_ids.shape[0]):
            ids = context_ids[row:row + 1, mask[row].bool()]
            n = ids.shape[1]
            query = None if query_ids is None else query_ids[row:row + 1] if query_ids.shape[0] > 1 else query_ids
            budgets = [budget_for(n, ratio) for ratio in ratios]
            scores = self.token_scores(ids, query) if min(budgets) < n else None
            per_row.append([self.reencode(ids, scores, ratio, budget) for ratio, budget in zip(ratios, budgets)])
        return [stack_padded([r[i] for r in per_row]) for i in range(len(ratios))]


def _raise_stop(module: Any, args: Any, output: Any) -> None:
    raise _Stop
