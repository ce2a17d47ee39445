"""Train a CoLoR passage compressor: preference optimization with a length penalty (arXiv 2412.18232).

    accelerate launch recipes/color_dpo.py                                 # CPU quickstart defaults
    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/color_dpo.py \\
        --config recipes/configs/color_dpo/gpu.yaml                        # real scale
    accelerate launch recipes/color_dpo.py --config ... --push_to_hub --hub_model_id user/color-smollm2

Pipeline (each data stage cached under ``<output_dir>/color_data`` and resumable): corpus and
queries -> candidate compressions written by the untrained policy under several variants -> labels
(a reader retrieves each query from the corpus compressed by one variant) -> preference pairs ->
``ColorDPOTrainer`` (length-penalised ORPO by default, or DPO; LoRA, optional 4-bit base) ->
recall@1 and compression ratio on held-out queries before and after training, next to the
uncompressed corpus -> the exported compressor (adapter, config, model card with that table).
Training resumes from the last complete checkpoint in ``output_dir`` (or ``--resume_from_checkpoint
PATH``; ``false`` starts afresh). Any field can be set in the YAML or on the command line
(``--num_train_passages 64``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed
from trl import TrlParser

from compressors import ColorCompressor, ColorConfig, load_base
from compressors.color import end_token_ids, prompt_parts
from compressors.errors import ContextTooLongError, CtxzipError
from compressors.models import config_for, load_tokenizer
from data.retrieval import (
    PairRules,
    RetrievalCorpus,
    Variant,
    corpus_texts,
    generate_candidates,
    label_candidates,
    load_corpus,
    make_pairs,
    offline_corpus,
    parse_variants,
    stage_fingerprint,
)
from eval.retrieval import RetrievalResult, build_reader, evaluate_corpus, markdown_table
from trainers.color_dpo import ColorDPOConfig, ColorDPOTrainer, ColorScriptArguments
from trainers.distributed import main_process_first
from trainers.export import process_local_models, rebuild_trained, save_and_push, train_resumable

WORDS_PROMPT = ("Rewrite the passage below in at most {words} words. Keep every name, number and fact in it.\n\n"
                "Passage:\n{passage}")


def make_parser() -> TrlParser:
    return TrlParser((ColorScriptArguments, ColorConfig, ColorDPOConfig))


# ----- data ------------------------------------------------------------------------------
def build_corpora(args: ColorScriptArguments, tokenizer: Any, cache: Path, seed: int,
                  ) -> tuple[RetrievalCorpus, RetrievalCorpus]:
    if args.corpus_dataset:
        queries = args.queries_dataset or args.corpus_dataset
        train = load_corpus(args.corpus_dataset, queries, args.corpus_size, split=args.train_split,
                            max_passages=args.num_train_passages, seed=seed)
        offset = args.num_train_passages if args.eval_split == args.train_split else 0
        held = load_corpus(args.corpus_dataset, queries, args.corpus_size, split=args.eval_split,
                           max_passages=offset + args.num_eval_passages, seed=seed)
        if offset:  # one split for both: held-out passages are the ones after the training ones
            keep = {p["passage_id"] for p in held.passages[offset:]}
            held = RetrievalCorpus([dict(p) for p in held.passages if p["passage_id"] in keep],
                                   [dict(q) for q in held.queries if q["gold_id"] in keep], args.corpus_size,
                                   held.fingerprint + "-heldout")
            for i, p in enumerate(held.passages):
                p["window"] = i // args.corpus_size
            window = {p["passage_id"]: p["window"] for p in held.passages}
            for q in held.queries:
                q["window"] = window[q["gold_id"]]
        return train, held
    train = offline_corpus(tokenizer, args.num_train_passages, args.passage_tokens, args.corpus_size, seed,
                           "train", args.data_source, cache)
    held = offline_corpus(tokenizer, args.num_eval_passages, args.passage_tokens, args.corpus_size, seed,
                          "test", args.data_source, cache)
    return train, held


def check_passages(corpus: RetrievalCorpus, tokenizer: Any, config: ColorConfig, max_positions: int | None) -> None:
    """Refuse, by passage id, a passage whose compression prompt cannot fit the base model's context."""
    head, tail = prompt_parts(tokenizer, config.prompt_template)
    for p in corpus.passages:
        n = len(tokenizer(p["passage"], add_special_tokens=False)["input_ids"])
        if not n:
            raise CtxzipError(f"passage {p['passage_id']!r} is empty")
        needed = len(head) + n + len(tail) + config.max_new_tokens
        if n > config.max_context_tokens or (max_positions is not None and needed > max_positions):
            raise ContextTooLongError(
                f"passage {p['passage_id']!r} has {n} tokens: with the compression prompt and max_new_tokens="
                f"{config.max_new_tokens} it needs {needed} positions, more than the base model's {max_positions} "
                f"(or max_context_tokens={config.max_context_tokens}); shorten or split it")


