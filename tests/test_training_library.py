"""Library pieces every recipe trains through: the finite-loss guard, exact state loading, resume
resolution, process-local model loads and the ordered data barrier (single process; the multi-process
behaviour is tests/test_distributed.py's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctxzip.compressors import GistCompressor, GistConfig
from ctxzip.compressors.hub import StateMismatchError, load_exact

pytestmark = pytest.mark.usefixtures("one_thread")


# ----- exact state loading ------------------------------------------------------------------
def gist(tiny) -> GistCompressor:
    return GistCompressor(GistConfig(segment_length=8, tokens_per_gist=4, lora_r=2), tiny()[0])


def trainable(compressor: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() + 1 for n, p in compressor.named_parameters() if p.requires_grad}


def test_load_exact_loads_every_expected_tensor(tiny) -> None:
    compressor = gist(tiny)
    tensors = trainable(compressor)
    load_exact(compressor, tensors, tensors, "test")
    for name, param in compressor.named_parameters():
        if name in tensors:
            assert torch.equal(param, tensors[name])


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_load_exact_names_missing_unexpected_and_misshapen_keys(tiny, change: str) -> None:
    compressor = gist(tiny)
    expected = trainable(compressor)
    tensors = dict(expected)
    if change == "missing":
        del tensors["gist_embeddings.weight"]
    elif change == "unexpected":
        tensors["gist_embedings.weight"] = tensors["gist_embeddings.weight"]  # a misspelled key
    else:
        tensors["gist_embeddings.weight"] = torch.zeros(3, 3)
    before = compressor.gist_embeddings.weight.detach().clone()
    with pytest.raises(StateMismatchError, match=r"gist_embedd?ings\.weight") as raised:
        load_exact(compressor, tensors, expected, "the checkpoint")
    assert "the checkpoint does not match the GistCompressor" in str(raised.value)
    assert torch.equal(compressor.gist_embeddings.weight, before), "nothing may load when the keys differ"


def test_rebuild_trained_refuses_a_state_with_an_extra_tensor(tiny, monkeypatch) -> None:
    import ctxzip.trainers.export as export

    monkeypatch.setattr(export, "load_base", lambda name, dtype="float32": tiny())
    config = GistConfig(segment_length=8, tokens_per_gist=4, lora_r=2)
    trained = trainable(GistCompressor(config, tiny()[0]))
    rebuilt = export.rebuild_trained(GistCompressor, config, "tiny", trained)
    assert torch.equal(rebuilt.gist_embeddings.weight, trained["gist_embeddings.weight"])
    trained["model.base_model.model.lm_head.weight"] = torch.zeros(1)
    with pytest.raises(StateMismatchError, match="unexpected .*lm_head"):
        export.rebuild_trained(GistCompressor, config, "tiny", trained)


def test_a_saved_compressor_with_an_extra_tensor_is_refused(tiny, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from ctxzip.compressors import load_compressor, save_compressor
    from ctxzip.compressors.hub import WEIGHTS_NAME

    model, tokenizer = tiny()
    folder = save_compressor(GistCompressor(GistConfig(segment_length=8, tokens_per_gist=4, lora_r=0), model),
                             tmp_path / "artifact", tokenizer)
    weights = load_file(str(folder / WEIGHTS_NAME))
    save_file({**weights, "extra.weight": torch.zeros(2)}, str(folder / WEIGHTS_NAME))
    with pytest.raises(StateMismatchError, match=r"unexpected \['extra.weight'\]"):
        load_compressor(folder, model=tiny()[0], tokenizer=tokenizer)


# ----- the finite-loss guard ----------------------------------------------------------------
def memory_trainer(tiny, tmp_path: Path, **overrides):
    import datasets
    from transformers import TrainingArguments

    from ctxzip.trainers import MemoryCollator, MemoryCompressorTrainer

    model, tokenizer = tiny()
    compressor = GistCompressor(GistConfig(segment_length=16, tokens_per_gist=4, lora_r=2), model)
    rows = [{"context": f"The pass key is {n}{n}{n}. Filler text follows here.", "question": "What is the pass key?",
             "answer": f"{n}{n}{n}", "objective": "sft"} for n in range(4)]
    settings = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                    save_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
                    label_names=["labels"], learning_rate=1e-3)
    settings.update(overrides)
    return MemoryCompressorTrainer(model=compressor, args=TrainingArguments(**settings), processing_class=tokenizer,
                                   train_dataset=datasets.Dataset.from_list(rows),
                                   data_collator=MemoryCollator(tokenizer, 64, 64))


def test_a_nan_loss_stops_the_run_before_its_checkpoint(tiny, tmp_path: Path) -> None:
    from ctxzip.trainers.guards import NonFiniteLossError

    trainer = memory_trainer(tiny, tmp_path)
    with torch.no_grad():  # what ZeRO-3 did to the gist table (an empty shard's mean is NaN)
        trainer.model.gist_embeddings.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="not finite .* at step 1"):
        trainer.train()
    assert not (tmp_path / "checkpoint-1").exists()


def test_every_recipe_trainer_has_the_guard() -> None:
    from ctxzip.compressors.color.trainer import ColorDPOTrainer
    from ctxzip.compressors.cskv.trainer import CSKVTrainer
    from ctxzip.trainers.guards import FiniteLossMixin
    from ctxzip.trainers.memory_trainer import MemoryCompressorTrainer

    for cls in (MemoryCompressorTrainer, CSKVTrainer, ColorDPOTrainer):
        assert issubclass(cls, FiniteLossMixin), cls.__name__


def test_a_finite_run_trains_checkpoints_and_resumes_its_tensors(tiny, tmp_path: Path) -> None:
    trainer = memory_trainer(tiny, tmp_path)
    trainer.train()
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-2" / "trainable.safetensors"))
    assert set(saved) == names  # only what trains: no frozen base tensor in a checkpoint
    final = trainer.trained_state_dict()
    resumed = memory_trainer(tiny, tmp_path)
    resumed.load_trained_checkpoint(tmp_path / "checkpoint-2")
    for name, param in resumed.model.named_parameters():
        if name in names:
            assert torch.equal(param, final[name]), name
    save_file_with_typo(tmp_path / "checkpoint-2" / "trainable.safetensors", saved)
    with pytest.raises(StateMismatchError, match="gist_embedingss"):
        resumed.load_trained_checkpoint(tmp_path / "checkpoint-2")


def save_file_with_typo(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = dict(tensors)
    tensors["gist_embedingss.weight"] = tensors.pop("gist_embeddings.weight")
    save_file(tensors, str(path))


def test_gradient_accumulation_logs_the_mean_loss_not_the_sum(tiny, tmp_path: Path) -> None:
    """Two micro-batches of one row log what one batch of both rows logs (the per-row mean)."""
    whole = memory_trainer(tiny, tmp_path / "a", max_steps=1, save_strategy="no")
    whole.train()
    split = memory_trainer(tiny, tmp_path / "b", max_steps=1, save_strategy="no", per_device_train_batch_size=1,
                           gradient_accumulation_steps=2)
    split.train()
    assert split.state.log_history[0]["loss"] == pytest.approx(whole.state.log_history[0]["loss"], abs=2e-3)


# ----- resume -------------------------------------------------------------------------------
def checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_resume_from_checkpoint_values(tmp_path: Path) -> None:
    from ctxzip.trainers.export import resolve_resume

    assert resolve_resume(tmp_path, None) is None and resolve_resume(tmp_path / "absent", None) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(tmp_path, "true")
    second, _ = checkpoint(tmp_path, 2), checkpoint(tmp_path, 10, complete=False)  # a kill mid-save
    assert resolve_resume(tmp_path, None) == str(second)  # the default: auto-resume
    assert resolve_resume(tmp_path, True) == resolve_resume(tmp_path, "true") == str(second)
    assert resolve_resume(tmp_path, "false") is None and resolve_resume(tmp_path, False) is None
    other = checkpoint(tmp_path / "elsewhere", 7)
    assert resolve_resume(tmp_path, str(other)) == str(other)
    assert resolve_resume(tmp_path, "checkpoint-2") == str(second)  # a folder name inside output_dir
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-10"))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"))


# ----- DeepSpeed state and data barrier -------------------------------------------------------
def test_process_local_models_restore_the_same_zero3_config() -> None:
    from transformers.integrations import deepspeed as hf_deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from ctxzip.trainers.export import process_local_models

    settings = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    config = HfDeepSpeedConfig(settings)
    try:
        with process_local_models():
            assert not hf_deepspeed.is_deepspeed_zero3_enabled() and hf_deepspeed.deepspeed_config() is None
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        assert hf_deepspeed.deepspeed_config()["zero_optimization"] == settings["zero_optimization"]
        with process_local_models():  # outside DeepSpeed it changes nothing
            pass
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
    with process_local_models():
        assert hf_deepspeed.deepspeed_config() is None
    assert hf_deepspeed.deepspeed_config() is None
    del config


def test_main_process_first_runs_the_block_in_a_single_process(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    from ctxzip.trainers.distributed import main_process_first

    ran = []
    with main_process_first(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])):
        ran.append(True)
    assert ran == [True]


def test_instruction_reconstruction_compresses_the_question_and_the_reply_repeats_it(tiny) -> None:
    """The memory holds context + question; the decoder is asked to repeat the question, then answers it: labels
    on that whole reply. A reconstruction row's cue ends the prompt (labels on the rest of the span only)."""
    from ctxzip.compressors.conversation import SEPARATOR
    from ctxzip.trainers import MemoryCollator
    from ctxzip.trainers.objectives import INSTRUCTION_RECONSTRUCTION_PROMPT, build_target, memory_context

    _, tokenizer = tiny()
    collator = MemoryCollator(tokenizer, max_context_tokens=512, max_target_tokens=128)
    row = {"task": "instruction_reconstruction", "context": "The pass key is 123.", "question": "What is the key?",
           "answer": "123", "answer_prefix": "The pass key is"}
    assert memory_context(row) == "The pass key is 123." + SEPARATOR + "What is the key?"
    batch = collator([row])
    layout = collator.layout
    assert batch["context_ids"][0].tolist() == layout.context_ids(memory_context(row))
    target = build_target(layout, row, 128)
    prompt = layout.prompt_ids(INSTRUCTION_RECONSTRUCTION_PROMPT)
    reply = [t for t in target.labels if t != -100]
    assert target.input_ids[:len(prompt)] == prompt and target.prompt_length == len(prompt)
    assert tokenizer.decode(reply, skip_special_tokens=True) == "What is the key?\nThe pass key is 123"
    copy = {"task": "reconstruction", "context": "one two three four five six", "question": "Repeat the text.",
            "answer": " four five six", "answer_prefix": "one two three"}
    target = build_target(layout, copy, 128)
    assert target.input_ids[:target.prompt_length] == layout.prompt_ids("Repeat the text.", "one two three")
    assert tokenizer.decode([t for t in target.labels if t != -100], skip_special_tokens=True) == " four five six"


