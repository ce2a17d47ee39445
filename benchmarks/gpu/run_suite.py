#!/usr/bin/env python3
"""The GPU suite: one script, run once on a GPU machine (H100 / H200), under 8 minutes.

    cd <repo root> && python3 benchmarks/gpu/run_suite.py --out $OUT

Sections (each in its own try/except; results rewritten after every measurement):
1. kernel_correctness  - the CSKV Triton decode kernel vs its PyTorch reference, fp16 and bf16;
2. kernel_speed        - decode attention from the CSKV latent cache vs dense SDPA, 1k-128k tokens,
                         batch 1 and 16, with bytes moved and the fraction of the copy-bandwidth roofline;
3. training_throughput - gist / cskv trainers vs LoRA SFT (tokens/s, peak memory), with and without
                         Liger's fused linear cross-entropy;
4. real_run            - optional: a short real gist run and its evaluation, when the embedded
                         weights are on the machine (``weights.py``), else "skipped: weights absent";
5. gist_stages         - optional, the same weights: the shipped gist compressor's two stages (pretrain.yaml,
                         then mixture.yaml from its export) for a few minutes each with GPU overrides, each
                         evaluated and exported by the recipe; both artifacts come back under
                         ``--out``/gist_stages/. Needs more than the default budget left: run it alone
                         (``--sections gist_stages --budget-s 540``, README).
Writes ``results.json``, ``results.md`` and ``log.txt`` to ``--out``. Without a GPU (or with
``--smoke``) it runs a reduced form on the CPU (kernel under ``TRITON_INTERPRET=1``, tiny model):
that is what ``tests/test_gpu_suite.py`` runs, so the suite cannot rot.

The repository is not installed on the GPU machine: the repo root goes on ``sys.path``; wheels the
machine lacks (``fetch_wheels.sh`` puts them in ``benchmarks/gpu/.cache/wheels``) are unpacked to
a temporary folder and put on ``sys.path`` before anything imports them.

``--publish DIR`` (no measurement) copies a fetched results folder to
``benchmarks/results/gpu/<device>/`` for commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite_common as common  # noqa: E402  (stdlib only: safe before the bootstrap)
import suite_real  # noqa: E402  (imports suite_common only at module level)

# Minimum seconds of budget a section needs to be worth starting (the optional ones check their own).
MIN_SECONDS = {"kernel_correctness": 20, "kernel_speed": 40, "training_throughput": 60, "real_run": 150}
SECTIONS = ["kernel_correctness", "kernel_speed", "training_throughput", "real_run", suite_real.STAGES_SECTION]
common.SECTION_TITLES.setdefault(suite_real.STAGES_SECTION, suite_real.STAGES_TITLE)
common.SECTION_COLUMNS.setdefault(suite_real.STAGES_SECTION, suite_real.STAGES_COLUMNS)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ctxzip GPU suite", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--out", type=Path, help="output folder (results.json, results.md, log.txt)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget from start; sections not started by then are skipped (default 7.5 min)")
    p.add_argument("--smoke", action="store_true", help="reduced CPU form (automatic without a GPU)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset to run, of {','.join(SECTIONS)}")
    p.add_argument("--real-minutes", type=float, default=2.0, help="training minutes of the real run (section 4)")
    p.add_argument("--real-eval-samples", type=int, default=50, help="held-out samples evaluated by the real run")
    p.add_argument("--real-max-rows", type=int, default=160,
                   help="training rows built per task for the real run (data building is CPU time)")
    p.add_argument("--stage1-minutes", type=float, default=3.0,
                   help="training minutes of gist_stages' stage 1 (pretrain.yaml); scaled down to the budget left")
    p.add_argument("--stage2-minutes", type=float, default=3.0,
                   help="training minutes of gist_stages' stage 2 (mixture.yaml); scaled down with stage 1's")
    p.add_argument("--stages-eval-samples", type=int, default=100,
                   help="held-out samples of stage 2's evaluation (generation; the plan reserves 1.2 s each, "
                        "an estimate)")
    p.add_argument("--stages-batch", type=int, default=16, help="per-device batch of both gist stages")
    p.add_argument("--wheels", type=Path, default=common.WHEELS, help="folder of carried wheels")
    p.add_argument("--publish", type=Path, metavar="DIR",
                   help="copy a fetched results folder to benchmarks/results/gpu/<device>/ and exit")
    args = p.parse_args(argv)
    if args.publish is None and args.out is None:
        p.error("--out is required (or --publish DIR)")
    unknown = sorted({s.strip() for s in args.sections.split(",") if s.strip()} - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}: choose from {', '.join(SECTIONS)}")
    return args


def publish(folder: Path) -> Path:
    data = json.loads((folder / "results.json").read_text())
    target = common.ROOT / "benchmarks" / "results" / "gpu" / common.slug(data["meta"]["environment"]["device"])
    target.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "results.md", "log.txt"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, target / name)
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.publish is not None:
        print(f"published to {publish(args.publish)}")
        return 0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").unlink(missing_ok=True)
    clock = common.Clock(args.budget_s, out / "log.txt")
    common.add_paths()
    wheels = common.install_wheels(args.wheels)
    clock.log(f"wheels: {wheels or 'none carried'}")

    import torch  # after the wheels; torch itself does not import triton

    smoke = args.smoke or not torch.cuda.is_available()
    if smoke:
        # The interpreter must be chosen before triton compiles (decorates) any kernel.
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            clock.log("warning: triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
    device = "cpu" if smoke else "cuda"
    # TF32 stays off (PyTorch's default): the kernel check's fp32 reference must be exact fp32.
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "mode": "smoke (CPU)" if smoke else "gpu",
            "command": "python3 " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
            "budget_s": args.budget_s, "wheels": wheels, "environment": common.environment()}
    results = common.Results(out, meta)
    results.write()
    clock.log(f"device: {meta['environment']['device']} ({meta['mode']})")
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    gist_step_s: list[float | None] = [None]

    def correctness(record: dict) -> None:
        from suite_kernels import section_correctness

        section_correctness(record, results, clock, device, smoke)

    def speed(record: dict) -> None:
        from suite_kernels import section_speed

        # GPU: leave room for training (and the real run); smoke: never skip (the test checks every row)
        section_speed(record, results, clock, device, smoke, deadline_s=clock.elapsed() + (600 if smoke else 100))

    def training(record: dict) -> None:
        from suite_training import section_training

        section_training(record, results, clock, device, smoke, deadline_s=clock.elapsed() + (600 if smoke else 200))
        rows = {r["variant"]: r for r in record.get("rows", []) if "step_ms" in r}
        if "gist" in rows:
            gist_step_s[0] = rows["gist"]["step_ms"] / 1e3

    def real(record: dict) -> None:
        from suite_real import section_real

        reserve = 20 if smoke else 75  # conversion, data, the recipe's evaluation and export around training
        minutes = max(0.25, min(args.real_minutes, (clock.remaining() - reserve - 30) / 60))
        section_real(record, results, clock, device, smoke, minutes, args.real_eval_samples, gist_step_s[0],
                     min_seconds=0 if smoke else MIN_SECONDS["real_run"], max_rows_per_task=args.real_max_rows,
                     # training also stops early enough for the evaluation and export to end within the budget
                     stop_training_at_s=None if smoke else args.budget_s - 45)

    def stages(record: dict) -> None:
        suite_real.section_stages(record, results, clock, device, smoke, (args.stage1_minutes, args.stage2_minutes),
                                  args.stages_eval_samples, args.stages_batch)

    sections = {"kernel_correctness": correctness, "kernel_speed": speed, "training_throughput": training,
                "real_run": real, suite_real.STAGES_SECTION: stages}
    for name, fn in sections.items():
        if name in wanted:
            # the optional runs check their budget themselves, after "weights absent" (the likelier reason to skip)
            need = 0 if smoke or name in ("real_run", suite_real.STAGES_SECTION) else MIN_SECONDS[name]
            common.run_section(results, clock, name, fn, need)
    meta["finished"] = f"yes, after {clock.elapsed():.0f} s"
    results.write()
    clock.log(f"done: {out / 'results.md'}")
    statuses = {n: r.get("status") for n, r in results.data["sections"].items()}
    clock.log(f"sections: {statuses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
