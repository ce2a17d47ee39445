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


from compressors.cskv import attention  # noqa: E402
from compressors.cskv.kernel import decode_attention_triton  # noqa: E402
from compressors.cskv.quant import store  # noqa: E402
from compressors.cskv.reference import decode_attention_reference  # noqa: E402

CASES = {
    # name: batch, kv_heads, group, head_dim, latent T, window W, key rank, value rank, bits, dtype, bias,
    #       key mask, ragged lengths, split size
    "mha-float": (1, 2, 1, 16, 40, 4, 8, 8, None, torch.float32, False, False, False, 16),
    "gqa3-odd-ranks": (2, 2, 3, 16, 37, 5, 7, 9, None, torch.float32, True, True, True, 16),
    "gqa4-8bit-d24": (3, 1, 4, 24, 50, 3, 13, 6, 8, torch.float32, False, True, True, 32),
    "gqa2-4bit-odd-rank": (2, 3, 2, 16, 29, 7, 11, 5, 4, torch.float32, True, True, True, 16),
    "gqa7-4bit-fp16": (2, 1, 7, 32, 45, 2, 20, 17, 4, torch.float16, False, True, True, 16),
    "fp16-float-latents": (2, 2, 2, 16, 33, 6, 10, 10, None, torch.float16, True, False, True, 16),
    "no-window": (2, 2, 2, 16, 21, 0, 6, 6, 8, torch.float32, False, False, True, 16),
    "window-only": (2, 2, 2, 16, 0, 9, 6, 6, None, torch.float32, True, True, False, 16),
}


def inputs(batch, kv_heads, group, head_dim, length, window, rank_k, rank_v, bits, dtype, bias, masked, ragged,
           seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    out = head_dim * kv_heads
    # SVD-like latents: a few large channels, many small ones
    spread_k = torch.linspace(2.0, 0.2, rank_k)
    spread_v = torch.linspace(2.0, 0.2, rank_v)
    args = dict(
        q=randn(batch, kv_heads * group, head_dim),
        latent_k=store(torch.randn(batch, length, rank_k, generator=g) * spread_k, bits, 4, dtype),
        latent_v=store(torch.randn(batch, length, rank_v, generator=g) * spread_v, bits, 4, dtype),
        up_k=randn(out, rank_k, scale=0.4), bias_k=randn(out, scale=0.1) if bias else None,
        up_v=randn(out, rank_v, scale=0.4), bias_v=randn(out, scale=0.1) if bias else None,
        positions=torch.randint(0, 4000, (batch, length), generator=g),
        inv_freq=1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)),
        window_k=randn(batch, kv_heads, window, head_dim), window_v=randn(batch, kv_heads, window, head_dim),
    )
    kwargs = dict(sm_scale=head_dim ** -0.5, rope_scaling=1.0)
    if masked:
        kwargs["key_mask"] = torch.rand(batch, length + window, generator=g) > 0.25
    if ragged:
        kwargs["latent_lens"] = torch.randint(0, length + 1, (batch,), generator=g)
        kwargs["window_lens"] = torch.randint(0, window + 1, (batch,), generator=g)
        kwargs["latent_lens"][0] = length  # one full row
    return args, kwargs


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


@in_process
def test_model_decoding_through_the_kernel_matches_the_reference_path(tiny, monkeypatch) -> None:
    """The CompressedLM decode path with the kernel (forced on, interpreted) generates what the
    reference path generates, logits within float tolerance."""
    from compressors.compat import with_cache
    from compressors.cskv import CSKVCompressor, CSKVConfig

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
    monkeypatch.setattr("compressors.cskv.kernel.decode_attention_triton", counted)
    kernel = run()
    assert len(calls) == 2 * 2  # every decode step of both layers went through the kernel
    torch.testing.assert_close(kernel, reference, atol=1e-4, rtol=1e-4)
