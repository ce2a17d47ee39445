"""eval.scoring: teacher-forced log-likelihood and generation scoring, summaries and the markdown table."""

import json
import math

import pytest
import torch

from ctxzip.compressors import CompressedLM
from ctxzip.compressors.baselines import FullContext, FullContextConfig, Truncation, TruncationConfig
from ctxzip.eval.metrics import normalize
from ctxzip.eval.scoring import Summary, markdown_table, reply_ids, score_loglik, score_rows

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = "The passkey is 58213. Remember it, because you will be asked about it later."
QUESTION = "What colour is the sky? It is blue"


@pytest.fixture
def clm(tiny) -> CompressedLM:
    """Full context on the tiny model, plain prompts (no chat template): reference logits are one forward.
    The larger init makes its greedy reply depend on what it read (the default one repeats the last token)."""
    model, tokenizer = tiny(initializer_range=0.2)
    return CompressedLM(FullContext(FullContextConfig(), model).eval(), tokenizer, use_chat_template=False)


def greedy_answer(clm: CompressedLM, context: str, question: str, n: int = 3) -> str:
    """The text the model itself emits first under greedy decoding (checked to re-tokenize the same)."""
    memory = clm.compress(context)
    tokens = clm.generate_ids([question], memory, max_new_tokens=n)[0]
    answer = clm.tokenizer.decode(tokens)
    assert clm.tokenizer(answer, add_special_tokens=False)["input_ids"] == tokens  # precondition of the test
    return answer


def reference_logprobs(clm: CompressedLM, context: str, question: str, answer: str) -> torch.Tensor:
    """Log-probabilities of the answer tokens from one plain forward over context + prompt + reply."""
    context_ids = clm.layout.context_ids(context)  # the template's prefix (if any) and the context
    prompt, reply = clm.prompt_ids(question), reply_ids(clm, answer)
    with torch.no_grad():
        logits = clm.model(input_ids=torch.tensor([context_ids + prompt + reply])).logits[0].float()
    start = len(context_ids) + len(prompt) - 1
    logprobs = torch.log_softmax(logits[start : start + len(reply)], -1)
    return logprobs.gather(-1, torch.tensor(reply)[:, None]).squeeze(-1)[:-1]  # without end of turn


def test_reply_ids_end_with_end_of_turn(clm: CompressedLM) -> None:
    ids = reply_ids(clm, " blue")
    assert ids[:-1] == clm.tokenizer(" blue", add_special_tokens=False)["input_ids"]
    assert ids[-1] in clm.stop_token_ids()


def test_loglik_of_the_models_own_greedy_answer_is_correct(clm: CompressedLM) -> None:
    answer = greedy_answer(clm, CONTEXT, QUESTION)
    correct, logprob, prediction = score_loglik(clm, clm.compress(CONTEXT), QUESTION, answer)
    assert correct is True
    assert prediction == answer
    reference = reference_logprobs(clm, CONTEXT, QUESTION, answer)
    assert logprob == pytest.approx(float(reference.mean()), abs=1e-4)
    assert logprob < 0


def test_loglik_of_another_answer_is_not_correct(clm: CompressedLM) -> None:
    greedy = greedy_answer(clm, CONTEXT, QUESTION)
    # The first token right, the second wrong: all answer tokens must be the argmax.
    first = clm.tokenizer(greedy, add_special_tokens=False)["input_ids"][0]
    wrong = clm.tokenizer.decode([first]) + " zebra"
    assert clm.tokenizer(wrong, add_special_tokens=False)["input_ids"][0] == first
    correct, logprob, prediction = score_loglik(clm, clm.compress(CONTEXT), QUESTION, wrong)
    assert correct is False
    assert prediction.startswith(clm.tokenizer.decode([first])) and prediction != wrong
    assert logprob == pytest.approx(float(reference_logprobs(clm, CONTEXT, QUESTION, wrong).mean()), abs=1e-4)
    # A less likely answer scores a lower log-probability than the greedy one.
    _, greedy_logprob, _ = score_loglik(clm, clm.compress(CONTEXT), QUESTION, greedy)
    assert logprob < greedy_logprob


def test_loglik_with_the_chat_template(tiny) -> None:
    model, tokenizer = tiny()
    clm = CompressedLM(FullContext(FullContextConfig(), model).eval(), tokenizer)
    assert clm.use_chat_template
    correct, logprob, _ = score_loglik(clm, clm.compress(CONTEXT), "What is the passkey?", "58213")
    assert correct is False  # a random model does not know the passkey
    reference = reference_logprobs(clm, CONTEXT, "What is the passkey?", "58213")
    assert logprob == pytest.approx(float(reference.mean()), abs=1e-4)


