"""The arguments of ``recipes/color_dpo.py`` beyond the compressor, the trainer and the base model:
where the passages come from, how candidates are written and labelled, and which readers evaluate."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctxzip.data.mixture import MIXTURE_FAMILIES


@dataclass
class ColorScriptArguments:
    """Data, readers and evaluation of the CoLoR recipe (defaults: the CPU quickstart; the base model:
    ``trainers.script_args.CompressorModelConfig``)."""

    corpus_dataset: str | None = field(default=None, metadata={
        "help": "passages (passage_id, passage): a Hub id or a .jsonl/.json/.csv/.parquet file; None = offline"})
    queries_dataset: str | None = field(default=None, metadata={
        "help": "queries (query, gold_id); default: corpus_dataset"})
    train_split: str = field(default="train", metadata={"help": "split of corpus_dataset the policy trains on"})
    eval_split: str = field(default="test", metadata={
        "help": "split of the held-out passages (the same as train_split: the passages after the training ones)"})
    data_source: str = field(default="pydoc", metadata={
        "help": "offline corpus: text the training facts are embedded in (its train split)"})
    eval_data_source: str = field(default="stdlib", metadata={
        "help": "offline corpus: text the held-out facts are embedded in (its test split; the held-out facts and "
                "queries also use held-out wordings)"})
    train_families: list[str] = field(default_factory=lambda: list(MIXTURE_FAMILIES), metadata={
        "help": "offline corpus: data.mixture retrieval families of the training facts (passage i from family i "
                "mod their number), in their training wordings"})
    eval_families: list[str] = field(default_factory=lambda: ["multi_fact"], metadata={
        "help": "offline corpus: families of the held-out facts, in their held-out wordings"})
    num_train_passages: int = field(default=192, metadata={"help": "passages the preference pairs are built from"})
    num_eval_passages: int = field(default=200, metadata={
        "help": "held-out passages (one query each) of the final evaluation"})
    passage_tokens: int = field(default=96, metadata={"help": "offline corpus: tokens per passage"})
    corpus_size: int = field(default=8, metadata={"help": "passages a reader sees at once (one retrieval corpus)"})
    candidate_variants: list[str] = field(
        default_factory=lambda: ["greedy", "words:0.25", *(f"group:1:{d}" for d in range(8)), "extract:2"],
        metadata={"help": "candidate writers: greedy | words:F | sample:T (the policy) | extract:N[:D] (N random "
                          "sentences of the passage, draw D) | group:N:D (the D-th of disjoint groups of N sentences)"})
    label_reader: str = field(default="dense", metadata={"help": "reader in the loop for labels: dense or lm"})
    label_negatives: str = field(default="original", metadata={
        "help": "what a candidate is ranked against when labelled: compressed (the window compressed by the same "
                "variant, the paper) or original (the window's other passages as they are: a candidate wins only "
                "by what it keeps)"})
    eval_readers: list[str] = field(default_factory=lambda: ["dense"], metadata={
        "help": "readers of the final held-out table: dense and/or lm (none: no evaluation)"})
    extractive_baselines: list[str] = field(default_factory=lambda: ["lead", "self_information"], metadata={
        "help": "training-free extracts in the held-out table, at the trained policy's length per passage: lead "
                "(first sentences) and/or self_information (Selective Context's score, sentence units)"})
    pairs_all_success: str = field(default="shortest_vs_longest", metadata={"help": "shortest_vs_longest or skip"})
    pairs_all_failed: str = field(default="skip", metadata={"help": "skip or shortest_vs_longest"})
    pairs_rejected: str = field(default="every", metadata={
        "help": "with successes and failures: pair the shortest success with the longest failure (longest, the "
                "released code) or with every failure (every)"})
    length_probe_size: int = field(default=4, metadata={"help": "held-out prompts for the compressed-length probe"})
    cache_dir: str | None = field(default=None, metadata={"help": "data stage cache (default <output_dir>/color_data)"})

    def __post_init__(self) -> None:
        from .data import LABEL_NEGATIVES, check_fact_families
        from .evaluation import EXTRACTIVE_SCORERS

        unknown = [s for s in self.extractive_baselines if s not in EXTRACTIVE_SCORERS]
        if unknown:
            raise ValueError(f"unknown extractive baseline(s) {unknown}; expected any of {list(EXTRACTIVE_SCORERS)}")
        if self.label_negatives not in LABEL_NEGATIVES:
            raise ValueError(f"label_negatives must be one of {list(LABEL_NEGATIVES)}, got {self.label_negatives!r}")
        for name in ("train_families", "eval_families"):
            check_fact_families(getattr(self, name), name)
