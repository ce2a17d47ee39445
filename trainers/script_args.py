"""Script arguments shared by the recipes (TrlParser dataclasses: YAML defaults, CLI overrides).

The base model is described by ``trl.ModelConfig`` (``CompressorModelConfig``: ``model_name_or_path``,
``dtype``, ``model_revision``, ``attn_implementation``, ``load_in_4bit`` / ``load_in_8bit`` and the
bitsandbytes settings), turned into ``compressors.load_base`` arguments by ``base_model_kwargs`` (with TRL's
``get_quantization_config``). ModelConfig's PEFT fields (``use_peft``, ``lora_r``, ...) are not recipe
arguments: the compressor config's own LoRA fields (``GistConfig.lora_r``, ``ColorConfig.lora_r``, ...)
define the adapter, because they are what the exported artifact records and reloads.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase, TrainingArguments
from trl import ModelConfig, get_quantization_config

from ctxzip.compressors.hub import check_push_revision
from ctxzip.compressors.models import EMBEDDED_MODEL, load_base, local_model_name
from ctxzip.data import build_mixture, build_task

from .distributed import refuse_fsdp
from .export import HubPush
from .objectives import INSTRUCTION_RECONSTRUCTION_TASK, objective_of

# ModelConfig's LoRA settings: in the recipes the compressor config's LoRA fields are used instead.
PEFT_FIELDS = ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
               "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora")
_NOT_AN_ARGUMENT = ("not a recipe argument: the compressor config's lora_* fields define the adapter the "
                    "artifact records")


def _peft_field(name: str) -> Any:
    """ModelConfig's field ``name`` kept (same default) but out of ``__init__``: no YAML key or flag sets it."""
    base = ModelConfig.__dataclass_fields__[name]
    kwargs: dict[str, Any] = {"init": False, "metadata": {"help": _NOT_AN_ARGUMENT}}
    if base.default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = base.default_factory
    else:
        kwargs["default"] = base.default
    return field(**kwargs)


@dataclass
class CompressorModelConfig(ModelConfig):
    """``trl.ModelConfig`` of a compressor recipe: the base model, its dtype, revision, attention and
    bitsandbytes quantization. ``model_name_or_path`` defaults to the embedded SmolLM2-135M-Instruct.

    Its PEFT fields (``use_peft``, ``lora_r``, ``lora_alpha``, ...) are not arguments here (``init=False``):
    a YAML key or flag naming one is an unknown-argument error. The LoRA of a compressor is set by the
    compressor config (``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules`` of
    ``GistConfig`` / ``ColorConfig``), which the exported artifact records.
    """

    model_name_or_path: str | None = field(default=EMBEDDED_MODEL, metadata={
        "help": "base model: a Hub id, a local folder, or an embedded name (smollm2-135m-instruct, also "
                "reachable as HuggingFaceTB/SmolLM2-135M-Instruct; tiny-random-llama for tests)"})
    use_peft: bool = _peft_field("use_peft")
    lora_r: int = _peft_field("lora_r")
    lora_alpha: int = _peft_field("lora_alpha")
    lora_dropout: float = _peft_field("lora_dropout")
    lora_target_modules: list[str] | None = _peft_field("lora_target_modules")
    lora_target_parameters: list[str] | None = _peft_field("lora_target_parameters")
    lora_modules_to_save: list[str] | None = _peft_field("lora_modules_to_save")
    lora_task_type: str = _peft_field("lora_task_type")
    use_rslora: bool = _peft_field("use_rslora")
    use_dora: bool = _peft_field("use_dora")


def base_model_name(model_args: ModelConfig) -> str:
    """``model_name_or_path``, or the embedded model when a plain ``trl.ModelConfig`` leaves it None."""
    return model_args.model_name_or_path or EMBEDDED_MODEL


def check_model_args(model_args: ModelConfig, quantization: bool = True, what: str = "this recipe") -> None:
    """Refuse settings a recipe would otherwise ignore: ModelConfig's PEFT fields set away from their
    defaults (the compressor config's lora_* fields define the adapter), and 4/8-bit loading where the
    recipe cannot train on a quantized base (``quantization=False``)."""
    defaults = ModelConfig()
    changed = [name for name in PEFT_FIELDS if getattr(model_args, name) != getattr(defaults, name)]
    if changed:
        raise ValueError(f"ModelConfig's PEFT fields {changed} are not used by {what}: the compressor config's "
                         "lora_r / lora_alpha / lora_dropout / lora_target_modules define the adapter; set those")
    if not quantization and (model_args.load_in_4bit or model_args.load_in_8bit):
        raise ValueError(f"{what} cannot use a 4-bit or 8-bit base model (load_in_4bit / load_in_8bit)")


