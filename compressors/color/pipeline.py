"""CoLoR's data stages: corpora -> candidate compressions -> reader labels -> preference pairs.

Each stage is cached under the run's cache folder and resumable (``compressors.color.data``). ``prepare_data``
runs them all on the main process first (the others then read the finished stages: a barrier bounded by
``ddp_timeout``). The untrained policy that writes the candidates (``Writer``) and the reader that labels
them are built only when a stage has work to do. Readers come from the caller (the recipe passes a
``compressors.color.evaluation.ReaderPool``): this module only needs ``readers.lazy(name)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from trl import ModelConfig

from ctxzip.trainers.distributed import main_process_first
from ctxzip.trainers.export import process_local_models
from ctxzip.trainers.script_args import base_fingerprint, load_base_model

from ..conversation import ConversationLayout
from ..errors import ContextTooLongError, CtxzipError
from .compressor import ColorCompressor, prompt_parts
from .config import ColorConfig
from .data import (
    PairRules,
    RetrievalCorpus,
    Variant,
    extract,
    generate_candidates,
    label_candidates,
    load_corpus,
    make_pairs,
    offline_corpus,
    parse_variants,
    stage_fingerprint,
)
from .script_args import ColorScriptArguments

WORDS_PROMPT = ("Rewrite the passage below in at most {words} words. Keep every name, number and fact in it.\n\n"
                "Passage:\n{passage}")
READERS = ("dense", "lm")


def check_readers(args: ColorScriptArguments) -> None:
    for name in [args.label_reader, *args.eval_readers]:
        if name not in READERS:
            raise ValueError(f"unknown reader {name!r}; expected one of {list(READERS)}")


def local_base_loader(model_args: ModelConfig) -> Callable[[], Any]:
    """A loader of this process's own whole copy of the (possibly quantized) base model: the data stages
    and the final evaluation run on one rank, so no ZeRO-3 partitioning at construction."""
    def load() -> Any:
        with process_local_models():
            return load_base_model(model_args)[0]

    return load


# ----- corpora -----------------------------------------------------------------------------
def build_corpora(args: ColorScriptArguments, tokenizer: PreTrainedTokenizerBase, cache: Path, seed: int,
                  ) -> tuple[RetrievalCorpus, RetrievalCorpus]:
    """The training and held-out corpora: from ``corpus_dataset``, or the offline synthetic corpus."""
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
                           "train", args.data_source, cache, args.train_families)
    held = offline_corpus(tokenizer, args.num_eval_passages, args.passage_tokens, args.corpus_size, seed,
                          "test", args.eval_data_source, cache, args.eval_families)
    return train, held


def check_passages(corpus: RetrievalCorpus, tokenizer: PreTrainedTokenizerBase, config: ColorConfig,
                   max_positions: int | None) -> None:
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


# ----- the writer --------------------------------------------------------------------------
class Writer:
    """The untrained policy (base + fresh LoRA), loaded on first use: cached stages need no model."""

    def __init__(self, model_args: ModelConfig, config: ColorConfig, tokenizer: PreTrainedTokenizerBase,
                 seed: int) -> None:
        self.model_args, self.config, self.tokenizer, self.seed = model_args, config, tokenizer, seed
        self._compressor: ColorCompressor | None = None

    @property
    def compressor(self) -> ColorCompressor:
        if self._compressor is None:
            model = local_base_loader(self.model_args)()  # the writer runs on one rank (the data stages)
            self._compressor = ColorCompressor(self.config, model).use_tokenizer(self.tokenizer).eval()
        return self._compressor

    def release(self) -> None:
        """Free the writer's model (before training)."""
        self._compressor = None

    def fingerprint(self) -> dict[str, Any]:
        return {**base_fingerprint(self.model_args), "prompt": self.config.prompt_template,
                "words_prompt": WORDS_PROMPT, "max_new_tokens": self.config.max_new_tokens, "policy": "untrained",
                "seed": self.seed}

    def __call__(self, passages: list[dict[str, Any]], variant: Variant) -> list[tuple[list[int], str]]:
        if not variant.generates:  # an extract: cut from the passage, no model needed
            texts = [extract(p["passage"], variant, self.seed, p["passage_id"]) for p in passages]
            return [(self.tokenizer(t, add_special_tokens=False)["input_ids"], t) for t in texts]
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


