"""Train a CSKV compressor: low-rank K/V factors by layer-wise reconstruction (arXiv 2409.10593).

    accelerate launch recipes/cskv.py --config recipes/configs/cskv/quickstart.yaml
    DS_ACCELERATOR=cpu accelerate launch --config_file accelerate_configs/zero2.yaml --num_processes 2 \\
        recipes/cskv.py --config recipes/configs/cskv/quickstart.yaml --max_steps 4

Steps: load the base model; factor every ``k_proj`` / ``v_proj`` (SVD, or ASVD calibrated on
``calibration_samples`` training texts); train the factors to reconstruct the base model's keys
and values layer by layer (the base stays frozen); evaluate held-out perplexity of a continuation
read from the compressed cache against the full cache (and the untrained factors); export (config,
factor weights, model card) to ``output_dir``, check that the export reloads and generates
identically, and optionally push. Any YAML field can be overridden on the command line; the run
resumes from the last complete checkpoint in ``output_dir`` (or ``--resume_from_checkpoint PATH``;
``false`` starts afresh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainingArguments, set_seed
from trl import TrlParser

from compressors import CompressedLM, Compressor, load_base
from compressors.baselines import FullContext, FullContextConfig
from compressors.cskv import CSKVCompressor, CSKVConfig
from compressors.hub import load_exact
from compressors.models import whole_parameters
from data import build_task
from eval.scoring import score_continuation
from trainers.cskv_trainer import CSKVTrainer, TokenChunkCollator, build_text_dataset, calibration_batches
from trainers.export import process_local_models, rebuild_trained, save_and_push, train_resumable
from trainers.script_args import prepare_training_args


@dataclass
class CSKVScriptArguments:
    """Base model, data and evaluation settings of the CSKV recipe."""

    base_model: str = field(default="smollm2-135m-instruct", metadata={"help": "Hub id, folder, or embedded name"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto"})
    data_source: str = field(default="pydoc", metadata={"help": "text source: pydoc, a file, or a Hub dataset"})
    train_samples: int = field(default=512, metadata={"help": "training texts"})
    train_tokens: int = field(default=256, metadata={"help": "tokens per training text"})
    calibration_samples: int = field(default=32, metadata={"help": "training texts used for ASVD calibration"})
    skip_training: bool = field(default=False, metadata={"help": "export the SVD / ASVD init without training"})
    num_eval_samples: int = field(default=16, metadata={"help": "held-out continuations (0 = no evaluation)"})
    eval_context_tokens: int = 512
    eval_answer_tokens: int = 64
    eval_baselines: bool = field(default=True, metadata={"help": "also evaluate the full cache and the untrained init"})
    check_reload: bool = field(default=True, metadata={"help": "reload the export and compare generations"})


def make_parser() -> TrlParser:
    return TrlParser((CSKVScriptArguments, CSKVConfig, TrainingArguments))


@torch.no_grad()
def evaluate_perplexity(named: list[tuple[str, Compressor]], tokenizer: PreTrainedTokenizerBase,
                        rows: Any) -> list[dict[str, Any]]:
    """Held-out perplexity of each row's continuation read from the compressed context, with the KV
    bytes each method really holds and their reduction against the full cache (when evaluated)."""
    results = []
    for name, compressor in named:
        clm = CompressedLM(compressor.eval(), tokenizer)
        nlls, sizes = [], []
        for row in rows:
            memory = clm.compress(row["context"])
            nlls.append(score_continuation(clm, memory, row["answer"]))
            sizes.append(memory.nbytes)
        results.append({"method": name, "perplexity": math.exp(sum(nlls) / len(nlls)),
                        "kv_bytes": round(sum(sizes) / len(sizes))})
    full = next((r["kv_bytes"] for r in results if r["method"] == "full_cache"), None)
    for r in results:
        if full:
            r["kv_reduction"] = round(1.0 - r["kv_bytes"] / full, 4)
    return results


def print_results(results: list[dict[str, Any]], title: str) -> None:
    print(f"\n{title}\n| method | perplexity | KV bytes | reduction vs full cache |\n|---|---|---|---|")
    for r in results:
        reduction = f"{100 * r['kv_reduction']:.1f}%" if "kv_reduction" in r else "-"
        print(f"| {r['method']} | {r['perplexity']:.3f} | {r['kv_bytes']} | {reduction} |")
    print()


def check_reload(final: CSKVCompressor, tokenizer: PreTrainedTokenizerBase, folder: str, context: str,
                 dtype: str) -> None:
    """The exported folder must reload and generate exactly what the trained compressor generates."""
    prompt, settings = "Summarise the text in one sentence.", {"max_new_tokens": 12}
    before = CompressedLM(final, tokenizer)
    expected = before.generate(prompt, memory=before.compress(context), **settings)
    after = CompressedLM.from_pretrained(folder, dtype=dtype)
    got = after.generate(prompt, memory=after.compress(context), **settings)
    if got != expected:
        raise RuntimeError(f"the export at {folder} generates {got!r}, the trained compressor {expected!r}")
    print(f"reload check: {folder} reloads and generates identically ({got!r})")


def main(script_args: CSKVScriptArguments, cskv_config: CSKVConfig,
         training_args: TrainingArguments) -> list[dict[str, Any]] | None:
    push = prepare_training_args(training_args)
    set_seed(training_args.seed)
    model, tokenizer = load_base(script_args.base_model, dtype=script_args.dtype)
    compressor = CSKVCompressor(cskv_config, model)
    collator = TokenChunkCollator(tokenizer, script_args.train_tokens)
    train = build_text_dataset(tokenizer, script_args.train_samples, script_args.train_tokens,
                               training_args.seed, "train", script_args.data_source)
    if cskv_config.init == "asvd":
        calibration = train.select(range(min(len(train), script_args.calibration_samples)))
        # The calibration passes run the base model before DeepSpeed wraps it: under ZeRO-3 its weights are
        # still the shards transformers partitioned at load, so every process gathers them for these passes
        # (the same batches on every process: the same ASVD scales everywhere).
        with whole_parameters(*compressor.base_lm.parameters()):
            means, tokens = compressor.activation_means(calibration_batches(calibration, collator))
        compressor.calibrate_asvd([], means=means)  # gathers the projections it factors itself
        print(f"ASVD calibrated on {tokens} tokens")
    initial = {k: v.detach().clone() for k, v in compressor.own_state_dict().items()}
    if script_args.skip_training:
        trained = {k: v for k, v in compressor.state_dict().items() if not k.startswith("model.")}
        is_main = training_args.process_index == 0
    else:
        trainer = CSKVTrainer(model=compressor, args=training_args, processing_class=tokenizer,
                              train_dataset=train, data_collator=collator)
        trained = train_resumable(trainer)  # every process: a collective under ZeRO-3
        is_main = trainer.is_world_process_zero()
    if not is_main:
        return None
    final = rebuild_trained(CSKVCompressor, cskv_config, script_args.base_model, trained, script_args.dtype)
    results: list[dict[str, Any]] = []
    if script_args.num_eval_samples > 0:
        rows = build_task("continuation", tokenizer, num_samples=script_args.num_eval_samples,
                          context_tokens=script_args.eval_context_tokens, seed=training_args.seed + 1,
                          split="test", source=script_args.data_source,
                          answer_tokens=script_args.eval_answer_tokens)
        named: list[tuple[str, Compressor]] = [("trained" if not script_args.skip_training else cskv_config.init,
                                                final)]
        if script_args.eval_baselines:
            if not script_args.skip_training:
                with process_local_models():  # only this process loads it: no ZeRO-3 partitioning
                    base = load_base(script_args.base_model, dtype=script_args.dtype)[0]
                untrained = CSKVCompressor(cskv_config, base)
                load_exact(untrained, initial, untrained.own_state_dict(), "the initial factors")
                named.append((f"{cskv_config.init} init (untrained)", untrained))
            named.append(("full_cache", FullContext(FullContextConfig(), final.base_lm)))
        results = evaluate_perplexity(named, tokenizer, rows)
        print_results(results, f"held-out continuation perplexity ({len(rows)} x {script_args.eval_context_tokens}"
                               f"-token contexts, {script_args.eval_answer_tokens}-token continuations)")
    folder = save_and_push(final, tokenizer, training_args.output_dir, results or None, push,
                           training_args.hub_model_id)
    if script_args.check_reload:
        context = build_task("continuation", tokenizer, num_samples=1, context_tokens=min(
            256, script_args.eval_context_tokens), seed=training_args.seed + 2, split="test",
            source=script_args.data_source)[0]["context"]
        check_reload(final, tokenizer, str(folder), context, script_args.dtype)
    return results


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
