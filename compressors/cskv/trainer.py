"""Layer-wise K/V reconstruction training for CSKV (a ``transformers.Trainer``).

The loss is the compressor's own ``forward``: for every layer, the MSE between the frozen base
model's keys / values and their low-rank reconstructions from the same inputs, summed over layers.
Only the factors train. The trainer reuses ``MemoryCompressorTrainer`` for everything that is not
the loss: checkpoints that hold only the trained tensors (atomic), resume, and gathering the
trained state under DeepSpeed ZeRO-3, so it runs under ``accelerate launch`` like every recipe.
Its data: running texts of a text source (``build_text_dataset``), batched as bare tokens
(``TokenChunkCollator``), a few of them for ASVD calibration (``calibration_batches``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from ctxzip.data import build_task
from ctxzip.trainers.distributed import means_over_processes
from ctxzip.trainers.memory_trainer import MemoryCompressorTrainer


@dataclass
class TokenChunkCollator:
    """Rows with a ``text`` column -> right-padded ``input_ids`` / ``attention_mask`` of at most ``max_tokens``.

    Bare text, not the conversation layout the other recipes train in: CSKV's objective reconstructs each
    layer's keys/values token by token, whatever the text is, and at inference the template's tokens are
    compressed like any other (its memory is the whole conversation prefix's cache)."""

    tokenizer: PreTrainedTokenizerBase
    max_tokens: int = 512

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id or 0
        ids = [self.tokenizer(r["text"], add_special_tokens=False)["input_ids"][: self.max_tokens] for r in rows]
        if not any(ids):
            raise ValueError("every text of the batch is empty")
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def build_text_dataset(tokenizer: PreTrainedTokenizerBase, num_samples: int, tokens: int, seed: int,
                       split: str = "train", source: str = "pydoc") -> datasets.Dataset:
    """``num_samples`` running texts of about ``tokens`` tokens (column ``text``) from a text source."""
    rows = build_task("autoencoding", tokenizer, num_samples=num_samples, context_tokens=tokens, seed=seed,
                      split=split, source=source)
    return rows.select_columns(["context"]).rename_column("context", "text")


def calibration_batches(dataset: datasets.Dataset, collator: TokenChunkCollator, batch_size: int = 4,
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask)`` batches of a text dataset (ASVD calibration)."""
    out = []
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        out.append((batch["input_ids"], batch["attention_mask"]))
    return out


class CSKVTrainer(MemoryCompressorTrainer):
    """Trains a ``CSKVCompressor``'s factors by layer-wise K/V reconstruction (MSE)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mse: dict[str, list[float]] = {"key_mse": [], "value_mse": []}

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        for name in self._mse:
            self._mse[name].append(float(outputs[name]))
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # every process logs here: the means are over all of them, like the loss
            logs.update({name: round(v, 6) for name, v in means_over_processes(self.accelerator, self._mse).items()})
            self._mse = {name: [] for name in self._mse}
        super().log(logs, *args, **kwargs)
