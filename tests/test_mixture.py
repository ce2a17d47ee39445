"""Tests for the held-out-template task families, `build_mixture`, the stdlib corpus and length-range training.

They use the embedded SmolLM2 tokenizer (tokenizer only, no model), as the other data-building tests do.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sys

import datasets
import pytest

from ctxzip.compressors.models import TINY_MODEL, load_tokenizer
from ctxzip.data import TASKS, build_mixture, build_task, load_texts
from ctxzip.data.mixture import FAMILIES, MIXTURE_FAMILIES, Family, Templates, draw_length
from ctxzip.data.sources import _stdlib_files, _word_runs

TOLERANCE = 4  # a fit may stop a few tokens short of the target (a join merges tokens), never above it


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_MODEL)  # the embedded SmolLM2 tokenizer


def rows_of(tok, split: str, **kw) -> list[dict]:
    kw = {"num_samples": 60, "seed": 0, "min_tokens": 128, "max_tokens": 384, **kw}
    return build_mixture(tok, split=split, **kw).to_list()


def used_templates(family: Family, row: dict) -> tuple[set[str], set[str], set[str]]:
    """The needle, question and instruction templates (of both splits) that a built row's text contains: a
    needle template counts when its rendering with one of the row's facts is in the context."""
    meta = json.loads(row["metadata"])
    facts, asked = meta["facts"], meta["facts"][0]
    needles = {t for t in family.needles.of("all") for fact in facts if t.format(**fact) in row["context"]}
    questions = {t for t in family.questions.of("all") if t.format(**asked) in row["question"]}
    instructions = {t for t in family.instructions.of("all") if t in row["question"]}
    return needles, questions, instructions


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize("name", MIXTURE_FAMILIES)
def test_each_family_has_many_wordings_and_holds_a_third_out(name) -> None:
    family = FAMILIES[name]
    assert name in TASKS  # registered: build_task, train_tasks and the eval CLI see it
    for part, least in ((family.needles, 8), (family.questions, 6), (family.instructions, 6)):
        every = part.of("all")
        assert len(every) >= least and len(set(every)) == len(every)
        assert len(part.held_out) >= 2 and not set(part.train) & set(part.held_out)
        assert 0.2 <= len(part.held_out) / len(every) <= 0.45
    with pytest.raises(ValueError, match="split"):
        Templates(("a",), ("b",)).of("validation")


@pytest.mark.parametrize("name", MIXTURE_FAMILIES)
@pytest.mark.parametrize(("split", "other"), [("train", "test"), ("test", "train")])
def test_built_rows_use_only_their_split_templates(tok, name, split, other) -> None:
    family, seen = FAMILIES[name], set()
    for row in rows_of(tok, split, num_samples=60, families=[name], max_tokens=256):
        meta = json.loads(row["metadata"])
        needles, questions, instructions = used_templates(family, row)
        facts = meta["facts"]
        assert len(needles) >= 1 and len(questions) == 1 and len(instructions) == 1
        assert needles <= set(family.needles.of(split))
        assert questions <= set(family.questions.of(split)) and instructions <= set(family.instructions.of(split))
        # The other split's wordings appear nowhere in the row, for any of its facts.
        for template in family.needles.of(other):
            assert not any(template.format(**fact) in row["context"] for fact in facts), template
        assert not any(t.format(**facts[0]) in row["question"] for t in family.questions.of(other))
        assert not any(t in row["question"] for t in family.instructions.of(other))
        seen |= needles
    assert seen == set(family.needles.of(split))  # the rows reach every wording: the checks ran on all of them


def test_build_task_follows_the_same_split_rule(tok) -> None:
    family = FAMILIES["retrieve_word"]
    for row in build_task("retrieve_word", tok, num_samples=6, context_tokens=200, split="test"):
        needles, questions, _ = used_templates(family, row)
        assert needles <= set(family.needles.held_out) and questions <= set(family.questions.held_out)


# --------------------------------------------------------------------------- rows


