"""95% intervals on every summary, and the verdict of a learned compressor against the best training-free
method within its memory bytes: a difference inside the intervals is a tie."""

from __future__ import annotations

import json
import math

import pytest

from ctxzip.eval.compare import print_table
from ctxzip.eval.metrics import bootstrap_interval, mean_interval, wilson_interval
from ctxzip.eval.report import interval_verdict, learned_vs_training_free, markdown
from ctxzip.eval.runner import collect
from ctxzip.eval.scoring import Summary, interval_fields, summarize


@pytest.mark.parametrize(("successes", "n", "low", "high"), [
    # by the formula: centre (p + z^2/2n) / (1 + z^2/n), half z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2), z = 1.96
    (0, 10, 0.0, 0.2775),  # z^2/n / (1 + z^2/n) = 0.38416 / 1.38416
    (5, 10, 0.2366, 0.7634),  # 0.5 -+ 1.41602 * sqrt(0.025 + 0.009604)
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),  # 0.5 -+ 1.88749 * sqrt(0.0025 + 0.00009604)
])
def test_wilson_interval_matches_the_formula(successes: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(successes, n) == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))


def test_wilson_interval_edges() -> None:
    assert all(math.isnan(v) for v in wilson_interval(0, 0))  # no samples: no proportion, the table shows "-"
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(-1, 10)
    narrow, wide = wilson_interval(50, 100, z=1.0), wilson_interval(50, 100, z=2.576)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]


def test_bootstrap_interval_is_deterministic_and_sensible() -> None:
    values = [math.sin(i) ** 2 for i in range(200)]
    first = bootstrap_interval(values)
    assert bootstrap_interval(values) == first  # a fixed seed: a report regenerates identically
    assert bootstrap_interval(values, seed=1) != first
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = 1.96 * sd / math.sqrt(len(values))  # the normal approximation, which the bootstrap nears at n = 200
    assert first[0] < mean < first[1]
    assert first[0] == pytest.approx(mean - half, abs=0.2 * half) and first[1] == pytest.approx(mean + half, abs=0.2 * half)
    # two values: resampled means are 0, 0.5, 1 with chances 1/4, 1/2, 1/4, so the 2.5% / 97.5% points are 0 / 1
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    assert bootstrap_interval([0.25] * 7) == (pytest.approx(0.25), pytest.approx(0.25))
    assert all(math.isnan(v) for v in bootstrap_interval([]))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(values, confidence=1.5)


def test_the_paired_ratio_interval_holds_the_ratio_and_pairing_narrows_it() -> None:
    import numpy as np

    from ctxzip.eval.metrics import bootstrap_interval, ratio_of_means_interval

    rng = np.random.default_rng(1)
    hardness = rng.lognormal(3.0, 0.6, size=100)  # some samples are hard for every method
    full, method = hardness, hardness * 1.2 * rng.lognormal(0.0, 0.05, size=100)
    low, high = ratio_of_means_interval(method, full)
    assert low < method.mean() / full.mean() < high and low > 1.1 and high < 1.3
    assert ratio_of_means_interval(method, full) == (low, high)  # seeded
    # apart, the two means' intervals overlap although every sample is about 1.2x worse
    assert bootstrap_interval(method)[0] < bootstrap_interval(full)[1]
    assert ratio_of_means_interval(full, full) == (1.0, 1.0)
    with pytest.raises(ValueError, match="equal lengths"):
        ratio_of_means_interval([1.0, 2.0], [1.0])


def test_a_mean_of_zeros_and_ones_gets_wilson_anything_else_the_bootstrap() -> None:
    assert mean_interval([1.0, 0.0, 1.0, 1.0], binary=True) == wilson_interval(3, 4)
    fractions = [1.0, 0.5, 0.0, 1.0]  # the shared-context mode: a sample's fraction of questions right
    assert mean_interval(fractions, binary=True) == bootstrap_interval(fractions)
    assert mean_interval([0.0] * 5, binary=False) == (0.0, 0.0)  # a BLEU of 0 everywhere is a continuous mean


