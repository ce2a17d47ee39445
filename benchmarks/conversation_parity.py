"""The full (uncompressed) context through CompressedLM against plain transformers generation.

For held-out pass-key samples (``data.tasks``, test split, with the answer-format instruction), greedy:
- ``CompressedLM.from_base("full_context")``: ``compress(context)``, then ``generate(question, memory=m)``;
- plain ``model.generate`` over the chat template applied to one user turn ``context + "\\n\\n" + question``
  (tokenized by ``apply_chat_template`` itself, not by ctxzip's layout);
- plain ``model.generate`` over the question alone (no context: the floor).
Reports each one's accuracy (normalized answer contained in the reply) and how many replies of the first
two are identical. Writes ``<out>/passkey_L<length>.json`` and ``.md``.

    python benchmarks/conversation_parity.py --samples 20 --length 1024   # ~4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from ctxzip.compressors import CompressedLM
from ctxzip.compressors.io import write_json_atomic
from ctxzip.data import build_task
from ctxzip.eval.metrics import normalize


def plain_reply(clm: CompressedLM, content: str, max_new_tokens: int) -> str:
    ids = clm.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    out = clm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=clm.stop_token_ids(), pad_token_id=clm.tokenizer.pad_token_id)
    return clm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/conversation")
    args = parser.parse_args()
    clm = CompressedLM.from_base("full_context", base_model=args.base_model, max_context_tokens=10**9)
    rows = build_task("passkey", clm.tokenizer, num_samples=args.samples, context_tokens=args.length,
                      seed=args.seed, split="test")
    records, start = [], time.perf_counter()
    for row in rows:
        memory = clm.compress(row["context"])
        ours = clm.generate(row["question"], memory=memory, max_new_tokens=args.max_new_tokens)
        plain = plain_reply(clm, row["context"] + "\n\n" + row["question"], args.max_new_tokens)
        alone = plain_reply(clm, row["question"], args.max_new_tokens)
        hit = {name: normalize(row["answer"]) in normalize(reply)
               for name, reply in (("compressedlm", ours), ("plain", plain), ("no_context", alone))}
        records.append({"answer": row["answer"], "compressedlm": ours, "plain": plain, "no_context": alone,
                        "identical": ours == plain, **{f"correct_{k}": v for k, v in hit.items()}})
        print(f"{row['answer']}: ours={ours!r} plain={plain!r} none={alone!r}", flush=True)
    n = len(records)
    summary = {"task": "passkey", "context_tokens": args.length, "samples": n, "question": rows[0]["question"],
               "base_model": args.base_model, "machine": f"{platform.machine()} CPU ({torch.get_num_threads()} threads)",
               "seconds": round(time.perf_counter() - start, 1),
               "identical_replies": sum(r["identical"] for r in records),
               **{f"accuracy_{k}": sum(r[f"correct_{k}"] for r in records) / n
                  for k in ("compressedlm", "plain", "no_context")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"passkey_L{args.length}.json", {"summary": summary, "rows": records})
    table = ("| layout | accuracy | replies identical to plain |\n|---|---|---|\n"
             f"| CompressedLM, full_context memory | {summary['accuracy_compressedlm']:.2f} | "
             f"{summary['identical_replies']}/{n} |\n"
             f"| plain `model.generate`, context in the user turn | {summary['accuracy_plain']:.2f} | - |\n"
             f"| plain `model.generate`, no context | {summary['accuracy_no_context']:.2f} | - |\n")
    (out / f"passkey_L{args.length}.md").write_text(
        f"# Full context through CompressedLM vs plain generation\n\n{n} held-out pass-key samples at "
        f"{args.length} tokens, question {summary['question']!r}, greedy, {args.base_model}, {summary['machine']}.\n"
        f"Reproduce: `python benchmarks/conversation_parity.py --samples {n} --length {args.length}`\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