def test_score_rows_loglik_summary(clm: CompressedLM) -> None:
    greedy = greedy_answer(clm, CONTEXT, QUESTION)
    rows = [{"context": CONTEXT, "question": QUESTION, "answer": greedy},
            {"context": CONTEXT, "question": QUESTION, "answer": " zebra crossing"}]
    summary, predictions = score_rows(clm, rows, method="full_context")
    memory = clm.compress(CONTEXT)
    assert [p["correct"] for p in predictions] == [True, False]
    assert summary.accuracy == 0.5 and summary.n == 2 and summary.scoring == "loglik"
    assert summary.method == "full_context" and all(p["method"] == "full_context" for p in predictions)
    assert summary.achieved_ratio == 1.0 and summary.memory_bytes == memory.nbytes
    assert predictions[0]["memory_bytes"] == memory.nbytes and predictions[0]["achieved_ratio"] == memory.ratio
    assert summary.answer_logprob == pytest.approx(sum(p["answer_logprob"] for p in predictions) / 2)
    assert predictions[1]["answer_logprob"] < predictions[0]["answer_logprob"]
    assert set(summary.as_row()) == {"method", "accuracy", "answer_logprob", "achieved_ratio", "memory_bytes", "n",
                                     "scoring", "token_accuracy", "bleu", "ci_low", "ci_high", "intervals"}
    assert 0.0 <= summary.token_accuracy <= 1.0 and predictions[0]["token_accuracy"] == 1.0


def test_score_rows_generate(clm: CompressedLM) -> None:
    greedy = greedy_answer(clm, CONTEXT, QUESTION, n=2)
    rows = [{"context": CONTEXT, "question": QUESTION, "answer": greedy.upper() + "."},  # normalized match
            {"context": CONTEXT, "question": QUESTION, "answer": "zebra"}]
    summary, predictions = score_rows(clm, rows, method="full", scoring="generate", max_new_tokens=2)
    assert predictions[0]["prediction"] == greedy.strip()
    assert [p["correct"] for p in predictions] == [True, False]
    assert summary.accuracy == 0.5 and summary.scoring == "generate"
    assert all(math.isnan(p["answer_logprob"]) for p in predictions)
    # a benchmark row accepting several answers (LongBench's ``answers``): any of them counts
    several = {"context": CONTEXT, "question": QUESTION, "answer": "zebra",
               "metadata": json.dumps({"answers": ["zebra", greedy.upper()]})}
    _, predictions = score_rows(clm, [several], method="full", scoring="generate", max_new_tokens=2)
    assert predictions[0]["correct"]


def test_score_rows_reports_the_achieved_ratio_of_a_smaller_memory(tiny) -> None:
    model, tokenizer = tiny()
    clm = CompressedLM(Truncation(TruncationConfig(ratio=4.0), model).eval(), tokenizer, use_chat_template=False)
    summary, predictions = score_rows(clm, [{"context": CONTEXT, "question": QUESTION, "answer": " blue"}], "trunc")
    n = len(tokenizer(CONTEXT, add_special_tokens=False)["input_ids"])
    kept = math.ceil(n / 4)
    assert summary.achieved_ratio == pytest.approx(n / kept)
    assert predictions[0]["achieved_ratio"] == pytest.approx(n / kept)
    assert summary.memory_bytes == clm.compress(CONTEXT).nbytes


def test_score_rows_refuses_unknown_scoring(clm: CompressedLM) -> None:
    with pytest.raises(ValueError, match="scoring must be"):
        score_rows(clm, [], method="x", scoring="bleu")
    summary, predictions = score_rows(clm, [], method="x")
    assert predictions == [] and summary.n == 0 and math.isnan(summary.accuracy)


