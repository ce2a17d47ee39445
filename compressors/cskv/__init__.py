"""CSKV: low-rank K/V channel shrinking with a bi-branch cache (arXiv 2409.10593).

``CSKVConfig`` / ``CSKVCompressor`` (``compressor_type="cskv"``, ``latent_kv`` memories), the
bi-branch ``CSKVCache``, the PyTorch reference (``reference``) and the fused Triton decode kernel
(``kernel``, imported only where it runs).
"""

from .cache import CSKVCache
from .compressor import CSKVCompressor
from .config import CSKVConfig
from .quant import LatentStore

__all__ = ["CSKVCache", "CSKVCompressor", "CSKVConfig", "LatentStore"]
