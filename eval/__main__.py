"""``python -m ctxzip.eval`` (or ``ctxzip-eval``): evaluate compressors beside the full context, no context and
truncation, or merge finished runs.

    python -m ctxzip.eval --compressor snapkv --base_model smollm2-135m-instruct \\
        --tasks passkey niah_multikey fact_qa --context_lengths 2048 --ratios 2 4 8 16 \\
        --num_samples 50 --output_dir results/snapkv
    python -m ctxzip.eval --config my_eval.yaml --num_samples 100     # YAML defaults, flags override
    python -m ctxzip.eval --compare results/gist results/snapkv --output_dir results/compare
    accelerate launch --multi_gpu --num_processes 2 -m ctxzip.eval --compressor snapkv ...   # samples split over 2

Every flag is a field of ``EvalConfig`` (``ctxzip.eval.runner``) or of a method's own evaluation task (its
``Arguments``); flags take ``_`` or ``-``; a finished run's ``config.yaml`` is a valid ``--config``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from trl import TrlParser

from ctxzip.compressors.errors import CtxzipError

from .runner import EvalConfig


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default after its help."""


def method_tasks() -> dict[str, ModuleType]:
    """The evaluation tasks method packages register (``ctxzip.compressors.base.EVAL_TASKS``), imported."""
    from ctxzip.compressors.base import EVAL_TASKS

    return {name: importlib.import_module(path) for name, path in sorted(EVAL_TASKS.items())}


def make_parser(tasks: dict[str, ModuleType] | None = None) -> TrlParser:
    tasks = method_tasks() if tasks is None else tasks
    arguments = list(dict.fromkeys(module.Arguments for module in tasks.values()))
    return TrlParser([EvalConfig, *arguments], prog="python -m ctxzip.eval", description=__doc__,
                     formatter_class=_HelpFormatter, allow_abbrev=False)


def check_method_task(task: str, cfg: EvalConfig) -> None:
    """A method's own evaluation task runs in one process, on the models it loads itself: refuse what it would
    not honour (the samples split over the processes of ``accelerate launch``, ``--device_map``)."""
    from .runner import process_state

    processes = process_state().num_processes
    if processes > 1:
        raise ValueError(f"--tasks {task} is a method's own evaluation: it runs in one process and cannot split its "
                         f"samples over the {processes} processes of accelerate launch; run it as python -m "
                         "ctxzip.eval, without accelerate launch")
    if cfg.device_map is not None:
        raise ValueError(f"--tasks {task} is a method's own evaluation: it loads its models itself and does not "
                         f"take --device_map (given {cfg.device_map!r}); leave it out")


def default_output_dir(compressors: list[str]) -> str:
    return f"results/{compressors[0].strip('/').split('/')[-1]}"


def main(argv: list[str] | None = None) -> int:
    tasks = method_tasks()
    parser = make_parser(tasks)
    try:
        cfg, *task_arguments = parser.parse_args_and_config(argv)
    except (ValueError, FileNotFoundError) as exc:  # the YAML file: absent, not a mapping, unknown keys
        parser.error(str(exc))
    try:
        if cfg.compare:
            from .report import compare

            print(compare(cfg.compare, cfg.output_dir))
            return 0
        if not cfg.compressors:
            parser.error("give --compressor (or --compare DIR ...)")
        cfg.output_dir = cfg.output_dir or default_output_dir(cfg.compressors)
        own = [t for t in cfg.tasks if t in tasks]
        if own:
            if len(cfg.tasks) > 1:
                parser.error(f"--tasks {own[0]} is a method's own evaluation: run it alone, not with {cfg.tasks}")
            check_method_task(own[0], cfg)
            module = tasks[own[0]]
            parsed = {type(arguments): arguments for arguments in task_arguments}
            report = module.run(cfg, parsed[module.Arguments])
            print(Path(report).read_text())
            return 0
        from .runner import process_state, run

        cfg.validate()  # before loading any model: bad input fails in a second
        run(cfg)
        if process_state().is_main_process:  # under accelerate launch: one report, printed once
            print((Path(cfg.output_dir) / "report.md").read_text())
        return 0
    except (CtxzipError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cli() -> None:
    """The ``ctxzip-eval`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
