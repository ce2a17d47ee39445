"""CoLoR: a generative passage compressor trained by preference optimization with a length penalty.

Paper: Seo, Baek, Lee & Hwang, "Efficient Long Context Language Model Retrieval with Compression"
(ACL 2025, https://arxiv.org/abs/2412.18232); released code: github.com/going-doer/CoLoR.

How it works here: the policy is the base causal LM with a LoRA adapter. ``compress(passage ids)``
wraps each passage in the compression prompt (chat template), generates a shorter rewrite (batched,
greedy by default) and returns a Memory of kind ``text``: the rewrite's text in ``texts`` and its
token ids in ``tensors["input_ids"]`` (left-padded, ``slot_mask`` on ragged rows), with
``slots`` = compressed token count and ``source_tokens`` = passage token count, so ``ratio`` is
original / compressed tokens. The decoder reads the memory where the context would sit in the
conversation (``compressors.conversation``): the chat template's prefix, then the rewrite, then the prompt,
with the LoRA adapter disabled: the reader is the unchanged base model. The writer receives the bare
context (``compresses_template = False``): the template is the reader's, not something to rewrite. Training is
``compressors.color.trainer.ColorDPOTrainer`` driven by ``recipes/color_dpo.py``.

Faithful: a decoder-only LM writes the compression from a fixed instruction; preference pairs are
labelled by whether a reader still retrieves the passage from the compressed corpus (chosen = the
shortest success, rejected = the longest failure); the loss multiplies the preference log-ratio by
``max(0.1 * (|y_l| - |y_w|), 1)`` as the released code does; LoRA fine-tuning.
Not faithful: the paper's candidates come from several other LLMs (GPT-4o-mini, Mistral-7B,
Phi-3) and its readers are frontier long-context LMs over LOFT corpora of up to 128k tokens; here
the candidates are the policy's own generations under several prompts / length targets / sampling
settings, and the reader is the same small base model (or a dense MiniLM retriever) over corpora of
a few passages. The instruction wording is ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import add_named_lora
from ..base import Compressor, DecoderStep, EncoderAdapter, register_compressor
from ..compat import cache_of
from ..conversation import stop_token_ids
from ..errors import ContextTooLongError, CtxzipError, EmptyInputError
from ..generation import generate_rows
from ..memory import Memory
from ..models import load_tokenizer
from .config import ColorConfig

_MARK = "\x00CTXZIP_PASSAGE\x00"


@register_compressor
class ColorCompressor(EncoderAdapter, Compressor):
    """A passage → shorter text compressor (see the module docstring)."""

    compressor_type = "color"
    config_class = ColorConfig
    memory_kind = "text"
    compresses_template = False
    compresses_passages = True

    def __init__(self, config: ColorConfig, model: PreTrainedModel) -> None:
        if not hasattr(model, "peft_config"):
            model = add_named_lora(model, {"default": config.lora_r}, config)  # freezes every non-LoRA weight
        super().__init__(config, model)
        self._prompt_parts: tuple[list[int], list[int]] | None = None

    # ----- tokenizer and prompt ----------------------------------------------------------
    def use_tokenizer(self, tokenizer: PreTrainedTokenizerBase, use_chat_template: bool = True) -> ColorCompressor:
        super().use_tokenizer(tokenizer, use_chat_template)
        self._prompt_parts = None
        return self

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            try:
                self.use_tokenizer(load_tokenizer(self.base_name))
            except Exception as exc:  # noqa: BLE001 - any loader failure means the same to the user
                raise CtxzipError(f"the color compressor needs the tokenizer of {self.base_name!r} to write "
                                  f"text ({exc}); call .use_tokenizer(tokenizer) first") from exc
        assert self.tokenizer is not None
        return self.tokenizer

    def prompt_parts(self, template: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids before and after the passage in the compression prompt (chat template applied)."""
        if template is None and self._prompt_parts is not None:
            return self._prompt_parts
        parts = prompt_parts(self.get_tokenizer(), template or self.compressor_config.prompt_template)
        if template is None:
            self._prompt_parts = parts
        return parts

    def prompt_ids(self, passage_ids: list[int], template: str | None = None) -> list[int]:
        """The full compression prompt for one passage, as token ids."""
        head, tail = self.prompt_parts(template)
        return head + list(passage_ids) + tail

    def check_fits(self, passage_ids: list[int], max_new_tokens: int | None = None, name: str = "a passage") -> None:
        """Raise ``ContextTooLongError`` when the prompt plus the compression exceed the model's context."""
        limit = getattr(self.base_lm.config, "max_position_embeddings", None)
        if len(passage_ids) > self.compressor_config.max_context_tokens:
            raise ContextTooLongError(
                f"{name} has {len(passage_ids)} tokens, more than max_context_tokens="
                f"{self.compressor_config.max_context_tokens} of the color compressor")
        needed = len(self.prompt_ids(passage_ids)) + (max_new_tokens or self.compressor_config.max_new_tokens)
        if limit is not None and needed > limit:
            raise ContextTooLongError(
                f"{name} has {len(passage_ids)} tokens: with the compression prompt and up to "
                f"{max_new_tokens or self.compressor_config.max_new_tokens} new tokens it needs {needed} positions, "
                f"more than the base model's {limit}; shorten or split the passage")

    # ----- encoder ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, passages: list[list[int]], template: str | list[str] | None = None,
                 max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_p: float | None = None) -> list[list[int]]:
        """Compressions (token ids, end of turn removed) of ``passages`` (token id lists), batched.

        ``template`` overrides the configured prompt (one for all passages, or one per passage).
        """
        cfg = self.compressor_config
        max_new = max_new_tokens or cfg.max_new_tokens
        templates = template if isinstance(template, list) else [template] * len(passages)
        if len(templates) != len(passages):
            raise ValueError(f"{len(templates)} templates for {len(passages)} passages")
        for i, ids in enumerate(passages):
            if not ids:
                raise EmptyInputError("cannot compress an empty passage")
            self.check_fits(ids, max_new, name=f"passage {i}")
        prompts = [self.prompt_ids(ids, t) for ids, t in zip(passages, templates)]
        tokenizer = self.get_tokenizer()
        out: list[list[int]] = []
        with self.encoding():  # the writer is the base model with its LoRA adapter
            for start in range(0, len(prompts), cfg.generation_batch_size):
                out += generate_completions(
                    self.model, prompts[start:start + cfg.generation_batch_size], tokenizer, max_new_tokens=max_new,
                    do_sample=cfg.do_sample if do_sample is None else do_sample,
                    temperature=cfg.temperature if temperature is None else temperature,
                    top_p=cfg.top_p if top_p is None else top_p)
        return out

    def compress(self, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> Memory:
        """Rewrite each (left-padded) passage row shorter; a ``text`` Memory with one row per passage."""
        attention_mask = self.check_context(context_ids, attention_mask)
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(context_ids, attention_mask)]
        compressed = self.generate(rows)
        return self.text_memory(compressed, [len(r) for r in rows])

    @torch.no_grad()
    def compress_passages(self, passages: list[str], layout: Callable[[list[str]], str]) -> Memory:
        """A corpus compressed CoLoR's way: each passage rewritten on its own (batched), the
        rewrites laid out as one corpus text by ``layout`` (e.g. ``data.tasks.layout_passages``);
        a one-row ``text`` Memory whose source is the same layout of the original passages."""
        tokenizer = self.get_tokenizer()
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in passages]
        if not rows or any(not r for r in rows):
            raise EmptyInputError("cannot compress an empty passage")
        size = self.compressor_config.generation_batch_size
        compressed = [c for start in range(0, len(rows), size) for c in self.generate(rows[start:start + size])]
        texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in compressed]
        corpus = tokenizer(layout(texts), add_special_tokens=False)["input_ids"]
        source = len(tokenizer(layout(passages), add_special_tokens=False)["input_ids"])
        return self.text_memory([corpus], [source])

    def text_memory(self, compressed: list[list[int]], source_tokens: list[int]) -> Memory:
        """Wrap compressions (token ids) as a ``text`` Memory."""
        tokenizer = self.get_tokenizer()
        width = max((len(c) for c in compressed), default=0)
        pad = tokenizer.pad_token_id or 0
        ids = torch.full((len(compressed), width), pad, dtype=torch.long)
        mask = torch.zeros((len(compressed), width), dtype=torch.int8)
        for i, row in enumerate(compressed):
            if row:
                ids[i, width - len(row):] = torch.tensor(row)
                mask[i, width - len(row):] = 1
        tensors = {"input_ids": ids.to(self.device)}
        lengths = [len(c) for c in compressed]
        if len(set(lengths)) > 1:
            tensors["slot_mask"] = mask.to(self.device)
        texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in compressed]
        return Memory(kind="text", tensors=tensors, source_tokens=list(source_tokens), slots=width,
                      position_offset=lengths, compressor_type=self.compressor_type,
                      base_signature=self.base_signature, texts=texts, meta={"real_slots": lengths})

    # ----- decoder ------------------------------------------------------------------------
    def decoder_forward(self, memory: Memory, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        use_cache: bool = True, prompt_lengths: torch.Tensor | None = None) -> DecoderStep:
        """Read the template's prefix and the compressed text, then the input rows; logits cover the inputs only."""
        self.check_memory(memory)
        if "input_ids" not in memory.tensors:
            raise ValueError("a text memory needs its token ids (tensors['input_ids'])")
        self.get_tokenizer()
        memory = memory.to(input_ids.device).expand(input_ids.shape[0])
        template = torch.tensor(self.layout.prefix_ids if self.layout else [], dtype=torch.long,
                                device=input_ids.device).expand(input_ids.shape[0], -1)
        text_mask = memory.slot_mask().to(attention_mask.dtype)
        ids = torch.cat([template, memory.tensors["input_ids"], input_ids], dim=1)
        full_mask = torch.cat([torch.ones_like(template, dtype=attention_mask.dtype), text_mask, attention_mask], dim=1)
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.base_lm(input_ids=ids, attention_mask=full_mask, position_ids=position_ids, use_cache=use_cache)
        read = [template.shape[1] + n for n in memory.real_slots]
        return DecoderStep(logits=out.logits[:, ids.shape[1] - input_ids.shape[1]:], cache=cache_of(out),
                           attention_mask=full_mask, next_position=position_ids[:, -1] + 1, memory_tokens=read)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise NotImplementedError("the color compressor is trained on preference pairs by "
                                  "ctxzip.compressors.color.trainer.ColorDPOTrainer (recipes/color_dpo.py), not by forward()")


def prompt_parts(tokenizer: PreTrainedTokenizerBase, template: str) -> tuple[list[int], list[int]]:
    """Token ids before and after ``{passage}`` in ``template`` rendered as one user turn."""
    if "{passage}" not in template:
        raise ValueError("a compression prompt must contain the placeholder {passage}")
    content = template.replace("{passage}", _MARK)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    else:
        text = content + "\n"
    head, tail = text.split(_MARK)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    return list(encode(head)), list(encode(tail))


@torch.no_grad()
def generate_completions(model: Any, prompts: list[list[int]], tokenizer: PreTrainedTokenizerBase,
                         max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                         top_p: float = 1.0) -> list[list[int]]:
    """Generate from left-padded prompt rows with ``model.generate``; new tokens up to (not incl.) the end."""
    ends = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=ends,
                                pad_token_id=pad, **({"temperature": temperature, "top_p": top_p, "top_k": 0}
                                                     if do_sample else {}))
    # synced_gpus=False: this generation is always process-local (unsharded weights, one rank);
    # transformers would otherwise turn it on under a ZeRO-3 launch and wait for the other ranks.
    return generate_rows(model, prompts, settings, synced_gpus=False)