class Writer:
    """The untrained policy (base + fresh LoRA), loaded on first use: cached stages need no model."""

    def __init__(self, args: ColorScriptArguments, config: ColorConfig, tokenizer: Any, seed: int) -> None:
        self.args, self.config, self.tokenizer, self.seed = args, config, tokenizer, seed
        self._compressor: ColorCompressor | None = None

    @property
    def compressor(self) -> ColorCompressor:
        if self._compressor is None:
            with process_local_models():  # the writer runs on one rank (the data stages)
                model, _ = load_base(self.args.base_model, dtype=self.args.dtype,
                                     quantization=self.args.quantization)
            self._compressor = ColorCompressor(self.config, model).use_tokenizer(self.tokenizer).eval()
        return self._compressor

    def release(self) -> None:
        """Free the writer's model (before training)."""
        self._compressor = None

    def fingerprint(self) -> dict[str, Any]:
        return {"base_model": self.args.base_model, "dtype": self.args.dtype, "quantization": self.args.quantization,
                "prompt": self.config.prompt_template, "words_prompt": WORDS_PROMPT,
                "max_new_tokens": self.config.max_new_tokens, "policy": "untrained", "seed": self.seed}

    def __call__(self, passages: list[dict[str, Any]], variant: Variant) -> list[tuple[list[int], str]]:
        ids = [self.tokenizer(p["passage"], add_special_tokens=False)["input_ids"] for p in passages]
        templates: Any = None
        if variant.words_fraction is not None:
            templates = [WORDS_PROMPT.replace("{words}", str(max(4, round(variant.words_fraction * len(p["passage"].split())))))
                         for p in passages]
        if variant.do_sample:  # reproducible samples whatever batch was resumed
            key = f"{self.seed}/{variant.name}/{passages[0]['passage_id']}"
            torch.manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
        rows = self.compressor.generate(ids, template=templates, do_sample=variant.do_sample,
                                        temperature=variant.temperature, top_p=0.95 if variant.do_sample else 1.0)
        return [(row, self.tokenizer.decode(row, skip_special_tokens=True).strip()) for row in rows]


class Readers:
    """Readers by name, built once (the lm reader reads with a plain copy of the base model)."""

    def __init__(self, args: ColorScriptArguments, tokenizer: Any) -> None:
        self.args, self.tokenizer = args, tokenizer
        self._made: dict[str, Any] = {}

    def lazy(self, name: str) -> Any:
        """A reader that is only built when it ranks something (cached stages need none)."""
        pool = self

        class Lazy:
            def __init__(self) -> None:
                self.name = name

            def rank(self, passages: list[str], queries: list[str]) -> list[list[int]]:
                return pool[name].rank(passages, queries)

        return Lazy()

    def __getitem__(self, name: str) -> Any:
        if name not in self._made:
            model = None
            with process_local_models():  # readers run on one rank (data stages, final evaluation)
                if name == "lm":
                    model, _ = load_base(self.args.base_model, dtype=self.args.dtype,
                                         quantization=self.args.quantization)
                self._made[name] = build_reader(name, model, self.tokenizer)
        return self._made[name]


