"""The Compressor base class, its config dataclass, and the registry of compressor types."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from .compat import cache_of, with_cache
from .errors import ContextTooLongError, EmptyInputError, UnknownCompressorError
from .memory import Memory
from .models import base_model_id, model_signature

COMPRESSORS: dict[str, type[Compressor]] = {}


def register_compressor(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make ``cls`` buildable and loadable by its ``compressor_type``."""
    if not cls.compressor_type:
        raise ValueError(f"{cls.__name__} needs a compressor_type")
    COMPRESSORS[cls.compressor_type] = cls
    return cls


def compressor_class(compressor_type: str) -> type[Compressor]:
    if compressor_type not in COMPRESSORS:
        raise UnknownCompressorError(
            f"unknown compressor {compressor_type!r}; registered: {sorted(COMPRESSORS)}")
    return COMPRESSORS[compressor_type]


@dataclass
class CompressorConfig:
    """Hyper-parameters shared by every compressor; subclasses add their own fields."""

    max_context_tokens: int = 8192

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompressorConfig:
        """Build from a dict, refusing unknown keys (a misspelled key must not be silently ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Compressor(nn.Module):
    """A context compressor bound to a base causal LM.

    Encoder side: ``compress(context_ids, attention_mask, query_ids) -> Memory`` (differentiable
    when training). Decoder side: ``decoder_forward(memory, input_ids, attention_mask)`` runs the
    base LM reading the memory, and ``reading(memory)`` is the context in which the LM reads it
    (hooks, adapters disabled, ...). Training-free baselines have no parameters.
    """

    compressor_type: ClassVar[str] = ""
    config_class: ClassVar[type[CompressorConfig]] = CompressorConfig
    memory_kind: ClassVar[str] = "kv"

    def __init__(self, config: CompressorConfig, model: PreTrainedModel) -> None:
        super().__init__()
        # Not ``self.config``: transformers' Trainer reads ``model.config`` as a PretrainedConfig.
        self.compressor_config = config
        self.model = model
        self.base_name = base_model_id(self.base_lm)

    # ----- facts about the base model ------------------------------------------------------
    @property
    def base_lm(self) -> PreTrainedModel:
        """The underlying transformers model, whether or not a PEFT wrapper is around it."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def base_signature(self) -> dict[str, Any]:
        return model_signature(self.base_lm.config)

    @property
    def config(self) -> Any:
        """The base model's config (what transformers utilities expect to find here)."""
        return self.base_lm.config

    @property
    def device(self) -> torch.device:
        return next(self.base_lm.parameters()).device

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors saved in ``compressor.safetensors``: the compressor's own, never the base model's."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    # ----- encoder ------------------------------------------------------------------------
    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None) -> Memory:
        raise NotImplementedError

    def check_context(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Validate a context batch and return its attention mask (all ones when none is given)."""
        if context_ids.dim() != 2:
            raise ValueError(f"context_ids must be [batch, length], got shape {tuple(context_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(context_ids)
        lengths = attention_mask.sum(-1)
        if context_ids.numel() == 0 or int(lengths.min()) == 0:
            raise EmptyInputError("cannot compress an empty context")
        longest = int(lengths.max())
        if longest > self.compressor_config.max_context_tokens:
            raise ContextTooLongError(
                f"context of {longest} tokens is longer than max_context_tokens="
                f"{self.compressor_config.max_context_tokens} of this {self.compressor_type} compressor")
        limit = getattr(self.base_lm.config, "max_position_embeddings", None)
        if limit is not None and longest > limit:
            raise ContextTooLongError(f"context of {longest} tokens exceeds the base model's {limit} positions")
        return attention_mask

    def new_memory(self, tensors: dict[str, torch.Tensor], source_tokens: list[int], slots: int,
                   position_offset: list[int], **extra: Any) -> Memory:
        return Memory(kind=self.memory_kind, tensors=tensors, source_tokens=source_tokens, slots=slots,
                      position_offset=position_offset, compressor_type=self.compressor_type,
                      base_signature=self.base_signature, **extra)

    # ----- decoder ------------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(self, memory: Memory) -> Iterator[None]:
        """Context in which the base LM reads ``memory`` (default: nothing to set up)."""
        yield

    def decoder_forward(self, memory: Memory, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        use_cache: bool = True) -> DecoderStep:
        """Run the LM on ``input_ids`` after the memory; the default reads a ``kv`` memory as a prefix."""
        memory.check_base(self.base_signature)
        repeat, full_mask, position_ids = memory_prefix(memory, input_ids, attention_mask)
        cache = memory.to_cache(repeat=repeat)
        out = self.base_lm(input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids,
                           use_cache=use_cache, **with_cache(cache))
        return DecoderStep(logits=out.logits, cache=cache_of(out), attention_mask=full_mask,
                           next_position=position_ids[:, -1] + 1)

    def forward(self, context_ids: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, context_mask: torch.Tensor | None = None,
                query_ids: torch.Tensor | None = None, lm_loss: HiddenStateLoss | None = None,
                **_: Any) -> dict[str, Any]:
        """Compress the context, decode the target reading the memory, return the LM loss.

        Returns ``loss`` (mean over examples), ``per_example_loss`` (so that a trainer can weight
        objectives per example) and the achieved ``ratio``. With ``lm_loss(hidden, head, labels)``
        (e.g. a fused linear cross-entropy) the decoder's logits are never made: the LM head passes
        its input through and ``lm_loss`` computes the per-example loss from the hidden states.
        """
        memory = self.compress(context_ids, context_mask, query_ids=query_ids)
        hidden_only = hidden_states_as_logits(self.base_lm) if lm_loss else contextlib.nullcontext()
        with self.reading(memory), hidden_only as head:
            step = self.decoder_forward(memory, input_ids, attention_mask, use_cache=False)
        losses = lm_loss(step.logits, head, labels) if lm_loss else per_example_lm_loss(step.logits, labels)
        return {"loss": losses.mean(), "per_example_loss": losses, "ratio": memory.ratio}


@dataclass
class DecoderStep:
    """What the decode loop needs after the LM has read the memory and a prompt."""

    logits: torch.Tensor
    cache: Any
    attention_mask: torch.Tensor
    next_position: torch.Tensor


def memory_prefix(memory: Memory, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """How prompts continue after a memory: ``(repeat, full attention mask, position ids)``.

    A one-row memory is repeated for every prompt row; slots are attended unless ``slot_mask``
    hides them; prompt positions continue from each row's ``position_offset``.
    """
    batch = input_ids.shape[0]
    if memory.batch_size not in (1, batch):
        raise ValueError(f"memory has {memory.batch_size} rows but the prompts have {batch}")
    repeat = batch if memory.batch_size == 1 else 1
    slots_mask = memory.tensors.get("slot_mask")
    if slots_mask is None:
        slots_mask = attention_mask.new_ones(batch, memory.slots)
    else:
        slots_mask = slots_mask.to(attention_mask.dtype).repeat_interleave(repeat, 0)
    offsets = torch.tensor(memory.position_offset * repeat, device=input_ids.device)
    position_ids = offsets[:, None] + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return repeat, torch.cat([slots_mask, attention_mask], dim=1), position_ids


HiddenStateLoss = Callable[[torch.Tensor, nn.Linear, torch.Tensor], torch.Tensor]


def output_head(model: nn.Module) -> nn.Linear:
    """The LM head of a transformers model (through a PEFT wrapper), checked to be a plain Linear."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        # A LoRA-wrapped or quantized head has no single weight matrix to fuse with.
        raise ValueError(f"a loss from hidden states needs a plain nn.Linear LM head, got {type(head).__name__}")
    return head


@contextlib.contextmanager
def hidden_states_as_logits(model: nn.Module) -> Iterator[nn.Linear]:
    """While active, ``model``'s LM head is the identity: its forwards return hidden states as "logits".

    Re-entrant; the head's class forward comes back on exit (an instance attribute shadows it, as for
    any ``nn.Module``). Yields the head, whose weight a fused loss multiplies with.
    """
    head = output_head(model)
    if "forward" in vars(head):  # already swapped by an outer context
        yield head
        return
    head.forward = _identity  # type: ignore[method-assign]
    try:
        yield head
    finally:
        del head.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def per_example_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per example over positions whose label is not -100."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    token_loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100,
        reduction="none").view(shift_labels.shape)
    counts = (shift_labels != -100).sum(-1).clamp(min=1)
    return token_loss.sum(-1) / counts


def num_segments(length: int, segment_length: int) -> int:
    return max(1, math.ceil(length / segment_length))
