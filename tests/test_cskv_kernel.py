"""The fused CSKV decode kernel against its PyTorch reference, under the Triton interpreter (CPU).

Odd head dims and ranks, ragged rows, key masks with holes, several sequence splits, GQA ratios,
biases, float / 8-bit / 4-bit latents, fp32 and fp16. Skipped when triton is not importable
(install the ``triton`` extra: ``pip install -e ".[triton]"``).

``TRITON_INTERPRET=1`` must be set before triton is first imported (triton's own ``tl.max`` /
``tl.sum`` are jitted at import). In a full test session something else (torch, transformers)
usually imports triton first; then the cases are run again in a fresh interpreter by
``test_kernel_cases_in_a_fresh_interpreter``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton compiles (decorates) any kernel

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: E402
    from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
except Exception as exc:  # noqa: BLE001 - any broken install means "no kernel here"
    pytest.skip(f"triton is not importable ({exc}); install it with `pip install triton`",
                allow_module_level=True)

INTERPRETED = isinstance(tl.sum, InterpretedFunction)
in_process = pytest.mark.skipif(
    not INTERPRETED, reason="triton was imported before TRITON_INTERPRET=1 was set: the cases run in a fresh "
                            "interpreter (test_kernel_cases_in_a_fresh_interpreter)")


@pytest.mark.skipif(INTERPRETED, reason="the cases ran in this process")
def test_kernel_cases_in_a_fresh_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider"],
                            cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


from ctxzip.compressors.cskv import attention  # noqa: E402
from ctxzip.compressors.cskv.kernel import _cos_sin, decode_attention_triton, plan_splits  # noqa: E402
from ctxzip.compressors.cskv.reference import decode_attention_reference  # noqa: E402
from ctxzip.compressors.cskv.testing import KERNEL_CASES as CASES  # noqa: E402
from ctxzip.compressors.cskv.testing import kernel_inputs  # noqa: E402


def inputs(*shape, seed=0):
    """``(args, kwargs)`` of a case (``compressors/cskv/testing.py``, shared with the GPU suite)."""
    return kernel_inputs(*shape, seed=seed)


@in_process
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name) -> None:
    *shape, split = CASES[name]
    args, kwargs = inputs(*shape)
    want = decode_attention_reference(**args, **kwargs)
    got = decode_attention_triton(**args, **kwargs, split_size=split, block_n=16)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 2e-5 if shape[9] == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@in_process
def test_kernel_default_splits_and_rope_scaling() -> None:
    args, kwargs = inputs(2, 2, 3, 16, 70, 4, 9, 9, 4, torch.float32, True, True, True, seed=3)
    kwargs["rope_scaling"] = 1.25
    want = decode_attention_reference(**args, **kwargs)
    torch.testing.assert_close(decode_attention_triton(**args, **kwargs), want, atol=2e-5, rtol=2e-5)


@in_process
def test_rows_without_any_key_read_zeros() -> None:
    args, kwargs = inputs(2, 1, 2, 16, 10, 2, 4, 4, None, torch.float32, False, False, False)
    kwargs["key_mask"] = torch.zeros(2, 12, dtype=torch.bool)
    kwargs["key_mask"][1, 3] = True
    got = decode_attention_triton(**args, **kwargs, split_size=16, block_n=16)
    want = decode_attention_reference(**args, **kwargs)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@in_process
def test_bad_kernel_arguments_are_errors() -> None:
    args, kwargs = inputs(1, 2, 2, 16, 8, 2, 4, 4, None, torch.float32, False, False, False)
    with pytest.raises(ValueError, match="block_n"):
        decode_attention_triton(**args, **kwargs, block_n=24)
    with pytest.raises(ValueError, match="multiple of block_n"):
        decode_attention_triton(**args, **kwargs, split_size=20, block_n=16)


# name: case shape (as in CASES, without the split), then kernel tuning arguments
TUNED = {
    # one split per row: the main program normalizes and writes the output (no combine launch)
    "one-split-direct": ((2, 3, 3, 16, 37, 5, 7, 9, 4, torch.float32, True, True, True),
                         dict(split_size=64, block_n=16)),
    "one-split-window-only": ((2, 2, 3, 16, 0, 9, 6, 6, 8, torch.float32, True, True, True), dict(block_n=32)),
    # 3 KV heads in chunks of 2: the second chunk has a padding head
    "head-chunks-with-padding": ((2, 3, 2, 16, 29, 7, 11, 5, 4, torch.float32, True, True, True),
                                 dict(split_size=16, block_n=16, heads_per_program=2)),
    "one-head-per-program-fp16": ((2, 3, 3, 16, 33, 6, 10, 10, None, torch.float16, True, True, True),
                                  dict(split_size=32, block_n=16, heads_per_program=1)),
    # more splits than the combine merges at once (32): it loops
    "many-splits": ((1, 1, 3, 16, 600, 4, 6, 6, 4, torch.float32, False, True, False),
                    dict(split_size=16, block_n=16)),
    # default splits from the (CPU: 4) SM count, several tokens blocks per program, window of 1
    "default-splits-block32": ((3, 1, 4, 24, 150, 1, 13, 6, 8, torch.float32, False, True, True),
                               dict(block_n=32, programs_per_sm=2, min_blocks_per_split=1)),
    "mha-gqa1-bias": ((2, 4, 1, 32, 45, 3, 12, 12, None, torch.float32, True, False, False),
                      dict(block_n=16, split_size=16)),
    # keys reconstructed transposed ([head dim, tokens]), every latent format, with bias and a padding head
    "keys-transposed-4bit": ((2, 3, 2, 16, 29, 7, 11, 5, 4, torch.float32, True, True, True),
                             dict(split_size=16, block_n=16, heads_per_program=2, keys_transposed=True)),
    "keys-transposed-8bit-d24": ((3, 1, 4, 24, 50, 3, 13, 6, 8, torch.float32, False, True, True),
                                 dict(block_n=16, keys_transposed=True)),
    "keys-transposed-float-fp16": ((2, 2, 3, 16, 33, 6, 10, 10, None, torch.float16, True, True, True),
                                   dict(split_size=32, block_n=16, keys_transposed=True)),
}


@in_process
@pytest.mark.parametrize("name", list(TUNED))
def test_kernel_tuning_paths_match_reference(name) -> None:
    shape, tuning = TUNED[name]
    args, kwargs = inputs(*shape, seed=5)
    want = decode_attention_reference(**args, **kwargs)
    got = decode_attention_triton(**args, **kwargs, **tuning)
    tol = 2e-5 if shape[9] == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@in_process
def test_kernel_reads_masks_positions_and_lengths_in_their_own_dtypes() -> None:
    """int32 positions, an int64 (0 / 1) key mask, int32 lengths and a non-contiguous query are read as
    they are (no conversion copies), with the same result."""
    args, kwargs = inputs(2, 3, 3, 16, 40, 6, 9, 9, 4, torch.float32, False, True, True, seed=7)
    want = decode_attention_reference(**args, **kwargs)
    args["positions"] = args["positions"].to(torch.int32)
    kwargs["key_mask"] = kwargs["key_mask"].long()
    kwargs["latent_lens"] = kwargs["latent_lens"].int()
    kwargs["window_lens"] = kwargs["window_lens"].int()
    q = args["q"]
    args["q"] = torch.cat([q, q], dim=-1)[..., : q.shape[-1]]  # same values, row stride 2 * head_dim
    got = decode_attention_triton(**args, **kwargs, split_size=16, block_n=16)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_default_splits_fill_the_device_without_a_tail_wave() -> None:
    # SmolLM2 at 128k tokens, batch 16, one program per row (3 KV heads together), 132 SMs
    size, n = plan_splits(131072 - 32, None, 64, 16, 132)
    assert size % 64 == 0 and 16 * n <= 4 * 132 and 16 * (n + 1) > 4 * 132 - 16
    # short contexts: at least 2 blocks per split; an empty latent branch still has a split (the window's)
    assert plan_splits(256, None, 64, 1, 132) == (128, 2)
    assert plan_splits(0, None, 64, 1, 132) == (64, 1)
    assert plan_splits(5000, 128, 64, 1, 132) == (128, 40)


@in_process
def test_model_decoding_through_the_kernel_matches_the_reference_path(tiny, monkeypatch) -> None:
    """The CompressedLM decode path with the kernel (forced on, interpreted) generates what the
    reference path generates, logits within float tolerance."""
    from ctxzip.compressors.compat import with_cache
    from ctxzip.compressors.cskv import CSKVCompressor, CSKVConfig

    model, _ = tiny()
    compressor = CSKVCompressor(CSKVConfig(density=0.5, window=3, quant_bits=4, quant_group_size=8), model).eval()
    context = torch.randint(3, 2000, (2, 30), generator=torch.Generator().manual_seed(1))
    memory = compressor.compress(context, torch.ones_like(context))
    prompt = torch.randint(3, 2000, (2, 3), generator=torch.Generator().manual_seed(2))

    def run() -> torch.Tensor:
        logits = []
        with torch.no_grad(), compressor.reading(memory):
            mask = torch.ones_like(prompt)
            step = compressor.decoder_forward(memory, prompt, mask)
            out, cache, mask, pos = step.logits[:, -1], step.cache, step.attention_mask, step.next_position
            for _ in range(2):
                mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
                res = model(input_ids=out.argmax(-1)[:, None], attention_mask=mask, position_ids=pos[:, None],
                            use_cache=True, **with_cache(cache))
                out, pos = res.logits[:, -1], pos + 1
                logits.append(out)
        return torch.stack(logits, 1)

    calls = []
    real = decode_attention_triton

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    reference = run()
    monkeypatch.setattr(attention, "use_kernel", lambda device: True)
    monkeypatch.setattr("ctxzip.compressors.cskv.kernel.decode_attention_triton", counted)
    kernel = run()
    assert len(calls) == 2 * 2  # every decode step of both layers went through the kernel
    torch.testing.assert_close(kernel, reference, atol=1e-4, rtol=1e-4)


@triton.jit
def _cos_sin_probe(ANGLE, COS, SIN, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    c, s = _cos_sin(tl.load(ANGLE + offs, mask=ok, other=0.0), FAST)
    tl.store(COS + offs, c, mask=ok)
    tl.store(SIN + offs, s, mask=ok)


@in_process
def test_fast_rope_range_reduction_keeps_large_positions_exact() -> None:
    """The GPU's fast RoPE reduces angles to [-pi, pi] before the hardware sin / cos; here the same
    reduction feeds exact cos / sin (FAST=2), at RoPE angles of positions up to 1M."""
    positions = torch.cat([torch.arange(0, 5000), torch.randint(0, 1_050_000, (3000,))]).float()
    inv_freq = 1.0 / (100000.0 ** (torch.arange(0, 64, 2).float() / 64))
    angle = (positions[:, None] * inv_freq).flatten().contiguous()
    cos, sin = torch.empty_like(angle), torch.empty_like(angle)
    _cos_sin_probe[(triton.cdiv(angle.numel(), 1024),)](angle, cos, sin, angle.numel(), FAST=2, BLOCK=1024)
    exact = angle.double()
    assert (cos.double() - exact.cos()).abs().max() < 1e-6
    assert (sin.double() - exact.sin()).abs().max() < 1e-6