def test_every_summary_carries_the_interval_of_each_mean() -> None:
    rows = [{"correct": float(i % 4 == 0), "answer_logprob": -0.1 * i, "bleu": 0.1 * (i % 7), "rouge_l": 0.0}
            for i in range(40)]
    summary = summarize(rows, {"method": "snapkv"})
    assert (summary["ci_low"], summary["ci_high"]) == wilson_interval(10, 40)
    assert summary["intervals"]["accuracy"] == list(wilson_interval(10, 40))
    low, high = summary["intervals"]["answer_logprob"]
    assert low < summary["answer_logprob"] < high and summary["intervals"]["bleu"][0] < summary["bleu"]
    assert summary["intervals"]["rouge_l"] == [0.0, 0.0]  # continuous: the bootstrap, even when all are 0 or 1
    assert "token_accuracy" not in summary["intervals"]  # no such number, no interval
    # continuation: no accuracy, the interval that ranks it is the perplexity's (the mean of the rows')
    continuation = [{"correct": float("nan"), "perplexity": 10.0 + i % 5} for i in range(30)]
    fields = interval_fields(continuation)
    assert fields["ci_low"] < sum(r["perplexity"] for r in continuation) / 30 < fields["ci_high"]
    summary = Summary.of(rows, "trained", "loglik")
    assert (summary.ci_low, summary.ci_high) == wilson_interval(10, 40)
    assert {"ci_low", "ci_high", "n", "intervals", "accuracy"} <= set(summary.as_row())
    assert math.isnan(Summary.of([], "x", "loglik").ci_low)


def test_the_verdict_needs_disjoint_intervals() -> None:
    assert interval_verdict((0.4, 0.6), (0.5, 0.7)) == "tie"  # overlapping: a difference inside the intervals
    assert interval_verdict((0.61, 0.8), (0.4, 0.6)) == "better"
    assert interval_verdict((0.1, 0.3), (0.4, 0.6)) == "worse"
    assert interval_verdict((11.0, 12.0), (13.0, 14.0), lower_is_better=True) == "better"  # perplexity
    assert interval_verdict((15.0, 16.0), (13.0, 14.0), lower_is_better=True) == "worse"
    assert interval_verdict(None, (0.4, 0.6)) == "-" and interval_verdict((math.nan, 0.5), (0.4, 0.6)) == "-"


def row(method: str, ratio: float, score: float, kib: float, ci: tuple[float, float], source: str | None = None,
        task: str = "passkey", key: str = "accuracy") -> dict:
    return {"task": task, "context_length": 1024, "method": method, "ratio": ratio, key: score, "source": source or method,
            "achieved_ratio": ratio or 3.9, "n": 100, "scoring": "generate", "memory_bytes": kib * 1024,
            "ci_low": ci[0], "ci_high": ci[1], "intervals": {key: list(ci)}}


def references(task: str = "passkey", key: str = "accuracy") -> list[dict]:
    return [row("full_context", 1.0, 0.8, 40.0, (0.71, 0.87), task=task, key=key),
            row("no_context", 0.0, 0.05, 0.0, (0.02, 0.11), task=task, key=key)]


def cells(table: str) -> list[list[str]]:
    return [line.strip("| ").split(" | ") for line in table.splitlines()[2:]]


def test_learned_against_the_best_training_free_method_within_its_bytes() -> None:
    learned = row("gist-smollm2", 0.0, 0.55, 8.0, (0.45, 0.65), source="out/gist-smollm2")
    base = [row("snapkv", 4.0, 0.9, 10.0, (0.83, 0.95)),  # better, but its memory is larger: not a competitor
            row("snapkv", 8.0, 0.5, 5.0, (0.40, 0.60)), row("truncation", 8.0, 0.2, 5.0, (0.13, 0.29))]
    [line] = cells(learned_vs_training_free(references() + base + [learned]))
    assert line == ["passkey", "1024", "native", "gist-smollm2 (3.9x, 8.0 KiB)", "0.550 [0.450, 0.650]",
                    "snapkv 8.0x (<= 8.0 KiB)", "0.500 [0.400, 0.600]", "+0.050", "tie",
                    "0.800 [0.710, 0.870]", "0.050 [0.020, 0.110]"]
    base[1].update(accuracy=0.3, ci_low=0.22, ci_high=0.40, intervals={"accuracy": [0.22, 0.40]})
    [line] = cells(learned_vs_training_free(references() + base + [learned]))
    assert line[5:9] == ["snapkv 8.0x (<= 8.0 KiB)", "0.300 [0.220, 0.400]", "+0.250", "better"]
    learned.update(accuracy=0.1, ci_low=0.05, ci_high=0.18)  # truncation counts as a training-free method
    [line] = cells(learned_vs_training_free(references() + base + [learned]))
    assert line[5:9] == ["snapkv 8.0x (<= 8.0 KiB)", "0.300 [0.220, 0.400]", "-0.200", "worse"]
    learned.update(memory_bytes=1024.0)  # nothing training-free fits in 1 KiB
    assert cells(learned_vs_training_free(references() + base + [learned]))[0][5:9] == ["none (<= 1.0 KiB)", "-", "-", "-"]


