"""Sections 1 and 2 of the GPU suite: the CSKV decode kernel's correctness and its speed.

1. ``decode_attention_triton`` (``compressors/cskv/kernel.py``, version 2) against
   ``decode_attention_reference`` (computed in fp32 from the same stored inputs) on the odd-shaped cases
   of ``compressors.cskv.testing`` in fp16 and bf16, plus SmolLM2-shaped cases with float / 8-bit / 4-bit
   latents, ragged rows and masks, called with the kernel's defaults (as the model calls it), with one
   split per row (the single-launch path) and with one KV head per program.
2. One decode step of one layer at SmolLM2-135M shapes (9 query / 3 KV heads, head_dim 64) and the
   CSKV ranks of ``recipes/configs/cskv/gpu.yaml``: the fused kernel (version 2, every latent format),
   the previous kernel (``cskv_kernel_v1.py``, kept here only as the baseline, at the config's format),
   the PyTorch reference on the same cache, and dense SDPA over the full bf16 K/V cache, at 1k-128k
   tokens and batch 1 / 16. Bytes moved are counted from the tensors each method must read (and
   write) once; the roofline is the device-to-device copy bandwidth measured in the same run. Then a
   small sweep of version 2's knobs (block size, warps, stages, splits, heads per program) at three
   points, while the section's time lasts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from suite_common import ROOT, Clock, Results, bench

from ctxzip.compressors.cskv.config import rank_for
from ctxzip.compressors.cskv.quant import LatentStore, store
from ctxzip.compressors.cskv.reference import decode_attention_reference
from ctxzip.compressors.cskv.testing import KERNEL_CASES, kernel_inputs

# Pass: max |kernel - reference| <= TOLERANCE * max |reference|. The kernel rounds q, the reconstructed
# keys / values and the probabilities to the dtype before each dot product (fp32 accumulation), so its
# error scales with the output's magnitude and the dtype's unit roundoff u (fp16 2^-11, bf16 2^-8):
# the bounds are ~20u (fp16) and ~8u (bf16). An emulation of those roundings in PyTorch on the
# SmolLM2-shaped cases gives max errors up to ~1% of max |reference| in bf16.
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-5}
# Also reported (not the criterion): elementwise allclose with the CPU test's fp16 tolerances, which
# have no magnitude scaling (the test's cases have outputs of order 1; SmolLM2-shaped ones reach ~10).
ALLCLOSE = {torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2), torch.float32: (2e-5, 2e-5)}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# SmolLM2-135M attention (compressors/models.py's embedded model): 9 query heads, 3 KV heads, head_dim 64.
Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64

# Correctness cases that check a path of the kernel other than its default, by case name: keyword
# arguments added to the call (the case tuples keep their 6 fields).
CASE_TUNING: dict[str, dict[str, Any]] = {
    "smollm2-T1000-4-bit-one-split": dict(split_size=1 << 20),  # one split per row: no combine launch
    "smollm2-T1000-4-bit-one-head": dict(heads_per_program=1),  # 3 programs per row, as version 1 had
    "smollm2-T1000-4-bit-keys-t": dict(keys_transposed=True),  # keys reconstructed as [head dim, tokens]
    "smollm2-T1000-4-bit-exact-rope": dict(fast_rope=False),  # libdevice sin / cos instead of the fast path
}


@dataclass
class CSKVShape:
    """The latent cache format of a CSKV config at SmolLM2 shapes."""

    rank_k: int
    rank_v: int
    bits: int | None
    group_size: int
    window: int


def cskv_gpu_shape(path: str = "recipes/configs/cskv/gpu.yaml") -> CSKVShape:
    """Ranks, bits, group size and window of the CSKV GPU recipe, for one SmolLM2 layer."""
    cfg = yaml.safe_load((ROOT / path).read_text())
    out = KV_HEADS * HEAD_DIM
    density = float(cfg.get("density", 0.5))
    value_density = cfg.get("value_density")
    value_density = density if value_density is None else float(value_density)
    return CSKVShape(rank_for(density, out), rank_for(value_density, out), cfg.get("quant_bits"),
                     int(cfg.get("quant_group_size", 32)), int(cfg.get("window", 32)))


# ----- 1. correctness -------------------------------------------------------------------------------
def correctness_cases(smoke: bool) -> list[tuple[str, tuple[Any, ...], torch.dtype, int | None, int | None, int]]:
    """``(name, shape, dtype, split_size, block_n, group_size)`` for every check (None: the kernel's default).

    Smoke (CPU interpreter): fp16 only (the interpreter has no bf16), the small cases.
    """
    dtypes = [torch.float16] if smoke else [torch.float16, torch.bfloat16]
    cases = []
    for dtype in dtypes:
        for name, (*shape, split) in KERNEL_CASES.items():
            shape = list(shape)
            shape[9] = dtype  # every case in the low precision of the GPU run
            cases.append((name, tuple(shape), dtype, split, 16, 4))
    if smoke:  # float + bias + ragged, 8-bit, 4-bit, and the SmolLM2 GQA ratio and ranks
        keep = ("gqa3-odd-ranks", "gqa4-8bit-d24", "gqa2-4bit-odd-rank")
        return [c for c in cases if c[0] in keep] + [_smollm2_case(torch.float16, 4, 37, 5, 16, smoke=True)]
    cskv = cskv_gpu_shape()
    for dtype in dtypes:
        for bits in (None, 8, 4):
            # SmolLM2 layer, ragged rows, masked keys, default splits and block (as the model calls it)
            cases.append(_smollm2_case(dtype, bits, 1000, cskv.window, None, cskv=cskv, batch=4))
        cases.append(_smollm2_case(dtype, cskv.bits, 4099, cskv.window, None, cskv=cskv, batch=2))
        for suffix in ("one-split", "one-head", "keys-t", "exact-rope"):
            name, *rest = _smollm2_case(dtype, 4, 1000, cskv.window, None, cskv=cskv, batch=4)
            cases.append((f"{name}-{suffix}", *rest))
    return cases


def _smollm2_case(dtype: torch.dtype, bits: int | None, length: int, window: int, split: int | None,
                  cskv: CSKVShape | None = None, batch: int = 2, block_n: int | None = None, smoke: bool = False,
                  ) -> tuple[str, tuple[Any, ...], torch.dtype, int | None, int | None, int]:
    rank_k, rank_v, group = (cskv.rank_k, cskv.rank_v, cskv.group_size) if cskv else (38, 38, 32)
    if smoke:  # a small head_dim keeps the interpreter fast; the GQA ratio and ranks stay SmolLM2's
        shape = (batch, KV_HEADS, Q_HEADS // KV_HEADS, 16, length, window, rank_k, rank_v, bits, dtype, False, True,
                 True)
        return (f"smollm2-gqa3-{bits or 'float'}", shape, dtype, split, 16, group)
    shape = (batch, KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM, length, window, rank_k, rank_v, bits, dtype, False,
             True, True)
    return (f"smollm2-T{length}-{bits or 'float'}-bit" if bits else f"smollm2-T{length}-float", shape, dtype,
            split, block_n, group)


def section_correctness(record: dict[str, Any], results: Results, clock: Clock, device: str, smoke: bool) -> None:
    from ctxzip.compressors.cskv.kernel import decode_attention_triton

    rows: list[dict[str, Any]] = []
    record["rows"] = rows
    record["criterion"] = ("rel_err = max abs(kernel - reference) / max abs(reference) <= tol (fp16 1e-2, bf16 3e-2); "
                           "the reference runs in fp32 on the same stored (fp16 / bf16 / quantized) inputs; "
                           "rel_l2 = norm(error) / norm(reference); allclose = elementwise abs(error) <= "
                           "atol + rtol * abs(reference) with the CPU test's (atol, rtol), for information")
    for name, shape, dtype, split, block_n, group in correctness_cases(smoke):
        row: dict[str, Any] = {"case": name, "dtype": DTYPE_NAMES[dtype], "bits": shape[8] or "float",
                               "kernel": "v2",
                               "shape": "B{} kv{} g{} d{} T{} W{} r{}/{}".format(*shape[:8])}
        try:
            args, kwargs = kernel_inputs(*shape, seed=len(rows), group_size=group, device=device)
            want = decode_attention_reference(**{**args, "q": args["q"].float()}, **kwargs)  # fp32 oracle
            tuning = {"split_size": split, "block_n": block_n, **CASE_TUNING.get(name, {})}
            got = decode_attention_triton(**args, **kwargs, **{k: v for k, v in tuning.items() if v is not None})
            if device == "cuda":
                torch.cuda.synchronize()
            atol, rtol = ALLCLOSE[dtype]
            err = (got.float() - want).abs()
            scale = want.abs().max().clamp(min=1e-6)
            rel_err = float(err.max() / scale)
            row.update(max_abs_err=float(err.max()), rel_err=rel_err,
                       rel_l2=float((got.float() - want).norm() / want.norm().clamp(min=1e-6)), tol=TOLERANCE[dtype],
                       allclose=bool((err <= atol + rtol * want.abs()).all()),
                       passed=rel_err <= TOLERANCE[dtype] and got.dtype == dtype and bool(torch.isfinite(got).all()))
        except Exception as exc:  # noqa: BLE001 - one broken case is a result, not the end of the section
            row.update(passed=False, error=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
        results.write()
        clock.log(f"  correctness {name} {row['dtype']}: {'ok' if row['passed'] else 'FAIL'} "
                  f"rel_err={row.get('rel_err', float('nan')):.2e}" + (f" {row['error']}" if "error" in row else ""))
    record["passed"] = sum(r["passed"] for r in rows)
    record["failed"] = len(rows) - record["passed"]
    if record["failed"]:
        record["status"] = "failed"


# ----- 2. speed -------------------------------------------------------------------------------------
def copy_bandwidth(device: str, smoke: bool) -> dict[str, float]:
    """Device-to-device copy bandwidth, (read + write bytes) / time, on a buffer far larger than L2."""
    nbytes = (16 if smoke else 1024) * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = bench(lambda: dst.copy_(src), cuda=device == "cuda")
    return {"buffer_mib": nbytes / 2**20, "ms": timing["ms"], "gb_per_s": 2 * nbytes / (timing["ms"] * 1e-3) / 1e9}


def _nbytes(*tensors: torch.Tensor | LatentStore | None) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, LatentStore):
            total += t.nbytes
        elif t is not None:
            total += t.numel() * t.element_size()
    return total


def latent_cache(batch: int, tokens: int, cskv: CSKVShape, bits: int | None, dtype: torch.dtype, device: str,
                 ) -> dict[str, Any]:
    """One layer's decode inputs for a context of ``tokens``: ``tokens - window`` latents and a full window.

    Latents are drawn on the device (at 128k x 16 a CPU build would take long) with SVD-like
    channel scales; values do not change the kernel's speed, only its inputs' sizes do.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    length, window = tokens - cskv.window, cskv.window
    out = KV_HEADS * HEAD_DIM

    def lat(rank: int) -> LatentStore:
        spread = torch.linspace(2.0, 0.2, rank, device=device)
        raw = torch.randn(batch, length, rank, generator=gen, device=device, dtype=torch.float32) * spread
        return store(raw.to(dtype) if bits is None else raw, bits, cskv.group_size, dtype)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    return dict(
        q=randn(batch, Q_HEADS, HEAD_DIM), latent_k=lat(cskv.rank_k), latent_v=lat(cskv.rank_v),
        up_k=randn(out, cskv.rank_k, scale=0.4), bias_k=None, up_v=randn(out, cskv.rank_v, scale=0.4), bias_v=None,
        positions=torch.arange(length, device=device, dtype=torch.int32).expand(batch, length).contiguous(),
        inv_freq=1.0 / (100000.0 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM)),
        window_k=randn(batch, KV_HEADS, window, HEAD_DIM), window_v=randn(batch, KV_HEADS, window, HEAD_DIM),
    )


