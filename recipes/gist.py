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

from transformers import TrainingArguments
from trl import TrlParser

from ctxzip.compressors import GistCompressor, GistConfig
from ctxzip.trainers.distributed import process_group_closed
from ctxzip.trainers.memory_recipe import train_memory_compressor
from ctxzip.trainers.script_args import CompressorModelConfig, CompressorScriptArguments


def make_parser() -> TrlParser:
    return TrlParser((CompressorScriptArguments, GistConfig, TrainingArguments, CompressorModelConfig))


def main(script_args: CompressorScriptArguments, gist_config: GistConfig, training_args: TrainingArguments,
         model_args: CompressorModelConfig) -> list | None:
    return train_memory_compressor(GistCompressor, gist_config, script_args, training_args, model_args)


if __name__ == "__main__":
    with process_group_closed():
        main(*make_parser().parse_args_and_config())
