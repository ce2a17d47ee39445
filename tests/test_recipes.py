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


RECIPES = ["gist", "color_dpo", "cskv", "rcc", "lcirc", "softpromptcomp", "incomes"]


def field_helps(recipe: str) -> dict[tuple[str, str], str]:
    """``(dataclass, field) -> help`` of every argument of ``recipe``'s parser (what ``--help`` prints)."""
    import dataclasses

    parser = load_recipe(recipe).make_parser()
    actions = {action.dest: action for action in parser._actions}
    return {(dtype.__name__, f.name): (actions[f.name].help or "").strip()
            for dtype in parser.dataclass_types for f in dataclasses.fields(dtype) if f.init}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_field_has_a_help(recipe: str) -> None:
    missing = [key for key, text in field_helps(recipe).items() if not text]
    assert not missing, f"fields without metadata help in recipes/{recipe}.py --help: {missing}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_model_config_is_trl_model_config_defaulting_to_the_embedded_model(recipe: str, tmp_path: Path) -> None:
    from trl import ModelConfig

    from ctxzip.compressors.models import EMBEDDED_MODEL
    from ctxzip.trainers.script_args import base_model_kwargs

    yaml_file = tmp_path / "no_model.yaml"
    yaml_file.write_text("dtype: float32\n")  # the YAML does not name the base model
    parsed = load_recipe(recipe).make_parser().parse_args_and_config(
        ["--config", str(yaml_file), "--output_dir", str(tmp_path)])
    model_args = parsed[-1]
    assert isinstance(model_args, ModelConfig) and model_args.model_name_or_path == EMBEDDED_MODEL
    assert base_model_kwargs(model_args) == {"dtype": "float32", "quantization": None, "revision": None,
                                             "attn_implementation": None}


def test_load_in_4bit_and_8bit_go_through_trl_quantization_config(tmp_path: Path) -> None:
    from ctxzip.trainers.script_args import base_model_kwargs, quantization_name

    parser = load_recipe("gist").make_parser()
    config = str(ROOT / "recipes/configs/gist/quickstart.yaml")
    *_, four = parser.parse_args_and_config(["--config", config, "--output_dir", str(tmp_path), "--load_in_4bit",
                                            "true", "--dtype", "bfloat16"])
    quant = base_model_kwargs(four)["quantization"]
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert base_model_kwargs(four, quantized=False)["quantization"] is None  # the export's plain base
    assert quantization_name(four) == "4bit-nf4"
    *_, eight = parser.parse_args_and_config(["--config", config, "--output_dir", str(tmp_path), "--load_in_8bit",
                                             "true"])
    assert base_model_kwargs(eight)["quantization"].load_in_8bit and quantization_name(eight) == "8bit"
    with pytest.raises(ValueError, match="8 bit and 4 bit"):
        parser.parse_args_and_config(["--config", config, "--load_in_8bit", "true", "--load_in_4bit", "true"])


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("key", ["use_peft: true", "lora_task_type: SEQ_CLS", "use_dora: true", "base_model: x",
                                 "quantization: 4bit"])
