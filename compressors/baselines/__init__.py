"""Training-free compressors: parameter-free ``Compressor``s that produce a real, smaller memory."""

from .full_context import FullContext, FullContextConfig
from .truncation import Truncation, TruncationConfig

__all__ = ["FullContext", "FullContextConfig", "Truncation", "TruncationConfig"]
