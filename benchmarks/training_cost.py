#!/usr/bin/env python3
"""Training cost on the CPU: tokens/s and peak memory of every learned method as a ratio to LoRA SFT.

    python benchmarks/training_cost.py --out benchmarks/results/training_cost_cpu

The variants, data and timing are the GPU suite's (``benchmarks/gpu/suite_training.py``): random weights
of SmolLM2-135M-Instruct's architecture in float32, every method trained through its own trainer class
and a ``transformers.Trainer`` loop on the same random rows (a ``context`` compressed, a ``target``
decoded from the memory; LoRA SFT reads context + target as one sequence), a warm-up step, then timed
steps (median). Only the shapes differ: CPU-sized ones, from the CPU recipes' settings (the gist
mixture's segments and LoRA rank; RCC / LCIRC / SoftPromptComp use their ``gpu.yaml`` settings, as the
GPU suite does).

Each variant runs in its own process, so that its peak resident memory (``ru_maxrss``: the model, the
optimizer state and the step's activations, what a user's machine must hold) is its own. All
variants run one after another in one invocation: the ratios compare runs on the same machine
under the same load. ``--smoke`` runs the tiny model (what the tests run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "gpu"))

import suite_common as common  # noqa: E402  (stdlib only)

LEARNED = ("gist", "rcc", "lcirc", "softpromptcomp_soft", "cskv_reconstruction")
VARIANTS = ("lora_sft", *LEARNED)
# The bar each method must reach (tokens/s as a fraction of LoRA SFT's on the same tokens).
TARGET_RATIO = {"gist": 0.8}
DEFAULT_TARGET_RATIO = 0.5


def cpu_shapes(smoke: bool) -> Any:
    import suite_training as training

    if smoke:
        return training.shapes(smoke=True)
    return training.Shapes(
        batch=2, context=512, target=64,
        gist=dict(tokens_per_gist=4, segment_length=256, lora_r=8, lora_alpha=16),
        lora=dict(r=8, alpha=16), cskv=dict(density=0.5, window=32, quant_bits=4, quant_group_size=32),
        memory_methods={"rcc": training.recipe_config("rcc"), "lcirc": training.recipe_config("lcirc"),
                        "softpromptcomp": {**training.recipe_config("softpromptcomp"), "sources": "soft"}},
        cskv_tokens=576, cskv_batch=2, warmup=1, timed=3,
        notes=["CPU shapes: batch 2, context 512 + target 64 tokens (cskv: 576-token rows); gist with "
               "recipes/configs/gist/mixture.yaml's segment 256, 4 tokens per gist, LoRA r 8"])


def run_child(name: str, smoke: bool) -> dict[str, Any]:
    """Train one variant in this process and return its row (with this process's peak memory)."""
    common.add_paths()
    import suite_training as training
    import torch

    torch.manual_seed(0)
    sh = cpu_shapes(smoke)
    config = training.base_config(smoke)
    for variant, build, dataset, batch, per_step in training.variants(sh, "cpu", config.vocab_size, smoke):
        if variant == name:
            row = training.run_variant(variant, build, dataset, batch, per_step, sh, "cpu")
            # ru_maxrss is KiB on Linux: the process's peak, model load included.
            row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            return row
    raise ValueError(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")


def measure(variants: list[str], smoke: bool, log: Any) -> list[dict[str, Any]]:
    rows = []
    for name in variants:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name] + (["--smoke"] if smoke else [])
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{\"variant\"")]
        if done.returncode != 0 or not lines:
            row = {"variant": name, "note": f"error (exit {done.returncode}): {done.stderr.strip()[-400:]}"}
        else:
            row = json.loads(lines[-1])
        row["wall_s"] = round(time.perf_counter() - start, 1)
        log(f"{name}: " + (f"{row['tokens_per_s']:.0f} tokens/s, step {row['step_ms']:.0f} ms, "
                           f"peak {row['peak_rss_mib']:.0f} MiB" if "tokens_per_s" in row else row["note"]))
        rows.append(row)
    base = next((r for r in rows if r["variant"] == "lora_sft" and "tokens_per_s" in r), None)
    for row in rows:
        if base is not None and "tokens_per_s" in row:
            row["vs_lora_sft_tokens_per_s"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["vs_lora_sft_peak_rss"] = row["peak_rss_mib"] / base["peak_rss_mib"]
            if row["variant"] in LEARNED:
                row["target_ratio"] = TARGET_RATIO.get(row["variant"], DEFAULT_TARGET_RATIO)
                row["meets_target"] = row["vs_lora_sft_tokens_per_s"] >= row["target_ratio"]
    return rows


def markdown(record: dict[str, Any]) -> str:
    lines = [f"# Training cost vs LoRA SFT ({record['machine']})", "",
             f"`{record['command']}`, {record['started']}; {record['torch_threads']} torch threads.", ""]
    lines += [f"- {note}" for note in record["notes"]]
    lines += ["", "| variant | trainer | tokens/step | step ms | tokens/s | vs LoRA SFT | bar | peak RSS MiB "
                  "| vs LoRA SFT | loss finite |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['variant']} | {r.get('note', '')} | | | | | | | | |")
            continue
        bar = f">= {r['target_ratio']}" if "target_ratio" in r else ""
        lines.append(f"| {r['variant']} | {r['trainer']} | {r['tokens_per_step']} | {r['step_ms']:.0f} "
                     f"| {r['tokens_per_s']:.0f} | {r.get('vs_lora_sft_tokens_per_s', 0):.2f}x | {bar} "
                     f"| {r['peak_rss_mib']:.0f} | {r.get('vs_lora_sft_peak_rss', 0):.2f}x | {r['loss_finite']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for results.json and results.md")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--smoke", action="store_true", help="the tiny model (seconds; what the tests run)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.smoke)))
        return 0
    if args.out is None:
        p.error("--out is required")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    import suite_training as training  # noqa: F401  (fails early, before any child, if the suite cannot import)

    record: dict[str, Any] = {
        "machine": f"CPU, {os.cpu_count()} cores ({platform.machine()})", "started": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python benchmarks/training_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch_threads": _torch_threads(),
        "notes": list(cpu_shapes(args.smoke).notes) + [
            "base: " + ("tiny Llama (smoke)" if args.smoke else "SmolLM2-135M architecture, random weights, float32"),
            "tokens/s counts every token a step reads: context + target (LoRA SFT reads them as one sequence); "
            "cskv_reconstruction: its rows' tokens",
            "step ms: the median of the timed steps (data, forward, backward, clipping, optimizer)",
            "peak RSS: each variant in its own process (model, optimizer state, activations)",
            "InComeS is not here: its rows are pools of edits with a teacher pass, not the same tokens; "
            "CoLoR trains with TRL's DPO trainer on generated candidates"]}
    record["rows"] = measure(variants, args.smoke, lambda line: print(line, flush=True))
    (args.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(record))
    print(markdown(record))
    return 0 if all("tokens_per_s" in r for r in record["rows"]) else 1


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
