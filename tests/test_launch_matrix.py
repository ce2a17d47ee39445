"""Every documented GPU command starts: each ``accelerate launch --config_file accelerate_configs/<x>.yaml
recipes/<r>.py --config recipes/configs/<r>/gpu*.yaml`` line of README.md and docs/gpu.md trains one step on CPU.

Each command runs as written (its accelerate config, its recipe, its YAML) with only sizes overridden: the tiny
random Llama saved to a folder as the base, tiny data and model sizes, one step, ``--bf16 false``, no evaluation
samples. What makes a GPU command run on CPU is added and nothing else:

- every run: ``DS_ACCELERATOR=cpu``, one thread, and ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS=1`` (on CPU
  accelerate counts one DeepSpeed process when it fills "auto": see accelerate_configs/zero2.yaml);
- a config that names a GPU (single_gpu.yaml, multi_gpu.yaml): the launcher's ``--cpu --mixed_precision no``
  (and ``--num_processes 2`` for multi_gpu.yaml);
- a DeepSpeed config: the launcher's ``--num_processes 2`` and the recipe's ``--use_cpu true`` (without it
  TrainingArguments counts one process on a machine without CUDA and DeepSpeed refuses the batch sizes);
- ``TRITON_INTERPRET=1``: gist/gpu.yaml's fused LM loss is Liger-Kernel's Triton kernel, which runs on CPU only
  in Triton's interpreter (trainers/fused_loss.py).

Each run must exit 0, log a finite first loss and write the export. The documented commands are read from the
pages, so a new one is tested automatically, and every ``gpu*.yaml`` must appear in one of them. The multi-node
command of docs/gpu.md (two machines) is tested by tests/test_distributed.py::test_two_machines_train_as_one;
one more run puts gist/gpu.yaml under multi_gpu.yaml (DDP on 2 CPU processes), which no documented command uses.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port
from test_docs import commands

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "gpu.md"]
GPU_CONFIG = re.compile(r"recipes/configs/(\w+)/(gpu\w*)\.yaml")
# Launches of several machines: tests/test_distributed.py::test_two_machines_train_as_one runs that launcher.
MULTI_MACHINE = {"multi_node_zero2"}
ONE_STEP = ["--max_steps", "1", "--save_steps", "1", "--logging_steps", "1", "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "1", "--bf16", "false"]
GPU_LAUNCHERS = {"single_gpu": ["--cpu", "--mixed_precision", "no"],
                 "multi_gpu": ["--cpu", "--mixed_precision", "no", "--num_processes", "2"]}
DEEPSPEED_LAUNCHERS = {"zero2", "zero3"}

# Sizes only, per recipe/config: the data and the compressor as small as each config's tasks allow.
SIZES: dict[str, list[str]] = {
    "gist/gpu": ["--train_samples_per_task", "1", "--context_tokens", "96", "--segment_length", "32",
                 "--lora_r", "4", "--num_eval_samples", "0"],
    "cskv/gpu": ["--train_samples", "1", "--train_tokens", "32", "--calibration_samples", "1",
                 "--num_eval_samples", "0"],
    "rcc/gpu": ["--train_samples_per_task", "1", "--context_tokens", "72", "--window", "32", "--rate", "8",
                "--max_target_tokens", "64", "--reconstruction_span_tokens", "24", "--continuation_tokens", "8",
                "--num_eval_samples", "0"],
    "lcirc/gpu": ["--train_samples_per_task", "1", "--context_tokens", "72", "--segment_length", "32",
                  "--num_latents", "4", "--perceiver_layers", "1", "--max_target_tokens", "64",
                  "--continuation_tokens", "8", "--num_eval_samples", "0"],
    # --init_from: the lcirc/gpu run's export (added by the test)
    "lcirc/gpu_qd": ["--train_samples_per_task", "1", "--context_tokens", "160", "--segment_length", "32",
                     "--num_latents", "4", "--perceiver_layers", "1", "--grad_segments", "2",
                     "--num_eval_samples", "0"],
    "softpromptcomp/gpu": ["--train_samples_per_task", "1", "--context_tokens", "96", "--summary_tokens", "8",
                           "--summary_batch", "2", "--num_soft", "4", "--perceiver_layers", "1", "--lora_r", "4",
                           "--num_eval_samples", "0"],
    "incomes/gpu": ["--num_train_edits", "4", "--num_eval_edits", "2", "--pool_sizes", "3", "--eval_pool_sizes", "1",
                    "--eval_queries", "1", "--eval_max_new_tokens", "2"],
    "color_dpo/gpu": ["--num_train_passages", "2", "--num_eval_passages", "1", "--passage_tokens", "32",
                      "--corpus_size", "1", "--candidate_variants", "sample:1.0", "sample:1.5",
                      "--pairs_all_failed", "shortest_vs_longest", "--max_new_tokens", "6", "--generation_batch_size",
                      "2", "--length_probe_size", "1", "--length_probe_steps", "0", "--lora_r", "4"],
}


def documented() -> list[tuple[str, str, str, list[str]]]:
    """(recipe, config, launcher, launcher flags as written) of every documented single-machine GPU command."""
    found: dict[tuple[str, str, str], list[str]] = {}
    for page in PAGES:
        for words in commands(page):
            while words and re.fullmatch(r"\w+=\S*", words[0]):  # DS_ACCELERATOR=cpu accelerate launch ...
                words = words[1:]
            if words[:2] != ["accelerate", "launch"] or "--config_file" not in words:
                continue
            script = next((i for i, w in enumerate(words) if re.fullmatch(r"recipes/\w+\.py", w)), None)
            config = next((GPU_CONFIG.fullmatch(w) for w in words[script or 0:] if GPU_CONFIG.fullmatch(w)), None)
            if script is None or config is None:
                continue
            launcher = Path(words[words.index("--config_file") + 1]).stem
            if launcher in MULTI_MACHINE:
                continue
            recipe = Path(words[script]).stem
            assert recipe == config.group(1), f"{page.name}: {recipe}.py with {config.group(0)}"
            flags = list(words[2:script])
            del flags[flags.index("--config_file"):flags.index("--config_file") + 2]
            found.setdefault((recipe, config.group(2), launcher), flags)
    return [(*key, flags) for key, flags in sorted(found.items())]


DOCUMENTED = documented()
# Not documented: the one DDP launch (no documented GPU command uses multi_gpu.yaml).
EXTRA = [("gist", "gpu", "multi_gpu", [])]
CASES = DOCUMENTED + EXTRA


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """One folder for every run of this module (lcirc/gpu_qd starts from the lcirc/gpu run's export)."""
    return tmp_path_factory.mktemp("launch-matrix")


def launch(recipe: str, config: str, launcher: str, flags: list[str], model: Path, out: Path,
           extra: tuple[str, ...] | list[str] = ()) -> None:
    """One documented command on CPU with sizes overridden; it must exit 0, log a finite first loss and export."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "TRITON_INTERPRET": "1"}
    cpu = [*flags, *GPU_LAUNCHERS.get(launcher, [])]
    recipe_cpu = []
    if launcher in DEEPSPEED_LAUNCHERS:
        cpu += ["--num_processes", "2"]
        recipe_cpu = ["--use_cpu", "true"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               f"accelerate_configs/{launcher}.yaml", *cpu, "--main_process_port", str(free_port()),
               f"recipes/{recipe}.py", "--config", f"recipes/configs/{recipe}/{config}.yaml", "--model_name_or_path", str(model), *ONE_STEP,
               *SIZES[f"{recipe}/{config}"], *extra, *recipe_cpu, "--output_dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\nfailed:\n{result.stderr[-4000:]}"
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    loss = next(entry["loss"] for entry in state["log_history"] if "loss" in entry)
    assert math.isfinite(loss) and loss > 0, f"first loss {loss}"
    assert (out / "compressor_config.json").is_file(), "no export in output_dir"


def test_every_gpu_config_is_documented() -> None:
    """An undocumented gpu*.yaml would be tested by nothing here."""
    configs = {(p.parent.name, p.stem) for p in (ROOT / "recipes" / "configs").glob("*/gpu*.yaml")}
    assert configs and configs <= {(recipe, config) for recipe, config, *_ in DOCUMENTED}, (
        f"undocumented GPU configs: {sorted(configs - {(r, c) for r, c, *_ in DOCUMENTED})}")
    assert {f"{recipe}/{config}" for recipe, config, *_ in CASES} <= set(SIZES), "a documented config has no sizes"


@pytest.mark.parametrize(("recipe", "config", "launcher", "flags"), CASES,
                         ids=[f"{r}/{c}/{launcher}" for r, c, launcher, _ in CASES])
def test_documented_gpu_command_starts_on_cpu(recipe: str, config: str, launcher: str, flags: list[str],
                                              tiny_folder: Path, outputs: Path) -> None:
    out = outputs / f"{recipe}-{config}-{launcher}"
    extra = []
    if recipe == "lcirc" and config == "gpu_qd":  # init_from: out/lcirc-smollm2-gpu, the lcirc/gpu run's export
        first = next(case for case in DOCUMENTED if case[:2] == ("lcirc", "gpu"))
        start = outputs / f"lcirc-gpu-{first[2]}"
        if not (start / "compressor_config.json").is_file():  # this case run alone: train the export first
            launch(*first, tiny_folder, start)
        extra = ["--init_from", str(start)]
    launch(recipe, config, launcher, flags, tiny_folder, out, extra)
