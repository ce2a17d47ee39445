"""Batches for memory compressors: left-padded contexts and right-padded decoder targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ctxzip.compressors.conversation import ConversationLayout
from ctxzip.compressors.padding import left_pad, right_pad

from .objectives import OBJECTIVES, DecoderTarget, build_target, memory_context, objective_of


@dataclass
class MemoryCollator:
    """Tokenize rows with ``context`` / ``question`` / ``answer`` into a compressor training batch.

    The composition is ``CompressedLM``'s (``ConversationLayout``): a context is the beginning of a
    conversation (the chat template's prefix, then the context, and the question too under instruction
    reconstruction: its last tokens when it is longer than ``max_context_tokens``), left-padded (segments are cut from the right, so padding stays in the first);
    decoder targets (prompt + reply) are right-padded with labels -100 on padding, and ``prompt_lengths``
    marks where each row's prompt ends.

    ``with_teacher``: each batch also carries the full-context teacher of distillation (``Compressor.forward``'s
    ``per_example_kl``): ``teacher_ids`` / ``teacher_mask``, each row's context ids exactly as built here (template
    prefix + context, truncated alike) followed by its target ids, i.e. ``ConversationLayout.conversation_ids``
    plus the reply, the tokens plain generation reads for that conversation; left-padded (the forward numbers
    positions from the mask, as generation does, and the rows' replies end in the same columns); and
    ``teacher_labels``, the labels the student's loss scores, at the teacher's positions. Every objective gets
    one: an answer-like row's teacher reads context, prompt, reply; a continuation row's, the context then
    the continuation; autoencoding / reconstruction rows' teacher sees the text it copies (an upper bound the
    memory is pulled towards). A target's first token is not labelled there: the student's decoder has no
    position before it, so its loss never scores it, and the two must score the same tokens.
    """

    tokenizer: PreTrainedTokenizerBase
    max_context_tokens: int = 4096
    max_target_tokens: int = 512
    use_chat_template: bool = True
    with_queries: bool = False  # QD compressors: each row's question as query_ids / query_mask (right-padded)
    with_teacher: bool = False  # distillation: the full-context teacher_ids / teacher_mask / teacher_labels
    layout: ConversationLayout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = ConversationLayout(self.tokenizer, use_chat_template=self.use_chat_template)

    def context_ids(self, context: str) -> list[int]:
        prefix = self.layout.prefix_ids
        room = self.max_context_tokens - len(prefix)
        if room < 1:
            raise ValueError(f"max_context_tokens={self.max_context_tokens} leaves no room after the "
                             f"{len(prefix)} tokens of the chat template's prefix")
        return prefix + self.layout.encode(context)[-room:]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id or 0
        contexts = [self.context_ids(memory_context(r)) for r in rows]
        context_ids, context_mask = left_pad(contexts, pad)
        targets = [build_target(self.layout, r, self.max_target_tokens) for r in rows]
        input_ids, attention_mask = right_pad([t.input_ids for t in targets], pad)
        labels, _ = right_pad([t.labels for t in targets], -100, width=input_ids.shape[1])
        objective = torch.tensor([OBJECTIVES.index(objective_of(r)) for r in rows])
        batch = {"context_ids": context_ids, "context_mask": context_mask, "input_ids": input_ids,
                 "attention_mask": attention_mask, "labels": labels, "objective": objective,
                 "prompt_lengths": torch.tensor([t.prompt_length for t in targets])}
        if self.with_queries:  # a row without a question gets an empty query (mask 0): QD-LCIRC does not mix it
            queries = [self.layout.encode(r["question"]) if r.get("question") else [] for r in rows]
            batch["query_ids"], batch["query_mask"] = right_pad(queries, pad)
        if self.with_teacher:
            batch.update(teacher_batch(contexts, targets, pad))
        return batch


def teacher_batch(contexts: list[list[int]], targets: list[DecoderTarget], pad: int) -> dict[str, torch.Tensor]:
    """The full-context teacher's rows (``MemoryCollator(with_teacher=True)``): context then target, left-padded,
    with the target's scored labels (all but its first token's) at the teacher's positions."""
    teacher_ids, teacher_mask = left_pad([c + t.input_ids for c, t in zip(contexts, targets)], pad)
    scored = [[-100] * (len(c) + min(1, len(t.labels))) + t.labels[1:] for c, t in zip(contexts, targets)]
    teacher_labels, _ = left_pad(scored, -100)
    return {"teacher_ids": teacher_ids, "teacher_mask": teacher_mask, "teacher_labels": teacher_labels}
