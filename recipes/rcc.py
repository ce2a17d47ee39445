"""Train an RCC compressor (recurrent context compression, arXiv 2406.06110): windows of W context tokens,
every layer's state at every c-th position, injected into the decoder's residual stream at placeholders.

    accelerate launch recipes/rcc.py --config recipes/configs/rcc/quickstart.yaml
    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/rcc.py --config recipes/configs/rcc/gpu.yaml

Any YAML field can be overridden on the command line (``--rate 8``, ``--train_mode full``). The objectives
mix by weight: ``reconstruction`` (rows of the ``reconstruction`` task: copy a span of the context cued by
its first tokens), ``continuation``, ``sft`` (the question-answering tasks) and
``instruction_reconstruction`` (the question compressed with the context; the decoder regenerates it, then
answers). The run resumes from the last complete checkpoint in ``output_dir``; the exported compressor
(config, projections, the encoder's and decoder's PEFT adapters or the fully trained weights, model card
with the evaluation table) is written to ``output_dir`` and checked to reload and generate identically.
``--help`` explains every field.
"""

from __future__ import annotations

from transformers import TrainingArguments
from trl import TrlParser

from ctxzip.compressors import RCCCompressor, RCCConfig
from ctxzip.trainers.distributed import process_group_closed
from ctxzip.trainers.memory_recipe import train_memory_compressor
from ctxzip.trainers.script_args import CompressorModelConfig, CompressorScriptArguments


def make_parser() -> TrlParser:
    return TrlParser((CompressorScriptArguments, RCCConfig, TrainingArguments, CompressorModelConfig))


def main(script_args: CompressorScriptArguments, rcc_config: RCCConfig, training_args: TrainingArguments,
         model_args: CompressorModelConfig) -> list | None:
    return train_memory_compressor(RCCCompressor, rcc_config, script_args, training_args, model_args)


if __name__ == "__main__":
    with process_group_closed():
        main(*make_parser().parse_args_and_config())
