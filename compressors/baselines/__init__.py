"""Training-free compressors: parameter-free ``Compressor``s that produce a real, smaller memory."""

from .chunkkv import ChunkKV, ChunkKVConfig
from .ehpc import EHPC, EHPCConfig
from .full_context import FullContext, FullContextConfig
from .pyramidkv import PyramidKV, PyramidKVConfig
from .qfilters import QFilters, QFiltersConfig
from .selection import KVSelection, KVSelectionConfig, PrefillSelection
from .selective_context import SelectiveContext, SelectiveContextConfig
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM, StreamingLLMConfig
from .truncation import Truncation, TruncationConfig

#: Baselines ``python -m ctxzip.eval --compressor <name>`` accepts: each takes a ``ratio``, except the full context
#: (every token kept: the ceiling the runner adds beside the others).
BASELINES = ("full_context", "truncation", "streaming_llm", "snapkv", "chunkkv", "pyramidkv", "qfilters",
             "selective_context", "ehpc")

__all__ = [
    "BASELINES", "EHPC", "ChunkKV", "ChunkKVConfig", "EHPCConfig", "FullContext", "FullContextConfig", "KVSelection",
    "KVSelectionConfig", "PrefillSelection", "PyramidKV", "PyramidKVConfig", "QFilters", "QFiltersConfig",
    "SelectiveContext", "SelectiveContextConfig", "SnapKV", "StreamingLLM", "StreamingLLMConfig",
    "Truncation", "TruncationConfig",
]
