"""The only place where ctxzip overrides private (underscore) methods of transformers or TRL.

Each override exists because the library has no public extension point for it; each is listed in
``PRIVATE_HOOKS`` with the signature it was written against, and ``tests/test_trainer_compat.py`` fails
with a message naming the library version when an installed version changes one of them.

- ``Trainer._load_from_checkpoint``: the only place where a resumed run (without DeepSpeed, which
  resumes from its own checkpoint) loads model weights. Compressor checkpoints hold only the trained
  tensors (``trainable.safetensors``, written through the public ``save_model``), a format the
  default loader refuses ("Can't find a valid checkpoint").
- ``DPOTrainer._prepare_dataset``: TRL tokenizes every preference dataset from text; pre-tokenized
  preference rows (``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, e.g. the exact token ids a policy
  generated) must be used as they are, and re-tokenizing their decoded text does not give them back.
  TRL 1.16 skips this step only for vision datasets, with no option to skip it otherwise.

Everything else (losses, saving, logging, DeepSpeed state) goes through public APIs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

# Versions these overrides were written for and checked with (tests/test_trainer_compat.py).
WRITTEN_FOR = {"transformers": ("5.17.0", "5.24.0"), "trl": ("1.16.0",)}


@dataclass(frozen=True)
class PrivateHook:
    library: str
    owner: str  # "module:Class"
    method: str
    parameters: tuple[str, ...]

    def problem(self) -> str | None:
        """Why the installed library no longer offers this hook as written, or None when it does."""
        import importlib
        from importlib.metadata import version

        module_name, class_name = self.owner.split(":")
        installed = version(self.library)
        where = f"{class_name}.{self.method}{self.parameters}"
        written = " / ".join(WRITTEN_FOR[self.library])
        function = getattr(getattr(importlib.import_module(module_name), class_name), self.method, None)
        if function is None:
            got = "it no longer exists"
        else:
            parameters = tuple(inspect.signature(function).parameters)
            if parameters == self.parameters:
                return None
            got = f"its parameters are now {parameters}"
        return (f"{self.library} {installed}: trainers/compat.py overrides the private {where}, written for "
                f"{self.library} {written}, but {got}. Update the override in trainers/compat.py (and "
                "WRITTEN_FOR) to this version.")


PRIVATE_HOOKS = (
    PrivateHook("transformers", "transformers:Trainer", "_load_from_checkpoint",
                ("self", "resume_from_checkpoint", "model")),
    PrivateHook("trl", "trl:DPOTrainer", "_prepare_dataset",
                ("self", "dataset", "processing_class", "args", "dataset_name")),
)


def private_hook_problems() -> list[str]:
    """One message per private hook the installed libraries changed; empty when all still fit."""
    return [p for p in (hook.problem() for hook in PRIVATE_HOOKS) if p]


class TrainedTensorsResume:
    """Mix into a ``Trainer`` subclass that defines ``checkpoint_weights_file(folder) -> Path`` and
    ``load_trained_checkpoint(folder)``: a resumed run loads those weights instead of a full model's."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self.checkpoint_weights_file(resume_from_checkpoint).is_file():  # type: ignore[attr-defined]
            self.load_trained_checkpoint(resume_from_checkpoint)  # type: ignore[attr-defined]
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]


class PretokenizedPreferences:
    """Mix into a ``DPOTrainer`` subclass that defines ``prepare_pretokenized(dataset, args)``: rows that
    carry ``prompt_ids`` / ``chosen_ids`` go there instead of TRL's tokenization."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        columns = getattr(dataset, "column_names", None) or []
        if "prompt_ids" in columns and "chosen_ids" in columns:
            return self.prepare_pretokenized(dataset, args)  # type: ignore[attr-defined]
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)  # type: ignore[misc]
