"""The shipped gist compressor's two stages, from their own configs with only sizes overridden: stage 1 pre-trains
the memory on running text, stage 2 starts from stage 1's export and fine-tunes on the retrieval mixture at a length
range, then evaluates on held-out wordings and a corpus it never read, beside another exported compressor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SIZES = ["--model_name_or_path", "tiny-random-llama", "--train_samples_per_task", "6", "--segment_length", "32",
         "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "2", "--warmup_steps", "0",
         "--max_steps", "2", "--num_eval_samples", "2"]


def run_stage(config: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "recipes" / "gist.py"), "--config", str(ROOT / "recipes/configs/gist" / config),
            *SIZES, "--output_dir", str(out), *extra]
    result = subprocess.run(args, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def logged_losses(out: Path) -> list[float]:
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_pretrain_then_mixture_from_its_export(tmp_path: Path) -> None:
    pretrain, mixture = tmp_path / "pretrain", tmp_path / "mixture"
    run_stage("pretrain.yaml", pretrain, "--context_tokens", "64", "--continuation_tokens", "8",
              "--reconstruction_span_tokens", "24")
    losses = logged_losses(pretrain)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    result = run_stage("mixture.yaml", mixture, "--init_from", str(pretrain), "--context_tokens", "64",
                       "--max_train_context_tokens", "128", "--eval_context_tokens", "96", "--continuation_tokens", "8",
                       "--eval_compare_with", str(pretrain))
    assert f"started from {pretrain}" in result.stdout
    assert all(torch.isfinite(torch.tensor(logged_losses(mixture))))
    first, second = load_file(pretrain / "compressor.safetensors"), load_file(mixture / "compressor.safetensors")
    assert first.keys() == second.keys() and any(not torch.equal(first[k], second[k]) for k in first)
    assert f"| {pretrain.name} |" in result.stdout  # the compared export, scored on the same held-out rows
    assert "| before training (init_from) |" in result.stdout and "| untrained |" not in result.stdout
    assert "best training-free (budget)" in result.stdout  # the learned-vs-training-free table


def lora_tensors(compressor) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in compressor.model.named_parameters() if "lora_" in name}


def test_init_from_an_export_starts_its_adapter_too_and_refuses_another_lora(tiny, tmp_path: Path) -> None:
    import pytest

    from ctxzip.compressors import GistCompressor, GistConfig
    from ctxzip.compressors.hub import StateMismatchError, init_from_export, save_compressor

    model, tokenizer = tiny()
    first = GistCompressor(GistConfig(tokens_per_gist=4, segment_length=32, lora_r=4), model).use_tokenizer(tokenizer)
    with torch.no_grad():
        for name, param in first.named_parameters():
            if param.requires_grad:
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    save_compressor(first, tmp_path / "stage1", tokenizer)
    second = GistCompressor(GistConfig(tokens_per_gist=4, segment_length=32, lora_r=4), tiny()[0])
    assert init_from_export(second.use_tokenizer(tokenizer), tmp_path / "stage1") == []
    assert torch.equal(second.gist_embeddings.weight, first.gist_embeddings.weight)
    ours, theirs = lora_tensors(second), lora_tensors(first)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    other_rank = GistCompressor(GistConfig(tokens_per_gist=4, segment_length=32, lora_r=8), tiny()[0])
    with pytest.raises(StateMismatchError, match="lora_r"):
        init_from_export(other_rank.use_tokenizer(tokenizer), tmp_path / "stage1")


def test_the_held_out_benchmark_script_runs(tiny, tmp_path: Path) -> None:
    """benchmarks/gist_heldout.sh, the held-out yardstick the gist page documents, with only sizes overridden (later
    flags win): the training-free bar, then a saved compressor alone and its report against the bar, on held-out
    wordings of stdlib text."""
    from ctxzip.compressors import GistCompressor, GistConfig
    from ctxzip.compressors.hub import save_compressor

    model, tokenizer = tiny()
    folder = tmp_path / "gist-tiny"
    save_compressor(GistCompressor(GistConfig(tokens_per_gist=4, segment_length=32, lora_r=0), model), folder,
                    tokenizer)
    out = tmp_path / "heldout"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HELDOUT_RESULTS": str(out)}
    sizes = ["--base-model", "tiny-random-llama", "--num-samples", "1", "--context-length", "96", "--no-progress",
             "--tasks", "retrieve_number", "multi_fact"]  # two of the three tasks: the suite's time
    window = ["--learned_config", "recent_tokens=16"]
    for target, extra in (("bar", []), (str(folder), []), (str(folder), window)):
        result = subprocess.run(["bash", str(ROOT / "benchmarks/gist_heldout.sh"), target, *sizes, *extra],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    tasks = ("retrieve_number", "multi_fact")
    bar = json.loads((out / "training_free" / "metrics.json").read_text())["results"]
    assert {(r["task"], r["method"]) for r in bar} >= {
        (task, method) for task in tasks for method in ("snapkv", "truncation", "full_context", "no_context")}
    alone = json.loads((out / "gist-tiny" / "metrics.json").read_text())["results"]
    assert {(r["task"], r["method"]) for r in alone} == {(task, "gist-tiny") for task in tasks}
    windowed = json.loads((out / "gist-tiny-recent_tokens16" / "metrics.json").read_text())["results"]
    assert {r["method"] for r in windowed} == {"gist-tiny [recent_tokens=16]"}
    assert "gist-tiny [recent_tokens=16]" in (out / "gist-tiny-recent_tokens16-vs-training-free" / "report.md").read_text()
    report = (out / "gist-tiny-vs-training-free" / "report.md").read_text()
    assert "Learned vs the best training-free method at the same bytes" in report and "gist-tiny" in report
    import yaml

    config = yaml.safe_load((out / "gist-tiny" / "config.yaml").read_text())
    assert (config["source"], config["split"], config["num_samples"]) == ("stdlib", "test", 1)


def test_a_compared_export_for_another_base_model_is_refused_before_it_loads(tiny) -> None:
    """--eval_compare_with scores every export on rows tokenized by the run's tokenizer: an export trained for
    another base (the shipped SmolLM2 compressor beside a run on the tiny model) is refused with the reason, before
    its base model is loaded."""
    import pytest

    from ctxzip.compressors import GistCompressor, GistConfig
    from ctxzip.compressors.errors import BaseModelMismatchError
    from ctxzip.trainers.memory_recipe import compared_exports

    model, tokenizer = tiny()
    final = GistCompressor(GistConfig(tokens_per_gist=4, segment_length=32, lora_r=4), model).use_tokenizer(tokenizer)
    with pytest.raises(BaseModelMismatchError, match="SmolLM2"):
        compared_exports(["ctxzip/gist-smollm2-135m"], final, tokenizer, "float32")
