"""The previous CSKV decode kernel (version 1), kept only as the GPU suite's speed baseline.

A frozen copy of ``compressors/cskv/kernel.py`` before version 2 (import path made absolute); the
library never imports it. Measured on an H200 it was correct but 10-28x slower than dense SDPA decode.
What follows is its original description.

Fused CSKV decode attention in Triton (flash-decoding over a bi-branch latent cache).

One decode step, for every (batch row, KV head, sequence split):
- latent branch: load a block of latents (float, or 8 / 4-bit codes dequantized in registers),
  reconstruct keys and values with the head's slice of the up-projections, rotate the keys with
  RoPE at their stored positions (``cos / sin`` computed in registers from ``inv_freq``), score all
  the query heads of the KV head's group at once (GQA) and fold the block into an online softmax;
- window branch: the same over full (already rotated) keys / values;
- a combine kernel merges the splits' partial results by their log-sum-exp.
Channels are processed as two halves so that a 4-bit byte's two nibbles (channel ``j`` and
``j + R/2``, see ``quant.py``) feed two dot products without interleaving, and head dimensions
as two halves so that ``rotate_half`` is a pair of multiplies.

It takes the arguments of ``reference.decode_attention_reference`` and must match it
(``tests/test_cskv_kernel.py`` checks this under ``TRITON_INTERPRET=1`` on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ctxzip.compressors.cskv.quant import LatentStore

_NEG_INF = float("-inf")


@triton.jit
def _dot(a, b, LOW: tl.constexpr):
    """fp32 accumulation; operands in fp16 (LOW=1) or bf16 (LOW=2) on tensor cores, else exact fp32."""
    if LOW == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif LOW == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _online_softmax(m_i, l_i, acc1, acc2, s, v1, v2, LOW: tl.constexpr):
    """Fold a block of scores ``s`` [G, N] (-inf = masked) and values ``v1 | v2`` [N, D/2] in."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc1 = acc1 * alpha[:, None] + _dot(p, v1, LOW)
    acc2 = acc2 * alpha[:, None] + _dot(p, v2, LOW)
    return m_new, l_i, acc1, acc2


@triton.jit
def _latent_half(data_row, scale_row, zero_row, offs_n, n_ok, cols, HI: tl.constexpr, RH, R,
                 stride_t, stride_st, group_size, BITS: tl.constexpr):
    """Latent channels ``cols`` (+ RH for the high half) of tokens ``offs_n``: float32 [N, RH_PAD]."""
    chan = cols + RH * HI
    if BITS == 4:
        ok = n_ok[:, None] & (cols[None, :] < RH)
        byte = tl.load(data_row + offs_n[:, None] * stride_t + cols[None, :], mask=ok, other=0)
        if HI:
            code = (byte >> 4) & 15
        else:
            code = byte & 15
    else:
        ok = n_ok[:, None] & (cols[None, :] < RH) & (chan[None, :] < R)
        code = tl.load(data_row + offs_n[:, None] * stride_t + chan[None, :], mask=ok, other=0)
    value = code.to(tl.float32)
    if BITS != 0:
        grp = chan // group_size
        sc = tl.load(scale_row + offs_n[:, None] * stride_st + grp[None, :], mask=ok, other=0.0).to(tl.float32)
        zp = tl.load(zero_row + offs_n[:, None] * stride_st + grp[None, :], mask=ok, other=0.0).to(tl.float32)
        value = value * sc + zp
    return tl.where(ok, value, 0.0)


