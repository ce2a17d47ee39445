"""Sections 4 and 5 of the GPU suite (optional): real gist training, evaluated and exported by the recipe.

Section 4 (``section_real``) runs ``recipes/gist.py``'s ``main`` in this process with
``recipes/configs/gist/gpu.yaml`` and overrides that make it fit the time left: training stops after a
fixed number of minutes (the step count is planned from section 3's measured gist step time, and a
callback stops training at the time limit in any case); data only for those steps; a smaller held-out
evaluation.

Section 5 (``section_stages``) trains the shipped gist compressor's two stages at real scale: stage 1
with ``recipes/configs/gist/pretrain.yaml``, then stage 2 with ``recipes/configs/gist/mixture.yaml``
started (``--init_from``) from stage 1's export, each with GPU overrides on the command line and
stopped after its minutes by the same callback, so that the recipe still evaluates and exports. Each
stage's exported artifact (not its checkpoints) is copied under ``<out>/gist_stages/`` for the device
tool to bring back; a provisional copy is written as soon as training ends, so that a run cut during
the evaluation still brings the trained weights back.

Both are only possible where the embedded weights are on the machine (``weights.py``); otherwise
"skipped: weights absent".

Two names are patched for a run only, in the recipe body's module namespace: its trainer class gets
the time limit (and keeps the log history and counts the tokens it reads), and ``compare_with_baselines``
first moves the compressors to the GPU (models cannot be loaded on the GPU instead: ``GistCompressor``
initializes its gist table on the CPU and fails next to a CUDA embedding).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suite_common import ROOT, Clock, Results

STAGE_CONFIGS = (ROOT / "recipes/configs/gist/pretrain.yaml", ROOT / "recipes/configs/gist/mixture.yaml")
STAGES_SECTION = "gist_stages"
STAGES_TITLE = "5. The shipped gist compressor's two stages at real scale (embedded weights)"
# results.md's table; results.json keeps every field of the recipe's rows (``intervals``, ``ci_low`` / ``ci_high``)
STAGES_INTERVALS = ("accuracy", "answer_logprob", "bleu", "perplexity")
STAGES_COLUMNS = ["stage", "task", "method", "scoring", "n", "accuracy", "accuracy_ci", "answer_logprob",
                  "answer_logprob_ci", "bleu", "bleu_ci", "perplexity_ci", "achieved_ratio", "memory_bytes"]
# What the two stages need around their training on an H100 (seconds): the two model loads, the data,
# stage 1's small loglik evaluation, two exports and reload checks; and per held-out sample of stage 2's
# evaluation, generation by five methods (trained, stage 1's export, truncation, full and no context).
STAGES_OVERHEAD_S = 60.0
STAGES_EVAL_S_PER_SAMPLE = 1.2
STAGES_MIN_MINUTES = 0.5  # per stage: below this the section is skipped rather than run as a token gesture


def weights_present(record: dict[str, Any], clock: Clock) -> bool:
    """Reassemble carried GGUF parts if needed; False (with the reason recorded) when the weights are absent."""
    import weights

    root, message = weights.assemble()
    record["weights"] = message
    clock.log(f"  weights: {message}")
    if root is not None:
        weights.activate(root)
    import importlib.util

    spec = importlib.util.find_spec(weights.PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        record["status"] = "skipped"
        record["reason"] = f"skipped: weights absent ({message})"
        return False
    return True


def convert(record: dict[str, Any]) -> None:
    """The embedded model's safetensors folder, converted from the GGUF by the library on first use."""
    from ctxzip.compressors.models import embedded_model_dir

    started = time.monotonic()
    folder = embedded_model_dir()
    record["converted"] = f"{folder} ({time.monotonic() - started:.1f} s)"


