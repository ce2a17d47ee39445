"""Generation that starts from a Memory, through transformers' own ``generate``.

The decoder reads the memory and every prompt token but the last (``Compressor.decoder_forward``: the
one place that knows how a method's memory is read), which leaves a cache of the memory and the prompt;
``model.generate`` then continues from that prefilled cache with the right attention mask (the memory's
slots, then the prompt) and positions (the prompt continues at the memory's ``position_offset``). So every
argument of ``generate`` works as usual (``GenerationConfig``, sampling, ``max_new_tokens``, stop strings,
repetition penalty, a streamer, logits processors). The input handed to ``generate`` starts with one
placeholder token (the pad id) per memory slot: a streamer should be built with ``skip_prompt=True``.

Why the last prompt token is left to ``generate``: it must run at least one forward itself, and the
first forward is the only one that sees the whole prompt, which a method's ``decoder_forward`` reads
its own way (text memories put their text first, CSKV stages positions, ...).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import GenerationConfig

from .base import Compressor
from .compat import with_cache
from .memory import Memory
from .padding import left_pad


def generation_config_for(stop_ids: list[int], pad_id: int | None, config: GenerationConfig | None = None,
                          **kwargs: Any) -> tuple[GenerationConfig, dict[str, Any]]:
    """Split ``kwargs`` into a ``GenerationConfig`` (``config`` or greedy decoding, updated with every
    kwarg that is one of its fields) and the other ``generate`` arguments (streamer, stopping criteria, ...).

    The reply stops at ``stop_ids`` (the end of the assistant's turn) unless ``config`` names its own eos.
    """
    settings = copy.deepcopy(config) if config is not None else GenerationConfig(do_sample=False, max_new_tokens=64)
    rest = settings.update(**kwargs)
    if config is None or settings.eos_token_id is None:
        settings.eos_token_id = list(stop_ids)
    if settings.pad_token_id is None:
        settings.pad_token_id = pad_id if pad_id is not None else stop_ids[0]
    return settings, rest


def cut_at_stops(rows: list[list[int]], stop_ids: int | list[int] | None) -> list[list[int]]:
    """Each row of new tokens up to, and without, its first stop token."""
    stops = set(stop_ids if isinstance(stop_ids, list) else [] if stop_ids is None else [stop_ids])
    return [row[:next((i for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


@torch.no_grad()
def generate_rows(model: Any, prompts: list[list[int]], generation_config: GenerationConfig,
                  **generate_kwargs: Any) -> list[list[int]]:
    """The new tokens of each prompt row from plain ``model.generate`` (no memory): the rows are left-padded
    with the config's pad id, generated in eval mode (the model's mode comes back after), and cut at the config's
    eos ids. The one helper for a model that writes text (a summariser, a rewriter policy)."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, generation_config.pad_token_id, device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation_config,
                             **generate_kwargs)
    finally:
        model.train(was_training)
    return cut_at_stops(out[:, ids.shape[1]:].tolist(), generation_config.eos_token_id)


@torch.no_grad()
def generate_from_memory(compressor: Compressor, memory: Memory | None, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, generation_config: GenerationConfig,
                         **generate_kwargs: Any) -> torch.Tensor:
    """New tokens ``[batch, new]`` for left-padded prompt rows after ``memory`` (``None``: plain generation).

    Rows that stopped early are padded with the pad id, as ``model.generate`` does.
    """
    model = compressor.base_lm
    was_training = model.training
    model.eval()
    try:
        with compressor.reading(memory):
            if memory is None:
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     generation_config=generation_config, **generate_kwargs)
                return out[:, input_ids.shape[1]:]
            ids, mask, positions, cache = prefill_memory_and_prompt(compressor, memory, input_ids, attention_mask,
                                                                    generation_config.pad_token_id)
            out = model.generate(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 generation_config=generation_config, **with_cache(cache), **generate_kwargs)
            return out[:, ids.shape[1]:]
    finally:
        model.train(was_training)


def prefill_memory_and_prompt(compressor: Compressor, memory: Memory, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor, pad_id: int | None,
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Read ``memory`` and all but the last prompt token; return what ``generate`` continues from:
    ``(input ids with one placeholder per cached position, full attention mask, position ids, cache)``.
    Call it inside ``compressor.reading(memory)``."""
    if input_ids.shape[1] < 2:
        raise ValueError("a prompt after a memory needs at least two tokens (ConversationLayout.prompt_ids "
                         "always gives them)")
    memory = memory.to(input_ids.device).expand(input_ids.shape[0])
    step = compressor.decoder_forward(memory, input_ids[:, :-1], attention_mask[:, :-1], use_cache=True)
    cached = step.attention_mask.shape[1] - (input_ids.shape[1] - 1)
    batch = input_ids.shape[0]
    ids = torch.cat([input_ids.new_full((batch, cached), pad_id or 0), input_ids], dim=1)
    mask = torch.cat([step.attention_mask, attention_mask[:, -1:]], dim=1)
    positions = torch.cat([input_ids.new_zeros(batch, mask.shape[1] - 1), step.next_position[:, None]], dim=1)
    return ids, mask, positions, step.cache