def test_answer_sits_in_the_needle_at_its_depth(tok) -> None:
    for depth in (0.0, 0.5, 1.0):
        for row in rows_of(tok, "train", num_samples=24, depth=depth, min_tokens=256, max_tokens=1024):
            context, needle, answer = row["context"], row["needle"], row["answer"]
            meta = json.loads(row["metadata"])
            assert context.count(needle) == 1 and answer == meta["facts"][0]["value"]
            start = context.index(needle) + needle.index(answer)
            assert context[start : start + len(answer)] == answer
            # Only the asked fact holds the answer, and the question names the asked key.
            assert [f["value"] for f in meta["facts"]].count(answer) == 1 and meta["facts"][0]["key"] in row["question"]
            assert len({f["key"] for f in meta["facts"]}) == len(meta["facts"])
            # Depth is measured on the filler alone: leave out the other facts' needles (and their joining spaces).
            where = context.index(needle)
            others = [s for fact in meta["facts"][1:] for t in FAMILIES[row["task"]].needles.train
                      if (s := t.format(**fact)) in context]
            assert len(others) == len(meta["facts"]) - 1
            filler = len(context) - len(needle) - sum(len(s) + 1 for s in others)
            before = where - sum(len(s) + 1 for s in others if context.index(s) < where)
            assert abs(before / filler - depth) <= 0.1 + 100 / filler + 0.02
            # A neutral reply start: the family's, never a needle's wording (it would cue the needle).
            assert row["answer_prefix"] == FAMILIES[row["task"]].answer_prefix.format(**meta["facts"][0])
            assert row["answer_prefix"] not in context and row["depth"] == depth


def test_answers_are_short_and_of_their_family_form(tok) -> None:
    forms = {"retrieve_number": r"\d{6}", "retrieve_word": r"[a-z]+", "retrieve_name": r"[A-Z][a-z]+ [A-Z][a-z]+",
             "retrieve_date": r"\d{1,2} [A-Z][a-z]+ \d{4}", "kv_lookup": r"[A-Z2-9]{6}", "multi_fact": r"[A-Za-z0-9]+"}
    for row in rows_of(tok, "test", num_samples=60):
        assert re.fullmatch(forms[row["task"]], row["answer"]), row


def test_lengths_land_on_their_drawn_targets(tok) -> None:
    ds = build_mixture(tok, num_samples=40, split="train", seed=3, min_tokens=128, max_tokens=2048)
    targets = [json.loads(m)["target_tokens"] for m in ds["metadata"]]
    assert all(128 <= t <= 2048 for t in targets) and len(set(targets)) > 30
    for target, n, context in zip(targets, ds["context_tokens"], ds["context"]):
        assert target - TOLERANCE <= n <= target and n == len(tok(context, add_special_tokens=False).input_ids)


def test_length_draw_is_log_uniform_and_inclusive() -> None:
    rng = random.Random(0)
    draws = [draw_length(rng, 128, 2048) for _ in range(4000)]
    assert min(draws) >= 128 and max(draws) <= 2048
    assert 440 < statistics.median(draws) < 590  # the geometric mean, 512; a uniform draw's median is 1088
    assert sum(d < 256 for d in draws) / len(draws) == pytest.approx(0.25, abs=0.03)  # one doubling of four
    assert draw_length(rng, 300, 300) == 300


def test_mixture_is_deterministic_per_seed(tok) -> None:
    a, b = rows_of(tok, "train", num_samples=8), rows_of(tok, "train", num_samples=8)
    assert a == b
    assert rows_of(tok, "train", num_samples=4) == a[:4]  # row i does not depend on num_samples
    other = rows_of(tok, "train", num_samples=8, seed=1)
    assert [r["context"] for r in other] != [r["context"] for r in a]
    assert len({r["id"] for r in a}) == 8


def test_families_can_include_continuation_and_reconstruction(tok) -> None:
    ds = build_mixture(tok, num_samples=12, split="train", families=["retrieve_name", "continuation", "reconstruction"],
                       min_tokens=128, max_tokens=256, options={"continuation": {"answer_tokens": 8}})
    assert set(ds["task"]) == {"retrieve_name", "continuation", "reconstruction"}
    for row in ds:
        if row["task"] == "continuation":
            assert row["question"] == "" and json.loads(row["metadata"])["answer_tokens"] == 8
        assert row["answer"] and row["context_tokens"] <= json.loads(row["metadata"])["target_tokens"]


def test_bad_arguments_are_clear_errors(tok) -> None:
    good = {"num_samples": 2, "split": "train"}
    with pytest.raises(ValueError, match="unknown family 'retrieve_colour'"):
        build_mixture(tok, families=["retrieve_colour"], **good)
    with pytest.raises(ValueError, match="min_tokens=512 must not exceed max_tokens=256"):
        build_mixture(tok, min_tokens=512, max_tokens=256, **good)
    with pytest.raises(ValueError, match="at least one"):
        build_mixture(tok, families=[], **good)
    with pytest.raises(ValueError, match="not among the families"):
        build_mixture(tok, families=["kv_lookup"], options={"multi_fact": {"num_facts": 2}}, **good)
    with pytest.raises(ValueError, match="min_tokens must be an integer"):
        build_mixture(tok, min_tokens=0, **good)
    with pytest.raises(ValueError, match="num_samples"):
        build_mixture(tok, num_samples=0, split="train")
    with pytest.raises(ValueError, match="split"):
        build_mixture(tok, num_samples=2, split="validation")
    with pytest.raises(ValueError, match="num_distractors must be in"):
        build_task("retrieve_date", tok, num_samples=1, context_tokens=256, num_distractors=99)
    with pytest.raises(ValueError, match="too small"):
        build_task("multi_fact", tok, num_samples=1, context_tokens=40, num_facts=6)


