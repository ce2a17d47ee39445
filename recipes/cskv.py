"""Train a CSKV compressor: low-rank K/V factors by layer-wise reconstruction (arXiv 2409.10593).

    accelerate launch recipes/cskv.py --config recipes/configs/cskv/quickstart.yaml
    DS_ACCELERATOR=cpu accelerate launch --config_file accelerate_configs/zero2.yaml --num_processes 2 \\
        recipes/cskv.py --config recipes/configs/cskv/quickstart.yaml --max_steps 4

Steps: load the base model; factor every ``k_proj`` / ``v_proj`` (SVD, or ASVD calibrated on
``calibration_samples`` training texts); train the factors to reconstruct the base model's keys
and values layer by layer (the base stays frozen); evaluate held-out perplexity of a continuation
read from the compressed cache against the full cache (and the untrained factors); export (config,
factor weights, model card) to ``output_dir``, check that the export reloads and generates
identically, and optionally push. Any YAML field can be overridden on the command line; the run
resumes from the last complete checkpoint in ``output_dir`` (or ``--resume_from_checkpoint PATH``;
``false`` starts afresh); ``--help`` explains every field.

The base model is a ``trl.ModelConfig`` (``model_name_or_path``, ``dtype``, ``model_revision``,
``attn_implementation``). CSKV factors the base's own K/V projections, so ``load_in_4bit`` /
``load_in_8bit`` are an error here, and so are ModelConfig's PEFT fields (CSKV trains no LoRA).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainingArguments, set_seed
from trl import TrlParser

from ctxzip.compressors import Compressor
from ctxzip.compressors.baselines import FullContext, FullContextConfig
from ctxzip.compressors.cskv import CSKVCompressor, CSKVConfig
from ctxzip.compressors.cskv.evaluation import evaluate_perplexity, print_results
from ctxzip.compressors.cskv.script_args import CSKVScriptArguments
from ctxzip.compressors.cskv.trainer import (
    CSKVTrainer,
    TokenChunkCollator,
    build_text_dataset,
    calibration_batches,
)
from ctxzip.compressors.hub import load_exact
from ctxzip.data import build_task
from ctxzip.trainers.distributed import process_group_closed
from ctxzip.trainers.export import (
    check_export_reloads,
    process_local_models,
    rebuild_trained,
    save_and_push,
    train_resumable,
)
from ctxzip.trainers.script_args import (
    CompressorModelConfig,
    base_model_kwargs,
    base_model_name,
    check_model_args,
    load_base_model,
    prepare_training_args,
)


def make_parser() -> TrlParser:
    return TrlParser((CSKVScriptArguments, CSKVConfig, TrainingArguments, CompressorModelConfig))


def main(script_args: CSKVScriptArguments, cskv_config: CSKVConfig, training_args: TrainingArguments,
         model_args: CompressorModelConfig) -> list[dict[str, Any]] | None:
    check_model_args(model_args, quantization=False, what="the CSKV recipe")
    push = prepare_training_args(training_args)
    set_seed(training_args.seed)
    base_name, plain = base_model_name(model_args), base_model_kwargs(model_args, quantized=False)
    model, tokenizer = load_base_model(model_args, quantized=False)
    compressor = CSKVCompressor(cskv_config, model)
    collator = TokenChunkCollator(tokenizer, script_args.train_tokens)
    train = build_text_dataset(tokenizer, script_args.train_samples, script_args.train_tokens,
                               training_args.seed, "train", script_args.data_source)
    if cskv_config.init == "asvd" or cskv_config.post_rope:
        calibration = train.select(range(min(len(train), script_args.calibration_samples)))
        # Before DeepSpeed wraps the model; under ZeRO-3 every process gathers the base model's shards for the
        # calibration passes (the same batches on every process: the same factors everywhere).
        tokens = compressor.calibrate(calibration_batches(calibration, collator))
        print(f"calibrated ({cskv_config.init} init, {cskv_config.key_space} keys) on {tokens} tokens")
    initial = {k: v.detach().clone() for k, v in compressor.own_state_dict().items()}
    trainable = {n for n, p in compressor.named_parameters() if p.requires_grad}
    frozen = {k: v for k, v in initial.items() if k not in trainable}  # post-RoPE key factors: calibrated only
    if script_args.skip_training:
        trained = {k: v for k, v in compressor.state_dict().items() if not k.startswith("model.")}
        is_main = training_args.process_index == 0
    else:
        trainer = CSKVTrainer(model=compressor, args=training_args, processing_class=tokenizer,
                              train_dataset=train, data_collator=collator)
        trained = train_resumable(trainer)  # every process: a collective under ZeRO-3
        is_main = trainer.is_world_process_zero()
    if not is_main:
        return None
    final = rebuild_trained(CSKVCompressor, cskv_config, base_name, trained, frozen=frozen, **plain)
    results: list[dict[str, Any]] = []
    if script_args.num_eval_samples > 0:
        rows = build_task("continuation", tokenizer, num_samples=script_args.num_eval_samples,
                          context_tokens=script_args.eval_context_tokens, seed=training_args.seed + 1,
                          split="test", source=script_args.data_source,
                          answer_tokens=script_args.eval_answer_tokens)
        named: list[tuple[str, Compressor]] = [("trained" if not script_args.skip_training else cskv_config.init,
                                                final)]
        if script_args.eval_baselines:
            if not script_args.skip_training:
                with process_local_models():  # only this process loads it: no ZeRO-3 partitioning
                    base = load_base_model(model_args, quantized=False)[0]
                untrained = CSKVCompressor(cskv_config, base)
                load_exact(untrained, initial, untrained.own_state_dict(), "the initial factors")
                named.append((f"{cskv_config.init} init (untrained)", untrained))
            named.append(("full_cache", FullContext(FullContextConfig(), final.base_lm)))
        results = evaluate_perplexity(named, tokenizer, rows)
        print_results(results, f"held-out continuation perplexity ({len(rows)} x {script_args.eval_context_tokens}"
                               f"-token contexts, {script_args.eval_answer_tokens}-token continuations)")
    folder = save_and_push(final, tokenizer, training_args.output_dir, results or None, push)
    if script_args.check_reload:
        context = build_task("continuation", tokenizer, num_samples=1, context_tokens=min(
            256, script_args.eval_context_tokens), seed=training_args.seed + 2, split="test",
            source=script_args.data_source)[0]["context"]
        check_export_reloads(final, tokenizer, folder, context, plain["dtype"])
    return results


if __name__ == "__main__":
    with process_group_closed():
        main(*make_parser().parse_args_and_config())
