"""Per-module attention overrides through transformers' public ``AttentionInterface``.

Compressors that must change how some attention modules attend (read a latent cache with a fused
kernel, mask per-layer padding, capture the queries) do it here, never by replacing a module's
``forward`` or by reading a forward's keyword arguments (both change between transformers releases:
5.24 renamed the attention modules' ``past_key_values`` argument to ``cache``).

How: for a model whose attention implementation is ``sdpa`` (or ``eager``, ...), a function is
registered under ``ctxzip_<sdpa>`` with the same mask function as the original, and the model is
switched to it (``set_attn_implementation``) while at least one override is active. The function
calls the override registered for the calling module, or the original implementation (for ``eager``,
the calling module's own ``eager_attention_forward``: Gemma2's soft-caps its logits). With no
override for a module, its attention is exactly the original's, on every family.

An override is ``fn(module, query, key, value, attention_mask, fallback, **kwargs) -> (out, weights)``
with the arguments of an ``AttentionInterface`` function (query ``[batch, heads, q_len, head_dim]``,
rotated; key / value as returned by the cache) plus ``fallback``, the original implementation.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

from .compat import attn_implementation
from .errors import UnsupportedModelError

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


def original_function(name: str, module: nn.Module | None = None) -> Callable[..., Any]:
    """The attention function ``module`` runs under the implementation ``name``: the registered one, or, for a name
    not registered (``eager``), the ``eager_attention_forward`` of the module's own modeling file, which is what
    transformers' modeling code calls then (Gemma2's soft-caps the logits; Llama's for a module without one)."""
    return AttentionInterface().get_interface(name, _own_eager(type(module)) if module is not None
                                              else eager_attention_forward)


@functools.cache
def _own_eager(cls: type) -> Callable[..., Any]:
    return getattr(sys.modules.get(cls.__module__), "eager_attention_forward", eager_attention_forward)


def _dispatching_function(original: str) -> Callable[..., Any]:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        fallback = original_function(original, module)
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


def model_family(model: nn.Module) -> str:
    """The base model's family: its config's ``model_type`` (``llama``, ``qwen3``, ``phi3``, ...)."""
    config = base_model_of(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(text.model_type)


def unsupported(method: str, model: nn.Module, reason: str) -> UnsupportedModelError:
    """The error a method raises for a base model family it cannot run on: names the method, the family and why."""
    return UnsupportedModelError(f"{method} does not support {model_family(model)} models "
                                 f"({type(base_model_of(model)).__name__}): {reason}")


def head_counts(module: nn.Module) -> tuple[int, int, int]:
    """``(heads, kv_heads, head_dim)`` of an attention module, from its config."""
    config = module.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(module, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def key_projection(module: nn.Module, method: str, model: nn.Module,
                   ) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The linear layer that computes an attention module's keys, and how to take the keys out of its output
    (``[..., kv_heads * head_dim]``): ``k_proj`` as it is, or the key part of a fused ``qkv_proj`` (Phi3: the
    output is the queries, then the keys, then the values, split by the config's head counts). Raises
    ``unsupported(method, model, ...)`` for a module with neither."""
    if isinstance(getattr(module, "k_proj", None), nn.Module):
        return module.k_proj, lambda output: output
    if isinstance(getattr(module, "qkv_proj", None), nn.Module):
        heads, kv_heads, head_dim = head_counts(module)
        start, end = heads * head_dim, (heads + kv_heads) * head_dim
        return module.qkv_proj, lambda output: output[..., start:end]
    raise unsupported(method, model, f"its attention ({type(module).__name__}) has neither k_proj nor a fused "
                                     "qkv_proj to read keys from")


def norm_keys(module: nn.Module, keys: torch.Tensor, method: str, model: nn.Module) -> torch.Tensor:
    """``keys`` ``[..., kv_heads * head_dim]`` (a key projection's output) as the module feeds them to rotary
    embedding: ``[..., kv_heads, head_dim]``, through its ``k_norm`` when it has one, over each head (Qwen3,
    Gemma3) or over all heads at once (OLMo2), told apart by the norm's weight size."""
    _, kv_heads, head_dim = head_counts(module)
    norm = getattr(module, "k_norm", None)
    if norm is None:
        return keys.unflatten(-1, (kv_heads, head_dim))
    weight = getattr(norm, "weight", None)
    size = tuple(getattr(weight, "ds_shape", getattr(weight, "shape", (None,))))[-1]  # (ZeRO-3: the whole shape)
    if size == head_dim:
        return norm(keys.unflatten(-1, (kv_heads, head_dim)))
    if size == kv_heads * head_dim:
        return norm(keys).unflatten(-1, (kv_heads, head_dim))
    raise unsupported(method, model, f"its k_norm ({type(norm).__name__}) normalizes {size} channels, neither a "
                                     f"head ({head_dim}) nor all key heads ({kv_heads * head_dim})")


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
