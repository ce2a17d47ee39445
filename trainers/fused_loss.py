"""Fused linear cross-entropy (Liger-Kernel) for the LM losses of compressor training.

A training step of a memory compressor on a small model is dominated, in memory, by the logits:
SmolLM2's 49,152-token vocabulary makes ``[batch, tokens, 49152]`` logits (plus their float copy
and gradient) larger than every other activation of the step. Liger-Kernel's fused linear
cross-entropy computes the loss from the final hidden states and the LM head's weight chunk by
chunk, so the full logits never exist.

The pieces:
- ``hidden_states_as_logits(model)`` (``compressors.base``): while active, the LM head returns its
  input, so a forward that would return logits returns the final (normalized) hidden states instead;
  every decoder path of every compressor (``decoder_forward`` overrides included) works unchanged;
- ``per_example_lm_loss_from_hidden(hidden, head, labels, backend)``: the per-example mean
  next-token loss of ``compressors.base.per_example_lm_loss``, computed from hidden states, fused
  (``backend="liger"``) or by the plain head + cross-entropy (``backend="torch"``, the oracle);
- ``compressor_lm_loss(compressor, batch, fused=...)``: a compressor's training outputs (``loss``,
  ``per_example_loss``, ``ratio``) with the fused loss, through ``Compressor.forward(lm_loss=...)``.

Per-example losses (not one mean) are what ``MemoryCompressorTrainer`` weights by objective, so
Liger runs with ``reduction="none"``: its backward then recomputes each chunk's logits (one more
``hidden @ W.T`` per chunk, cheap next to the memory it saves).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Any

import torch
from torch import nn

from ctxzip.compressors.base import hidden_states_as_logits

BACKENDS = ("liger", "torch")


def liger_available() -> bool:
    """Whether ``liger_kernel`` can be imported (found without importing it)."""
    return importlib.util.find_spec("liger_kernel") is not None


def _head_weight(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The head's weight as the matmul will read it. Under autocast, a frozen fp32 weight would be
    re-cast to the autocast dtype for every chunk (autocast caches only casts of weights that need
    a gradient), so it is cast once here; a trained weight is passed as it is (it needs its grad)."""
    weight = head.weight
    device = hidden.device.type
    if not weight.requires_grad and torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        if weight.dtype != low and weight.dtype == torch.float32:
            weight = weight.to(low)
    return weight


def per_example_lm_loss_from_hidden(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                                    backend: str = "liger", chunk_mem_const: int | None = None,
                                    ) -> torch.Tensor:
    """Mean next-token cross-entropy per example over labelled positions, from final hidden states.

    The same quantity as ``compressors.base.per_example_lm_loss(head(hidden), labels)``: position
    ``t`` predicts ``labels[:, t + 1]``, labels of -100 carry no loss, an example without any label
    gets 0. ``backend="liger"`` never materializes the logits; ``"torch"`` does (the oracle).
    ``chunk_mem_const`` (liger only) scales how many tokens Liger turns into logits at once
    (default 1: about ``tokens x hidden`` logit elements at a time).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown fused-loss backend {backend!r}; expected one of {list(BACKENDS)}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [batch, tokens, hidden] and labels [batch, tokens]; got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    if hidden.shape[-1] != head.in_features:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the LM head's {head.in_features} "
                         "(were the logits passed instead of hidden states?)")
    shift_hidden, shift_labels = hidden[:, :-1], labels[:, 1:].to(hidden.device)
    batch, steps = shift_labels.shape
    flat_hidden = shift_hidden.reshape(-1, hidden.shape[-1])
    flat_labels = shift_labels.reshape(-1)
    if backend == "torch":
        logits = nn.functional.linear(flat_hidden, head.weight, head.bias).float()
        token_loss = nn.functional.cross_entropy(logits, flat_labels, ignore_index=-100, reduction="none")
    else:
        token_loss = _liger_token_loss(flat_hidden.contiguous(), _head_weight(head, hidden), flat_labels.contiguous(),
                                       head.bias, chunk_mem_const)
    token_loss = token_loss.view(batch, steps)
    counts = (shift_labels != -100).sum(-1).clamp(min=1)
    return token_loss.sum(-1) / counts


def _liger_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      bias: torch.Tensor | None, chunk_mem_const: int | None) -> torch.Tensor:
    """Per-token losses (0 where ignored) from Liger's fused linear cross-entropy."""
    if not liger_available():
        raise ImportError("the fused LM loss needs Liger-Kernel: `pip install liger-kernel` (it runs where "
                          "Triton runs: a GPU, or the CPU under TRITON_INTERPRET=1)")
    if hidden.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton has no CPU driver: its own error ("0 active drivers") names nothing a user set
        raise RuntimeError("the fused LM loss (--fused_lm_loss, Liger's Triton kernel) runs on a GPU, or on the "
                           "CPU only under TRITON_INTERPRET=1: pass --fused_lm_loss false to train on the CPU")
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    # Positional arguments of LigerFusedLinearCrossEntropyFunction.forward (liger-kernel 0.8):
    # input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
    # reduction, softcap, return_z_loss, accum_dtype, use_token_scaling, return_token_accuracy,
    # return_predicted_tokens, ce_impl, ce_mode[, chunk_mem_const].
    args: list[Any] = [hidden, weight, labels, bias, None, -100, 0.0, 0.0, "none", None, False, None, False,
                       False, False, None, None]
    if chunk_mem_const is not None:
        if "chunk_mem_const" not in inspect.signature(LigerFusedLinearCrossEntropyFunction.forward).parameters:
            raise ValueError("this liger-kernel version has no chunk_mem_const; leave it None")
        args.append(int(chunk_mem_const))
    loss = LigerFusedLinearCrossEntropyFunction.apply(*args)[0]
    return loss


def compressor_lm_loss(compressor: nn.Module, batch: dict[str, Any], fused: bool = True,
                       backend: str = "liger", chunk_mem_const: int | None = None) -> dict[str, Any]:
    """A memory compressor's training outputs (``loss``, ``per_example_loss``, ``ratio``) for ``batch``
    (the keys of ``MemoryCollator`` without ``objective``), with the LM loss fused when ``fused``.

    ``fused=False`` is exactly ``compressor(**batch)``; with ``fused``, ``Compressor.forward`` is called
    with the fused loss as its ``lm_loss``.
    """
    if not fused:
        return compressor(**batch)

    def lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
        return per_example_lm_loss_from_hidden(hidden, head, labels, backend, chunk_mem_const)

    return compressor(**batch, lm_loss=lm_loss)


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   fused: bool = True, backend: str = "liger", chunk_mem_const: int | None = None,
                   ) -> torch.Tensor:
    """Mean next-token loss of a plain causal LM (e.g. LoRA SFT), fused or by the model's own loss.

    The fused path weights every labelled token equally, as transformers' loss does.
    """
    if not fused:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    with hidden_states_as_logits(model) as head:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).logits
    per_example = per_example_lm_loss_from_hidden(hidden, head, labels, backend, chunk_mem_const)
    counts = (labels[:, 1:] != -100).sum(-1).to(per_example.dtype)
    return (per_example * counts).sum() / counts.sum().clamp(min=1)
