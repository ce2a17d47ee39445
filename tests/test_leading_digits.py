"""benchmarks/leading_digits.py and perplexity_ratio.py: partial credit on number answers and perplexity ratios, from
evaluation folders' rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import leading_digits  # noqa: E402


@pytest.mark.parametrize(("reply", "answer", "right"), [
    ("834515", "834515", 6), ("The number is 8355.", "834515", 2), ("855555", "834515", 1), ("734515", "834515", 0),
    ("no number", "834515", 0), ("1. 834515", "834515", 0),  # the first number counts, even a list marker
])
def test_leading_digits_right(reply: str, answer: str, right: int) -> None:
    assert leading_digits.leading_digits_right(reply, answer) == right


@pytest.mark.parametrize(("reply", "answer", "kept"), [
    ("834515", "834515", (1.0, 1.0)), ("Code: 438155 then 834515", "834515", (1.0, 2 / 6)),
    ("8345159999", "834515", (1.0, 1.0)),  # only the answer's length counts: a long reply gains nothing
    ("83", "834515", (2 / 6, 2 / 6)), ("555555", "834515", (2 / 6, 2 / 6)), ("none", "834515", (0.0, 0.0)),
])
def test_digits_kept_in_any_order_and_in_place(reply: str, answer: str, kept: tuple[float, float]) -> None:
    assert leading_digits.digits_kept(reply, answer) == pytest.approx(kept)


def test_chance_replies_are_random_numbers_of_the_answers_length() -> None:
    replies = leading_digits.chance_replies(["123456", "42"], draws=50)
    assert len(replies) == 100 and all(len(reply) == len(answer) for reply, answer in replies)
    assert len({reply for reply, _ in replies}) > 50 and replies == leading_digits.chance_replies(["123456", "42"], 50)


def test_the_script_reads_finished_and_running_folders(tmp_path: Path) -> None:
    finished, running = tmp_path / "finished", tmp_path / "running"
    finished.mkdir()
    rows = [{"task": "retrieve_number", "method": "a", "prediction": p, "answer": "123"} for p in ("123", "129", "9")]
    rows.append({"task": "multi_fact", "method": "a", "prediction": "x", "answer": "y"})
    (finished / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (running / "configs").mkdir(parents=True)
    (running / "configs" / "one.json").write_text(json.dumps({"rows": [
        {"task": "retrieve_number", "method": "b", "prediction": "1", "answer": "123"}]}))
    out = tmp_path / "table.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/leading_digits.py"), str(finished), str(running),
                             "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {line.split(" | ")[0][2:]: line for line in out.read_text().splitlines() if line.startswith("| ")}
    # a: 123 (3 right, all present, all in place), 129 (2; 2/3, 2/3), 9 (0; 0, 0)
    assert rows["a"].startswith("| a | 3 | 0.67 ") and rows["a"].count("0.33 [") == 1
    assert rows["a"].endswith("| 0.56 [0.00, 1.00] | 0.56 [0.00, 1.00] |")
    assert rows["b"].startswith("| b | 1 | 1.00 ") and "| 0.00 [0.00, 0.79] | 0.33 [0.33, 0.33] | 0.33 [0.33, 0.33] |" \
        in rows["b"]
    assert rows["chance (random numbers)"].startswith("| chance (random numbers) | 100 | ")  # one answer, 100 draws
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = subprocess.run([sys.executable, str(ROOT / "benchmarks/leading_digits.py"), str(empty)],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "no evaluated rows" in failed.stderr


def test_the_perplexity_ratio_pairs_samples_with_the_reference(tmp_path: Path) -> None:
    full, other, derailed = tmp_path / "full", tmp_path / "other", tmp_path / "derailed"
    for folder, method, values in ((full, "full_context", [10.0, 20.0, 30.0]), (other, "m", [12.0, 24.0, 36.0, 99.0]),
                                   (derailed, "d", [10.0, 20.0, 3000.0])):
        folder.mkdir()
        rows = [{"task": "continuation", "method": method, "id": f"s{i}", "perplexity": v} for i, v in enumerate(values)]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    more = tmp_path / "more"  # the same method at two ratios: two rows
    more.mkdir()
    rows = [{"task": "continuation", "method": "m", "ratio": r, "id": "s0", "perplexity": 15.0} for r in (4, 8)]
    (more / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ratio.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/perplexity_ratio.py"), str(full), str(other),
                             str(more), str(derailed),
                             "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    assert lines[-5].startswith("| d | 3 | 1010.00 | 20.00 | 50.500 |") and lines[-5].endswith("| 1.000 |")  # one derailed
    # s3 has no full-context row: left out; every paired sample is 1.2x, so the interval is the point
    assert lines[-3] == "| m | 3 | 24.00 | 20.00 | 1.200 | [1.200, 1.200] | 1.200 |"
    assert lines[-2].startswith("| m 4x | 1 | 15.00 | 10.00 | 1.500 |") and lines[-1].startswith("| m 8x | 1 |")
    failed = subprocess.run([sys.executable, str(ROOT / "benchmarks/perplexity_ratio.py"), str(other)],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "no 'full_context' rows" in failed.stderr


def test_the_shuffled_context_control_runs(tiny, tmp_path: Path) -> None:
    """benchmarks/shuffled_context.py on a tiny saved compressor: both columns counted; one sample is refused."""
    from ctxzip.compressors import GistCompressor, GistConfig
    from ctxzip.compressors.hub import save_compressor

    model, tokenizer = tiny()
    folder = tmp_path / "gist-tiny"
    save_compressor(GistCompressor(GistConfig(tokens_per_gist=4, segment_length=32, lora_r=0), model), folder,
                    tokenizer)
    script = [sys.executable, str(ROOT / "benchmarks/shuffled_context.py"), str(folder), "--context-tokens", "64",
              "--max-new-tokens", "2"]
    result = subprocess.run([*script, "--samples", "3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["n"] == 3 and 0 <= counts["own_context"] <= 3 and 0 <= counts["another_rows_context"] <= 3
    refused = subprocess.run([*script, "--samples", "1"], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "at least 2" in refused.stderr


FACTS = [{"attr": "home town", "key": "Ann Lee", "value": "Nairobi"}, {"attr": "home town", "key": "Bo Chan", "value": "Oslo"},
         {"attr": "favourite dish", "key": "Cy Dorn", "value": "ramen"}]


@pytest.mark.parametrize(("reply", "correct", "kind"), [
    ("Nairobi", True, "right"), ("Oslo.", False, "same attribute"), ("ramen", False, "other attribute"),
    ("Lima", False, "not in the passage"), ("", False, "not in the passage"),
    ("Oslos", False, "not in the passage"),  # whole words only
])
def test_fact_binding_classes(reply: str, correct: bool, kind: str) -> None:
    import fact_binding

    assert fact_binding.classify(reply, correct, FACTS, FACTS[0]) == kind


def test_fact_binding_rebuilds_the_samples_a_folder_answered(tmp_path: Path) -> None:
    from ctxzip.compressors.models import load_tokenizer
    from ctxzip.data.tasks import build_task

    config = {"base_model": "smollm2-135m-instruct", "context_lengths": [256], "num_samples": 3, "seed": 0,
              "split": "test", "source": "stdlib"}
    (tmp_path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    samples = list(build_task("multi_fact", load_tokenizer(config["base_model"]), num_samples=3, context_tokens=256,
                              seed=0, split="test", source="stdlib"))
    rows = []
    for sample, kind in zip(samples, ("right", "same attribute", "other attribute")):
        facts = json.loads(sample["metadata"])["facts"]
        asked = next(f for f in facts if f["value"] == sample["answer"] and f["key"] in sample["question"])
        replies = {"right": sample["answer"],
                   "same attribute": [f["value"] for f in facts if f["attr"] == asked["attr"] and f is not asked],
                   "other attribute": [f["value"] for f in facts if f["attr"] != asked["attr"]]}
        reply = replies[kind] if kind == "right" else replies[kind][0]  # these samples hold such facts
        rows.append({"task": "multi_fact", "method": "m", "id": sample["id"], "prediction": reply,
                     "answer": sample["answer"], "correct": float(kind == "right")})
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/fact_binding.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("| m |"))
    assert line.startswith("| m | 3 | 0.33 [") and line.count("| 0.33 [") == 3 and line.endswith("| 0.00 [0.00, 0.56] |")
