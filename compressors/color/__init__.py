"""CoLoR: passages rewritten shorter by an LM trained with length-penalised ORPO / DPO (arXiv 2412.18232).

``ColorConfig`` / ``ColorCompressor`` (``compressor_type="color"``, ``text`` memories) are all this
package's import brings (so ``import ctxzip.compressors`` registers the compressor without TRL). The
rest is imported where it is used, by ``recipes/color_dpo.py`` and the tests:

- ``data``: the retrieval corpora and the cached, resumable stages (candidates, reader labels,
  preference pairs);
- ``pipeline``: the untrained writer and the data stages run end to end;
- ``trainer``: the length-penalised losses, ``ColorDPOConfig`` and ``ColorDPOTrainer`` (TRL);
- ``script_args``: ``ColorScriptArguments``, the recipe's data / reader / evaluation arguments;
- ``evaluation``: the LM and dense readers, recall@k / MRR, and the held-out report.
"""

from .compressor import ColorCompressor
from .config import ColorConfig

__all__ = ["ColorCompressor", "ColorConfig"]
