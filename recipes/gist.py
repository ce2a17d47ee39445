"""Train a gist compressor (Mu et al. 2023 / 500xCompressor-style KV memory).

    accelerate launch recipes/gist.py --config recipes/configs/gist/quickstart.yaml
    accelerate launch --config_file accelerate_configs/zero2.yaml --num_processes 2 recipes/gist.py \\
        --config recipes/configs/gist/quickstart.yaml --max_steps 4

Any YAML field can be overridden on the command line (``--tokens_per_gist 8``). The run resumes
from the last complete checkpoint in ``output_dir`` (or from ``--resume_from_checkpoint PATH``;
``--resume_from_checkpoint false`` starts afresh); the exported compressor (config, gist
weights, PEFT adapter, model card with the evaluation table) is written to ``output_dir``.
``--help`` explains every field.

The base model is a ``trl.ModelConfig`` (``model_name_or_path``, ``dtype``, ``model_revision``,
``attn_implementation``, ``load_in_4bit`` / ``load_in_8bit`` for training; the exported compressor is
rebuilt and evaluated on the unquantized base). The LoRA adapter is ``GistConfig``'s (``lora_r``,
``lora_alpha``, ``lora_dropout``, ``lora_target_modules``, ``lora_in_decoder``: what the artifact
records); ModelConfig's PEFT fields (``use_peft``, ...) are not arguments of this recipe, and naming one
is an error.
"""

from __future__ import annotations

from transformers import TrainingArguments, set_seed
from trl import TrlParser

from compressors import GistCompressor, GistConfig
from eval.compare import compare_with_baselines, print_table
from trainers import MemoryCollator, MemoryCompressorTrainer
from trainers.export import process_local_models, rebuild_trained, save_and_push, train_resumable
from trainers.script_args import (
    CompressorModelConfig,
    CompressorScriptArguments,
    base_model_kwargs,
    base_model_name,
    build_eval_dataset,
    build_train_dataset,
    load_base_model,
    prepare_training_args,
)


def make_parser() -> TrlParser:
    return TrlParser((CompressorScriptArguments, GistConfig, TrainingArguments, CompressorModelConfig))


def main(script_args: CompressorScriptArguments, gist_config: GistConfig, training_args: TrainingArguments,
         model_args: CompressorModelConfig) -> list | None:
    push = prepare_training_args(training_args)
    set_seed(training_args.seed)
    model, tokenizer = load_base_model(model_args)
    trainer = MemoryCompressorTrainer(
        model=GistCompressor(gist_config, model), args=training_args, processing_class=tokenizer,
        train_dataset=build_train_dataset(script_args, tokenizer, training_args.seed),
        data_collator=MemoryCollator(tokenizer, gist_config.max_context_tokens, script_args.max_target_tokens),
        objective_weights=script_args.objective_weights, fused_lm_loss=script_args.fused_lm_loss)
    trained = train_resumable(trainer)  # every process: a collective under ZeRO-3
    if not trainer.is_world_process_zero():
        return None
    final = rebuild_trained(GistCompressor, gist_config, base_model_name(model_args), trained,
                            **base_model_kwargs(model_args, quantized=False))
    rows = []
    if script_args.num_eval_samples > 0:
        final.to(training_args.device)  # evaluate where training ran (the GPU when there is one)
        with process_local_models():  # only this process loads it: no ZeRO-3 partitioning
            untrained = GistCompressor(gist_config, load_base_model(model_args, quantized=False)[0])
        untrained.to(training_args.device)
        summaries = compare_with_baselines(
            final, tokenizer, build_eval_dataset(script_args, tokenizer, training_args.seed),
            script_args.eval_scoring, untrained=untrained, baselines=script_args.eval_baselines)
        print_table(summaries, f"held-out {script_args.eval_task} ({script_args.eval_scoring} scoring)")
        rows = [s.as_row() for s in summaries]
    save_and_push(final.cpu(), tokenizer, training_args.output_dir, rows or None, push, training_args.hub_model_id)
    return rows


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
