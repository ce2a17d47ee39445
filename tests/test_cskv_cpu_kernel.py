"""The fused CPU kernels of CSKV's post-RoPE decode step against their PyTorch references, on odd shapes."""

from __future__ import annotations

import os
import time

import pytest
import torch

from ctxzip.compressors.cskv import cpu_kernel
from ctxzip.compressors.cskv.quant import store

pytestmark = pytest.mark.usefixtures("one_thread")

# (batch, heads, tokens, rank, group size): ranks that do not fill their last group, one token, no tokens
SHAPES = [(1, 9, 300, 96, 32), (2, 3, 7, 13, 5), (3, 1, 1, 1, 4), (1, 4, 0, 8, 8), (2, 6, 513, 50, 7)]


@pytest.fixture(scope="module")
def built() -> None:
    if not cpu_kernel.available():
        pytest.fail("the CSKV CPU kernels did not build: this machine has gcc, so the build itself is broken")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_scores_and_value_sums_match_the_reference(built, shape) -> None:
    batch, heads, tokens, rank, group = shape
    generator = torch.Generator().manual_seed(sum(shape))
    scales = torch.linspace(4, 0.05, rank)  # uneven channel ranges, as SVD latents have
    latent = store(torch.randn(batch, tokens, rank, generator=generator) * scales, 8, group, torch.float32)
    query = torch.randn(batch, heads, rank, generator=generator)
    probs = torch.softmax(torch.randn(batch, heads, tokens, generator=generator), -1)
    torch.testing.assert_close(cpu_kernel.latent_scores(query, latent),
                               cpu_kernel.latent_scores_reference(query, latent), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(cpu_kernel.latent_mix(probs, latent),
                               cpu_kernel.latent_mix_reference(probs, latent), atol=2e-5, rtol=1e-4)


def test_threads_split_tokens_without_changing_the_sums(built) -> None:
    generator = torch.Generator().manual_seed(0)
    latent = store(torch.randn(2, 4099, 40, generator=generator), 8, 16, torch.float32)
    query, probs = torch.randn(2, 5, 40, generator=generator), torch.rand(2, 5, 4099, generator=generator)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        scores, mixed = cpu_kernel.latent_scores(query, latent), cpu_kernel.latent_mix(probs, latent)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(scores, cpu_kernel.latent_scores_reference(query, latent), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(mixed, cpu_kernel.latent_mix_reference(probs, latent), atol=1e-3, rtol=1e-4)


def test_bad_inputs_are_refused_by_name(built) -> None:
    latent = store(torch.randn(1, 5, 8), 8, 4, torch.float32)
    with pytest.raises(RuntimeError, match=r"q must be float32 \[batch, heads, rank\]"):
        cpu_kernel.latent_scores(torch.randn(1, 2, 7), latent)
    with pytest.raises(RuntimeError, match=r"probs must be float32 \[batch, heads, tokens\]"):
        cpu_kernel.latent_mix(torch.rand(1, 2, 6), latent)
    assert cpu_kernel.supports(latent) and not cpu_kernel.supports(store(torch.randn(1, 5, 8), 4, 4, torch.float32))


def test_a_lock_left_by_a_killed_build_is_cleared_and_a_fresh_one_kept(tmp_path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    cpu_kernel._clear_stale_lock(tmp_path)  # a build running now: wait for it
    assert lock.exists()
    old = time.time() - cpu_kernel.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        cpu_kernel._clear_stale_lock(tmp_path)
    assert not lock.exists()


def test_the_build_folder_follows_the_source(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cpu_kernel.build_directory()
    assert folder.parent == tmp_path
    monkeypatch.setattr(cpu_kernel, "_SOURCE", cpu_kernel._SOURCE + "\n// changed\n")
    assert cpu_kernel.build_directory() != folder
