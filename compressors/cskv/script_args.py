"""The CSKV recipe's script arguments (a TrlParser dataclass: YAML defaults, CLI overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CSKVScriptArguments:
    """Data and evaluation settings of the CSKV recipe (the base model:
    ``trainers.script_args.CompressorModelConfig``)."""

    data_source: str = field(default="pydoc", metadata={"help": "text source: pydoc, a file, or a Hub dataset"})
    train_samples: int = field(default=512, metadata={"help": "training texts"})
    train_tokens: int = field(default=256, metadata={"help": "tokens per training text"})
    calibration_samples: int = field(default=32, metadata={"help": "training texts used for ASVD calibration"})
    skip_training: bool = field(default=False, metadata={"help": "export the SVD / ASVD init without training"})
    num_eval_samples: int = field(default=16, metadata={"help": "held-out continuations (0 = no evaluation)"})
    eval_context_tokens: int = field(default=512, metadata={
        "help": "tokens of held-out context compressed into the cache before each continuation"})
    eval_answer_tokens: int = field(default=64, metadata={"help": "tokens of each held-out continuation scored"})
    eval_baselines: bool = field(default=True, metadata={"help": "also evaluate the full cache and the untrained init"})
    check_reload: bool = field(default=True, metadata={"help": "reload the export and compare generations"})
