"""Where a memory sits in a conversation: the one composition shared by training and inference.

A memory is the compressed form of the *beginning of a conversation*. For a tokenizer with a chat
template that is the template's prefix (system prompt, start of the first user turn) followed by the
context, inside the first user turn; the prompt then continues that turn (``separator`` + question),
closes it, and opens the assistant's turn. Follow-up turns continue the same conversation after the
memory. kvpress's pipeline lays a context out the same way (``preprocess``: template prefix + context,
then the question and the rest of the template).

Each part is tokenized on its own (``context_ids``, ``prompt_ids``, ``reply_ids``), so the tokens of a
conversation are exactly ``context_ids(context) + prompt_ids(prompt)``: the full-context memory (ratio
1) followed by the prompt is, token for token, what plain ``model.generate`` reads for that
conversation. What a compressor keeps uncompressed (e.g. the template tokens) is its own choice and
documented with it: every compressor receives ``context_ids`` whole.

A tokenizer without a chat template gets a plain text layout: the context, then ``separator`` +
question + newline; earlier turns are joined as ``role: content`` lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from transformers import PreTrainedTokenizerBase

from .errors import EmptyInputError

Message = dict[str, str]
Prompt = str | list[Message]

SEPARATOR = "\n\n"
# Unlikely in any text and kept intact by chat templates: splits a rendered template into its parts.
_MARK = "\x00ctxzip-context\x00"


def as_messages(prompt: Prompt, after_memory: bool = True) -> list[Message]:
    """A prompt as chat messages: a string is one user turn; a message list ends with a user turn.

    After a memory the messages start with the user turn the memory opened (a system message belongs to
    the beginning of the conversation, which the memory holds); without one they may start with a system
    message.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise EmptyInputError("the prompt is empty")
        return [{"role": "user", "content": prompt}]
    messages = [dict(m) for m in prompt]
    if not messages:
        raise EmptyInputError("the prompt has no messages")
    for message in messages:
        if not {"role", "content"} <= set(message) or not isinstance(message.get("content"), str):
            raise ValueError(f"a chat message needs 'role' and 'content' strings, got {message!r}")
    roles = [m["role"] for m in messages]
    if after_memory and roles[0] == "system":
        raise ValueError("a system message comes before the context, so it cannot follow a memory (the memory "
                         "holds the beginning of the conversation); ask without a system message")
    first_user = 1 if roles[0] == "system" else 0
    if len(roles) <= first_user or roles[first_user] != "user" or roles[-1] != "user":
        raise ValueError("a prompt's messages must open with a user turn (after an optional system message when "
                         f"there is no memory) and end with one (the assistant answers it), got roles {roles}")
    return messages


def is_single_prompt(prompt: Any) -> bool:
    """Whether ``prompt`` is one prompt (a string or a message list) rather than a batch of prompts."""
    return isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict))