def test_recipe_arguments_set_the_span_and_continuation_lengths(tiny) -> None:
    from ctxzip.trainers.script_args import CompressorScriptArguments, build_eval_dataset, build_train_dataset

    _, tokenizer = tiny()
    args = CompressorScriptArguments(train_tasks=["reconstruction", "continuation"], train_samples_per_task=2,
                                     context_tokens=96, reconstruction_span_tokens=40, continuation_tokens=12,
                                     eval_task="continuation", num_eval_samples=1)
    rows = build_train_dataset(args, tokenizer, seed=0)
    meta = {row["task"]: json.loads(row["metadata"]) for row in rows}
    assert meta["reconstruction"]["span_tokens"] == 40 and meta["continuation"]["answer_tokens"] == 12
    assert json.loads(build_eval_dataset(args, tokenizer, seed=0)[0]["metadata"])["answer_tokens"] == 12


# ----- the push of the export (TrainingArguments' hub_* fields) ----------------------------------
def hub_args(tmp_path: Path, **hub):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "gist-run"), use_cpu=True, report_to=[], **hub)


def test_export_push_honours_the_hub_fields_and_turns_off_trainers_push(tmp_path: Path) -> None:
    from ctxzip.trainers.export import HubPush
    from ctxzip.trainers.script_args import export_push

    args = hub_args(tmp_path)
    assert export_push(args) is None and args.push_to_hub is False
    args = hub_args(tmp_path, push_to_hub=True, hub_model_id="test-user/gist", hub_private_repo=True,
                    hub_token="hf_secret", hub_revision="dev", hub_always_push=True)
    push = export_push(args)
    assert push == HubPush(repo_id="test-user/gist", private=True, token="hf_secret", revision="dev")
    assert args.push_to_hub is False  # Trainer never pushes: the recipe pushes the export once
    assert "hf_secret" not in repr(push)
    for strategy in ("every_save", "end"):  # both: the one push at the end
        assert export_push(hub_args(tmp_path, push_to_hub=True, hub_strategy=strategy)).repo_id == "gist-run"


