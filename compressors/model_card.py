"""The model card (README.md) written beside every exported compressor."""

from __future__ import annotations

import json
from typing import Any

from .models import public_model_id
from .tables import Column, markdown_table


def _yaml_list(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def _eval_table(rows: list[dict[str, Any]]) -> str:
    columns = [Column(key, key) for key in dict.fromkeys(key for row in rows for key in row)]
    return markdown_table(rows, columns)


def render_model_card(meta: dict[str, Any], eval_results: list[dict[str, Any]] | None = None) -> str:
    """Markdown with Hub metadata, what the compressor is, how to load it, and its evaluation."""
    base = meta["base_model"]
    hub_base = public_model_id(base)  # artifacts saved before the public id was recorded name the alias
    kind = meta["compressor_type"]
    tags = ["ctxzip", "context-compression", kind]
    header = ["---", "library_name: ctxzip", f"base_model: {hub_base}", "tags:", _yaml_list(tags),
              "pipeline_tag: text-generation", "---"]
    config = json.dumps(meta["config"], indent=2, sort_keys=True)
    body = f"""
# {kind} context compressor for {hub_base}

A learned context compressor trained with ctxzip, a training toolkit for learned context compressors
(installed from its source repository; it is not published on PyPI). It turns a long context into a
compact `{meta['memory_kind']}` memory once; the base model then answers many prompts from that memory.

## Load and use

```python
from ctxzip.compressors import CompressedLM, Memory

clm = CompressedLM.from_pretrained("<this folder or repo id>")   # loads base model {hub_base!r}
mem = clm.compress(long_text)          # Memory: .ratio, .nbytes, .slots
clm.generate("Your question", memory=mem, max_new_tokens=32)
clm.answer_many(mem, ["question 1", "question 2"])
```

The LoRA part, when present, is a standard PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`) loadable with `peft.PeftModel.from_pretrained(base, folder)`.

## Configuration

```json
{config}
```
"""
    if meta.get("method_note"):
        body += "\n## Method\n\n" + meta["method_note"] + "\n"
    if eval_results:
        body += "\n## Evaluation\n\n" + _eval_table(eval_results) + "\n"
    return "\n".join(header) + "\n" + body
