"""The evaluation runner behind ``python -m ctxzip.eval``: methods x tasks x ratios, resumable.

A *configuration* is one (task, context length, method, requested ratio). A task's pending
configurations run sample by sample: each sample's context is prefilled ONCE (``shared_prefill``)
for every method that can start from a prefill (a ``PrefillSelection``: KV selection, the full context,
Selective Context, EHPC), and the rows of every configuration are checkpointed after each sample
(``<output_dir>/partial/``), so a killed run resumes at the sample where it stopped. A finished
configuration's rows and summary go to ``<output_dir>/configs/<key>.json`` (atomic) and are never
recomputed. A passage compressor (CoLoR) on a corpus task compresses each passage on its own.

Measured per configuration: accuracy (``loglik`` or ``generate`` scoring), the achieved ratio
(context tokens per real memory slot), the bytes the memory holds, compression time (what producing
that memory alone costs: with a shared prefill, its time plus the method's own work), answer time (reading the
question + answer after the memory), per-token decode time and prompt-read time (``time_decode``
on the first ``timing_samples`` samples), and, timed end to end on those samples, the time to answer
``n_prompts`` prompts from one context: compress once + N answers (``time_many_prompts``), beside the
full cache built once and reused (the full-context configuration's own figure: prefix caching) and
re-reading the full context for every prompt (``time_rereading``, measured in the full-context
configuration). The no-context configuration (the question alone) is the floor of every table.

Everything runs on ``--device_map`` (the base model, the learned compressors, the memories; times wait for the
device's queued work). Under ``accelerate launch`` each process loads the model on its own device and answers a
contiguous block of each task's samples, checkpointing to a file of its own; the main process merges the rows in
sample order, so every file it writes holds the numbers one process would have written. A timed sample
(``index < timing_samples``) is timed in the process that answers it: with the default ``timing_samples=1``,
process 0 (beside the others, which share the machine while it is timed).
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch

from ctxzip.compressors import (
    COMPRESSORS,
    CompressedLM,
    Compressor,
    compressor_class,
    load_base,
    load_compressor,
)
from ctxzip.compressors.base import EVAL_TASKS
from ctxzip.compressors.baselines import BASELINES, FullContext, FullContextConfig, PrefillSelection
from ctxzip.compressors.baselines.selection import ContextPrefill, prefill_context
from ctxzip.compressors.conversation import ConversationLayout
from ctxzip.compressors.errors import ContextTooLongError, CtxzipError, UnknownCompressorError
from ctxzip.compressors.io import write_json_atomic
from ctxzip.data import TASKS, build_task
from ctxzip.data.benchmarks import is_benchmark, load_benchmark
from ctxzip.data.tasks import layout_passages

from .report import write_outputs
from .scoring import (
    GENERATION_TASKS,
    interval_fields,
    memory_for,
    score_row,
    summarize,
    synchronize,
    time_decode,
    time_many_prompts,
    time_rereading,
)

FULL_CONTEXT = "full_context"  # every context token kept: the ceiling, and the reference of the N-prompt timings
NO_CONTEXT = "no_context"  # the question alone, no memory: the floor every method is read against
REFERENCES = (FULL_CONTEXT, NO_CONTEXT, "truncation")
NATIVE_LENGTH = 0  # an external benchmark's rows keep their own context lengths
NATIVE_RATIO = 0.0  # the ratio a configuration is keyed by when the method's ratio is its own (learned ones)
SHARED_CONTEXT_TASKS = ("niah_multikey", "fact_qa")  # several facts per context: k questions about one memory
PROMPT_MARGIN = 128  # tokens reserved for the question and the answer after the context


@dataclass
class EvalConfig:
    """What ``python -m ctxzip.eval`` evaluates and how: every field is a command-line flag (``--num_samples``
    or ``--num-samples``) and a key of a YAML file given with ``--config`` (the flags override it; an unknown
    key is an error). A finished run writes its own ``config.yaml``, which ``--config`` takes back."""

    compressors: list[str] = field(default_factory=list, metadata={"aliases": ["--compressor"], "help": (
        "the methods to evaluate: training-free baseline names (snapkv, truncation, ...), saved compressor "
        "folders, Hub repo ids, or a registered learned type built untrained; several share the full-context, "
        "no-context and truncation references")})
    learned_config: list[str] = field(default_factory=list, metadata={"help": (
        "KEY=VALUE settings that replace those saved with every learned compressor evaluated, for how it reads a "
        "context (e.g. recent_tokens=128: a gist memory keeps the context's last 128 tokens raw); the tables name "
        "the method with them")})
    compare: list[str] | None = field(default=None, metadata={"help": (
        "instead of evaluating: merge the metrics of these finished run folders into one report (in --output_dir)")})
    base_model: str | None = field(default=None, metadata={"help": (
        "the base model (Hub id, folder or embedded name); default: the one the first saved compressor names")})
    tasks: list[str] = field(default_factory=lambda: ["passkey", "niah_multikey", "fact_qa"], metadata={"help": (
        "synthetic tasks (ctxzip.data.TASKS), a method's own evaluation task (see the registered ones in the "
        "error message of an unknown task), or benchmarks read through datasets: longbench:SOURCE[:SUBSET], "
        "ruler:FILE.jsonl, scbench:SOURCE[:SUBSET]")})
    context_lengths: list[int] = field(default_factory=lambda: [2048], metadata={
        "aliases": ["--context_length", "--context-length"],
        "help": "context lengths in tokens (a benchmark keeps its own rows' lengths)"})
    ratios: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0, 16.0], metadata={"help": (
        "compression ratios requested from the training-free methods (a learned compressor's ratio is its own)")})
    num_samples: int = field(default=50, metadata={"help": "samples per task and context length"})
    output_dir: str | None = field(default=None, metadata={"help": (
        "where the results go (default results/<first compressor's name>); a rerun resumes there")})
    scoring: Literal["generate", "loglik"] = field(default="generate", metadata={"help": (
        "generate: greedy replies scored against the answer (the headline, what a user sees); loglik: the "
        "teacher-forced answer likelihood (a fast proxy)")})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic samples"})
    source: str = field(default="pydoc", metadata={"help": (
        "the synthetic tasks' filler text: pydoc (the default training corpus), stdlib (standard-library "
        "docstrings: a corpus the default training never reads), a local file or folder, or a Hub dataset")})
    split: Literal["train", "test"] = field(default="test", metadata={"help": (
        "the synthetic tasks' split: test draws held-out filler text and its own random stream")})
    max_new_tokens: int = field(default=16, metadata={"help": "longest generated reply"})
    timing_samples: int = field(default=1, metadata={"help": (
        "samples per configuration whose decoding and many-prompt answering are timed")})
    decode_steps: int = field(default=8, metadata={"help": "decode steps timed per timing sample"})
    n_prompts: int = field(default=10, metadata={"help": (
        "N of the compress-once, answer-N-prompts timing (beside the reused full cache and re-reading)")})
    references: bool = field(default=True, metadata={"help": (
        "also run the full context (the ceiling), no context (the floor) and truncation; --no_references skips them")})
    dtype: str = field(default="float32", metadata={"help": "dtype of the base model (float32, bfloat16, float16)"})
    device_map: str | None = field(default=None, metadata={"help": (
        "where the base model, the learned compressors, the memories and the timings run: cuda, cpu, a device "
        "(cuda:1) or auto (accelerate spreads the base model over the visible devices); default: cuda when "
        "available, else cpu. Under accelerate launch the default, cuda and auto are each process's own device")})
    num_questions: int = field(default=1, metadata={"help": (
        "shared-context mode (SCBench): ask this many questions about each context, all from ONE memory "
        "(niah_multikey, fact_qa); the report gives accuracy by question")})
    multi_turn: bool = field(default=False, metadata={"help": (
        "shared-context mode: each question is a turn after the model's own earlier answers")})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no_progress hides it)"})

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS and not is_benchmark(t)]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known tasks: {', '.join(sorted(TASKS))}; a method's own "
                             f"evaluation, run alone: {', '.join(sorted(EVAL_TASKS)) or 'none registered'}; or a "
                             "benchmark (longbench:SOURCE[:SUBSET], ruler:FILE, scbench:SOURCE[:SUBSET])")
        bad = [r for r in self.ratios if not r >= 1]
        if bad:
            raise ValueError(f"compression ratios must be >= 1, got {bad}")
        if self.scoring not in ("loglik", "generate"):
            raise ValueError(f"scoring must be 'loglik' or 'generate', got {self.scoring!r}")
        if self.num_questions > 1:
            plain = [t for t in self.tasks if t not in SHARED_CONTEXT_TASKS and not is_benchmark(t)]
            if plain:
                raise ValueError(f"--num-questions > 1 needs tasks with several facts per context "
                                 f"({', '.join(SHARED_CONTEXT_TASKS)}), not {plain}")
        if self.multi_turn and (self.num_questions < 2 or self.scoring != "generate"):
            raise ValueError("--multi-turn needs --num-questions >= 2 and --scoring generate (each turn follows "
                             "the model's own earlier answers)")
        if not self.compressors:
            raise ValueError("give at least one --compressor")
        if self.num_samples < 1 or any(n < 1 for n in self.context_lengths):
            raise ValueError("num_samples and context lengths must be >= 1")
        for name in self.compressors:
            kind_of_method(name)
        parse_learned_config(self.learned_config)
        check_device_map(self.device_map)

    @property
    def learned_overrides(self) -> tuple[tuple[str, Any], ...]:
        """``learned_config`` as sorted (key, value) pairs (hashable: labels are cached by them)."""
        return tuple(sorted(parse_learned_config(self.learned_config).items()))


def parse_learned_config(items: list[str]) -> dict[str, Any]:
    """``["recent_tokens=128", "name=x"]`` -> ``{"recent_tokens": 128, "name": "x"}`` (values read as JSON when
    they parse, else kept as strings)."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--learned_config takes KEY=VALUE settings, got {item!r}")
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    return values


