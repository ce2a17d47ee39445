"""Trainers and training objectives for ctxzip compressors."""

from .collator import MemoryCollator
from .memory_trainer import MemoryCompressorTrainer, last_complete_checkpoint
from .objectives import OBJECTIVES

__all__ = ["OBJECTIVES", "MemoryCollator", "MemoryCompressorTrainer", "last_complete_checkpoint"]
