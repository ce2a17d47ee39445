"""Training-free compressors: parameter-free ``Compressor``s that produce a real, smaller memory."""

from .chunkkv import ChunkKV, ChunkKVConfig
from .full_context import FullContext, FullContextConfig
from .pyramidkv import PyramidKV, PyramidKVConfig
from .selective_context import SelectiveContext, SelectiveContextConfig
from .snapkv import KVSelection, KVSelectionConfig, SnapKV
from .streaming_llm import StreamingLLM, StreamingLLMConfig
from .truncation import Truncation, TruncationConfig

#: Baselines ``python -m eval --compressor <name>`` accepts (each takes a ``ratio``).
BASELINES = ("truncation", "streaming_llm", "snapkv", "chunkkv", "pyramidkv", "selective_context")

__all__ = [
    "BASELINES", "ChunkKV", "ChunkKVConfig", "FullContext", "FullContextConfig", "KVSelection",
    "KVSelectionConfig", "PyramidKV", "PyramidKVConfig", "SelectiveContext",
    "SelectiveContextConfig", "SnapKV", "StreamingLLM", "StreamingLLMConfig",
    "Truncation", "TruncationConfig",
]