def build_pairs(args: ColorScriptArguments, config: ColorConfig, train: RetrievalCorpus, variants: list[Variant],
                writer: Writer, readers: Readers, tokenizer: Any, cache: Path, batch_size: int) -> Any:
    candidates = generate_candidates(train, variants, writer, cache, writer.fingerprint(), batch_size)
    labels = label_candidates(train, candidates, variants, readers.lazy(args.label_reader), cache,
                              stage_fingerprint(cache, "candidates"))
    ends = end_token_ids(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else ends[0]
    head, tail = prompt_parts(tokenizer, config.prompt_template)

    def prompt(passage: dict[str, Any]) -> tuple[str, list[int]]:
        ids = head + tokenizer(passage["passage"], add_special_tokens=False)["input_ids"] + tail
        return tokenizer.decode(ids, skip_special_tokens=False), ids

    pairs = make_pairs(train, candidates, labels, prompt, [end_id], tokenizer.decode([end_id]), cache,
                       PairRules(args.pairs_all_success, args.pairs_all_failed), stage_fingerprint(cache, "labels"))
    return candidates, labels, pairs


def summarize_data(candidates: list[dict[str, Any]], labels: list[dict[str, Any]], pairs: Any) -> None:
    by_variant: dict[str, list[int]] = {}
    for c in candidates:
        by_variant.setdefault(c["variant"], []).append(c["tokens"])
    wins: dict[str, list[bool]] = {}
    for r in labels:
        wins.setdefault(r["variant"], []).append(r["success"])
    print("\ncandidates (untrained policy):")
    for name, lengths in by_variant.items():
        ok = wins.get(name, [])
        print(f"  {name:>12}: {sum(lengths) / len(lengths):6.1f} tokens, reader success "
              f"{sum(ok) / max(1, len(ok)):.2f}")
    rules = {r: sum(1 for x in pairs["rule"] if x == r) for r in sorted(set(pairs["rule"]))}
    print(f"pairs: {len(pairs)} {rules}\n")


# ----- evaluation ------------------------------------------------------------------------
def evaluate(corpus: RetrievalCorpus, tokenizer: Any, readers: Readers, reader_names: list[str],
             compressed: dict[str, dict[str, list[int]]]) -> list[RetrievalResult]:
    """recall@1 / ratio per reader for the uncompressed corpus and each compressed one."""
    source = {p["passage_id"]: len(tokenizer(p["passage"], add_special_tokens=False)["input_ids"])
              for p in corpus.passages}
    total = sum(source.values())
    results = []
    for name in reader_names:
        reader = readers[name]
        results.append(evaluate_corpus(corpus, corpus_texts(corpus, None, None), reader, "uncompressed", total, total))
        for label, rows in compressed.items():
            texts = {pid: tokenizer.decode(ids, skip_special_tokens=True).strip() for pid, ids in rows.items()}
            results.append(evaluate_corpus(corpus, texts, reader, label, total, sum(len(r) for r in rows.values())))
    return results


def compress_corpus(compressor: ColorCompressor, corpus: RetrievalCorpus, tokenizer: Any) -> dict[str, list[int]]:
    from tqdm.auto import tqdm

    out: dict[str, list[int]] = {}
    size = compressor.compressor_config.generation_batch_size
    for start in tqdm(range(0, len(corpus.passages), size), desc="compressing held-out passages", unit="batch"):
        batch = corpus.passages[start:start + size]
        ids = [tokenizer(p["passage"], add_special_tokens=False)["input_ids"] for p in batch]
        for p, row in zip(batch, compressor.generate(ids)):
            out[p["passage_id"]] = row
    return out


# ----- main ------------------------------------------------------------------------------
def main(script_args: ColorScriptArguments, color_config: ColorConfig,
         training_args: ColorDPOConfig) -> list[dict[str, Any]] | None:
    push = bool(training_args.push_to_hub)
    training_args.push_to_hub = False  # the recipe pushes the exported artifact, not raw checkpoints
    seed = training_args.seed
    set_seed(seed)
    for name in [script_args.label_reader, *script_args.eval_readers]:
        if name not in ("dense", "lm"):
            raise ValueError(f"unknown reader {name!r}; expected 'dense' or 'lm'")
    variants = parse_variants(script_args.candidate_variants)
    cache = Path(script_args.cache_dir or Path(training_args.output_dir) / "color_data")
    tokenizer = load_tokenizer(script_args.base_model)
    max_positions = getattr(config_for(script_args.base_model), "max_position_embeddings", None)
    writer = Writer(script_args, color_config, tokenizer, seed)
    readers = Readers(script_args, tokenizer)

    # Data: the main process builds (or reads) every cached stage first; the others then read them.
    with main_process_first(training_args):
        train, held = build_corpora(script_args, tokenizer, cache, seed)
        check_passages(train, tokenizer, color_config, max_positions)
        check_passages(held, tokenizer, color_config, max_positions)
        candidates, labels, pairs = build_pairs(script_args, color_config, train, variants, writer, readers,
                                                tokenizer, cache, color_config.generation_batch_size)
        untrained = {}
        if held.passages and script_args.eval_readers:
            greedy = [Variant("greedy")]
            before = generate_candidates(held, greedy, writer, cache, writer.fingerprint(),
                                         color_config.generation_batch_size, name="eval-untrained")
            untrained = {c["passage_id"]: c["ids"] for c in before}
    if training_args.process_index == 0:
        summarize_data(candidates, labels, pairs)
    if len(pairs) == 0:
        raise CtxzipError(
            "no preference pairs: every passage's candidates were all failures (skipped by pairs_all_failed=skip) "
            "or identical. Try more candidate_variants, another label_reader, or --pairs_all_failed "
            "shortest_vs_longest")
    writer.release()

    probe = []
    head, tail = prompt_parts(tokenizer, color_config.prompt_template)
    for p in held.passages[: script_args.length_probe_size]:
        probe.append(head + tokenizer(p["passage"], add_special_tokens=False)["input_ids"] + tail)

    model, _ = load_base(script_args.base_model, dtype=script_args.dtype, quantization=script_args.quantization)
    trainer = ColorDPOTrainer(model=model, args=training_args, train_dataset=pairs, processing_class=tokenizer,
                              peft_config=color_config.lora_config(), length_probe=probe)
    trained = train_resumable(trainer)  # every process: a collective under ZeRO-3
    if not trainer.is_world_process_zero():
        return None
    final = rebuild_trained(ColorCompressor, color_config, script_args.base_model,
                            {f"model.{k}": v for k, v in trained.items()}, script_args.dtype)
    final.use_tokenizer(tokenizer)

    rows: list[dict[str, Any]] = []
    if held.passages and script_args.eval_readers:
        compressed = {"untrained": untrained, "trained": compress_corpus(final, held, tokenizer)}
        results = evaluate(held, tokenizer, readers, script_args.eval_readers, compressed)
        table = markdown_table(results)
        print(f"\nheld-out retrieval ({len(held.queries)} queries, windows of {held.corpus_size} passages)\n")
        print(table + "\n")
        rows = [r.as_row() for r in results]
        out = Path(training_args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "color_eval.json").write_text(json.dumps(rows, indent=1))
        examples = [{"passage": p["passage"], "untrained": tokenizer.decode(untrained.get(p["passage_id"], [])),
                     "trained": tokenizer.decode(compressed["trained"][p["passage_id"]])} for p in held.passages[:4]]
        (out / "color_examples.json").write_text(json.dumps(examples, indent=1))
    save_and_push(final, tokenizer, training_args.output_dir, rows or None, push, training_args.hub_model_id)
    print(f"saved the CoLoR compressor to {training_args.output_dir}")
    return rows


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