@pytest.mark.parametrize(("text", "expected"), [
    ("  The Answer. ", "the answer"),
    ("A  b\n c.", "a b c"),
    ("58213", "58213"),
    ("...Dots...", "dots"),
    ("", ""),
])
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_markdown_table() -> None:
    summaries = [Summary(method="gist", accuracy=0.75, answer_logprob=-1.23456, achieved_ratio=4.0, memory_bytes=2048.0,
                         n=8, scoring="loglik", token_accuracy=0.9),
                 Summary(method="full_context", accuracy=1.0, answer_logprob=-0.5, achieved_ratio=1.0, memory_bytes=10752.0,
                         n=8, scoring="loglik")]
    lines = markdown_table(summaries).splitlines()
    assert lines == [
        "| method | scoring | accuracy | answer-token acc | answer log-prob | BLEU-4 | achieved ratio | memory KiB | n |",
        "|---|---|---|---|---|---|---|---|---|",
        "| gist | loglik | 0.750 | 0.900 | -1.235 | - | 4.00 | 2.0 | 8 |",
        "| full_context | loglik | 1.000 | - | -0.500 | - | 1.00 | 10.5 | 8 |",  # no such number: "-"
    ]
    assert markdown_table([]).count("\n") == 1  # the header alone


def test_score_rows_without_context_reads_the_question_alone(clm: CompressedLM) -> None:
    rows = [{"context": CONTEXT, "question": QUESTION, "answer": " blue"}]
    summary, predictions = score_rows(clm, rows, method="no_context", with_context=False)
    prompt, reply = clm.prompt_ids(QUESTION, memory=False), reply_ids(clm, " blue")
    with torch.no_grad():
        logits = clm.model(input_ids=torch.tensor([prompt + reply])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(-1, torch.tensor(reply)[:, None])[:-1]
    assert predictions[0]["answer_logprob"] == pytest.approx(float(logprobs.mean()), abs=1e-4)
    assert summary.memory_bytes == 0 and math.isnan(summary.achieved_ratio)
    _, generated = score_rows(clm, rows, method="no_context", scoring="generate", max_new_tokens=3,
                              with_context=False)
    assert generated[0]["prediction"] == clm.generate(QUESTION, max_new_tokens=3)


@pytest.mark.parametrize(("reply", "answer", "expected"), [
    ("58213", "58213", True),  # the bare answer
    (" 58213.", "58213", True),  # after an answer prefix ("The pass key is")
    ("The pass key is 58213, remember it.", "58213", True),  # inside a sentence
    ("The pass key is 582130.", "58213", False),  # a wrong (longer) number
    ("The pass key is 48213.", "58213", False),  # a wrong number
    ("Tarsen", "tarsen", True),
])
def test_contains_match_on_known_replies(reply: str, answer: str, expected: bool) -> None:
    from ctxzip.eval.metrics import substring_match

    assert bool(substring_match(reply, answer)) is expected


def test_loglik_and_generate_agree_after_an_answer_prefix(clm: CompressedLM) -> None:
    prefix = "The answer is"
    memory = clm.compress(CONTEXT)
    tokens = clm.generate_ids([QUESTION], memory, max_new_tokens=2, reply_prefix=prefix)[0]
    answer = clm.tokenizer.decode(tokens).strip()
    assert clm.layout.reply_ids(answer, prefix)[:-1] == tokens  # precondition: the reply re-tokenizes the same
    row = {"context": CONTEXT, "question": QUESTION, "answer": answer, "answer_prefix": prefix}
    (loglik, _), (generate, _) = (score_rows(clm, [row], "m", scoring=s, max_new_tokens=2) for s in ("loglik", "generate"))
    assert loglik.accuracy == generate.accuracy == 1.0
    # the prompt ends with the prefix, which generation continues and teacher forcing scores after
    prompt = clm.prompt_ids(QUESTION, reply_prefix=prefix)
    assert prompt[-len(clm.layout.encode(prefix)):] == clm.layout.encode(prefix)
    wrong = score_rows(clm, [{**row, "answer": answer + "x"}], "m", scoring="loglik")[0]
    assert wrong.accuracy == 0.0


def test_many_prompts_compress_once_and_rereading_compresses_for_every_prompt(clm: CompressedLM, monkeypatch) -> None:
    from ctxzip.eval.scoring import time_many_prompts, time_rereading

    calls = []
    original = clm.compress
    monkeypatch.setattr(clm, "compress", lambda text: calls.append(text) or original(text))
    assert time_many_prompts(clm, CONTEXT, [QUESTION] * 3, max_new_tokens=2) > 0
    assert len(calls) == 1
    assert time_rereading(clm, CONTEXT, [QUESTION] * 3, max_new_tokens=2) > 0
    assert len(calls) == 1 + 3
    assert time_many_prompts(clm, None, [QUESTION] * 2, max_new_tokens=2) > 0 and len(calls) == 4
