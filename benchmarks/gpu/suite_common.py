"""Shared pieces of the GPU suite: bootstrap (paths, carried wheels), the clock, results on disk, timing.

Nothing here imports torch at module level: ``bootstrap`` must run first (it decides
``TRITON_INTERPRET`` and puts carried wheels on ``sys.path`` before torch / triton / transformers
are imported).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = HERE / ".cache"  # ignored by git (.gitignore has ".cache/"); carried to the GPU machine on demand
WHEELS = CACHE / "wheels"


# ----- bootstrap ------------------------------------------------------------------------------------
def add_paths() -> None:
    """The repository root (the code is not pip-installed on the GPU machine) and this folder.

    Installed, ``ctxzip.compressors`` etc. are mapped onto the repository's top-level folders (pyproject's
    package-dir); from a bare checkout the same mapping is ``ctxzip``'s package path extended with the root."""
    for path in (str(HERE), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import ctxzip

    if str(ROOT) not in ctxzip.__path__:
        ctxzip.__path__.append(str(ROOT))


def _wheel_top_levels(wheel: zipfile.ZipFile) -> list[str]:
    """Importable top-level names of a wheel: its top_level.txt, else the first parts of its RECORD."""
    names = wheel.namelist()
    top = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    if top:
        found = [line.strip() for line in wheel.read(top[0]).decode().splitlines() if line.strip()]
        if found:
            return found
    out: set[str] = set()
    for name in names:
        first = name.split("/")[0]
        if first.endswith((".dist-info", ".data")):
            continue
        out.add(first[:-3] if first.endswith(".py") else first.split(".")[0])
    return sorted(out)


def install_wheels(wheel_dir: Path = WHEELS, site_dir: Path | None = None) -> dict[str, str]:
    """Make the carried wheels importable without pip or network: each wheel whose modules are not
    already importable is unpacked into ``site_dir`` (a wheel is a zip of its install tree; the
    dist-info comes along, so ``importlib.metadata`` sees its version), which goes on ``sys.path``.

    A module the machine already has is never shadowed: the machine's own version stays in use.
    Returns ``{wheel file: "installed" | "present" | "error: ..."}``.
    """
    report: dict[str, str] = {}
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if not wheels:
        return report
    site_dir = site_dir or Path(tempfile.gettempdir()) / "ctxzip-gpu-site"
    site_dir.mkdir(parents=True, exist_ok=True)
    if str(site_dir) not in sys.path:
        sys.path.insert(1, str(site_dir))
    for path in wheels:
        try:
            with zipfile.ZipFile(path) as wheel:
                tops = _wheel_top_levels(wheel)
                present = [t for t in tops if t.isidentifier() and _importable(t)]
                if _installed(path.name.split("-")[0]) or (tops and len(present) == len(tops)):
                    report[path.name] = "present"
                    continue
                wheel.extractall(site_dir)
                report[path.name] = "installed"
        except Exception as exc:  # noqa: BLE001 - one bad wheel must not stop the suite
            report[path.name] = f"error: {exc}"
    importlib.invalidate_caches()
    return report


def _installed(distribution: str) -> bool:
    """Whether a distribution of that (wheel-normalized) name is installed, in any version."""
    from importlib import metadata

    try:
        metadata.distribution(distribution)
        return True
    except metadata.PackageNotFoundError:
        return False


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ----- progress and time ----------------------------------------------------------------------------
class Clock:
    """Wall time since the suite started, against its budget."""

    def __init__(self, budget_s: float, log_file: Path | None = None) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.log_file = log_file

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        """Timestamped progress on stdout (flushed: the device returns only the output's tail) and in the log file."""
        line = f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s] {message}"
        print(line, flush=True)
        if self.log_file is not None:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(line + "\n")


