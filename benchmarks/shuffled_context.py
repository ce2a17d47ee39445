"""Does a compressor's answer come from its memory? Each held-out question is answered twice: from the memory of
its own context, and from the memory of another row's context (the next row's). A memory that is read answers the
first and falls to about chance on the second; an answer that comes from the question alone (or from a prior over
the values) survives the swap. Questions are asked as they are (``answer_many``, no answer prefix), so the own-
context score is not the yardstick's; compare the two columns.

    python benchmarks/shuffled_context.py ctxzip/gist-smollm2-135m --task retrieve_word --samples 40
"""

from __future__ import annotations

import argparse
import json

from ctxzip import CompressedLM
from ctxzip.data import build_task
from ctxzip.eval.metrics import normalize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compressor", help="a saved compressor folder or shipped name")
    parser.add_argument("--task", default="retrieve_word")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.samples < 2:
        parser.error("--samples must be at least 2: each question also reads another row's context")
    clm = CompressedLM.from_pretrained(args.compressor)
    rows = build_task(args.task, clm.tokenizer, num_samples=args.samples, context_tokens=args.context_tokens, seed=0,
                      split="test", source="stdlib")
    right = {"own_context": 0, "another_rows_context": 0}
    for index, row in enumerate(rows):
        contexts = {"own_context": row["context"], "another_rows_context": rows[(index + 1) % len(rows)]["context"]}
        for kind, context in contexts.items():
            reply = clm.answer_many(clm.compress(context), [row["question"]], max_new_tokens=args.max_new_tokens)[0]
            right[kind] += normalize(row["answer"]) in normalize(reply)
    print(json.dumps({"compressor": args.compressor, "task": args.task, "n": len(rows), **right}))


if __name__ == "__main__":
    main()
