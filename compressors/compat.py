"""The one place that knows names transformers changed between the releases ctxzip supports.

Supported: transformers 5.17 (the floor: what the GPU machines have) to 5.24 (the lock).
- The cache argument of every model forward (and the field of its outputs) is ``past_key_values``
  up to 5.2x and ``cache`` from the release that renamed it (5.24 warns on the old name, which
  goes away in 5.40). Callers pass ``**with_cache(cache)`` and read ``cache_of(outputs)``.
- The attention implementation a model runs has no public getter: ``config._attn_implementation``
  is what transformers' own modeling files and its AttentionInterface guide read.
``tests/test_compat.py`` checks both facts against the installed release and names the versions
they were written for.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

WRITTEN_FOR = ("5.17.0", "5.24.0")


def _cache_name() -> str:
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    for name in ("cache", "past_key_values"):
        if name in fields:
            return name
    raise ImportError(
        f"this transformers release names the cache field of CausalLMOutputWithPast neither 'cache' nor "
        f"'past_key_values' ({sorted(fields)}); ctxzip was written for transformers {WRITTEN_FOR}")


CACHE_ARGUMENT = _cache_name()


def with_cache(cache: Any) -> dict[str, Any]:
    """Keyword arguments that pass ``cache`` to a transformers model's forward."""
    return {CACHE_ARGUMENT: cache}


def cache_of(outputs: Any) -> Any:
    """The cache a transformers model's forward returned."""
    return getattr(outputs, CACHE_ARGUMENT)


def attn_implementation(config: PretrainedConfig) -> str:
    """The attention implementation (``sdpa``, ``eager``, a registered name) a model config selects."""
    return str(config._attn_implementation)
