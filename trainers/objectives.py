"""Training objectives for memory compressors, as small pieces that turn a row into decoder targets.

Every objective conditions the decoder on the Memory of ``context`` and puts labels on a target:
- ``autoencoding``: reconstruct the context (ICAE / 500xCompressor pretraining);
- ``continuation``: predict the text that follows the context (right after the memory, no prompt);
- ``sft``: answer ``question`` about the context (labels on the answer and the end of the turn only);
- ``reconstruction``: copy a span of the context, cued by its first tokens (RCC's pre-training; the
  ``reconstruction`` task puts the cue in ``answer_prefix``: labels on the rest of the span only);
- ``instruction_reconstruction``: the question is compressed with the context (``memory_context``); the
  decoder regenerates the question, then answers it (RCC's remedy when the instruction is compressed too).
The memory is the beginning of a conversation and the target continues it, through the same
``compressors.conversation.ConversationLayout`` that ``CompressedLM`` uses at inference.
A row's objective follows from its ``task`` column; objective weights scale per-example losses.
The per-example LM loss itself comes from the compressor's forward: ``compressors.base.per_example_lm_loss``
on the logits, or the same quantity fused with the LM head (Liger-Kernel, no logits materialized) by
``trainers.fused_loss.per_example_lm_loss_from_hidden``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ctxzip.compressors.conversation import SEPARATOR, ConversationLayout, continuation_text

OBJECTIVES = ("autoencoding", "continuation", "sft", "reconstruction", "instruction_reconstruction")
AUTOENCODING_PROMPT = "Repeat the text."
INSTRUCTION_RECONSTRUCTION_PROMPT = "Repeat the question at the end of the text, then answer it."
INSTRUCTION_RECONSTRUCTION_TASK = "instruction_reconstruction"


def objective_of(row: dict[str, Any]) -> str:
    task = row.get("task", "")
    if task in ("autoencoding", "reconstruction", INSTRUCTION_RECONSTRUCTION_TASK):
        return task
    if task == "continuation" or not row.get("question"):
        return "continuation"
    return "sft"


def memory_context(row: dict[str, Any]) -> str:
    """The text the memory compresses for ``row``: its context, followed by its question under
    instruction reconstruction (the question is then part of what is compressed)."""
    if objective_of(row) == INSTRUCTION_RECONSTRUCTION_TASK:
        return row["context"] + SEPARATOR + row["question"]
    return row["context"]


def instruction_reconstruction_reply(row: dict[str, Any]) -> str:
    """The reply the decoder learns under instruction reconstruction: the question, then the answer (after
    its answer prefix when the row has one)."""
    prefix = row.get("answer_prefix") or ""
    answer = prefix + continuation_text(row["answer"], prefix)
    return row["question"] + "\n" + answer


@dataclass
class DecoderTarget:
    """Token ids the decoder reads after the memory, which of them carry a loss, and where the prompt ends."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int


def build_target(layout: ConversationLayout, row: dict[str, Any], max_target_tokens: int) -> DecoderTarget:
    """What follows the memory for ``row``, composed exactly as ``CompressedLM`` composes it at inference:
    the prompt (``layout.prompt_ids``: the rest of the user turn) then the reply (``layout.reply_ids``:
    the answer and the end of the turn) with labels on the reply only (a row's ``answer_prefix`` ends the
    prompt, as generation is given it); a continuation follows the memory directly, every token labelled."""
    objective = objective_of(row)
    if objective == "continuation":
        ids = layout.encode(row["answer"])[:max_target_tokens]
        return DecoderTarget(ids, list(ids), 0)
    if objective == INSTRUCTION_RECONSTRUCTION_TASK:
        prompt = layout.prompt_ids(INSTRUCTION_RECONSTRUCTION_PROMPT)
        reply = layout.reply_ids(instruction_reconstruction_reply(row))
    else:
        question = AUTOENCODING_PROMPT if objective == "autoencoding" else row["question"]
        prefix = (row.get("answer_prefix") or "") if objective in ("sft", "reconstruction") else ""
        prompt, reply = layout.prompt_ids(question, prefix), layout.reply_ids(row["answer"], prefix)
    ids, labels = prompt + reply, [-100] * len(prompt) + reply
    return DecoderTarget(ids[:max_target_tokens], labels[:max_target_tokens], min(len(prompt), max_target_tokens))


def validate_weights(weights: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(OBJECTIVES))
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; known: {list(OBJECTIVES)}")
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"objective weights must be >= 0 with at least one > 0, got {weights}")
    return {name: float(weights.get(name, 0.0)) for name in OBJECTIVES}
