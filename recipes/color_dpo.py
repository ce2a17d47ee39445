"""Train a CoLoR passage compressor: preference optimization with a length penalty (arXiv 2412.18232).

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/color_dpo.py   # CPU, the defaults
    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/color_dpo.py \\
        --config recipes/configs/color_dpo/gpu.yaml                        # real scale
    accelerate launch recipes/color_dpo.py --config ... --push_to_hub --hub_model_id user/color-smollm2

Pipeline (each data stage cached under ``<output_dir>/color_data`` and resumable): corpus and
queries -> candidate compressions (the untrained policy under several variants, random sentence extracts) -> labels
(a reader retrieves each query from the corpus compressed by one variant) -> preference pairs ->
``ColorDPOTrainer`` (length-penalised ORPO by default, or DPO; LoRA, optional 4-bit base) ->
recall@1 (Wilson 95% interval) and compression ratio on held-out queries before and after training, next to
the uncompressed corpus and training-free extracts at the trained policy's length -> the exported compressor (adapter, config, model card with that table).
Training resumes from the last complete checkpoint in ``output_dir`` (or ``--resume_from_checkpoint
PATH``; ``false`` starts afresh). Any field can be set in the YAML or on the command line
(``--num_train_passages 64``); ``--help`` explains each.

The base model is a ``trl.ModelConfig`` (``model_name_or_path``, ``dtype``, ``load_in_4bit`` /
``load_in_8bit``: the writer, the lm reader and the trained policy load it so; the exported compressor is
rebuilt on the unquantized base). The LoRA adapter is ``ColorConfig``'s (``lora_r``, ``lora_alpha``,
``lora_dropout``, ``lora_target_modules``: what the artifact records); ModelConfig's PEFT fields
(``use_peft``, ...) are not arguments of this recipe, and naming one is an error.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import set_seed
from trl import TrlParser

from ctxzip.compressors.color import ColorCompressor, ColorConfig
from ctxzip.compressors.color.evaluation import (
    ReaderPool,
    compress_corpus,
    evaluate_compressions,
    extractive_baselines,
    fact_sentence_compressions,
    report,
)
from ctxzip.compressors.color.pipeline import Writer, local_base_loader, prepare_data
from ctxzip.compressors.color.script_args import ColorScriptArguments
from ctxzip.compressors.color.trainer import ColorDPOConfig, ColorDPOTrainer
from ctxzip.compressors.models import config_for, load_tokenizer
from ctxzip.trainers.distributed import process_group_closed, refuse_fsdp
from ctxzip.trainers.export import rebuild_trained, save_and_push, train_resumable
from ctxzip.trainers.script_args import (
    CompressorModelConfig,
    base_model_kwargs,
    base_model_name,
    export_push,
    load_base_model,
)


def make_parser() -> TrlParser:
    return TrlParser((ColorScriptArguments, ColorConfig, ColorDPOConfig, CompressorModelConfig))


def main(script_args: ColorScriptArguments, color_config: ColorConfig, training_args: ColorDPOConfig,
         model_args: CompressorModelConfig) -> list[dict[str, Any]] | None:
    start = time.perf_counter()
    refuse_fsdp(training_args)
    push = export_push(training_args)  # checks the hub_* fields; the recipe pushes the artifact, not checkpoints
    set_seed(training_args.seed)
    base = base_model_name(model_args)
    base_model_kwargs(model_args)  # refuses ModelConfig's PEFT fields before any stage runs
    cache = Path(script_args.cache_dir or Path(training_args.output_dir) / "color_data")
    tokenizer = load_tokenizer(base)
    max_positions = getattr(config_for(base), "max_position_embeddings", None)
    writer = Writer(model_args, color_config, tokenizer, training_args.seed)
    readers = ReaderPool(tokenizer, local_base_loader(model_args))
    data = prepare_data(script_args, color_config, writer, readers, tokenizer, training_args, cache, max_positions)
    writer.release()

    model, _ = load_base_model(model_args)
    trainer = ColorDPOTrainer(model=model, args=training_args, train_dataset=data.pairs, processing_class=tokenizer,
                              peft_config=color_config.lora_config(model=model), length_probe=data.probe)
    trained = train_resumable(trainer)  # every process: a collective under ZeRO-3
    if not trainer.is_world_process_zero():
        return None
    final = rebuild_trained(ColorCompressor, color_config, base, {f"model.{k}": v for k, v in trained.items()},
                            **base_model_kwargs(model_args, quantized=False))
    final.use_tokenizer(tokenizer)

    rows: list[dict[str, Any]] = []
    if data.held.passages and script_args.eval_readers:
        compressed = {"untrained": data.untrained, "trained": compress_corpus(final, data.held, tokenizer)}
        compressed |= extractive_baselines(data.held, tokenizer, readers, script_args.extractive_baselines,
                                           like=compressed["trained"])
        compressed |= fact_sentence_compressions(data.held, tokenizer)  # the ceiling of any extract
        results = evaluate_compressions(data.held, tokenizer, readers, script_args.eval_readers, compressed)
        rows = report(results, data.held, tokenizer, compressed, training_args.output_dir)
    save_and_push(final, tokenizer, training_args.output_dir, rows or None, push)
    print(f"saved the CoLoR compressor to {training_args.output_dir} ({(time.perf_counter() - start) / 60:.1f} min "
          "in all)")
    return rows


if __name__ == "__main__":
    with process_group_closed():
        main(*make_parser().parse_args_and_config())
