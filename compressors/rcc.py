"""RCC: recurrent context compression with per-layer residual injection at placeholder positions.

Paper: Huang et al. 2024, "Recurrent Context Compression: Efficiently Expanding the Context Window of
LLM" (arXiv 2406.06110); public code WUHU-G/RCC_Transformer.

How it works here. The context is cut into windows of ``window`` (W) tokens; the encoder (the base LM
with its own LoRA adapter, or a full trainable copy) reads each window on its own, positions from 0, and
keeps the hidden states of *every* layer (the embedding output and the L layer outputs: L + 1 states) at
every ``rate``-th position (c: positions c-1, 2c-1, ...; a window's last, partial group keeps its last
real token). A window shorter than W (a short context, or the end of a long one) is read alone and
padded, never tiled. The decoder reads one placeholder position per kept state: an embedding-level
projection ``E`` sets the placeholder's input (``E(state_0)``) and after decoder layer i a projection
``A_i`` adds ``A_i(state_{i+1})`` to the placeholder's residual stream (module forward hooks on the
decoder layers; the modeling code is not forked). ``E`` and ``A_i`` are d x d without bias, so with zero
projections nothing is added and the decoder is exactly the base model reading zero vectors. As in the
public code there is one ``A_i`` per layer, the last one included; that one adds to the placeholders'
output of the last layer, which no later layer reads and no loss sees, so it never trains (kept for
fidelity: it costs d x d parameters and nothing at run time that matters).

In a conversation the chat template's prefix is not compressed: the decoder reads the prefix tokens, then
the placeholders of the context, then the prompt that closes the user turn.

The memory at rest is the decoder's own KV cache over [template prefix; placeholders] after injection
(kind ``kv``): smaller than the per-layer states (2 x kv_heads x head_dim = 384 values per layer and
position on SmolLM2-135M against 576 for a state), read like any KV prefix without hooks, and what the
public code's decoder holds at inference. ``nbytes`` counts exactly that cache; its ratio counts the
template prefix on both sides (``(prefix + context) / (prefix + placeholders)``).

Because windows are encoded independently and only W/c positions per window reach the decoder, a context
may be far longer than the base model's position table (SmolLM2: 8192): the decoder needs
``prefix + N/c + prompt`` positions, the encoder W.

Faithful: per-window encoding with every layer's state at every c-th position, embedding-level and
per-layer residual injection by d x d projections without bias, the last state being the post-final-norm
hidden state (as the public code reads HF's ``hidden_states``), reconstruction (a copied span cued by its
first tokens, loss on the rest), continuation and instruction-reconstruction objectives
(``trainers.objectives``), W = 2048 and c = 32 in ``gpu.yaml``. Both training options: ``train_mode:
full`` trains a full encoder copy and the full decoder as the paper does (the tied vocabulary embedding
stays frozen in both); ``train_mode: lora`` shares the base weights between two named PEFT adapters
(``encoder``, and ``decoder`` when ``decoder_lora_r > 0``; otherwise the decoder is the frozen base).
Not faithful: the base model (SmolLM2-135M-Instruct, not Pythia-1.4B), the data (offline text and
synthetic tasks, not the Pile / PwC / HotpotQA) and the scale; the projections start at E = identity and
A_i = 0 by default (the decoder starts as the base model reading every c-th token's embedding; the public
code uses nn.Linear's random init: ``projection_init: random``); the paper's 1M-token passkey setup is not
described in its code and is not reproduced; the chat template's prefix stays uncompressed ahead of the
placeholders (the public code has no chat layout); reconstruction spans are 64 tokens by default
(``--reconstruction_span_tokens``; the public code's 512 in ``gpu.yaml``).

Gradient checkpointing is refused by the recipes: the injection hooks read states that are set only while the
decoder's forward runs, so a recomputed layer would add nothing and its gradients would be wrong.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from .adapters import ALL_PROJECTIONS, LoraSettings, add_named_lora
from .base import Compressor, CompressorConfig, register_compressor
from .compat import cache_of
from .errors import ContextTooLongError
from .memory import Memory, kv_tensors
from .models import decoder_layers

TRAIN_MODES = ("lora", "full")
PROJECTION_INITS = ("identity", "zero", "random")


@dataclass
class RCCConfig(CompressorConfig, LoraSettings):
    """Hyper-parameters of the RCC compressor."""

    max_context_tokens: int = field(default=1 << 20, metadata={
        "help": "longest context (template prefix included) a compress() call accepts, in tokens; windows are "
                "encoded independently, so this may exceed the base model's position table"})
    window: int = field(default=2048, metadata={
        "help": "W: context tokens the encoder reads at once (each window alone, positions from 0)"})
    rate: int = field(default=32, metadata={
        "help": "c: one placeholder per c context tokens (the compression rate); window must be a multiple"})
    encoder_batch_windows: int = field(default=8, metadata={
        "help": "windows encoded in one forward (bounds the memory of every layer's hidden states on long "
                "contexts)"})
    train_mode: str = field(default="lora", metadata={
        "help": "lora: encoder and decoder share the base weights, each with its own named PEFT adapter; full: "
                "a full trainable encoder copy and a fully trained decoder, as the paper"})
    lora_r: int = field(default=8, metadata={"help": "rank of the encoder's LoRA adapter (train_mode lora)"})
    decoder_lora_r: int = field(default=0, metadata={
        "help": "rank of the decoder's LoRA adapter (train_mode lora; 0 = the decoder is the frozen base model)"})
    lora_target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS), metadata={
        "help": "modules of the base model that get LoRA layers (both adapters)"})
    projection_init: str = field(default="identity", metadata={
        "help": "identity: E = I and every A_i = 0 (starts as the base reading every c-th token's embedding); "
                "zero: all projections 0; random: nn.Linear's init, as the public code"})

    def __post_init__(self) -> None:
        if self.rate < 1 or self.window < 1:
            raise ValueError(f"window and rate must be >= 1, got window={self.window}, rate={self.rate}")
        if self.window % self.rate:
            raise ValueError(f"window={self.window} is not a multiple of rate={self.rate}: every window must hold "
                             "whole groups of c tokens (e.g. window 2048 with rate 32)")
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {self.train_mode!r}")
        if self.projection_init not in PROJECTION_INITS:
            raise ValueError(f"projection_init must be one of {PROJECTION_INITS}, got {self.projection_init!r}")
        if self.encoder_batch_windows < 1:
            raise ValueError("encoder_batch_windows must be >= 1")
        if self.train_mode == "lora" and self.lora_r < 1:
            raise ValueError("train_mode lora needs lora_r >= 1 (the encoder's adapter)")


@register_compressor
class RCCCompressor(Compressor):
    compressor_type = "rcc"
    config_class = RCCConfig
    memory_kind = "kv"
    reads_beyond_window = True
    supports_gradient_checkpointing = False  # the injected states exist only during the forward (see above)
    ENCODER: ClassVar[str] = "encoder"
    DECODER: ClassVar[str] = "decoder"

    def __init__(self, config: RCCConfig, model: PreTrainedModel) -> None:
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and config.window > limit:
            raise ValueError(f"window={config.window} is longer than the base model's {limit} positions")
        encoder = None
        if config.train_mode == "full":
            if any(hasattr(p, "ds_id") for p in model.parameters()):
                raise ValueError("train_mode full copies the base model into the encoder, which a model partitioned "
                                 "by DeepSpeed ZeRO-3 cannot be; use ZeRO-2 (accelerate_configs/zero2.yaml) or lora")
            encoder = copy.deepcopy(model)  # the paper's encoder: a full copy of the LM, trained on its own
            for lm in (model, encoder):
                lm.requires_grad_(True)
                lm.get_input_embeddings().requires_grad_(False)  # the (tied) vocabulary stays frozen in both
                lm.get_output_embeddings().requires_grad_(False)
        elif not hasattr(model, "peft_config"):
            adapters = {self.ENCODER: config.lora_r}
            if config.decoder_lora_r > 0:
                adapters[self.DECODER] = config.decoder_lora_r
            model = add_named_lora(model, adapters, config)
        super().__init__(config, model)
        self.encoder = encoder
        width, depth = self.base_lm.config.hidden_size, self.base_lm.config.num_hidden_layers
        self.embed_projection = nn.Linear(width, width, bias=False)
        self.layer_projections = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        self._init_projections()
        reference = self.base_lm.get_input_embeddings().weight
        self.embed_projection.to(device=reference.device, dtype=reference.dtype)
        self.layer_projections.to(device=reference.device, dtype=reference.dtype)
        self._states: torch.Tensor | None = None  # [batch, positions, layers, width] while injecting
        for i, layer in enumerate(decoder_layers(self.base_lm)):
            layer.register_forward_hook(self._inject_hook(i))
        self._decoder_state = False

    @torch.no_grad()
    def _init_projections(self) -> None:
        init = self.compressor_config.projection_init
        if init == "random":
            return  # nn.Linear's own init, as the public code
        nn.init.zeros_(self.embed_projection.weight)
        if init == "identity":
            self.embed_projection.weight.copy_(torch.eye(self.embed_projection.weight.shape[0]))
        for projection in self.layer_projections:
            nn.init.zeros_(projection.weight)

    # ----- what is saved --------------------------------------------------------------------
    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """The projections (and, with ``train_mode: full``, every trained tensor of the encoder copy and the
        decoder: all but the frozen vocabulary embedding); LoRA adapters are saved as PEFT adapters."""
        state = self.state_dict()
        if self.compressor_config.train_mode != "full":
            return {k: v for k, v in state.items() if k.startswith(("embed_projection.", "layer_projections."))}
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in trained}

    # ----- which weights run ----------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}))

    @contextlib.contextmanager
    def _running(self, role: str) -> Iterator[nn.Module]:
        """The LM that plays ``role`` (encoder or decoder), with that role's adapter active."""
        if self.compressor_config.train_mode == "full":
            yield self.encoder if role == self.ENCODER else self.base_lm
            return
        names = self.adapter_names
        adapters_off = self._decoder_state and self.DECODER not in names  # as_decoder() turned them off
        if role not in names:  # a decoder without its own adapter: the frozen base
            if adapters_off:
                yield self.base_lm
            else:
                with self.model.disable_adapter():
                    yield self.base_lm
            return
        if adapters_off:
            self.model.base_model.enable_adapter_layers()
        previous = self.model.active_adapter
        self.model.set_adapter(role)
        try:
            yield self.base_lm
        finally:
            self.model.set_adapter(previous)
            if adapters_off:
                self.model.base_model.disable_adapter_layers()
            # set_adapter leaves only the active adapter trainable; both train (the optimizer holds both)
            self.model.set_requires_grad(names, requires_grad=True)

    def as_decoder(self) -> RCCCompressor:
        """``model`` is the decoder from now on: its adapter active, or none when it has no adapter."""
        if self.compressor_config.train_mode == "lora" and not self._decoder_state:
            if self.DECODER in self.adapter_names:
                self.model.set_adapter(self.DECODER)
                self.model.set_requires_grad(self.adapter_names, requires_grad=True)  # what trains never changes
            else:
                self.model.base_model.disable_adapter_layers()  # PEFT's public switch (LoraModel)
            self._decoder_state = True
        return self

    @contextlib.contextmanager
    def plain_base(self) -> Iterator[None]:
        """The base without adapters (``train_mode: full`` trains the base itself: there is none to give)."""
        if self.compressor_config.train_mode == "full" or (self._decoder_state and
                                                           self.DECODER not in self.adapter_names):
            yield
            return
        with self.model.disable_adapter():
            yield

    @contextlib.contextmanager
    def reading(self, memory: Memory | None) -> Iterator[None]:
        with self._running(self.DECODER):
            yield

    # ----- encoder ------------------------------------------------------------------------
    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
        """Encode ``context_ids`` ([batch, length], left padding allowed) window by window; return the
        decoder's KV over [template prefix; placeholders] after injection (kind ``kv``)."""
        rows, prefix = self.template_rows(context_ids, attention_mask)
        states = self.encode_windows([row[prefix:] for row in rows])  # per row: [placeholders, L + 1, width]
        return self._decode_placeholders([row[:prefix] for row in rows], states, [len(row) for row in rows])

    def check_context(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        mask = super().check_context(context_ids, attention_mask)
        limit = getattr(self.base_lm.config, "max_position_embeddings", None)
        prefix, rate = self.template_tokens, self.compressor_config.rate
        longest = int(mask.sum(-1).max())
        needed = prefix + math.ceil((longest - prefix) / rate)
        if limit is not None and needed > limit:
            raise ContextTooLongError(
                f"a context of {longest} tokens needs {needed} decoder positions at rate {rate}, more than the "
                f"base model's {limit}")
        return mask

    def encode_windows(self, contexts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every layer's hidden state at the kept positions of each context's windows:
        ``[placeholders, num_layers + 1, width]`` per context (index 0: the embedding output)."""
        window, rate = self.compressor_config.window, self.compressor_config.rate
        pieces = [(row, start) for row, ids in enumerate(contexts) for start in range(0, len(ids), window)]
        kept: list[list[torch.Tensor]] = [[] for _ in contexts]
        step = self.compressor_config.encoder_batch_windows
        with self._running(self.ENCODER) as encoder:
            for first in range(0, len(pieces), step):
                batch = pieces[first:first + step]
                chunks = [contexts[row][start:start + window] for row, start in batch]
                width = max(len(c) for c in chunks)
                ids = torch.zeros(len(chunks), width, dtype=torch.long, device=chunks[0].device)
                mask = torch.zeros_like(ids)
                for i, chunk in enumerate(chunks):  # right padding: a causal encoder's real positions ignore it
                    ids[i, :len(chunk)], mask[i, :len(chunk)] = chunk, 1
                out = encoder.get_decoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                            use_cache=False)
                for i, ((row, _), chunk) in enumerate(zip(batch, chunks)):
                    positions = kept_positions(len(chunk), rate, device=ids.device)
                    # only the kept positions of each layer are copied (not every position: W x (L + 1) x d)
                    kept[row].append(torch.stack([layer[i, positions] for layer in out.hidden_states], dim=1))
        return [torch.cat(parts) for parts in kept]

    def _decode_placeholders(self, prefixes: list[torch.Tensor], states: list[torch.Tensor],
                             source_tokens: list[int]) -> Memory:
        """Run the decoder over [prefix tokens; placeholders] (left-padded rows) with the states injected."""
        embed = self.base_lm.get_input_embeddings()
        lengths = [len(p) + len(s) for p, s in zip(prefixes, states)]
        width, batch = max(lengths), len(states)
        device, dtype = states[0].device, states[0].dtype
        depth, hidden = states[0].shape[1], states[0].shape[2]
        inputs = torch.zeros(batch, width, hidden, device=device, dtype=dtype)
        injected = torch.zeros(batch, width, depth - 1, hidden, device=device, dtype=dtype)
        mask = torch.zeros(batch, width, dtype=torch.long, device=device)
        for i, (prefix, state) in enumerate(zip(prefixes, states)):
            start = width - lengths[i]
            if len(prefix):
                inputs[i, start:start + len(prefix)] = embed(prefix).to(dtype)
            inputs[i, start + len(prefix):] = self.embed_projection(state[:, 0])
            injected[i, start + len(prefix):] = state[:, 1:]
            mask[i, start:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self._running(self.DECODER) as decoder, self._injecting(injected):
            out = decoder.get_decoder()(inputs_embeds=inputs, attention_mask=mask, position_ids=positions,
                                        use_cache=True)
        return self.new_memory(kv_tensors(cache_of(out), mask), source_tokens=source_tokens, slots=width,
                               position_offset=lengths)

    # ----- injection ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _injecting(self, states: torch.Tensor) -> Iterator[None]:
        """While active, decoder layer i adds ``A_i(states[:, :, i])`` to its output (zeros where
        ``states`` is zero: the prefix and the padding, since the projections have no bias)."""
        self._states = states
        try:
            yield
        finally:
            self._states = None

    def _inject_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._states is None:
                return None
            added = self.layer_projections[index](self._states[:, :, index])
            if isinstance(output, tuple):
                return (output[0] + added.to(output[0].dtype), *output[1:])
            return output + added.to(output.dtype)

        return hook


def kept_positions(length: int, rate: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Positions of a window of ``length`` real tokens whose states are kept: the last of every group of
    ``rate`` tokens (c-1, 2c-1, ...), and the last real token of a final partial group."""
    ends = torch.arange(rate - 1, length + rate - 1, rate, device=device)
    return ends.clamp(max=length - 1)
