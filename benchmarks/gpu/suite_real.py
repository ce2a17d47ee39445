"""Section 4 of the GPU suite (optional): a short real gist run, trained and evaluated by the recipe.

Runs ``recipes/gist.py``'s ``main`` in this process with ``recipes/configs/gist/gpu.yaml`` and
overrides that make it fit the time left: training stops after a fixed number of minutes (the
step count is planned from section 3's measured gist step time, and a callback stops training at
the time limit in any case); data only for those steps; a smaller held-out evaluation. Only
possible where the embedded weights are on the machine (``weights.py``); otherwise "skipped:
weights absent".

Two names are patched for this run only, in the recipe's own module namespace: its trainer class
gets the time limit (and keeps the log history), and ``compare_with_baselines`` first moves the
compressors to the GPU, because the recipe evaluates what ``rebuild_trained`` / ``load_base`` built
on the CPU (models cannot be loaded on the GPU instead: ``GistCompressor`` initializes its gist
table on the CPU and fails next to a CUDA embedding).
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from typing import Any

from suite_common import ROOT, Clock, Results


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
    from transformers import TrainerCallback

    import ctxzip.trainers.memory_recipe as body  # the recipe's body: where its trainer and comparison are looked up
    import recipes.gist as recipe

    config_path = ROOT / "recipes/configs/gist/gpu.yaml"
    cfg = yaml.safe_load(config_path.read_text())
    batch, accumulation = int(cfg["per_device_train_batch_size"]), int(cfg["gradient_accumulation_steps"])
    tasks = len(cfg["train_tasks"])
    planned = plan(gist_step_s, minutes, batch, accumulation, tasks, max_rows_per_task)
    out = tempfile.mkdtemp(prefix="ctxzip-gist-real-")
    argv = recipe_argv(config_path, overrides(smoke, planned, out, eval_samples))
    record["command"] = "recipes/gist.py " + " ".join(argv)
    record["plan"] = {"minutes": minutes, "planned_from_step_s": gist_step_s, **planned}
    script_args, gist_config, training_args, model_args = recipe.make_parser().parse_args_and_config(args=argv)

    limit_s = minutes * 60
    history: list[dict[str, Any]] = []

    class TimeLimit(TrainerCallback):
        """Stop training once the minutes are spent (or the suite's clock reaches ``stop_training_at_s``),
        whatever the step count reached."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            late = stop_training_at_s is not None and clock.elapsed() > stop_training_at_s
            if time.monotonic() - self.start > limit_s or late:
                control.should_training_stop = True
                record["stopped_by"] = "suite budget" if late else "time limit"

    class TimedTrainer(body.MemoryCompressorTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.add_callback(TimeLimit())

        def train(self, *args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return super().train(*args, **kwargs)
            finally:
                history.extend(self.state.log_history)
                record["train_seconds"] = round(time.monotonic() - started, 1)
                record["train_steps"] = self.state.global_step
                record["train_epochs"] = round(float(self.state.epoch or 0.0), 2)

    # (module, attribute, replacement): only names that exist are patched (the recipe may change).
    patches = [(body, "MemoryCompressorTrainer", TimedTrainer)]
    if hasattr(body, "compare_with_baselines"):
        patches.append((body, "compare_with_baselines",
                        functools.partial(_compare_on, body.compare_with_baselines, device)))
    record["patched"] = [f"{m.__name__}.{name}" for m, name, _ in patches]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    started = time.monotonic()
    try:
        rows = recipe.main(script_args, gist_config, training_args, model_args)
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
    record["seconds_total"] = round(time.monotonic() - started, 1)
    losses = [h["loss"] for h in history if "loss" in h]
    record["train_loss_first_last"] = [losses[0], losses[-1]] if losses else None
    tokens = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * \
        record.get("train_steps", 0) * (script_args.context_tokens + script_args.max_target_tokens)
    record["train_tokens_per_s_upper_bound"] = tokens / max(record.get("train_seconds", 1.0), 1e-9)
    record["rows"] = [{k: v for k, v in row.items() if not isinstance(v, (list, dict))} for row in rows or []]
    record["notes"] = [f"evaluation: held-out {script_args.eval_task}, {script_args.num_eval_samples} samples, "
                       f"{script_args.eval_scoring} scoring; read against the full-context ceiling (the Q4_1 GGUF "
                       "weights are a weaker reader than the original model)",
                       "train_tokens_per_s_upper_bound counts every row as context_tokens + max_target_tokens"]
    if os.environ.get("CTXZIP_GPU_KEEP_OUTPUT") != "1":
        import shutil

        shutil.rmtree(out, ignore_errors=True)


def _compare_on(compare: Any, device: str, compressor: Any, *args: Any, **kwargs: Any) -> Any:
    """``compare_with_baselines`` with the trained and untrained compressors on ``device`` (the
    baselines it builds read ``compressor.base_lm``, so they follow)."""
    compressor.to(device)
    if kwargs.get("untrained") is not None:
        kwargs["untrained"].to(device)
    return compare(compressor, *args, **kwargs)