@pytest.mark.parametrize(("hub", "message"), [
    ({"hub_strategy": "checkpoint"}, "--hub_strategy checkpoint is not supported"),
    ({"hub_strategy": "all_checkpoints"}, "--hub_strategy all_checkpoints is not supported"),
    ({"hub_revision": "0123456789abcdef0123456789abcdef01234567"}, "needs a branch name"),
])
def test_export_push_refuses_what_it_cannot_honour_before_training(tiny, tmp_path: Path, monkeypatch,
                                                                   hub: dict, message: str) -> None:
    import ctxzip.trainers.memory_recipe as recipe
    from ctxzip.trainers.script_args import CompressorModelConfig, CompressorScriptArguments

    def no_training(*args, **kwargs):
        raise AssertionError("the hub arguments must be refused before the base model is loaded")

    monkeypatch.setattr(recipe, "load_base_model", no_training)
    with pytest.raises(ValueError, match=message):
        recipe.train_memory_compressor(GistCompressor, GistConfig(segment_length=16, tokens_per_gist=4),
                                       CompressorScriptArguments(), hub_args(tmp_path, push_to_hub=True, **hub),
                                       CompressorModelConfig(model_name_or_path="tiny-random-llama"))


def test_a_recipe_pushes_its_export_once_with_the_hub_fields(fake_hub, tmp_path: Path) -> None:
    """One training step with a checkpoint, then exactly one push: the artifact files only (no checkpoint, no
    log), one commit on the hub_revision branch of a private repo, with hub_token; Trainer pushes nothing."""
    from transformers import TrainingArguments

    from ctxzip.trainers.memory_recipe import train_memory_compressor
    from ctxzip.trainers.script_args import CompressorModelConfig, CompressorScriptArguments

    out = tmp_path / "run"
    args = TrainingArguments(output_dir=str(out), max_steps=1, save_steps=1, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, disable_tqdm=True, push_to_hub=True,
                             hub_model_id="test-user/gist-run", hub_private_repo=True, hub_token="hf_trainer",
                             hub_revision="dev", hub_strategy="end")
    script = CompressorScriptArguments(train_samples_per_task=4, context_tokens=32, num_eval_samples=0,
                                       check_reload=False)
    train_memory_compressor(GistCompressor, GistConfig(segment_length=16, tokens_per_gist=4, lora_r=2), script,
                            args, CompressorModelConfig(model_name_or_path="tiny-random-llama"))
    assert (out / "checkpoint-1").is_dir()
    repo_id = "test-user/gist-run"
    assert fake_hub.called("HfApi") == [{"endpoint": None, "token": "hf_trainer"}]
    assert [c["private"] for c in fake_hub.called("create_repo")] == [True]
    assert [(c["repo_id"], c["branch"]) for c in fake_hub.called("create_branch")] == [(repo_id, "dev")]
    [upload] = fake_hub.called("upload_folder")
    assert upload["revision"] == "dev" and upload["commit_message"].startswith("End of training")
    pushed = fake_hub.files(repo_id, "dev")
    assert set(pushed) == {"compressor_config.json", "compressor.safetensors", "adapter_config.json",
                           "adapter_model.safetensors", "README.md"}
    assert all(pushed[name] == (out / name).read_bytes() for name in pushed)
    assert fake_hub.files(repo_id, "main") == {}  # main keeps the repo's first, empty commit


def test_fsdp_is_refused_before_anything_loads(tiny, tmp_path: Path, monkeypatch) -> None:
    """``--fsdp`` or an accelerate FSDP config: a clear error naming the DeepSpeed configs, before the base loads."""
    from types import SimpleNamespace

    import ctxzip.trainers.memory_recipe as recipe
    from ctxzip.compressors.errors import CtxzipError
    from ctxzip.trainers.distributed import refuse_fsdp
    from ctxzip.trainers.script_args import CompressorModelConfig, CompressorScriptArguments

    with pytest.raises(CtxzipError, match="--fsdp full_shard.*zero2.yaml"):
        refuse_fsdp(SimpleNamespace(fsdp=["full_shard"]))
    monkeypatch.setattr(recipe, "load_base_model", lambda *a, **k: pytest.fail("the base model was loaded"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(CtxzipError, match="an accelerate FSDP config"):
        recipe.train_memory_compressor(GistCompressor, GistConfig(segment_length=16, tokens_per_gist=4),
                                       CompressorScriptArguments(), hub_args(tmp_path),
                                       CompressorModelConfig(model_name_or_path="tiny-random-llama"))
