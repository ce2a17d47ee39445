"""CSKV's held-out table: perplexity of a continuation read from each compressed cache, and its KV bytes.

``evaluate_perplexity`` scores each named compressor (the trained factors, the untrained SVD / ASVD init,
the full cache) on the same rows; ``print_results`` prints the markdown table the recipe reports and the
model card carries.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ctxzip.compressors import CompressedLM, Compressor
from ctxzip.compressors.tables import Column, markdown_table
from ctxzip.eval.scoring import score_continuation


@torch.no_grad()
def evaluate_perplexity(named: list[tuple[str, Compressor]], tokenizer: PreTrainedTokenizerBase,
                        rows: Any) -> list[dict[str, Any]]:
    """Held-out perplexity of each row's continuation read from the compressed context, with the KV
    bytes each method really holds and their reduction against the full cache (a method named
    ``full_cache``, when evaluated)."""
    results = []
    for name, compressor in named:
        clm = CompressedLM(compressor.eval(), tokenizer)
        nlls, sizes = [], []
        for row in rows:
            memory = clm.compress(row["context"])
            nlls.append(score_continuation(clm, memory, row["answer"]))
            sizes.append(memory.nbytes)
        results.append({"method": name, "perplexity": math.exp(sum(nlls) / len(nlls)),
                        "kv_bytes": round(sum(sizes) / len(sizes))})
    full = next((r["kv_bytes"] for r in results if r["method"] == "full_cache"), None)
    for r in results:
        if full:
            r["kv_reduction"] = round(1.0 - r["kv_bytes"] / full, 4)
    return results


def results_table(results: list[dict[str, Any]]) -> str:
    """The markdown table of ``evaluate_perplexity``'s results."""
    return markdown_table(results, (
        Column("method", "method"), Column("perplexity", "perplexity"), Column("KV bytes", "kv_bytes"),
        Column("reduction vs full cache",
               cell=lambda r: f"{100 * r['kv_reduction']:.1f}%" if "kv_reduction" in r else "-")))


def print_results(results: list[dict[str, Any]], title: str) -> None:
    print(f"\n{title}\n{results_table(results)}\n")