def base_model_kwargs(model_args: ModelConfig, quantized: bool = True) -> dict[str, Any]:
    """``compressors.load_base`` keyword arguments (all but the name) for ``model_args``.

    ``quantized=False`` leaves quantization out (the plain base a trained compressor is rebuilt on and
    exported with); otherwise it is TRL's ``get_quantization_config`` (NF4 by default, compute in ``dtype``).
    """
    check_model_args(model_args)
    kwargs: dict[str, Any] = {"dtype": model_args.dtype or "float32", "quantization": None,
                              "revision": None if model_args.model_revision in (None, "", "main")
                              else model_args.model_revision,
                              "attn_implementation": model_args.attn_implementation}
    if quantized:
        # bitsandbytes computes in a real dtype: "auto" (load as saved) computes in float32.
        compute = model_args if model_args.dtype not in (None, "auto") else dataclasses.replace(model_args,
                                                                                                dtype="float32")
        kwargs["quantization"] = get_quantization_config(compute)
    return kwargs


def quantization_name(model_args: ModelConfig) -> str | None:
    """``"4bit-nf4"`` / ``"8bit"`` / None: the quantization in words (data-stage fingerprints, logs)."""
    if model_args.load_in_4bit:
        nested = "-nested" if model_args.use_bnb_nested_quant else ""
        storage = f"-{model_args.bnb_4bit_quant_storage}" if model_args.bnb_4bit_quant_storage else ""
        return f"4bit-{model_args.bnb_4bit_quant_type}{nested}{storage}"
    return "8bit" if model_args.load_in_8bit else None