def cskv_bytes(args: dict[str, Any]) -> int:
    """What the fused kernel must read once (latents + quantization parameters, positions, window,
    up-projections, q) and write (the output)."""
    return _nbytes(args["q"], args["latent_k"], args["latent_v"], args["up_k"], args["up_v"], args["positions"],
                   args["inv_freq"], args["window_k"], args["window_v"]) + _nbytes(args["q"])


def memory_needed(batch: int, tokens: int, cskv: CSKVShape, with_reference: bool) -> int:
    """Bytes the largest method of one speed point allocates at once (an upper estimate)."""
    dense = 2 * batch * KV_HEADS * tokens * HEAD_DIM * 2  # bf16 K and V
    latent = 2 * batch * tokens * (cskv.rank_k + 8) * 4  # fp32 draw before quantization, K and V
    need = dense + latent
    if with_reference:
        # reconstructed fp32 K / V, their concatenation with the window, cos / sin, RoPE temporaries
        need += batch * tokens * (KV_HEADS * HEAD_DIM * 4 * 6 + HEAD_DIM * 4 * 4)
    return need


# Knob sweep of the version 2 kernel (after the main table, while the section's time lasts): the default
# first, then one change at a time. Each distinct (block_n, num_warps, num_stages, heads_per_program) is a
# separate Triton compile (a few seconds); programs_per_sm only changes the grid.
SWEEP_POINTS = ((1, 32768), (16, 8192), (16, 131072))
SWEEP_CONFIGS: tuple[dict[str, Any], ...] = (  # most informative first: the deadline may cut the tail
    {},  # the defaults: block_n 64, 4 warps, 2 stages, 4 programs per SM, 3 KV heads per program, fast RoPE
    dict(heads_per_program=1),  # no register spills, but each latent read and cos / sin computed 3 times
    dict(block_n=128),
    dict(block_n=32),
    dict(programs_per_sm=2),  # fewer, longer splits (no compile: only the grid changes)
    dict(programs_per_sm=8),
    dict(num_warps=8),
    dict(keys_transposed=True),
    dict(fast_rope=False),  # libdevice sin / cos (what v1 used): the cost of exact RoPE
    dict(num_stages=3),
    dict(num_stages=1),
    dict(block_n=128, num_warps=8),
)


