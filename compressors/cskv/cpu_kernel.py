"""Fused CPU kernels for CSKV decoding over post-RoPE 8-bit latents, beside their PyTorch reference.

With keys stored after RoPE (``key_space="post_rope"``), a query is scored against a latent directly:
``q . (U z_t) = (U^T q) . z_t``, so a decode step needs the rank-space query once and then, per old token,
one dot product of ``rank`` channels per query head. Values are read in rank space too (``sum_t p_t z_t``, then
the up-projection once). Both sums read 8-bit codes; in PyTorch each would first write a float32 copy of every
latent (4x the bytes read) and a gathered scale / zero per channel, which costs more than the dense cache's
whole step. These kernels dequantize each token's codes in registers and never write a latent back:

- ``latent_scores(q, codes, scale, zero, group_size)``: ``[batch, heads, tokens]`` scores ``q . z_t``, blocks of
  16 tokens laid out channel-major in a small buffer so that one multiply-add scores 16 tokens;
- ``latent_mix(probs, codes, scale, zero, group_size)``: ``[batch, heads, rank]`` sums ``sum_t p_t z_t``, 8 tokens
  per pass over each head's accumulator row.

Layout: ``quant.py``'s 8-bit layout (codes ``uint8 [batch, tokens, rank]``, fp16 ``scale`` / ``zero``
``[batch, tokens, groups]``, channel ``c`` in group ``c // group_size``). Tokens are split over torch's intra-op
threads (``at::parallel_for``). The sources compile once per machine with the C++ compiler torch finds
(``torch.utils.cpp_extension.load_inline``, ``-O3 -march=native``, into ``build_directory()``; a lock left there by
a killed build is cleared after ``STALE_LOCK_SECONDS``); where no compiler
works, ``available()`` is False and CSKV decodes with the PyTorch reference (``reference.py``), which these kernels
must match (``tests/test_cskv_cpu_kernel.py``: odd shapes, float32 queries, 8-bit codes; 4-bit and float latents
always take the reference).
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

from .quant import LatentStore

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>

namespace {

void check(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero, int64_t group_size) {
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == torch::kUInt8, "codes must be uint8 [batch, tokens, rank]");
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && zero.scalar_type() == torch::kHalf, "scale / zero must be fp16");
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == codes.size(0) && scale.size(1) == codes.size(1) &&
              scale.size(2) * group_size >= codes.size(2) && zero.sizes() == scale.sizes(),
              "scale / zero must be [batch, tokens, ceil(rank / group_size)]");
  TORCH_CHECK(group_size > 0, "group_size must be positive");
}

// One token's codes as floats: buf[c] = code[c] * scale[c / group] + zero[c / group].
inline void dequantize_token(const uint8_t* code, const at::Half* scale, const at::Half* zero, int64_t rank,
                             int64_t group_size, float* buf) {
  for (int64_t g0 = 0, g = 0; g0 < rank; g0 += group_size, ++g) {
    const float s = static_cast<float>(scale[g]), z = static_cast<float>(zero[g]);
    const int64_t g1 = std::min(rank, g0 + group_size);
#pragma omp simd
    for (int64_t c = g0; c < g1; ++c) buf[c] = static_cast<float>(code[c]) * s + z;
  }
}

}  // namespace

constexpr int64_t BLOCK = 16;  // tokens scored together: one vector lane per token

torch::Tensor latent_scores(torch::Tensor q, torch::Tensor codes, torch::Tensor scale, torch::Tensor zero,
                            int64_t group_size) {
  check(codes, scale, zero, group_size);
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat && q.size(0) == codes.size(0) &&
              q.size(2) == codes.size(2), "q must be float32 [batch, heads, rank]");
  q = q.contiguous(); codes = codes.contiguous(); scale = scale.contiguous(); zero = zero.contiguous();
  const int64_t batch = codes.size(0), tokens = codes.size(1), rank = codes.size(2), heads = q.size(1);
  const int64_t groups = scale.size(2);
  auto out = torch::empty({batch, heads, tokens}, q.options());
  const float* qp = q.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* zp = zero.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = (tokens + BLOCK - 1) / BLOCK;
  // q . z = sum_g scale_g (q_g . codes_g) + sum_g zero_g (sum of q_g): the codes are read as integers-as-floats,
  // laid out channel-major for a block of tokens, so that each multiply-add covers BLOCK tokens at once.
  at::parallel_for(0, batch * blocks, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> codes_t(rank * BLOCK), scales(groups * BLOCK), zeros(groups * BLOCK), qsum(heads * groups);
    int64_t summed_row = -1;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / blocks, t0 = (i % blocks) * BLOCK, n = std::min(BLOCK, tokens - t0);
      if (summed_row != b) {
        std::fill(qsum.begin(), qsum.end(), 0.f);
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t c = 0; c < rank; ++c) qsum[h * groups + c / group_size] += qp[(b * heads + h) * rank + c];
        summed_row = b;
      }
      for (int64_t j = 0; j < BLOCK; ++j) {
        const bool real = j < n;
        const uint8_t* row = cp + (b * tokens + t0 + j) * rank;
        for (int64_t c = 0; c < rank; ++c) codes_t[c * BLOCK + j] = real ? static_cast<float>(row[c]) : 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          scales[g * BLOCK + j] = real ? static_cast<float>(sp[(b * tokens + t0 + j) * groups + g]) : 0.f;
          zeros[g * BLOCK + j] = real ? static_cast<float>(zp[(b * tokens + t0 + j) * groups + g]) : 0.f;
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        const float* __restrict__ qh = qp + (b * heads + h) * rank;
        float acc[BLOCK] = {0.f};
        for (int64_t g = 0; g < groups; ++g) {
          float part[BLOCK] = {0.f};
          for (int64_t c = g * group_size, c1 = std::min(rank, c + group_size); c < c1; ++c) {
            const float w = qh[c];
            const float* __restrict__ column = codes_t.data() + c * BLOCK;
#pragma omp simd
            for (int64_t j = 0; j < BLOCK; ++j) part[j] += w * column[j];
          }
          const float qz = qsum[h * groups + g];
          const float* __restrict__ s = scales.data() + g * BLOCK;
          const float* __restrict__ z = zeros.data() + g * BLOCK;
#pragma omp simd
          for (int64_t j = 0; j < BLOCK; ++j) acc[j] += part[j] * s[j] + qz * z[j];
        }
        float* o = op + (b * heads + h) * tokens + t0;
        for (int64_t j = 0; j < n; ++j) o[j] = acc[j];
      }
    }
  });
  return out;
}

torch::Tensor latent_mix(torch::Tensor probs, torch::Tensor codes, torch::Tensor scale, torch::Tensor zero,
                         int64_t group_size) {
  check(codes, scale, zero, group_size);
  TORCH_CHECK(probs.dim() == 3 && probs.scalar_type() == torch::kFloat && probs.size(0) == codes.size(0) &&
              probs.size(2) == codes.size(1), "probs must be float32 [batch, heads, tokens]");
  probs = probs.contiguous(); codes = codes.contiguous(); scale = scale.contiguous(); zero = zero.contiguous();
  const int64_t batch = codes.size(0), tokens = codes.size(1), rank = codes.size(2), heads = probs.size(1);
  const int64_t groups = scale.size(2);
  // One accumulator per thread (a thread runs its chunks one after another), summed at the end. Tokens are
  // added UNROLL at a time, so that each accumulator channel is loaded and stored once per UNROLL tokens.
  constexpr int64_t UNROLL = 8;
  const int64_t threads = at::get_num_threads();
  auto partial = torch::zeros({threads, batch, heads, rank}, probs.options());
  const float* pp = probs.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* zp = zero.data_ptr<at::Half>();
  float* acc = partial.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    at::parallel_for(0, (tokens + UNROLL - 1) / UNROLL, 32, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(UNROLL * rank);
      float* mine = acc + (at::get_thread_num() * batch + b) * heads * rank;
      for (int64_t k = begin; k < end; ++k) {
        const int64_t t0 = k * UNROLL, n = std::min(UNROLL, tokens - t0);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = b * tokens + t0 + j;
          dequantize_token(cp + i * rank, sp + i * groups, zp + i * groups, rank, group_size, buf.data() + j * rank);
        }
        for (int64_t h = 0; h < heads; ++h) {
          float p[UNROLL];
          for (int64_t j = 0; j < UNROLL; ++j) p[j] = j < n ? pp[(b * heads + h) * tokens + t0 + j] : 0.f;
          float* __restrict__ row = mine + h * rank;
          const float* __restrict__ values = buf.data();
#pragma omp simd
          for (int64_t c = 0; c < rank; ++c) {
            float sum = row[c];
            for (int64_t j = 0; j < UNROLL; ++j) sum += p[j] * values[j * rank + c];
            row[c] = sum;
          }
        }
      }
    });
  }
  return partial.sum(0);
}
"""

