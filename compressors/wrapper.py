"""CompressedLM: base LM + tokenizer + compressor. Compress a context once, answer many prompts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .base import Compressor, compressor_class
from .errors import EmptyInputError
from .generation import GenerationSettings, generate_from_memory
from .hub import load_compressor, push_folder, save_compressor
from .memory import Memory
from .models import load_base

Prompt = str | list[dict[str, str]]


class CompressedLM:
    """The shared inference wrapper.

    ``compress(text) -> Memory``; ``generate(prompt, memory=...)``; ``answer_many(memory, prompts)``.
    Prompts are plain strings (wrapped as one user turn in the chat template) or chat message
    lists. Without a memory, ``generate`` is plain generation from the prompt.
    """

    def __init__(self, compressor: Compressor, tokenizer: PreTrainedTokenizerBase,
                 use_chat_template: bool = True) -> None:
        self.compressor = compressor
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template and bool(tokenizer.chat_template)
        self.eval_results: list[dict[str, Any]] | None = None

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, base_model: str | None = None,
                        dtype: str | torch.dtype | None = "float32", device: str | None = None,
                        revision: str | None = None) -> CompressedLM:
        """Load a saved compressor folder or Hub repo with its base model (checked to match)."""
        compressor, tokenizer = load_compressor(name_or_path, base_model=base_model, dtype=dtype,
                                                revision=revision)
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
        return self.compressor.base_lm

    @property
    def device(self) -> torch.device:
        return self.compressor.device

    # ----- compression --------------------------------------------------------------------
    def tokenize_context(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or any(not t or not t.strip() for t in texts):
            raise EmptyInputError("cannot compress an empty context")
        encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return left_pad(encoded, self.tokenizer.pad_token_id, self.device)

    @torch.no_grad()
    def compress(self, texts: str | list[str], query: str | None = None) -> Memory:
        """Compress one context (or a batch, one memory row each) into a Memory."""
        ids, mask = self.tokenize_context(texts)
        query_ids = None
        if query is not None:
            query_ids = torch.tensor([self.tokenizer(query, add_special_tokens=False)["input_ids"]],
                                     device=self.device)
        return self.compressor.compress(ids, mask, query_ids=query_ids).detach()

    # ----- prompts ------------------------------------------------------------------------
    def prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str) and not prompt.strip():
            raise EmptyInputError("the prompt is empty")
        if not self.use_chat_template:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        end_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_turn, int) and end_turn != self.tokenizer.unk_token_id:
            ids.add(end_turn)
        return [i for i in ids if i is not None]

    # ----- generation ---------------------------------------------------------------------
    def generate(self, prompt: Prompt | list[Prompt], memory: Memory | None = None,
                 **generation: Any) -> str | list[str]:
        """Answer a prompt (or a list of prompts, batched) reading ``memory``."""
        single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict))
        prompts = [prompt] if single else list(prompt)
        answers = self._generate_batch(prompts, memory, GenerationSettings.from_kwargs(**generation))
        return answers[0] if single else answers

    def answer_many(self, memory: Memory, prompts: list[Prompt], batch_size: int = 8,
                    **generation: Any) -> list[str]:
        """Many prompts from one compressed context: the context is never re-read."""
        if memory.batch_size != 1:
            raise ValueError("answer_many expects a single-row memory (use memory.select(i))")
        settings = GenerationSettings.from_kwargs(**generation)
        answers: list[str] = []
        for start in range(0, len(prompts), batch_size):
            answers += self._generate_batch(prompts[start:start + batch_size], memory, settings)
        return answers

    def _generate_batch(self, prompts: list[Prompt], memory: Memory | None,
                        settings: GenerationSettings) -> list[str]:
        ids, mask = left_pad([self.prompt_ids(p) for p in prompts], self.tokenizer.pad_token_id, self.device)
        memory = self.empty_memory() if memory is None else memory.to(self.device)
        tokens = generate_from_memory(self.compressor, memory, ids, mask, self.eos_token_ids(), settings)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens]

    def empty_memory(self) -> Memory:
        """A zero-slot kv memory: generation then reads only the prompt."""
        layers = self.model.config.num_hidden_layers
        kv_heads = self.compressor.base_signature["num_key_value_heads"]
        head_dim = self.compressor.base_signature["head_dim"]
        empty = torch.zeros(1, kv_heads, 0, head_dim, dtype=self.model.dtype, device=self.device)
        tensors = {f"{part}.{i}": empty for i in range(layers) for part in ("key", "value")}
        return Memory(kind="kv", tensors=tensors, source_tokens=[0], slots=0, position_offset=[0],
                      compressor_type="none", base_signature=self.compressor.base_signature)

    # ----- artifacts ----------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        return save_compressor(self.compressor, folder, self.tokenizer, self.eval_results)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload ctxzip compressor") -> str:
        """Save to a temporary folder and upload exactly that folder to ``repo_id``."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_folder(tmp, repo_id, private=private, token=token, commit_message=commit_message)


def left_pad(rows: list[list[int]], pad_id: int | None, device: torch.device | str = "cpu",
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids, mask)``: the last real token of every row is aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id or 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)