def plan(step_s: float | None, minutes: float, batch: int, accumulation: int, tasks: int,
         max_rows_per_task: int) -> dict[str, int]:
    """Optimizer steps that fit ``minutes`` at ``step_s`` per micro-batch, and the rows they need.

    Rows are capped: building 2k-token rows costs CPU time on the GPU machine (tens of seconds per
    thousand rows), so past the cap the trainer goes round the data again (``max_steps`` wins over
    epochs) rather than spend the budget building it.
    """
    per_step = (step_s or 0.5) * accumulation * 1.15  # 15%: logging, the LR schedule, variable lengths
    steps = max(2, int(minutes * 60 / per_step))
    rows = min(max_rows_per_task, math.ceil(steps * batch * accumulation / tasks) + 1)
    return {"max_steps": steps, "train_samples_per_task": rows, "warmup_steps": max(1, steps // 10)}


def overrides(smoke: bool, planned: dict[str, int], out: str, eval_samples: int) -> dict[str, Any]:
    """Command-line overrides of ``recipes/configs/gist/gpu.yaml`` for the timed real run."""
    values: dict[str, Any] = {"output_dir": out, "report_to": "none", "save_steps": 10**6, "logging_steps": 5,
                              "num_eval_samples": eval_samples, "dataloader_num_workers": 0, **planned}
    if smoke:  # the tiny random model on the CPU: the plumbing, not a result
        values.update(model_name_or_path="tiny-random-llama", context_tokens=96, max_target_tokens=64, segment_length=48,
                      max_steps=2, train_samples_per_task=2, warmup_steps=0, per_device_train_batch_size=2,
                      gradient_accumulation_steps=1, bf16=False, use_cpu=True, num_eval_samples=2,
                      lora_r=4, lora_alpha=8, logging_steps=1)
    return values


def recipe_argv(config_path: Any, values: dict[str, Any]) -> list[str]:
    argv = ["--config", str(config_path)]
    for key, value in values.items():
        argv += [f"--{key}", str(value)]
    return argv


# ----- one timed run of the gist recipe -------------------------------------------------------------
@dataclass
class TimedRun:
    """What one timed recipe run gives back: its evaluation rows, the trainer's log history, its arguments."""

    rows: list[dict[str, Any]]
    history: list[dict[str, Any]]
    script_args: Any
    training_args: Any

    def losses(self) -> list[float]:
        return [float(h["loss"]) for h in self.history if "loss" in h]


def run_timed(config_path: Path, values: dict[str, Any], stats: dict[str, Any], clock: Clock, device: str,
              limit_s: float, stop_training_at_s: float | None = None,
              after_training: Callable[[Any], None] | None = None) -> TimedRun:
    """Run ``recipes/gist.py`` with ``config_path`` and the command-line ``values``, training stopped after
    ``limit_s`` seconds (or once the suite's clock reaches ``stop_training_at_s``) whatever the step count,
    then the recipe's own evaluation and export. ``after_training(trainer)`` runs as soon as training ends.
    Fills ``stats`` (command, steps, seconds, tokens read, what stopped it)."""
    import ctxzip.trainers.memory_recipe as body  # the recipe's body: where its trainer and comparison are looked up
    import recipes.gist as recipe

    argv = recipe_argv(config_path, values)
    stats["command"] = "recipes/gist.py " + " ".join(argv)
    parsed = recipe.make_parser().parse_args_and_config(args=argv)
    history: list[dict[str, Any]] = []
    trainer_class = _timed_trainer(body.MemoryCompressorTrainer, stats, history, clock, limit_s,
                                   stop_training_at_s, after_training)
    # (module, attribute, replacement): only names that exist are patched (the recipe may change).
    patches = [(body, "MemoryCompressorTrainer", trainer_class)]
    if hasattr(body, "compare_with_baselines"):
        patches.append((body, "compare_with_baselines",
                        functools.partial(_compare_on, body.compare_with_baselines, device)))
    stats["patched"] = [f"{m.__name__}.{name}" for m, name, _ in patches]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        rows = recipe.main(*parsed)
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
    return TimedRun(rows or [], history, parsed[0], parsed[2])


def _timed_trainer(base: type, stats: dict[str, Any], history: list[dict], clock: Clock, limit_s: float,
                   stop_training_at_s: float | None, after_training: Callable[[Any], None] | None) -> type:
    """``base`` (the recipe's trainer class) with the time limit, the token count and the log history."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        """Stop training once the time is spent (or the suite's clock reaches ``stop_training_at_s``)."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            late = stop_training_at_s is not None and clock.elapsed() > stop_training_at_s
            if time.monotonic() - self.start > limit_s or late:
                control.should_training_stop = True
                stats["stopped_by"] = "suite budget" if late else "time limit"

    class TimedTrainer(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.add_callback(TimeLimit())
            self.tokens_read: Any = 0  # a tensor where the batches are: summed without a synchronization

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            """Count the tokens each micro-batch reads (context and target, no padding), then train on it."""
            for key in ("context_mask", "attention_mask"):
                if key in inputs:
                    self.tokens_read = self.tokens_read + inputs[key].sum()
            return super().training_step(model, inputs, *args, **kwargs)

        def train(self, *args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                output = super().train(*args, **kwargs)
            finally:
                history.extend(self.state.log_history)
                stats["train_seconds"] = round(time.monotonic() - started, 1)
                stats["train_steps"] = self.state.global_step
                stats["train_epochs"] = round(float(self.state.epoch or 0.0), 2)
                stats["train_tokens"] = int(self.tokens_read)
            if after_training is not None:
                after_training(self)
            return output

    return TimedTrainer


def _compare_on(compare: Any, device: str, compressor: Any, *args: Any, **kwargs: Any) -> Any:
    """``compare_with_baselines`` with the trained and untrained compressors on ``device`` (the
    baselines it builds read ``compressor.base_lm``, so they follow)."""
    compressor.to(device)
    if kwargs.get("untrained") is not None:
        kwargs["untrained"].to(device)
    return compare(compressor, *args, **kwargs)


# ----- section 4: a short real run of gpu.yaml ------------------------------------------------------
def section_real(record: dict[str, Any], results: Results, clock: Clock, device: str, smoke: bool,
                 minutes: float, eval_samples: int, gist_step_s: float | None, min_seconds: float,
                 max_rows_per_task: int = 160, stop_training_at_s: float | None = None) -> None:
    if not weights_present(record, clock):
        return
    if clock.remaining() < min_seconds:
        record["status"] = "skipped"
        record["reason"] = (f"skipped: {clock.remaining():.0f} s of the budget left, the real run needs about "
                            f"{min_seconds:.0f} s")
        return
    convert(record)
    results.write()
    import yaml

    config_path = ROOT / "recipes/configs/gist/gpu.yaml"
    cfg = yaml.safe_load(config_path.read_text())
    batch, accumulation = int(cfg["per_device_train_batch_size"]), int(cfg["gradient_accumulation_steps"])
    planned = plan(gist_step_s, minutes, batch, accumulation, len(cfg["train_tasks"]), max_rows_per_task)
    out = tempfile.mkdtemp(prefix="ctxzip-gist-real-")
    record["plan"] = {"minutes": minutes, "planned_from_step_s": gist_step_s, **planned}
    started = time.monotonic()
    run = run_timed(config_path, overrides(smoke, planned, out, eval_samples), record, clock, device,
                    minutes * 60, stop_training_at_s)
    record["seconds_total"] = round(time.monotonic() - started, 1)
    losses = run.losses()
    record["train_loss_first_last"] = [losses[0], losses[-1]] if losses else None
    script_args, training_args = run.script_args, run.training_args
    seconds = max(record.get("train_seconds", 1.0), 1e-9)
    tokens = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * \
        record.get("train_steps", 0) * (script_args.context_tokens + script_args.max_target_tokens)
    record["train_tokens_per_s_upper_bound"] = tokens / seconds
    record["train_tokens_per_s"] = record.get("train_tokens", 0) / seconds
    record["rows"] = [{k: v for k, v in row.items() if not isinstance(v, (list, dict))} for row in run.rows]
    record["notes"] = [f"evaluation: held-out {script_args.eval_task}, {script_args.num_eval_samples} samples, "
                       f"{script_args.eval_scoring} scoring; read against the full-context ceiling (the Q4_1 GGUF "
                       "weights are a weaker reader than the original model)",
                       "train_tokens_per_s_upper_bound counts every row as context_tokens + max_target_tokens; "
                       "train_tokens_per_s counts the tokens its batches read (context and target, no padding)"]
    if os.environ.get("CTXZIP_GPU_KEEP_OUTPUT") != "1":
        shutil.rmtree(out, ignore_errors=True)


# ----- section 5: the shipped compressor's two stages -----------------------------------------------
# On the GPU: the CPU configs as they are, with these on the command line. max_steps is out of reach (the
# clock stops training; both configs' schedules are constant after warm-up, so a stop anywhere is clean) and
# no checkpoint is written (nothing would resume it: the machine is gone after the run).
GPU_STAGE_OVERRIDES: dict[str, Any] = {"use_cpu": False, "bf16": True, "fused_lm_loss": True, "max_steps": 10**6,
                                       "save_steps": 10**6, "logging_steps": 10, "report_to": "none"}
# The tiny random model on the CPU: the plumbing, not a result. max_steps caps the smoke run; the clock can
# stop it sooner (the test asks stage 1 for 0 minutes: one step, stopped by the time limit, still exported).
SMOKE_STAGE_OVERRIDES: dict[str, Any] = {
    "model_name_or_path": "tiny-random-llama", "use_cpu": True, "bf16": False, "fused_lm_loss": False,
    "max_steps": 2, "train_samples_per_task": 2, "warmup_steps": 0, "per_device_train_batch_size": 2,
    "num_eval_samples": 2, "lora_r": 4, "lora_alpha": 8, "logging_steps": 1, "segment_length": 32,
    "max_target_tokens": 32, "continuation_tokens": 16}
SMOKE_STAGE_SIZES: dict[int, dict[str, Any]] = {
    1: {"context_tokens": 64, "reconstruction_span_tokens": 24},
    2: {"context_tokens": 48, "max_train_context_tokens": 96, "eval_context_tokens": 96}}


def stage_overrides(stage: int, smoke: bool, out: str, batch: int, eval_samples: int,
                    init_from: str | None = None) -> dict[str, Any]:
    """Command-line overrides of stage ``stage``'s CPU config (1: pretrain.yaml, 2: mixture.yaml): the GPU
    settings, batch ``batch``; stage 2 starts from ``init_from`` and evaluates ``eval_samples`` held-out rows."""
    values: dict[str, Any] = {"output_dir": out, **GPU_STAGE_OVERRIDES, "per_device_train_batch_size": batch}
    if stage == 2:
        if not init_from:
            raise ValueError("stage 2 starts from stage 1's export: init_from is required")
        values.update(init_from=init_from, num_eval_samples=eval_samples)
    if smoke:
        values.update(SMOKE_STAGE_OVERRIDES, **SMOKE_STAGE_SIZES[stage])
    return values


def stage_minutes(requested: tuple[float, float], available_s: float,
                  floor: float = STAGES_MIN_MINUTES) -> tuple[float, float] | None:
    """The training minutes of stages 1 and 2 within ``available_s`` seconds: those requested, both scaled
    down by the same factor when they do not fit; ``None`` when either would get less than ``floor``."""
    total_s = 60.0 * (requested[0] + requested[1])
    scale = min(1.0, max(available_s, 0.0) / total_s) if total_s > 0 else 0.0
    minutes = (round(requested[0] * scale, 2), round(requested[1] * scale, 2))
    return minutes if min(minutes) >= floor else None


def artifact_files(folder: Path) -> list[Path]:
    """The exported artifact's files in ``folder`` (config, weights, model card, each adapter's two files),
    relative to it: what the Hub push uploads, never the checkpoints beside it."""
    from ctxzip.compressors.hub import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        CONFIG_NAME,
        WEIGHTS_NAME,
        adapter_folder,
        read_metadata,
    )

    meta = read_metadata(folder)
    adapters = (meta.get("adapters") or ["default"]) if meta.get("has_adapter") else []
    names = [Path(WEIGHTS_NAME), Path("README.md"), Path(CONFIG_NAME)] + [
        adapter_folder(Path(), name) / file for name in adapters for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)]
    return [name for name in names if (folder / name).is_file()]


def copy_artifact(folder: Path, target: Path) -> str:
    """Replace ``target`` with a copy of the artifact exported to ``folder``; returns what was copied."""
    shutil.rmtree(target, ignore_errors=True)
    files = artifact_files(folder)
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / name, target / name)
    size = sum((target / name).stat().st_size for name in files)
    return f"{len(files)} files, {size / 2**20:.2f} MiB: " + ", ".join(name.as_posix() for name in files)


def provisional_export(target: Path, summary: dict[str, Any], results: Results) -> Callable[[Any], None]:
    """Save the trainer's compressor to ``target`` as soon as training ends, before the recipe's evaluation:
    a run cut during the evaluation still brings the trained weights back (the recipe's export replaces it)."""
    def save(trainer: Any) -> None:
        from ctxzip.compressors.hub import save_compressor

        try:
            save_compressor(trainer.model, target, trainer.processing_class)
            summary["provisional_export"] = "saved (the trained weights, before the recipe's evaluation)"
        except Exception as exc:  # noqa: BLE001 - the recipe's own export follows; this copy is a safety net
            summary["provisional_export"] = f"failed: {type(exc).__name__}: {exc}"
        results.write()

    return save


def stage_summary(stats: dict[str, Any], run: TimedRun, minutes: float) -> dict[str, Any]:
    """One stage's training, as flat values: steps, time, tokens/s, first and last logged loss."""
    losses = run.losses()
    seconds = max(float(stats.get("train_seconds", 0.0)), 1e-9)
    return {"minutes": minutes, "stopped_by": stats.get("stopped_by", "max_steps"),
            "train_steps": stats.get("train_steps"), "train_seconds": stats.get("train_seconds"),
            "train_epochs": stats.get("train_epochs"), "train_tokens": stats.get("train_tokens"),
            "tokens_per_s": stats.get("train_tokens", 0) / seconds,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "losses_logged": len(losses), "loss_finite": bool(losses) and all(map(math.isfinite, losses))}


def eval_rows(stage: int, task: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recipe's evaluation rows with the stage and task, and each mean's 95% interval as a cell
    (``accuracy_ci``: ``[low, high]``; none where the scoring has no such mean)."""
    from ctxzip.eval.scoring import interval_of

    def cells(row: dict[str, Any]) -> dict[str, str | None]:
        intervals = {key: interval_of(row, key) for key in STAGES_INTERVALS}
        return {f"{key}_ci": f"[{i[0]:.4g}, {i[1]:.4g}]" if i else None for key, i in intervals.items()}

    return [{"stage": stage, "task": task, **row, **cells(row)} for row in rows]


def section_stages(record: dict[str, Any], results: Results, clock: Clock, device: str, smoke: bool,
                   minutes: tuple[float, float] = (3.0, 3.0), eval_samples: int = 100, batch: int = 16) -> None:
    """Train the shipped gist compressor's stage 1 then stage 2 for ``minutes`` each (scaled down to the
    budget left), evaluate and export each with the recipe, and copy both artifacts under
    ``<out>/gist_stages/stage{1,2}``."""
    if not weights_present(record, clock):
        return
    eval_reserve = 0.0 if smoke else STAGES_EVAL_S_PER_SAMPLE * eval_samples + 20.0  # + export and reload check
    reserve = 0.0 if smoke else STAGES_OVERHEAD_S + eval_reserve
    planned = minutes if smoke else stage_minutes(minutes, clock.remaining() - reserve)
    if planned is None:
        record["status"] = "skipped"
        record["reason"] = (f"skipped: {clock.remaining():.0f} s of the budget left; the two stages need "
                            f"{reserve:.0f} s around at least {STAGES_MIN_MINUTES} min of training each")
        return
    record["plan"] = {"stage1_minutes": planned[0], "stage2_minutes": planned[1], "requested": f"{minutes}",
                      "batch": batch, "eval_samples": eval_samples, "reserve_s": reserve}
    convert(record)
    results.write()
    # stage 1 leaves stage 2 its minutes and the rest its reserve; stage 2 leaves its evaluation and export theirs
    stops = (None, None) if smoke else (clock.budget_s - reserve - 60 * planned[1], clock.budget_s - eval_reserve)
    outputs = [tempfile.mkdtemp(prefix=f"ctxzip-gist-stage{stage}-") for stage in (1, 2)]
    record["rows"] = []
    try:
        for stage in (1, 2):
            values = stage_overrides(stage, smoke, outputs[stage - 1], batch, eval_samples,
                                     init_from=outputs[0] if stage == 2 else None)
            run_stage(stage, values, record, results, clock, device, planned[stage - 1], stops[stage - 1])
    finally:
        if os.environ.get("CTXZIP_GPU_KEEP_OUTPUT") != "1":
            for out in outputs:
                shutil.rmtree(out, ignore_errors=True)
    record["notes"] = [
        "stage 1: recipes/configs/gist/pretrain.yaml, stage 2: recipes/configs/gist/mixture.yaml started from stage "
        "1's export; both with the GPU overrides of each stage*_command, stopped by the clock",
        "stage 2's 'before training (init_from)' row is stage 1's export; its evaluation is the held-out wordings "
        "on stdlib text, which no stage trains on; *_ci: 95% intervals (Wilson for 0/1 scores, bootstrap otherwise)",
        "tokens_per_s counts the tokens the batches read (context and target, no padding), over the training time",
        f"the artifacts (no checkpoints) are under {STAGES_SECTION}/stage1 and {STAGES_SECTION}/stage2 next to "
        "this file"]


def run_stage(stage: int, values: dict[str, Any], record: dict[str, Any], results: Results, clock: Clock,
              device: str, minutes: float, stop_training_at_s: float | None) -> None:
    """One stage: the timed recipe run, its summary and evaluation rows in ``record``, its artifact copied."""
    import gc

    import torch

    target = results.out / STAGES_SECTION / f"stage{stage}"
    summary: dict[str, Any] = {"minutes": minutes}
    record[f"stage{stage}"] = summary
    stats: dict[str, Any] = {}
    clock.log(f"  {STAGES_SECTION}: stage {stage}, {minutes} min")
    run = run_timed(STAGE_CONFIGS[stage - 1], values, stats, clock, device, minutes * 60, stop_training_at_s,
                    after_training=provisional_export(target, summary, results))
    record[f"stage{stage}_command"] = stats["command"]
    summary.update(stage_summary(stats, run, minutes))
    summary["export"] = "final: " + copy_artifact(Path(values["output_dir"]), target)
    record["rows"] += eval_rows(stage, run.script_args.eval_task, run.rows)
    results.write()
    clock.log(f"  {STAGES_SECTION}: stage {stage} done: {summary['train_steps']} steps, loss "
              f"{summary['loss_first']} -> {summary['loss_last']}")
    del run
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