def test_model_config_peft_fields_and_the_old_keys_are_errors(recipe: str, key: str, tmp_path: Path) -> None:
    """ModelConfig's PEFT fields are not arguments (the compressor config's lora_* define the adapter), and
    the keys the recipes had before trl.ModelConfig are unknown: never silently ignored."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / f"recipes/configs/{recipe}/quickstart.yaml").read_text() + f"\n{key}\n")
    with pytest.raises(ValueError, match=key.split(":")[0]):
        load_recipe(recipe).make_parser().parse_args_and_config(["--config", str(bad), "--output_dir", str(tmp_path)])


def test_lora_flags_set_the_compressor_config_and_a_plain_model_config_with_peft_is_refused(tmp_path: Path) -> None:
    from trl import ModelConfig

    from ctxzip.trainers.script_args import CompressorModelConfig, base_model_kwargs, check_model_args

    parsed = load_recipe("gist").make_parser().parse_args_and_config(
        ["--config", str(ROOT / "recipes/configs/gist/quickstart.yaml"), "--output_dir", str(tmp_path),
         "--lora_r", "4", "--lora_alpha", "8"])
    assert (parsed[1].lora_r, parsed[1].lora_alpha) == (4, 8)  # GistConfig's: what the artifact records
    with pytest.raises(TypeError):
        CompressorModelConfig(lora_r=4)
    for peft in [{"use_peft": True}, {"lora_r": 4}, {"use_rslora": True}]:
        with pytest.raises(ValueError, match="lora_r / lora_alpha"):
            base_model_kwargs(ModelConfig(**peft))
    with pytest.raises(ValueError, match="4-bit or 8-bit"):
        check_model_args(CompressorModelConfig(load_in_4bit=True), quantization=False, what="the CSKV recipe")


TINY_ARGS = [
    "--config", str(ROOT / "recipes/configs/gist/quickstart.yaml"), "--model_name_or_path", "tiny-random-llama",
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
    from ctxzip.compressors import CompressedLM

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


@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_rcc_recipe_one_step_exports_and_reloads(tmp_path: Path, train_mode: str) -> None:
    """The RCC quickstart on the tiny model: a reconstruction + passkey step with both objectives, the export
    (projections, and the encoder's and decoder's PEFT adapters, or with ``train_mode: full`` (gpu.yaml's) the
    encoder's and decoder's own weights) and the reload check the recipe runs itself."""
    out = tmp_path / "rcc"
    args = ["--config", str(ROOT / "recipes/configs/rcc/quickstart.yaml"), "--model_name_or_path", "tiny-random-llama",
            "--train_samples_per_task", "4", "--context_tokens", "80", "--window", "32", "--rate", "8",
            "--per_device_train_batch_size", "4", "--max_steps", "1", "--num_eval_samples", "1",
            "--eval_task", "passkey", "--train_mode", train_mode, "--output_dir", str(out)]
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "rcc.py"), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| trained |" in result.stdout and "reloads and generates identically" in result.stdout
    adapters = ["encoder/adapter_model.safetensors", "decoder/adapter_model.safetensors"]
    for name in ["compressor_config.json", "compressor.safetensors", "README.md",
                 *(adapters if train_mode == "lora" else [])]:
        assert (out / name).is_file(), name
    if train_mode == "full":
        assert not any((out / name).exists() for name in adapters)


def test_lcirc_then_qd_lcirc_from_its_export_one_step_each(tmp_path: Path) -> None:
    """The two quickstarts on the tiny model: LCIRC (continuation), then QD-LCIRC started from that export
    (every tensor but the query mixer's), each exported and checked to reload and generate identically."""
    import json

    tiny = ["--model_name_or_path", "tiny-random-llama", "--train_samples_per_task", "4", "--context_tokens", "80",
            "--segment_length", "32", "--num_latents", "4", "--per_device_train_batch_size", "2", "--max_steps", "1",
            "--num_eval_samples", "1"]
    lcirc, qd = tmp_path / "lcirc", tmp_path / "qd"
    for config, out, extra in (("quickstart", lcirc, []), ("quickstart_qd", qd, ["--init_from", str(lcirc)])):
        args = ["--config", str(ROOT / f"recipes/configs/lcirc/{config}.yaml"), *tiny, *extra, "--output_dir", str(out)]
        result = subprocess.run([sys.executable, str(ROOT / "recipes" / "lcirc.py"), *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "| trained |" in result.stdout and "reloads and generates identically" in result.stdout
    assert "initialised here: mixer." in result.stdout
    assert json.loads((lcirc / "compressor_config.json").read_text())["compressor_type"] == "lcirc"
    assert json.loads((qd / "compressor_config.json").read_text())["compressor_type"] == "qd_lcirc"


@pytest.mark.parametrize("ablation", [["--sources", "summary"], ["--weighting", "none"], ["--weighting", "per_vector"]])
def test_softpromptcomp_recipe_one_step_logs_its_gates_and_reloads(tmp_path: Path, ablation: list[str]) -> None:
    """The quickstart on the tiny model (summaries written by it, cached under a temporary CTXZIP_HOME): one
    step of QA + continuation, the gate values in the training log, the export and the reload check."""
    import json
    import math
    import os

    out = tmp_path / "spc"
    args = ["--config", str(ROOT / "recipes/configs/softpromptcomp/quickstart.yaml"), "--model_name_or_path",
            "tiny-random-llama", "--train_samples_per_task", "2", "--context_tokens", "64", "--summary_tokens", "8",
            "--per_device_train_batch_size", "2", "--max_steps", "1", "--logging_steps", "1", "--save_steps", "1",
            "--num_eval_samples", "1", "--output_dir", str(out), *ablation]
    env = {**os.environ, "CTXZIP_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "softpromptcomp.py"), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| trained |" in result.stdout and "reloads and generates identically" in result.stdout
    log = next(e for e in json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
               if "loss" in e)
    gates = {"gate_summary"} if "summary" in ablation else {"gate_summary", "gate_soft"}
    assert gates <= set(log) if "none" not in ablation else not {"gate_summary", "gate_soft"} & set(log)
    assert math.isfinite(log["loss"])
    assert list((tmp_path / "home" / "summaries").rglob("*.json"))  # the summaries, cached for the next run


def test_a_configuration_with_nothing_to_train_is_refused_clearly(tmp_path: Path) -> None:
    args = ["--config", str(ROOT / "recipes/configs/softpromptcomp/quickstart.yaml"), "--model_name_or_path",
            "tiny-random-llama", "--sources", "summary", "--weighting", "none", "--output_dir", str(tmp_path)]
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "softpromptcomp.py"), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "no tensor to train" in result.stderr


def test_incomes_recipe_one_step_distils_exports_and_reloads(tmp_path: Path) -> None:
    """The quickstart on the tiny model: one distillation step on a pool of offline edits (finite loss, the
    weighted CE and KL parts logged), the edit evaluation table, the export and the reload check."""
    out = tmp_path / "incomes"
    args = ["--config", str(ROOT / "recipes/configs/incomes/quickstart.yaml"), "--model_name_or_path",
            "tiny-random-llama", "--num_train_edits", "8", "--num_eval_edits", "4", "--pool_sizes", "6",
            "--per_device_train_batch_size", "2", "--max_steps", "1", "--logging_steps", "1", "--save_steps", "1",
            "--eval_pool_sizes", "1", "2", "--eval_queries", "1", "--eval_max_new_tokens", "2", "--output_dir", str(out)]
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "incomes.py"), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| InComeS (trained) | 2 |" in result.stdout and "| in-context editing | 2 |" in result.stdout
    assert "reloads and generates identically" in result.stdout
    log = next(e for e in json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
               if "loss" in e)
    assert {"weighted_ce", "kl", "pool_entries"} <= set(log) and log["pool_entries"] == 6
    for name in ("compressor_config.json", "compressor.safetensors", "adapter_model.safetensors", "README.md"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize("flags, warns", [("fpu avx2 fma", True), ("fpu avx512f avx512_bf16", False),
                                          ("fpu amx_bf16 amx_tile", False)])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(tmp_path, flags, warns):
    """--bf16 on a CPU whose flags have neither avx512_bf16 nor amx_bf16 warns and names the fix; with either, or
    with bf16 off, it is silent."""
    import warnings

    from transformers import TrainingArguments

    from ctxzip.trainers.script_args import warn_if_bf16_is_emulated

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    for bf16 in (True, False):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=bf16, report_to="none")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_if_bf16_is_emulated(args, cpuinfo)
        messages = [str(w.message) for w in caught if "bfloat16" in str(w.message)]
        assert len(messages) == (1 if bf16 and warns else 0), messages
        if messages:
            assert "--bf16 false" in messages[0]