# --------------------------------------------------------------------------- the stdlib corpus


def test_stdlib_corpus_is_read_offline_without_importing_and_split_by_module() -> None:
    train, test, everything = (load_texts("stdlib", split=s) for s in ("train", "test", "all"))
    assert train and test and not set(train) & set(test) and set(train) | set(test) <= set(everything)
    # Train repeats no run of 8 held-out words (not even across modules: gzip, bz2 and lzma share sentences).
    held_out = set().union(*(_word_runs(t) for t in test))
    assert all(_word_runs(t).isdisjoint(held_out) for t in train)
    words = [sum(len(t.split()) for t in texts) for texts in (test, everything)]
    assert words[1] > 50_000 and 0.03 < words[0] / words[1] < 0.3
    assert all(len(t.split()) >= 20 and "  " not in t for t in everything)
    assert load_texts("stdlib") == train
    import sysconfig
    from pathlib import Path

    modules = [m for m, _ in _stdlib_files(Path(sysconfig.get_paths()["stdlib"]))]
    assert "antigravity" in modules and "antigravity" not in sys.modules  # listed, parsed, never imported
    parts = [p for m in modules for p in m.split(".")]
    assert not {"test", "tests", "idlelib", "encodings"} & set(parts)
    assert not [p for p in parts if p.startswith("_") and not p.startswith("__")]


def test_stdlib_is_a_different_text_from_pydoc() -> None:
    stdlib, pydoc = load_texts("stdlib", split="all"), load_texts("pydoc", split="all")
    assert not set(stdlib) & set(pydoc)
    pydoc_runs = set().union(*(_word_runs(p) for p in pydoc))
    assert all(_word_runs(t).isdisjoint(pydoc_runs) for t in stdlib)


def test_held_out_corpus_rows_read_only_the_stdlib_test_split(tok) -> None:
    stdlib_test = set().union(*(_word_runs(t) for t in load_texts("stdlib", split="test")))
    stdlib_train = set().union(*(_word_runs(t) for t in load_texts("stdlib", split="train")))
    pydoc = set().union(*(_word_runs(t) for t in load_texts("pydoc", split="all")))
    for row in rows_of(tok, "test", num_samples=6, source="stdlib", min_tokens=256, max_tokens=512):
        runs = _word_runs(row["context"].replace(row["needle"], " "))
        assert runs & stdlib_test and not runs & pydoc and not runs & stdlib_train


# --------------------------------------------------------------------------- recipes' length range


def test_training_on_a_length_range(tok) -> None:
    from ctxzip.trainers.script_args import CompressorScriptArguments, build_train_dataset

    fixed = CompressorScriptArguments(train_tasks=["retrieve_number", "passkey"], train_samples_per_task=6,
                                      context_tokens=128)
    ranged = CompressorScriptArguments(train_tasks=["retrieve_number", "passkey"], train_samples_per_task=6,
                                       context_tokens=128, max_train_context_tokens=1024)
    # Unset, the rows are what they were: build_task at context_tokens, concatenated and shuffled.
    expected = datasets.concatenate_datasets([build_task(t, tok, num_samples=6, context_tokens=128, seed=0)
                                              for t in ("retrieve_number", "passkey")]).shuffle(seed=0)
    assert build_train_dataset(fixed, tok, seed=0).to_list() == expected.to_list()
    rows = build_train_dataset(ranged, tok, seed=0)
    assert rows.to_list() == build_train_dataset(ranged, tok, seed=0).to_list()
    assert sorted(rows["task"]) == sorted(["retrieve_number"] * 6 + ["passkey"] * 6) and len(set(rows["id"])) == 12
    lengths = rows["context_tokens"]
    assert min(lengths) >= 128 - TOLERANCE and max(lengths) <= 1024 and max(lengths) > 2 * min(lengths)
    assert all(json.loads(m)["split"] == "train" for m, t in zip(rows["metadata"], rows["task"]) if t != "passkey")
    spans = CompressorScriptArguments(train_tasks=["reconstruction"], train_samples_per_task=3, context_tokens=96,
                                      max_train_context_tokens=256, reconstruction_span_tokens=40)
    assert {json.loads(m)["span_tokens"] for m in build_train_dataset(spans, tok, seed=0)["metadata"]} == {40}
    with pytest.raises(ValueError, match="max_train_context_tokens=64 must be at least context_tokens=128"):
        CompressorScriptArguments(context_tokens=128, max_train_context_tokens=64)
