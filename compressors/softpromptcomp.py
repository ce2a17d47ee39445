"""SoftPromptComp: a natural-language summary and soft prompt vectors, weighted, read as input embeddings.

Paper: Wang et al., "Adapting LLMs for Efficient Context Processing through Soft Prompt Compression" (CMNM
2024, arXiv 2404.04997). There is no public code, and the paper leaves the summariser, the soft-prompt
generator and the weighting under-specified: **what follows is this project's interpretation**, not a
reproduction.

Our interpretation. A memory holds two views of the context (after the chat template's prefix, which stays
text, as in LCIRC):
- **the summary**: an LM (the base model itself, its adapter off, or any causal LM named by ``summariser``)
  writes a greedy summary of at most ``summary_tokens`` tokens when asked ``summary_instruction`` about the
  context in a chat turn; summaries are written in batches of ``summary_batch`` and cached per context in
  the process (training epochs and evaluation never write one twice; ``summary_cache_size`` entries) and,
  with ``summary_disk_cache``, on disk for other processes and runs (ablations share them). A
  context no longer than the budget is its own summary (verbatim: nothing to shorten), and so is the whole
  context when the budget is larger than it. The summary's token embeddings (the frozen vocabulary) enter
  the memory;
- **the soft vectors**: ``num_soft`` (m) learned queries cross-attend to the context's hidden states from
  the frozen base (the shared Perceiver resampler of ``compressors.perceiver``, no position table: hidden
  states carry their positions), then a linear map (initialised to scale the resampler's LayerNorm-ed
  output to the vocabulary embeddings' size) gives m input embeddings;
- **the weighting**: learned gates scale the summary-token embeddings and the soft vectors before the LM
  reads them: one gate per source (``weighting: per_source``), one per vector (``per_vector``: one per
  summary position up to the budget, one per soft vector), or none (``none``: both unweighted). A gate at
  exactly zero hides its vectors completely (their slots are masked, not read as zero vectors). The gate
  values are logged during training (``gate_summary``, ``gate_soft``). ``sources`` selects the ablations:
  ``summary`` only, ``soft`` only, or ``both``.

The LM reads [template prefix; summary embeddings; soft vectors] as input embeddings at the start of the
user turn, then the prompt (kind ``embeds``; ``texts`` holds the summaries for inspection). The LM stays
frozen, optionally with a LoRA adapter (``lora_r > 0``) used only while it reads memories. ``ratio``:
``(prefix + context tokens) / (prefix + summary tokens + soft vectors)``; the time to write a summary is
part of ``compress`` (and of the compression time the eval reports): ``meta['summary_s']`` records it, and a
summary taken from the cache still counts the seconds it took to write (``meta['cached_compute_s']``, which
the eval runner adds to the time it measures).

Objectives: the task SFT loss (``sft``: answer only) and ``continuation`` / ``reconstruction`` for
pre-training the soft vectors (``trainers.objectives``).

Faithful (as far as the paper says): a summary by an LM and soft prompts combined, a weighting between
them, a frozen LM reading the combination instead of the context. Ours: every concrete choice above.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .adapters import LoraSettings, add_named_lora
from .base import Compressor, CompressorConfig, DecoderStep, register_compressor
from .compat import cache_of
from .conversation import ConversationLayout, stop_token_ids
from .generation import generate_rows, generation_config_for
from .io import write_json_atomic
from .memory import Memory
from .models import ctxzip_home, load_base, whole_parameters
from .perceiver import LearnedLatents, PerceiverResampler

SOURCES = ("both", "summary", "soft")
WEIGHTINGS = ("none", "per_source", "per_vector")
SUMMARY_INSTRUCTION = "Summarize the text above in a few short sentences, keeping names, numbers and key facts."


@dataclass
class SoftPromptCompConfig(CompressorConfig, LoraSettings):
    """Hyper-parameters of the SoftPromptComp compressor (our interpretation of the paper)."""

    sources: str = field(default="both", metadata={
        "help": "what the memory holds: both (summary + soft vectors), summary (only), soft (only)"})
    weighting: str = field(default="per_source", metadata={
        "help": "learned gates scaling the two sources: per_source (one gate each), per_vector (one per summary "
                "position and per soft vector) or none (unweighted)"})
    num_soft: int = field(default=8, metadata={"help": "m: soft vectors per context"})
    summary_tokens: int = field(default=64, metadata={
        "help": "summary budget in tokens (a context no longer than this is its own summary)"})
    summary_instruction: str = field(default=SUMMARY_INSTRUCTION, metadata={
        "help": "what the summariser is asked after the context, in a chat turn"})
    summariser: str = field(default="", metadata={
        "help": "causal LM that writes the summaries: empty = the base model itself (its adapter off), or a Hub "
                "id / folder / embedded name"})
    summary_batch: int = field(default=8, metadata={"help": "contexts summarised in one batched generation"})
    summary_cache_size: int = field(default=100_000, metadata={
        "help": "summaries kept in the process-wide cache (per context, summariser, budget and instruction)"})
    summary_disk_cache: bool = field(default=True, metadata={
        "help": "also keep summaries under $CTXZIP_HOME/summaries, shared by every process and run (each with "
                "the seconds it took to write, which a memory made from it still reports)"})
    perceiver_layers: int = field(default=1, metadata={"help": "layers of the soft-prompt generator's resampler"})
    heads: int = field(default=0, metadata={"help": "attention heads of the resampler (0: the base model's)"})
    head_dim: int = field(default=0, metadata={"help": "width of a head (0: hidden size / heads)"})
    ffn_dim: int = field(default=0, metadata={"help": "inner width of its feed-forward (0: the base model's)"})
    gate_init: float = field(default=1.0, metadata={"help": "initial value of every gate"})
    lora_r: int = field(default=0, metadata={
        "help": "rank of an optional LoRA adapter on the LM while it reads memories (0: the LM stays frozen)"})

    def __post_init__(self) -> None:
        if self.sources not in SOURCES:
            raise ValueError(f"sources must be one of {SOURCES}, got {self.sources!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        for name in ("num_soft", "summary_tokens", "summary_batch", "perceiver_layers", "summary_cache_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def uses_summary(self) -> bool:
        return self.sources in ("both", "summary")

    @property
    def uses_soft(self) -> bool:
        return self.sources in ("both", "soft")


class SourceGates(nn.Module):
    """The weighting: ``forward(n)`` gives the gates of ``n`` summary positions and of the soft vectors (a
    module, so that DeepSpeed ZeRO-3 gathers them when they are read)."""

    def __init__(self, weighting: str, summary_tokens: int, num_soft: int, init: float) -> None:
        super().__init__()
        self.weighting, self.summary_tokens = weighting, summary_tokens
        count = 2 if weighting == "per_source" else summary_tokens + num_soft
        self.gates = nn.Parameter(torch.full((count,), float(init)))

    def forward(self, summary_positions: int, num_soft: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.weighting == "per_source":
            return self.gates[0].expand(summary_positions), self.gates[1].expand(num_soft)
        return self.gates[:summary_positions], self.gates[self.summary_tokens:self.summary_tokens + num_soft]


_SUMMARIES: OrderedDict[str, dict[str, Any]] = OrderedDict()  # process-wide: every compressor with the same summariser shares it


@register_compressor
class SoftPromptCompCompressor(Compressor):
    compressor_type = "softpromptcomp"
    config_class = SoftPromptCompConfig
    memory_kind = "embeds"
    card_note = ("**Our interpretation** of SoftPromptComp (Wang et al., arXiv 2404.04997): the paper has no public "
                 "code and leaves the summariser, the soft-prompt generator and the weighting under-specified. Here "
                 "the base LM writes a short summary of the context, learned queries over the frozen LM's hidden "
                 "states give soft vectors, and learned gates scale both before the LM reads them as input "
                 "embeddings (ctxzip's compressors/softpromptcomp.py says every choice).")

    def __init__(self, config: SoftPromptCompConfig, model: PreTrainedModel) -> None:
        if config.uses_summary and any(hasattr(p, "ds_id") for p in model.parameters()):
            # generation inside a training forward would need every process to generate in lock step
            raise ValueError("SoftPromptComp writes summaries inside compress(), which a model partitioned by DeepSpeed "
                             "ZeRO-3 cannot do process by process; use ZeRO-2 (accelerate_configs/zero2.yaml), or "
                             "sources: soft")
        if config.lora_r > 0 and not hasattr(model, "peft_config"):
            model = add_named_lora(model, {"default": config.lora_r}, config)
        elif config.lora_r == 0:
            model.requires_grad_(False)  # the LM stays frozen: only the compressor's own modules train
        super().__init__(config, model)
        base = self.base_lm.config
        width = base.hidden_size
        heads = config.heads or base.num_attention_heads
        head_dim = config.head_dim or width // heads
        inner = config.ffn_dim or getattr(base, "intermediate_size", 4 * width)
        embeddings = self.base_lm.get_input_embeddings().weight
        self.queries = self.resampler = self.soft_out = self.gates = None
        if config.uses_soft:
            self.queries = LearnedLatents(config.num_soft, width)
            self.resampler = PerceiverResampler(width, config.perceiver_layers, heads, head_dim, inner, max_inputs=0)
            self.soft_out = nn.Linear(width, width, bias=False)
            with torch.no_grad(), whole_parameters(embeddings):  # under ZeRO-3 the vocabulary is partitioned
                scale = embeddings.float().pow(2).mean().sqrt()  # the resampler's output has unit RMS
                self.soft_out.weight.copy_(torch.eye(width) * scale)
        if config.weighting != "none":
            self.gates = SourceGates(config.weighting, config.summary_tokens, config.num_soft, config.gate_init)
        for module in (self.queries, self.resampler, self.soft_out, self.gates):
            if module is not None:
                module.to(device=embeddings.device, dtype=embeddings.dtype)
        self._summariser: tuple[Any, Any, ConversationLayout] | None = None

    # ----- which weights run ----------------------------------------------------------------
    @contextlib.contextmanager
    def plain_base(self) -> Iterator[None]:
        """The base without the LoRA adapter (there is none when ``lora_r`` is 0)."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
        else:
            yield

    @contextlib.contextmanager
    def reading(self, memory: Memory | None) -> Iterator[None]:
        """The adapter (if any) reads memories; without a memory the LM is the plain base."""
        if memory is None:
            with self.plain_base():
                yield
        else:
            yield

    # ----- encoder ------------------------------------------------------------------------
    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
        """The weighted summary embeddings and soft vectors of each row's context (after the template prefix)."""
        config = self.compressor_config
        rows, prefix_length = self.template_rows(context_ids, attention_mask)
        prefix_ids = self.shared_template_prefix(rows, prefix_length)
        contexts = [row[prefix_length:] for row in rows]
        start = time.perf_counter()
        summaries, cached_s = self.summaries(contexts) if config.uses_summary else (None, 0.0)
        summary_s = time.perf_counter() - start
        embed = self.base_lm.get_input_embeddings()
        summary_ids = [self._summary_ids(text, context) for text, context in zip(summaries, contexts)] \
            if summaries is not None else [context_ids.new_zeros(0) for _ in rows]
        mask = torch.ones_like(context_ids) if attention_mask is None else attention_mask
        soft = self.soft_vectors(context_ids, mask, prefix_length) if config.uses_soft else None
        pieces, visible = [], []
        for i, ids in enumerate(summary_ids):
            count = soft.shape[1] if soft is not None else 0
            gate_summary, gate_soft = self.gates(len(ids), count) if self.gates is not None else (
                torch.ones(len(ids), device=ids.device), torch.ones(count, device=ids.device))
            parts = [embed(ids) * gate_summary[:, None].to(embed.weight.dtype)]
            if soft is not None:
                parts.append(soft[i] * gate_soft[:, None].to(soft.dtype))
            pieces.append(torch.cat(parts))
            visible.append(torch.cat([gate_summary != 0, gate_soft != 0]))
        metrics = {}
        if self.gates is not None:  # what the trainer logs: the mean gate of each source (over its vectors)
            gate_summary, gate_soft = self.gates(config.summary_tokens if config.uses_summary else 0,
                                                 config.num_soft if config.uses_soft else 0)
            metrics = {f"gate_{name}": float(g.detach().float().mean())
                       for name, g in (("summary", gate_summary), ("soft", gate_soft)) if g.numel()}
        memory = self._memory(pieces, visible, [len(row) for row in rows], prefix_ids, summaries)
        memory.meta.update(summary_s=summary_s + cached_s, cached_compute_s=cached_s)
        if metrics:
            memory.meta["metrics"] = metrics
        return memory

    def _summary_ids(self, summary: str, context: torch.Tensor) -> torch.Tensor:
        """The summary's token ids in the base tokenizer (the context itself when it is within the budget)."""
        budget = self.compressor_config.summary_tokens
        if len(context) <= budget:
            return context
        return torch.tensor(self.layout.encode(summary)[:budget], dtype=torch.long, device=context.device)

    def soft_vectors(self, context_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_length: int
                     ) -> torch.Tensor:
        """``[batch, m, width]``: the learned queries over the frozen base's last hidden states of the context
        tokens (the template prefix read but not attended to)."""
        with torch.no_grad(), self.plain_base():
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            hidden = self.base_lm.get_decoder()(input_ids=context_ids, attention_mask=attention_mask,
                                                position_ids=positions, use_cache=False).last_hidden_state
        context_mask = attention_mask.bool() & (positions >= prefix_length)
        queries = self.queries().expand(context_ids.shape[0], -1, -1)
        return self.soft_out(self.resampler(queries, hidden.detach(), context_mask))

    def _memory(self, pieces: list[torch.Tensor], visible: list[torch.Tensor], source_tokens: list[int],
                prefix_ids: list[int], summaries: list[str] | None) -> Memory:
        """Left-pad the rows' vectors into an ``embeds`` memory (``slot_mask``: padding and zero-gated slots)."""
        slots = max(len(p) for p in pieces)
        width = self.base_lm.config.hidden_size
        device, dtype = self.base_lm.get_input_embeddings().weight.device, pieces[0].dtype
        embeds = torch.zeros(len(pieces), slots, width, device=device, dtype=dtype)
        mask = torch.zeros(len(pieces), slots, dtype=torch.int8, device=device)
        for i, (piece, seen) in enumerate(zip(pieces, visible)):
            if len(piece):
                embeds[i, slots - len(piece):], mask[i, slots - len(piece):] = piece, seen.to(torch.int8)
        tensors = {"embeds": embeds}
        if not bool(mask.all()):
            tensors["slot_mask"] = mask
        return self.new_memory(tensors, source_tokens=source_tokens, slots=slots,
                               position_offset=[len(prefix_ids)] * len(pieces), texts=summaries,
                               meta={"prefix_ids": list(prefix_ids)})

    # ----- the summariser -------------------------------------------------------------------
    def summaries(self, contexts: list[torch.Tensor]) -> tuple[list[str], float]:
        """Each context's summary, from the cache or written now (in batches) and cached, and the seconds the
        cached ones took to write when they were written. A context within the budget is not summarised (it is
        its own summary: its text)."""
        config = self.compressor_config
        keys = [self._cache_key(context) for context in contexts]
        entries = {key: entry for key in set(keys) if (entry := self._cached(key)) is not None}
        first_of: dict[str, int] = {}  # a context repeated in the call is written once
        for i, key in enumerate(keys):
            first_of.setdefault(key, i)
        missing = [i for key, i in first_of.items() if key not in entries and len(contexts[i]) > config.summary_tokens]
        for first in range(0, len(missing), config.summary_batch):
            batch = missing[first:first + config.summary_batch]
            start = time.perf_counter()
            texts = self._write([contexts[i] for i in batch])
            seconds = (time.perf_counter() - start) / len(batch)
            for i, text in zip(batch, texts):
                entries[keys[i]] = self._store(keys[i], {"summary": text, "seconds": seconds}, fresh=True)
        out, cached_s = [], 0.0
        for key, context in zip(keys, contexts):
            if len(context) <= config.summary_tokens:
                out.append(self.tokenizer.decode(context.tolist(), skip_special_tokens=True))
                continue
            entry = entries[key]
            out.append(entry["summary"])
            cached_s += 0.0 if entry.get("fresh") else float(entry.get("seconds", 0.0))
        return out, cached_s

    def _cache_key(self, context: torch.Tensor) -> str:
        config = self.compressor_config
        setting = f"{config.summariser or self.base_name}|{config.summary_tokens}|{config.summary_instruction}"
        ids = context.to("cpu", torch.int64).numpy().tobytes()
        return hashlib.sha1(setting.encode() + b"|" + ids).hexdigest()

    def _disk_path(self, key: str) -> Path:
        return ctxzip_home() / "summaries" / key[:2] / f"{key}.json"

    def _cached(self, key: str) -> dict[str, Any] | None:
        if key in _SUMMARIES:
            _SUMMARIES.move_to_end(key)
            return {**_SUMMARIES[key], "fresh": False}
        path = self._disk_path(key)
        if self.compressor_config.summary_disk_cache and path.is_file():
            try:
                entry = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):  # a damaged entry is written again
                return None
            return self._store(key, entry, fresh=False)
        return None

    def _store(self, key: str, entry: dict[str, Any], fresh: bool) -> dict[str, Any]:
        entry = {"summary": str(entry["summary"]), "seconds": float(entry.get("seconds", 0.0))}
        _SUMMARIES[key] = entry
        while len(_SUMMARIES) > self.compressor_config.summary_cache_size:
            _SUMMARIES.popitem(last=False)
        if fresh and self.compressor_config.summary_disk_cache:
            write_json_atomic(self._disk_path(key), entry)
        return {**entry, "fresh": fresh}

    @torch.no_grad()
    def _write(self, contexts: list[torch.Tensor]) -> list[str]:
        """Greedy summaries of a batch of contexts, by the summariser, in its chat layout."""
        model, tokenizer, layout = self.summariser()
        own = model is self.base_lm
        rows = []
        for context in contexts:
            ids = context.tolist() if own else layout.encode(self.tokenizer.decode(context.tolist()))
            rows.append(layout.prefix_ids + ids + layout.prompt_ids(self.compressor_config.summary_instruction))
        settings, _ = generation_config_for(stop_token_ids(tokenizer, model.generation_config, layout),
                                            tokenizer.pad_token_id, max_new_tokens=self.compressor_config.summary_tokens)
        with self.plain_base() if own else contextlib.nullcontext():
            replies = generate_rows(model, rows, settings)
        return [tokenizer.decode(reply, skip_special_tokens=True).strip() for reply in replies]

    def summariser(self) -> tuple[Any, Any, ConversationLayout]:
        """``(model, tokenizer, layout)`` of the LM that writes summaries (loaded once when it is not the base)."""
        if self._summariser is None:
            if self.compressor_config.summariser:
                model, tokenizer = load_base(self.compressor_config.summariser,
                                             dtype=self.base_lm.get_input_embeddings().weight.dtype)
                model.to(self.device).requires_grad_(False)
                self._summariser = (model, tokenizer, ConversationLayout(tokenizer))
            else:
                self._summariser = (self.base_lm, self.tokenizer, self.layout)
        return self._summariser

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The training loss (``Compressor.forward``). A batch whose memories hold no trained vector (summary only,
        and every summary empty) gives a zero gradient instead of a loss that no optimizer step can follow."""
        out = super().forward(*args, **kwargs)
        if torch.is_grad_enabled() and not out["loss"].requires_grad:
            trained = [p for p in self.parameters() if p.requires_grad]
            zero = sum(p.sum() for p in trained) * 0 if trained else None
            if zero is not None:
                out["loss"], out["per_example_loss"] = out["loss"] + zero, out["per_example_loss"] + zero
        return out

    # ----- decoder ------------------------------------------------------------------------
    def decoder_forward(self, memory: Memory, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        use_cache: bool = True, prompt_lengths: torch.Tensor | None = None) -> DecoderStep:
        """The template prefix, the memory's vectors, then the input rows, as input embeddings."""
        self.check_memory(memory)
        batch = input_ids.shape[0]
        memory = memory.expand(batch)
        embed = self.base_lm.get_input_embeddings()
        prefix = torch.tensor(memory.meta.get("prefix_ids", []), dtype=input_ids.dtype, device=input_ids.device)
        prompt = embed(input_ids)
        vectors = memory.tensors["embeds"].to(device=prompt.device, dtype=prompt.dtype)
        inputs = torch.cat([embed(prefix.expand(batch, -1)), vectors, prompt], dim=1)
        mask = torch.cat([attention_mask.new_ones(batch, len(prefix)),
                          memory.slot_mask().to(device=attention_mask.device, dtype=attention_mask.dtype),
                          attention_mask], dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.base_lm(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=use_cache)
        return DecoderStep(logits=out.logits[:, len(prefix) + memory.slots:],
                           cache=cache_of(out) if use_cache else None, attention_mask=mask,
                           next_position=positions[:, -1] + 1, memory_tokens=memory.real_slots)
