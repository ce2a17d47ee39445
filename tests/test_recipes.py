"""Every recipe YAML parses (unknown keys are errors), and the gist recipe runs, saves and resumes
(automatically, or from ``--resume_from_checkpoint``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*/*.yaml"))


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_yaml_parses(config: Path, tmp_path: Path) -> None:
    recipe = load_recipe(config.parent.name)
    # GPU configs ask for bf16, which TrainingArguments refuses on a machine without a GPU.
    cpu_only = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    parsed = recipe.make_parser().parse_args_and_config(
        ["--config", str(config), "--output_dir", str(tmp_path), *cpu_only])
    values = yaml.safe_load(config.read_text())
    flat = {k: v for obj in parsed for k, v in vars(obj).items()}
    for key, value in values.items():
        if key == "output_dir":
            continue
        got = flat[key]
        if key == "report_to":  # TrainingArguments normalises this field to a list
            assert got == ([] if value == "none" else [value])
        else:
            assert got == value or str(got).endswith(str(value)), (key, got, value)


def test_unknown_yaml_key_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes/configs/gist/quickstart.yaml").read_text() + "\ntokens_per_gits: 8\n")
    with pytest.raises(ValueError, match="tokens_per_gits"):
        load_recipe("gist").make_parser().parse_args_and_config(["--config", str(bad)])


def test_cli_overrides_yaml(tmp_path: Path) -> None:
    parsed = load_recipe("gist").make_parser().parse_args_and_config(
        ["--config", str(ROOT / "recipes/configs/gist/quickstart.yaml"), "--tokens_per_gist", "8",
         "--output_dir", str(tmp_path)])
    assert parsed[1].tokens_per_gist == 8


TINY_ARGS = [
    "--config", str(ROOT / "recipes/configs/gist/quickstart.yaml"), "--base_model", "tiny-random-llama",
    "--train_samples_per_task", "8", "--context_tokens", "48", "--segment_length", "32",
    "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "2",
    "--num_eval_samples", "2", "--warmup_steps", "0",
]


def run_recipe(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "gist.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_gist_recipe_one_step_exports_a_loadable_compressor(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_recipe([*TINY_ARGS, "--max_steps", "1", "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| trained |" in result.stdout and "| truncation |" in result.stdout
    for name in ("compressor_config.json", "compressor.safetensors", "adapter_model.safetensors", "README.md"):
        assert (out / name).is_file(), name
    from compressors import CompressedLM

    clm = CompressedLM.from_pretrained(out)
    memory = clm.compress("The pass key is 12345. Remember it.")
    assert memory.slots > 0 and memory.ratio > 1


def test_killed_run_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "recipes" / "gist.py"), *TINY_ARGS, "--max_steps", "30",
            "--output_dir", str(out), "--num_eval_samples", "0"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no chance to clean up, as in a real crash
    proc.wait()
    assert first.is_file(), "the run never wrote its first checkpoint"
    assert not (out / "compressor_config.json").exists(), "the run finished before it could be killed"
    resumed = run_recipe([*TINY_ARGS, "--max_steps", "30", "--output_dir", str(out), "--num_eval_samples", "0"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from " in resumed.stdout and "checkpoint-" in resumed.stdout
    state = json.loads((out / "checkpoint-30" / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    resumed_logs = [e["step"] for e in state["log_history"] if "loss" in e]
    assert resumed_logs == sorted(resumed_logs)
    assert (out / "compressor_config.json").is_file()


def test_resume_from_checkpoint_path_continues_that_run(tmp_path: Path) -> None:
    """``--resume_from_checkpoint PATH`` resumes from PATH (here another run's checkpoint-2 while that
    run also has checkpoint-3): its step-3 loss is the original run's, so weights, optimizer state and
    data order all came back."""
    first, second = tmp_path / "first", tmp_path / "second"
    common = [*TINY_ARGS, "--max_steps", "3", "--save_steps", "1", "--lr_scheduler_type", "constant",
              "--num_eval_samples", "0"]
    original = run_recipe([*common, "--output_dir", str(first)])
    assert original.returncode == 0, original.stderr[-3000:]
    assert (first / "checkpoint-3").is_dir()
    resumed = run_recipe([*common, "--output_dir", str(second), "--resume_from_checkpoint",
                          str(first / "checkpoint-2")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {first / 'checkpoint-2'}" in resumed.stdout

    def losses(folder: Path) -> dict[int, float]:
        state = json.loads((folder / "checkpoint-3" / "trainer_state.json").read_text())
        return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}

    expected, got = losses(first), losses(second)
    assert sorted(got) == [1, 2, 3]
    assert got == pytest.approx(expected, abs=1e-4)