@dataclass
class ConversationLayout:
    """Token ids of the parts of a conversation that starts with a (compressed) context."""

    tokenizer: PreTrainedTokenizerBase
    use_chat_template: bool = True
    separator: str = SEPARATOR

    def __post_init__(self) -> None:
        self.use_chat_template = self.use_chat_template and bool(self.tokenizer.chat_template)

    # ----- the parts ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    @cached_property
    def prefix_ids(self) -> list[int]:
        """What comes before the context: the chat template up to the first user turn's content."""
        if not self.use_chat_template:
            return []
        prefix, _ = self._render([{"role": "user", "content": _MARK}])
        return self.encode(prefix)

    def context_ids(self, context: str, template: bool = True) -> list[int]:
        """The beginning of the conversation that a memory stands for: template prefix + context
        (``template=False``: the bare context, for a method whose decoder adds the prefix itself)."""
        if not context or not context.strip():
            raise EmptyInputError("cannot compress an empty context")
        return (self.prefix_ids if template else []) + self.encode(context)

    def prompt_ids(self, prompt: Prompt, reply_prefix: str = "") -> list[int]:
        """What follows the memory: the rest of the first user turn, later turns, the assistant's opening
        (and ``reply_prefix``, the start of the assistant's reply written for it: an answer prefix)."""
        messages = as_messages(prompt)
        first = self.separator + messages[0]["content"]
        if not self.use_chat_template:
            return self.encode(self._plain([{**messages[0], "content": first}, *messages[1:]])) + \
                self.encode(reply_prefix)
        _, rest = self._render([{**messages[0], "content": _MARK + first}, *messages[1:]])
        return self.encode(rest) + self.encode(reply_prefix)

    def plain_prompt_ids(self, prompt: Prompt, reply_prefix: str = "") -> list[int]:
        """A conversation with no context at all (generation without a memory); it may set a system message."""
        messages = as_messages(prompt, after_memory=False)
        if not self.use_chat_template:
            return self.encode(self._plain(messages)) + self.encode(reply_prefix)
        first = 1 if messages[0]["role"] == "system" else 0
        marked = [*messages[:first], {**messages[first], "content": _MARK + messages[first]["content"]},
                  *messages[first + 1:]]
        prefix, rest = self._render(marked)
        return self.encode(prefix) + self.encode(rest) + self.encode(reply_prefix)

    def conversation_ids(self, prompt: Prompt, context: str | None = None, reply_prefix: str = "") -> list[int]:
        """The whole conversation as plain generation reads it (no compression): the reference of ratio 1.

        It equals the chat template's tokenization of the user turn ``context + separator + prompt`` except
        where the context's last characters would merge with the separator into one token (trailing
        whitespace): the context is tokenized on its own, since a memory is made before any prompt exists."""
        if context is None:
            return self.plain_prompt_ids(prompt, reply_prefix)
        return self.context_ids(context) + self.prompt_ids(prompt, reply_prefix)

    def reply_ids(self, answer: str, reply_prefix: str = "") -> list[int]:
        """The assistant's reply as a training / scoring target: the answer and the end of its turn. After a
        ``reply_prefix`` ("The pass key is") the answer continues it after a space, as the model writes it."""
        return self.encode(continuation_text(answer, reply_prefix)) + self.end_of_turn_ids

    @cached_property
    def end_of_turn_ids(self) -> list[int]:
        """Tokens that close an assistant turn: what the template writes after a reply, else the eos token."""
        if self.use_chat_template:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}], tokenize=False)
            ids = self.encode(rendered.split(_MARK, 1)[1].rstrip())
            if ids:
                return ids[:1] if ids[0] in self.tokenizer.all_special_ids else ids
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []

    # ----- rendering ----------------------------------------------------------------------
    def _render(self, messages: list[Message]) -> tuple[str, str]:
        """The chat template of ``messages`` (closed by the generation prompt), split at the marker."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text.count(_MARK) != 1:
            raise ValueError("this tokenizer's chat template does not keep the first user message verbatim, so a "
                             "context cannot be placed inside it; pass use_chat_template=False")
        before, after = text.split(_MARK)
        return before, after

    @staticmethod
    def _plain(messages: list[Message]) -> str:
        if len(messages) == 1:
            return messages[0]["content"] + "\n"
        lines = [messages[0]["content"]] + [f"{m['role']}: {m['content']}" for m in messages[1:]]
        return "\n".join(lines) + "\nassistant:"


def continuation_text(answer: str, reply_prefix: str) -> str:
    """``answer`` as it follows ``reply_prefix`` in a reply: after a space unless the prefix ends with one."""
    if reply_prefix and not reply_prefix[-1].isspace() and answer and not answer[0].isspace():
        return " " + answer
    return answer


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None,
                   layout: ConversationLayout | None = None) -> list[int]:
    """Token ids that end a reply: the end of an assistant turn (``layout``'s, else the tokenizer's chat
    template's), the tokenizer's eos and the model's ``generation_config.eos_token_id`` (never a hard-coded
    token name)."""
    ids = list((layout or ConversationLayout(tokenizer)).end_of_turn_ids)
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for value in [tokenizer.eos_token_id, *(extra if isinstance(extra, list) else [extra])]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids
