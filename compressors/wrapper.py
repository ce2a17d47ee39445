"""CompressedLM: base LM + tokenizer + compressor. Compress a context once, answer many prompts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from .base import Compressor, compressor_class
from .conversation import ConversationLayout, Prompt, is_single_prompt, stop_token_ids
from .errors import EmptyInputError
from .generation import cut_at_stops, generate_from_memory, generation_config_for
from .hub import load_compressor, push_folder, save_compressor
from .memory import Memory
from .models import load_base
from .padding import left_pad


class CompressedLM:
    """The shared inference wrapper: compress a context once, answer many prompts from it.

    A memory stands for the beginning of a conversation (``compressors.conversation``): with a chat
    template, the template's prefix and the context inside the first user turn. ``generate(prompt,
    memory=m)`` continues that turn with the prompt (a string, or chat messages whose earlier turns follow
    the memory), and the assistant answers; without a memory it is plain chat generation. Generation runs
    through ``model.generate``, so every ``GenerationConfig`` field and ``generate`` argument works.

    ``model`` is the decoder LM: the base model as it reads memories and answers (a compressor whose
    encoder has its own adapter enables it only while compressing), so ``clm.model.generate`` is plain
    generation with the decoder.
    """

    def __init__(self, compressor: Compressor, tokenizer: PreTrainedTokenizerBase,
                 use_chat_template: bool = True) -> None:
        self.compressor = compressor
        self.tokenizer = tokenizer
        compressor.use_tokenizer(tokenizer, use_chat_template=use_chat_template).as_decoder()
        self.layout: ConversationLayout = compressor.layout  # type: ignore[assignment]
        self.eval_results: list[dict[str, Any]] | None = None

    @property
    def use_chat_template(self) -> bool:
        return self.layout.use_chat_template

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, base_model: str | None = None,
                        dtype: str | torch.dtype | None = "float32", device: str | None = None,
                        revision: str | None = None, *, device_map: str | dict[str, Any] | None = None,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False,
                        config_overrides: dict[str, Any] | None = None) -> CompressedLM:
        """Load a saved compressor folder or Hub repo with its base model (checked to match).

        ``base_model`` overrides the base recorded in the artifact (a Hub id or folder of the same shape and
        tokenizer). ``revision`` is the compressor repo's branch, tag or commit. ``token``, ``cache_dir`` and
        ``local_files_only`` go to ``huggingface_hub.snapshot_download`` (the compressor) and to transformers'
        ``from_pretrained`` (the base model); ``dtype`` and ``device_map`` to the base model's ``from_pretrained``
        (e.g. ``device_map="auto"``), whose device and dtype the compressor's own tensors follow. ``device``
        instead moves the whole loaded compressor to one device afterwards. ``config_overrides`` changes how the
        compressor reads a context, e.g. ``{"recent_tokens": 128}`` keeps a gist memory's last 128 tokens raw.
        """
        if device is not None and device_map is not None:
            raise ValueError("give device (move everything after loading) or device_map (place the base model "
                             "while loading), not both")
        compressor, tokenizer = load_compressor(name_or_path, base_model=base_model, dtype=dtype, revision=revision,
                                                device_map=device_map, token=token, cache_dir=cache_dir,
                                                local_files_only=local_files_only,
                                                config_overrides=config_overrides)
        if device:
            compressor.to(device)
        return cls(compressor, tokenizer)

    @classmethod
    def from_base(cls, compressor_type: str, base_model: str = "smollm2-135m-instruct",
                  dtype: str | torch.dtype | None = "float32", **config: Any) -> CompressedLM:
        """A fresh (untrained, or training-free) compressor of ``compressor_type`` on ``base_model``."""
        model, tokenizer = load_base(base_model, dtype=dtype)
        kind = compressor_class(compressor_type)
        return cls(kind(kind.config_class.from_dict(config), model).eval(), tokenizer)

    @property
    def model(self) -> Any:
        """The decoder LM (see the class docstring)."""
        return self.compressor.base_lm

    @property
    def device(self) -> torch.device:
        return self.compressor.device

    # ----- compression --------------------------------------------------------------------
    def tokenize_context(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(ids, mask)`` of contexts as the compressor receives them: laid out as the
        beginning of a conversation, or the bare context for a method with ``compresses_template = False``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise EmptyInputError("cannot compress an empty context")
        template = self.compressor.compresses_template
        return left_pad([self.layout.context_ids(t, template) for t in texts], self.tokenizer.pad_token_id,
                        self.device)

    @torch.no_grad()
    def compress(self, texts: str | list[str], query: str | None = None) -> Memory:
        """Compress one context (or a batch, one memory row each) into a Memory. A method whose memory kind is
        ``pool`` (InComeS: each context is an item, e.g. an edit) unites a list into one pool row instead."""
        ids, mask = self.tokenize_context(texts)
        query_ids = None
        if query is not None:
            query_ids = torch.tensor([self.layout.encode(query)], device=self.device)
        with self.compressor.encoding():
            memory = self.compressor.compress(ids, mask, query_ids=query_ids).detach()
        return memory.pooled() if memory.kind == "pool" else memory

    # ----- prompts ------------------------------------------------------------------------
    def prompt_ids(self, prompt: Prompt, memory: bool = True, reply_prefix: str = "") -> list[int]:
        """Token ids of ``prompt`` after a memory (``memory=False``: a conversation with no context), ending
        with ``reply_prefix`` (the start of the assistant's reply written for it, e.g. an answer prefix)."""
        if memory:
            return self.layout.prompt_ids(prompt, reply_prefix)
        return self.layout.plain_prompt_ids(prompt, reply_prefix)

    def stop_token_ids(self) -> list[int]:
        """Tokens that end a reply (the end of the assistant's turn, the tokenizer's and the model's eos)."""
        return stop_token_ids(self.tokenizer, self.model.generation_config, self.layout)

    # ----- generation ---------------------------------------------------------------------
    def generate(self, prompt: Prompt | list[Prompt], memory: Memory | None = None,
                 generation_config: GenerationConfig | None = None, reply_prefix: str = "",
                 **generation: Any) -> str | list[str]:
        """Answer a prompt (or a list of prompts, batched) reading ``memory`` (``None``: plain chat).

        ``generation`` takes any ``GenerationConfig`` field (``max_new_tokens``, ``do_sample``,
        ``temperature``, ``repetition_penalty``, ``stop_strings``, ...) and any other ``generate``
        argument (``streamer``, ``logits_processor``, ...). Greedy, 64 new tokens, by default.
        ``reply_prefix`` starts the assistant's reply ("The pass key is"); the answer continues it and
        only the continuation is returned.
        """
        single = is_single_prompt(prompt)
        prompts = [prompt] if single else list(prompt)  # type: ignore[list-item]
        rows = self.generate_ids(prompts, memory, generation_config, reply_prefix=reply_prefix, **generation)
        answers = [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
        return answers[0] if single else answers

    def answer_many(self, memory: Memory, prompts: list[Prompt], batch_size: int = 8,
                    generation_config: GenerationConfig | None = None, reply_prefix: str = "",
                    **generation: Any) -> list[str]:
        """Many prompts from one compressed context, each as the first question about it (the context
        is never re-read): batches of ``batch_size`` prompt rows share the one memory row."""
        if memory.batch_size != 1:
            raise ValueError("answer_many expects a single-row memory (use memory.select(i))")
        answers: list[str] = []
        for start in range(0, len(prompts), batch_size):
            answers += self.generate(prompts[start:start + batch_size], memory, generation_config,
                                     reply_prefix=reply_prefix, **generation)
        return answers

    def generate_ids(self, prompts: list[Prompt], memory: Memory | None = None,
                     generation_config: GenerationConfig | None = None, reply_prefix: str = "",
                     **generation: Any) -> list[list[int]]:
        """The new token ids of each prompt (batched), up to and without the token that stopped it."""
        rows = [self.prompt_ids(p, memory=memory is not None, reply_prefix=reply_prefix) for p in prompts]
        ids, mask = left_pad(rows, self.tokenizer.pad_token_id, self.device)
        settings, extra = generation_config_for(self.stop_token_ids(), self.tokenizer.pad_token_id, generation_config,
                                                **generation)
        if settings.stop_strings is not None:
            extra.setdefault("tokenizer", self.tokenizer)
        memory = memory.to(self.device) if memory is not None else None
        tokens = generate_from_memory(self.compressor, memory, ids, mask, settings, **extra).tolist()
        return cut_at_stops(tokens, settings.eos_token_id)

    # ----- artifacts ----------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        return save_compressor(self.compressor, folder, self.tokenizer, self.eval_results)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload ctxzip compressor", revision: str | None = None) -> str:
        """Save to a temporary folder and upload exactly that folder to ``repo_id`` as one commit (on branch
        ``revision``, created from main when needed; see ``compressors.hub.push_folder``); returns its URL."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_folder(tmp, repo_id, private=private, token=token, commit_message=commit_message,
                               revision=revision)
