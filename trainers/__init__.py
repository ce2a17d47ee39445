"""Trainers and training objectives for ctxzip compressors."""

from .collator import MemoryCollator
from .guards import FiniteLossGuard, FiniteLossMixin, NonFiniteLossError
from .memory_trainer import MemoryCompressorTrainer, last_complete_checkpoint
from .objectives import OBJECTIVES

__all__ = ["OBJECTIVES", "FiniteLossGuard", "FiniteLossMixin", "MemoryCollator", "MemoryCompressorTrainer",
           "NonFiniteLossError", "last_complete_checkpoint"]
