"""Per-module attention overrides through transformers' public ``AttentionInterface``.

Compressors that must change how some attention modules attend (read a latent cache with a fused
kernel, mask per-layer padding, capture the queries) do it here, never by replacing a module's
``forward`` or by reading a forward's keyword arguments (both change between transformers releases:
5.24 renamed the attention modules' ``past_key_values`` argument to ``cache``).

How: for a model whose attention implementation is ``sdpa`` (or ``eager``, ...), a function is
registered under ``ctxzip_<sdpa>`` with the same mask function as the original, and the model is
switched to it (``set_attn_implementation``) while at least one override is active. The function
calls the override registered for the calling module, or the original implementation. With no
override for a module, its attention is exactly the original's.

An override is ``fn(module, query, key, value, attention_mask, fallback, **kwargs) -> (out, weights)``
with the arguments of an ``AttentionInterface`` function (query ``[batch, heads, q_len, head_dim]``,
rotated; key / value as returned by the cache) plus ``fallback``, the original implementation.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

from .compat import attn_implementation

Override = Callable[..., tuple[torch.Tensor, Any]]
PREFIX = "ctxzip_"

# module -> stack of overrides (the innermost wins); weak keys: a dropped model frees its entries
_OVERRIDES: weakref.WeakKeyDictionary[nn.Module, list[Override]] = weakref.WeakKeyDictionary()
# model -> (original implementation name, number of active override contexts)
_SWITCHED: weakref.WeakKeyDictionary[nn.Module, list[Any]] = weakref.WeakKeyDictionary()


def implementation_of(model: PreTrainedModel) -> str:
    """The attention implementation the model runs, before any override of this module."""
    name = attn_implementation(model.config)
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def original_function(name: str) -> Callable[..., Any]:
    # transformers' modeling files use eager_attention_forward when the name is not registered
    return AttentionInterface().get_interface(name, eager_attention_forward)


def _dispatching_function(original: str) -> Callable[..., Any]:
    fallback = original_function(original)

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        stack = _OVERRIDES.get(module)
        if stack:
            return stack[-1](module, query, key, value, attention_mask, fallback, **kwargs)
        return fallback(module, query, key, value, attention_mask, **kwargs)

    return attention


def _register(original: str) -> str:
    name = PREFIX + original
    if name not in AttentionInterface():
        AttentionInterface.register(name, _dispatching_function(original))
        masks = AttentionMaskInterface()
        if original in masks:  # otherwise transformers builds no mask for it either
            AttentionMaskInterface.register(name, masks[original])
    return name


def base_model_of(model: nn.Module) -> PreTrainedModel:
    """The transformers model under PEFT / wrapper layers."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"attention overrides need a transformers PreTrainedModel, got {type(model).__name__}")
    return model


@contextlib.contextmanager
def overriding_attention(model: nn.Module, overrides: dict[nn.Module, Override]) -> Iterator[None]:
    """Inside: each module in ``overrides`` attends through its override (re-entrant, nestable)."""
    model = base_model_of(model)
    state = _SWITCHED.get(model)
    if state is None:
        original = implementation_of(model)
        model.set_attn_implementation(_register(original))
        state = _SWITCHED[model] = [original, 0]
    state[1] += 1
    for module, fn in overrides.items():
        _OVERRIDES.setdefault(module, []).append(fn)
    try:
        yield
    finally:
        for module, fn in overrides.items():
            stack = _OVERRIDES[module]
            stack.remove(fn)
            if not stack:
                del _OVERRIDES[module]
        state[1] -= 1
        if state[1] == 0:
            del _SWITCHED[model]
            model.set_attn_implementation(state[0])


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer (Llama-style ``model.layers[i].self_attn``)."""
    decoder = getattr(base_model_of(model), "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"expected a decoder with model.layers (Llama-style); got {type(model).__name__}")
    modules = [getattr(layer, "self_attn", None) for layer in layers]
    if any(module is None for module in modules):
        raise ValueError(f"expected every decoder layer to have self_attn (Llama-style); got {type(model).__name__}")
    return modules


class QueryCapture:
    """Captures the (rotated) queries of the last ``window`` positions of every layer during a forward.

    ``queries[layer]`` is ``[batch, q_heads, min(window, q_len), head_dim]``, exactly the queries the
    model attends with.
    """

    def __init__(self, model: nn.Module, window: int) -> None:
        self.window = window
        self.queries: dict[int, torch.Tensor] = {}
        modules = attention_modules(model)
        self._context = overriding_attention(
            model, {module: self._override(index) for index, module in enumerate(modules)})

    def _override(self, layer: int) -> Override:
        def capture(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Any, fallback: Callable[..., Any], **kwargs: Any) -> Any:
            self.queries[layer] = query[:, :, -self.window:].detach()
            return fallback(module, query, key, value, attention_mask, **kwargs)
        return capture

    def __enter__(self) -> QueryCapture:
        self._context.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)


def causal_mask(batch: int, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """``[batch, 1, q_len, kv_len]`` bool (True = attend): the queries are the last ``q_len`` positions."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    mask = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]
    return mask[None, None].expand(batch, 1, q_len, kv_len)


def block_keys(attention_mask: torch.Tensor | None, blocked: torch.Tensor, q_len: int) -> torch.Tensor:
    """``attention_mask`` (bool, additive float, or None = causal) with the keys where ``blocked``
    (``[batch, kv_len]`` bool) is True masked out, in the mask's own format (bool for None)."""
    batch, kv_len = blocked.shape
    if attention_mask is None:
        attention_mask = causal_mask(batch, q_len, kv_len, blocked.device)
    attention_mask = attention_mask[..., -kv_len:]
    keep = ~blocked[:, None, None, :]
    if attention_mask.dtype == torch.bool:
        return attention_mask & keep
    return attention_mask.masked_fill(~keep, torch.finfo(attention_mask.dtype).min)
