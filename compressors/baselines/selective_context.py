"""Selective Context: drop the context units the model finds least informative, re-encode the rest.

Paper: "Compressing Context to Enhance Inference Efficiency of Large Language Models", Li et al.
2023 (EMNLP), https://arxiv.org/abs/2310.06201

What it does here: one forward pass of the base LM over the context gives each token's
self-information ``-log p(x_t | x_<t)`` (the first token gets +inf: it is always kept). Tokens are
grouped into word units (a unit starts at a token whose text begins with white space or
punctuation); a unit's self-information is the sum over its tokens. Units are kept in
decreasing self-information while they fit in the budget ``ceil(n / ratio)`` tokens (the chat template's prefix, ``Compressor.template_tokens``, always
first, as truncation keeps it: the kept text is re-read as the user turn's content, and without the
turn's opening the instruct model reads it as unrelated text); leftover room
is filled with the most informative single tokens of the dropped units, so exactly the budget is
kept. The kept tokens, in their original order, are re-encoded on their own (positions
``0..budget-1``, like truncation), and their KV cache is the memory. One scoring pass serves every
ratio (``compress_ratios``); only the re-encoding depends on the ratio. Word units need the
token texts: call ``use_tokenizer(tokenizer)`` (the eval runner does); without it each token is a unit.

Faithful: self-information from a causal LM, unit-level filtering, the kept text read as a
plain shorter context. Not faithful: units are words, not spaCy noun phrases / sentences; the
paper drops units below a self-information percentile (a variable token count), here the token
budget is exact; the scoring model is the base model itself (the paper uses a small LM,
which this also is at 135M). Ratio 1 keeps every token, i.e. exactly the full context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..base import CompressorConfig, register_compressor
from ..memory import Memory
from .full_context import prefill_kv
from .selection import ContextPrefill, PrefillSelection, budget_for, keep_template, prefill_context


@dataclass
class SelectiveContextConfig(CompressorConfig):
    ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {self.ratio}")


def word_units(pieces: list[str]) -> list[list[int]]:
    """Group token indices into word units from the tokens' text."""
    units: list[list[int]] = []
    for i, piece in enumerate(pieces):
        starts = not units or (piece[:1].isspace() or (piece[:1] and not piece[:1].isalnum()))
        if starts:
            units.append([i])
        else:
            units[-1].append(i)
    return units


def select_units(info: list[float], units: list[list[int]], budget: int) -> list[int]:
    """Kept token indices (sorted): whole units by decreasing self-information, then single tokens."""
    kept: set[int] = set()
    for unit in sorted(units, key=lambda u: -sum(info[i] for i in u)):
        if len(kept) + len(unit) <= budget:
            kept.update(unit)
        if len(kept) == budget:
            break
    if len(kept) < budget:
        rest = sorted((i for i in range(len(info)) if i not in kept), key=lambda i: -info[i])
        kept.update(rest[:budget - len(kept)])
    return sorted(kept)


@register_compressor
class SelectiveContext(PrefillSelection):
    compressor_type = "selective_context"
    config_class = SelectiveContextConfig
    memory_kind = "kv"

    @torch.no_grad()
    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
        return self.compress_ratios(context_ids, attention_mask, [self.compressor_config.ratio])[0]

    tokenizer_pieces = None  # set by ``use_tokenizer``; without it every token is its own unit

    def use_tokenizer(self, tokenizer: Any, use_chat_template: bool = True) -> SelectiveContext:
        """Give the compressor the token texts it needs to form word units (CompressedLM and the eval runner do)."""
        super().use_tokenizer(tokenizer, use_chat_template)
        self.tokenizer_pieces = lambda ids: [tokenizer.decode([i]) for i in ids]
        return self

    @torch.no_grad()
    def self_information(self, ids: torch.Tensor) -> list[float]:
        return prefill_context(self.base_lm, ids, token_nll=True).token_nll

    def prefill_needs(self) -> tuple[int, bool]:
        return 0, True

    @torch.no_grad()
    def compress_from(self, prefill: ContextPrefill, ratios: list[float]) -> list[Memory]:
        """Memories at ``ratios`` from a shared prefill that computed the token self-information."""
        if prefill.token_nll is None:
            raise ValueError("selective_context needs a prefill made with token_nll=True")
        ids, n, info = prefill.ids, prefill.length, prefill.token_nll
        pieces = self.tokenizer_pieces(ids[0].tolist()) if self.tokenizer_pieces else [" "] * n
        units = word_units(pieces)
        # the chat template's prefix is always kept (the kept text is re-read as the user turn's content)
        info = keep_template(torch.tensor(info), self.template_tokens).tolist()
        memories = []
        for ratio in ratios:
            budget = budget_for(n, ratio)
            sub = ids[:, select_units(info, units, budget)]
            memories.append(self.new_memory(prefill_kv(self, sub, torch.ones_like(sub)), source_tokens=[n],
                                            slots=budget, position_offset=[budget],
                                            meta={"ratio_requested": ratio, "real_slots": [budget]}))
        return memories