# ----- pairs -------------------------------------------------------------------------------
def prompt_ids(tokenizer: PreTrainedTokenizerBase, config: ColorConfig, passage: str) -> list[int]:
    """The policy's compression prompt for ``passage``, as the compressor renders it."""
    head, tail = prompt_parts(tokenizer, config.prompt_template)
    return head + tokenizer(passage, add_special_tokens=False)["input_ids"] + tail


def build_pairs(args: ColorScriptArguments, config: ColorConfig, train: RetrievalCorpus, variants: list[Variant],
                writer: Writer, readers: Any, tokenizer: PreTrainedTokenizerBase, cache: Path,
                batch_size: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any]:
    """Candidates, reader labels and preference pairs (each a cached stage); chosen and rejected end with
    the chat template's end of turn (the tokens the policy must learn to stop with)."""
    candidates = generate_candidates(train, variants, writer, cache, writer.fingerprint(), batch_size)
    labels = label_candidates(train, candidates, variants, readers.lazy(args.label_reader), cache,
                              stage_fingerprint(cache, "candidates"), negatives=args.label_negatives)
    end_ids = list(ConversationLayout(tokenizer).end_of_turn_ids)
    if not end_ids:
        raise CtxzipError("the tokenizer has neither a chat template that closes a turn nor an eos token: the "
                          "preference pairs need an end-of-completion token")

    def prompt(passage: dict[str, Any]) -> tuple[str, list[int]]:
        ids = prompt_ids(tokenizer, config, passage["passage"])
        return tokenizer.decode(ids, skip_special_tokens=False), ids

    pairs = make_pairs(train, candidates, labels, prompt, end_ids, tokenizer.decode(end_ids), cache,
                       PairRules(args.pairs_all_success, args.pairs_all_failed, args.pairs_rejected), stage_fingerprint(cache, "labels"))
    return candidates, labels, pairs


def summarize_data(candidates: list[dict[str, Any]], labels: list[dict[str, Any]], pairs: Any) -> None:
    """Print each variant's mean candidate length and reader success, and the pairs by rule."""
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


@dataclass
class ColorData:
    """Everything the data stages produced: the corpora, the preference pairs, the untrained policy's
    greedy compressions of the held-out passages (by passage id) and the length-probe prompts."""

    train: RetrievalCorpus
    held: RetrievalCorpus
    pairs: Any
    untrained: dict[str, list[int]] = field(default_factory=dict)
    probe: list[list[int]] = field(default_factory=list)


def prepare_data(args: ColorScriptArguments, config: ColorConfig, writer: Writer, readers: Any,
                 tokenizer: PreTrainedTokenizerBase, training_args: Any, cache: Path,
                 max_positions: int | None) -> ColorData:
    """Run every data stage, the main process first (see ``trainers.distributed.main_process_first``), print
    a summary on the main process, and refuse a run without preference pairs. Every process must call it."""
    check_readers(args)
    variants = parse_variants(args.candidate_variants)
    seed = training_args.seed
    with main_process_first(training_args):
        train, held = build_corpora(args, tokenizer, cache, seed)
        check_passages(train, tokenizer, config, max_positions)
        check_passages(held, tokenizer, config, max_positions)
        candidates, labels, pairs = build_pairs(args, config, train, variants, writer, readers, tokenizer, cache,
                                                config.generation_batch_size)
        untrained: dict[str, list[int]] = {}
        if held.passages and args.eval_readers:
            before = generate_candidates(held, [Variant("greedy")], writer, cache, writer.fingerprint(),
                                         config.generation_batch_size, name="eval-untrained")
            untrained = {c["passage_id"]: c["ids"] for c in before}
    if training_args.process_index == 0:
        summarize_data(candidates, labels, pairs)
    if len(pairs) == 0:
        raise CtxzipError(
            "no preference pairs: every passage's candidates were all failures (skipped by pairs_all_failed=skip) "
            "or identical. Try more candidate_variants, another label_reader, or --pairs_all_failed "
            "shortest_vs_longest")
    probe = [prompt_ids(tokenizer, config, p["passage"]) for p in held.passages[: args.length_probe_size]]
    return ColorData(train, held, pairs, untrained, probe)