_FUNCTIONS = ["latent_scores", "latent_mix"]


_FLAGS = ["-O3", "-march=native", "-fopenmp"]
STALE_LOCK_SECONDS = 600  # a build takes about a minute; an older lock is left by a build that was killed


def build_directory() -> Path:
    """Where the kernels are built: one folder per source, flags and torch version (a new source never meets an old
    build), under ``TORCH_EXTENSIONS_DIR`` when set, else ``~/.cache/ctxzip/extensions``."""
    key = hashlib.sha256("\n".join([_SOURCE, *_FLAGS, torch.__version__]).encode()).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "ctxzip" / "extensions"
    return Path(root) / f"cskv_cpu_{key}"


def _clear_stale_lock(folder: Path) -> None:
    # torch waits forever on a build lock; a build killed mid-way (Ctrl-C on the first decode) leaves one behind
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        warnings.warn(f"removing a stale build lock left by a killed build: {lock}", RuntimeWarning, stacklevel=3)
        lock.unlink(missing_ok=True)


@functools.lru_cache(maxsize=1)
def _module() -> ModuleType | None:
    from torch.utils import cpp_extension

    try:
        folder = build_directory()
        folder.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(folder)
        return cpp_extension.load_inline(
            name="ctxzip_cskv_cpu", cpp_sources=[_SOURCE], functions=_FUNCTIONS, extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: the reference still works
        warnings.warn(f"the CSKV CPU kernels could not be built ({error!r}): CSKV decodes with the PyTorch "
                      "reference, which is several times slower", RuntimeWarning, stacklevel=3)
        return None


def available() -> bool:
    """Whether the fused CPU kernels can run here (they compile on first use)."""
    return _module() is not None


def supports(latent: LatentStore) -> bool:
    """The kernels read 8-bit latents on the CPU."""
    return latent.bits == 8 and latent.data.device.type == "cpu"


def latent_scores(q: torch.Tensor, latent: LatentStore) -> torch.Tensor:
    """``[batch, heads, tokens]``: ``q [batch, heads, rank]`` (float32) dotted with each token's latent."""
    module = _module()
    assert module is not None and latent.scale is not None and latent.zero is not None
    return module.latent_scores(q.float(), latent.data, latent.scale, latent.zero, latent.group_size)


def latent_mix(probs: torch.Tensor, latent: LatentStore) -> torch.Tensor:
    """``[batch, heads, rank]``: ``sum_t probs[..., t] * latent_t`` for ``probs [batch, heads, tokens]``."""
    module = _module()
    assert module is not None and latent.scale is not None and latent.zero is not None
    return module.latent_mix(probs.float(), latent.data, latent.scale, latent.zero, latent.group_size)


def latent_scores_reference(q: torch.Tensor, latent: LatentStore) -> torch.Tensor:
    """PyTorch reference of ``latent_scores``."""
    return torch.einsum("bhr,btr->bht", q.float(), latent.dequantize(torch.float32))


def latent_mix_reference(probs: torch.Tensor, latent: LatentStore) -> torch.Tensor:
    """PyTorch reference of ``latent_mix``."""
    return torch.einsum("bht,btr->bhr", probs.float(), latent.dequantize(torch.float32))
