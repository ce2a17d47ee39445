"""CSKV benchmarks (not a test: prints tables, asserts nothing about timings).

``speed`` (default): for context lengths 1k-8k, the bytes a CSKV cache holds against the full
cache, and the decode time per token of the whole model reading a full cache with SDPA, the CSKV
cache through the PyTorch reference, and (on a GPU with Triton) through the fused kernel. Caches
are filled with random tensors of the right shapes (decode time does not depend on the values),
so no 8k-token prefill is needed.

    python benchmarks/cskv_bench.py speed --base-model smollm2-135m-instruct --density 0.2 --bits 4

``profile``: where one layer's decode step over the CSKV cache spends its time, stage by stage, beside SDPA
over the dense cache of the same tokens (random contents, one layer).

    python benchmarks/cskv_bench.py profile --length 32768 --density 0.3 --value-density 1.0 --bits 4

``quality``: held-out continuation perplexity read from the compressed cache, and the real KV
bytes, for a grid of densities x latent bit widths x factor sources (``svd``, ``asvd`` or a
trained export folder), against the full cache. One base-model prefill per text is shared by every
configuration (a CSKV prefill attends exactly; only what the cache keeps differs); the first
configuration is checked against ``CSKVCompressor.compress``.

    python benchmarks/cskv_bench.py quality --densities 0.5,0.3,0.2 --bits none,4 \\
        --sources svd,asvd,out/cskv-d0.5,out/cskv-d0.3,out/cskv-d0.2 --num-samples 16
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctxzip.compressors import CompressedLM, load_base, load_compressor  # noqa: E402
from ctxzip.compressors.compat import with_cache  # noqa: E402
from ctxzip.compressors.cskv import (  # noqa: E402
    CSKVCache,
    CSKVCompressor,
    CSKVConfig,
    cpu_kernel,  # noqa: E402
)
from ctxzip.compressors.cskv.attention import use_kernel  # noqa: E402
from ctxzip.compressors.cskv.cache import EVICT_BLOCK  # noqa: E402
from ctxzip.compressors.cskv.factorization import asvd_scale  # noqa: E402
from ctxzip.compressors.cskv.quant import store  # noqa: E402


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


# ----- speed ---------------------------------------------------------------------------------------
def random_cskv_cache(compressor: CSKVCompressor, length: int, device: torch.device) -> CSKVCache:
    """A CSKV cache of ``length`` tokens with random contents (last ``window`` tokens in full)."""
    spec = compressor.cache_spec()
    window = min(spec.window, length)
    latent = length - window
    tensors: dict[str, torch.Tensor] = {"positions": torch.arange(length, dtype=torch.int32, device=device)[None]}
    for index, layer in enumerate(spec.layers):
        for name, rank in (("k", layer.key_rank), ("v", layer.value_rank)):
            held = store(torch.randn(1, latent, rank, device=device), spec.quant_bits, spec.quant_group_size,
                         spec.dtype)
            tensors.update({f"latent_{name}{suffix}.{index}": t for suffix, t in held.parts().items()})
            tensors[f"window_{name}.{index}"] = torch.randn(1, layer.kv_heads, window, layer.head_dim,
                                                            dtype=spec.dtype, device=device)
            tensors[f"window_latent_{name}.{index}"] = torch.randn(1, window, rank, dtype=spec.dtype, device=device)
    return CSKVCache.from_tensors(spec, tensors, reader=compressor.reader)


def random_full_cache(compressor: CSKVCompressor, length: int, device: torch.device) -> DynamicCache:
    cache = DynamicCache()
    for index, layer in enumerate(compressor.cache_spec().layers):
        shape = (1, layer.kv_heads, length, layer.head_dim)
        dtype = compressor.base_lm.dtype
        cache.update(torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device),
                     index)
    return cache


@torch.no_grad()
def time_decode(model: Any, cache: Any, length: int, steps: int, warmup: int = 2) -> float:
    """Mean seconds per decoded token reading ``cache`` (which grows by one token per step). The mean, not the
    median: a CSKV cache moves decoded tokens to its latent branch once per ``EVICT_BLOCK`` steps, and that step's
    cost belongs in the average (use ``steps`` >= ``EVICT_BLOCK``)."""
    device = next(model.parameters()).device
    token = torch.tensor([[42]], device=device)
    times = []
    for step in range(warmup + steps):
        position = torch.tensor([[length + step]], device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=token, position_ids=position, use_cache=True, **with_cache(cache))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.mean(times)


def speed(args: argparse.Namespace) -> None:
    import os

    model, _ = load_base(args.base_model, dtype=args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    config = CSKVConfig(density=args.density, value_density=args.value_density, window=args.window,
                        quant_bits=args.bits, max_context_tokens=10**9, key_space=args.key_space,
                        quant_group_size=args.quant_group_size)
    compressor = CSKVCompressor(config, model).eval()
    post_rope = config.post_rope
    # the fused path: Triton on a GPU (pre-RoPE keys); the CPU kernels for post-RoPE 8-bit latents
    kernel = (device.type == "cpu" and args.bits == 8 and cpu_kernel.available()) if post_rope else use_kernel(device)
    print(f"# CSKV decode benchmark on {machine()}: {args.base_model} ({args.dtype}), density {args.density} "
          f"(values {args.value_density or args.density}), window {args.window}, latents {args.bits or 'full'}-bit, "
          f"{args.key_space} keys\n")
    header = "| context | full cache MiB | CSKV MiB | reduction | full SDPA ms/tok | CSKV reference ms/tok |"
    header += (" CSKV fused CPU kernels ms/tok | fused vs full |" if post_rope else " CSKV kernel ms/tok |") \
        if kernel else ""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for length in args.lengths:  # past the base's window too: the time of a step depends on neither values nor positions
        full = random_full_cache(compressor, length, device)
        full_bytes = sum(t.numel() * t.element_size() for layer in full.layers for t in (layer.keys, layer.values))
        full_ms = 1000 * time_decode(model, full, length, args.steps)
        del full
        cskv = random_cskv_cache(compressor, length, device)
        cskv_bytes = cskv.nbytes
        os.environ["CTXZIP_DISABLE_KERNELS"] = "1"
        with compressor.installed():
            ref_ms = 1000 * time_decode(model, cskv, length, args.steps)
        os.environ.pop("CTXZIP_DISABLE_KERNELS")
        row = (f"| {length} | {full_bytes / 2**20:.2f} | {cskv_bytes / 2**20:.2f} | "
               f"{100 * (1 - cskv_bytes / full_bytes):.1f}% | {full_ms:.2f} | {ref_ms:.2f} |")
        if kernel:
            cskv = random_cskv_cache(compressor, length, device)
            with compressor.installed():
                fused_ms = 1000 * time_decode(model, cskv, length, args.steps)
            row += f" {fused_ms:.2f} |" + (f" {full_ms / fused_ms:.2f}x faster |" if post_rope else "")
        print(row, flush=True)


@torch.no_grad()
def profile(args: argparse.Namespace) -> None:
    """Where one layer's decode step over the CSKV cache spends its time (the PyTorch reference, stage by stage),
    against SDPA over the dense cache of the same tokens: what a faster CPU path must remove."""
    from ctxzip.compressors.cskv import reference

    model, _ = load_base(args.base_model, dtype=args.dtype)
    config = CSKVConfig(density=args.density, value_density=args.value_density, window=args.window,
                        quant_bits=args.bits, max_context_tokens=10**9)
    compressor = CSKVCompressor(config, model).eval()
    cache = random_cskv_cache(compressor, args.length, torch.device("cpu"))
    layer, factors = cache.layer(0), compressor.factors[0]
    spec = compressor.cache_spec().layers[0]
    inv_freq, scaling = compressor.reader.rope()
    positions = cache.latent_positions(0)
    query = torch.randn(1, spec.kv_heads * (model.config.num_attention_heads // spec.kv_heads), spec.head_dim)
    window = torch.randn(1, spec.kv_heads, args.window + 1, spec.head_dim)
    keys = reference.reconstruct(layer.latent_k.dequantize(torch.float32), factors.k.up.weight, factors.k.up.bias,
                                 spec.kv_heads, spec.head_dim)
    cos_sin = reference.rope_cos_sin(positions, inv_freq, scaling)
    dense_k = torch.randn(1, spec.kv_heads, args.length, spec.head_dim)
    stages = {
        "dequantize key latents": lambda: layer.latent_k.dequantize(torch.float32),
        "dequantize value latents": lambda: layer.latent_v.dequantize(torch.float32),
        "reconstruct keys (GEMM)": lambda: reference.reconstruct(layer.latent_k.dequantize(torch.float32),
                                                                 factors.k.up.weight, factors.k.up.bias,
                                                                 spec.kv_heads, spec.head_dim),
        "RoPE cos / sin": lambda: reference.rope_cos_sin(positions, inv_freq, scaling),
        "RoPE on the keys": lambda: reference.apply_rope(keys, *cos_sin),
        "whole reference step": lambda: reference.decode_attention_reference(
            query, layer.latent_k, layer.latent_v, factors.k.up.weight, factors.k.up.bias, factors.v.up.weight,
            factors.v.up.bias, positions, inv_freq, window, window, sm_scale=spec.head_dim ** -0.5,
            rope_scaling=scaling),
        "dense SDPA step": lambda: torch.nn.functional.scaled_dot_product_attention(
            query[:, :, None], dense_k, dense_k, enable_gqa=True),
    }
    print(f"# One layer's decode step at {args.length} tokens on {machine()}: {args.base_model} ({args.dtype}), "
          f"density {args.density} (values {args.value_density or args.density}), latents "
          f"{args.bits or 'full'}-bit\n\n| stage | ms |\n|---|---|")
    for name, run in stages.items():
        run()
        start = time.perf_counter()
        for _ in range(args.steps):
            run()
        print(f"| {name} | {1000 * (time.perf_counter() - start) / args.steps:.2f} |", flush=True)


# ----- quality -------------------------------------------------------------------------------------
class Capture:
    """Per-layer inputs of ``k_proj`` and rotated keys / values of one plain prefill."""

    def __init__(self, compressor: CSKVCompressor) -> None:
        self.compressor = compressor

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        from ctxzip.compressors.cskv.reference import rotate_half

        captured: list[list[torch.Tensor]] = []
        hooks = []
        for attn in self.compressor._attention:
            def grab_k(_m, args, out, store=captured, attn=attn):  # noqa: ANN001, ANN202
                store.append([args[0], out.view(*out.shape[:2], -1, attn.head_dim).transpose(1, 2)])

            def grab_v(_m, _args, out, store=captured, attn=attn):  # noqa: ANN001, ANN202
                store[-1].append(out.view(*out.shape[:2], -1, attn.head_dim).transpose(1, 2))
            hooks += [attn.k_proj.register_forward_hook(grab_k), attn.v_proj.register_forward_hook(grab_v)]
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        try:
            model = self.compressor.base_lm.model
            model(input_ids=ids, position_ids=positions, use_cache=False)
            cos, sin = model.rotary_emb(captured[0][0], positions)
        finally:
            for h in hooks:
                h.remove()
        cos, sin = cos[:, None], sin[:, None]
        return [(x, k * cos + rotate_half(k) * sin, v) for x, k, v in captured]


@torch.no_grad()
def fill(compressor: CSKVCompressor, layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
         length: int) -> CSKVCache:
    cache = compressor.new_cache(1)
    cache.add_positions(torch.arange(length)[None])
    for index, (x, k, v) in enumerate(layers):
        factors = compressor.factors[index]
        key_input = k.transpose(1, 2).flatten(2) if compressor.compressor_config.post_rope else x
        cache.layer(index).append(k, v, factors.k.down(key_input), factors.v.down(x))
    return cache


def load_source(source: str, density: float, bits: int | None, window: int, base: str, dtype: str,
                model: Any, means: list[torch.Tensor], value_density: float | None = None,
                key_space: str = "pre_rope", key_stats: Any = None, group_size: int = 32,
                ) -> CSKVCompressor | None:
    config = dict(density=density, value_density=value_density, window=window, quant_bits=bits,
                  max_context_tokens=10**9, key_space=key_space, quant_group_size=group_size)
    if source in ("svd", "asvd"):
        compressor = CSKVCompressor(CSKVConfig(init=source, **config), model).eval()
        if source == "asvd":
            compressor.calibrate_asvd([], means=means)
        if compressor.compressor_config.post_rope:
            scales = [asvd_scale(m, compressor.compressor_config.asvd_alpha) for m in means] if source == "asvd" else None
            compressor.calibrate_keys(key_stats, scales)
        return compressor
    trained, _ = load_compressor(source, base_model=base, dtype=dtype)
    saved = trained.compressor_config
    if abs(saved.density - density) > 1e-9 or saved.quant_bits not in (None, bits) \
            or saved.value_density != value_density or saved.key_space != key_space:
        return None  # a trained folder is evaluated at its own densities (and its QAT bit width) only
    compressor = CSKVCompressor(CSKVConfig(init=saved.init, **config), model).eval()
    compressor.load_state_dict(trained.own_state_dict(), strict=False)
    return compressor


def load_compressor_config(folder: str) -> CSKVConfig:
    from ctxzip.compressors.hub import read_metadata, resolve_folder

    return CSKVConfig.from_dict(read_metadata(resolve_folder(folder))["config"])


def quality(args: argparse.Namespace) -> None:
    from ctxzip.compressors.baselines import FullContext, FullContextConfig
    from ctxzip.compressors.cskv.trainer import TokenChunkCollator, build_text_dataset, calibration_batches
    from ctxzip.data import build_task
    from ctxzip.eval.scoring import score_continuation

    torch.manual_seed(0)
    model, tokenizer = load_base(args.base_model, dtype=args.dtype)
    rows = build_task("continuation", tokenizer, num_samples=args.num_samples, context_tokens=args.context_tokens,
                      seed=1, split="test", answer_tokens=args.answer_tokens)
    calib_rows = build_text_dataset(tokenizer, args.calibration_samples, 256, seed=0)
    calibration = calibration_batches(calib_rows, TokenChunkCollator(tokenizer, 256))
    probe = CSKVCompressor(CSKVConfig(max_context_tokens=10**9), model)
    means, _ = probe.activation_means(calibration) if "asvd" in args.sources else ([], 0)
    key_stats = None
    if "post_rope" in args.key_spaces:  # keys at random offsets up to the longest context measured
        probe = CSKVCompressor(CSKVConfig(max_context_tokens=max(args.context_tokens + args.answer_tokens, 8192)),
                               model)
        key_stats = probe.key_statistics(calibration)
    configs = []
    for source, key_space in [(s, k) for s in args.sources for k in args.key_spaces]:
        for density in args.densities:
            for value_density in args.value_densities:
                for bits in args.bits:
                    made = load_source(source, density, bits, args.window, args.base_model, args.dtype, model,
                                       means, value_density, key_space, key_stats, args.quant_group_size)
                    if made is None:
                        continue
                    label = source if key_space == "pre_rope" else f"{source}, post-RoPE keys"
                    if source not in ("svd", "asvd"):
                        qat = load_compressor_config(source).quant_bits
                        label = f"trained ({Path(source).name}{f', QAT {qat}-bit' if qat else ''}, {key_space})"
                    configs.append((label, source, (density, value_density or density), bits, made))
    full = FullContext(FullContextConfig(max_context_tokens=10**9), model)
    full_clm = CompressedLM(full, tokenizer)
    nll = {i: [] for i in range(len(configs))}
    nbytes = {i: [] for i in range(len(configs))}
    full_nll, full_bytes = [], []
    capture = Capture(configs[0][4])
    start = time.perf_counter()
    for r, row in enumerate(rows):
        ids, mask = full_clm.tokenize_context(row["context"])
        memory = full_clm.compress(row["context"])
        full_nll.append(score_continuation(full_clm, memory, row["answer"]))
        full_bytes.append(memory.nbytes)
        layers = capture(ids)
        for i, (_, _, _, _, compressor) in enumerate(configs):
            clm = CompressedLM(compressor, tokenizer)
            memory = compressor.memory_from_cache(fill(compressor, layers, ids.shape[1]), mask)
            if r == 0 and i == 0:  # the shared prefill gives what compress() gives
                direct = compressor.compress(ids, mask)
                for name, tensor in direct.tensors.items():
                    torch.testing.assert_close(memory.tensors[name].float(), tensor.float(), atol=1e-4, rtol=1e-4)
            nll[i].append(score_continuation(clm, memory, row["answer"]))
            nbytes[i].append(memory.nbytes)
        print(f"row {r + 1}/{len(rows)} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    full_ppl = math.exp(statistics.mean(full_nll))
    full_b = statistics.mean(full_bytes)
    print(f"\n# CSKV quality on {machine()}: {args.base_model} ({args.dtype}), {len(rows)} held-out pydoc "
          f"continuations ({args.context_tokens}-token context, {args.answer_tokens}-token continuation), "
          f"window {args.window}\n")
    # Reductions against the cache the model holds (its dtype) and against an fp16 cache (the papers' one).
    half_b = full_b * 2 / model.dtype.itemsize
    print("| factors | K density | V density | latent bits | KV bytes / context | reduction vs "
          f"{str(model.dtype).replace('torch.', '')} | reduction vs fp16 | perplexity | vs full cache |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| full cache | 1.0 | 1.0 | {str(model.dtype).replace('torch.', '')} | {full_b:.0f} | 1.00x | "
          f"{half_b / full_b:.2f}x | {full_ppl:.3f} | - |")
    for i, (label, _, (density, value_density), bits, _) in enumerate(configs):
        ppl = math.exp(statistics.mean(nll[i]))
        b = statistics.mean(nbytes[i])
        print(f"| {label} | {density} | {value_density} | {bits or 'full'} | {b:.0f} | {full_b / b:.2f}x | "
              f"{half_b / b:.2f}x | {ppl:.3f} | {100 * (ppl / full_ppl - 1):+.1f}% |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode")
    s = sub.add_parser("speed")
    q = sub.add_parser("quality")
    f = sub.add_parser("profile")
    f.add_argument("--length", type=int, default=32768)
    f.add_argument("--steps", type=int, default=5)
    f.add_argument("--density", type=float, default=0.3)
    f.add_argument("--value-density", type=float, default=1.0)
    f.add_argument("--bits", type=lambda v: None if v.lower() == "none" else int(v), default=4)
    f.add_argument("--base-model", default="smollm2-135m-instruct")
    f.add_argument("--dtype", default="float32")
    f.add_argument("--window", type=int, default=32)
    for p in (s, q):
        p.add_argument("--quant-group-size", type=int, default=32, help="latent channels per quantization group")
        p.add_argument("--base-model", default="smollm2-135m-instruct")
        p.add_argument("--dtype", default="float32")
        p.add_argument("--window", type=int, default=32)
    s.add_argument("--density", type=float, default=0.2)
    s.add_argument("--key-space", default="pre_rope", choices=["pre_rope", "post_rope"])
    s.add_argument("--value-density", type=float, default=None, help="V's density (default: --density)")
    s.add_argument("--bits", type=lambda v: None if v.lower() == "none" else int(v), default=4)
    s.add_argument("--lengths", type=lambda v: [int(x) for x in v.split(",")], default=[1024, 2048, 4096, 8192])
    s.add_argument("--steps", type=int, default=EVICT_BLOCK, help="decoded tokens timed per cache (the mean)")
    q.add_argument("--densities", type=lambda v: [float(x) for x in v.split(",")], default=[0.5, 0.3, 0.2])
    q.add_argument("--value-densities", type=lambda v: [None if x.lower() == "same" else float(x)
                                                        for x in v.split(",")], default=[None],
                   help="V's densities (same: each K density); a grid with --densities")
    q.add_argument("--bits", type=lambda v: [None if x.lower() == "none" else int(x) for x in v.split(",")],
                   default=[None, 4])
    q.add_argument("--sources", type=lambda v: v.split(","), default=["svd", "asvd"])
    q.add_argument("--key-spaces", type=lambda v: v.split(","), default=["pre_rope"],
                   help="pre_rope and / or post_rope (a grid with --sources)")
    q.add_argument("--num-samples", type=int, default=16)
    q.add_argument("--context-tokens", type=int, default=512)
    q.add_argument("--answer-tokens", type=int, default=64)
    q.add_argument("--calibration-samples", type=int, default=32)
    args = parser.parse_args(argv)
    if args.mode == "quality":
        quality(args)
    elif args.mode == "profile":
        profile(args)
    else:
        if args.mode is None:
            args = parser.parse_args(["speed", *(argv or sys.argv[1:])])
        speed(args)


if __name__ == "__main__":
    main()
