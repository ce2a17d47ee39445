"""Where wrong ``multi_fact`` answers come from: does a memory lose the facts, or keep the values and lose whom
they belong to? Each evaluation folder's ``multi_fact`` rows (``python -m ctxzip.eval`` output) are matched to the
samples they answered, rebuilt from the folder's ``config.yaml`` (seed, split, source, length; offline, the
embedded tokenizer), and every reply is put in one class:

- ``right``: the row was scored correct;
- ``same attribute``: the value of another fact of the passage with the asked attribute (another person's home
  town: the binding of value to person is lost);
- ``other attribute``: the value of a fact of the passage with another attribute (a dish for a colour);
- ``not in the passage``: anything else (a plausible value the passage never states, or none).

The shares carry Wilson 95% intervals over the rows. A training-free method's rows are named with their ratio.

    python benchmarks/fact_binding.py benchmarks/results/gist_heldout/training_free \\
        benchmarks/results/gist_heldout/gist-4x-remix2 --output benchmarks/results/gist_heldout/fact_binding.md
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import yaml
from leading_digits import read_rows, share

from ctxzip.compressors.io import write_text_atomic

TASK = "multi_fact"
CLASSES = ("right", "same attribute", "other attribute", "not in the passage")


def classify(reply: str, correct: bool, facts: list[dict], asked: dict) -> str:
    """The class of one reply (see the module docstring); a value counts when the reply contains it as a word
    sequence, case-insensitively."""
    if correct:
        return "right"
    words = f" {' '.join(reply.lower().replace('.', ' ').replace(',', ' ').split())} "
    named = [fact for fact in facts if fact["key"] != asked["key"] and f" {fact['value'].lower()} " in words]
    if any(fact["attr"] == asked["attr"] for fact in named):
        return "same attribute"
    return "other attribute" if named else "not in the passage"


def samples_by_id(folder: Path) -> dict[str, dict]:
    """The ``multi_fact`` samples an evaluation folder answered, by row id, rebuilt from its configuration."""
    from ctxzip.compressors.models import load_tokenizer
    from ctxzip.data.tasks import build_task

    config = yaml.safe_load((folder / "config.yaml").read_text())
    tokenizer = load_tokenizer(config["base_model"])
    samples = {}
    for length in config["context_lengths"]:
        dataset = build_task(TASK, tokenizer, num_samples=config["num_samples"], context_tokens=length,
                             seed=config["seed"], split=config["split"], source=config["source"])
        samples.update({row["id"]: row for row in dataset})
    return samples


def table(folders: list[Path]) -> str:
    counts: dict[str, Counter] = defaultdict(Counter)
    for folder in folders:
        samples = samples_by_id(folder)
        for row in read_rows(folder, TASK):
            sample = samples.get(row["id"])
            if sample is None:
                raise SystemExit(f"{folder}: row {row['id']} matches no sample rebuilt from its config.yaml")
            facts = json.loads(sample["metadata"])["facts"]
            asked = next(fact for fact in facts if fact["value"] == sample["answer"] and fact["key"] in sample["question"])
            method = row["method"] + (f" {row['ratio']:g}x" if row.get("ratio") else "")
            counts[method][classify(str(row["prediction"]), bool(row["correct"]), facts, asked)] += 1
    lines = ["| method | n | " + " | ".join(CLASSES) + " |", "|---|---|" + "---|" * len(CLASSES)]
    for method, counted in sorted(counts.items()):
        n = sum(counted.values())
        cells = [share(counted[name], n) for name in CLASSES]
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="evaluation output folders with multi_fact rows")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    text = table(args.folders)
    print(text)
    if args.output:
        write_text_atomic(args.output, f"# Where wrong `{TASK}` answers come from\n\n{text}")


if __name__ == "__main__":
    main()
