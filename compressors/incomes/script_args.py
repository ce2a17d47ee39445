"""The InComeS recipe's script arguments (a TrlParser dataclass: YAML defaults, CLI overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EditScriptArguments:
    """Data and evaluation settings of the InComeS recipe: edits compressed into pools (the base model:
    ``trainers.script_args.CompressorModelConfig``)."""

    edit_source: str = field(default="offline", metadata={
        "help": "offline (generated counterfactual edits, compressors.incomes.data), or a local .json/.jsonl file "
                "or Hub dataset of zsRE- or CounterFact-style records"})
    edit_style: str = field(default="auto", metadata={
        "help": "the records' format: auto (detected from the columns), native (compressors.incomes.data's "
                "schema), zsre, counterfact"})
    num_train_edits: int = field(default=2000, metadata={"help": "training edits (one query each per epoch)"})
    num_eval_edits: int = field(default=160, metadata={
        "help": "held-out edits (other subjects) the evaluation draws its pools from"})
    pool_sizes: list[int] = field(default_factory=lambda: [8, 16, 32], metadata={
        "help": "pool sizes drawn per training step: the batch's own edits plus distractor edits up to that size "
                "(one pool shared by the batch's queries, as the public code's chunks)"})
    locality_fraction: float = field(default=0.25, metadata={
        "help": "fraction of training queries that are one of their record's unrelated (locality) questions: the "
                "teacher, reading the edit, answers them as the base does, so the pool must leave them alone"})
    locality_teacher: str = field(default="edit", metadata={
        "help": "what the teacher reads for an unrelated (locality) query: edit (the row's edit in context, as the paper: "
                "every query is distilled from the model reading its edit) or base (the query alone: the target is the "
                "unedited answer itself; a small base reading an edit in context drifts on unrelated questions)"})
    rephrase_fraction: float = field(default=0.0, metadata={
        "help": "fraction of training queries asked with the record's rephrased question (0: generalisation is "
                "measured on wordings never trained on)"})
    max_target_tokens: int = field(default=64, metadata={"help": "longest query + answer in tokens"})
    eval_pool_sizes: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={
        "help": "pool sizes of the final evaluation (efficacy, generalisation, locality at each)"})
    eval_queries: int = field(default=16, metadata={"help": "queries asked at each evaluation pool size (0 = none)"})
    eval_max_new_tokens: int = field(default=16, metadata={"help": "greedy tokens per reply in the evaluation"})
    check_reload: bool = field(default=True, metadata={
        "help": "after the export, reload the folder and check that it generates what the trained compressor does"})
    init_from: str | None = field(default=None, metadata={
        "help": "an exported InComeS folder or Hub id whose own tensors start this one"})

    def __post_init__(self) -> None:
        if not self.pool_sizes or min(self.pool_sizes) < 1:
            raise ValueError(f"pool_sizes must be positive sizes, got {self.pool_sizes}")
        for name in ("locality_fraction", "rephrase_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.locality_teacher not in ("edit", "base"):
            raise ValueError(f"locality_teacher must be 'edit' or 'base', got {self.locality_teacher!r}")
        if self.locality_fraction + self.rephrase_fraction > 1.0:
            raise ValueError("locality_fraction + rephrase_fraction must be at most 1")
