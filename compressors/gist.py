"""Gist tokens: compress a context into the keys/values of a few learned gist positions.

Papers: Mu et al. 2023, "Learning to Compress Prompts with Gist Tokens" (arXiv 2304.08467);
Li et al. 2024, "500xCompressor" (arXiv 2408.03094); Ge et al. 2024, ICAE (arXiv 2307.06945); the two layout
options follow Zhang et al. 2024, "Long Context Compression with Activation Beacon" (arXiv 2401.03462).

How it works here: ``k`` learnable gist embeddings live in their own parameter table (the tied
vocabulary is never resized). A context is split into segments of ``segment_length`` tokens; each
segment is followed by ``ceil(len / tokens_per_gist)`` gists and encoded by the base model (with a
LoRA adapter when ``lora_r > 0``), while attending to the memory of the previous segments. The
per-layer keys/values at the gist positions are the ``kv`` Memory; the decoder reads them as a
``past_key_values`` prefix and continues from the position after the last gist.

In a conversation (``compressors.conversation``) the encoder reads the chat template's prefix and the
context together and compresses both: the decoder sees gists, then the rest of the user turn.

Faithful: KV-at-gist-positions memory (500xCompressor / the KV form of gisting), frozen decoder
with a LoRA encoder (ICAE, 500xCompressor), autoencoding + continuation + task SFT objectives.
Options: ``adapter_scope="gists"`` applies the LoRA at the gist positions only (the plain base reads the
segment, without gradients); ``gist_layout="interleaved"`` puts each gist at the position of the last token it
stands for, reading only up to there, so the memory keeps the context's positions (Activation Beacon's layout;
not faithful to it: the gists of a segment are computed after the segment in one pass, not interleaved in the
token stream, so context tokens never read the segment's own gists, and each gist has its own embedding).

``recent_tokens`` keeps the context's last tokens raw after the gists (Activation Beacon's recent window): the
decoder reads them through the gists of the text before them, and their keys/values join the memory; at equal bytes,
an 8x compressor with a raw window of about a seventh of the context makes a 4x memory that still holds the recent
text verbatim, which continuation needs. It can be set when loading (``config_overrides``) or evaluating
(``--learned_config recent_tokens=N``). ``train_recent_fraction`` trains with such a window, of a length drawn per
batch (up to that share of the context), so that the gists are also trained to be read with raw text after them.

Not faithful: gisting trains in one pass with a gist attention mask; here the encoder and the
decoder are two passes (mathematically the same attention pattern, but twice the prefill). The
segment-by-segment recurrence follows ICAE/AutoCompressor-style chunking rather than any one paper.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .adapters import LoraSettings, add_named_lora
from .base import Compressor, CompressorConfig, EncoderAdapter, register_compressor
from .compat import attn_implementation, cache_of, with_cache
from .memory import Memory
from .models import whole_parameters


@dataclass
class GistConfig(CompressorConfig, LoraSettings):
    """Hyper-parameters of the gist compressor."""

    tokens_per_gist: int = field(default=4, metadata={
        "help": "context tokens summarised by one gist token: sets the compression ratio"})
    segment_length: int = field(default=256, metadata={
        "help": "contexts are compressed segment by segment, this many tokens each"})
    lora_r: int = field(default=8, metadata={
        "help": "rank of the encoder's LoRA adapter, saved with the compressor (0 = train only the gist "
                "embeddings)"})
    lora_in_decoder: bool = field(default=False, metadata={
        "help": "keep the LoRA on while the decoder reads the memory (ICAE / 500xCompressor keep the decoder "
                "frozen: False)"})
    adapter_scope: str = field(default="all", metadata={
        "help": "where the encoder's LoRA adapter acts: all (every token of a segment and its gists) or gists "
                "(the gist positions only, Activation Beacon's beacon-only weights: the plain base model reads the "
                "context, so context tokens need no backward pass and training steps are cheaper)"})
    gist_layout: str = field(default="end", metadata={
        "help": "where a segment's gists sit: end (after the segment, at the next positions: every gist reads the "
                "whole segment) or interleaved (gist i at the position of the last of the tokens it stands for and "
                "reading only up to there, Activation Beacon's layout: the memory keeps the context's positions and "
                "the decoder continues right after the context; needs adapter_scope gists and sdpa/eager attention)"})
    init: str = field(default="vocab_mean", metadata={
        "help": "gist embedding initialization: vocab_mean (mean word embedding plus noise) or random"})
    recent_tokens: int = field(default=0, metadata={
        "help": "keep the context's last N tokens raw: their keys/values, read by the decoder through the gists of "
                "the text before them, follow the gists in the memory (Activation Beacon's raw recent window); the "
                "memory then holds gists for the first tokens and N raw slots, so its ratio falls. A setting of "
                "how a context is read, not of the weights: it can be changed when loading (config_overrides)"})
    train_recent_fraction: float = field(default=0.0, metadata={
        "help": "in training only: each batch keeps a raw recent window of a random length, drawn uniformly from 0 "
                "to this share of its context's length (Activation Beacon samples its ratios the same way), so "
                "that the gists learn to be read with raw text after them as well as without; in [0, 1). Reading "
                "(eval mode) always uses recent_tokens"})

    def __post_init__(self) -> None:
        if self.tokens_per_gist < 1:
            raise ValueError("tokens_per_gist must be >= 1")
        if self.segment_length < self.tokens_per_gist:
            raise ValueError("segment_length must be >= tokens_per_gist")
        if self.adapter_scope not in ("all", "gists"):
            raise ValueError(f"adapter_scope must be 'all' or 'gists', got {self.adapter_scope!r}")
        if self.gist_layout not in ("end", "interleaved"):
            raise ValueError(f"gist_layout must be 'end' or 'interleaved', got {self.gist_layout!r}")
        if self.gist_layout == "interleaved" and self.adapter_scope != "gists":
            raise ValueError("gist_layout 'interleaved' needs adapter_scope 'gists' (the segment is read first, "
                             "then each gist reads up to its own tokens)")
        if self.recent_tokens < 0:
            raise ValueError(f"recent_tokens must be >= 0, got {self.recent_tokens}")
        if not 0.0 <= self.train_recent_fraction < 1.0:
            raise ValueError(f"train_recent_fraction must be in [0, 1), got {self.train_recent_fraction}")
        if self.init not in ("vocab_mean", "random"):
            raise ValueError(f"init must be 'vocab_mean' or 'random', got {self.init!r}")

    @property
    def num_gists(self) -> int:
        return math.ceil(self.segment_length / self.tokens_per_gist)


@register_compressor
class GistCompressor(EncoderAdapter, Compressor):
    compressor_type = "gist"
    config_class = GistConfig
    memory_kind = "kv"

    def __init__(self, config: GistConfig, model: PreTrainedModel) -> None:
        if config.lora_r > 0 and not hasattr(model, "peft_config"):
            model = add_named_lora(model, {"default": config.lora_r}, config)
        elif config.lora_r == 0:
            model.requires_grad_(False)
        super().__init__(config, model)
        embed = self.base_lm.get_input_embeddings()
        # An nn.Embedding (not a bare Parameter), always read by calling it: under ZeRO-3 only the
        # module's own forward hook gathers its partitioned weight.
        self.gist_embeddings = nn.Embedding(config.num_gists, embed.embedding_dim)
        with whole_parameters(embed.weight):  # partitioned at load when transformers builds the model under ZeRO-3
            self._init_gists(embed.weight)
        self.gist_embeddings.to(device=embed.weight.device, dtype=embed.weight.dtype)

    @torch.no_grad()
    def _init_gists(self, vocab: torch.Tensor) -> None:
        if self.compressor_config.init == "vocab_mean":
            # Start from the mean word embedding plus small noise: on-distribution for the LM.
            mean, std = vocab.float().mean(0), vocab.float().std(0)
            noise = torch.randn(self.gist_embeddings.weight.shape, generator=torch.Generator().manual_seed(0))
            self.gist_embeddings.weight.copy_(mean + 0.1 * std * noise.to(vocab.device))
        else:
            nn.init.normal_(self.gist_embeddings.weight, std=float(vocab.float().std()))

    # ----- encoder ------------------------------------------------------------------------
    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
        """Compress ``context_ids`` ([batch, length], left padding allowed) into a ``kv`` Memory."""
        attention_mask = self.check_context(context_ids, attention_mask)
        # Drop columns that are padding in every row, so that no segment is padding only.
        first = int((attention_mask.sum(0) > 0).nonzero()[0])
        context_ids, attention_mask = context_ids[:, first:], attention_mask[:, first:]
        memory: Memory | None = None
        # The last columns (the window, _window_length) stay raw; with left padding, a shorter row's window holds
        # its padding and its gisted part is padding only (its gists are masked slots).
        gisted = max(0, context_ids.shape[1] - self._window_length(context_ids.shape[1]))
        step = self.compressor_config.segment_length
        # Segments are cut from the right so that only the first one can hold left padding.
        bounds = [(max(0, end - step), end) for end in range(gisted, 0, -step)][::-1]
        for start, end in bounds:
            segment = self._compress_segment(context_ids[:, start:end], attention_mask[:, start:end], memory)
            memory = segment if memory is None else memory.cat(segment)
        if gisted < context_ids.shape[1]:
            recent = self._read_recent(context_ids[:, gisted:], attention_mask[:, gisted:], memory)
            memory = recent if memory is None else memory.cat(recent)
        assert memory is not None
        return memory

    def _window_length(self, length: int) -> int:
        """How many of a ``length``-column context's last tokens stay raw: ``recent_tokens``, or in training with
        ``train_recent_fraction`` a random length for the whole batch (torch's generator: the run's seed sets it)."""
        fraction = self.compressor_config.train_recent_fraction
        if self.training and fraction > 0:
            return int(torch.randint(0, int(fraction * length) + 1, ()))
        return self.compressor_config.recent_tokens

    def _read_recent(self, ids: torch.Tensor, mask: torch.Tensor, previous: Memory | None) -> Memory:
        """The raw recent window: its tokens read by the decoder (the base model without the encoder's adapter)
        after the gists of the text before them; their keys/values become memory slots."""
        batch = ids.shape[0]
        start = torch.tensor(previous.position_offset if previous else [0] * batch, device=ids.device)
        previous_mask = previous.slot_mask().to(mask) if previous is not None else mask[:, :0]
        positions = start[:, None] + (mask.long().cumsum(-1) - 1).clamp(min=0)
        decoder = self._adapter_off() if self.separate_encoder else contextlib.nullcontext()
        cache = previous.to_cache() if previous is not None else None
        with decoder:  # only the cache is used: logits_to_keep=1 spares the logits of every position
            out = self.model(input_ids=ids, attention_mask=torch.cat([previous_mask, mask], 1), use_cache=True,
                             logits_to_keep=1, position_ids=positions, **with_cache(cache))
        tensors = {}
        for layer, (key, value) in enumerate(_cache_layers(cache_of(out))):
            tensors[f"key.{layer}"] = key[:, :, -ids.shape[1]:]
            tensors[f"value.{layer}"] = value[:, :, -ids.shape[1]:]
        if not bool(mask.all()):
            tensors["slot_mask"] = mask.to(torch.int8)
        real = mask.long().sum(-1)
        return self.new_memory(tensors, source_tokens=real.tolist(), slots=ids.shape[1],
                               position_offset=(start + real).tolist())

    def _compress_segment(self, ids: torch.Tensor, mask: torch.Tensor, previous: Memory | None) -> Memory:
        # Each row gets ceil(its own tokens / tokens_per_gist) gists, as if compressed alone: rows
        # with fewer gists are left-padded with masked gist slots (``slot_mask``).
        batch, per_gist = ids.shape[0], self.compressor_config.tokens_per_gist
        start = torch.tensor(previous.position_offset if previous else [0] * batch, device=ids.device)
        real = mask.long().sum(-1)
        row_gists = (real + per_gist - 1) // per_gist
        n_gists = int(row_gists.max())
        gist_index = torch.arange(n_gists, device=ids.device) - (n_gists - row_gists)[:, None]  # <0: padding
        gist_mask = (gist_index >= 0).to(mask.dtype)
        token_index = (mask.long().cumsum(-1) - 1).clamp(min=0)  # each token's place among its row's real tokens
        token_pos = start[:, None] + token_index
        interleaved = self.compressor_config.gist_layout == "interleaved"
        if interleaved:  # gist i stands for real tokens [i*k, (i+1)*k) and sits at the last one's position
            last_token = torch.minimum((gist_index.clamp(min=0) + 1) * per_gist, real[:, None]) - 1
            gist_pos = start[:, None] + last_token
        else:
            gist_pos = (start + real)[:, None] + gist_index.clamp(min=0)
        gists = self.gist_embeddings(gist_index.clamp(min=0))  # the module call, not .weight[...]: ZeRO-3
        context_embeds = self.base_lm.get_input_embeddings()(ids)
        cache, previous_mask = None, mask[:, :0]
        if previous is not None:
            cache = previous.to_cache()
            previous_mask = previous.tensors.get("slot_mask")
            if previous_mask is None:
                previous_mask = mask.new_ones(batch, previous.slots)
            previous_mask = previous_mask.to(mask.dtype)
        if self.compressor_config.adapter_scope == "gists":
            # The plain base model reads the segment without gradients (nothing trainable acts on it; the
            # previous memory's gradient comes from the decoder and from the gists below), then the gists
            # read the previous memory and the segment with the adapter on.
            with torch.no_grad(), self._adapter_off():
                out = self.model(inputs_embeds=context_embeds, attention_mask=torch.cat([previous_mask, mask], 1),
                                 use_cache=True, logits_to_keep=1, position_ids=token_pos, **with_cache(cache))
            cache = _gist_pass_cache(previous, _cache_layers(cache_of(out)), ids.shape[1])
            embeds, positions = gists.to(self.base_lm.dtype), gist_pos
        else:
            embeds = torch.cat([context_embeds, gists.to(self.base_lm.dtype)], dim=1)
            positions = torch.cat([token_pos, gist_pos], dim=1)
        full_mask = torch.cat([previous_mask, mask, gist_mask], dim=1)
        if interleaved:
            full_mask = _interleaved_gist_mask(previous_mask, mask, token_index, gist_index, last_token,
                                               None if attn_implementation(self.base_lm.config) == "sdpa"
                                               else self.base_lm.dtype)
        # Only the cache is used: logits_to_keep=1 spares the [batch, tokens, vocab] logits of every position.
        out = self.model(inputs_embeds=embeds, attention_mask=full_mask, use_cache=True, logits_to_keep=1,
                         position_ids=positions, **with_cache(cache))
        tensors = {}
        for layer, (key, value) in enumerate(_cache_layers(cache_of(out))):
            tensors[f"key.{layer}"] = key[:, :, -n_gists:]
            tensors[f"value.{layer}"] = value[:, :, -n_gists:]
        if not bool(gist_mask.all()):
            tensors["slot_mask"] = gist_mask.to(torch.int8)  # the decoder must not read padding gists
        # The decoder goes on after the last position the memory holds: the context's own for interleaved gists.
        offset = start + real if interleaved else start + real + row_gists
        return self.new_memory(tensors, source_tokens=real.tolist(), slots=n_gists, position_offset=offset.tolist())

    def _adapter_off(self) -> contextlib.AbstractContextManager:
        """The base model without the encoder's adapter, whatever the adapter's current state."""
        from peft import PeftModel

        return self.model.disable_adapter() if isinstance(self.model, PeftModel) else contextlib.nullcontext()

    # ----- which model ``model`` is ------------------------------------------------------------
    @property
    def separate_encoder(self) -> bool:
        """Whether the encoder has a LoRA adapter that the decoder must not use."""
        return self.compressor_config.lora_r > 0 and not self.compressor_config.lora_in_decoder


def _interleaved_gist_mask(previous_mask: torch.Tensor, mask: torch.Tensor, token_index: torch.Tensor,
                           gist_index: torch.Tensor, last_token: torch.Tensor,
                           additive: torch.dtype | None) -> torch.Tensor:
    """The 4D attention mask ``[batch, 1, gists, previous + tokens + gists]`` of the interleaved gists: each real
    gist reads the previous memory, the segment's real tokens up to its own last one and the gists up to itself; a
    padding gist reads only itself (its slot is masked out of the memory). Boolean (True: read) for SDPA, or additive
    in dtype ``additive`` (0 / its minimum) for the implementations that add the mask to the scores (eager)."""
    real_gist = gist_index >= 0
    reads_token = mask.bool()[:, None, :] & (token_index[:, None, :] <= last_token[:, :, None])
    reads_gist = (gist_index[:, None, :] <= gist_index[:, :, None]) & real_gist[:, None, :]
    reads_previous = previous_mask.bool()[:, None, :].expand(-1, gist_index.shape[1], -1)
    allowed = torch.cat([reads_previous, reads_token, reads_gist], dim=-1) & real_gist[:, :, None]
    own = torch.eye(gist_index.shape[1], dtype=torch.bool, device=mask.device)
    allowed[:, :, -gist_index.shape[1]:] |= own & ~real_gist[:, :, None]
    if additive is None:
        return allowed[:, None]
    blocked = torch.zeros(allowed.shape, dtype=additive, device=mask.device)
    return blocked.masked_fill_(~allowed, torch.finfo(additive).min)[:, None]


def _gist_pass_cache(previous: Memory | None, read: list[tuple[torch.Tensor, torch.Tensor]], tokens: int) -> Any:
    """The cache the gists attend to: the previous memory as it is (its gradient kept) and the last ``tokens``
    positions of ``read``, the segment's keys/values from the plain base model."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (key, value) in enumerate(read):
        key, value = key[:, :, -tokens:], value[:, :, -tokens:]
        if previous is not None:
            old_key, old_value = previous.layer_kv(layer)
            key, value = torch.cat([old_key, key], dim=2), torch.cat([old_value, value], dim=2)
        cache.update(key, value, layer)
    return cache


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer of a transformers cache, whatever its version's internals."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]
