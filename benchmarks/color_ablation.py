"""What makes CoLoR's trained policy better: the recipe's default run beside runs that change one thing each.

    python benchmarks/color_ablation.py --out benchmarks/results/color_ablation [--ablations default no_extracts ...]
        [-- extra recipes/color_dpo.py flags, e.g. sizes]

Each ablation is one run of ``recipes/color_dpo.py`` (the defaults, i.e. ``recipes/configs/color_dpo/quickstart.yaml``,
plus the ablation's flags and the extra ones), with its own output folder under ``--work_dir``. Runs that read the
same candidates share one data cache; the others start from a copy of the default cache's corpus and held-out
stages (the stages check their own fingerprints, so a copy is only used when it is what the run would build). Every
run's held-out table (``color_eval.json``), flags and wall time go to ``<out>/<ablation>.json``, and one summary table
of every ablation found there, the trained policy against the untrained one and the best extract at the same ratio
(with their difference on the same queries, a paired bootstrap interval), to ``<out>/results.md``.
Run it alone on the machine: the runs are long and the CPU is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ctxzip.data.mixture import MIXTURE_FAMILIES

ROOT = Path(__file__).resolve().parents[1]

#: The earlier default's data: facts about people only (multi_fact), three random single sentences and a pair among
#: the policy's own rewrites, each labelled with the whole window compressed by the same variant (the paper's labels).
RANDOM_EXTRACT_CANDIDATES = ["--candidate_variants", "greedy", "words:0.25", "extract:1", "extract:1:1", "extract:1:2",
                             "extract:2", "--label_negatives", "compressed"]
RANDOM_EXTRACTS = ["--train_families", "multi_fact", *RANDOM_EXTRACT_CANDIDATES]

#: name -> (what changes, recipe flags, the data cache it shares: runs with the same candidates share one)
ABLATIONS: dict[str, tuple[str, list[str], str]] = {
    "default": ("the recipe's defaults: facts from six families, every sentence a candidate, labels against the "
                "original passages, every failure paired, 1 epoch", [], "data"),
    "multi_fact_only": ("training facts about people only (multi_fact: 6 needle wordings, not 36)",
                        ["--train_families", "multi_fact"], "multi-fact-data"),
    "multi_fact_only_lr1e-4": ("multi_fact_only at learning rate 1e-4, not 5e-4",
                               ["--train_families", "multi_fact", "--learning_rate", "1e-4"], "multi-fact-data"),
    "compressed_labels": ("labels with the window compressed by the same variant (the paper's), not against the "
                          "original passages", ["--label_negatives", "compressed"], "compressed-labels-data"),
    "random_extracts": ("the earlier default: multi_fact only, 3 random single sentences and a pair as extracts, "
                        "compressed labels", RANDOM_EXTRACTS, "random-extracts-data"),
    "longest_failure": ("random_extracts, with one pair per passage against the longest failure (the released "
                        "code), 2 epochs", [*RANDOM_EXTRACTS, "--pairs_rejected", "longest", "--num_train_epochs", "2"],
                        "random-extracts-data"),
    "no_extracts": ("multi_fact only, candidates from the policy only (greedy, a word budget, sampling), compressed "
                    "labels", ["--train_families", "multi_fact", "--candidate_variants", "greedy", "words:0.25",
                               "sample:0.8", "--label_negatives", "compressed"], "no_extracts-data"),
    "no_length_penalty": ("random_extracts, with the length penalty off (length_penalty_coef 0)",
                          [*RANDOM_EXTRACTS, "--length_penalty_coef", "0"], "random-extracts-data"),
    "two_epochs": ("random_extracts, twice the steps (2 epochs)", [*RANDOM_EXTRACTS, "--num_train_epochs", "2"],
                   "random-extracts-data"),
    "single_sentences": ("random_extracts, with five different single sentences and a pair (group:N:D) as extracts",
                         ["--train_families", "multi_fact", "--candidate_variants", "greedy", "words:0.25",
                          "group:1:0", "group:1:1", "group:1:2", "group:1:3", "group:1:4", "group:2:0",
                          "--label_negatives", "compressed"], "single_sentences-data"),
    "six_families": ("random_extracts, with training facts from all six retrieval families of data/mixture.py",
                     ["--train_families", *MIXTURE_FAMILIES, *RANDOM_EXTRACT_CANDIDATES], "six_families-data"),
    "dpo": ("DPO against the adapter-free reference (beta 0.1) instead of ORPO", ["--color_loss", "dpo",
                                                                                   "--beta", "0.1"], "data"),
}
SHARED_STAGES = ("corpus-train", "corpus-test", "eval-untrained", "candidates")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablations", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS),
                        help="which runs, in order (default: all; 'default' first so the others can share its data)")
    parser.add_argument("--out", default="benchmarks/results/color_ablation", help="where the tables go")
    parser.add_argument("--work_dir", default="out/color-ablation", help="the runs' output folders and caches")
    parser.add_argument("--reader", default="dense", help="the reader whose recall the summary reports")
    return parser


def run(name: str, extra: list[str], work: Path) -> tuple[list[dict[str, Any]], float]:
    """One recipe run; its held-out rows and its wall time."""
    _, flags, cache_name = ABLATIONS[name]
    cache = work / cache_name
    if not cache.exists() and (work / "data").exists():
        for stage in SHARED_STAGES:  # a copied stage is kept only where its fingerprint is this run's
            if (work / "data" / stage).is_dir():
                shutil.copytree(work / "data" / stage, cache / stage)
    out = work / name
    command = [sys.executable, str(ROOT / "recipes" / "color_dpo.py"), *flags, "--output_dir", str(out),
               "--cache_dir", str(cache), "--resume_from_checkpoint", "false", *extra]
    print(f"[{name}] {' '.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads((out / "color_eval.json").read_text()), time.perf_counter() - start


def summary(results: dict[str, dict[str, Any]], reader: str) -> str:
    """Markdown: per ablation, recall@1 with its interval and the ratio of the trained and untrained policy and
    of the best extract at the trained policy's length, and the run's wall time."""
    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return "-"
        low, high = row["recall@1 95% CI"]
        return f"{row['recall@1']:.3f} [{low:.2f}, {high:.2f}] at {row['ratio']:.2f}x"

    def paired(row: dict[str, Any] | None) -> str:
        if row is None or "trained minus this, recall@1" not in row:
            return "-"
        low, high = row["trained minus this, 95% CI"]
        return f"{row['trained minus this, recall@1']:+.3f} [{low:+.2f}, {high:+.2f}]"

    lines = ["| run | what changes | trained | untrained | best extract (same length) | trained minus best extract "
             "(paired) | uncompressed | wall |", "|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        mine = {r["corpus"]: r for r in result["rows"] if r["reader"] == reader}
        seconds = result["wall_s"]
        extracts = [r for label, r in mine.items() if label.startswith("extractive")]
        best = max(extracts, key=lambda r: r["recall@1"], default=None)
        best_cell = f"{cell(best)} ({best['corpus'][12:-1]})" if best else "-"
        lines.append(f"| {name} | {ABLATIONS[name][0]} | {cell(mine.get('trained'))} | {cell(mine.get('untrained'))} "
                     f"| {best_cell} | {paired(best)} | {cell(mine.get('uncompressed'))} | {seconds / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, extra = make_parser().parse_args(argv[:split]), argv[split + 1:]
    work, out = Path(args.work_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.ablations:
        rows, seconds = run(name, extra, work)
        record = {"ablation": name, "flags": ABLATIONS[name][1] + extra, "wall_s": round(seconds, 1), "rows": rows}
        (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        results = {n: json.loads((out / f"{n}.json").read_text()) for n in ABLATIONS if (out / f"{n}.json").is_file()}
        (out / "results.md").write_text(summary(results, args.reader))  # every ablation run so far, here or before
    print((out / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
