"""InComeS: edits compressed into gist key/value pools, read through a selection branch (arXiv 2505.22156).

``InComeSConfig`` / ``InComeSCompressor`` (``compressor_type="incomes"``, ``pool`` memories; what is and is
not faithful to the paper is in ``compressor``'s docstring). The rest of the method, imported only where it
is used (the recipe, ``python -m ctxzip.eval --tasks edits``): ``data`` (edit records: the offline
counterfactual generator and the zsRE / CounterFact loaders), ``trainer`` (``EditCollator``, the recipe's
``edit_data``), ``evaluation`` (efficacy, generalisation and locality per pool size: ``evaluate_edits``,
``run_edit_eval``) and ``script_args`` (``EditScriptArguments``).
"""

from ..base import register_eval_task
from .compressor import InComeSCompressor, InComeSConfig

register_eval_task("edits", "ctxzip.compressors.incomes.evaluation")

__all__ = ["InComeSCompressor", "InComeSConfig"]