def load_base_model(model_args: ModelConfig, quantized: bool = True) -> tuple[Any, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` of ``model_args`` through ``compressors.load_base``."""
    return load_base(base_model_name(model_args), **base_model_kwargs(model_args, quantized))


def base_fingerprint(model_args: ModelConfig) -> dict[str, Any]:
    """What identifies the base a data stage was written with (the alias and the public id are one model)."""
    return {"base_model": local_model_name(base_model_name(model_args)), "dtype": model_args.dtype,
            "quantization": quantization_name(model_args), "revision": model_args.model_revision}


@dataclass
class CompressorScriptArguments:
    """Data and evaluation settings of a memory-compressor recipe (the base model: ``CompressorModelConfig``)."""

    data_source: str = field(default="pydoc", metadata={"help": "haystack text: pydoc, a file, or a Hub dataset"})
    train_tasks: list[str] = field(default_factory=lambda: ["passkey"], metadata={
        "help": "synthetic long-context tasks the training rows are drawn from (data.TASKS: passkey, ...)"})
    train_samples_per_task: int = field(default=256, metadata={"help": "training rows built for each train task"})
    context_tokens: int = field(default=128, metadata={
        "help": "tokens of context (haystack) in every row; with max_train_context_tokens, the shortest training row"})
    max_train_context_tokens: int | None = field(default=None, metadata={
        "help": "when set, each training row's context length is drawn log-uniformly between context_tokens and this "
                "(deterministic per seed; data.build_mixture); unset, every row has context_tokens. The evaluation "
                "keeps context_tokens. Keep it within the compressor's max_context_tokens (the collator truncates)"})
    max_target_tokens: int = field(default=256, metadata={
        "help": "longest decoder target (prompt + answer) in tokens; longer targets are truncated"})
    reconstruction_span_tokens: int = field(default=64, metadata={
        "help": "tokens of each reconstruction row's span (cued by its first 10-20 tokens; the public RCC code "
                "copies 512)"})
    continuation_tokens: int = field(default=32, metadata={
        "help": "tokens each continuation row predicts after its context"})
    sft_weight: float = field(default=1.0, metadata={
        "help": "weight of the instruction objective (answer the row's question from the memory)"})
    autoencoding_weight: float = field(default=1.0, metadata={
        "help": "weight of the autoencoding objective (rebuild the context from the memory)"})
    continuation_weight: float = field(default=1.0, metadata={
        "help": "weight of the LM-continuation objective (continue the text after the context)"})
    reconstruction_weight: float = field(default=1.0, metadata={
        "help": "weight of the reconstruction objective (copy a span of the context cued by its first tokens: "
                "rows of the reconstruction task)"})
    instruction_reconstruction_weight: float = field(default=0.0, metadata={
        "help": "weight of instruction reconstruction: when > 0, every question-answering train task also gives "
                "train_samples_per_task rows whose question is compressed with the context; the decoder "
                "regenerates the question, then answers"})
    distillation_weight: float = field(default=0.0, metadata={
        "help": "weight of distillation from the frozen base reading the full context: KL(teacher || memory "
                "reader) on the labelled tokens, added to each row's LM loss (0 = off; the teacher costs a "
                "full-context pass per row)"})
    eval_task: str = field(default="passkey", metadata={"help": "held-out task of the final evaluation table"})
    eval_context_tokens: int | None = field(default=None, metadata={
        "help": "context length of the held-out rows (default: context_tokens)"})
    eval_data_source: str | None = field(default=None, metadata={
        "help": "filler text of the held-out rows (default: data_source; stdlib: a corpus the default training "
                "never reads); always its test split"})
    eval_compare_with: list[str] = field(default_factory=list, metadata={
        "help": "other exported compressors (folders, Hub ids or shipped short names such as "
                "ctxzip/gist-smollm2-135m) scored on the same held-out rows, beside this run's"})
    num_eval_samples: int = field(default=50, metadata={"help": "held-out rows evaluated after training (0 = none)"})
    eval_scoring: str = field(default="generate", metadata={
        "help": "generate (greedy replies containing the answer: what a user sees) or loglik (teacher-forced, "
                "fast; under-reads passkey, whose reply form varies)"})
    eval_baselines: bool = field(default=True, metadata={"help": "compare with untrained, truncation, full"})
    check_reload: bool = field(default=True, metadata={
        "help": "after the export, reload the folder and check that it generates what the trained compressor does"})
    init_from: str | None = field(default=None, metadata={
        "help": "an exported compressor folder or Hub id whose own tensors start this one (QD-LCIRC from LCIRC); "
                "tensors it lacks keep their initialisation"})
    fused_lm_loss: bool = field(default=False, metadata={
        "help": "compute the decoder's LM loss with Liger-Kernel's fused linear cross-entropy (Triton: a GPU, "
                "or the CPU under TRITON_INTERPRET=1); the vocabulary's logits are never materialized"})

    def __post_init__(self) -> None:
        if self.max_train_context_tokens is not None and self.max_train_context_tokens < self.context_tokens:
            raise ValueError(f"max_train_context_tokens={self.max_train_context_tokens} must be at least "
                             f"context_tokens={self.context_tokens} (the shortest training row)")

    @property
    def objective_weights(self) -> dict[str, float]:
        return {"sft": self.sft_weight, "autoencoding": self.autoencoding_weight,
                "continuation": self.continuation_weight, "reconstruction": self.reconstruction_weight,
                "instruction_reconstruction": self.instruction_reconstruction_weight}


def build_train_dataset(args: CompressorScriptArguments, tokenizer: PreTrainedTokenizerBase,
                        seed: int) -> datasets.Dataset:
    """Mix ``train_samples_per_task`` rows of each training task, shuffled; with instruction reconstruction,
    as many rows again of each question-answering task (other samples) marked for that objective. With
    ``max_train_context_tokens``, each row's length is drawn in ``[context_tokens, max_train_context_tokens]``."""
    def rows(task: str, task_seed: int) -> datasets.Dataset:
        if args.max_train_context_tokens is None:
            return build_task(task, tokenizer, num_samples=args.train_samples_per_task,
                              context_tokens=args.context_tokens, seed=task_seed, split="train",
                              source=args.data_source, **task_options(args, task))
        return build_mixture(tokenizer, num_samples=args.train_samples_per_task, split="train", seed=task_seed,
                             families=[task], min_tokens=args.context_tokens, max_tokens=args.max_train_context_tokens,
                             source=args.data_source, options={task: task_options(args, task)})

    parts = [rows(task, seed) for task in args.train_tasks]
    if args.instruction_reconstruction_weight > 0:
        qa_tasks = [task for task, part in zip(args.train_tasks, parts) if objective_of(part[0]) == "sft"]
        if not qa_tasks:
            raise ValueError("instruction_reconstruction_weight > 0 needs a question-answering task in train_tasks "
                             f"(passkey, fact_qa, ...), got {args.train_tasks}")
        parts += [rows(task, seed + 1).map(lambda row: {"task": INSTRUCTION_RECONSTRUCTION_TASK})
                  for task in qa_tasks]
    return datasets.concatenate_datasets(parts).shuffle(seed=seed)


def build_eval_dataset(args: CompressorScriptArguments, tokenizer: PreTrainedTokenizerBase,
                       seed: int) -> datasets.Dataset:
    """Held-out rows: held-out templates (the tasks that have them) on the test split of the evaluation's text
    source."""
    return build_task(args.eval_task, tokenizer, num_samples=args.num_eval_samples,
                      context_tokens=args.eval_context_tokens or args.context_tokens, seed=seed + 1, split="test",
                      source=args.eval_data_source or args.data_source, **task_options(args, args.eval_task))


def task_options(args: CompressorScriptArguments, task: str) -> dict[str, int]:
    """The options of ``task`` that the recipe's arguments set (span and target lengths)."""
    return {"reconstruction": {"span_tokens": args.reconstruction_span_tokens},
            "continuation": {"answer_tokens": args.continuation_tokens}}.get(task, {})


#: The ``hub_strategy`` values a recipe accepts: both mean its one push of the exported artifact at the end of
#: training ("every_save" is transformers' default; a recipe pushes no checkpoint at a save, since a checkpoint
#: is not the artifact). "checkpoint" and "all_checkpoints", which push checkpoints to resume from, are refused.
HUB_STRATEGIES = ("every_save", "end")


def export_push(training_args: TrainingArguments) -> HubPush | None:
    """The push the ``hub_*`` fields ask for (``None`` without ``--push_to_hub``), checked before training, and
    Trainer's own push turned off (``push_to_hub = False``): a recipe pushes its exported artifact once, at the
    end (``trainers.export.save_and_push``), never Trainer's raw checkpoints.

    ``hub_model_id`` (default: the name of ``output_dir``, in the token's namespace), ``hub_private_repo``,
    ``hub_token`` and ``hub_revision`` (a branch, created from main when needed) are honoured; ``hub_strategy``
    must be one of ``HUB_STRATEGIES``; ``hub_always_push`` changes nothing (the one push is never skipped).
    """
    push = bool(training_args.push_to_hub)
    training_args.push_to_hub = False
    if not push:
        return None
    strategy = getattr(training_args.hub_strategy, "value", training_args.hub_strategy)
    if strategy not in HUB_STRATEGIES:
        raise ValueError(f"--hub_strategy {strategy} is not supported: a ctxzip recipe pushes its exported compressor "
                         f"once, at the end of training ({' or '.join(HUB_STRATEGIES)}); its checkpoints stay in "
                         "output_dir")
    check_push_revision(training_args.hub_revision)
    return HubPush(repo_id=training_args.hub_model_id or Path(training_args.output_dir).absolute().name,
                   private=training_args.hub_private_repo, token=training_args.hub_token,
                   revision=training_args.hub_revision)


def prepare_training_args(training_args: TrainingArguments) -> HubPush | None:
    """Settings every compressor recipe needs; returns the push the user asked for (``export_push``).

    Rows are tokenized by the collator (so their text columns must reach it), and the recipe
    pushes the exported artifact itself rather than letting Trainer push raw checkpoints.
    """
    refuse_fsdp(training_args)
    warn_if_bf16_is_emulated(training_args)
    training_args.remove_unused_columns = False
    training_args.label_names = ["labels"]
    return export_push(training_args)


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute in bfloat16 natively


def cpu_computes_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), read from ``cpuinfo``; ``None`` where that
    file cannot be read (not Linux): unknown."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return None
    return any(flag in flags.split() for flag in BF16_CPU_FLAGS)


def warn_if_bf16_is_emulated(training_args: TrainingArguments, cpuinfo: str | Path = "/proc/cpuinfo") -> None:
    """``--bf16`` on a CPU without bfloat16 instructions: autocast still runs, but every bfloat16 matmul is
    emulated, and steps take many times longer than in float32 (the first step of the gist mixture on a 2-core
    AVX2 CPU: 129 s, against 9 s in float32). Warn, naming the fix, rather than let a run crawl without a word."""
    if training_args.bf16 and training_args.device.type == "cpu" and cpu_computes_bf16(cpuinfo) is False:
        warnings.warn("--bf16 on a CPU without bfloat16 instructions (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): "
                      "bfloat16 is emulated and training steps are many times slower than in float32; pass "
                      "--bf16 false", stacklevel=2)
