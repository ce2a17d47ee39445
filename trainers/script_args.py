"""Script arguments shared by the recipes (TrlParser dataclasses: YAML defaults, CLI overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
from transformers import PreTrainedTokenizerBase, TrainingArguments

from data import build_task


@dataclass
class CompressorScriptArguments:
    """Base model, data and evaluation settings of a compressor recipe."""

    base_model: str = field(default="smollm2-135m-instruct", metadata={"help": "Hub id, folder, or embedded name"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto"})
    quantization: str | None = field(default=None, metadata={"help": "None, 4bit or 8bit (bitsandbytes)"})
    data_source: str = field(default="pydoc", metadata={"help": "haystack text: pydoc, a file, or a Hub dataset"})
    train_tasks: list[str] = field(default_factory=lambda: ["passkey"])
    train_samples_per_task: int = 256
    context_tokens: int = 128
    max_target_tokens: int = 256
    sft_weight: float = 1.0
    autoencoding_weight: float = 1.0
    continuation_weight: float = 1.0
    eval_task: str = "passkey"
    num_eval_samples: int = 50
    eval_scoring: str = field(default="loglik", metadata={"help": "loglik (fast) or generate"})
    eval_baselines: bool = field(default=True, metadata={"help": "compare with untrained, truncation, full"})
    fused_lm_loss: bool = field(default=False, metadata={
        "help": "compute the decoder's LM loss with Liger-Kernel's fused linear cross-entropy (Triton: a GPU, "
                "or the CPU under TRITON_INTERPRET=1); the vocabulary's logits are never materialized"})

    @property
    def objective_weights(self) -> dict[str, float]:
        return {"sft": self.sft_weight, "autoencoding": self.autoencoding_weight,
                "continuation": self.continuation_weight}


def build_train_dataset(args: CompressorScriptArguments, tokenizer: PreTrainedTokenizerBase,
                        seed: int) -> datasets.Dataset:
    """Mix ``train_samples_per_task`` rows of each training task, shuffled."""
    parts = [build_task(task, tokenizer, num_samples=args.train_samples_per_task,
                        context_tokens=args.context_tokens, seed=seed, split="train", source=args.data_source)
             for task in args.train_tasks]
    return datasets.concatenate_datasets(parts).shuffle(seed=seed)


def build_eval_dataset(args: CompressorScriptArguments, tokenizer: PreTrainedTokenizerBase,
                       seed: int) -> datasets.Dataset:
    """Held-out rows: filler from the test split of the text source."""
    return build_task(args.eval_task, tokenizer, num_samples=args.num_eval_samples,
                      context_tokens=args.context_tokens, seed=seed + 1, split="test", source=args.data_source)


def prepare_training_args(training_args: TrainingArguments) -> bool:
    """Settings every compressor recipe needs; returns whether the user asked to push.

    Rows are tokenized by the collator (so their text columns must reach it), and the recipe
    pushes the exported artifact itself rather than letting Trainer push raw checkpoints.
    """
    training_args.remove_unused_columns = False
    training_args.label_names = ["labels"]
    push = bool(training_args.push_to_hub)
    training_args.push_to_hub = False
    return push