@triton.jit
def _up_tile(up, h, OH: tl.constexpr, CH: tl.constexpr, cols, dims, RH, R, HEAD_DIM, HALF):
    """Transposed slice of an up-projection: ``up[h*D + OH*D/2 + d, CH*RH + j]`` as [RH_PAD, D/2_PAD]."""
    chan = cols + RH * CH
    rows = h * HEAD_DIM + OH * HALF + dims
    ok = (cols[:, None] < RH) & (chan[:, None] < R) & (dims[None, :] < HALF)
    return tl.load(up + rows[None, :] * R + chan[:, None], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _group_queries(Q, b, h, s_qb, s_qh, sm_scale, GROUP, HALF, G_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    """The query heads of KV head ``h`` (one GQA group) with their masks, and both rotary halves of
    their queries, pre-scaled: what both split kernels start from."""
    heads = h * GROUP + tl.arange(0, G_PAD)
    g_ok = tl.arange(0, G_PAD) < GROUP
    dims = tl.arange(0, HALF_PAD)
    d_ok = dims < HALF
    q_ptr = Q + b * s_qb + heads[:, None] * s_qh + dims[None, :]
    q_ok = g_ok[:, None] & d_ok[None, :]
    q1 = tl.load(q_ptr, mask=q_ok, other=0.0).to(tl.float32) * sm_scale
    q2 = tl.load(q_ptr + HALF, mask=q_ok, other=0.0).to(tl.float32) * sm_scale
    return heads, g_ok, dims, d_ok, q1, q2


@triton.jit
def _empty_softmax_state(G_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    """Running max, denominator and both accumulator halves of an online softmax before any key."""
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc1 = tl.zeros([G_PAD, HALF_PAD], tl.float32)
    acc2 = tl.zeros([G_PAD, HALF_PAD], tl.float32)
    return m_i, l_i, acc1, acc2


@triton.jit
def _latent_split_kernel(
    Q, CK, CKS, CKZ, CV, CVS, CVZ, UK, BK, UV, BV, POS, INV_FREQ, MASK, LAT_LEN,
    P_ACC, P_M, P_L,
    sm_scale, rope_scale, split_size, n_splits,
    KV_HEADS, GROUP, HEAD_DIM, HALF, RK, RHK, RV, RHV, group_size,
    s_qb, s_qh, s_ckb, s_ckt, s_cksb, s_ckst, s_cvb, s_cvt, s_cvsb, s_cvst, s_pb, s_mb,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, LOW: tl.constexpr,
    G_PAD: tl.constexpr, HALF_PAD: tl.constexpr, RHK_PAD: tl.constexpr, RHV_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh, split = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // KV_HEADS, pid_bh % KV_HEADS
    heads, g_ok, dims, d_ok, q1, q2 = _group_queries(Q, b, h, s_qb, s_qh, sm_scale, GROUP, HALF, G_PAD, HALF_PAD)
    inv_freq = tl.load(INV_FREQ + dims, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bk1 = tl.load(BK + h * HEAD_DIM + dims, mask=d_ok, other=0.0).to(tl.float32)
        bk2 = tl.load(BK + h * HEAD_DIM + HALF + dims, mask=d_ok, other=0.0).to(tl.float32)
        bv1 = tl.load(BV + h * HEAD_DIM + dims, mask=d_ok, other=0.0).to(tl.float32)
        bv2 = tl.load(BV + h * HEAD_DIM + HALF + dims, mask=d_ok, other=0.0).to(tl.float32)
    ck_cols = tl.arange(0, RHK_PAD)
    cv_cols = tl.arange(0, RHV_PAD)

    m_i, l_i, acc1, acc2 = _empty_softmax_state(G_PAD, HALF_PAD)
    length = tl.load(LAT_LEN + b)
    start = split * split_size
    end = tl.minimum(start + split_size, length)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        if HAS_MASK:
            n_ok = n_ok & (tl.load(MASK + b * s_mb + offs_n, mask=n_ok, other=0) != 0)
        # keys: reconstruct both output halves from both channel halves, then RoPE
        ka = _latent_half(CK + b * s_ckb, CKS + b * s_cksb, CKZ + b * s_cksb, offs_n, n_ok, ck_cols, 0, RHK, RK,
                          s_ckt, s_ckst, group_size, BITS)
        kb = _latent_half(CK + b * s_ckb, CKS + b * s_cksb, CKZ + b * s_cksb, offs_n, n_ok, ck_cols, 1, RHK, RK,
                          s_ckt, s_ckst, group_size, BITS)
        k1 = _dot(ka, _up_tile(UK, h, 0, 0, ck_cols, dims, RHK, RK, HEAD_DIM, HALF), LOW) + \
            _dot(kb, _up_tile(UK, h, 0, 1, ck_cols, dims, RHK, RK, HEAD_DIM, HALF), LOW)
        k2 = _dot(ka, _up_tile(UK, h, 1, 0, ck_cols, dims, RHK, RK, HEAD_DIM, HALF), LOW) + \
            _dot(kb, _up_tile(UK, h, 1, 1, ck_cols, dims, RHK, RK, HEAD_DIM, HALF), LOW)
        if HAS_BIAS:
            k1 += bk1[None, :]
            k2 += bk2[None, :]
        pos = tl.load(POS + b * s_pb + offs_n, mask=n_ok, other=0).to(tl.float32)
        angle = pos[:, None] * inv_freq[None, :]
        cos = tl.cos(angle) * rope_scale
        sin = tl.sin(angle) * rope_scale
        r1 = k1 * cos - k2 * sin
        r2 = k2 * cos + k1 * sin
        s = _dot(q1, tl.trans(r1), LOW) + _dot(q2, tl.trans(r2), LOW)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # values
        va = _latent_half(CV + b * s_cvb, CVS + b * s_cvsb, CVZ + b * s_cvsb, offs_n, n_ok, cv_cols, 0, RHV, RV,
                          s_cvt, s_cvst, group_size, BITS)
        vb = _latent_half(CV + b * s_cvb, CVS + b * s_cvsb, CVZ + b * s_cvsb, offs_n, n_ok, cv_cols, 1, RHV, RV,
                          s_cvt, s_cvst, group_size, BITS)
        v1 = _dot(va, _up_tile(UV, h, 0, 0, cv_cols, dims, RHV, RV, HEAD_DIM, HALF), LOW) + \
            _dot(vb, _up_tile(UV, h, 0, 1, cv_cols, dims, RHV, RV, HEAD_DIM, HALF), LOW)
        v2 = _dot(va, _up_tile(UV, h, 1, 0, cv_cols, dims, RHV, RV, HEAD_DIM, HALF), LOW) + \
            _dot(vb, _up_tile(UV, h, 1, 1, cv_cols, dims, RHV, RV, HEAD_DIM, HALF), LOW)
        if HAS_BIAS:
            v1 += bv1[None, :]
            v2 += bv2[None, :]
        m_i, l_i, acc1, acc2 = _online_softmax(m_i, l_i, acc1, acc2, s, v1, v2, LOW)
    _store_partial(P_ACC, P_M, P_L, b, heads, g_ok, dims, d_ok, split, n_splits, KV_HEADS * GROUP, HEAD_DIM, HALF,
                   m_i, l_i, acc1, acc2)


@triton.jit
def _window_split_kernel(
    Q, WK, WV, MASK, WIN_LEN, P_ACC, P_M, P_L,
    sm_scale, split_size, split_offset, n_splits, latent_len,
    KV_HEADS, GROUP, HEAD_DIM, HALF,
    s_qb, s_qh, s_wkb, s_wkh, s_wkt, s_wvb, s_wvh, s_wvt, s_mb,
    HAS_MASK: tl.constexpr, LOW: tl.constexpr, G_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh, split = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // KV_HEADS, pid_bh % KV_HEADS
    heads, g_ok, dims, d_ok, q1, q2 = _group_queries(Q, b, h, s_qb, s_qh, sm_scale, GROUP, HALF, G_PAD, HALF_PAD)

    m_i, l_i, acc1, acc2 = _empty_softmax_state(G_PAD, HALF_PAD)
    length = tl.load(WIN_LEN + b)
    start = split * split_size
    end = tl.minimum(start + split_size, length)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        if HAS_MASK:
            n_ok = n_ok & (tl.load(MASK + b * s_mb + latent_len + offs_n, mask=n_ok, other=0) != 0)
        ok = n_ok[:, None] & d_ok[None, :]
        k_ptr = WK + b * s_wkb + h * s_wkh + offs_n[:, None] * s_wkt + dims[None, :]
        v_ptr = WV + b * s_wvb + h * s_wvh + offs_n[:, None] * s_wvt + dims[None, :]
        k1 = tl.load(k_ptr, mask=ok, other=0.0).to(tl.float32)
        k2 = tl.load(k_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
        v1 = tl.load(v_ptr, mask=ok, other=0.0).to(tl.float32)
        v2 = tl.load(v_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
        s = _dot(q1, tl.trans(k1), LOW) + _dot(q2, tl.trans(k2), LOW)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_i, l_i, acc1, acc2 = _online_softmax(m_i, l_i, acc1, acc2, s, v1, v2, LOW)
    _store_partial(P_ACC, P_M, P_L, b, heads, g_ok, dims, d_ok, split_offset + split, n_splits,
                   KV_HEADS * GROUP, HEAD_DIM, HALF, m_i, l_i, acc1, acc2)


@triton.jit
def _store_partial(P_ACC, P_M, P_L, b, heads, g_ok, dims, d_ok, split, n_splits, Q_HEADS, HEAD_DIM, HALF,
                   m_i, l_i, acc1, acc2):
    row = (b * Q_HEADS + heads) * n_splits + split  # [G_PAD]
    tl.store(P_M + row, m_i, mask=g_ok)
    tl.store(P_L + row, l_i, mask=g_ok)
    ptr = P_ACC + row[:, None] * HEAD_DIM + dims[None, :]
    ok = g_ok[:, None] & d_ok[None, :]
    tl.store(ptr, acc1, mask=ok)
    tl.store(ptr + HALF, acc2, mask=ok)


@triton.jit
def _combine_kernel(P_ACC, P_M, P_L, OUT, n_splits, HEAD_DIM, s_ob, s_oh, Q_HEADS,
                    S_PAD: tl.constexpr, D_PAD: tl.constexpr):
    pid = tl.program_id(0)
    b, hq = pid // Q_HEADS, pid % Q_HEADS
    splits = tl.arange(0, S_PAD)
    dims = tl.arange(0, D_PAD)
    s_ok = splits < n_splits
    m = tl.load(P_M + pid * n_splits + splits, mask=s_ok, other=float("-inf"))
    den_part = tl.load(P_L + pid * n_splits + splits, mask=s_ok, other=0.0)
    acc = tl.load(P_ACC + (pid * n_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
                  mask=s_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    top = tl.max(m, axis=0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top_safe))
    den = tl.sum(w * den_part, axis=0)
    num = tl.sum(w[:, None] * acc, axis=0)
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)  # no valid key: zeros, as the reference
    tl.store(OUT + b * s_ob + hq * s_oh + dims, out.to(OUT.dtype.element_ty), mask=dims < HEAD_DIM)


def _pad(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(max(1, n)))


def _latent_args(latent: LatentStore) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    data = latent.data.contiguous()
    if latent.bits is None:
        return data, data, data, 0, 0
    scale, zero = latent.scale.contiguous(), latent.zero.contiguous()
    return data, scale, zero, scale.stride(0), scale.stride(1)


def _splits(length: int, split_size: int | None, block_n: int, programs: int) -> tuple[int, int]:
    """(split size, number of splits) over ``length`` tokens: enough programs to fill a GPU."""
    if length == 0:
        return block_n, 0
    if split_size is None:
        target = max(1, 256 // max(1, programs))
        split_size = max(block_n, triton.cdiv(triton.cdiv(length, target), block_n) * block_n)
    if split_size % block_n:
        raise ValueError(f"split_size ({split_size}) must be a multiple of block_n ({block_n})")
    return split_size, triton.cdiv(length, split_size)


def decode_attention_triton(
    q: torch.Tensor, latent_k: LatentStore, latent_v: LatentStore, up_k: torch.Tensor,
    bias_k: torch.Tensor | None, up_v: torch.Tensor, bias_v: torch.Tensor | None, positions: torch.Tensor,
    inv_freq: torch.Tensor, window_k: torch.Tensor, window_v: torch.Tensor, *, sm_scale: float,
    rope_scaling: float = 1.0, key_mask: torch.Tensor | None = None, latent_lens: torch.Tensor | None = None,
    window_lens: torch.Tensor | None = None, split_size: int | None = None, block_n: int = 32,
) -> torch.Tensor:
    """Fused decode attention; the arguments of ``reference.decode_attention_reference`` (plus tuning)."""
    batch, q_heads, head_dim = q.shape
    kv_heads, window = window_k.shape[1], window_k.shape[2]
    if head_dim % 2 or q_heads % kv_heads:
        raise ValueError(f"head_dim must be even and q_heads a multiple of kv_heads (got {head_dim}, "
                         f"{q_heads}, {kv_heads})")
    if latent_k.bits != latent_v.bits or latent_k.bits not in (None, 8, 4):
        raise ValueError("K and V latents must share a format of None, 8 or 4 bits")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    group, half, device = q_heads // kv_heads, head_dim // 2, q.device
    latent_len = latent_k.length
    low = {torch.float16: 1, torch.bfloat16: 2}.get(q.dtype, 0)
    q = q.contiguous()
    window_k, window_v = window_k.contiguous(), window_v.contiguous()
    up_k, up_v = up_k.contiguous(), up_v.contiguous()
    has_bias = bias_k is not None
    if has_bias != (bias_v is not None):
        raise ValueError("give both biases or neither")
    bias_k = bias_k.contiguous() if has_bias else up_k
    bias_v = bias_v.contiguous() if has_bias else up_v
    full = torch.full((batch,), latent_len, dtype=torch.int32, device=device)
    lat_lens = full if latent_lens is None else latent_lens.to(device=device, dtype=torch.int32).contiguous()
    win_full = torch.full((batch,), window, dtype=torch.int32, device=device)
    win_lens = win_full if window_lens is None else window_lens.to(device=device, dtype=torch.int32).contiguous()
    has_mask = key_mask is not None
    mask = (key_mask.to(device).bool().to(torch.int8).contiguous() if has_mask
            else torch.zeros(1, 1, dtype=torch.int8, device=device))
    positions = positions.to(device=device, dtype=torch.int32).contiguous()
    inv_freq = inv_freq.to(device=device, dtype=torch.float32).contiguous()

    programs = batch * kv_heads
    lat_split, lat_n = _splits(latent_len, split_size, block_n, programs)
    win_split, win_n = _splits(window, split_size, block_n, programs)
    n_splits = lat_n + win_n
    p_acc = torch.zeros(batch, q_heads, max(1, n_splits), head_dim, dtype=torch.float32, device=device)
    p_m = torch.full((batch, q_heads, max(1, n_splits)), _NEG_INF, dtype=torch.float32, device=device)
    p_l = torch.zeros(batch, q_heads, max(1, n_splits), dtype=torch.float32, device=device)
    g_pad, half_pad = _pad(group), _pad(half)

    if lat_n:
        ck, cks, ckz, s_cksb, s_ckst = _latent_args(latent_k)
        cv, cvs, cvz, s_cvsb, s_cvst = _latent_args(latent_v)
        rk, rv = latent_k.rank, latent_v.rank
        rhk, rhv = (rk + 1) // 2, (rv + 1) // 2
        _latent_split_kernel[(programs, lat_n)](
            q, ck, cks, ckz, cv, cvs, cvz, up_k, bias_k, up_v, bias_v, positions, inv_freq, mask, lat_lens,
            p_acc, p_m, p_l,
            float(sm_scale), float(rope_scaling), lat_split, n_splits,
            kv_heads, group, head_dim, half, rk, rhk, rv, rhv, latent_k.group_size,
            q.stride(0), q.stride(1), ck.stride(0), ck.stride(1), s_cksb, s_ckst, cv.stride(0), cv.stride(1),
            s_cvsb, s_cvst, positions.stride(0), mask.stride(0),
            BITS=latent_k.bits or 0, HAS_BIAS=has_bias, HAS_MASK=has_mask, LOW=low,
            G_PAD=g_pad, HALF_PAD=half_pad, RHK_PAD=_pad(rhk), RHV_PAD=_pad(rhv), BLOCK_N=block_n)
    if win_n:
        _window_split_kernel[(programs, win_n)](
            q, window_k, window_v, mask, win_lens, p_acc, p_m, p_l,
            float(sm_scale), win_split, lat_n, n_splits, latent_len,
            kv_heads, group, head_dim, half,
            q.stride(0), q.stride(1), window_k.stride(0), window_k.stride(1), window_k.stride(2),
            window_v.stride(0), window_v.stride(1), window_v.stride(2), mask.stride(0),
            HAS_MASK=has_mask, LOW=low, G_PAD=g_pad, HALF_PAD=half_pad, BLOCK_N=block_n)
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype, device=device)
    _combine_kernel[(batch * q_heads,)](
        p_acc, p_m, p_l, out, max(1, n_splits), head_dim, out.stride(0), out.stride(1), q_heads,
        S_PAD=_pad(max(1, n_splits), 2), D_PAD=_pad(head_dim, 2))
    return out
