"""The body of every memory-compressor recipe (gist, RCC, ...): train, rebuild, evaluate, export, check.

A recipe is then its parser and one call: ``train_memory_compressor(GistCompressor, gist_config, ...)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase, TrainingArguments, set_seed

from ctxzip.compressors import Compressor, CompressorConfig
from ctxzip.compressors.hub import (
    check_base_model,
    init_from_export,
    load_compressor,
    read_metadata,
    resolve_folder,
)
from ctxzip.eval.compare import compare_with_baselines, print_table

from .collator import MemoryCollator
from .export import (
    HubPush,
    check_export_reloads,
    process_local_models,
    rebuild_trained,
    save_and_push,
    train_resumable,
)
from .memory_trainer import MemoryCompressorTrainer
from .script_args import (
    CompressorModelConfig,
    CompressorScriptArguments,
    base_model_kwargs,
    base_model_name,
    build_eval_dataset,
    build_train_dataset,
    load_base_model,
    prepare_training_args,
)


@dataclass
class RecipeData:
    """What a memory-compressor recipe trains and evaluates on: the long-context tasks (``long_context_data``)
    by default; a method with its own task (InComeS: edits) brings its own."""

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    train_dataset: datasets.Dataset
    # (trained compressor, untrained one) -> the evaluation rows of the model card (printed as it likes)
    evaluate: Callable[[Compressor, Compressor], list[dict[str, Any]]] | None
    reload_context: str | list[str]  # what the export's reload check compresses (a list: InComeS's pool of edits)
    reload_prompt: str = "Summarise the text in one sentence."  # and what it then asks
    objective_weights: dict[str, float] = field(default_factory=lambda: {"sft": 1.0})
    fused_lm_loss: bool = False
    # > 0: add this times KL(full-context base || decoder) per example; the collator must make the teacher
    # (MemoryCollator(with_teacher=True))
    distillation_weight: float = 0.0


DataBuilder = Callable[[PreTrainedTokenizerBase, int], RecipeData]  # (tokenizer, seed) -> RecipeData


def train_memory_compressor(compressor_cls: type[Compressor], config: CompressorConfig,
                            script_args: Any, training_args: TrainingArguments,
                            model_args: CompressorModelConfig, data: DataBuilder | None = None,
                            ) -> list[dict[str, Any]] | None:
    """Train ``compressor_cls(config, base)`` with ``MemoryCompressorTrainer`` on ``data`` (default: the
    script's long-context tasks and objectives; auto-resuming), then on the main process: rebuild it on a plain
    base, evaluate it (by default against the untrained compressor, truncation at its ratio, the full context and
    no context on held-out rows), export it (and push when asked), and check that the export reloads and
    generates identically. ``script_args`` needs ``init_from`` and ``check_reload``. Returns the evaluation rows
    (``None`` on the other processes)."""
    if training_args.gradient_checkpointing and not compressor_cls.supports_gradient_checkpointing:
        raise ValueError(f"{compressor_cls.compressor_type} cannot train with --gradient_checkpointing (see "
                         f"{compressor_cls.__name__}'s docstring): leave it off")
    push = prepare_training_args(training_args)
    set_seed(training_args.seed)
    model, tokenizer = load_base_model(model_args)
    # the compressor reads contexts laid out as the collator lays them out (e.g. which tokens are the template's)
    compressor = compressor_cls(config, model).use_tokenizer(tokenizer)
    start_from_export(compressor, script_args.init_from)
    if not any(p.requires_grad for p in compressor.parameters()):
        raise ValueError(f"this {compressor.compressor_type} configuration has no tensor to train (e.g. SoftPromptComp "
                         "with sources: summary and weighting: none, without LoRA): use it as it is, untrained")
    builder = data or partial(long_context_data, script_args, config, compressor_cls, model_args)
    recipe_data = builder(tokenizer, training_args.seed)
    trainer = MemoryCompressorTrainer(
        model=compressor, args=training_args, processing_class=tokenizer, train_dataset=recipe_data.train_dataset,
        data_collator=recipe_data.collator, objective_weights=recipe_data.objective_weights,
        fused_lm_loss=recipe_data.fused_lm_loss, distillation_weight=recipe_data.distillation_weight)
    trained = train_resumable(trainer)  # every process: a collective under ZeRO-3
    if not trainer.is_world_process_zero():
        return None
    # Only this process goes on: its models are plain, whole copies (no ZeRO-3 partitioning, and generation
    # does not wait for the other processes, which transformers' generate would under ZeRO-3).
    with process_local_models():
        return _evaluate_and_export(compressor_cls, config, script_args, training_args, model_args, trained,
                                    tokenizer, push, recipe_data)


STARTING_LABEL = "before training (init_from)"  # the table's row of the --init_from export this run started from


def long_context_data(script_args: CompressorScriptArguments, config: CompressorConfig,
                      compressor_cls: type[Compressor], model_args: CompressorModelConfig,
                      tokenizer: PreTrainedTokenizerBase, seed: int) -> RecipeData:
    """The synthetic long-context tasks: training rows of ``train_tasks``, and an evaluation on held-out rows of
    ``eval_task`` beside the untrained compressor, truncation, the full context and no context. With
    ``distillation_weight > 0`` the collator also makes the full-context teacher of every row."""
    # at least one held-out row: the reload check compresses its context
    eval_rows = build_eval_dataset(dataclasses.replace(script_args, num_eval_samples=max(
        1, script_args.num_eval_samples)), tokenizer, seed)

    def evaluate(final: Compressor, untrained: Compressor) -> list[dict[str, Any]]:
        others = compared_exports(script_args.eval_compare_with, final, tokenizer, model_args.dtype)
        # with --init_from, the compressor before this run's training is that export, not an untrained one
        before = STARTING_LABEL if script_args.init_from else "untrained"
        summaries = compare_with_baselines(final, tokenizer, eval_rows, script_args.eval_scoring,
                                           untrained=untrained, baselines=script_args.eval_baselines, others=others,
                                           untrained_label=before)
        print_table(summaries, f"held-out {script_args.eval_task} ({script_args.eval_scoring} scoring)")
        return [s.as_row() for s in summaries]

    distillation = script_args.distillation_weight  # the teacher's batches only when they are used
    collator = MemoryCollator(tokenizer, config.max_context_tokens, script_args.max_target_tokens,
                              with_queries=compressor_cls.uses_query, with_teacher=distillation > 0)
    return RecipeData(collator=collator, train_dataset=build_train_dataset(script_args, tokenizer, seed),
                      evaluate=evaluate if script_args.num_eval_samples > 0 else None,
                      reload_context=eval_rows[0]["context"], objective_weights=script_args.objective_weights,
                      fused_lm_loss=script_args.fused_lm_loss, distillation_weight=distillation)


def compared_exports(names: list[str], final: Compressor, tokenizer: PreTrainedTokenizerBase,
                     dtype: str | None) -> dict[str, Compressor]:
    """The exported compressors ``names`` (``eval_compare_with``: folders, Hub ids, shipped short names), each on its
    own recorded base model, where ``final`` is, by their table label. Each must be for ``final``'s base model and
    ``tokenizer``: the held-out rows are tokenized once, by ``tokenizer``, for every compressor of the table."""
    from ctxzip.eval.runner import label_for

    folders = {label_for(name): resolve_folder(name) for name in names}  # resolved (downloaded) once
    for folder in folders.values():
        check_base_model(read_metadata(folder), final.base_lm, tokenizer)
    return {label: load_compressor(folder, dtype=dtype or "float32")[0].to(final.device)
            for label, folder in folders.items()}


def start_from_export(compressor: Compressor, init_from: str | None) -> None:
    """Load ``init_from``'s tensors into ``compressor`` (``--init_from``) and say which kept their initialisation."""
    if init_from:
        fresh = init_from_export(compressor, init_from)
        print(f"started from {init_from}; initialised here: {', '.join(fresh) or 'none'}")


def _evaluate_and_export(compressor_cls: type[Compressor], config: CompressorConfig, script_args: Any,
                         training_args: TrainingArguments, model_args: CompressorModelConfig, trained: dict[str, Any],
                         tokenizer: Any, push: HubPush | None, recipe_data: RecipeData) -> list[dict[str, Any]]:
    plain = base_model_kwargs(model_args, quantized=False)
    final = rebuild_trained(compressor_cls, config, base_model_name(model_args), trained, **plain)
    rows: list[dict[str, Any]] = []
    if recipe_data.evaluate is not None:
        final.to(training_args.device)  # evaluate where training ran (the GPU when there is one)
        untrained = compressor_cls(config, load_base_model(model_args, quantized=False)[0]).use_tokenizer(tokenizer)
        start_from_export(untrained, script_args.init_from)  # the compressor as this run's training found it
        untrained.to(training_args.device)
        rows = recipe_data.evaluate(final, untrained)
    folder = save_and_push(final.cpu(), tokenizer, training_args.output_dir, rows or None, push)
    if script_args.check_reload:
        check_export_reloads(final, tokenizer, folder, recipe_data.reload_context, plain["dtype"],
                             prompt=recipe_data.reload_prompt)
    return rows
