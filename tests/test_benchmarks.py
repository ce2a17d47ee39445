"""data.benchmarks: LongBench, RULER and SCBench rows read from small fixtures in their published formats."""

import json

import pytest

from ctxzip.data.benchmarks import load_longbench, load_ruler, load_scbench
from ctxzip.data.tasks import FEATURES

CONTEXT = "Passage 1: The capital of Veloria is Tarsen.\nPassage 2: The river of Veloria is the Ambra."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    from ctxzip.compressors import TINY_MODEL, load_base

    return load_base(TINY_MODEL)[1]


def test_longbench_rows(tmp_path, tok) -> None:
    path = write_jsonl(tmp_path / "hotpotqa.jsonl", [
        {"input": "What is the capital of Veloria?", "context": CONTEXT, "answers": ["Tarsen", "tarsen city"],
         "length": 18, "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": "abc"}])
    (row,) = load_longbench(path, tok)
    assert row["task"] == "longbench/hotpotqa" and row["id"] == "longbench/hotpotqa-abc"
    assert (row["context"], row["question"], row["answer"]) == (CONTEXT, "What is the capital of Veloria?", "Tarsen")
    assert json.loads(row["metadata"])["answers"] == ["Tarsen", "tarsen city"]
    assert row["context_tokens"] == len(tok(CONTEXT, add_special_tokens=False)["input_ids"])
    assert set(row) == set(FEATURES)


def test_ruler_rows_split_the_question_from_the_context(tmp_path, tok) -> None:
    prompt = ("Some special magic numbers are hidden within the following text. Make sure to memorize it.\n"
              "One of the special magic numbers for lucky-saddle is: 2413883.\n"
              "What is the special magic number for lucky-saddle mentioned in the provided text?")
    path = write_jsonl(tmp_path / "niah.jsonl", [
        {"index": 7, "input": prompt, "outputs": ["2413883"], "length": 60, "length_w_model_temp": 70,
         "answer_prefix": " The special magic number for lucky-saddle mentioned in the provided text is",
         "token_position_answer": 20}])
    (row,) = load_ruler(path, tok, task="ruler/niah")
    assert row["question"] == "What is the special magic number for lucky-saddle mentioned in the provided text?"
    assert row["context"].endswith("lucky-saddle is: 2413883.") and row["answer"] == "2413883"
    assert row["answer_prefix"] == "The special magic number for lucky-saddle mentioned in the provided text is"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"index": 1, "input": "one line", "outputs": ["x"]}])
    with pytest.raises(ValueError, match="no line break"):
        load_ruler(bad, tok)


def test_scbench_rows_carry_every_turn_for_the_shared_context_mode(tmp_path, tok) -> None:
    path = write_jsonl(tmp_path / "multi_turn_qa_eng.jsonl", [
        {"id": 3, "context": CONTEXT, "multi_turns": [{"input": "What is the capital of Veloria?", "answer": "Tarsen"},
                                                      {"input": "And its river?", "answer": ["the Ambra"]}]}])
    (row,) = load_scbench(path, tok)
    questions = json.loads(row["metadata"])["questions"]
    assert row["task"] == "scbench/multi_turn_qa_eng" and row["question"] == "What is the capital of Veloria?"
    assert [q["answer"] for q in questions] == ["Tarsen", "the Ambra"] and len(questions) == 2
    tokens = write_jsonl(tmp_path / "mf.jsonl", [{"id": 1, "context": [1, 2, 3],
                                                 "multi_turns": [{"input": "q", "answer": 1}]}])
    with pytest.raises(ValueError, match="not text"):
        load_scbench(tokens, tok)


def test_a_table_without_the_columns_is_refused(tmp_path, tok) -> None:
    path = write_jsonl(tmp_path / "other.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match=r"no column\(s\) \['context', 'input', 'answers'\]"):
        load_longbench(path, tok)
    assert len(load_longbench(write_jsonl(tmp_path / "two.jsonl", [
        {"input": "q", "context": "c", "answers": ["a"], "_id": str(i)} for i in range(3)]), tok, limit=2)) == 2


def test_load_table_reads_a_local_file_whole_and_passes_a_dataset_through(tmp_path) -> None:
    """``data.sources.load_table``, the generic reader behind these loaders (and CoLoR's corpora)."""
    from ctxzip.data.sources import load_table

    table = load_table(write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, {"a": 2}]), "test", "rows table")
    assert table.column_names == ["a"] and table["a"] == [1, 2]  # a local file is read whole, whatever the split
    assert load_table(table, "train", "rows table") is table
    (tmp_path / "rows.txt").write_text("a\n1\n")
    with pytest.raises(ValueError, match=r"rows table file .*rows\.txt.*use \.jsonl, \.json, \.csv or \.parquet"):
        load_table(str(tmp_path / "rows.txt"), "train", "rows table")
