"""Score a compressor on question/answer rows: by teacher-forced log-likelihood or by generation.

``loglik`` (fast on CPU): the reply is teacher-forced after the memory and the question; a row is
correct when every reply token is the model's argmax (exactly what greedy decoding would emit
first), and its mean log-probability is reported too. ``generate``: greedy decoding, then
exact / substring match against the answer.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from transformers.generation import BaseStreamer

from ctxzip.compressors import CompressedLM, Memory
from ctxzip.compressors.tables import Column, fmt, missing
from ctxzip.compressors.tables import markdown_table as render_table

from .metrics import mean_interval, substring_match, text_metrics

GENERATION_TASKS = ("autoencoding", "reconstruction")  # always scored by generation + text metrics


@dataclass
class TeacherForced:
    """One row scored by teacher forcing the reply after the memory and the question."""

    correct: bool  # every answer token is the argmax
    answer_logprob: float  # mean log-probability of the answer tokens
    token_accuracy: float  # fraction of answer tokens that are the argmax (partial credit)
    prediction: str  # the argmax tokens, decoded
    predicted_ids: list[int]  # the argmax token of every answer position


@dataclass
class Summary:
    """One method's results on a set of rows, under the names ``python -m ctxzip.eval``'s summaries use."""

    method: str
    scoring: str
    accuracy: float
    answer_logprob: float
    achieved_ratio: float
    memory_bytes: float
    n: int
    token_accuracy: float = float("nan")  # loglik scoring only: mean fraction of answer tokens right
    bleu: float = float("nan")  # generation scoring only: mean sentence BLEU-4 of the replies
    ci_low: float = float("nan")  # the 95% interval of the accuracy (``interval_fields``)
    ci_high: float = float("nan")
    intervals: dict[str, list[float]] = field(default_factory=dict)  # metric -> [low, high], every mean scored

    @classmethod
    def of(cls, rows: list[dict[str, Any]], method: str, scoring: str) -> Summary:
        summary = summarize(rows, {})
        return cls(method=method, scoring=scoring, n=len(rows),
                   **{f.name: summary[f.name] for f in fields(cls) if f.name not in ("method", "scoring", "n")})

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
                         token_accuracy=float(hits.float().mean()), prediction=clm.tokenizer.decode(predicted[:-1]),
                         predicted_ids=predicted[:-1].tolist())


def score_rows(clm: CompressedLM, rows: Any, method: str, scoring: str = "loglik",
               max_new_tokens: int = 16, with_context: bool = True) -> tuple[Summary, list[dict[str, Any]]]:
    """Compress each row's context, answer its question (``score_row``: the runner's scoring, row for row),
    and summarise (``with_context=False``: the question alone, no memory: the floor every method is read
    against)."""
    if scoring not in ("loglik", "generate"):
        raise ValueError(f"scoring must be 'loglik' or 'generate', got {scoring!r}")
    predictions: list[dict[str, Any]] = []
    for row in rows:
        memory = memory_for(clm, row["context"], row.get("question")) if with_context else None
        result = score_row(clm, memory, row, scoring, max_new_tokens)
        result.update(method=method, question=row["question"], answer=row["answer"],
                      achieved_ratio=memory.ratio if memory is not None else float("nan"),
                      memory_bytes=memory.nbytes if memory is not None else 0)
        predictions.append(result)
    return Summary.of(predictions, method, scoring), predictions


def memory_for(clm: CompressedLM, context: str, question: str | None) -> Any:
    """A row's memory: made for its question by a compressor whose memory is one per question (QD-LCIRC,
    ``memory_per_query``), query-agnostic otherwise."""
    per_query = clm.compressor.memory_per_query and bool(question)
    return clm.compress(context, query=question if per_query else None)


def score_shared(clm: CompressedLM, memory: Any, questions: list[dict[str, str]], scoring: str,
                 max_new_tokens: int, multi_turn: bool, context: str | None = None) -> dict[str, Any]:
    """The shared-context mode: every question of a sample answered from its ONE memory, each as the first
    question about it, or (``multi_turn``) as turns of one conversation that follow the model's own earlier
    answers. ``turn_correct[i]`` is question ``i``'s result; ``correct`` their mean. With ``context`` (a
    compressor whose memory is made per question) each question gets its own memory, made here and charged
    to the answer time."""
    results: list[float] = []
    predictions: list[str] = []
    turns: list[dict[str, str]] = []
    for item in questions:
        prefix = item["answer_prefix"]
        if context is not None:
            memory = memory_for(clm, context, item["question"])
        if scoring == "loglik":
            scored = teacher_forced(clm, memory, item["question"], item["answer"], prefix)
            results.append(float(scored.correct))
            predictions.append(scored.prediction)
            continue
        prompt: Any = item["question"]
        if multi_turn:
            turns.append({"role": "user", "content": item["question"]})
            prompt = list(turns)
        reply = str(clm.generate(prompt, memory=memory, max_new_tokens=max_new_tokens, reply_prefix=prefix))
        results.append(substring_match(reply, item["answer"]))
        predictions.append(reply)
        if multi_turn:
            turns.append({"role": "assistant", "content": f"{prefix} {reply}".strip()})
    return {"correct": sum(results) / len(results), "turn_correct": results, "prediction": " || ".join(predictions),
            "answer_logprob": float("nan")}


def synchronize(device: str | torch.device) -> None:
    """Wait for the work queued on ``device``, so that a wall-clock time covers it (CUDA runs asynchronously;
    the CPU needs no wait)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_row(clm: CompressedLM, memory: Any, row: dict[str, Any], scoring: str,
              max_new_tokens: int, multi_turn: bool = False) -> dict[str, Any]:
    task = row.get("task", "")
    synchronize(clm.device)
    start = time.perf_counter()
    out: dict[str, Any] = {}
    meta = json.loads(row["metadata"]) if row.get("metadata") else {}
    questions = meta.get("questions")
    if questions:
        per_query = memory is not None and clm.compressor.memory_per_query
        out.update(score_shared(clm, memory, questions, scoring, max_new_tokens, multi_turn,
                                context=row["context"] if per_query else None))
    elif task == "continuation":
        nll = score_continuation(clm, memory, row["answer"])
        out.update(correct=float("nan"), answer_logprob=-nll, perplexity=math.exp(nll), prediction="")
    elif task in GENERATION_TASKS or scoring == "generate":
        budget = max_new_tokens if task not in GENERATION_TASKS else len(clm.layout.encode(row["answer"])) + 8
        prediction = str(clm.generate(row["question"], memory=memory, max_new_tokens=budget,
                                      reply_prefix=row.get("answer_prefix") or ""))
        key = "exact_match" if task in GENERATION_TASKS else "substring_match"
        # a benchmark row may accept several answers (LongBench, RULER: metadata["answers"]): the best one counts
        metrics = max((text_metrics(prediction, str(answer)) for answer in meta.get("answers") or [row["answer"]]),
                      key=lambda m: (m[key], m.get("rouge_l", 0.0)))
        out.update(metrics, prediction=prediction, answer_logprob=float("nan"), correct=metrics[key])
    else:
        scored = teacher_forced(clm, memory, row["question"], row["answer"], row.get("answer_prefix") or "")
        out.update(correct=float(scored.correct), answer_logprob=scored.answer_logprob,
                   token_accuracy=scored.token_accuracy, prediction=scored.prediction)
    synchronize(clm.device)
    out["answer_s"] = time.perf_counter() - start
    return out


