"""Train SoftPromptComp (our interpretation of arXiv 2404.04997): an LM-written summary and soft prompt vectors
from learned queries over the frozen LM's hidden states, weighted by learned gates, read as input embeddings.

    accelerate launch recipes/softpromptcomp.py --config recipes/configs/softpromptcomp/quickstart.yaml
    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/softpromptcomp.py \\
        --config recipes/configs/softpromptcomp/gpu.yaml

The ablations are config flags: ``--sources summary|soft|both`` and ``--weighting none|per_source|per_vector``.
The objectives mix by weight: ``sft`` (the question-answering tasks, loss on the answer only) and
``continuation`` / ``reconstruction`` (pre-training the soft vectors). Summaries are written by the base model
(or ``--summariser``) and cached per context (``$CTXZIP_HOME/summaries``), so ablations share them. The gate
values are logged with the loss. The run resumes from the last complete checkpoint in ``output_dir``; the
exported compressor (config, queries, resampler, gates, optional LoRA adapter, model card with the evaluation
table) is written to ``output_dir`` and checked to reload and generate identically. ``--help`` explains every
field.
"""

from __future__ import annotations

from transformers import TrainingArguments
from trl import TrlParser

from ctxzip.compressors import SoftPromptCompCompressor, SoftPromptCompConfig
from ctxzip.trainers.distributed import process_group_closed
from ctxzip.trainers.memory_recipe import train_memory_compressor
from ctxzip.trainers.script_args import CompressorModelConfig, CompressorScriptArguments


def make_parser() -> TrlParser:
    return TrlParser((CompressorScriptArguments, SoftPromptCompConfig, TrainingArguments, CompressorModelConfig))


def main(script_args: CompressorScriptArguments, config: SoftPromptCompConfig, training_args: TrainingArguments,
         model_args: CompressorModelConfig) -> list | None:
    return train_memory_compressor(SoftPromptCompCompressor, config, script_args, training_args, model_args)


if __name__ == "__main__":
    with process_group_closed():
        main(*make_parser().parse_args_and_config())
