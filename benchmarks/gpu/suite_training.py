"""Section 3 of the GPU suite: training throughput of the compressor trainers vs plain LoRA SFT.

Speed does not depend on the weights' values, so the base model is SmolLM2-135M-Instruct's
architecture with random weights (fp32 master weights, bf16 autocast: the recipes' ``dtype: float32``
+ ``bf16: true``). Every variant trains through the library's classes and a ``transformers.Trainer``
(the recipes' loop) on random token ids for a few warm-up steps, then timed steps:
- ``lora_sft``: the base with the gist recipe's LoRA, plain causal-LM loss over context + target;
- ``gist``: ``GistCompressor`` + ``MemoryCompressorTrainer`` with ``recipes/configs/gist/gpu.yaml``'s
  shapes (the same tokens: the context is compressed, the target decoded from the memory);
- ``..._fused_ce``: the same with Liger-Kernel's fused linear cross-entropy (``trainers.fused_loss``);
- ``cskv``: ``CSKVCompressor`` + ``CSKVTrainer`` (layer-wise K/V reconstruction) with
  ``recipes/configs/cskv/gpu.yaml``'s shapes (no logits at all, so no fused variant);
- ``rcc``, ``lcirc``, ``softpromptcomp_soft``: each compressor with its own ``gpu.yaml`` settings
  (window and rate; latents, segments and Perceiver layers; soft vectors) + ``MemoryCompressorTrainer`` on
  the gist rows (the same tokens as LoRA SFT, so each ratio to it is direct). SoftPromptComp runs its
  soft-vector source only: the summary is written by generation, which random weights cannot time honestly.
  InComeS is not here (its rows are pools of edits with a teacher pass; not the same tokens).
A step's time is the interval between consecutive ends of optimizer steps (data, forward, backward,
clipping, optimizer, logging: everything a real run pays); peak memory is over the timed steps.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from suite_common import ROOT, Clock, Results
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

# SmolLM2-135M-Instruct (the embedded model: compressors/models.py; config of its converted folder).
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
               bos_token_id=1, eos_token_id=2, pad_token_id=2)
# A tiny Llama for the CPU smoke run (shapes of compressors.models.tiny_llama); a small vocabulary,
# because Liger's kernels run in the Triton interpreter there, one program per token over the vocabulary.
TINY = dict(SMOLLM2, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def base_config(smoke: bool) -> LlamaConfig:
    params = dict(TINY if smoke else SMOLLM2)
    rope_theta = params.pop("rope_theta")
    config = LlamaConfig(**params, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    config.name_or_path = "smollm2-135m-architecture-random"
    return config


@dataclass
class Shapes:
    """The training shapes of one run of the suite, from the GPU recipes (or tiny ones for the smoke run)."""

    batch: int
    context: int
    target: int
    gist: dict[str, Any]
    lora: dict[str, Any]
    cskv: dict[str, Any]
    memory_methods: dict[str, dict[str, Any]]  # registered type -> its config (from its gpu.yaml)
    cskv_tokens: int
    cskv_batch: int
    warmup: int
    timed: int
    fused_chunk: int | None = None  # Liger's chunk_mem_const (None: its default)
    notes: list[str] = field(default_factory=list)


def shapes(smoke: bool) -> Shapes:
    if smoke:
        return Shapes(batch=2, context=32, target=16,
                      gist=dict(tokens_per_gist=4, segment_length=16, lora_r=4, lora_alpha=8),
                      lora=dict(r=4, alpha=8), cskv=dict(density=0.5, window=4, quant_bits=4, quant_group_size=8),
                      memory_methods={"rcc": dict(window=16, rate=4, lora_r=4, lora_alpha=8),
                                      "lcirc": dict(num_latents=4, segment_length=16, perceiver_layers=1),
                                      "softpromptcomp": dict(sources="soft", num_soft=4, perceiver_layers=1)},
                      cskv_tokens=48, cskv_batch=2, warmup=1, timed=2,
                      # one chunk: the interpreter pays per kernel launch (tests/test_fused_loss.py covers chunking)
                      fused_chunk=64)
    gist = yaml.safe_load((ROOT / "recipes/configs/gist/gpu.yaml").read_text())
    cskv = yaml.safe_load((ROOT / "recipes/configs/cskv/gpu.yaml").read_text())
    return Shapes(
        batch=int(gist["per_device_train_batch_size"]), context=int(gist["context_tokens"]),
        target=int(gist["max_target_tokens"]),
        gist={k: gist[k] for k in ("tokens_per_gist", "segment_length", "lora_r", "lora_alpha", "lora_in_decoder",
                                   "max_context_tokens") if k in gist},
        lora=dict(r=int(gist.get("lora_r", 32)), alpha=int(gist.get("lora_alpha", 64))),
        cskv={k: cskv[k] for k in ("density", "value_density", "window", "quant_bits", "quant_group_size",
                                   "max_context_tokens") if k in cskv},
        memory_methods={"rcc": recipe_config("rcc"), "lcirc": recipe_config("lcirc"),
                        "softpromptcomp": {**recipe_config("softpromptcomp"), "sources": "soft"}},
        cskv_tokens=int(cskv["train_tokens"]), cskv_batch=int(cskv["per_device_train_batch_size"]),
        warmup=3, timed=8,
        notes=["gradient_accumulation_steps=1 (the recipes accumulate 2-4 micro-batches per optimizer step; "
               "tokens/s per micro-batch is what is compared)"])


def recipe_config(method: str) -> dict[str, Any]:
    """The compressor settings of ``recipes/configs/<method>/gpu.yaml`` (its config class's fields only)."""
    import dataclasses

    from ctxzip.compressors import compressor_class

    values = yaml.safe_load((ROOT / f"recipes/configs/{method}/gpu.yaml").read_text())
    fields = {f.name for f in dataclasses.fields(compressor_class(method).config_class)}
    return {k: v for k, v in values.items() if k in fields}


def layout_tokenizer() -> Any:
    """A three-token word-level tokenizer built in memory: these compressors lay their memory out in a
    conversation, and throughput needs no real vocabulary (the plain-text layout: no template prefix, which
    would add some 25 tokens per row with SmolLM2's chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


# ----- data -----------------------------------------------------------------------------------------
class RandomRows(torch.utils.data.Dataset):
    """``count`` rows of random token ids with fixed lengths (no padding): throughput only."""

    def __init__(self, count: int, make: Any) -> None:
        self.rows = [make(i) for i in range(count)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


def _ids(gen: torch.Generator, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (length,), generator=gen)


def compressor_rows(count: int, context: int, target: int, vocab: int) -> RandomRows:
    from ctxzip.trainers.objectives import OBJECTIVES

    gen = torch.Generator().manual_seed(0)
    sft = OBJECTIVES.index("sft")

    def make(_: int) -> dict[str, torch.Tensor]:
        ids = _ids(gen, target, vocab)
        return {"context_ids": _ids(gen, context, vocab), "context_mask": torch.ones(context, dtype=torch.long),
                "input_ids": ids, "attention_mask": torch.ones(target, dtype=torch.long), "labels": ids.clone(),
                "objective": torch.tensor(sft)}

    return RandomRows(count, make)


def lm_rows(count: int, length: int, vocab: int) -> RandomRows:
    gen = torch.Generator().manual_seed(0)

    def make(_: int) -> dict[str, torch.Tensor]:
        ids = _ids(gen, length, vocab)
        return {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids.clone()}

    return RandomRows(count, make)


# ----- models with the fused loss -------------------------------------------------------------------
class FusedCompressorLoss(nn.Module):
    """A compressor whose forward computes its LM loss fused (``trainers.fused_loss``): handed to the
    unchanged ``MemoryCompressorTrainer``, which weights its ``per_example_loss`` as usual."""

    def __init__(self, compressor: nn.Module, chunk_mem_const: int | None = None) -> None:
        super().__init__()
        self.compressor = compressor
        self.chunk_mem_const = chunk_mem_const

    @property
    def config(self) -> Any:
        return self.compressor.config

    def forward(self, **batch: Any) -> dict[str, Any]:
        from ctxzip.trainers.fused_loss import compressor_lm_loss

        return compressor_lm_loss(self.compressor, batch, fused=True, chunk_mem_const=self.chunk_mem_const)


class CausalLMLoss(nn.Module):
    """A causal LM (PEFT-wrapped) whose forward returns the fused mean next-token loss."""

    def __init__(self, model: nn.Module, chunk_mem_const: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_mem_const = chunk_mem_const

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        from ctxzip.trainers.fused_loss import causal_lm_loss

        loss = causal_lm_loss(self.model, input_ids, attention_mask, labels, fused=True,
                              chunk_mem_const=self.chunk_mem_const)
        return {"loss": loss}


# ----- timing ---------------------------------------------------------------------------------------
class StepTimer(TrainerCallback):
    """Intervals between ends of optimizer steps; peak memory reset after the warm-up steps."""

    def __init__(self, warmup: int, cuda: bool) -> None:
        self.warmup, self.cuda = warmup, cuda
        self.ends: list[float] = []

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        self.ends = [time.perf_counter()]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        self.ends.append(time.perf_counter())
        if self.cuda and len(self.ends) - 1 == self.warmup:
            torch.cuda.reset_peak_memory_stats()

    def timed(self) -> list[float]:
        steps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        return steps[self.warmup:]


def training_args(out: str, batch: int, steps: int, cuda: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=1e-4, lr_scheduler_type="constant", bf16=cuda, use_cpu=not cuda, logging_steps=1,
        save_strategy="no", report_to="none", dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True, seed=0, label_names=["labels"])


def run_variant(name: str, build: Any, dataset: RandomRows, batch: int, tokens_per_step: int, sh: Shapes,
                device: str) -> dict[str, Any]:
    """Build (model, trainer class, trainer kwargs), train warm-up + timed steps, measure."""
    cuda = device == "cuda"
    torch.manual_seed(0)
    model, trainer_cls, extra, trainer_name = build()
    timer = StepTimer(sh.warmup, cuda)
    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_cls(model=model, args=training_args(out, batch, sh.warmup + sh.timed, cuda),
                              train_dataset=dataset, data_collator=stack, callbacks=[timer], **extra)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = timer.timed()
    step_s = sorted(steps)[len(steps) // 2]  # median: robust to one slow step (allocator growth, GC)
    row = {"variant": name, "batch": batch, "tokens_per_step": tokens_per_step, "step_ms": step_s * 1e3,
           "step_ms_all": [round(s * 1e3, 2) for s in steps], "tokens_per_s": tokens_per_step / step_s,
           "loss": losses[-1] if losses else None, "trainer": trainer_name,
           "loss_finite": all(torch.isfinite(torch.tensor(losses)).tolist()) if losses else False}
    if cuda:
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def variants(sh: Shapes, device: str, vocab: int, smoke: bool) -> list[tuple[str, Any, RandomRows, int, int]]:
    """``(name, build, dataset, batch, tokens per step)`` of every variant."""
    from peft import LoraConfig, get_peft_model

    from ctxzip.compressors.cskv import CSKVCompressor, CSKVConfig
    from ctxzip.compressors.gist import GistCompressor, GistConfig
    from ctxzip.trainers.memory_trainer import MemoryCompressorTrainer

    count = (sh.warmup + sh.timed) * max(sh.batch, sh.cskv_batch)
    comp_rows = compressor_rows(count, sh.context, sh.target, vocab)
    sft_rows = lm_rows(count, sh.context + sh.target, vocab)
    cskv_rows = lm_rows(count, sh.cskv_tokens, vocab)
    per_step = sh.batch * (sh.context + sh.target)

    def base() -> LlamaForCausalLM:
        # Built on the CPU, as the recipes load it; the Trainer moves it to the GPU. (GistCompressor cannot
        # wrap a model already on the GPU: it draws its gist table's init noise on the CPU.)
        return LlamaForCausalLM(base_config(smoke))

    def lora(fused: bool) -> Any:
        def build() -> tuple[Any, Any, dict[str, Any], str]:
            model = get_peft_model(base(), LoraConfig(r=sh.lora["r"], lora_alpha=sh.lora["alpha"], bias="none",
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                      task_type="CAUSAL_LM"))
            return (CausalLMLoss(model, sh.fused_chunk) if fused else model), Trainer, {}, "transformers.Trainer"
        return build

    def gist(fused: bool) -> Any:
        def build() -> tuple[Any, Any, dict[str, Any], str]:
            compressor = GistCompressor(GistConfig(**sh.gist), base())
            model = FusedCompressorLoss(compressor, sh.fused_chunk) if fused else compressor
            return model, MemoryCompressorTrainer, {"objective_weights": {"sft": 1.0}}, "MemoryCompressorTrainer"
        return build

    def cskv() -> tuple[Any, Any, dict[str, Any], str]:
        compressor = CSKVCompressor(CSKVConfig(**sh.cskv), base())
        try:
            from ctxzip.compressors.cskv.trainer import CSKVTrainer

            return compressor, CSKVTrainer, {}, "CSKVTrainer"
        except ImportError as exc:  # compressors.cskv.trainer imports `datasets` at module level
            return compressor, _ReconstructionTrainer, {}, f"MemoryCompressorTrainer + CSKV loss ({exc.name} missing)"

    class _ReconstructionTrainer(MemoryCompressorTrainer):
        """CSKVTrainer's loss (the compressor's forward on input_ids / attention_mask) where the
        module that defines CSKVTrainer cannot be imported."""

        def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def memory_method(method: str) -> Any:
        def build() -> tuple[Any, Any, dict[str, Any], str]:
            from ctxzip.compressors import compressor_class

            cls = compressor_class(method)
            compressor = cls(cls.config_class(**sh.memory_methods[method]), base())
            compressor.use_tokenizer(layout_tokenizer(), use_chat_template=False)
            return compressor, MemoryCompressorTrainer, {"objective_weights": {"sft": 1.0}}, "MemoryCompressorTrainer"
        return build

    return [
        ("lora_sft", lora(False), sft_rows, sh.batch, per_step),
        ("lora_sft_fused_ce", lora(True), sft_rows, sh.batch, per_step),
        ("gist", gist(False), comp_rows, sh.batch, per_step),
        ("gist_fused_ce", gist(True), comp_rows, sh.batch, per_step),
        ("cskv_reconstruction", cskv, cskv_rows, sh.cskv_batch, sh.cskv_batch * sh.cskv_tokens),
        *[("softpromptcomp_soft" if method == "softpromptcomp" else method, memory_method(method), comp_rows, sh.batch,
           per_step) for method in sh.memory_methods],
    ]


def section_training(record: dict[str, Any], results: Results, clock: Clock, device: str, smoke: bool,
                     deadline_s: float) -> None:
    sh = shapes(smoke)
    config = base_config(smoke)
    record["config"] = {"base": "SmolLM2-135M architecture, random weights" if not smoke else "tiny Llama (smoke)",
                        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size,
                        "precision": "fp32 weights + bf16 autocast" if device == "cuda" else "fp32",
                        "batch": sh.batch, "context_tokens": sh.context, "target_tokens": sh.target,
                        "gist": sh.gist, "lora": sh.lora, "cskv": sh.cskv, "cskv_tokens": sh.cskv_tokens,
                        "memory_methods": sh.memory_methods,
                        "warmup_steps": sh.warmup, "timed_steps": sh.timed}
    rows: list[dict[str, Any]] = []
    record["rows"] = rows
    record["notes"] = list(sh.notes) + [
        "tokens_per_step counts every token the step reads: context + target for lora_sft and gist (the same "
        "tokens: LoRA SFT reads them as one sequence), train_tokens for cskv",
        "color: not measured (CoLoR trains with TRL's DPO trainer on candidates the model generates; "
        "generation dominates and needs a real tokenizer)",
    ]
    for name, build, dataset, batch, per_step in variants(sh, device, config.vocab_size, smoke):
        if clock.elapsed() > deadline_s:
            rows.append({"variant": name, "note": "skipped: the section's time budget is spent"})
            results.write()
            continue
        try:
            row = run_variant(name, build, dataset, batch, per_step, sh, device)
        except Exception as exc:  # noqa: BLE001 - e.g. liger-kernel missing: the other variants still run
            row = {"variant": name, "note": f"error: {type(exc).__name__}: {exc}"[:400]}
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        results.write()
        clock.log(f"  training {name}: " + (f"{row['tokens_per_s']:.0f} tokens/s, step {row['step_ms']:.1f} ms"
                                            + (f", peak {row['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in row else "")
                                            if "tokens_per_s" in row else row.get("note", "")))
    by_name = {r["variant"]: r for r in rows if "tokens_per_s" in r}
    for plain, fused in (("lora_sft", "lora_sft_fused_ce"), ("gist", "gist_fused_ce")):
        if plain in by_name and fused in by_name:
            a, b = by_name[plain], by_name[fused]
            record[f"{fused}_speedup"] = b["tokens_per_s"] / a["tokens_per_s"]
            if "peak_mem_gib" in a and "peak_mem_gib" in b:
                record[f"{fused}_peak_mem_saved_gib"] = a["peak_mem_gib"] - b["peak_mem_gib"]
    for name in ("gist", "rcc", "lcirc", "softpromptcomp_soft"):
        if name in by_name and "lora_sft" in by_name:
            record[f"{name}_vs_lora_sft_tokens_per_s"] = by_name[name]["tokens_per_s"] / by_name["lora_sft"]["tokens_per_s"]
    if any("error" in str(r.get("note", "")) for r in rows):
        record["status"] = "partial"
