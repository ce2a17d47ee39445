"""Tests for the `data` package: text sources, haystacks and synthetic tasks.

They use a tiny byte-level BPE tokenizer trained here on a few pydoc paragraphs: offline,
deterministic, lossless to decode (as real byte-level tokenizers are) and fast.
"""

from __future__ import annotations

import json
import random
import re

import datasets
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ctxzip.data import TASKS, Haystack, build_task, load_texts

# Tasks whose context is filler text sized to the target.  The count is always measured,
# and the budget corrected, but a needle or a cut can make a token merge differently at a
# join, so the fit may stop a few tokens short; it never goes above the target.
FILLER_TASKS = [t for t in TASKS if t not in ("kv_retrieval", "passage_retrieval")]  # these fill by whole records
FILLER_TOLERANCE = 4
NEEDLE_TASKS = ["passkey", "fact_qa", "niah_multikey", "kv_retrieval"]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """A 400-token byte-level BPE trained on 50 pydoc paragraphs (~0.1 s)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(load_texts("pydoc", split="train")[:50], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def count(tok: PreTrainedTokenizerFast, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


def build(tok: PreTrainedTokenizerFast, name: str, **kw) -> datasets.Dataset:
    kw = {"num_samples": 3, "context_tokens": 256, "seed": 0, **kw}
    return build_task(name, tok, **kw)


# --------------------------------------------------------------------------- sources


def test_pydoc_splits_are_disjoint_and_cover_all() -> None:
    train, test, everything = (load_texts("pydoc", split=s) for s in ("train", "test", "all"))
    assert train and test
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(everything)
    assert 0.05 < sum(len(t.split()) for t in test) / sum(len(t.split()) for t in everything) < 0.3
    assert all(len(t.split()) >= 20 and "  " not in t for t in everything)
    assert load_texts("pydoc") == train  # default split, deterministic


def test_pydoc_rejects_bad_split_and_kwargs() -> None:
    with pytest.raises(ValueError, match="split"):
        load_texts("pydoc", split="validation")
    with pytest.raises(TypeError, match="load_dataset"):
        load_texts("pydoc", streaming=True)


def test_local_files(tmp_path) -> None:
    words = " ".join(f"word{i}" for i in range(25))
    (tmp_path / "a.txt").write_text(f"{words}\n  spread over\nlines\n\nshort one\n\n\n{words} again\n")
    (tmp_path / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": f"{words} {i}", "id": i}) for i in range(3))
    )
    (tmp_path / "c.json").write_text(json.dumps([f"{words} json"]))
    txt = load_texts(str(tmp_path / "a.txt"), split="all")
    assert txt == [f"{words} spread over lines", f"{words} again"]
    assert len(load_texts(str(tmp_path / "b.jsonl"), split="all")) == 3
    assert load_texts(str(tmp_path / "c.json"), split="all") == [f"{words} json"]
    assert len(load_texts(str(tmp_path), split="all")) == 6
    train, test = (load_texts(str(tmp_path), split=s, min_words=1) for s in ("train", "test"))
    assert not set(train) & set(test)
    # A folder with files named after splits uses them whole.
    (tmp_path / "test.txt").write_text(f"held {words}")
    assert load_texts(str(tmp_path), split="test") == [f"held {words}"]


def test_local_errors(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"body": "x " * 30, "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['body', 'id'\]"):
        load_texts(str(path), split="all")
    assert load_texts(str(path), split="all", text_column="body") == [" ".join(["x"] * 30)]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_texts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="no text with at least 1000 words"):
        load_texts(str(path), split="all", text_column="body", min_words=1000)


# --------------------------------------------------------------------------- haystack


def test_haystack_token_target_and_determinism(tok) -> None:
    hay = Haystack(load_texts("pydoc", split="test"), tok)
    for n in (1, 17, 300, hay.total_tokens + 500):  # the last one wraps around the corpus
        text = hay.sample(n, random.Random(1))
        assert text == hay.sample(n, random.Random(1))
        assert abs(count(tok, text) - n) <= FILLER_TOLERANCE
    assert hay.text(0) == ""
    assert hay.sample(200, random.Random(1)) != hay.sample(200, random.Random(2))
    with pytest.raises(ValueError, match="at least one"):
        Haystack(["", " "], tok)


# --------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_builds_with_the_shared_schema(tok, name) -> None:
    ds = build(tok, name)
    assert len(ds) == 3 and ds.features == build(tok, "passkey").features
    for row in ds:
        assert row["task"] == name and row["context"] and row["answer"]
        assert row["context_tokens"] == count(tok, row["context"])
        assert row["depth"] == -1.0 or 0.0 <= row["depth"] <= 1.0
        assert isinstance(json.loads(row["metadata"]), dict)
        assert row["context"] not in row["question"]
    assert len(set(ds["id"])) == 3


@pytest.mark.parametrize("name", sorted(TASKS))
def test_seed_determinism(tok, name) -> None:
    a, b, other = build(tok, name), build(tok, name), build(tok, name, seed=1)
    assert a.to_list() == b.to_list()
    assert a["context"] != other["context"]
    # Sample i does not depend on how many samples are built.
    assert build(tok, name, num_samples=1)[0] == a[0]


@pytest.mark.parametrize("target", [200, 500, 1200])
@pytest.mark.parametrize("name", FILLER_TASKS)
def test_context_tokens_near_target(tok, name, target) -> None:
    for n in build(tok, name, context_tokens=target, num_samples=4)["context_tokens"]:
        assert target - FILLER_TOLERANCE <= n <= target


def test_kv_retrieval_fits_within_one_record(tok) -> None:
    ds = build(tok, "kv_retrieval", context_tokens=600)
    for row in ds:
        meta = json.loads(row["metadata"])
        record = count(tok, row["needle"] + ",\n ")
        assert 600 - record <= row["context_tokens"] <= 600
        assert meta["num_pairs"] > 1 and meta["key"] in row["question"]


@pytest.mark.parametrize("name", NEEDLE_TASKS)
def test_needle_and_answer_in_context(tok, name) -> None:
    for row in build(tok, name, num_samples=4, context_tokens=400):
        assert row["needle"] in row["context"]
        assert row["answer"] in row["needle"]


@pytest.mark.parametrize("name", NEEDLE_TASKS)
def test_question_tasks_carry_an_answer_prefix_the_needle_continues(tok, name) -> None:
    """RULER's style: the reply starts with the prefix and the answer follows it (for the one-fact tasks,
    the needle itself reads "<prefix> <answer>")."""
    for row in build(tok, name, num_samples=4, context_tokens=400):
        prefix = row["answer_prefix"]
        if name == "passkey":  # an answer-format instruction instead (see data/tasks.py)
            assert not prefix and row["question"].endswith("Answer with the number only.")
            continue
        assert prefix and not prefix.endswith(" ") and row["question"].strip()
        if name == "fact_qa":
            assert f"{prefix} {row['answer']}".lower() in row["needle"].lower() + " " + row["context"].lower()


def test_passkey_digits_and_question(tok) -> None:
    row = build(tok, "passkey", num_digits=8)[0]
    assert row["question"] == "What is the pass key? Answer with the number only."
    assert len(row["answer"]) == 8 and row["answer"].isdigit()


def test_depth_is_respected(tok) -> None:
    # Needles snap to the nearest sentence end, within 10% of the text (+100 characters).
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        for row in build(tok, "passkey", depth=depth, context_tokens=1500):
            filler_chars = len(row["context"]) - len(row["needle"])
            assert row["depth"] == depth
            assert abs(row["context"].index(row["needle"]) / filler_chars - depth) < 0.12


def test_random_depths_when_unspecified(tok) -> None:
    depths = build(tok, "passkey", num_samples=6, context_tokens=64)["depth"]
    assert len(set(depths)) == 6 and all(0 <= d <= 1 for d in depths)


def test_train_and_test_use_different_filler(tok) -> None:
    train_text = "\n\n".join(load_texts("pydoc", split="train"))
    test_text = "\n\n".join(load_texts("pydoc", split="test"))
    kw = {"depth": 1.0, "num_samples": 4, "context_tokens": 200}
    train, test = build(tok, "passkey", **kw), build(tok, "passkey", split="test", **kw)
    assert not set(train["answer"]) & set(test["answer"])
    for row in test:
        head = row["context"][:80]  # filler: the needle sits at the end
        assert head in test_text and head not in train_text
    for row in train:
        assert row["context"][:80] in train_text


def test_fact_qa_asks_one_of_several_facts(tok) -> None:
    for row in build(tok, "fact_qa", num_facts=5, context_tokens=500):
        meta = json.loads(row["metadata"])
        assert meta["subject"] in row["question"] and meta["subject"] in row["needle"]
        assert row["context"].count(" is ") >= 1 and len(row["answer"].split()) == 1
        assert sum(row["context"].count(name) for name in ("born in the year", "favourite colour",
                   "works in the city", "treasured possession", "The pet of")) >= 5  # fmt: skip


def test_variable_tracking_chain_in_order(tok) -> None:
    for row in build(tok, "variable_tracking", num_chains=2, num_hops=3, context_tokens=500):
        meta = json.loads(row["metadata"])
        names = row["answer"].split()
        assert names == meta["variables"] and len(names) == 4
        first = row["context"].index(f"VAR {names[0]} = {meta['value']}.")
        offsets = [row["context"].index(f"VAR {b} = VAR {a}.") for a, b in zip(names, names[1:])]
        assert [first, *offsets] == sorted([first, *offsets])
        assert len(re.findall(r"VAR [A-Z]{5} = ", row["context"])) == 8  # 2 chains x 4 statements


def test_autoencoding_and_continuation(tok) -> None:
    row = build(tok, "autoencoding")[0]
    assert row["answer"] == row["context"] and row["question"] == "Repeat the text."
    texts = load_texts("pydoc", split="train")
    corpus = "\n\n".join(texts + texts)  # doubled: a filler may wrap around the end
    for row in build(tok, "continuation", answer_tokens=20):
        assert row["question"] == "" and row["context_tokens"] == 256
        assert row["context"] + row["answer"] in corpus
        assert abs(count(tok, row["answer"]) - 20) <= 2


def test_reconstruction_copies_a_span_of_the_context_cued_by_its_first_tokens(tok) -> None:
    for row in build(tok, "reconstruction", span_tokens=40, cue_tokens=(10, 20)):
        meta = json.loads(row["metadata"])
        assert row["context_tokens"] == 256 and 10 <= meta["cue_tokens"] <= 20
        assert row["answer_prefix"] and row["answer"][:1].isspace()  # the cue ends before a word
        assert (row["answer_prefix"] + row["answer"]) in row["context"]
        assert abs(count(tok, row["answer_prefix"] + row["answer"]) - 40) <= 2
    with pytest.raises(ValueError, match="cue_tokens"):
        build(tok, "reconstruction", span_tokens=10, cue_tokens=(10, 20))


def test_datasets_of_different_tasks_concatenate(tok) -> None:
    mixed = datasets.concatenate_datasets([build(tok, name, num_samples=1) for name in TASKS])
    assert sorted(mixed["task"]) == sorted(TASKS)


def test_task_errors(tok) -> None:
    with pytest.raises(ValueError, match="unknown task 'nope'; known tasks: .*passkey"):
        build(tok, "nope")
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_samples"):
            build(tok, "passkey", num_samples=bad)
    with pytest.raises(ValueError, match="too small for task 'passkey'"):
        build(tok, "passkey", context_tokens=8)
    with pytest.raises(ValueError, match="too small for task 'kv_retrieval'"):
        build(tok, "kv_retrieval", context_tokens=8)
    with pytest.raises(ValueError, match="context_tokens"):
        build(tok, "autoencoding", context_tokens=0)
    with pytest.raises(ValueError, match="depth"):
        build(tok, "passkey", depth=1.5)
    with pytest.raises(TypeError):
        build(tok, "passkey", num_facts=3)  # an option of another task


def test_local_source_for_tasks(tmp_path, tok) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": f"Document {i}. " + "Plain words here. " * 20}) for i in range(5))
    )
    row = build(tok, "passkey", source=str(path), split="all", context_tokens=128)[0]
    assert "Plain words here." in row["context"] and row["answer"] in row["context"]
    with pytest.raises(FileNotFoundError):
        build(tok, "passkey", source=str(tmp_path / "none.txt"))


def test_passage_retrieval_has_one_gold_passage_and_its_id_is_the_answer():
    import json

    from ctxzip.compressors.models import load_tokenizer
    from ctxzip.data.tasks import layout_passages

    tokenizer = load_tokenizer("tiny-random-llama")
    rows = build_task("passage_retrieval", tokenizer, num_samples=3, context_tokens=600, seed=1)
    for row in rows:
        meta = json.loads(row["metadata"])
        passages, gold = meta["passages"], meta["gold"]
        assert row["context"] == layout_passages(passages) and row["answer"] == str(gold)
        assert row["needle"] in passages[gold] and 600 - 90 <= row["context_tokens"] <= 600  # within one passage line
        subject = row["question"].split("Query: ")[1].split("?")[0].split()[-2:]
        assert sum(" ".join(subject) in p for p in passages) == 1  # the person is in one passage only
    with pytest.raises(ValueError, match="too small"):
        build_task("passage_retrieval", tokenizer, num_samples=1, context_tokens=100)


@pytest.mark.parametrize("name", ["niah_multikey", "fact_qa"])
def test_shared_context_questions_ask_different_facts_of_one_context(tok, name) -> None:
    import json

    single = build(tok, name, num_samples=2, context_tokens=400)
    shared = build(tok, name, num_samples=2, context_tokens=400, num_questions=3)
    for one, row in zip(single, shared):
        questions = json.loads(row["metadata"])["questions"]
        assert len(questions) == 3 and len({q["question"] for q in questions}) == 3
        assert (row["context"], row["question"], row["answer"]) == (one["context"], one["question"], one["answer"])
        assert questions[0] == {"question": row["question"], "answer": row["answer"],
                                "answer_prefix": row["answer_prefix"]}
        assert all(q["answer"] in row["context"] for q in questions)
    with pytest.raises(ValueError, match="num_questions"):
        build(tok, name, num_samples=1, context_tokens=400, num_questions=99)
