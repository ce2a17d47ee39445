"""benchmarks/leading_digits.py: partial credit on number answers, from an evaluation folder's rows."""

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
    lines = out.read_text().splitlines()
    assert lines[-2].startswith("| a | 3 | 0.67 ") and "| 0.67 [" in lines[-2] and lines[-2].count("0.33 [") == 1
    assert lines[-1].startswith("| b | 1 | 1.00 ") and lines[-1].endswith("| 0.00 [0.00, 0.79] |")
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = subprocess.run([sys.executable, str(ROOT / "benchmarks/leading_digits.py"), str(empty)],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "no evaluated rows" in failed.stderr
