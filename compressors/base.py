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
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .compat import cache_of, with_cache
from .conversation import ConversationLayout
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


#: Evaluation tasks a method package brings beyond the shared synthetic tasks and benchmarks (task name ->
#: module path, imported only by ``python -m ctxzip.eval``). The module defines ``Arguments``, a dataclass of the
#: task's own flags (they join ``EvalConfig``'s in the CLI and its ``--help``), and ``run(config, arguments)``,
#: which evaluates ``config.compressors`` on the task, writes ``report.md`` into ``config.output_dir`` and
#: returns the report's path.
EVAL_TASKS: dict[str, str] = {}


def register_eval_task(name: str, module: str) -> None:
    """Make ``python -m ctxzip.eval --tasks <name>`` run the evaluation defined in ``module`` (see ``EVAL_TASKS``)."""
    EVAL_TASKS[name] = module


def compressor_class(compressor_type: str) -> type[Compressor]:
    if compressor_type not in COMPRESSORS:
        raise UnknownCompressorError(
            f"unknown compressor {compressor_type!r}; registered: {sorted(COMPRESSORS)}")
    return COMPRESSORS[compressor_type]


@dataclass
class CompressorConfig:
    """Hyper-parameters shared by every compressor; subclasses add their own fields."""

    max_context_tokens: int = dataclasses.field(default=8192, metadata={
        "help": "longest context (template prefix included) a compress() call accepts, in tokens"})

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
    """A context compressor bound to a base causal LM: the one contract every method implements.

    **Encoder.** ``compress(context_ids, attention_mask, query_ids, query_mask) -> Memory`` (differentiable
    when training; ``query_mask`` marks the real tokens of padded query rows). ``context_ids`` is the beginning of a conversation as ``ConversationLayout.context_ids``
    lays it out (the chat template's prefix, then the context), left-padded; what stays uncompressed
    (e.g. the template tokens) is each method's choice and its docstring says which.
    ``compresses_template = False`` declares a method that receives the bare context instead and
    whose decoder puts the template's prefix before what the memory holds (a text rewriter).

    **Decoder.** ``decoder_forward(memory, input_ids, attention_mask, prompt_lengths=...)`` runs the
    decoder LM on prompt rows after the memory and reports what it read (``DecoderStep``);
    ``reading(memory)`` is the context in which the LM reads a memory (hooks, adapters disabled, ...)
    and ``reading(None)`` the one in which it is the plain decoder, so that generation without a memory
    works for every compressor. ``model`` outside ``reading`` is the decoder LM too: a method whose
    encoder has its own adapter enables it only inside ``encoding()`` once ``as_decoder()`` was called
    (CompressedLM does).

    **Kinds of memory and of method are types, not flags.** What a memory's kind implies is its ``KindRules``
    (``memory.KIND_RULES``): e.g. a compressor whose ``memory_kind`` is ``pool`` (InComeS) makes one row per
    context, each an item of a pool, and ``CompressedLM.compress`` of a list unites them into one row
    (``Memory.pooled()``). A training-free method whose memories come from one full prefill of the context
    (the full context, the KV-selection methods, Selective Context, EHPC) is a
    ``baselines.selection.PrefillSelection``: memories from a shared prefill (``prefill_needs`` /
    ``compress_from``), several ratios from one pass (``compress_ratios``), and how a memory made from a shared
    prefill is timed (``prefill_is_own_cost``). ``prepare()`` computes or loads what a method needs before its
    first compression (a calibration artifact: Q-Filters, EHPC), once; it is a no-op by default and the eval
    runner calls it for every method it builds. Every compressor gets the tokenizer through ``use_tokenizer``
    (CompressedLM and the eval runner call it).

    **Declared facts** (class attributes, never discovered by ``hasattr``), and why each is one and not a type
    (mostly: it cuts across the types above, so no type could say it):

    - ``memory_kind``: the name of the Memory kind it makes (the kind's ``KindRules`` are the type);
    - ``compresses_template``: ``False`` for a method that receives the bare context and whose decoder puts the
      template's prefix before what the memory holds (CoLoR's text, InComeS's pool: two kinds, one fact);
    - ``uses_query``: ``compress`` reads ``query_ids`` (EHPC, a selection method; QD-LCIRC, a learned one);
    - ``memory_per_query``: the memory is meant to be made for one question, so the eval runner compresses the
      context once per question and charges that time (QD-LCIRC; EHPC reads a question when given one but
      makes one memory for many prompts: a use of the method, not what it can read);
    - ``compresses_passages``: ``compress_passages`` compresses a corpus passage by passage (CoLoR), which the
      eval runner does on a corpus task; not the same fact as the ``text`` kind (a text memory can be made of a
      whole context: CoLoR's own ``compress`` does);
    - ``reads_beyond_window``: ``compress`` accepts contexts longer than the base model's position table
      (truncation, RCC, LCIRC: training-free and learned alike); the method checks what its decoder needs itself;
    - ``supports_gradient_checkpointing``: training with the base model's gradient checkpointing gives the
      right gradients (``False``: recipes refuse it; RCC), a fact about training, not about memories;
    - ``card_note``: what the model card says about the method (text, not a capability).
    """

    compressor_type: ClassVar[str] = ""
    config_class: ClassVar[type[CompressorConfig]] = CompressorConfig
    memory_kind: ClassVar[str] = "kv"
    compresses_template: ClassVar[bool] = True
    uses_query: ClassVar[bool] = False
    memory_per_query: ClassVar[bool] = False  # implies uses_query: one memory per question is how it is used
    compresses_passages: ClassVar[bool] = False
    reads_beyond_window: ClassVar[bool] = False
    supports_gradient_checkpointing: ClassVar[bool] = True
    card_note: ClassVar[str] = ""

    def __init__(self, config: CompressorConfig, model: PreTrainedModel) -> None:
        super().__init__()
        # Not ``self.config``: transformers' Trainer reads ``model.config`` as a PretrainedConfig.
        self.compressor_config = config
        self.model = model
        self.base_name = base_model_id(self.base_lm)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.layout: ConversationLayout | None = None

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

    def use_tokenizer(self, tokenizer: PreTrainedTokenizerBase, use_chat_template: bool = True) -> Compressor:
        """Bind the tokenizer and the conversation layout the memory will sit in."""
        self.tokenizer = tokenizer
        self.layout = ConversationLayout(tokenizer, use_chat_template=use_chat_template)
        return self

    @property
    def template_tokens(self) -> int:
        """How many leading context tokens are the chat template's prefix (0 before ``use_tokenizer``)."""
        if self.layout is None or not self.compresses_template:
            return 0
        return len(self.layout.prefix_ids)

    def release_training_state(self) -> None:
        """Free what only training needs (e.g. a frozen teacher copy); called on a compressor loaded for use."""

    # ----- preparation and passages ---------------------------------------------------------
    def prepare(self) -> Any:
        """Compute or load what the method needs before its first compression (a calibration artifact), once:
        a second call does no work. A no-op by default."""

    def compress_passages(self, passages: list[str], layout: Callable[[list[str]], str]) -> Memory:
        """A corpus compressed passage by passage, laid out by ``layout`` (``compresses_passages``)."""
        raise NotImplementedError(f"{self.compressor_type} does not declare compresses_passages")

    # ----- encoder ------------------------------------------------------------------------
    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
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
        if limit is not None and longest > limit and not self.reads_beyond_window:
            raise ContextTooLongError(f"context of {longest} tokens exceeds the base model's {limit} positions")
        return attention_mask

    def template_rows(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      ) -> tuple[list[torch.Tensor], int]:
        """Each row's real tokens and how many of them lead with the chat template's prefix, for a method that
        keeps that prefix uncompressed (RCC, LCIRC, SoftPromptComp): the context is checked, and a row must hold
        more than the prefix."""
        if self.layout is None:  # which leading tokens are the template's depends on it
            raise RuntimeError(f"bind the tokenizer first (compressor.use_tokenizer(tokenizer)): {self.compressor_type} "
                               "keeps the chat template's prefix uncompressed, in training exactly as in CompressedLM")
        attention_mask = self.check_context(context_ids, attention_mask)
        rows = [ids[mask.bool()] for ids, mask in zip(context_ids, attention_mask)]
        prefix = self.template_tokens
        if any(len(row) <= prefix for row in rows):
            raise ValueError("a context row holds only the chat template's prefix: nothing to compress")
        return rows, prefix

    def shared_template_prefix(self, rows: list[torch.Tensor], prefix: int) -> list[int]:
        """The template prefix every row starts with (a method that keeps it as text once, in ``meta``)."""
        prefixes = {tuple(row[:prefix].tolist()) for row in rows}
        if len(prefixes) != 1:
            raise ValueError("the rows of a batch start with different template prefixes")
        return list(prefixes.pop())

    def new_memory(self, tensors: dict[str, torch.Tensor], source_tokens: list[int], slots: int,
                   position_offset: list[int], **extra: Any) -> Memory:
        return Memory(kind=self.memory_kind, tensors=tensors, source_tokens=source_tokens, slots=slots,
                      position_offset=position_offset, compressor_type=self.compressor_type,
                      base_signature=self.base_signature, **extra)

    @contextlib.contextmanager
    def encoding(self) -> Iterator[None]:
        """Context in which ``model`` is the encoder (default: the same model as the decoder)."""
        yield

    def as_decoder(self) -> Compressor:
        """Make ``model`` the decoder LM outside ``encoding()`` from now on (inference: CompressedLM does
        it). A method whose encoder has its own adapter disables it here; training keeps it enabled
        (PEFT's switch also flips ``requires_grad``, which an optimizer must see on)."""
        return self

    @contextlib.contextmanager
    def plain_base(self) -> Iterator[None]:
        """Context in which ``base_lm`` has none of this compressor's adapters (what a training-free
        baseline sharing its weights must read); the adapters' state comes back on exit."""
        yield

    # ----- decoder ------------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(self, memory: Memory | None) -> Iterator[None]:
        """Context in which the base LM reads ``memory`` (``None``: plain generation); default: nothing."""
        yield

    def check_memory(self, memory: Memory) -> None:
        """Raise a clear error when this decoder cannot read ``memory``."""
        memory.check_base(self.base_signature)
        if memory.kind != self.memory_kind:
            raise ValueError(f"a {self.compressor_type} compressor reads {self.memory_kind!r} memories, "
                             f"got a {memory.kind!r} memory made by {memory.compressor_type!r}")

    def decoder_forward(self, memory: Memory, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        use_cache: bool = True, prompt_lengths: torch.Tensor | None = None) -> DecoderStep:
        """Run the decoder on ``input_ids`` (left- or right-padded rows) after the memory.

        ``prompt_lengths[i]`` says where row ``i``'s prompt ends and what follows it (a reply being
        trained or scored) begins, so that a read-time selector never looks past the prompt; ``None``
        means every input token is prompt. The default reads a ``kv`` memory as a cache prefix.
        """
        self.check_memory(memory)
        memory = memory.expand(input_ids.shape[0])
        full_mask, position_ids = memory_prefix(memory, attention_mask)
        out = self.base_lm(input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids,
                           use_cache=use_cache, **with_cache(memory.to_cache()))
        return DecoderStep(logits=out.logits, cache=cache_of(out), attention_mask=full_mask,
                           next_position=position_ids[:, -1] + 1, memory_tokens=memory.real_slots)

    def forward(self, context_ids: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, context_mask: torch.Tensor | None = None,
                query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
                lm_loss: HiddenStateLoss | None = None, prompt_lengths: torch.Tensor | None = None,
                teacher_ids: torch.Tensor | None = None, teacher_mask: torch.Tensor | None = None,
                teacher_labels: torch.Tensor | None = None, **_: Any) -> dict[str, Any]:
        """Compress the context, decode the target reading the memory, return the LM loss.

        Returns ``loss`` (mean over examples), ``per_example_loss`` (so that a trainer can weight
        objectives per example), the achieved ``ratio`` and ``metrics`` (what the method reports about this
        step, e.g. SoftPromptComp's gate values: ``memory.meta['metrics']``; the trainer logs their means). With ``lm_loss(hidden, head, labels)``
        (e.g. a fused linear cross-entropy) the decoder's logits are never made: the LM head passes
        its input through and ``lm_loss`` computes the per-example loss from the hidden states.

        With the full-context teacher (``teacher_ids`` / ``teacher_mask`` / ``teacher_labels``, all three:
        ``trainers.collator.MemoryCollator(with_teacher=True)``) it also returns ``per_example_kl``, the
        distillation term of ``distillation_kl`` (ICAE / xRAG-style: the plain base reading the whole context
        is what the memory should let the decoder predict).
        """
        teacher = _teacher_tensors(teacher_ids, teacher_mask, teacher_labels)
        with self.encoding():
            memory = self.compress(context_ids, context_mask, query_ids=query_ids, query_mask=query_mask)
        hidden_only = hidden_states_as_logits(self.base_lm) if lm_loss else contextlib.nullcontext()
        with self.reading(memory), hidden_only as head:
            step = self.decoder_forward(memory, input_ids, attention_mask, use_cache=False,
                                        prompt_lengths=prompt_lengths)
        losses = lm_loss(step.logits, head, labels) if lm_loss else per_example_lm_loss(step.logits, labels)
        out = {"loss": losses.mean(), "per_example_loss": losses, "ratio": memory.ratio,
               "metrics": dict(memory.meta.get("metrics", {}))}
        if teacher is not None:  # after the block above: the LM head is a head again
            out["per_example_kl"] = self.distillation_kl(step.logits, labels, *teacher, head=head if lm_loss else None)
        return out

    def distillation_kl(self, student: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor,
                        teacher_mask: torch.Tensor, teacher_labels: torch.Tensor, head: nn.Linear | None = None,
                        ) -> torch.Tensor:
        """Per example, the mean over its labelled tokens of KL(teacher || student) between next-token
        distributions: the teacher is the plain base (``plain_base()``, no gradient) reading ``teacher_ids``
        (left-padded; positions from the mask, as generation numbers them), the student is the decoder whose
        ``student`` logits over ``labels``' rows were just computed (hidden states when ``head`` is given: the
        fused loss, whose logits are then made here at the labelled positions only). ``teacher_labels`` must label
        the same tokens, in the same order, as ``labels`` does (what ``per_example_lm_loss`` scores). Neither
        side makes logits beyond the labelled positions (the teacher through ``logits_to_keep``)."""
        picked, teacher_picked = labels[:, 1:] != -100, teacher_labels[:, 1:] != -100
        if not torch.equal(picked.sum(-1), teacher_picked.sum(-1)) or \
                not torch.equal(labels[:, 1:][picked], teacher_labels[:, 1:][teacher_picked]):
            raise ValueError("teacher_labels must label the same tokens, row by row and in the same order, as labels "
                             "(the student's first target token is never scored: no decoder position precedes it)")
        student_logits = student[:, :-1][picked]
        if head is not None:
            student_logits = head(student_logits)  # the module call (ZeRO-3 gathers its weight), not .weight
        teacher_logits = self._teacher_logits(teacher_ids, teacher_mask, teacher_picked)
        return per_example_kl(student_logits, teacher_logits, picked.nonzero()[:, 0], labels.shape[0])

    @torch.no_grad()
    def _teacher_logits(self, ids: torch.Tensor, mask: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        """The plain base's logits at the ``picked`` positions ([batch, length - 1]) of ``ids``: ``[picked, vocab]``.
        ``logits_to_keep`` keeps the columns any row picks (left padding aligns the rows' replies at the end)."""
        limit = getattr(self.base_lm.config, "max_position_embeddings", None)
        longest = int(mask.sum(-1).max())
        if limit is not None and longest > limit:
            raise ContextTooLongError(f"the distillation teacher reads the context and the target, {longest} tokens, "
                                      f"more than the base model's {limit} positions: shorten them or turn it off")
        columns = picked.any(0).nonzero()[:, 0]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with self.plain_base():
            logits = self.base_lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                  logits_to_keep=columns).logits
        return logits[picked[:, columns]]


