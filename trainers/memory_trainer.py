"""A ``transformers.Trainer`` for memory compressors (gist, soft prompts, recurrent compressors).

It reuses Trainer's loop, accelerate / DeepSpeed integration, logging and checkpointing, and only
changes what is specific to compressors: the weighted multi-objective loss (optionally plus a
distillation term from the full-context base), logging the achieved compression ratio, checkpoints that hold only the trained tensors (not the frozen base model), and a
run that stops with an error when its loss is not finite (``FiniteLossMixin``).
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from ctxzip.compressors.hub import load_exact
from ctxzip.compressors.io import atomic_path

from .compat import TrainedTensorsResume
from .distributed import means_over_processes, trainable_state
from .fused_loss import liger_available, per_example_lm_loss_from_hidden
from .guards import FiniteLossMixin
from .objectives import OBJECTIVES, validate_weights

TRAINABLE_NAME = "trainable.safetensors"
TEACHER_KEYS = ("teacher_ids", "teacher_mask", "teacher_labels")  # MemoryCollator(with_teacher=True)'s


class MemoryCompressorTrainer(FiniteLossMixin, TrainedTensorsResume, Trainer):
    """Trains a memory compressor through its ``forward``. Each example's loss is its LM loss, plus
    ``distillation_weight`` times its ``per_example_kl`` (KL(full-context base || decoder reading the memory) on
    its labelled tokens: the batches must carry ``MemoryCollator(with_teacher=True)``'s teacher), then weighted
    by its objective. ``loss_<objective>`` logs the LM losses, ``loss_distillation`` the mean KL."""

    def __init__(self, *args: Any, objective_weights: dict[str, float] | None = None,
                 fused_lm_loss: bool = False, distillation_weight: float = 0.0, **kwargs: Any) -> None:
        if not (math.isfinite(distillation_weight) and distillation_weight >= 0):
            raise ValueError(f"distillation_weight must be a finite number >= 0, got {distillation_weight}")
        super().__init__(*args, **kwargs)
        self.distillation_weight = float(distillation_weight)
        self._distillation: list[float] = []
        # Liger's fused linear cross-entropy: the decoder's [batch, tokens, vocab] logits never exist.
        self.lm_loss = partial(per_example_lm_loss_from_hidden, backend="liger") if fused_lm_loss else None
        if fused_lm_loss and not liger_available():
            raise ImportError("fused_lm_loss needs Liger-Kernel (pip install liger-kernel; it is in the lock)")
        # compute_loss reduces each batch itself and ignores num_items_in_batch; Trainer must then divide
        # the loss by the gradient accumulation steps (it does not when the model's forward takes **kwargs).
        self.model_accepts_loss_kwargs = False
        weights = validate_weights(objective_weights or {"sft": 1.0})
        self.objective_weights = torch.tensor([weights[name] for name in OBJECTIVES])
        self._ratios: list[float] = []
        self._compressor_metrics: dict[str, list[float]] = {}  # what the compressor reports per step (e.g. gate values)
        self._objective_losses: dict[str, list[float]] = {name: [] for name in OBJECTIVES}

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        objective = inputs.pop("objective")
        inputs = self._teacher_inputs(inputs)
        outputs = model(**inputs, lm_loss=self.lm_loss) if self.lm_loss else model(**inputs)
        per_example = outputs["per_example_loss"]
        lm_losses = per_example.detach().tolist()
        if self.distillation_weight > 0:
            per_example = per_example + self.distillation_weight * self._kl(outputs)
        weights = self.objective_weights.to(per_example.device)[objective.to(per_example.device)]
        loss = (weights * per_example).sum() / weights.sum().clamp(min=1e-8)
        self._ratios.append(float(outputs["ratio"]))
        for name, value in outputs.get("metrics", {}).items():
            self._compressor_metrics.setdefault(name, []).append(float(value))
        for index, value in zip(objective.tolist(), lm_losses):
            self._objective_losses[OBJECTIVES[index]].append(value)
        return (loss, outputs) if return_outputs else loss

    def _teacher_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Check that a distilling run's batch has the teacher; without distillation, drop a teacher a
        ``with_teacher`` collator made (a method's own teacher tensors, without ``teacher_labels``, stay)."""
        if self.distillation_weight > 0:
            missing = [key for key in TEACHER_KEYS if key not in inputs]
            if missing:
                raise ValueError(f"distillation_weight={self.distillation_weight} needs the full-context teacher in "
                                 f"every batch, but {missing} are missing: collate with "
                                 "MemoryCollator(..., with_teacher=True)")
        elif "teacher_labels" in inputs:
            inputs = {k: v for k, v in inputs.items() if k not in TEACHER_KEYS}
        return inputs

    def _kl(self, outputs: dict[str, Any]) -> torch.Tensor:
        """The forward's per-example distillation term, logged (a forward that makes none is an error)."""
        kl = outputs.get("per_example_kl")
        if kl is None:
            name = type(self.accelerator.unwrap_model(self.model)).__name__
            raise ValueError(f"distillation_weight > 0, but {name}.forward returned no per_example_kl: this method "
                             "trains through its own forward and cannot distil from the full-context base")
        self._distillation.extend(kl.detach().float().tolist())
        return kl

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # every process logs here (Trainer gathers the loss just before)
            logs.update(self._window_metrics())
        super().log(logs, *args, **kwargs)

    def _window_metrics(self) -> dict[str, float]:
        """Mean compression ratio, per-objective losses and the compressor's own metrics since the last log,
        over every process."""
        window = {"compression_ratio": self._ratios, **self._compressor_metrics,
                  **{f"loss_{name}": values for name, values in self._objective_losses.items()}}
        if self.distillation_weight > 0:  # every process alike: the reduction is a collective
            window["loss_distillation"] = self._distillation
        means = means_over_processes(self.accelerator, window)
        self._ratios, self._distillation = [], []
        self._compressor_metrics = {name: [] for name in self._compressor_metrics}
        self._objective_losses = {name: [] for name in OBJECTIVES}
        return {name: round(value, 3 if name == "compression_ratio" else 4) for name, value in means.items()}

    # ----- checkpoints: only what trains ----------------------------------------------------
    def _trainable_names(self) -> set[str]:
        model = self.accelerator.unwrap_model(self.model)
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the trained tensors (gathered from every process under ZeRO-3: call it on all) and the
        tokenizer; DeepSpeed's optimizer checkpoint is written beside it by Trainer itself."""
        output_dir = output_dir or self.args.output_dir
        tensors = self.trained_state_dict()
        if not self.args.should_save:
            return
        with atomic_path(self.checkpoint_weights_file(output_dir)) as tmp:  # never half a weight file
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def checkpoint_weights_file(self, folder: str | os.PathLike) -> Path:
        return Path(folder) / TRAINABLE_NAME

    def load_trained_checkpoint(self, folder: str | os.PathLike) -> None:
        """Load a checkpoint's trained tensors (a resumed run without DeepSpeed; DeepSpeed resumes from its
        own checkpoint): exactly the trainable tensors, or an error naming what differs."""
        path = self.checkpoint_weights_file(folder)
        model = self.accelerator.unwrap_model(self.model)
        load_exact(model, load_file(str(path)), self._trainable_names(), str(path))

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, gathered from every process when sharded (ZeRO-3): a collective."""
        return trainable_state(self.accelerator.unwrap_model(self.model))


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` whose trainer state was written (a kill mid-save leaves none)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()
            and p.name.split("-")[-1].isdigit()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None
