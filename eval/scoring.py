"""Score a compressor on question/answer rows: by teacher-forced log-likelihood or by generation.

``loglik`` (fast on CPU): the reply is teacher-forced after the memory and the question; a row is
correct when every reply token is the model's argmax (exactly what greedy decoding would emit
first), and its mean log-probability is reported too. ``generate``: greedy decoding, then
exact / substring match against the answer.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers.generation import BaseStreamer

from compressors import CompressedLM, Memory

from .metrics import substring_match
from .tables import Column
from .tables import markdown_table as render_table


@dataclass
class TeacherForced:
    """One row scored by teacher forcing the reply after the memory and the question."""

    correct: bool  # every answer token is the argmax
    answer_logprob: float  # mean log-probability of the answer tokens
    token_accuracy: float  # fraction of answer tokens that are the argmax (partial credit)
    prediction: str  # the argmax tokens, decoded


@dataclass
class Summary:
    method: str
    accuracy: float
    mean_logprob: float
    ratio: float
    memory_bytes: float
    n: int
    scoring: str
    token_accuracy: float = float("nan")  # loglik scoring only: mean fraction of answer tokens right

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def reply_ids(clm: CompressedLM, answer: str, reply_prefix: str = "") -> list[int]:
    """The reply a user's generation is matched against: the answer (continuing ``reply_prefix``), then the
    end of the assistant's turn."""
    return clm.layout.reply_ids(answer, reply_prefix)


def score_loglik(clm: CompressedLM, memory: Memory, question: str, answer: str,
                 reply_prefix: str = "") -> tuple[bool, float, str]:
    """``(correct, mean answer log-prob, argmax prediction)`` of one row."""
    scored = teacher_forced(clm, memory, question, answer, reply_prefix)
    return scored.correct, scored.answer_logprob, scored.prediction


@torch.no_grad()
def teacher_forced(clm: CompressedLM, memory: Memory | None, question: str, answer: str,
                   reply_prefix: str = "") -> TeacherForced:
    """The reply teacher-forced after the memory, the question and ``reply_prefix`` (``memory=None``: the
    question alone): the reply greedy generation is matched against."""
    prompt = clm.prompt_ids(question, memory=memory is not None, reply_prefix=reply_prefix)
    reply = reply_ids(clm, answer, reply_prefix)
    ids = torch.tensor([prompt + reply], device=clm.device)
    with clm.compressor.reading(memory):
        if memory is None:
            all_logits = clm.model(input_ids=ids).logits
        else:
            all_logits = clm.compressor.decoder_forward(
                memory.to(clm.device), ids, torch.ones_like(ids), use_cache=False,
                prompt_lengths=torch.tensor([len(prompt)], device=clm.device)).logits
    logits = all_logits[0, len(prompt) - 1 : -1].float()
    target = torch.tensor(reply, device=logits.device)
    logprobs = torch.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1)
    predicted = logits.argmax(-1)
    hits = predicted[:-1] == target[:-1]  # the answer tokens; end-of-turn is not required
    return TeacherForced(correct=bool(hits.all()), answer_logprob=float(logprobs[:-1].mean()),
                         token_accuracy=float(hits.float().mean()), prediction=clm.tokenizer.decode(predicted[:-1]))


def score_rows(clm: CompressedLM, rows: Any, method: str, scoring: str = "loglik",
               max_new_tokens: int = 16, with_context: bool = True) -> tuple[Summary, list[dict[str, Any]]]:
    """Compress each row's context, answer its question, and summarise (``with_context=False``: the
    question alone, no memory: the floor every method is read against)."""
    if scoring not in ("loglik", "generate"):
        raise ValueError(f"scoring must be 'loglik' or 'generate', got {scoring!r}")
    predictions: list[dict[str, Any]] = []
    for row in rows:
        memory = clm.compress(row["context"]) if with_context else None
        token_accuracy = float("nan")
        prefix = row.get("answer_prefix") or ""
        if scoring == "loglik":
            scored = teacher_forced(clm, memory, row["question"], row["answer"], prefix)
            correct, logprob, prediction = scored.correct, scored.answer_logprob, scored.prediction
            token_accuracy = scored.token_accuracy
        else:
            prediction = str(clm.generate(row["question"], memory=memory, max_new_tokens=max_new_tokens,
                                          reply_prefix=prefix))
            correct, logprob = bool(substring_match(prediction, row["answer"])), float("nan")
        predictions.append({"method": method, "question": row["question"], "answer": row["answer"],
                            "prediction": prediction, "correct": correct, "answer_logprob": logprob,
                            "token_accuracy": token_accuracy,
                            "ratio": memory.ratio if memory is not None else float("nan"),
                            "memory_bytes": memory.nbytes if memory is not None else 0})
    n = max(1, len(predictions))
    summary = Summary(method=method, accuracy=sum(p["correct"] for p in predictions) / n,
                      mean_logprob=sum(p["answer_logprob"] for p in predictions) / n,
                      ratio=sum(p["ratio"] for p in predictions) / n,
                      memory_bytes=sum(p["memory_bytes"] for p in predictions) / n, n=len(predictions),
                      scoring=scoring, token_accuracy=sum(p["token_accuracy"] for p in predictions) / n)
    return summary, predictions


