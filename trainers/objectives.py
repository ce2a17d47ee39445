"""Training objectives for memory compressors, as small pieces that turn a row into decoder targets.

Every objective conditions the decoder on the Memory of ``context`` and puts labels on a target:
- ``autoencoding``: reconstruct the context (ICAE / 500xCompressor pretraining);
- ``continuation``: predict the text that follows the context (plain LM, no chat template);
- ``sft``: answer ``question`` about the context (chat template; labels on the answer only).
A row's objective follows from its ``task`` column; objective weights scale per-example losses.
The per-example LM loss itself comes from the compressor's forward: ``compressors.base.per_example_lm_loss``
on the logits, or the same quantity fused with the LM head (Liger-Kernel, no logits materialized) by
``trainers.fused_loss.per_example_lm_loss_from_hidden``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

OBJECTIVES = ("autoencoding", "continuation", "sft")
AUTOENCODING_PROMPT = "Repeat the text."


def objective_of(row: dict[str, Any]) -> str:
    task = row.get("task", "")
    if task in ("autoencoding", "reconstruction"):
        return "autoencoding"
    if task == "continuation" or not row.get("question"):
        return "continuation"
    return "sft"


@dataclass
class DecoderTarget:
    """Token ids the decoder reads after the memory, and which of them carry a loss."""

    input_ids: list[int]
    labels: list[int]


def chat_target(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> DecoderTarget:
    """User turn with ``question``, then the assistant's ``answer`` (and end of turn) as labels."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    reply = tokenizer(answer, add_special_tokens=False)["input_ids"]
    end = [tokenizer.convert_tokens_to_ids("<|im_end|>")] if "<|im_end|>" in tokenizer.get_vocab() else [
        tokenizer.eos_token_id]
    return DecoderTarget(prompt + reply + end, [-100] * len(prompt) + reply + end)


def build_target(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], max_target_tokens: int) -> DecoderTarget:
    objective = objective_of(row)
    if objective == "continuation":
        ids = tokenizer(row["answer"], add_special_tokens=False)["input_ids"][:max_target_tokens]
        return DecoderTarget(ids, list(ids))
    question = AUTOENCODING_PROMPT if objective == "autoencoding" else row["question"]
    target = chat_target(tokenizer, question, row["answer"])
    return DecoderTarget(target.input_ids[:max_target_tokens], target.labels[:max_target_tokens])


def validate_weights(weights: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(OBJECTIVES))
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; known: {list(OBJECTIVES)}")
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"objective weights must be >= 0 with at least one > 0, got {weights}")
    return {name: float(weights.get(name, 0.0)) for name in OBJECTIVES}