def kind_of_method(name: str) -> str:
    """``baseline`` (a registered training-free name), ``untrained`` (a registered learned type, built fresh on
    the base model: the floor a trained one is read against), ``saved`` (a folder) or ``hub`` (a repo id)."""
    if name in BASELINES or name == NO_CONTEXT:
        return "baseline"
    if name in COMPRESSORS:
        return "untrained"
    if Path(name).is_dir():
        return "saved"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return "hub"
    known = sorted({*BASELINES, NO_CONTEXT})
    learned = sorted(set(COMPRESSORS) - set(BASELINES))
    raise UnknownCompressorError(
        f"unknown compressor {name!r}: not a baseline ({', '.join(known)}), not a learned type "
        f"({', '.join(learned)}), not a saved compressor folder, not a Hub repo id")


def check_device_map(value: str | None) -> None:
    """Refuse a ``--device_map`` that is neither auto nor a device torch knows, or a CUDA device this machine lacks."""
    if value is None or value == "auto":
        return
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise ValueError(f"--device_map must be auto, cuda, cpu or a device such as cuda:1, got {value!r}") from exc
    if device.type == "meta":
        raise ValueError("--device_map meta holds no weights: give auto, cuda, cpu or a device such as cuda:1")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device_map {value}: no CUDA device is available here (give cpu, or leave it out)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device_map {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")


PROCESS_TIMEOUT = timedelta(hours=24)  # how long a process that finished its share waits for the others


def process_state() -> Any:
    """accelerate's ``PartialState``: this process's index among the processes of ``accelerate launch`` (one
    process, index 0, when run without it). Without a GPU (or under ``--cpu``) the processes talk over gloo. A
    process waits for the others at the end of each task, for as long as a share can take (a resumed share may
    have nothing left while another's is whole): ``PROCESS_TIMEOUT``, not the backend's default minutes."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available(),
                        timeout=PROCESS_TIMEOUT)


def resolve_device_map(value: str | None, state: Any) -> str:
    """The device map this process loads with: ``auto`` or one device. The default is cuda when available (and
    not refused by ``accelerate launch --cpu``), else cpu; with several processes the default, ``cuda`` and
    ``auto`` are the process's own device (its GPU, or the CPU), so that every process holds a whole model."""
    if value is None or (state.num_processes > 1 and value in ("auto", "cuda")):
        return str(state.device) if state.device.type == "cuda" else "cpu"
    return value


def load_on(name: str, dtype: str, device_map: str) -> tuple[Any, Any]:
    """``load_base`` onto ``device_map``: ``auto`` is accelerate's placement over the visible devices, a device is
    where the weights load. A model that ``load_base`` builds in-process without a device map (the tiny test
    model) is moved there (``auto``: to cuda when available, else the CPU)."""
    model, tokenizer = load_base(name, dtype=dtype, device_map=None if device_map == "cpu" else device_map)
    if getattr(model, "hf_device_map", None) is None:
        model.to(("cuda" if torch.cuda.is_available() else "cpu") if device_map == "auto" else device_map)
    return model.eval(), tokenizer


def on_base_device(compressor: Compressor) -> Compressor:
    """The compressor's own modules on its base model's device (they are built on the CPU)."""
    devices = {p.device for p in compressor.base_lm.parameters()}
    if len(devices) > 1:
        raise CtxzipError(f"a learned compressor ({compressor.compressor_type}) on a base model spread over several "
                          f"devices ({', '.join(sorted(map(str, devices)))}) is not supported: give --device_map one "
                          "device (cuda, cuda:1, cpu)")
    return compressor.to(devices.pop())


def load_learned(name: str, base_model: str | None, dtype: str, device_map: str = "cpu",
                 overrides: tuple[tuple[str, Any], ...] = ()) -> Compressor:
    """A learned method on its own copy of the base model, on ``device_map``: a saved folder or Hub id (on the base
    model it names, unless ``base_model``), or a registered type built untrained on ``base_model``; ``overrides``
    replace settings of its config (``--learned_config``)."""
    if kind_of_method(name) == "untrained":
        if base_model is None:
            raise ValueError(f"--base_model is required to build an untrained {name!r} compressor")
        model, tokenizer = load_on(base_model, dtype, device_map)
        kind = compressor_class(name)
        config = kind.config_class.from_dict(dict(overrides))
        return on_base_device(CompressedLM(kind(config, model).eval(), tokenizer).compressor)
    from ctxzip.compressors.hub import read_metadata, resolve_folder

    model, tokenizer = load_on(base_model or read_metadata(resolve_folder(name, None))["base_model"], dtype,
                               device_map)
    return on_base_device(load_compressor(name, model=model, tokenizer=tokenizer, config_overrides=dict(overrides))[0])


PER_QUESTION = " (a memory per question)"


@functools.cache
def label_for(name: str, overrides: tuple[tuple[str, Any], ...] = ()) -> str:
    """A method's name in every table: a baseline's name, a saved folder's name or a Hub id (a learned one followed
    by its ``--learned_config`` settings), and for a learned compressor whose memory is made per question
    (QD-LCIRC) a mark saying so (its compression is per question)."""
    kind = kind_of_method(name)
    if kind == "baseline":
        return name
    settings = " [" + ", ".join(f"{key}={value}" for key, value in overrides) + "]" if overrides else ""
    from ctxzip.compressors.hub import read_metadata, resolve_folder

    if kind == "untrained":
        label, compressor_type = f"{name} (untrained)", name
    else:
        label = Path(name).name if kind == "saved" else name
        compressor_type = read_metadata(resolve_folder(name, None))["compressor_type"]
    label += settings
    return label + PER_QUESTION if compressor_class(compressor_type).memory_per_query else label


SHARED_MARK = "@"


def task_label(cfg: EvalConfig, task: str) -> str:
    """How a task's results are named: ``niah_multikey@3q`` (``@3q-turns``) in the shared-context mode."""
    if cfg.num_questions <= 1 or is_benchmark(task):
        return task
    return f"{task}{SHARED_MARK}{cfg.num_questions}q" + ("-turns" if cfg.multi_turn else "")


def config_key(task: str, length: int, method: str, ratio: float) -> str:
    safe_task, safe = (re.sub(r"[^\w.@-]+", "_", name) for name in (task, method))
    return f"{safe_task}__L{length}__{safe}__r{ratio:g}"


def task_lengths(cfg: EvalConfig, task: str) -> list[int]:
    """The context lengths a task runs at: the requested ones, or 0 ("native") for a benchmark's own."""
    return [NATIVE_LENGTH] if is_benchmark(task) else list(cfg.context_lengths)


class Method:
    """One evaluated method on a shared base model: builds its compressor per ratio and makes the memories of a
    context with the time one compression costs. ``method_for`` picks the type that says how (this one: one
    compression per ratio; ``FromPrefill``: a ``PrefillSelection`` baseline; ``NoContext``: the floor)."""

    def __init__(self, name: str, model: Any, tokenizer: Any, learned: Compressor | None = None,
                 label: str | None = None) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.label = label or label_for(name)
        # a learned method runs on its own copy of the base model (``method_for`` loads it): a LoRA adapter
        # injected into the shared model would otherwise also change what the baselines read
        self.learned = learned
        # a calibrated baseline (Q-Filters, EHPC) computes or loads its artifact here, once, so that it is not
        # counted in the first sample's compression time (a no-op for the others)
        self.compressor(1.0).prepare()

    @property
    def takes_ratio(self) -> bool:
        """Whether the evaluated ratios are this method's own setting (a training-free method with a ``ratio``)."""
        return self.learned is None and any(f.name == "ratio" for f in fields(COMPRESSORS[self.name].config_class))

    def ratios(self, requested: list[float]) -> list[float]:
        """The ratios its configurations run at: the requested ones when it takes a ratio; else one, keyed
        ``NATIVE_RATIO`` for a learned method (its ratio is its own config's), and 1 for a training-free one
        without a ratio (the full context)."""
        if self.takes_ratio:
            return list(requested)
        return [NATIVE_RATIO] if self.learned is not None else [1.0]

    @property
    def reads_beyond_window(self) -> bool:
        """Whether the method runs on contexts longer than the base model's positions."""
        return (self.learned if self.learned is not None else COMPRESSORS[self.name]).reads_beyond_window

    def compressor(self, ratio: float) -> Compressor:
        if self.learned is not None:
            return self.learned
        cls = COMPRESSORS[self.name]
        settings = {"max_context_tokens": 10**9, **({"ratio": ratio} if self.takes_ratio else {})}
        return cls(cls.config_class.from_dict(settings), self.model).eval().use_tokenizer(self.tokenizer)

    def prefill_needs(self) -> tuple[int, bool] | None:
        """What a shared prefill must hold for this method (window, token NLL), or None when the
        method does not start from one (only a ``FromPrefill`` method does)."""
        return None

    def memories(self, ratios: list[float], context: str, prefill: ContextPrefill | None = None,
                 time_alone: bool = False, passages: list[str] | None = None,
                 question: str | None = None) -> tuple[list[Any], float | None]:
        """Memories of ``context`` for each ratio and the seconds one compression takes. A passage compressor
        (CoLoR) on a corpus task (``passages``) compresses each passage on its own; otherwise the method's type
        says how (``compress_context``)."""
        first = self.compressor(ratios[0])
        if passages and first.compresses_passages:
            synchronize(first.device)
            start = time.perf_counter()
            mems = [first.compress_passages(passages, layout_passages) for _ in ratios]
            synchronize(first.device)
            return mems, (time.perf_counter() - start) / len(ratios)
        return self.compress_context(first, ratios, context, prefill, time_alone, question)

    def compress_context(self, first: Compressor, ratios: list[float], context: str, prefill: ContextPrefill | None,
                         time_alone: bool, question: str | None) -> tuple[list[Any], float | None]:
        """One compression per ratio (``first``: the compressor at ``ratios[0]``); the time is the longest one,
        work done earlier and cached (SoftPromptComp's summaries) charged as if done now. The memory is made for
        the question when the method makes one per question (``memory_per_query``)."""
        mems, spent = [], 0.0
        for ratio in ratios:
            clm = CompressedLM(self.compressor(ratio), self.tokenizer)
            synchronize(clm.device)
            start = time.perf_counter()
            memory = memory_for(clm, context, question)
            synchronize(clm.device)
            spent = max(spent, time.perf_counter() - start + memory.meta.get("cached_compute_s", 0.0))
            mems.append(memory)
        return mems, spent


class FromPrefill(Method):
    """A method whose compressor is a ``PrefillSelection`` (the full context, KV selection, Selective Context,
    EHPC): its memories come from the sample's shared prefill, or from one pass of its own at every ratio."""

    def prefill_needs(self) -> tuple[int, bool] | None:
        if not hasattr(self, "_needs"):
            self._needs = self.compressor(2.0).prefill_needs()
        return self._needs

    def compress_context(self, first: Compressor, ratios: list[float], context: str, prefill: ContextPrefill | None,
                         time_alone: bool, question: str | None) -> tuple[list[Any], float | None]:
        """From a shared ``prefill``: the time is its time plus this method's own selection when the method's
        own path is exactly a full prefill + selection (``prefill_is_own_cost``); otherwise (EHPC's early-exit
        pass) the method runs alone when ``time_alone`` and the time is None elsewhere. Alone: every ratio
        from one pass (``compress_ratios``), timed once."""
        own_cost = first.prefill_is_own_cost
        if prefill is not None and (own_cost or not time_alone):
            start = time.perf_counter()
            mems = [m.detach() for m in first.compress_from(prefill, ratios)]
            synchronize(first.device)
            return mems, (prefill.seconds + time.perf_counter() - start) if own_cost else None
        if len(ratios) > 1:
            ids, mask = CompressedLM(first, self.tokenizer).tokenize_context(context)
            synchronize(first.device)
            start = time.perf_counter()
            with torch.no_grad():
                mems = [m.detach() for m in first.compress_ratios(ids, mask, ratios)]
            synchronize(first.device)
            return mems, time.perf_counter() - start
        return super().compress_context(first, ratios, context, prefill, time_alone, question)


class NoContext(Method):
    """The floor: the question alone, with no memory (read by the full context's decoder, given none). It runs
    at every length, and making its (absent) memory costs nothing."""

    @property
    def reads_beyond_window(self) -> bool:
        return True  # no context is never too long

    def ratios(self, requested: list[float]) -> list[float]:
        return [NATIVE_RATIO]

    def compressor(self, ratio: float) -> Compressor:
        return FullContext(FullContextConfig(max_context_tokens=10**9), self.model).eval()

    def compress_context(self, first: Compressor, ratios: list[float], context: str, prefill: ContextPrefill | None,
                         time_alone: bool, question: str | None) -> tuple[list[Any], float | None]:
        return [None] * len(ratios), 0.0


def method_for(name: str, model: Any, tokenizer: Any, base: str | None = None, dtype: str = "float32",
               label: str | None = None, device_map: str | None = None,
               overrides: tuple[tuple[str, Any], ...] = ()) -> Method:
    """The evaluated method ``name`` (``kind_of_method``), of the type that says how it makes its memories. A
    learned one loads on ``device_map`` (default: the shared ``model``'s device) with ``overrides`` in its config."""
    if name == NO_CONTEXT:
        return NoContext(name, model, tokenizer, label=label)
    learned = None if kind_of_method(name) == "baseline" else load_learned(
        name, base, dtype, device_map or str(model.device), overrides)
    kind = type(learned) if learned is not None else COMPRESSORS[name]
    cls = FromPrefill if issubclass(kind, PrefillSelection) else Method
    return cls(name, model, tokenizer, learned=learned, label=label or label_for(name, overrides))


def shared_prefill(methods: list[Method], model: Any, tokenizer: Any, context: str) -> ContextPrefill | None:
    """ONE prefill of ``context`` holding what every method in ``methods`` that can share it needs."""
    needs = [n for n in (m.prefill_needs() for m in methods) if n is not None]
    if not needs:
        return None
    # what CompressedLM gives a compressor: the beginning of the conversation (template prefix + context)
    ids = torch.tensor([ConversationLayout(tokenizer).context_ids(context)], device=model.device)
    synchronize(model.device)
    prefill = prefill_context(model, ids, window=max(w for w, _ in needs), token_nll=any(t for _, t in needs))
    start = time.perf_counter()
    synchronize(model.device)  # the prefill's queued device work is part of its time
    return replace(prefill, seconds=prefill.seconds + time.perf_counter() - start)


def achieved(memory: Any) -> tuple[float, float]:
    """(achieved ratio by the memory kind's rule, mean real slots per row)."""
    real = memory.real_slots
    return memory.ratio, sum(real) / len(real)


def beyond_window(model: Any, length: int) -> bool:
    """Whether a context of ``length`` tokens (+ ``PROMPT_MARGIN`` for the question and answer) is longer than
    the base model's positions: only methods that read beyond the window (RCC, truncation) can run there."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return limit is not None and length + PROMPT_MARGIN > limit


def check_length(model: Any, lengths: list[int], methods: list[Method], verbose: bool = True) -> None:
    """Refuse a length at which no evaluated method but no-context can run; say which are skipped (``verbose``)."""
    for length in (n for n in lengths if beyond_window(model, n)):
        able = [m.label for m in methods if m.reads_beyond_window and not isinstance(m, NoContext)]
        if not able:
            raise ContextTooLongError(
                f"context length {length} (+{PROMPT_MARGIN} tokens for the question and answer) exceeds the base "
                f"model's {model.config.max_position_embeddings} positions, and none of the methods reads beyond "
                f"them (those that do: {', '.join(sorted(n for n, c in COMPRESSORS.items() if c.reads_beyond_window))})")
        skipped = [m.label for m in methods if not m.reads_beyond_window]
        if verbose:
            print(f"context length {length} is beyond the base model's {model.config.max_position_embeddings} "
                  f"positions: {', '.join(skipped) or 'no method'} cannot run there (skipped); {', '.join(able)} can")


def load_model_for(cfg: EvalConfig, device_map: str = "cpu") -> tuple[Any, Any, str]:
    base = cfg.base_model
    if base is None:
        learned = [c for c in cfg.compressors if kind_of_method(c) in ("saved", "hub")]
        if not learned:
            raise ValueError("--base_model is required unless a saved compressor (which names its base) is evaluated")
        from ctxzip.compressors.hub import read_metadata, resolve_folder

        base = read_metadata(resolve_folder(learned[0], None))["base_model"]
    model, tokenizer = load_on(base, cfg.dtype, device_map)
    return model, tokenizer, base


def run(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Evaluate every pending configuration, then write ``metrics.json``, ``predictions.jsonl``,
    ``config.yaml``, ``report.md`` and the plots. Returns the summaries of all configurations.

    Under ``accelerate launch`` every process loads the model and answers its share of each task's samples
    (``samples_of``); the main process merges the shares and writes the outputs, which are those of one
    process (but for the timings: each timed sample is measured in the process that answers it)."""
    from tqdm.auto import tqdm

    cfg.validate()
    state = process_state()
    device_map = resolve_device_map(cfg.device_map, state)
    model, tokenizer, base = load_model_for(cfg, device_map)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys((list(REFERENCES) if cfg.references else []) + cfg.compressors))
    methods = [method_for(name, model, tokenizer, base, cfg.dtype, device_map=device_map,
                          overrides=cfg.learned_overrides) for name in names]
    check_length(model, cfg.context_lengths, methods, verbose=state.is_main_process)
    plan = []  # (task label, length, method, pending ratios)
    for task in (task_label(cfg, t) for t in cfg.tasks):
        for length in task_lengths(cfg, task):
            for method in methods:
                if beyond_window(model, length) and not method.reads_beyond_window:
                    continue
                pending = [r for r in method.ratios(cfg.ratios)
                           if not (out / "configs" / f"{config_key(task, length, method.label, r)}.json").exists()]
                if pending:
                    plan.append((task, length, method, pending))
    state.wait_for_everyone()  # every process plans before the main one writes a configuration
    total = sum(len(ratios) for _, _, _, ratios in plan) * len(samples_of(cfg.num_samples, state))
    bar = tqdm(total=total, desc="eval", unit="answer", disable=not cfg.progress or not state.is_main_process)
    by_task: dict[tuple[str, int], list[tuple[Method, list[float]]]] = {}
    answered = 0  # rows this process scores (not those resumed from a checkpoint)
    for task, length, method, ratios in plan:
        by_task.setdefault((task, length), []).append((method, ratios))
    for (task, length), pending in by_task.items():
        name = task.split(SHARED_MARK)[0]
        if is_benchmark(name):
            dataset = load_benchmark(name, tokenizer, limit=cfg.num_samples)
        else:
            options = {"num_questions": cfg.num_questions} if cfg.num_questions > 1 else {}
            dataset = build_task(name, tokenizer, num_samples=cfg.num_samples, context_tokens=length,
                                 seed=cfg.seed, split=cfg.split, source=cfg.source, **options)
        answered += evaluate_task(cfg, out, task, length, pending, dataset, model, tokenizer, bar, state)
    bar.close()
    if state.num_processes > 1:
        print(f"process {state.process_index} of {state.num_processes}: {answered} answers scored", flush=True)
    summaries = collect(out, cfg)
    if state.is_main_process:
        write_outputs(out, summaries, dict(asdict(cfg), base_model=base))
    state.wait_for_everyone()
    return summaries


