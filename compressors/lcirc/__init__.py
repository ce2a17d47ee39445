"""LCIRC and QD-LCIRC: recurrent Perceiver compression read through gated cross-attention (arXiv 2502.06139).

``LCIRCConfig`` / ``LCIRCCompressor`` (``compressor_type="lcirc"``) and ``QDLCIRCCompressor`` (``qd_lcirc``),
``latents`` memories (``compressor``; what is and is not faithful to the paper is in its docstring), and the
recipe's ``LCIRCScriptArguments`` (``script_args``, imported only by the recipe: it needs TRL).
"""

from .compressor import LCIRCCompressor, LCIRCConfig, QDLCIRCCompressor

__all__ = ["LCIRCCompressor", "LCIRCConfig", "QDLCIRCCompressor"]