def _teacher_tensors(ids: torch.Tensor | None, mask: torch.Tensor | None, labels: torch.Tensor | None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The teacher's three tensors, or ``None`` when none is given; some but not all of them is an error."""
    given = [t is not None for t in (ids, mask, labels)]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("the distillation teacher needs teacher_ids, teacher_mask and teacher_labels together "
                         "(MemoryCollator(with_teacher=True) makes them)")
    return ids, mask, labels  # type: ignore[return-value]


def per_example_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, rows: torch.Tensor,
                   batch: int) -> torch.Tensor:
    """KL(teacher || student) of each token's next-token distributions (``[tokens, vocab]`` logits, in float),
    averaged per example over its tokens (``rows[i]``: token ``i``'s example; an example without any: 0), so a
    trainer can weight it per example as it weights ``per_example_loss``."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student and teacher logits must both be [tokens, vocab], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    student_log = nn.functional.log_softmax(student_logits.float(), dim=-1)
    teacher_log = nn.functional.log_softmax(teacher_logits.to(student_log.device).float(), dim=-1)
    token_kl = nn.functional.kl_div(student_log, teacher_log, reduction="none", log_target=True).sum(-1)
    totals = token_kl.new_zeros(batch).index_add(0, rows, token_kl)
    return totals / torch.bincount(rows, minlength=batch).clamp(min=1).to(totals.dtype)


class EncoderAdapter:
    """Mixin for a compressor whose encoder is ``model`` with a PEFT adapter the decoder must not use.

    Training leaves the adapter on (an optimizer must see its parameters require grad) and ``reading``
    turns it off; after ``as_decoder()`` it is off except inside ``encoding()``, so ``model`` is the
    plain base model a user expects. Subclasses say whether the adapter is the encoder's alone
    (``separate_encoder``).
    """

    model: Any
    _decoder_state: bool = False

    @property
    def separate_encoder(self) -> bool:
        return True

    def as_decoder(self) -> Any:
        if self.separate_encoder and not self._decoder_state:
            self.model.base_model.disable_adapter_layers()  # PEFT's public switch (LoraModel)
            self._decoder_state = True
        return self

    @contextlib.contextmanager
    def encoding(self) -> Iterator[None]:
        if not self._decoder_state:
            yield
            return
        self.model.base_model.enable_adapter_layers()
        try:
            yield
        finally:
            self.model.base_model.disable_adapter_layers()

    @contextlib.contextmanager
    def plain_base(self) -> Iterator[None]:
        from peft import PeftModel

        if self._decoder_state or not isinstance(self.model, PeftModel):  # off already, or no adapter at all
            yield
        else:
            with self.model.disable_adapter():
                yield

    @contextlib.contextmanager
    def reading(self, memory: Memory | None) -> Iterator[None]:
        """The decoder is the base model without the encoder's adapter."""
        if self.separate_encoder and not self._decoder_state:
            with self.model.disable_adapter():
                yield
        else:
            yield