def samples_of(num_samples: int, state: Any) -> list[int]:
    """The sample indices this process answers: a contiguous block of ``range(num_samples)``, by accelerate's
    ``split_between_processes`` (the first processes take one more where the count does not divide; with fewer
    samples than processes the last ones take none). One process answers them all."""
    with state.split_between_processes(list(range(num_samples))) as mine:
        return list(mine)


def partial_stem(task: str, length: int) -> str:
    safe = re.sub(r"[^\w.@-]+", "_", task)
    return f"{safe}__L{length}"


def partial_path(out: Path, task: str, length: int, state: Any) -> Path:
    """Where this process checkpoints its rows of a task: ``partial/<task>__L<length>.json`` in one process,
    ``...__process<i>.json`` for process ``i`` of several (no two processes write one file)."""
    suffix = "" if state.num_processes == 1 else f"__process{state.process_index}"
    return out / "partial" / f"{partial_stem(task, length)}{suffix}.json"


def partial_files(out: Path, task: str, length: int) -> list[Path]:
    """Every checkpoint of a task's rows, whichever process (and however many processes) wrote it."""
    stem = partial_stem(task, length)
    return [p for p in (out / "partial" / f"{stem}.json", *sorted((out / "partial").glob(f"{stem}__process*.json")))
            if p.is_file()]


