"""LCIRC and QD-LCIRC: a Perceiver compresses the context segment by segment into latents, recurrently, and
a frozen LM reads them through gated cross-attention blocks.

Paper: An et al., "LCIRC: A Recurrent Compression Approach for Efficient Long-form Context and Query
Dependent Modeling in LLMs" (NAACL 2025, arXiv 2502.06139); public code ssuminan/LCIRC.

How it works here. The context (after the chat template's prefix) is cut into segments of at most
``segment_length`` tokens. A Perceiver resampler (``compressors.perceiver``) turns each segment into
``num_latents`` (K) latents: the latents attend to the segment's frozen token embeddings plus a learned
position embedding of ``segment_length`` rows, and the queries are the previous segment's latents (the
recurrence ``h(i) = Comp(h(i-1), s_i)``, from a learned initial state ``h(0)``). The memory is every
segment's latents, concatenated (kind ``latents``: ``[batch, S * K, width]``, left-padded with a ``slot_mask``
when rows have different segment counts). The LM stays frozen: before each of a set of decoder layers
(``xattn_layers``, or every ``xattn_every``-th layer and the last) a gated cross-attention block computes
``x + tanh(a) * XAttn(LN(x), H)`` then ``x + tanh(b) * FFN(x)``, with ``a = b = 0`` at initialisation, so a
fresh compressor is exactly the base model (forward pre-hooks on the decoder layers; the modeling code is
not forked). The blocks' keys and values of a memory are computed once when a generation starts reading it
(``reading(memory)``), not at every decoded token.

QD-LCIRC (``qd_lcirc``) adds a query mixer, a gated cross-attention block of the same kind, that mixes the
query's token embeddings into ``h(i-1)`` before each compression step, so the memory keeps what the
question needs; its gates also start at zero, so a QD-LCIRC initialised from an LCIRC export
(``--init_from``) starts as that LCIRC. A QD memory is made per question: ``compress(context, query=q)``.
Without a query the mixer is skipped and the memory is query-agnostic (documented fallback, what LCIRC
would give with the same weights).

In a conversation the template's prefix stays text: the memory records its token ids (``meta``), and the
decoder reads them, then the prompt that closes the user turn, with the blocks attending to the latents.
``nbytes`` counts the latents (and their padding mask); the ratio counts the prefix on both sides:
``(prefix + context tokens) / (prefix + latents)``. Since only token embeddings are read, compressing
needs no LM pass, and a context may be far longer than the base model's position table.

Training: ``continuation`` (compress the context, predict what follows; LCIRC's objective) and ``sft``
(answer-only loss; QD-LCIRC's), with truncated backpropagation through the recurrence: only
``grad_segments`` compression steps of each row keep their gradients (the last ones for LCIRC, random ones
for QD-LCIRC, ``grad_segments_at``); the other steps run without a graph and their latents are constants.

Faithful: Perceiver layers with LayerNorm-ed latents and inputs, queries from the latents, keys/values
from the segment, SiLU feed-forward, residuals and a final LayerNorm; a learned initial state; frozen token
embeddings as input; Flamingo gated blocks with zero-initialised tanh gates before the chosen layers (the
paper's every third layer and the last); the QD mixer as a gated block over the query embeddings before
each step; truncated BPTT (depth 1 for LCIRC, random segments for QD-LCIRC in ``gpu.yaml``); the LM frozen.
Not faithful: the position embedding is sized by the segment length (the public code's is ``width x
width``, which caps a segment at the model width); fp32 on CPU and the training dtype elsewhere (the public
code hard-codes bf16); training segments have a fixed length (the paper draws random lengths); the
continuation loss is taken once per row, on the tokens after the whole context (the public code takes one after
every segment i, on the tokens that follow it, so every compression step gets a loss of its own; here, with
``grad_segments: 1``, only the last compression step of a row gets gradients); the base
model (SmolLM2-135M-Instruct, not Llama-2-7B), the data (offline text and synthetic tasks, or any
``datasets`` corpus, not fineweb-edu-long / fineweb-LQA) and the scale; no cap on the latents kept (the
paper keeps the last 50K).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..base import Compressor, CompressorConfig, DecoderStep, register_compressor, template_prefix_before
from ..compat import cache_of
from ..memory import Memory
from ..models import decoder_layers
from ..perceiver import GatedCrossAttentionBlock, LearnedLatents, PerceiverResampler

GRAD_SEGMENTS_AT = ("last", "random")


@dataclass
class LCIRCConfig(CompressorConfig):
    """Hyper-parameters of the LCIRC / QD-LCIRC compressors."""

    max_context_tokens: int = field(default=1 << 20, metadata={
        "help": "longest context (template prefix included) a compress() call accepts, in tokens; only token "
                "embeddings are read, so this may exceed the base model's position table"})
    num_latents: int = field(default=64, metadata={"help": "K: latents per segment"})
    segment_length: int = field(default=512, metadata={
        "help": "tokens per segment (the last may be shorter); also the rows of the learned position table"})
    perceiver_layers: int = field(default=4, metadata={"help": "Perceiver layers (attention + feed-forward)"})
    heads: int = field(default=0, metadata={"help": "attention heads of every block (0: the base model's)"})
    head_dim: int = field(default=0, metadata={"help": "width of a head (0: hidden size / heads)"})
    ffn_dim: int = field(default=0, metadata={"help": "inner width of every feed-forward (0: the base model's "
                                                      "intermediate size)"})
    xattn_every: int = field(default=3, metadata={
        "help": "a gated cross-attention block before every n-th decoder layer (0, n, 2n, ...) and the last"})
    xattn_layers: list[int] = field(default_factory=list, metadata={
        "help": "explicit decoder layers that get a block before them (overrides xattn_every when set)"})
    gate_init: float = field(default=0.0, metadata={
        "help": "initial value of every tanh gate (0: each block starts as the identity, as the paper)"})
    grad_segments: int = field(default=1, metadata={
        "help": "truncated BPTT: compression steps per row that keep their gradients (0: all)"})
    grad_segments_at: str = field(default="last", metadata={
        "help": "which steps keep gradients: last (LCIRC's truncation) or random (QD-LCIRC's)"})

    def __post_init__(self) -> None:
        for name in ("num_latents", "segment_length", "perceiver_layers", "xattn_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grad_segments < 0:
            raise ValueError("grad_segments must be >= 0 (0: every step keeps its gradients)")
        if self.grad_segments_at not in GRAD_SEGMENTS_AT:
            raise ValueError(f"grad_segments_at must be one of {GRAD_SEGMENTS_AT}, got {self.grad_segments_at!r}")


@register_compressor
class LCIRCCompressor(Compressor):
    compressor_type = "lcirc"
    config_class = LCIRCConfig
    memory_kind = "latents"
    reads_beyond_window = True

    def __init__(self, config: LCIRCConfig, model: PreTrainedModel) -> None:
        super().__init__(config, model)
        model.requires_grad_(False)  # the LM stays frozen: only the compressor's own modules train
        base = self.base_lm.config
        width, depth = base.hidden_size, base.num_hidden_layers
        heads = config.heads or base.num_attention_heads
        head_dim = config.head_dim or width // heads
        inner = config.ffn_dim or getattr(base, "intermediate_size", 4 * width)
        self.xattn_layers = sorted(set(config.xattn_layers or [*range(0, depth, config.xattn_every), depth - 1]))
        if any(not 0 <= i < depth for i in self.xattn_layers):
            raise ValueError(f"xattn_layers {config.xattn_layers} must be decoder layers 0..{depth - 1}")
        self.initial_latents = LearnedLatents(config.num_latents, width)
        self.resampler = PerceiverResampler(width, config.perceiver_layers, heads, head_dim, inner,
                                            config.segment_length)
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(width, heads, head_dim, inner) for _ in self.xattn_layers)
        self.mixer = GatedCrossAttentionBlock(width, heads, head_dim, inner) if self.uses_query else None
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if name.endswith("_gate"):
                    parameter.fill_(config.gate_init)
        reference = self.base_lm.get_input_embeddings().weight
        for module in (self.initial_latents, self.resampler, self.blocks, self.mixer):
            if module is not None:
                module.to(device=reference.device, dtype=reference.dtype)
        self._reading: tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None] | None = None
        layers = decoder_layers(self.base_lm)
        for block_index, layer_index in enumerate(self.xattn_layers):
            layers[layer_index].register_forward_pre_hook(self._xattn_hook(block_index))

    @property
    def width(self) -> int:
        return self.base_lm.config.hidden_size

    # ----- encoder ------------------------------------------------------------------------
    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
        """Latents of each row's context (after the template prefix), segment after segment."""
        rows, prefix_length = self.template_rows(context_ids, attention_mask)
        prefix_ids = self.shared_template_prefix(rows, prefix_length)
        contexts = [row[prefix_length:] for row in rows]
        latents = self.recur([None] * len(rows), contexts, self._queries(query_ids, query_mask, len(rows)))
        return self._memory(latents, [len(row) for row in rows], prefix_ids)

    def extend(self, memory: Memory, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
        """``memory`` with the latents of more context appended (the bare continuation, no template prefix):
        the recurrence goes on from the memory's last segment, so a context compressed piece by piece (at
        segment boundaries) gives the memory of the whole context compressed at once."""
        self.check_memory(memory)
        attention_mask = torch.ones_like(context_ids) if attention_mask is None else attention_mask
        contexts = [ids[mask.bool()] for ids, mask in zip(context_ids, attention_mask)]
        if memory.batch_size != len(contexts) or any(len(c) == 0 for c in contexts):
            raise ValueError("extend needs one non-empty continuation per memory row")
        k = self.compressor_config.num_latents
        last = memory.tensors["latents"][:, -k:]  # left padding: every row's last segment is at the end
        states = [last[i] for i in range(len(contexts))]
        latents = self.recur(states, contexts, self._queries(query_ids, query_mask, len(contexts)))
        added = self._memory(latents, [len(c) for c in contexts], memory.meta.get("prefix_ids", []))
        return memory.cat(added)

    def _queries(self, query_ids: torch.Tensor | None, query_mask: torch.Tensor | None,
                 rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Query embeddings and mask for the mixer, one row per context (``None``: no mixing)."""
        if query_ids is None or self.mixer is None:
            return None
        if query_ids.shape[0] not in (1, rows):
            raise ValueError(f"query_ids has {query_ids.shape[0]} rows, the contexts {rows}")
        mask = torch.ones_like(query_ids) if query_mask is None else query_mask
        embeds = self.base_lm.get_input_embeddings()(query_ids)
        return embeds.expand(rows, -1, -1), mask.expand(rows, -1)

    def recur(self, states: list[torch.Tensor | None], contexts: list[torch.Tensor],
              queries: tuple[torch.Tensor, torch.Tensor] | None) -> list[torch.Tensor]:
        """Run the recurrence over each row's segments from its state (``None``: the learned initial state);
        returns each row's new latents ``[segments * K, width]``. Rows advance together, step by step."""
        config = self.compressor_config
        segments = [list(context.split(config.segment_length)) for context in contexts]
        counts = [len(s) for s in segments]
        keep = [self._steps_with_gradients(n) for n in counts]
        embed = self.base_lm.get_input_embeddings()
        initial = self.initial_latents()
        current = [initial if state is None else state for state in states]
        out: list[list[torch.Tensor]] = [[] for _ in contexts]
        for step in range(max(counts)):
            active = [row for row, n in enumerate(counts) if n > step]
            with_grad = torch.is_grad_enabled() and any(step in keep[row] for row in active)
            with torch.set_grad_enabled(with_grad):
                pieces = [segments[row][step] for row in active]
                width = max(len(p) for p in pieces)
                ids = torch.zeros(len(pieces), width, dtype=torch.long, device=pieces[0].device)
                mask = torch.zeros_like(ids)
                for i, piece in enumerate(pieces):
                    ids[i, :len(piece)], mask[i, :len(piece)] = piece, 1
                inputs = embed(ids).detach()  # the frozen vocabulary: no gradient to it
                latents = torch.stack([current[row] for row in active])
                if queries is not None:  # a row with an empty query (mask all 0) is not mixed, as query=None
                    asked = queries[1][active].bool().any(-1)[:, None, None]
                    latents = torch.where(asked, self.mixer(latents, queries[0][active], queries[1][active]), latents)
                new = self.resampler(latents, inputs, mask)
            for i, row in enumerate(active):
                state = new[i] if with_grad and step in keep[row] else new[i].detach()
                current[row] = state
                out[row].append(state)
        return [torch.cat(parts) for parts in out]

    def _steps_with_gradients(self, count: int) -> set[int]:
        depth = self.compressor_config.grad_segments
        if depth == 0 or depth >= count:
            return set(range(count))
        if self.compressor_config.grad_segments_at == "last":
            return set(range(count - depth, count))
        return set(random.sample(range(count), depth))

    def _memory(self, latents: list[torch.Tensor], source_tokens: list[int], prefix_ids: list[int]) -> Memory:
        """Left-pad the rows' latents into a ``latents`` memory (a ``slot_mask`` when rows differ)."""
        slots = max(len(x) for x in latents)
        batch = torch.zeros(len(latents), slots, self.width, device=latents[0].device, dtype=latents[0].dtype)
        mask = torch.zeros(len(latents), slots, dtype=torch.int8, device=latents[0].device)
        for i, rows in enumerate(latents):
            batch[i, slots - len(rows):], mask[i, slots - len(rows):] = rows, 1
        tensors = {"latents": batch}
        if not bool(mask.all()):
            tensors["slot_mask"] = mask
        return self.new_memory(tensors, source_tokens=source_tokens, slots=slots,
                               position_offset=[len(prefix_ids)] * len(latents), meta={"prefix_ids": list(prefix_ids)})

    # ----- decoder ------------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(self, memory: Memory | None) -> Iterator[None]:
        """While active, the blocks attend to ``memory``'s latents; their keys/values are computed here,
        once (``None``: the blocks are off, the plain base model)."""
        if memory is None:
            yield
            return
        self.check_memory(memory)
        previous = self._reading
        latents = memory.tensors["latents"]
        mask = memory.tensors.get("slot_mask")
        self._reading = ([block.attn.keys_values(latents) for block in self.blocks], mask)
        try:
            yield
        finally:
            self._reading = previous

    def decoder_forward(self, memory: Memory, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        use_cache: bool = True, prompt_lengths: torch.Tensor | None = None) -> DecoderStep:
        """The template prefix (as text), then the input rows, with the blocks attending to the latents."""
        self.check_memory(memory)
        memory = memory.expand(input_ids.shape[0])
        ids, mask, positions, prefix = template_prefix_before(memory, input_ids, attention_mask)
        reading = self.reading(memory) if self._reading is None else contextlib.nullcontext()
        with reading:
            out = self.base_lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache)
        return DecoderStep(logits=out.logits[:, prefix:], cache=cache_of(out) if use_cache else None,
                           attention_mask=mask, next_position=positions[:, -1] + 1,
                           memory_tokens=memory.real_slots)

    def _xattn_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if self._reading is None:
                return None
            if not args:
                raise RuntimeError(f"{type(module).__name__} was called without its hidden states as the first "
                                   "positional argument: LCIRC cannot insert its cross-attention block there")
            keys_values, mask = self._reading
            hidden = args[0]
            keys, values = keys_values[index]
            if keys.shape[0] != hidden.shape[0]:  # one memory row read by many prompt rows
                keys, values = (t.expand(hidden.shape[0], -1, -1, -1) for t in (keys, values))
                mask = mask.expand(hidden.shape[0], -1) if mask is not None else None
            return (self.blocks[index](hidden, key_mask=mask, keys_values=(keys, values)), *args[1:])

        return hook


@register_compressor
class QDLCIRCCompressor(LCIRCCompressor):
    """QD-LCIRC: LCIRC with a query mixer before each compression step (one memory per question)."""

    compressor_type = "qd_lcirc"
    uses_query = True
    memory_per_query = True
