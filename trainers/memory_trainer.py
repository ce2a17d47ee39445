"""A ``transformers.Trainer`` for memory compressors (gist, soft prompts, recurrent compressors).

It reuses Trainer's loop, accelerate / DeepSpeed integration, logging and checkpointing, and only
changes what is specific to compressors: the weighted multi-objective loss, logging the achieved
compression ratio, and checkpoints that hold only the trained tensors (not the frozen base model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from .objectives import OBJECTIVES, validate_weights

TRAINABLE_NAME = "trainable.safetensors"


class MemoryCompressorTrainer(Trainer):
    def __init__(self, *args: Any, objective_weights: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        weights = validate_weights(objective_weights or {"sft": 1.0})
        self.objective_weights = torch.tensor([weights[name] for name in OBJECTIVES])
        self._ratios: list[float] = []
        self._objective_losses: dict[str, list[float]] = {name: [] for name in OBJECTIVES}

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        objective = inputs.pop("objective")
        outputs = model(**inputs)
        per_example = outputs["per_example_loss"]
        weights = self.objective_weights.to(per_example.device)[objective.to(per_example.device)]
        loss = (weights * per_example).sum() / weights.sum().clamp(min=1e-8)
        self._ratios.append(float(outputs["ratio"]))
        for index, value in zip(objective.tolist(), per_example.detach().tolist()):
            self._objective_losses[OBJECTIVES[index]].append(value)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._ratios:
            logs["compression_ratio"] = round(sum(self._ratios) / len(self._ratios), 3)
            for name, values in self._objective_losses.items():
                if values:
                    logs[f"loss_{name}"] = round(sum(values) / len(values), 4)
            self._ratios.clear()
            self._objective_losses = {name: [] for name in OBJECTIVES}
        super().log(logs, *args, **kwargs)

    # ----- checkpoints: only what trains ----------------------------------------------------
    def _trainable_names(self) -> set[str]:
        model = self.accelerator.unwrap_model(self.model)
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        names = self._trainable_names()
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k in names}
        tmp = Path(output_dir) / f".{TRAINABLE_NAME}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, Path(output_dir) / TRAINABLE_NAME)  # atomic: never half a weight file
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        path = Path(resume_from_checkpoint) / TRAINABLE_NAME
        if not path.is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.accelerator.unwrap_model(model or self.model)
        tensors = load_file(str(path))
        missing = self._trainable_names() - set(tensors)
        if missing:
            raise ValueError(f"checkpoint {resume_from_checkpoint} lacks trained tensors {sorted(missing)[:5]}")
        model.load_state_dict(tensors, strict=False)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The full-precision trained tensors, gathered from every process when sharded (ZeRO-3)."""
        names = self._trainable_names()
        state = self.accelerator.get_state_dict(self.deepspeed if self.is_deepspeed_enabled else self.model)
        return {k: v for k, v in (state or {}).items() if k in names}


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` whose trainer state was written (a kill mid-save leaves none)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()
            and p.name.split("-")[-1].isdigit()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None
