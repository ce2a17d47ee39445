"""How many leading digits of a number answer each method's replies get right: partial credit that exact match
hides. For each method in the given evaluation folders (``python -m ctxzip.eval`` output: ``predictions.jsonl``
or, for a run still going, ``configs/*.json``), the share of ``retrieve_number`` rows whose first number in the
reply starts with the answer's first 1, 2, 3 digits, with Wilson 95% intervals. Chance for one digit is about 0.1.

    python benchmarks/leading_digits.py benchmarks/results/gist_heldout/training_free \\
        benchmarks/results/gist_heldout/gist-interleaved-cpu --output benchmarks/results/gist_heldout/leading_digits.md
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from ctxzip.compressors.io import write_text_atomic
from ctxzip.eval.metrics import wilson_interval

DIGITS = (1, 2, 3)


def read_rows(folder: Path, task: str) -> list[dict]:
    """The scored rows of ``task`` in an evaluation folder."""
    predictions = folder / "predictions.jsonl"
    if predictions.is_file():
        rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    else:
        rows = [row for path in sorted((folder / "configs").glob("*.json"))
                for row in json.loads(path.read_text())["rows"]]
    if not rows:
        raise SystemExit(f"{folder} holds no evaluated rows (no predictions.jsonl, no configs/*.json)")
    return [row for row in rows if row.get("task") == task]


def leading_digits_right(reply: str, answer: str) -> int:
    """How many leading digits of ``answer`` the first number in ``reply`` repeats."""
    match = re.search(r"\d+", reply)
    if not match:
        return 0
    number, right = match.group(), 0
    while right < min(len(number), len(answer)) and number[right] == answer[right]:
        right += 1
    return right


def table(folders: list[Path], task: str) -> str:
    counts: dict[str, list[int]] = defaultdict(list)
    for folder in folders:
        for row in read_rows(folder, task):
            counts[row["method"]].append(leading_digits_right(str(row["prediction"]), str(row["answer"])))
    lines = ["| method | n | " + " | ".join(f"first {k} digit{'s' if k > 1 else ''} right" for k in DIGITS) + " |",
             "|---|---|" + "---|" * len(DIGITS)]
    for method, rights in sorted(counts.items()):
        cells = []
        for k in DIGITS:
            hits = sum(r >= k for r in rights)
            low, high = wilson_interval(hits, len(rights))
            cells.append(f"{hits / len(rights):.2f} [{low:.2f}, {high:.2f}]")
        lines.append(f"| {method} | {len(rights)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="evaluation output folders")
    parser.add_argument("--task", default="retrieve_number", help="a task whose answers are numbers")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    text = table(args.folders, args.task)
    print(text)
    if args.output:
        write_text_atomic(args.output, f"# Leading digits right, `{args.task}`\n\n{text}")


if __name__ == "__main__":
    main()
