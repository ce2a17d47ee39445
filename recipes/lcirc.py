"""Train LCIRC or QD-LCIRC (arXiv 2502.06139): a Perceiver compresses the context segment by segment into
latents, recurrently, and the frozen LM reads them through gated cross-attention blocks.

    accelerate launch recipes/lcirc.py --config recipes/configs/lcirc/quickstart.yaml        # LCIRC
    accelerate launch recipes/lcirc.py --config recipes/configs/lcirc/quickstart_qd.yaml     # QD-LCIRC from it
    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/lcirc.py --config recipes/configs/lcirc/gpu.yaml

LCIRC trains on ``continuation`` (compress the context, predict the text that follows); QD-LCIRC
(``--query_dependent true``) adds the query mixer, starts from an LCIRC export (``--init_from``) and trains
on the question-answering tasks with the loss on the answer only (``sft``), each memory made for its
question. Truncated backpropagation through the recurrence: ``--grad_segments`` steps per row keep their
gradients (``--grad_segments_at last|random``). Any YAML field can be overridden on the command line; the
run resumes from the last complete checkpoint in ``output_dir``; the exported compressor (config, Perceiver,
initial latents, gated blocks and mixer, model card with the evaluation table) is written to ``output_dir``
and checked to reload and generate identically. ``--help`` explains every field.
"""

from __future__ import annotations

from transformers import TrainingArguments
from trl import TrlParser

from ctxzip.compressors.lcirc import LCIRCCompressor, LCIRCConfig, QDLCIRCCompressor
from ctxzip.compressors.lcirc.script_args import LCIRCScriptArguments
from ctxzip.trainers.distributed import process_group_closed
from ctxzip.trainers.memory_recipe import train_memory_compressor
from ctxzip.trainers.script_args import CompressorModelConfig


def make_parser() -> TrlParser:
    return TrlParser((LCIRCScriptArguments, LCIRCConfig, TrainingArguments, CompressorModelConfig))


def main(script_args: LCIRCScriptArguments, lcirc_config: LCIRCConfig, training_args: TrainingArguments,
         model_args: CompressorModelConfig) -> list | None:
    compressor_cls = QDLCIRCCompressor if script_args.query_dependent else LCIRCCompressor
    return train_memory_compressor(compressor_cls, lcirc_config, script_args, training_args, model_args)


if __name__ == "__main__":
    with process_group_closed():
        main(*make_parser().parse_args_and_config())
