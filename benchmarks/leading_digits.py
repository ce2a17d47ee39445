"""How many leading digits of a number answer each method's replies get right: partial credit that exact match
hides. For each method in the given evaluation folders (``python -m ctxzip.eval`` output: ``predictions.jsonl``
or, for a run still going, ``configs/*.json``), the share of ``retrieve_number`` rows whose first number in the
reply starts with the answer's first 1, 2, 3 digits, with Wilson 95% intervals (chance for one digit: about 0.1);
then, of the answer's digits, the share the reply's number holds in any order and the share it holds in place (its
first as many digits as the answer has; bootstrap 95%), beside a chance row: uniform random numbers of each answer's
length, 100 per answer (seeded). Digits present far above chance with digits in place near chance mean a memory
that keeps which digits a number has but not their order.

    python benchmarks/leading_digits.py benchmarks/results/gist_heldout/training_free \\
        benchmarks/results/gist_heldout/gist-interleaved-cpu --output benchmarks/results/gist_heldout/leading_digits.md
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from ctxzip.compressors.io import write_text_atomic
from ctxzip.eval.metrics import bootstrap_interval, wilson_interval

DIGITS = (1, 2, 3)
CHANCE = "chance (random numbers)"


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


def digits_kept(reply: str, answer: str) -> tuple[float, float]:
    """Of ``answer``'s digits, the share that the first number in ``reply`` (its first ``len(answer)`` digits)
    holds in any order (as multisets), and the share it holds at the same place."""
    match = re.search(r"\d+", reply)
    number = match.group()[:len(answer)] if match else ""
    present = sum((Counter(number) & Counter(answer)).values())
    in_place = sum(a == b for a, b in zip(number, answer))
    return present / len(answer), in_place / len(answer)


def chance_replies(answers: list[str], draws: int = 100, seed: int = 0) -> list[tuple[str, str]]:
    """(reply, answer) pairs whose replies are uniform random numbers of each answer's length."""
    rng = random.Random(seed)
    return [(str(rng.randrange(10 ** (len(a) - 1), 10 ** len(a))), a) for a in answers for _ in range(draws)]


def share(hits: int, n: int) -> str:
    """``hits / n`` with its Wilson 95% interval, as a table cell."""
    low, high = wilson_interval(hits, n)
    return f"{hits / n:.2f} [{low:.2f}, {high:.2f}]"


def _mean(values: list[float]) -> str:
    low, high = bootstrap_interval(values)
    return f"{sum(values) / len(values):.2f} [{low:.2f}, {high:.2f}]"


def table(folders: list[Path], task: str) -> str:
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for folder in folders:
        for row in read_rows(folder, task):
            pairs[row["method"]].append((str(row["prediction"]), str(row["answer"])))
    answers = sorted({answer for rows in pairs.values() for _, answer in rows if answer.isdigit()})
    if answers:
        pairs[CHANCE] = chance_replies(answers)
    lines = ["| method | n | " + " | ".join(f"first {k} digit{'s' if k > 1 else ''} right" for k in DIGITS)
             + " | digits present (any order) | digits in place |", "|---|---|" + "---|" * (len(DIGITS) + 2)]
    for method, rows in sorted(pairs.items()):
        rights = [leading_digits_right(reply, answer) for reply, answer in rows]
        kept = [digits_kept(reply, answer) for reply, answer in rows]
        cells = [share(sum(r >= k for r in rights), len(rights)) for k in DIGITS]
        cells += [_mean([present for present, _ in kept]), _mean([in_place for _, in_place in kept])]
        lines.append(f"| {method} | {len(rows)} | " + " | ".join(cells) + " |")
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