BINARY_KEYS = {"correct": "accuracy", "exact_match": "exact_match", "substring_match": "substring_match"}
CONTINUOUS_KEYS = {"token_accuracy": "token_accuracy", "answer_logprob": "answer_logprob", "perplexity": "perplexity",
                   "bleu": "bleu", "rouge_l": "rouge_l"}  # row key -> summary key: the quality means


def interval_fields(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The 95% intervals of a configuration's quality means (``metrics.mean_interval``: Wilson for 0/1 scores,
    a seeded bootstrap otherwise), as ``intervals`` (summary key -> ``[low, high]``), and ``ci_low`` /
    ``ci_high``: the interval of the score that ranks it, the accuracy or (no accuracy: continuation) the
    perplexity, which is the mean of the rows' perplexities as the summary's is."""
    intervals = {}
    for key, name in (*BINARY_KEYS.items(), *CONTINUOUS_KEYS.items()):
        values = [float(r[key]) for r in rows if not missing(r.get(key))]
        if values:
            intervals[name] = list(mean_interval(values, binary=key in BINARY_KEYS))
    primary = intervals.get("accuracy", intervals.get("perplexity", [float("nan")] * 2))
    return {"intervals": intervals, "ci_low": primary[0], "ci_high": primary[1]}


def interval_of(row: dict[str, Any], key: str) -> tuple[float, float] | None:
    """A summary's interval of ``key`` (``None`` when it has none: a summary written before intervals were)."""
    interval = (row.get("intervals") or {}).get(key)
    if interval is None or any(missing(v) for v in interval):
        return None
    return float(interval[0]), float(interval[1])


def with_interval(row: dict[str, Any], key: str, digits: int = 3) -> str:
    """The cell of a mean with its 95% interval, ``0.420 [0.331, 0.514]``; the mean alone without one."""
    value, interval = row.get(key), interval_of(row, key)
    if missing(value) or interval is None:
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(interval[0], digits)}, {fmt(interval[1], digits)}]"


