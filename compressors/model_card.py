"""The model card (README.md) written beside every exported compressor, built with huggingface_hub's
``ModelCard`` / ``ModelCardData``.

Its metadata: ``library_name: ctxzip``, ``base_model`` (the base model's Hub id; left out for a base loaded from a
local folder, which names no Hub model), ``tags`` (``ctxzip``, ``context-compression``, the compressor type),
``license`` where ctxzip knows the base model's (``KNOWN_LICENSES``), ``pipeline_tag``, and a ``model-index``
built from the evaluation table when it holds the exported compressor's own measurements: its rows labelled
``trained`` (or ``... (trained)``) in their first column. In such a row every float is a metric; its strings,
integers and booleans (the scoring, the reader, a pool size, the sample count) describe the setting, which
becomes the metric's ``config`` and display name. The other rows (the untrained compressor, truncation, the
full context, no context) stay in the table only: they are not this model's results.

The card's text says what the compressor is, how to load it, the method's note (``Compressor.card_note``: what
is and is not faithful to the paper), and the whole evaluation table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .models import EMBEDDED_HUB_ID, public_model_id
from .tables import Column, markdown_table

LIBRARY_NAME = "ctxzip"
#: Licenses of the base models ctxzip knows (the card's ``license`` is left out for any other base).
KNOWN_LICENSES = {EMBEDDED_HUB_ID: "apache-2.0"}
#: The first-column labels of the evaluation rows that measure the exported compressor itself.
OWN_LABEL, OWN_SUFFIX = "trained", "(trained)"
EVAL_TASK = "text-generation"
EVAL_DATASET = ("ctxzip-held-out", "held-out evaluation of the training recipe")  # (type, name)


def _eval_table(rows: list[dict[str, Any]]) -> str:
    columns = [Column(key, key) for key in dict.fromkeys(key for row in rows for key in row)]
    return markdown_table(rows, columns)


def base_hub_id(name_or_path: str) -> str | None:
    """The Hub id a base model is known by, or ``None`` for one loaded from a local folder (a path is no Hub id)."""
    name = public_model_id(name_or_path)  # artifacts saved before the public id was recorded name the alias
    if Path(name).is_dir() or name.startswith((".", "~", "/")) or "\\" in name:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _is_own(row: dict[str, Any]) -> bool:
    label = next(iter(row.values()), None)
    return isinstance(label, str) and (label == OWN_LABEL or label.endswith(OWN_SUFFIX))


def eval_results(rows: list[dict[str, Any]] | None) -> list[EvalResult]:
    """The model-index entries of the evaluation table: one per float of each own row (see the module docstring)."""
    results = []
    for row in rows or []:
        if not _is_own(row):
            continue
        label_key = next(iter(row))
        setting = ", ".join(f"{key}={value}" for key, value in row.items()
                            if key != label_key and isinstance(value, (str, int)))  # bool is an int
        for key, value in row.items():
            if isinstance(value, float) and math.isfinite(value):
                results.append(EvalResult(
                    task_type=EVAL_TASK, dataset_type=EVAL_DATASET[0], dataset_name=EVAL_DATASET[1],
                    metric_type=key, metric_value=float(value), metric_config=setting or None,
                    metric_name=f"{key} ({setting})" if setting else key))
    return results


def card_data(meta: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> ModelCardData:
    """The card's metadata (YAML front matter) for an artifact's ``compressor_config.json`` contents ``meta``."""
    kind = meta["compressor_type"]
    base = base_hub_id(meta["base_model"])
    results = eval_results(rows)
    name = f"{kind}-{(base or Path(meta['base_model']).name).split('/')[-1]}"
    return ModelCardData(base_model=base, library_name=LIBRARY_NAME, license=KNOWN_LICENSES.get(base or ""),
                         tags=[LIBRARY_NAME, "context-compression", kind], pipeline_tag="text-generation",
                         model_name=name if results else None, eval_results=results or None)  # the index's name


def build_model_card(meta: dict[str, Any], eval_results: list[dict[str, Any]] | None = None) -> ModelCard:
    """A ``huggingface_hub.ModelCard``: the metadata of ``card_data``, what the compressor is, how to load it,
    the method's note and the evaluation table."""
    data = card_data(meta, eval_results)
    kind = meta["compressor_type"]
    base = public_model_id(meta["base_model"])
    config = json.dumps(meta["config"], indent=2, sort_keys=True)
    body = f"""
# {kind} context compressor for {base}

A learned context compressor trained with ctxzip, a training toolkit for learned context compressors
(installed from its source repository; it is not published on PyPI). It turns a long context into a
compact `{meta['memory_kind']}` memory once; the base model then answers many prompts from that memory.

## Load and use

```python
from ctxzip.compressors import CompressedLM, Memory

clm = CompressedLM.from_pretrained("<this folder or repo id>")   # loads base model {base!r}
mem = clm.compress(long_text)          # Memory: .ratio, .nbytes, .slots
clm.generate("Your question", memory=mem, max_new_tokens=32)
clm.answer_many(mem, ["question 1", "question 2"])
```

`from_pretrained` also takes `revision`, `token`, `cache_dir`, `local_files_only` (for this repo and the base
model), `dtype` and `device_map` (for the base model, e.g. `device_map="auto"`), and `base_model` (another
copy of the same base model).

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
        if data.eval_results:
            body += ("\nThe rows labelled trained are this compressor's own results (the card's `model-index`); "
                     "the others are references measured beside it.\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def render_model_card(meta: dict[str, Any], eval_results: list[dict[str, Any]] | None = None) -> str:
    """The README.md text of ``build_model_card``."""
    return str(build_model_card(meta, eval_results))
