"""Tests for `compressors.incomes.data`: the offline edit generator, the record check and the zsRE / CounterFact
loaders (on tiny local files; nothing is downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from ctxzip.compressors.incomes.data import (
    EDIT_FEATURES,
    EDIT_FIELDS,
    LOCALITY_QA,
    RELATIONS,
    build_edit_records,
    build_edit_task,
    load_edit_records,
    validate_edit_record,
)

# --------------------------------------------------------------------------- generator


def test_generator_is_deterministic_and_prefix_stable() -> None:
    a = build_edit_task(40, seed=3)
    assert a.features == EDIT_FEATURES and list(a.column_names) == list(EDIT_FIELDS)
    assert a.to_list() == build_edit_task(40, seed=3).to_list()
    assert a.to_list() != build_edit_task(40, seed=4).to_list()
    assert build_edit_records(15, seed=3) == a.to_list()[:15]


def test_train_and_test_subjects_are_disjoint() -> None:
    train = {r["subject"] for r in build_edit_records(600, seed=0, split="train")}
    test = {r["subject"] for r in build_edit_records(600, seed=0, split="test")}
    assert len(test) > 300 and not train & test
    # Membership depends on the subject alone: other seeds keep to the same side.
    assert not {r["subject"] for r in build_edit_records(600, seed=1, split="train")} & test
    mixed = {r["subject"] for r in build_edit_records(600, seed=0, split="all")}
    assert mixed & train and mixed & test


def test_no_subject_relation_repeats_and_one_entity_per_subject() -> None:
    records = build_edit_records(3000, seed=0, split="test")
    pairs = [(r["subject"], r["relation"]) for r in records]
    assert len(set(pairs)) == len(pairs)
    entity: dict[str, str] = {}
    for r in records:
        assert entity.setdefault(r["subject"], RELATIONS[r["relation"]].entity) == RELATIONS[r["relation"]].entity


def test_generated_records_follow_the_schema() -> None:
    records = build_edit_records(400, seed=0, num_locality=3)
    assert {r["kind"] for r in records} == {"invented_entity", "person"}
    assert len({r["relation"] for r in records}) == len(RELATIONS)
    pool = dict(LOCALITY_QA)
    for r in records:
        validate_edit_record(r)
        assert r["rephrase"] != r["question"]
        assert r["answer"] == r["target"] and r["target"] in r["edit"]
        assert all(r["subject"] in r[f] for f in ("edit", "question", "rephrase"))
        assert 1 <= len(r["answer"].split()) <= 3
        questions = [item["question"] for item in r["locality"]]
        assert len(set(questions)) == 3 and all(pool[q] == item["answer"] for q, item in zip(questions, r["locality"]))
    assert build_edit_records(5, num_locality=0)[0]["locality"] == []


def test_relation_templates_and_locality_pool() -> None:
    for relation in RELATIONS.values():
        assert len(relation.rephrases) >= 2 and relation.question not in relation.rephrases
        assert len(set(relation.rephrases)) == len(relation.rephrases)
        assert all(1 <= len(v.split()) <= 3 for v in relation.values)
    assert len(LOCALITY_QA) >= 60 and len({q for q, _ in LOCALITY_QA}) == len(LOCALITY_QA)
    assert all(q.endswith("?") and a.strip() and len(a.split()) <= 3 for q, a in LOCALITY_QA)


def test_generator_relation_filter_and_argument_errors() -> None:
    records = build_edit_records(30, relations=["capital", "pet_name"])
    assert {r["relation"] for r in records} == {"capital", "pet_name"}
    assert {r["kind"] for r in build_edit_records(10, relations=["ceo"])} == {"invented_entity"}
    with pytest.raises(ValueError, match="unknown relation.*'nope'"):
        build_edit_records(3, relations=["capital", "nope"])
    with pytest.raises(ValueError, match="split must be one of"):
        build_edit_records(3, split="validation")
    with pytest.raises(ValueError, match="num_samples"):
        build_edit_records(0)
    with pytest.raises(ValueError, match="num_locality"):
        build_edit_records(3, num_locality=len(LOCALITY_QA) + 1)


# --------------------------------------------------------------------------- validation


def good_record() -> dict:
    return build_edit_records(1)[0]


def test_validate_rejects_empty_edit_and_names_missing_fields() -> None:
    with pytest.raises(ValueError, match=r"empty fields \['edit'\]"):
        validate_edit_record({**good_record(), "edit": "   "})
    record = good_record()
    del record["rephrase"], record["kind"]
    with pytest.raises(ValueError, match=r"record 7: missing fields \['rephrase', 'kind'\]"):
        validate_edit_record(record, where="record 7")
    with pytest.raises(ValueError, match=r"not strings: \['target \(int\)'\]"):
        validate_edit_record({**good_record(), "target": 3})
    with pytest.raises(ValueError, match=r"locality\[1\]\.answer"):
        validate_edit_record({**good_record(), "locality": [{"question": "q", "answer": "a"}, {"question": "q"}]})
    with pytest.raises(ValueError, match="locality must be a list"):
        validate_edit_record({**good_record(), "locality": "What is the capital of France?"})
    with pytest.raises(ValueError, match="must be a dict"):
        validate_edit_record(["edit"])  # type: ignore[arg-type]
    validate_edit_record({**good_record(), "locality": []})  # no locality check is allowed


# --------------------------------------------------------------------------- loaders


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


ZSRE = [
    {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "pred": "Harvard",
     "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
     "rephrase": "What university did Watts Humphrey take part in?",
     "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving"},
    {"subject": "Ramalinga Raju", "src": "Which family does Ramalinga Raju belong to?", "alt": "Raju family",
     "answers": ["Sathyam"], "rephrase": "Ramalinga Raju is a member of which family?",
     "loc": "who sings the song what a wonderful world", "loc_ans": "Louis Armstrong"},
]
COUNTERFACT = [
    {"case_id": 0, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "relation_id": "P103", "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
     "paraphrase_prompts": ["Shayna does this. Danielle Darrieux, a native", "Danielle Darrieux spoke the language"],
     "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
     "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"]},
]


def test_zsre_converter(tmp_path: Path) -> None:
    ds = load_edit_records(write_jsonl(tmp_path / "zsre_eval.jsonl", ZSRE), split="all")
    assert ds.features == EDIT_FEATURES and len(ds) == 2
    first, second = ds[0], ds[1]
    assert first["edit"] == "What university did Watts Humphrey attend? University of Michigan"
    assert first["question"] == ZSRE[0]["src"] and first["answer"] == first["target"] == "University of Michigan"
    assert first["rephrase"] == ZSRE[0]["rephrase"] and first["subject"] == "Watts Humphrey"
    assert first["relation"] == "What university did {} attend?"
    assert first["locality"] == [{"question": "who played desmond doss father in hacksaw ridge",
                                  "answer": "Hugo Weaving"}]  # the "nq question: " prefix is gone
    assert second["locality"][0]["question"] == "who sings the song what a wonderful world"
    assert first["kind"] == "zsre_eval.jsonl"
    assert load_edit_records(str(tmp_path / "zsre_eval.jsonl"), split="all", num_samples=1).to_list() == [first]


def test_counterfact_converter_uses_cloze_prompts(tmp_path: Path) -> None:
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps(COUNTERFACT), encoding="utf-8")  # ROME's file is one JSON list
    (record,) = load_edit_records(str(path), split="all").to_list()
    assert record["question"] == "The mother tongue of Danielle Darrieux is"  # a cloze prefix, not a question
    assert record["edit"] == "The mother tongue of Danielle Darrieux is English"
    assert record["answer"] == record["target"] == "English" and record["relation"] == "P103"
    assert record["rephrase"] == "Shayna does this. Danielle Darrieux, a native"
    assert record["locality"] == [{"question": q, "answer": "French"} for q in COUNTERFACT[0]["neighborhood_prompts"]]
    assert record["kind"] == "counterfact.json"


def test_local_splits_follow_the_subject_hash(tmp_path: Path) -> None:
    records = build_edit_records(40, split="all")
    path = write_jsonl(tmp_path / "mine.jsonl", records)
    assert load_edit_records(path, split="all").to_list() == records  # native style round trip
    train = load_edit_records(path).to_list()
    test = load_edit_records(path, split="test").to_list()
    assert train and test and len(train) + len(test) == len(records)
    assert not {r["subject"] for r in train} & {r["subject"] for r in test}
    assert load_edit_records(path, split="test", num_samples=2).to_list() == test[:2]


def test_missing_columns_are_named(tmp_path: Path) -> None:
    lacking = [{k: v for k, v in r.items() if k not in ("loc_ans", "rephrase")} for r in ZSRE]
    with pytest.raises(ValueError, match=r"'z\.jsonl' lacks the zsRE column\(s\) \['rephrase', 'loc_ans'\]"):
        load_edit_records(write_jsonl(tmp_path / "z.jsonl", lacking), split="all")
    with pytest.raises(ValueError, match=r"cannot tell the style of edit source 'other\.jsonl'.*\['prompt'\]"):
        load_edit_records(write_jsonl(tmp_path / "other.jsonl", [{"prompt": "x"}]), split="all")
    with pytest.raises(ValueError, match=r"lacks the CounterFact column\(s\) \['requested_rewrite', 'paraph"):
        load_edit_records(write_jsonl(tmp_path / "z2.jsonl", ZSRE), split="all", style="counterfact")


def test_record_level_errors_name_the_field_and_record(tmp_path: Path) -> None:
    rewrite = {k: v for k, v in COUNTERFACT[0]["requested_rewrite"].items() if k != "target_true"}
    broken = [COUNTERFACT[0], {**COUNTERFACT[0], "requested_rewrite": rewrite}]
    with pytest.raises(ValueError, match=r"record 1 of 'cf\.jsonl'.*\['requested_rewrite\.target_true\.str'\]"):
        load_edit_records(write_jsonl(tmp_path / "cf.jsonl", broken), split="all")
    with pytest.raises(ValueError, match=r"record 1 of 'zs\.jsonl'.*\['alt'\]"):
        load_edit_records(write_jsonl(tmp_path / "zs.jsonl", [ZSRE[0], {**ZSRE[1], "alt": ""}]), split="all")
    with pytest.raises(ValueError, match=r"record 0 of 'n\.jsonl'.*empty fields \['edit'\]"):
        load_edit_records(write_jsonl(tmp_path / "n.jsonl", [{**good_record(), "edit": ""}]), split="all")


def test_loader_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_edit_records(str(tmp_path / "absent.jsonl"))
    with pytest.raises(ValueError, match="style must be one of"):
        load_edit_records(str(tmp_path / "absent.jsonl"), style="mend")
    with pytest.raises(ValueError, match="split must be one of"):
        load_edit_records(write_jsonl(tmp_path / "z.jsonl", ZSRE), split="validation")


def test_the_incomes_package_and_its_edit_data_import_no_trainer_or_eval_code() -> None:
    code = ("import sys, ctxzip.compressors.incomes, ctxzip.compressors.incomes.data; bad = [m for m in sys.modules "
            "if m.startswith(('ctxzip.trainers', 'ctxzip.eval', 'trl'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_dataset_concatenates_with_loaded_records(tmp_path: Path) -> None:
    loaded = load_edit_records(write_jsonl(tmp_path / "z.jsonl", ZSRE), split="all")
    both = datasets.concatenate_datasets([build_edit_task(3), loaded])
    assert len(both) == 5 and both.features == EDIT_FEATURES


def test_locality_questions_of_the_test_split_are_held_out() -> None:
    from ctxzip.compressors.incomes.data import LOCALITY_QA, build_edit_records, locality_questions

    train, test = locality_questions("train"), locality_questions("test")
    assert train and test and not set(train) & set(test) and len(train) + len(test) == len(LOCALITY_QA)
    asked = {item["question"] for record in build_edit_records(40, split="test") for item in record["locality"]}
    assert asked <= {q for q, _ in test}