def test_without_bytes_the_same_requested_ratio_and_perplexity_ranks_lower_first() -> None:
    key = "perplexity"
    learned = row("rcc", 4.0, 12.0, math.nan, (11.0, 13.0), source="out/rcc", task="continuation", key=key)
    base = [row("snapkv", 4.0, 20.0, 10.0, (18.0, 22.0), task="continuation", key=key),
            row("streaming_llm", 4.0, 15.0, 10.0, (14.0, 16.0), task="continuation", key=key),
            row("snapkv", 2.0, 11.0, 20.0, (10.0, 12.0), task="continuation", key=key)]
    [line] = cells(learned_vs_training_free(references("continuation", key) + base + [learned]))
    assert line[0] == "continuation (perplexity)" and line[3] == "rcc (4.0x, - KiB)"
    assert line[5:9] == ["streaming_llm 4.0x (ratio 4x)", "15.00 [14.00, 16.00]", "-3.00", "better"]


def test_a_task_beyond_the_model_gets_no_verdict_and_no_learned_method_no_table() -> None:
    rows = references() + [row("snapkv", 4.0, 0.02, 4.0, (0.0, 0.07)),
                           row("gist", 4.0, 0.25, 4.0, (0.17, 0.35), source="out/gist")]
    rows[0].update(accuracy=0.2)
    assert cells(learned_vs_training_free(rows))[0][8] == "beyond the model"
    assert learned_vs_training_free(rows[:3]) == ""
    unscored = dict(rows[-1], accuracy=None, ci_low=None, ci_high=None, intervals={})  # e.g. a loglik log-prob row
    assert learned_vs_training_free(rows[:-1] + [unscored]) == ""
    report = markdown(rows)
    assert "## Learned vs the best training-free method at the same bytes" in report
    assert "| snapkv | 4 | generate | 4.00 | 0.020 [0.000, 0.070] |" in report  # the per-task table's cells
    assert "Learned vs the best" not in markdown(rows[:3])


def test_a_recipe_prints_its_held_out_summaries_with_intervals_and_verdicts(capsys) -> None:
    def summary(method: str, correct: list[float], ratio: float, nbytes: float) -> Summary:
        rows = [{"correct": c, "answer_logprob": -1.0 - c, "achieved_ratio": ratio, "memory_bytes": nbytes}
                for c in correct]
        return Summary.of(rows, method, "loglik")

    summaries = [summary("trained", [1.0] * 30, 4.0, 2048), summary("truncation", [0.0] * 30, 4.0, 2048),
                 summary("full_context", [1.0] * 30, 1.0, 8192), summary("no_context", [0.0] * 30, math.nan, 0)]
    printed = print_table(summaries, "held-out passkey")
    assert "| trained | loglik | 1.000 [0.886, 1.000] |" in printed and printed in capsys.readouterr().out
    [line] = cells(printed.split("\n\n")[1])
    assert line[3:9] == ["trained (4.0x, 2.0 KiB)", "1.000 [0.886, 1.000]", "truncation 4.0x (<= 2.0 KiB)",
                         "0.000 [0.000, 0.114]", "+1.000", "better"]


def test_collect_gives_a_configuration_saved_without_intervals_its_intervals(tmp_path) -> None:
    rows = [{"correct": float(i < 3)} for i in range(10)]
    summary = {"task": "passkey", "context_length": 96, "method": "snapkv", "ratio": 4.0, "accuracy": 0.3}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "old.json").write_text(json.dumps({"summary": summary, "rows": rows}))
    [collected] = collect(tmp_path)
    assert (collected["ci_low"], collected["ci_high"]) == pytest.approx(wilson_interval(3, 10))
