"""Every recipe trains the same under DeepSpeed ZeRO-2 and ZeRO-3 (2 CPU processes) as in one process.

The base model is the tiny random Llama saved to a folder, so that the recipes load it through
``from_pretrained`` as they load real models: under a ZeRO-3 launch transformers then partitions it at
construction (``deepspeed.zero.Init``, whatever ``zero3_init_flag`` says), and a compressor that reads a
base parameter while it is built gets an empty shard (the gist recipe's gist table started as the mean
of an empty vocabulary, NaN: it logged ``loss 0``, ``grad_norm inf`` and exited 0).

One optimizer step on the same two rows everywhere: one process reads them as two micro-batches of one
row (gradient accumulation 2), two processes read one row each, so the first logged loss is the mean
of the same two per-row losses in every run. Each run must also change its trained tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ports import free_port
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
LAUNCHES = {name: ROOT / "accelerate_configs" / f"{name}.yaml" for name in ("zero2", "zero3")}
ONE_STEP = ["--max_steps", "1", "--logging_steps", "1", "--save_steps", "1", "--warmup_steps", "0", "--seed", "0",
            "--report_to", "none", "--disable_tqdm", "true"]


def run(recipe: str, args: list[str], out: Path, launch: Path | None) -> subprocess.CompletedProcess:
    """One recipe run: in this interpreter's process (``launch=None``, gradient accumulation 2) or under
    ``accelerate launch --config_file launch`` with 2 processes (one row each)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1"}  # CPU: see zero2.yaml
    script = [str(ROOT / "recipes" / f"{recipe}.py"), *args, *ONE_STEP, "--output_dir", str(out),
              "--per_device_train_batch_size", "1"]
    if launch is None:
        command = [sys.executable, *script, "--gradient_accumulation_steps", "2"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
                   "--num_processes", "2", "--main_process_port", str(free_port()), *script,
                   "--gradient_accumulation_steps", "1"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    where = launch.name if launch else "one process"
    assert result.returncode == 0, f"{recipe} ({where}) failed:\n{result.stderr[-4000:]}"
    return result


def first_log(out: Path) -> dict[str, float]:
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    return next(entry for entry in state["log_history"] if "loss" in entry)


def first_loss(out: Path) -> float:
    return first_log(out)["loss"]


def assert_lora_trained(folder: Path) -> None:
    """PEFT starts every lora_B at zero: one step must move them, and every tensor must be finite."""
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert any(bool(t.abs().sum() > 0) for k, t in adapter.items() if "lora_B" in k), "no LoRA weight trained"


def assert_own_tensors_trained(folder: Path, initial: dict[str, torch.Tensor], unreached: tuple[str, ...] = ()) -> None:
    """The compressor's own tensors (compressor.safetensors) are finite and differ from their init (but those
    ``unreached`` by any loss, which must keep it)."""
    trained = load_file(str(folder / "compressor.safetensors"))
    assert set(trained) == set(initial)
    for name, tensor in trained.items():
        assert torch.isfinite(tensor).all(), f"{name} is not finite"
        changed = not torch.equal(tensor, initial[name].to(tensor.dtype))
        assert changed != (name in unreached), f"{name} {'changed' if changed else 'did not change'}"


def check_runs(recipe: str, args: list[str], tmp_path: Path,
               extra: dict[str, list[str]] | None = None) -> dict[str, Path]:
    """The one-process run, then each DeepSpeed run; every first loss equals the one-process one.
    ``extra`` adds arguments to some runs (by name: single, zero2, zero3)."""
    extra = extra or {}
    outs = {name: tmp_path / name for name in ("single", *LAUNCHES)}
    run(recipe, [*args, *extra.get("single", [])], outs["single"], None)
    expected = first_loss(outs["single"])
    assert expected == expected and expected > 0, f"one-process first loss {expected}"  # finite, not NaN
    for launch in LAUNCHES:
        run(recipe, [*args, *extra.get(launch, [])], outs[launch], LAUNCHES[launch])
        assert first_loss(outs[launch]) == pytest.approx(expected, rel=2e-4, abs=2e-4), launch
    return outs


def initial_own_tensors(recipe: str, args: list[str], tmp_path: Path) -> dict[str, torch.Tensor]:
    """The untrained compressor's own tensors, built from the config the recipe parses from ``args``."""
    from test_recipes import load_recipe

    from ctxzip.compressors import compressor_class, load_base

    _, config, _, model_args = load_recipe(recipe).make_parser().parse_args_and_config(
        [*args, "--output_dir", str(tmp_path / "parsed")])
    cls = next(compressor_class(name) for name in ("gist", "cskv", "rcc", "lcirc", "softpromptcomp", "incomes")
               if isinstance(config, compressor_class(name).config_class))
    return cls(config, load_base(model_args.model_name_or_path)[0]).own_state_dict()


def test_gist_trains_the_same_under_zero2_and_zero3(tiny_folder: Path, tmp_path: Path) -> None:
    args = ["--config", str(ROOT / "recipes/configs/gist/quickstart.yaml"), "--model_name_or_path", str(tiny_folder),
            "--train_samples_per_task", "4", "--context_tokens", "40", "--segment_length", "32", "--lora_r", "4",
            "--num_eval_samples", "0"]
    outs = check_runs("gist", args, tmp_path)
    initial = initial_own_tensors("gist", args, tmp_path)
    for out in outs.values():
        logs = first_log(out)  # one objective: its mean over every process's rows is the loss
        assert logs["loss_sft"] == pytest.approx(logs["loss"], abs=2e-4) and logs["compression_ratio"] > 1
        assert_own_tensors_trained(out, initial)
        assert_lora_trained(out)


def test_rcc_trains_the_same_under_zero2_and_zero3(tiny_folder: Path, tmp_path: Path) -> None:
    """Both objectives of the quickstart, the decoder's adapter and the projections."""
    args = ["--config", str(ROOT / "recipes/configs/rcc/quickstart.yaml"), "--model_name_or_path", str(tiny_folder),
            "--train_samples_per_task", "2", "--context_tokens", "72", "--window", "32", "--rate", "8", "--lora_r", "4",
            "--decoder_lora_r", "4", "--num_eval_samples", "0", "--check_reload", "false"]
    outs = check_runs("rcc", args, tmp_path)
    initial = initial_own_tensors("rcc", args, tmp_path)
    for out in outs.values():
        assert first_log(out)["compression_ratio"] > 1
        # the injection after the last decoder layer: no later layer reads the placeholders' residual there
        assert_own_tensors_trained(out, initial, unreached=("layer_projections.1.weight",))
        assert_lora_trained(out / "decoder")
        # With E = I and A_i = 0 at init, no encoder state but the embeddings reaches a loss at step 1, so the
        # encoder's adapter starts training at step 2 (test_rcc's overfitting test checks that it does).
        encoder = load_file(str(out / "encoder" / "adapter_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in encoder.values())


def test_lcirc_trains_the_same_under_zero2_and_zero3(tiny_folder: Path, tmp_path: Path) -> None:
    """The frozen LM, the Perceiver, the initial latents and the gated blocks (gates opened a little: at the
    paper's zero only the gates receive a gradient at step 1), every compression step keeping its gradients."""
    args = ["--config", str(ROOT / "recipes/configs/lcirc/quickstart.yaml"), "--model_name_or_path", str(tiny_folder),
            "--train_samples_per_task", "2", "--context_tokens", "72", "--segment_length", "32", "--num_latents", "4",
            "--gate_init", "0.1", "--grad_segments", "0", "--num_eval_samples", "0", "--check_reload", "false"]
    outs = check_runs("lcirc", args, tmp_path)
    initial = initial_own_tensors("lcirc", args, tmp_path)
    for out in outs.values():
        assert first_log(out)["compression_ratio"] > 1
        assert_own_tensors_trained(out, initial)


def test_softpromptcomp_soft_vectors_train_the_same_under_zero2_and_zero3(tiny_folder: Path, tmp_path: Path) -> None:
    """The soft-prompt generator and the gates (sources: soft: the summariser generates inside compress(), which
    ZeRO-3 refuses; a summary is no trained tensor)."""
    args = ["--config", str(ROOT / "recipes/configs/softpromptcomp/quickstart.yaml"), "--model_name_or_path",
            str(tiny_folder), "--train_samples_per_task", "2", "--context_tokens", "80", "--sources", "soft",
            "--num_soft", "4", "--num_eval_samples", "0", "--check_reload", "false"]
    outs = check_runs("softpromptcomp", args, tmp_path)
    initial = initial_own_tensors("softpromptcomp", args, tmp_path)
    for out in outs.values():
        assert first_log(out)["compression_ratio"] > 1
        assert_own_tensors_trained(out, initial)


def test_incomes_upper_layers_train_the_same_under_zero2_and_zero3(tiny_folder: Path, tmp_path: Path) -> None:
    """gpu.yaml's mode: the upper layers, the gist embedding and the zero keys train beside a frozen copy of the
    base as the teacher (under ZeRO-3 loaded again, partitioned like the student); each row's pool is the same in
    every run (its draws depend on the batch's edits, not on the process)."""
    args = ["--config", str(ROOT / "recipes/configs/incomes/quickstart.yaml"), "--model_name_or_path", str(tiny_folder),
            "--num_train_edits", "4", "--pool_sizes", "3", "--eval_queries", "0", "--check_reload", "false",
            "--train_mode", "upper"]
    outs = check_runs("incomes", args, tmp_path)
    initial = initial_own_tensors("incomes", args, tmp_path)
    for out in outs.values():
        assert first_log(out)["pool_entries"] == 3
        assert_own_tensors_trained(out, initial)


def test_cskv_trains_the_same_under_zero2_and_zero3(tiny_folder: Path, tmp_path: Path) -> None:
    args = ["--config", str(ROOT / "recipes/configs/cskv/quickstart.yaml"), "--model_name_or_path", str(tiny_folder),
            "--train_samples", "4", "--train_tokens", "32", "--calibration_samples", "2", "--num_eval_samples", "0",
            "--check_reload", "false"]
    outs = check_runs("cskv", args, tmp_path)
    initial = initial_own_tensors("cskv", args, tmp_path)
    for out in outs.values():
        assert_own_tensors_trained(out, initial)


def test_color_dpo_trains_the_same_under_zero2_and_zero3(tiny_folder: Path, tmp_path: Path) -> None:
    """The ZeRO-2 run builds its data stages itself (its main process first, behind a barrier, then the
    other reads them); the ZeRO-3 run reads the one-process run's. Both give the same pairs."""
    args = ["--config", str(ROOT / "recipes/configs/color_dpo/quickstart.yaml"), "--model_name_or_path", str(tiny_folder),
            "--num_train_passages", "2", "--num_eval_passages", "1", "--passage_tokens", "32", "--corpus_size", "1",
            "--candidate_variants", "sample:1.0", "sample:1.5", "--label_reader", "lm", "--eval_readers", "lm",
            "--pairs_all_failed", "shortest_vs_longest", "--max_new_tokens", "6", "--length_probe_steps", "0"]
    shared = ["--cache_dir", str(tmp_path / "single" / "color_data")]
    outs = check_runs("color_dpo", args, tmp_path, {"zero3": shared})
    assert (outs["zero2"] / "color_data" / "pairs" / "stage.json").is_file()
    for out in outs.values():
        assert_lora_trained(out)


def test_two_machines_train_as_one(tiny_folder: Path, tmp_path: Path) -> None:
    """accelerate_configs/multi_node_zero2.yaml on two "machines" on localhost (one process each, the standard
    launcher: torchrun per machine): the first loss equals the one-process run's, and machine 0 exports."""
    args = ["--config", str(ROOT / "recipes/configs/gist/quickstart.yaml"), "--model_name_or_path", str(tiny_folder),
            "--train_samples_per_task", "4", "--context_tokens", "40", "--segment_length", "32", "--lora_r", "4",
            "--num_eval_samples", "0"]
    run("gist", args, tmp_path / "single", None)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1"}
    port = free_port()  # for the rendezvous
    outs = [tmp_path / f"machine{rank}" for rank in (0, 1)]
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "accelerate_configs" / "multi_node_zero2.yaml"), "--num_processes", "2", "--machine_rank", str(rank),
         "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(ROOT / "recipes" / "gist.py"), *args,
         *ONE_STEP, "--output_dir", str(out), "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank, out in zip((0, 1), outs)]
    logs = [machine.communicate(timeout=600)[0] for machine in machines]
    assert [m.returncode for m in machines] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert first_loss(outs[0]) == pytest.approx(first_loss(tmp_path / "single"), rel=2e-4, abs=2e-4)
    assert_lora_trained(outs[0])