@dataclass
class DecoderStep:
    """What the decoder did after reading the memory and the input rows.

    ``logits`` cover the input positions only; ``cache`` holds the memory and the input (for decoding
    on); ``next_position`` is each row's next position; ``memory_tokens`` what each row actually read
    of the memory (its real positions: slots, text tokens incl. any template prefix the decoder added).
    """

    logits: torch.Tensor
    cache: Any
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    memory_tokens: list[float] = dataclasses.field(default_factory=list)


def template_prefix_before(memory: Memory, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Input rows after the chat template's prefix a memory keeps as text (``meta['prefix_ids']``: LCIRC,
    InComeS): ``(ids, attention mask, position ids, prefix length)`` of ``[prefix; input]`` for every row."""
    batch = input_ids.shape[0]
    prefix = torch.tensor(memory.meta.get("prefix_ids", []), dtype=input_ids.dtype, device=input_ids.device)
    ids = torch.cat([prefix.expand(batch, -1), input_ids], dim=1)
    mask = torch.cat([attention_mask.new_ones(batch, len(prefix)), attention_mask], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, len(prefix)


def memory_prefix(memory: Memory, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How input rows continue after a memory of as many rows: ``(full attention mask, position ids)``.

    Slots are attended unless ``slot_mask`` hides them; input positions continue from each row's
    ``position_offset`` (padding inside the rows is skipped).
    """
    slots_mask = memory.slot_mask().to(device=attention_mask.device, dtype=attention_mask.dtype)
    offsets = torch.tensor(memory.position_offset, device=attention_mask.device)
    position_ids = offsets[:, None] + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return torch.cat([slots_mask, attention_mask], dim=1), position_ids


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
