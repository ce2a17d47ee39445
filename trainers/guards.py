"""Stop a run whose training loss is not finite, on every process at once, with a clear error.

Why not read the logged loss: Trainer's ``logging_nan_inf_filter`` (on by default) replaces a NaN or
infinite step loss by the window's mean, so a run that trains on nothing but NaN logs ``loss 0`` and
finishes with exit status 0. The guard sees each micro-batch's loss as ``training_step`` returns it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run stops rather than train on it."""


class FiniteLossGuard(TrainerCallback):
    """Counts non-finite micro-batch losses (on the device, no host sync) and raises at the end of the
    optimizer step that saw one, before that step can be checkpointed.

    Under DDP / DeepSpeed the count is summed over processes first, so that every process raises
    together: one process leaving alone would leave the others waiting in a collective.
    """

    def __init__(self) -> None:
        self._bad: torch.Tensor | None = None
        self._micro_batches = 0

    def observe(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).sum()
        self._bad = bad if self._bad is None else self._bad + bad
        self._micro_batches += 1

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self._bad is None:
            return
        bad, seen = self._bad, self._micro_batches
        self._bad, self._micro_batches = None, 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad)  # every process reaches this point at every optimizer step
        if int(bad):
            raise NonFiniteLossError(
                f"the training loss is not finite (NaN or inf) at step {state.global_step}: {int(bad)} micro-batch "
                f"loss(es) of the {seen} per process of this step, summed over processes. The run stops instead "
                "of training on it (no checkpoint of this step is written). Usual causes: a learning rate too "
                "high, fp16 overflow (try bf16 or fp32), a batch with no target tokens, or, under DeepSpeed "
                "ZeRO-3, a parameter read outside its module's forward (an empty partition).")


class FiniteLossMixin:
    """Mix into a ``transformers.Trainer`` (or TRL trainer) subclass, before the trainer class: every
    training loss goes through a ``FiniteLossGuard`` registered as the trainer's callback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_guard = FiniteLossGuard()
        self.add_callback(self.loss_guard)  # type: ignore[attr-defined]

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        self.loss_guard.observe(loss)
        return loss
