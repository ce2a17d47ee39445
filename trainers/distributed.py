"""What recipes need from the process group: ordered data preparation and the trained tensors."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator

import torch
from accelerate import Accelerator, PartialState
from torch import nn
from transformers import TrainingArguments

from ctxzip.compressors.errors import CtxzipError
from ctxzip.compressors.models import whole_parameters


def refuse_fsdp(args: TrainingArguments) -> None:
    """FSDP is refused before anything loads: a compressor's own modules, its adapters and the frozen base are
    wrapped, gathered and exported through DeepSpeed's ZeRO-2/3 paths only (tested on 2 processes); FSDP would
    shard them with no export path and no test. ``--fsdp`` and an accelerate FSDP config are both caught."""
    launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if args.fsdp or launched:
        raise CtxzipError(
            "FSDP is not supported by ctxzip's recipes (" + ("--fsdp " + " ".join(map(str, args.fsdp)) if args.fsdp
                                                              else "an accelerate FSDP config") +
            "): shard with DeepSpeed instead, accelerate launch --config_file accelerate_configs/zero2.yaml or "
            "zero3.yaml")


@contextlib.contextmanager
def process_group_closed() -> Iterator[None]:
    """Run a recipe, then close this process's process group (if one was set up), however the recipe ends.

    Each process must close its own, while its interpreter is whole: a process group that outlives the
    interpreter's teardown can abort the process (SIGABRT, "terminate called without an active exception")
    when gloo's worker threads release tensors after Python is gone. ``torch.distributed``'s own destroy only
    drops torch's registry entries, so first the finished trainer's reference cycles (the DeepSpeed engine and
    optimizer hold the groups) are collected, then DeepSpeed's destroy, which also releases the groups
    DeepSpeed keeps in module globals, closes the group when DeepSpeed set it up.
    """
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gc.collect()
            deepspeed_comm = sys.modules.get("deepspeed.comm")
            if deepspeed_comm is not None and deepspeed_comm.is_initialized():
                deepspeed_comm.destroy_process_group()
            else:
                torch.distributed.destroy_process_group()
            gc.collect()


@contextlib.contextmanager
def main_process_first(args: TrainingArguments) -> Iterator[None]:
    """Run the block on the global main process first, then on each node's local main, then on the rest.

    For data stages cached on disk: when the cache is on a filesystem every node shares (the usual
    ``output_dir``), only the global main writes it and every other process reads the finished stages;
    when it is node-local, each node's local main builds its own copy before that node's other
    processes read it. (``local_main_process_first`` alone would let the local mains of several nodes
    write one shared cache at the same time.) Every process must enter: the waits are barriers, bounded
    by ``args.ddp_timeout``, so a long data stage needs a ``ddp_timeout`` longer than it.
    """
    _ = args.device  # sets up the process group with the run's ddp_timeout before PartialState is shared
    state = PartialState()
    with state.main_process_first(), state.local_main_process_first():
        yield


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the whole values of ``model``'s trainable parameters, by name.

    Under DeepSpeed ZeRO-3 each process holds a shard of each parameter, so this gathers them: a
    collective that every process must call. Only the trainable parameters are gathered (not the
    frozen base model), which is what a compressor checkpoint or export needs.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with whole_parameters(*(p for _, p in named)):
        return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in named}


def means_over_processes(accelerator: Accelerator, values: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each list of logged values over every process (as Trainer logs ``loss``), by name;
    names with no value on any process are left out. Sums and counts are reduced across processes: a
    collective that every process must join (``Trainer.log`` runs on each one)."""
    names = sorted(values)
    totals = [x for name in names for x in (sum(values[name]), len(values[name]))]
    reduced = accelerator.reduce(torch.tensor(totals, dtype=torch.float64, device=accelerator.device),
                                 reduction="sum").tolist()
    return {name: reduced[2 * i] / reduced[2 * i + 1] for i, name in enumerate(names) if reduced[2 * i + 1]}
