"""A ``transformers.Trainer`` for memory compressors (gist, soft prompts, recurrent compressors).

It reuses Trainer's loop, accelerate / DeepSpeed integration, logging and checkpointing, and only
changes what is specific to compressors: the weighted multi-objective loss, logging the achieved
compression ratio, checkpoints that hold only the trained tensors (not the frozen base model), and a
run that stops with an error when its loss is not finite (``FiniteLossMixin``).
"""

from __future__ import annotations

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


class MemoryCompressorTrainer(FiniteLossMixin, TrainedTensorsResume, Trainer):
    def __init__(self, *args: Any, objective_weights: dict[str, float] | None = None,
                 fused_lm_loss: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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
        outputs = model(**inputs, lm_loss=self.lm_loss) if self.lm_loss else model(**inputs)
        per_example = outputs["per_example_loss"]
        weights = self.objective_weights.to(per_example.device)[objective.to(per_example.device)]
        loss = (weights * per_example).sum() / weights.sum().clamp(min=1e-8)
        self._ratios.append(float(outputs["ratio"]))
        for name, value in outputs.get("metrics", {}).items():
            self._compressor_metrics.setdefault(name, []).append(float(value))
        for index, value in zip(objective.tolist(), per_example.detach().tolist()):
            self._objective_losses[OBJECTIVES[index]].append(value)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # every process logs here (Trainer gathers the loss just before)
            logs.update(self._window_metrics())
        super().log(logs, *args, **kwargs)

    def _window_metrics(self) -> dict[str, float]:
        """Mean compression ratio, per-objective losses and the compressor's own metrics since the last log,
        over every process."""
        window = {"compression_ratio": self._ratios, **self._compressor_metrics,
                  **{f"loss_{name}": values for name, values in self._objective_losses.items()}}
        means = means_over_processes(self.accelerator, window)
        self._ratios = []
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