SUMMARY_COLUMNS = (
    Column("method", "method"), Column("scoring", "scoring"), Column("accuracy", "accuracy"),
    Column("answer-token acc", "token_accuracy"), Column("answer log-prob", "mean_logprob"),
    Column("achieved ratio", "ratio", digits=2), Column("memory KiB", cell=lambda s: s["memory_bytes"] / 1024, digits=1),
    Column("n", "n"))


def markdown_table(summaries: list[Summary]) -> str:
    """One row per summary, saying how it was scored; ``-`` where a scoring has no such number."""
    return render_table([s.as_row() for s in summaries], SUMMARY_COLUMNS)


@torch.no_grad()
def time_decode(clm: CompressedLM, memory: Memory, question: str, steps: int = 8) -> tuple[float, float]:
    """Seconds to read the prompt after ``memory`` and seconds per generated token, timed on the path a
    user takes (``CompressedLM.generate``: greedy, ``steps`` tokens, never stopping early).

    The prompt time is that of the first new token (reading the prompt after the memory); the per-token
    time is the mean interval between the following tokens, stamped by a streamer.
    """
    stamps = _TokenClock()
    start = time.perf_counter()
    clm.generate(question, memory=memory, max_new_tokens=steps + 1, min_new_tokens=steps + 1, streamer=stamps)
    times = stamps.times  # [generate's start (the prompt is put), first token, second token, ...]
    per_token = (times[-1] - times[1]) / max(1, len(times) - 2) if len(times) > 2 else float("nan")
    return times[1] - start, per_token


def time_many_prompts(clm: CompressedLM, context: str | None, prompts: list[str], max_new_tokens: int = 16,
                      reply_prefix: str = "") -> float:
    """Seconds, end to end, to compress ``context`` once and answer every prompt from that memory (batched
    by ``answer_many``); ``context=None``: the prompts alone. With the full-context compressor this is the
    prefix cache built once and reused, the fair competitor of any compressed memory."""
    start = time.perf_counter()
    if context is None:
        clm.generate(prompts, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, reply_prefix=reply_prefix)
    else:
        clm.answer_many(clm.compress(context), prompts, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                        reply_prefix=reply_prefix)
    return time.perf_counter() - start


def time_rereading(clm: CompressedLM, context: str, prompts: list[str], max_new_tokens: int = 16,
                   reply_prefix: str = "") -> float:
    """Seconds, end to end, to answer every prompt by reading the whole context again each time (what a
    user without any cache pays): one full prefill and one answer per prompt."""
    start = time.perf_counter()
    for prompt in prompts:
        clm.generate(prompt, memory=clm.compress(context), max_new_tokens=max_new_tokens,
                     min_new_tokens=max_new_tokens, reply_prefix=reply_prefix)
    return time.perf_counter() - start


class _TokenClock(BaseStreamer):
    """A streamer that only stamps the time of each ``put`` (the prompt first, then every token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def score_continuation(clm: CompressedLM, memory: Memory, continuation: str) -> float:
    """Mean negative log-likelihood per token of ``continuation`` read right after ``memory``
    (no prompt, no chat template): ``exp`` of it is the continuation perplexity."""
    ids = clm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError("a continuation needs at least two tokens")
    tensor = torch.tensor([ids], device=clm.device)
    memory = memory.to(clm.device)
    with clm.compressor.reading(memory):
        step = clm.compressor.decoder_forward(memory, tensor, torch.ones_like(tensor), use_cache=False)
    logits = step.logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, tensor[0, 1:]))
