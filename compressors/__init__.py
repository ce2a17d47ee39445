"""ctxzip's library: memories, compressors, the shared inference wrapper, base models and hub I/O."""

from ctxzip import __version__  # noqa: F401  (one version, the distribution's)

from . import baselines  # noqa: F401  (registers the training-free compressors)
from .base import COMPRESSORS, Compressor, CompressorConfig, compressor_class, register_compressor
from .color import ColorCompressor, ColorConfig  # noqa: F401  (registers the CoLoR compressor)
from .cskv import CSKVCompressor, CSKVConfig  # noqa: F401  (registers the cskv compressor)
from .errors import (
    BaseModelMismatchError,
    ContextTooLongError,
    CorruptArtifactError,
    CtxzipError,
    EmptyInputError,
    UnknownCompressorError,
    UnsupportedModelError,
)
from .gist import GistCompressor, GistConfig
from .hub import load_compressor, save_compressor
from .incomes import InComeSCompressor, InComeSConfig
from .lcirc import LCIRCCompressor, LCIRCConfig, QDLCIRCCompressor
from .memory import Memory
from .models import EMBEDDED_MODEL, TINY_MODEL, load_base
from .rcc import RCCCompressor, RCCConfig
from .shipped import shipped_names
from .softpromptcomp import SoftPromptCompCompressor, SoftPromptCompConfig
from .wrapper import CompressedLM

__all__ = [
    "COMPRESSORS", "EMBEDDED_MODEL", "TINY_MODEL", "BaseModelMismatchError", "CompressedLM", "Compressor",
    "CompressorConfig", "ContextTooLongError", "CorruptArtifactError", "CtxzipError", "EmptyInputError",
    "GistCompressor", "GistConfig", "InComeSCompressor", "InComeSConfig", "LCIRCCompressor", "LCIRCConfig", "Memory", "QDLCIRCCompressor", "RCCCompressor",
    "RCCConfig", "SoftPromptCompCompressor", "SoftPromptCompConfig", "UnknownCompressorError", "UnsupportedModelError", "compressor_class", "load_base", "load_compressor", "register_compressor",
    "save_compressor", "shipped_names",
]
