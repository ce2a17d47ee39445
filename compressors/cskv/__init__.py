"""CSKV: low-rank K/V channel shrinking with a bi-branch cache (arXiv 2409.10593).

``CSKVConfig`` / ``CSKVCompressor`` (``compressor_type="cskv"``, ``latent_kv`` memories), the
bi-branch ``CSKVCache``, the PyTorch reference (``reference``), the fused Triton decode kernel
(``kernel``, imported only where it runs) and the fused CPU kernels of the post-RoPE decode step (``cpu_kernel``,
compiled on first use). The recipe's pieces, imported only by it (they need the
trainers and eval packages): ``trainer`` (``CSKVTrainer``, its text data and collator), ``evaluation``
(held-out perplexity and KV bytes) and ``script_args`` (``CSKVScriptArguments``).
"""

from .cache import CSKVCache
from .compressor import CSKVCompressor
from .config import CSKVConfig
from .quant import LatentStore

__all__ = ["CSKVCache", "CSKVCompressor", "CSKVConfig", "LatentStore"]