def read_partials(out: Path, task: str, length: int) -> dict[str, dict[int, dict[str, Any]]]:
    """The rows already scored for a task, from every checkpoint: ``{configuration key: {sample index: row}}``."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for path in partial_files(out, task, length):
        for key, by_index in json.loads(path.read_text()).items():
            rows.setdefault(key, {}).update((int(i), row) for i, row in by_index.items())
    return rows


def evaluate_task(cfg: EvalConfig, out: Path, task: str, length: int,
                  pending: list[tuple[Method, list[float]]], dataset: Any, model: Any, tokenizer: Any,
                  bar: Any, state: Any = None) -> int:
    """All pending configurations of one task, sample by sample (this process's samples, ``samples_of``):
    each sample's context is prefilled ONCE for every method that can share the prefill. Rows are checkpointed
    after every sample (``partial/``, one file per process), so a killed run resumes at the sample where it
    stopped, with any number of processes; when every process is done the main one merges the rows in sample
    order into each configuration's file. Returns the number of rows this process scored."""
    state = state or process_state()
    keys = {(m.label, r): config_key(task, length, m.label, r) for m, ratios in pending for r in ratios}
    saved = read_partials(out, task, length)
    state.wait_for_everyone()  # every process has read the checkpoints before any is rewritten
    rows: dict[str, dict[int, dict[str, Any]]] = {k: saved.get(k, {}) for k in keys.values()}
    mine = samples_of(len(dataset), state)
    own_path = partial_path(out, task, length, state)
    bar.update(sum(i in r for r in rows.values() for i in mine))
    answered = 0
    for index in mine:
        todo = [(m, [r for r in ratios if index not in rows[keys[m.label, r]]]) for m, ratios in pending]
        todo = [(m, ratios) for m, ratios in todo if ratios]
        if not todo:
            continue
        sample = dataset[index]
        bar.set_postfix_str(f"{task} L={length} sample {index}")
        prefill = shared_prefill([m for m, _ in todo], model, tokenizer, sample["context"])
        passages = json.loads(sample["metadata"]).get("passages")
        for method, ratios in todo:
            mems, compress_s = method.memories(ratios, sample["context"], prefill,
                                               time_alone=index < cfg.timing_samples, passages=passages,
                                               question=sample["question"])
            for ratio, memory in zip(ratios, mems):
                result = evaluate_sample(cfg, method, ratio, memory, sample, index)
                result.update(task=task, ratio=ratio, context_length=length, compress_s=compress_s)
                rows[keys[method.label, ratio]][index] = result
                answered += 1
                bar.update(1)
        del prefill
        write_json_atomic(own_path, {k: {i: r[i] for i in mine if i in r} for k, r in rows.items()}, indent=1,
                          default=float)
    state.wait_for_everyone()
    if state.is_main_process:
        merged = read_partials(out, task, length)
        for method, ratios in pending:
            for ratio in ratios:
                meta = dict(task=task, context_length=length, method=method.label, ratio=ratio,
                            scoring="generate" if task in GENERATION_TASKS else
                            ("teacher-forced NLL" if task == "continuation" else cfg.scoring),
                            source=method.name)
                key = keys[method.label, ratio]
                done = merged.get(key, {})
                lost = [i for i in range(len(dataset)) if i not in done]
                if lost:
                    raise RuntimeError(f"{key}: no rows for samples {lost} in {out / 'partial'}")
                ordered = [done[i] for i in range(len(dataset))]
                write_json_atomic(out / "configs" / f"{key}.json",
                                  {"summary": summarize(ordered, meta), "rows": ordered}, indent=1, default=float)
        for path in partial_files(out, task, length):
            path.unlink()
        if (out / "partial").is_dir() and not any((out / "partial").iterdir()):
            (out / "partial").rmdir()
    state.wait_for_everyone()  # the configurations are written before any process goes on
    return answered


def evaluate_sample(cfg: EvalConfig, method: Method, ratio: float, memory: Any, sample: dict[str, Any],
                    index: int) -> dict[str, Any]:
    """Score one memory on its sample's question (and time its decoding on the first samples)."""
    clm = CompressedLM(method.compressor(ratio), method.tokenizer)
    result = score_row(clm, memory, sample, cfg.scoring, cfg.max_new_tokens, cfg.multi_turn)
    ach, real = achieved(memory) if memory is not None else (float("nan"), 0.0)
    result.update(id=sample["id"], method=method.label, context_tokens=sample["context_tokens"],
                  question=sample["question"],
                  answer=sample["answer"] if sample["task"] != "autoencoding" else sample["answer"][:200],
                  achieved_ratio=ach, real_slots=real, memory_bytes=memory.nbytes if memory is not None else 0)
    if index < cfg.timing_samples and sample["question"]:
        result["prompt_s"], result["decode_s_per_token"] = time_decode(
            clm, memory, sample["question"], cfg.decode_steps)
        # N prompts from one context, timed end to end (the same question N times: the cost, not the answers)
        prompts, prefix = [sample["question"]] * cfg.n_prompts, sample.get("answer_prefix") or ""
        context = None if memory is None else sample["context"]  # no memory (the floor): the prompts alone
        result["n_prompts_s"] = time_many_prompts(clm, context, prompts, cfg.max_new_tokens, prefix)
        if method.name == FULL_CONTEXT:
            result["n_prompts_reread_s"] = time_rereading(clm, sample["context"], prompts, cfg.max_new_tokens, prefix)
    return result


def collect(out: Path, cfg: EvalConfig | None = None) -> list[dict[str, Any]]:
    """Summaries of the finished configurations in ``out`` (all of them, or those ``cfg`` asks for), each
    with the two competitors of its measured N-prompt time from the full-context configuration of the same
    task and length: the full cache built once and reused (prefix caching), and re-reading the context for
    every prompt."""
    summaries = []
    for path in sorted((out / "configs").glob("*.json")):
        saved = json.loads(path.read_text())
        if "intervals" not in saved["summary"]:  # finished before summaries had intervals: from its rows
            saved["summary"].update(interval_fields(saved["rows"]))
        summaries.append(saved["summary"])
    if cfg is not None:
        labels = {label_for(n, cfg.learned_overrides) for n in (list(REFERENCES) if cfg.references else [])
                  + cfg.compressors}
        tasks = {task_label(cfg, t) for t in cfg.tasks}
        lengths = {length for t in cfg.tasks for length in task_lengths(cfg, t)}
        summaries = [s for s in summaries if s["task"] in tasks and s["context_length"] in lengths
                     and s["method"] in labels]
    n_prompts = cfg.n_prompts if cfg is not None else 10
    full = {(s["task"], s["context_length"]): s for s in summaries if s["method"] == FULL_CONTEXT}
    for s in summaries:
        s["n_prompts"] = n_prompts
        ref = full.get((s["task"], s["context_length"]), {})
        s["n_prompts_prefix_cache_s"] = ref.get("n_prompts_s", float("nan"))
        s["n_prompts_reread_s"] = ref.get("n_prompts_reread_s", float("nan"))
    return summaries