# ----- results --------------------------------------------------------------------------------------
class Results:
    """The suite's results, rewritten to ``results.json`` and ``results.md`` after every change, so a
    run killed at any point leaves what it had measured."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {"meta": meta, "sections": {}}

    def section(self, name: str) -> dict[str, Any]:
        return self.data["sections"].setdefault(name, {"status": "running"})

    def update(self, name: str, **values: Any) -> None:
        self.section(name).update(values)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.out / "results.json", json.dumps(self.data, indent=2, default=_jsonable) + "\n")
        _atomic_write(self.out / "results.md", render_markdown(self.data))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _atomic_write(path: Path, text: str) -> None:
    from ctxzip.compressors.io import write_text_atomic  # after add_paths(); torch is imported by then

    write_text_atomic(path, text)


def run_section(results: Results, clock: Clock, name: str, fn: Callable[[dict[str, Any]], None],
                min_seconds: float) -> None:
    """Run one section: skipped (with the reason) when less than ``min_seconds`` of the budget is
    left; any exception is recorded with its traceback and the suite goes on."""
    if clock.remaining() < min_seconds:
        reason = f"skipped: {clock.remaining():.0f} s of the budget left, the section needs about {min_seconds:.0f} s"
        clock.log(f"{name}: {reason}")
        results.update(name, status="skipped", reason=reason)
        return
    clock.log(f"{name}: start")
    record = results.section(name)
    started = time.monotonic()
    try:
        fn(record)
        if record.get("status") == "running":
            record["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a failed section must not lose the others
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()[-4000:]
        clock.log(f"{name}: ERROR {record['error']}")
    record["seconds"] = round(time.monotonic() - started, 1)
    results.write()
    clock.log(f"{name}: {record['status']} in {record['seconds']} s")


# ----- timing ---------------------------------------------------------------------------------------
def bench(fn: Callable[[], Any], cuda: bool, warmup_ms: int = 25, rep_ms: int = 100) -> dict[str, float]:
    """Median (and 20 / 80th percentile) milliseconds of ``fn``.

    On a GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, so every call
    reads its inputs from HBM as a real decode step would). On the CPU (smoke mode): wall clock.
    """
    if cuda:
        import triton.testing

        median, low, high = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"ms": float(median), "ms_p20": float(low), "ms_p80": float(high)}
    fn()  # warm-up (the interpreter, allocations)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"ms": statistics.median(times), "ms_p20": times[0], "ms_p80": times[-1]}


def environment() -> dict[str, Any]:
    """Versions and device facts that every number depends on."""
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "host": platform.node()}
    for name in ("triton", "transformers", "accelerate", "peft", "liger_kernel", "datasets", "trl", "gguf",
                 "huggingface_hub", "pyarrow"):
        info[name] = _version(name)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    else:
        info.update(device=f"cpu ({os.cpu_count()} cores)")
    return info


def _version(module: str) -> str | None:
    from importlib import metadata

    dist = {"liger_kernel": "liger-kernel", "huggingface_hub": "huggingface-hub"}.get(module, module)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def slug(name: str) -> str:
    """A folder name for a device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ----- markdown -------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(no rows)\n"
    head = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    return head + "".join("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |\n" for r in rows)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value).replace("|", "/")


SECTION_TITLES = {
    "kernel_correctness": "1. CSKV decode kernel vs PyTorch reference",
    "kernel_speed": "2. Decode attention speed: CSKV latent cache vs dense SDPA",
    "training_throughput": "3. Training throughput (random weights, SmolLM2-135M shapes)",
    "real_run": "4. Real gist run (embedded weights)",
}
SECTION_COLUMNS = {
    "kernel_correctness": ["case", "dtype", "bits", "shape", "max_abs_err", "rel_err", "rel_l2", "tol", "allclose",
                           "passed", "error"],
    "kernel_speed": ["batch", "tokens", "method", "ms", "bytes_mb", "gb_per_s", "roofline", "vs_sdpa", "note"],
    "training_throughput": ["variant", "batch", "tokens_per_step", "step_ms", "tokens_per_s", "peak_mem_gib",
                            "loss", "trainer", "note"],
}


def render_markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    env = meta.get("environment", {})
    lines = [f"# GPU suite: {env.get('device', '?')}", "",
             f"Run {meta.get('started')} with `{meta.get('command')}` (mode: {meta.get('mode')}, "
             f"budget {meta.get('budget_s')} s, finished: {meta.get('finished', 'no')}).", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None and k != "device"), ""]
    if meta.get("wheels"):
        lines += ["Carried wheels: " + ", ".join(f"{k} ({v})" for k, v in meta["wheels"].items()), ""]
    for name, record in data["sections"].items():
        lines += [f"## {SECTION_TITLES.get(name, name)}", "", f"Status: **{record.get('status')}**"
                  + (f" ({record['seconds']} s)" if "seconds" in record else ""), ""]
        if record.get("reason"):
            lines += [f"Reason: {record['reason']}", ""]
        if record.get("error"):
            lines += ["Error:", "", "```", record["error"], "```", ""]
        for key, value in record.items():
            if key in ("status", "seconds", "reason", "error", "traceback", "rows", "notes"):
                continue
            if isinstance(value, (str, int, float, bool)) or value is None:
                lines.append(f"- {key}: {_cell(value)}")
            elif isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
                lines.append(f"- {key}: " + ", ".join(f"{k}={_cell(v)}" for k, v in value.items()))
        lines.append("")
        rows = record.get("rows")
        if rows:
            columns = SECTION_COLUMNS.get(name) or list(rows[0])
            lines += [table(rows, columns)]
        for note in record.get("notes", []):
            lines.append(f"- {note}")
        if record.get("notes"):
            lines.append("")
        if record.get("traceback"):
            lines += ["<details><summary>traceback</summary>", "", "```", record["traceback"], "```", "",
                      "</details>", ""]
    return "\n".join(lines) + "\n"
