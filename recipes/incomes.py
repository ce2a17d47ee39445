"""Train InComeS (arXiv 2505.22156): each edit compressed into the keys/values of one gist token, pools of edits
read through a selection branch in the upper layers, learned by distillation from the model reading the edit.

    accelerate launch recipes/incomes.py --config recipes/configs/incomes/quickstart.yaml         # CPU, LoRA
    accelerate launch --config_file accelerate_configs/zero3.yaml recipes/incomes.py \\
        --config recipes/configs/incomes/gpu.yaml                                                   # upper half, full

Edits come from the offline generator (``--edit_source offline``: counterfactual facts about invented entities and
people) or from zsRE / CounterFact-style records (``--edit_source path/to/records.jsonl`` or a Hub dataset;
``--edit_style auto|native|zsre|counterfact``). Each step compresses one pool (the batch's edits plus distractors,
its size drawn from ``--pool_sizes``) shared by the batch's queries; the loss is the paper's weighted
cross-entropy plus KL to the frozen base reading the edit in context. After training: efficacy, generalisation and
locality on held-out edits at ``--eval_pool_sizes``, beside the untrained compressor, in-context editing and no
editing; the export (config, gist embedding, zero keys, the LoRA adapter or the upper layers, model card with that
table) is written to ``output_dir`` and checked to reload and generate identically. The run resumes from the last
complete checkpoint in ``output_dir``. ``--help`` explains every field.
"""

from __future__ import annotations

from transformers import TrainingArguments
from trl import TrlParser

from ctxzip.compressors.incomes import InComeSCompressor, InComeSConfig
from ctxzip.compressors.incomes.script_args import EditScriptArguments
from ctxzip.compressors.incomes.trainer import edit_data
from ctxzip.trainers.distributed import process_group_closed
from ctxzip.trainers.memory_recipe import train_memory_compressor
from ctxzip.trainers.script_args import CompressorModelConfig


def make_parser() -> TrlParser:
    return TrlParser((EditScriptArguments, InComeSConfig, TrainingArguments, CompressorModelConfig))


def main(script_args: EditScriptArguments, config: InComeSConfig, training_args: TrainingArguments,
         model_args: CompressorModelConfig) -> list | None:
    return train_memory_compressor(InComeSCompressor, config, script_args, training_args, model_args,
                                   data=edit_data(script_args, config))


if __name__ == "__main__":
    with process_group_closed():
        main(*make_parser().parse_args_and_config())