def _config_name(config: dict[str, Any]) -> str:
    short = {"block_n": "bn", "num_warps": "w", "num_stages": "st", "programs_per_sm": "pps",
             "heads_per_program": "hpp", "keys_transposed": "kt", "fast_rope": "fast_rope"}
    return "v2[" + (",".join(f"{short[k]}={v}" for k, v in config.items()) or "default") + "]"


def section_speed(record: dict[str, Any], results: Results, clock: Clock, device: str, smoke: bool,
                  deadline_s: float) -> None:
    """Time one decode step per (batch, tokens, method); stop starting new points past ``deadline_s``;
    then sweep the kernel's knobs at ``SWEEP_POINTS`` until ``deadline_s``."""
    from cskv_kernel_v1 import decode_attention_triton as kernel_v1

    from ctxzip.compressors.cskv.kernel import decode_attention_triton

    cuda = device == "cuda"
    cskv = cskv_gpu_shape()
    dtype = torch.bfloat16 if cuda else torch.float16
    record["config"] = {"layer": "one of 30 (SmolLM2-135M)", "q_heads": Q_HEADS, "kv_heads": KV_HEADS,
                        "head_dim": HEAD_DIM, "rank_k": cskv.rank_k, "rank_v": cskv.rank_v, "bits": cskv.bits,
                        "group_size": cskv.group_size, "window": cskv.window, "dtype": DTYPE_NAMES[dtype],
                        "source": "recipes/configs/cskv/gpu.yaml"}
    copy = copy_bandwidth(device, smoke)
    record["copy_bandwidth"] = copy
    roof = copy["gb_per_s"]
    clock.log(f"  copy bandwidth {roof:.0f} GB/s")
    rows: list[dict[str, Any]] = []
    record["rows"] = rows
    record["notes"] = [
        "bytes = each input read once + the output written once: dense = bf16 K and V of every token; CSKV = "
        "packed latents with their fp16 scale / zero, int32 positions, the full-precision window and the "
        "up-projections. roofline = (bytes / time) / the device-to-device copy bandwidth measured in this run",
        "cskv_kernel_* = version 2 (compressors/cskv/kernel.py: one program per batch row and split for all 3 "
        "KV heads, so each latent is read once; values accumulated in rank space; window in the last split); "
        "cskv_kernel_v1_* = the previous kernel (benchmarks/gpu/cskv_kernel_v1.py: one program per KV head, "
        "values reconstructed per token, separate window and combine launches), same inputs. Their notes "
        "give the speedup of v2 over v1 and v2's max error relative to max |v1| (and to the reference)",
        "sdpa = torch SDPA (default backend choice, enable_gqa); sdpa_flash = the FlashAttention backend, "
        "GQA folded into 3 query rows per KV head; cskv_reference = the PyTorch path (reconstruct, rotate, "
        "attend) on the same latent cache",
        "v2[...] rows: the knob sweep (bn = block_n, w = num_warps, st = num_stages, pps = programs_per_sm, "
        "hpp = heads_per_program, kt = keys_transposed, fast_rope; default = bn 64, 4 warps, 2 stages, 4 "
        "programs / SM, 3 KV heads per program, fast RoPE), the config's latent format",
    ]
    batches = (2,) if smoke else (1, 16)
    lengths = (64,) if smoke else (1024, 8192, 32768, 131072)
    free = torch.cuda.mem_get_info()[0] if cuda else None
    speedups: dict[str, float] = {}
    record["v2_over_v1"] = speedups
    for batch in batches:
        for tokens in lengths:
            if clock.elapsed() > deadline_s:
                rows.append({"batch": batch, "tokens": tokens, "method": "all",
                             "note": "skipped: the section's time budget is spent"})
                continue
            with_reference = batch * tokens <= 16 * 32768  # the reference is the slow oracle: not at 128k x 16
            need = memory_needed(batch, tokens, cskv, with_reference)
            if free is not None and need > 0.8 * free:
                rows.append({"batch": batch, "tokens": tokens, "method": "all",
                             "note": f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"})
                results.write()
                continue
            _speed_point(rows, batch, tokens, cskv, dtype, device, roof, with_reference, smoke,
                         decode_attention_triton, kernel_v1, speedups)
            results.write()
            summary = ", ".join(f"{r['method']} {r['ms']:.3f} ms" for r in rows
                                if r.get("batch") == batch and r.get("tokens") == tokens and "ms" in r)
            clock.log(f"  speed B={batch} T={tokens}: {summary}")
            if cuda:
                torch.cuda.empty_cache()
    _sweep(record, rows, results, clock, device, smoke, deadline_s, cskv, dtype, roof, decode_attention_triton)


def _sweep(record: dict[str, Any], rows: list[dict[str, Any]], results: Results, clock: Clock, device: str,
           smoke: bool, deadline_s: float, cskv: CSKVShape, dtype: torch.dtype, roof: float, kernel: Any) -> None:
    """Time the knob configurations at the sweep points (configs outer: one compile each); rows go to the
    speed table as ``v2[...]`` methods, the best config per point to ``record["sweep_best"]``."""
    cuda = device == "cuda"
    points = ((2, 64),) if smoke else SWEEP_POINTS
    configs = SWEEP_CONFIGS[:2] if smoke else SWEEP_CONFIGS
    sdpa = {(r["batch"], r["tokens"]): r["ms"] for r in rows if r.get("method") == "sdpa" and "ms" in r}
    inputs = {}
    for batch, tokens in points:
        if clock.elapsed() > deadline_s:
            break
        inputs[(batch, tokens)] = latent_cache(batch, tokens, cskv, cskv.bits, dtype, device)
    best: dict[str, str] = {}
    record["sweep_best"] = best
    default_ms: dict[tuple[int, int], float] = {}
    kw = dict(sm_scale=HEAD_DIM ** -0.5)
    for config in configs:
        if clock.elapsed() > deadline_s or not inputs:
            rows.append({"method": _config_name(config), "note": "sweep: skipped, the section's time budget is spent"})
            continue
        for (batch, tokens), args in inputs.items():
            row: dict[str, Any] = {"batch": batch, "tokens": tokens, "method": _config_name(config),
                                   "bytes_mb": cskv_bytes(args) / 1e6, "note": "sweep"}
            try:
                timing = bench(lambda a=args, c=config: kernel(**a, **kw, **c), cuda)
                row.update(ms=timing["ms"], ms_p20=timing["ms_p20"], ms_p80=timing["ms_p80"])
                row["gb_per_s"] = cskv_bytes(args) / (timing["ms"] * 1e-3) / 1e9
                row["roofline"] = row["gb_per_s"] / roof
                if (batch, tokens) in sdpa:
                    row["vs_sdpa"] = sdpa[(batch, tokens)] / timing["ms"]
                if not config:
                    default_ms[(batch, tokens)] = timing["ms"]
                elif (batch, tokens) in default_ms:
                    row["note"] = f"sweep: x{default_ms[(batch, tokens)] / timing['ms']:.2f} vs default"
                row["note"] += _compiled_info()
            except Exception as exc:  # noqa: BLE001 - a config the compiler refuses (e.g. out of resources)
                row["note"] = f"sweep: error: {type(exc).__name__}: {exc}"[:200]
            rows.append(row)
        results.write()
        clock.log("  sweep " + _config_name(config) + ": " + ", ".join(
            f"B={r['batch']} T={r['tokens']} {r['ms']:.3f} ms" for r in rows[-len(inputs):] if "ms" in r))
    for batch, tokens in inputs:
        timed = [r for r in rows if r.get("note", "").startswith("sweep") and r.get("batch") == batch
                 and r.get("tokens") == tokens and "ms" in r]
        if timed:
            fastest = min(timed, key=lambda r: r["ms"])
            best[f"B{batch}_T{tokens}"] = f"{fastest['method']} {fastest['ms']:.4g} ms"
    del inputs
    if cuda:
        torch.cuda.empty_cache()


def _compiled_info() -> str:
    """Registers, spills and shared memory of the main kernel's latest compile ('' when unknown)."""
    from ctxzip.compressors.cskv import kernel

    compiled = kernel.LAST_COMPILED.get("main")
    try:
        regs, spills = getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)
        shared = getattr(getattr(compiled, "metadata", None), "shared", None)
    except Exception:  # noqa: BLE001 - triton versions differ; this is only a note
        return ""
    if regs is None and spills is None:
        return ""
    return f"; regs {regs}, spills {spills}, smem {shared}"


def _speed_point(rows: list[dict[str, Any]], batch: int, tokens: int, cskv: CSKVShape, dtype: torch.dtype,
                 device: str, roof: float, with_reference: bool, smoke: bool, kernel: Any, kernel_v1: Any,
                 speedups: dict[str, float]) -> None:
    cuda = device == "cuda"
    point: list[dict[str, Any]] = []

    def add(method: str, fn: Any, nbytes: int, note: str = "", context: Any = None) -> dict[str, Any]:
        row: dict[str, Any] = {"batch": batch, "tokens": tokens, "method": method, "bytes_mb": nbytes / 1e6,
                               "note": note}
        try:
            with context if context is not None else contextlib.nullcontext():  # entered once, not per call
                timing = bench(fn, cuda)
            row.update(ms=timing["ms"], ms_p20=timing["ms_p20"], ms_p80=timing["ms_p80"])
            row["gb_per_s"] = nbytes / (timing["ms"] * 1e-3) / 1e9
            row["roofline"] = row["gb_per_s"] / roof
        except Exception as exc:  # noqa: BLE001 - e.g. a backend that refuses the shape
            row["note"] = (note + " " if note else "") + f"error: {type(exc).__name__}: {exc}"[:200]
        point.append(row)
        return row

    # dense: the full bf16 cache of one layer
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, generator=gen, device=device).to(dtype)
    k = torch.randn(batch, KV_HEADS, tokens, HEAD_DIM, generator=gen, device=device).to(dtype)
    v = torch.randn(batch, KV_HEADS, tokens, HEAD_DIM, generator=gen, device=device).to(dtype)
    dense_bytes = _nbytes(q, k, v) + _nbytes(q)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    add("sdpa", lambda: sdpa(q, k, v, enable_gqa=True), dense_bytes)
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q_grouped = q.view(batch, KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM)  # a GQA group's heads as query rows
        add("sdpa_flash", lambda: sdpa(q_grouped, k, v), dense_bytes, context=sdpa_kernel([SDPBackend.FLASH_ATTENTION]))

    variants = [cskv.bits] + [b for b in (8, None) if b != cskv.bits]
    kw = dict(sm_scale=HEAD_DIM ** -0.5)
    for bits in variants if not smoke else [cskv.bits]:
        args = latent_cache(batch, tokens, cskv, bits, dtype, device)
        nbytes = cskv_bytes(args)
        name = f"{bits}bit" if bits else "float"
        fmt = "latents " + (f"{bits}-bit" if bits else DTYPE_NAMES[dtype])
        new = add(f"cskv_kernel_{name}", lambda a=args: kernel(**a, **kw), nbytes, fmt)
        compiled = _compiled_info()
        new["note"] += compiled
        if bits != cskv.bits:
            del args
            continue
        old = add(f"cskv_kernel_v1_{name}", lambda a=args: kernel_v1(**a, **kw), nbytes, fmt + ", previous kernel")
        checks = []
        try:
            got = kernel(**args, **kw).float()
            base = kernel_v1(**args, **kw).float()
            checks.append(f"rel_err vs v1 {float((got - base).abs().max() / base.abs().max().clamp(min=1e-6)):.1e}")
            if with_reference:
                ref = decode_attention_reference(**args, **kw).float()
                checks.append(f"vs reference {float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-6)):.1e}")
        except Exception as exc:  # noqa: BLE001 - a failed check is a result
            checks.append(f"check error: {type(exc).__name__}: {exc}"[:160])
        if "ms" in new and "ms" in old:
            speedups[f"B{batch}_T{tokens}"] = round(old["ms"] / new["ms"], 3)
            checks.insert(0, f"x{old['ms'] / new['ms']:.2f} vs v1")
        new["note"] = "; ".join([fmt, *checks]) + compiled
        if with_reference:
            add(f"cskv_reference_{name}", lambda a=args: decode_attention_reference(**a, **kw), nbytes,
                "PyTorch reference, same cache")
        del args
    base = next((r["ms"] for r in point if r["method"] == "sdpa" and "ms" in r), None)
    for row in point:
        if base and "ms" in row:
            row["vs_sdpa"] = base / row["ms"]
    rows.extend(point)
