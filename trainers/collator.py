"""Batches for memory compressors: left-padded contexts and right-padded decoder targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .objectives import OBJECTIVES, build_target, objective_of


@dataclass
class MemoryCollator:
    """Tokenize rows with ``context`` / ``question`` / ``answer`` into a compressor training batch.

    Contexts are left-padded (the compressor's segments are cut from the right, so padding stays in
    the first one); decoder targets are right-padded with labels -100 on padding.
    """

    tokenizer: PreTrainedTokenizerBase
    max_context_tokens: int = 4096
    max_target_tokens: int = 512

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id or 0
        contexts = [self.tokenizer(r["context"], add_special_tokens=False)["input_ids"][-self.max_context_tokens:]
                    for r in rows]
        targets = [build_target(self.tokenizer, r, self.max_target_tokens) for r in rows]
        width = max(len(c) for c in contexts)
        context_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        context_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(contexts):
            context_ids[i, width - len(ids):] = torch.tensor(ids)
            context_mask[i, width - len(ids):] = 1
        length = max(len(t.input_ids) for t in targets)
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, t in enumerate(targets):
            input_ids[i, : len(t.input_ids)] = torch.tensor(t.input_ids)
            attention_mask[i, : len(t.input_ids)] = 1
            labels[i, : len(t.labels)] = torch.tensor(t.labels)
        objective = torch.tensor([OBJECTIVES.index(objective_of(r)) for r in rows])
        return {"context_ids": context_ids, "context_mask": context_mask, "input_ids": input_ids,
                "attention_mask": attention_mask, "labels": labels, "objective": objective}
