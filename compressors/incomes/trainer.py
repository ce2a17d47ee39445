"""InComeS training data: one pool of edits per batch, the student's queries, the teacher's edit-in-context rows.

``EditCollator`` turns edit records (``compressors.incomes.data``) into what ``InComeSCompressor.forward``
distils on: the pool's edits (the batch's own, plus distractor edits from the training set up to a pool size
drawn per step from ``pool_sizes``), each row's query and answer as the student reads them after the pool, and
the same query and answer after the row's edit in the context as the frozen teacher reads them. Queries are the
edit's question, or with ``rephrase_fraction`` its rephrase, or with ``locality_fraction`` one of its unrelated
questions (the teacher reads the edit, as the paper, or with ``locality_teacher: base`` the question alone: the
pool must leave them alone). The composition is ``CompressedLM``'s (``ConversationLayout``): the teacher's row is
exactly the conversation of in-context editing, the student's the prompt after a memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from ctxzip.compressors import CompressedLM, Compressor
from ctxzip.compressors.conversation import ConversationLayout
from ctxzip.compressors.padding import left_pad, right_pad
from ctxzip.trainers.memory_recipe import RecipeData
from ctxzip.trainers.objectives import OBJECTIVES, build_target

from .compressor import InComeSConfig
from .data import edit_records
from .evaluation import evaluate_edits, markdown_table
from .script_args import EditScriptArguments


@dataclass
class EditCollator:
    """Edit records -> one InComeS distillation batch (see the module docstring)."""

    tokenizer: PreTrainedTokenizerBase
    distractors: list[str]  # edits a pool may be filled with (the training set's)
    pool_sizes: list[int]
    max_edit_tokens: int = 128
    max_target_tokens: int = 64
    locality_fraction: float = 0.25
    rephrase_fraction: float = 0.0
    seed: int = 0
    locality_teacher: str = "edit"  # base: an unrelated query's teacher reads it without the edit
    layout: ConversationLayout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = ConversationLayout(self.tokenizer)

    def rng(self, *texts: str) -> random.Random:
        """The random draws of a batch or a row are a function of its edits and the seed: a batch is the same
        whichever process or micro-batch reads it, and after a resume."""
        return random.Random("\x1f".join([str(self.seed), *texts]))

    def pool(self, rows: list[dict[str, Any]]) -> list[str]:
        """The batch's own edits (each once) and distractors up to a pool size drawn from ``pool_sizes``."""
        own = list(dict.fromkeys(r["edit"] for r in rows))
        rng = self.rng(*own)
        size = rng.choice(self.pool_sizes)
        taken = set(own)
        candidates = [e for e in rng.sample(self.distractors, min(len(self.distractors), size + len(own)))
                      if e not in taken]
        return own + candidates[:max(0, size - len(own))]

    def query(self, row: dict[str, Any]) -> tuple[str, str, bool]:
        """(question, answer, unrelated) the row asks: the rewrite, its rephrase, or one of its locality questions."""
        rng = self.rng(row["edit"], row["question"])
        draw = rng.random()
        if draw < self.locality_fraction and row["locality"]:
            item = rng.choice(row["locality"])
            return item["question"], item["answer"], True
        if draw < self.locality_fraction + self.rephrase_fraction:
            return row["rephrase"], row["answer"], False
        return row["question"], row["answer"], False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id or 0
        edits = [self.layout.encode(edit)[:self.max_edit_tokens] for edit in self.pool(rows)]
        context_ids, context_mask = left_pad(edits, pad)
        targets, teachers, offsets = [], [], []
        for row in rows:
            question, answer, unrelated = self.query(row)
            target = build_target(self.layout, {"question": question, "answer": answer}, self.max_target_tokens)
            if unrelated and self.locality_teacher == "base":  # the unedited conversation: what the pool must keep
                context = self.layout.prefix_ids
            else:  # in-context editing: the template prefix, then the edit
                context = self.layout.context_ids(row["edit"])
            targets.append(target)
            teachers.append(context + target.input_ids)
            offsets.append(len(context))
        input_ids, attention_mask = right_pad([t.input_ids for t in targets], pad)
        labels, _ = right_pad([t.labels for t in targets], -100)
        teacher_ids, teacher_mask = right_pad(teachers, pad)
        return {"context_ids": context_ids, "context_mask": context_mask, "input_ids": input_ids,
                "attention_mask": attention_mask, "labels": labels, "teacher_ids": teacher_ids,
                "teacher_mask": teacher_mask, "teacher_offsets": torch.tensor(offsets),
                "prompt_lengths": torch.tensor([t.prompt_length for t in targets]),
                "objective": torch.full((len(rows),), OBJECTIVES.index("sft"))}


def edit_data(args: EditScriptArguments, config: InComeSConfig) -> Any:
    """The ``DataBuilder`` of the InComeS recipe: edit records, the collator, the edit evaluation."""

    def build(tokenizer: PreTrainedTokenizerBase, seed: int) -> RecipeData:
        train = edit_records(args.edit_source, "train", args.num_train_edits, seed, args.edit_style)
        needed = max(args.num_eval_edits, max(args.eval_pool_sizes, default=1), 3)
        held_out = edit_records(args.edit_source, "test", needed, seed + 1, args.edit_style)
        collator = EditCollator(tokenizer, [r["edit"] for r in train], args.pool_sizes, config.max_context_tokens,
                                args.max_target_tokens, args.locality_fraction, args.rephrase_fraction, seed,
                                args.locality_teacher)

        def evaluate(final: Compressor, untrained: Compressor) -> list[dict[str, Any]]:
            before = CompressedLM(untrained.eval(), tokenizer)
            methods = {"InComeS (trained)": CompressedLM(final, tokenizer), "InComeS (untrained)": before}
            # the untrained compressor's plain base is the unedited model (train_mode upper trains the base's layers)
            summaries = evaluate_edits(methods, held_out, args.eval_pool_sizes, args.eval_queries,
                                       args.eval_max_new_tokens, unedited=before)
            print("\nheld-out edits (efficacy / generalisation / locality)\n" + markdown_table(summaries) + "\n")
            return [s.as_row() for s in summaries]

        return RecipeData(collator=collator, train_dataset=datasets.Dataset.from_list(train),
                          evaluate=evaluate if args.eval_queries > 0 else None,
                          reload_context=[r["edit"] for r in held_out[:3]], reload_prompt=held_out[0]["question"])

    return build