def summarize(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    def mean(key: str) -> float:
        values = [r[key] for r in rows if not missing(r.get(key))]
        return sum(values) / len(values) if values else float("nan")

    summary = dict(meta, n=len(rows))
    turns = [r["turn_correct"] for r in rows if r.get("turn_correct")]
    if turns:  # the shared-context mode: accuracy of the i-th question about one memory
        summary["accuracy_by_turn"] = [sum(t[i] for t in turns) / len(turns) for i in range(len(turns[0]))]
    for key in ("correct", "answer_logprob", "token_accuracy", "achieved_ratio", "real_slots", "memory_bytes", "compress_s",
                "answer_s", "prompt_s", "decode_s_per_token", "n_prompts_s", "n_prompts_reread_s", "perplexity", "exact_match", "substring_match",
                "bleu", "rouge_l"):
        summary["accuracy" if key == "correct" else key] = mean(key)
    summary.update(interval_fields(rows))
    return summary


SUMMARY_COLUMNS = (
    Column("method", "method"), Column("scoring", "scoring"), Column("accuracy", cell=lambda s: with_interval(s, "accuracy")),
    Column("answer-token acc", cell=lambda s: with_interval(s, "token_accuracy")),
    Column("answer log-prob", cell=lambda s: with_interval(s, "answer_logprob")),
    Column("BLEU-4", cell=lambda s: with_interval(s, "bleu")),
    Column("achieved ratio", "achieved_ratio", digits=2), Column("memory KiB", cell=lambda s: s["memory_bytes"] / 1024, digits=1),
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
    stamps = _TokenClock()  # generate hands the streamer its tokens copied to the CPU: each stamp follows its token
    synchronize(clm.device)
    start = time.perf_counter()
    clm.generate(question, memory=memory, max_new_tokens=steps + 1, min_new_tokens=steps + 1, streamer=stamps)
    times = stamps.times  # [generate's start (the prompt is put), first token, second token, ...]
    per_token = (times[-1] - times[1]) / max(1, len(times) - 2) if len(times) > 2 else float("nan")
    return times[1] - start, per_token


def time_many_prompts(clm: CompressedLM, context: str | None, prompts: list[str], max_new_tokens: int = 16,
                      reply_prefix: str = "") -> float:
    """Seconds, end to end, to compress ``context`` once and answer every prompt from that memory (batched
    by ``answer_many``); ``context=None``: the prompts alone. With the full-context compressor this is the
    prefix cache built once and reused, the fair competitor of any compressed memory. A compressor whose
    memory is made per question compresses once per prompt, as it is used."""
    synchronize(clm.device)
    start = time.perf_counter()
    if context is None:
        clm.generate(prompts, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, reply_prefix=reply_prefix)
    elif clm.compressor.memory_per_query:
        for prompt in prompts:
            clm.generate(prompt, memory=memory_for(clm, context, prompt), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, reply_prefix=reply_prefix)
    else:
        clm.answer_many(clm.compress(context), prompts, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                        reply_prefix=reply_prefix)
    synchronize(clm.device)
    return time.perf_counter() - start


def time_rereading(clm: CompressedLM, context: str, prompts: list[str], max_new_tokens: int = 16,
                   reply_prefix: str = "") -> float:
    """Seconds, end to end, to answer every prompt by reading the whole context again each time (what a
    user without any cache pays): one full prefill and one answer per prompt."""
    synchronize(clm.device)
    start = time.perf_counter()
    for prompt in prompts:
        clm.generate(prompt, memory=clm.compress(context), max_new_tokens=max_new_tokens,
                     min_new_tokens=max_new_tokens, reply_prefix=reply_prefix)
    synchronize(clm.device)
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
def score_continuation(clm: CompressedLM, memory: Memory | None, continuation: str) -> float:
    """Mean negative log-likelihood per token of ``continuation`` read right after ``memory`` (no prompt:
    the context's own text goes on inside the first user turn); ``memory=None``: after the beginning of the
    conversation alone (the template's prefix, no context: the floor). ``exp`` of it is the continuation
    perplexity. Both score the same tokens: all but the first, which only the memory's last position
    would predict and ``decoder_forward`` returns the logits of the continuation's own positions."""
    ids = clm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError("a continuation needs at least two tokens")
    if memory is None:
        prefix = clm.layout.prefix_ids
        tensor = torch.tensor([prefix + ids], device=clm.device)
        logits = clm.model(input_ids=tensor).logits[0, len(prefix):-1].float()
    else:
        tensor = torch.tensor([ids], device=clm.device)
        memory = memory.to(clm.device)
        with clm.compressor.reading(memory):
            step = clm.compressor.decoder_forward(memory, tensor, torch.ones_like(tensor), use_cache=False)
        logits = step.logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], device=logits.device)))
