"""``python -m ctxzip.eval``: evaluate compressors on synthetic long-context tasks, or compare runs.

    python -m ctxzip.eval --compressor snapkv --base-model smollm2-135m-instruct \\
        --tasks passkey,niah_multikey,fact_qa --context-length 2048 --ratios 2,4,8,16 \\
        --num-samples 50 --output-dir results/snapkv [--scoring loglik|generate]
    python -m ctxzip.eval --compare results/gist results/snapkv --output-dir results/compare

    python -m ctxzip.eval --compressor out/incomes-smollm2 --tasks edits --pool-sizes 1,8,32,128 --num-samples 16 \\
        --output-dir results/incomes          # model editing: efficacy / generalisation / locality per pool size

``--compressor`` takes a baseline name, a saved compressor folder or a Hub repo id, or several,
comma-separated (they then share the full-context and truncation references).
"""

from __future__ import annotations

import argparse
import sys

from ctxzip.compressors.errors import CtxzipError


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ctxzip.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressor", help="baseline name(s), saved folder(s) or Hub id(s), comma-separated")
    p.add_argument("--compare", nargs="+", metavar="DIR", help="merge the metrics of finished runs")
    p.add_argument("--base-model", default=None, help="base model (default: the one a saved compressor names)")
    p.add_argument("--tasks", default="passkey,niah_multikey,fact_qa", help=(
        "comma-separated: synthetic tasks (data.TASKS), edits (InComeS), or benchmarks read through datasets: "
        "longbench:SOURCE[:SUBSET], ruler:FILE.jsonl, scbench:SOURCE[:SUBSET]"))
    p.add_argument("--context-length", type=_ints, default=[2048], help="one or more, comma-separated")
    p.add_argument("--ratios", type=_floats, default=[2.0, 4.0, 8.0, 16.0])
    p.add_argument("--num-samples", type=int, default=50)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--scoring", choices=("loglik", "generate"), default="generate",
                   help="generate (the headline: greedy replies, what a user sees) or loglik (the fast proxy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--timing-samples", type=int, default=1, help="samples per configuration timed for decode")
    p.add_argument("--n-prompts", type=int, default=10, help="N for the many-prompts timing comparison")
    p.add_argument("--no-references", action="store_true", help="skip the full-context and truncation runs")
    p.add_argument("--num-questions", type=int, default=1,
                   help="shared-context mode (SCBench): ask this many questions about each context, all from ONE "
                        "memory (niah_multikey, fact_qa); the report gives accuracy by question")
    p.add_argument("--multi-turn", action="store_true",
                   help="shared-context mode: each question is a turn after the model's own earlier answers")
    p.add_argument("--pool-sizes", type=_ints, default=[1, 8, 32, 128],
                   help="--tasks edits: edits per pool (--num-samples queries are asked at each size)")
    p.add_argument("--edit-source", default="offline",
                   help="--tasks edits: offline (generated edits) or a zsRE / CounterFact-style file or Hub dataset")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        if args.compare:
            from .report import compare

            print(compare(args.compare, args.output_dir))
            return 0
        if not args.compressor:
            parser.error("give --compressor (or --compare DIR ...)")
        compressors = [c.strip() for c in args.compressor.split(",") if c.strip()]
        if args.tasks.strip() == "edits":
            from .edits import run_edit_eval

            output_dir = args.output_dir or f"results/{compressors[0].strip('/').split('/')[-1]}"
            run_edit_eval(compressors, output_dir, args.pool_sizes, args.num_samples, args.edit_source,
                          seed=args.seed, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                          references=not args.no_references, base_model=args.base_model)
            print((__import__("pathlib").Path(output_dir) / "report.md").read_text())
            return 0
        if "edits" in args.tasks.split(","):
            parser.error("--tasks edits is a task of its own (model editing): do not mix it with others")
        from .runner import EvalConfig, run

        cfg = EvalConfig(compressors=[c.strip() for c in args.compressor.split(",") if c.strip()],
                         base_model=args.base_model, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                         context_lengths=args.context_length, ratios=args.ratios, num_samples=args.num_samples,
                         output_dir=args.output_dir or f"results/{args.compressor.split(',')[0].strip('/').split('/')[-1]}",
                         scoring=args.scoring, seed=args.seed, max_new_tokens=args.max_new_tokens,
                         timing_samples=args.timing_samples, n_prompts=args.n_prompts,
                         references=not args.no_references, dtype=args.dtype, num_questions=args.num_questions,
                         multi_turn=args.multi_turn)
        cfg.validate()  # before loading any model: bad input fails in a second
        run(cfg, progress=not args.no_progress)
        print((__import__("pathlib").Path(cfg.output_dir) / "report.md").read_text())
        return 0
    except (CtxzipError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cli() -> None:
    """The ``ctxzip-eval`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
