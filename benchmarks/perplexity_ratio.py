"""Each method's continuation perplexity as a multiple of the full context's, on the same samples, with a paired
bootstrap 95% interval: the question "within 25% of the full context" asks of the ratio, and the per-method
intervals of a report overlap because hard samples are hard for every method. Reads the ``continuation`` rows of
the given evaluation folders (``python -m ctxzip.eval`` output), pairs them by sample id with the reference
method's (default ``full_context``). The median of the per-sample ratios stands beside it: a mean of perplexities
can be carried by one sample that a memory derails.

    python benchmarks/perplexity_ratio.py benchmarks/results/gist_heldout/continuation \\
        benchmarks/results/gist_heldout/continuation-gist-8x-recent_tokens144 \\
        --output benchmarks/results/gist_heldout/perplexity_ratio.md
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from leading_digits import read_rows

from ctxzip.compressors.io import write_text_atomic
from ctxzip.eval.metrics import ratio_of_means_interval


def method_label(row: dict) -> str:
    """A row's method, with its requested ratio when it has one (truncation at 4x and at 4.08x are two methods)."""
    ratio = float(row.get("ratio") or 0)
    return row["method"] if ratio <= 1 else f"{row['method']} {ratio:g}x"


def table(folders: list[Path], reference: str = "full_context", task: str = "continuation") -> str:
    by_method: dict[str, dict[str, float]] = defaultdict(dict)
    for folder in folders:
        for row in read_rows(folder, task):
            by_method[method_label(row)][row["id"]] = float(row["perplexity"])
    if reference not in by_method:
        raise SystemExit(f"no {reference!r} rows of {task!r} in {', '.join(map(str, folders))}")
    base = by_method[reference]
    lines = [f"| method | n | mean perplexity | {reference} on the same samples | ratio | 95% interval (paired) "
             "| median per-sample ratio |", "|---|---|---|---|---|---|---|"]
    for method, values in sorted(by_method.items()):
        ids = sorted(set(values) & set(base))
        if not ids:
            continue
        mine, theirs = [values[i] for i in ids], [base[i] for i in ids]
        low, high = ratio_of_means_interval(mine, theirs)
        mean, ref = sum(mine) / len(mine), sum(theirs) / len(theirs)
        median = statistics.median(m / t for m, t in zip(mine, theirs))
        lines.append(f"| {method} | {len(ids)} | {mean:.2f} | {ref:.2f} | {mean / ref:.3f} | [{low:.3f}, {high:.3f}] "
                     f"| {median:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="evaluation output folders")
    parser.add_argument("--reference", default="full_context", help="the method every other is divided by")
    parser.add_argument("--task", default="continuation", help="a task scored by perplexity")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    text = table(args.folders, args.reference, args.task)
    print(text)
    if args.output:
        write_text_atomic(args.output, f"# Continuation perplexity over the {args.reference}'s, `{args.task}`\n\n{text}")


if __name__ == "__main__":
    main()
