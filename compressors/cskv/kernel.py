"""Fused CSKV decode attention in Triton (flash-decoding over a bi-branch latent cache), version 2.

One decode step. A program takes one batch row, a chunk of KV heads (by default all the heads whose
query rows fit 16 rows: all 3 KV heads / 9 query heads of SmolLM2) and one split of the latent tokens:
- latent branch, per block of ``BLOCK_N`` tokens: load the key and value latents once for all the
  program's heads (float, or 8 / 4-bit codes dequantized in registers), compute ``cos / sin`` of the
  tokens' stored positions once (RoPE depends on the position and frequency, not on the head), then
  per KV head reconstruct the key halves with ``tl.dot`` against the head's slice of ``up_k``, rotate
  them and add that head's query rows' scores (the other rows' queries are zeroed, so a [rows, N]
  score tile for all query heads is built without gathers);
- values are never reconstructed per token: sum_t p_t (U_v z_t + b) = U_v (sum_t p_t z_t) + b sum_t p_t,
  so the online softmax accumulates ``p @ z`` in rank space (one dot for all query heads per block), and
  the up-projection is applied once per program at the end (fp32 ``ieee`` dot), plus ``b * l``;
- window branch: the last split of each row also reads the full-precision window (already rotated)
  after its latent tokens, in the same online softmax, so no separate window launch exists;
- with one split per row the program normalizes and writes the output itself (one launch in all);
  with several, a small combine kernel merges the splits' partials by log-sum-exp, looping over splits
  in chunks (any number of splits, no register blow-up).
Channels are processed as two halves so that a 4-bit byte's two nibbles (channel ``j`` and
``j + R/2``, see ``quant.py``) feed two dot products without interleaving, and head dimensions as two
halves so that ``rotate_half`` is a pair of multiplies.

RoPE: on a GPU with fp16 / bf16 queries, ``cos / sin`` come from the hardware approximations after an
exact range reduction (``_cos_sin``); libdevice's ``tl.cos / tl.sin`` inline a slow-path range
reduction per element (the compile for sm_90 went from 21 s to 6 s without them). Keys can also be
reconstructed transposed (``keys_transposed``: ``k^T = U z^T``, M = head_dim / 2 instead of BLOCK_N,
so no transposes before the scores; an option for the GPU sweep, not the default).

Register pressure (compiled for sm_90a here with triton 3.9 and ptxas, not measured on a GPU): with 3 KV
heads per program and BLOCK_N 64 the main kernel uses 255 registers and spills ~60-250 bytes (the
hoisted up-projection tiles, cos / sin and the per-head key tiles are live at once); one KV head per
program (``heads_per_program=1``) needs ~210 and does not spill, at the price of reading each latent and
computing cos / sin 3 times. Which wins is for the GPU sweep to say.

Host side: no per-call ``torch.full`` / ``zeros`` / dtype conversions (lengths absent = a constexpr
flag, masks / positions read in their own integer dtype through their strides); one ``torch.empty`` for
the output and, with several splits, one for all partials. The split count comes from the device's SM
count (``programs_per_sm`` programs per SM over the whole grid, at least ``min_blocks_per_split`` blocks
each) instead of a fixed 256-program target.

Not done (and why): the query is not folded into ``up_k`` (RoPE rotates each key by its own position,
so ``q . R(pos) U z`` has no position-free form cheaper than reconstructing K for a GQA group of 3);
the splits are not merged inside the main kernel with an atomic "last program combines" counter (one
launch fewer, but cross-program memory ordering cannot be tested on the CPU interpreter); no
``autotune`` decorator (its benchmarking on the first call would run inside a model's decode step);
the knobs are arguments, and the GPU suite sweeps them.

It takes the arguments of ``reference.decode_attention_reference`` and must match it
(``tests/test_cskv_kernel.py`` checks this under ``TRITON_INTERPRET=1`` on CPU). The previous version
(one program per KV head, values reconstructed per token, separate window and combine launches) is kept
for comparison only in ``benchmarks/gpu/cskv_kernel_v1.py``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .quant import LatentStore


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
def _cos_sin(angle, FAST: tl.constexpr):
    """``cos, sin`` of float32 ``angle`` (>= 0).

    FAST=1 (GPU only: inline PTX): reduce to [-pi, pi] with a 3-part 2*pi (6.25 is exact in 5 bits, so
    ``k * 6.25`` is exact for k < 2^19, angles < 3.3e6; fma keeps the other two products unrounded), then
    the hardware ``cos / sin.approx.f32`` (abs error ~5e-7 on that range). In float64 emulation the
    reduction stays within 2.2e-7 of the exact cosine of the same float32 angle for positions up to 1.1M.
    FAST=2: the same reduction, then ``tl.cos / tl.sin`` (lets the CPU interpreter test the reduction).
    FAST=0: ``tl.cos / tl.sin`` (libdevice: exact, but a range reduction with a slow path per element).
    """
    if FAST != 0:
        turns = tl.floor(angle * 0.15915494309189535 + 0.5)
        r = tl.fma(-turns, 6.25, angle)
        r = tl.fma(-turns, 0.03318530693650246, r)
        r = tl.fma(-turns, 2.430837753308879e-10, r)
        if FAST == 1:
            c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True,
                                          pack=1)
            s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True,
                                          pack=1)
        else:
            c = tl.cos(r)
            s = tl.sin(r)
    else:
        c = tl.cos(angle)
        s = tl.sin(angle)
    return c, s


@triton.jit
def _latent_half(data_row, scale_row, zero_row, offs_n, n_ok, cols, HI: tl.constexpr, RH, R,
                 stride_t, stride_st, group_size, BITS: tl.constexpr, LOW: tl.constexpr, TRANS: tl.constexpr = False):
    """Latent channels ``cols`` (+ RH for the high half) of tokens ``offs_n``: [N, RH_PAD] ([RH_PAD, N]
    with TRANS), already in the dtype the dot products read (fp16 / bf16 for LOW=1 / 2, else float32;
    ``_dot`` would round to it anyway), so that no float32 copy stays live across the heads' dots."""
    chan = cols + RH * HI
    if TRANS:
        tok, tok_ok, col, ch = offs_n[None, :], n_ok[None, :], cols[:, None], chan[:, None]
    else:
        tok, tok_ok, col, ch = offs_n[:, None], n_ok[:, None], cols[None, :], chan[None, :]
    if BITS == 4:
        ok = tok_ok & (col < RH)
        byte = tl.load(data_row + tok * stride_t + col, mask=ok, other=0)
        if HI:
            code = (byte >> 4) & 15
        else:
            code = byte & 15
    else:
        ok = tok_ok & (col < RH) & (ch < R)
        code = tl.load(data_row + tok * stride_t + ch, mask=ok, other=0)
    value = code.to(tl.float32)
    if BITS != 0:
        grp = ch // group_size
        sc = tl.load(scale_row + tok * stride_st + grp, mask=ok, other=0.0).to(tl.float32)
        zp = tl.load(zero_row + tok * stride_st + grp, mask=ok, other=0.0).to(tl.float32)
        value = value * sc + zp
    value = tl.where(ok, value, 0.0)
    if LOW == 1:
        return value.to(tl.float16)
    elif LOW == 2:
        return value.to(tl.bfloat16)
    else:
        return value


@triton.jit
def _up_tile(up, row0, limit, CH: tl.constexpr, cols, dims, RH, R, HALF: tl.constexpr, s_u, TRANS: tl.constexpr = True):
    """Slice of an up-projection, ``up[row0 + d, CH*RH + j]``, as float32 [RH_PAD, HALF_PAD] (TRANS, the
    B operand of ``latent @ tile``) or [HALF_PAD, RH_PAD] (the A operand of ``tile @ latent^T``); zeros for
    rows at or past ``limit`` (a padding head of the last head chunk)."""
    chan = cols + RH * CH
    row_ok = (dims < HALF) & (row0 + dims < limit)
    if TRANS:
        ok = (cols[:, None] < RH) & (chan[:, None] < R) & row_ok[None, :]
        ptr = up + (row0 + dims)[None, :] * s_u + chan[:, None]
    else:
        ok = (cols[None, :] < RH) & (chan[None, :] < R) & row_ok[:, None]
        ptr = up + (row0 + dims)[:, None] * s_u + chan[None, :]
    return tl.load(ptr, mask=ok, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["latent_len", "window_len", "split_size", "n_splits", "total_rows",
                               "s_ckb", "s_cksb", "s_cvb", "s_cvsb", "s_pb", "s_wkb", "s_wvb", "s_mb"])
def _cskv_decode_kernel(
    Q, CK, CKS, CKZ, CV, CVS, CVZ, UK, BK, UV, BV, POS, INV_FREQ, WK, WV, MASK, LAT_LEN, WIN_LEN, OUT, P,
    sm_scale, rope_scale, latent_len, window_len, split_size, n_splits, total_rows,
    RK, RHK, RV, RHV, group_size,
    s_qb, s_qh, s_ckb, s_ckt, s_cksb, s_ckst, s_cvb, s_cvt, s_cvsb, s_cvst, s_uk, s_uv, s_pb, s_pt,
    s_wkb, s_wkh, s_wkt, s_wvb, s_wvh, s_wvt, s_mb, s_mt, s_ob, s_oh,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PER_PROG: tl.constexpr,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LAT_LENS: tl.constexpr,
    HAS_WIN_LENS: tl.constexpr, LOW: tl.constexpr, DIRECT: tl.constexpr, FAST_ROPE: tl.constexpr,
    KEYS_T: tl.constexpr,
    ROWS: tl.constexpr, HALF_PAD: tl.constexpr, RHK_PAD: tl.constexpr, RHV_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    LIMIT: tl.constexpr = KV_HEADS * HEAD_DIM
    N_CHUNKS: tl.constexpr = (KV_HEADS + HEADS_PER_PROG - 1) // HEADS_PER_PROG
    pid, split = tl.program_id(0), tl.program_id(1)
    b, chunk = pid // N_CHUNKS, pid % N_CHUNKS
    bl = b.to(tl.int64)  # 64-bit row offsets into the (possibly > 2 GiB) latent cache
    head0 = chunk * HEADS_PER_PROG
    # the query rows of this program's KV heads; row r belongs to KV head r // GROUP
    local = tl.arange(0, ROWS)
    rows = head0 * GROUP + local
    row_ok = (local < HEADS_PER_PROG * GROUP) & (rows < KV_HEADS * GROUP)
    row_head = rows // GROUP
    dims = tl.arange(0, HALF_PAD)
    d_ok = dims < HALF
    q_ptr = Q + b * s_qb + rows[:, None] * s_qh + dims[None, :]
    q_ok = row_ok[:, None] & d_ok[None, :]
    q1 = tl.load(q_ptr, mask=q_ok, other=0.0).to(tl.float32) * sm_scale
    q2 = tl.load(q_ptr + HALF, mask=q_ok, other=0.0).to(tl.float32) * sm_scale
    inv_freq = tl.load(INV_FREQ + dims, mask=d_ok, other=0.0).to(tl.float32)
    ck_cols = tl.arange(0, RHK_PAD)
    cv_cols = tl.arange(0, RHV_PAD)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc_za = tl.zeros([ROWS, RHV_PAD], tl.float32)  # sum_t p_t z_t, low channel half
    acc_zb = tl.zeros([ROWS, RHV_PAD], tl.float32)  # high channel half
    if HAS_LAT_LENS:
        length = tl.load(LAT_LEN + b).to(tl.int32)
    else:
        length = latent_len
    start = split * split_size
    end = tl.minimum(start + split_size, length)
    ck_row, cks_row, ckz_row = CK + bl * s_ckb, CKS + bl * s_cksb, CKZ + bl * s_cksb
    cv_row, cvs_row, cvz_row = CV + bl * s_cvb, CVS + bl * s_cvsb, CVZ + bl * s_cvsb
    pos_row, mask_row = POS + bl * s_pb, MASK + bl * s_mb
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        if HAS_MASK:
            n_ok = n_ok & (tl.load(mask_row + offs_n * s_mt, mask=n_ok, other=0) != 0)
        pos = tl.load(pos_row + offs_n * s_pt, mask=n_ok, other=0).to(tl.float32)
        s = tl.zeros([ROWS, BLOCK_N], tl.float32)
        if KEYS_T:  # keys as [head dim, tokens]: k^T = U z^T (M = head_dim / 2), scores = q @ k^T directly
            ka = _latent_half(ck_row, cks_row, ckz_row, offs_n, n_ok, ck_cols, 0, RHK, RK, s_ckt, s_ckst,
                              group_size, BITS, LOW, True)
            kb = _latent_half(ck_row, cks_row, ckz_row, offs_n, n_ok, ck_cols, 1, RHK, RK, s_ckt, s_ckst,
                              group_size, BITS, LOW, True)
            cos, sin = _cos_sin(inv_freq[:, None] * pos[None, :], FAST_ROPE)  # [HALF_PAD, N], shared by heads
        else:  # keys as [tokens, head dim]: k = z U^T (M = BLOCK_N), scores = q @ trans(k)
            ka = _latent_half(ck_row, cks_row, ckz_row, offs_n, n_ok, ck_cols, 0, RHK, RK, s_ckt, s_ckst,
                              group_size, BITS, LOW)
            kb = _latent_half(ck_row, cks_row, ckz_row, offs_n, n_ok, ck_cols, 1, RHK, RK, s_ckt, s_ckst,
                              group_size, BITS, LOW)
            cos, sin = _cos_sin(pos[:, None] * inv_freq[None, :], FAST_ROPE)  # [N, HALF_PAD], shared by heads
        cos *= rope_scale
        sin *= rope_scale
        for hh in tl.static_range(HEADS_PER_PROG):
            h = head0 + hh
            r0 = h * HEAD_DIM
            h_ok = d_ok & (r0 + dims < LIMIT)  # [HALF_PAD]; all False for a padding head
            sel = (row_head == h)[:, None]
            if KEYS_T:
                k1 = _dot(_up_tile(UK, r0, LIMIT, 0, ck_cols, dims, RHK, RK, HALF, s_uk, False), ka, LOW) + \
                    _dot(_up_tile(UK, r0, LIMIT, 1, ck_cols, dims, RHK, RK, HALF, s_uk, False), kb, LOW)
                k2 = _dot(_up_tile(UK, r0 + HALF, LIMIT, 0, ck_cols, dims, RHK, RK, HALF, s_uk, False), ka, LOW) + \
                    _dot(_up_tile(UK, r0 + HALF, LIMIT, 1, ck_cols, dims, RHK, RK, HALF, s_uk, False), kb, LOW)
                if HAS_BIAS:
                    k1 += tl.load(BK + r0 + dims, mask=h_ok, other=0.0).to(tl.float32)[:, None]
                    k2 += tl.load(BK + r0 + HALF + dims, mask=h_ok, other=0.0).to(tl.float32)[:, None]
                r1 = k1 * cos - k2 * sin
                r2 = k2 * cos + k1 * sin
                s += _dot(tl.where(sel, q1, 0.0), r1, LOW) + _dot(tl.where(sel, q2, 0.0), r2, LOW)
            else:
                k1 = _dot(ka, _up_tile(UK, r0, LIMIT, 0, ck_cols, dims, RHK, RK, HALF, s_uk), LOW) + \
                    _dot(kb, _up_tile(UK, r0, LIMIT, 1, ck_cols, dims, RHK, RK, HALF, s_uk), LOW)
                k2 = _dot(ka, _up_tile(UK, r0 + HALF, LIMIT, 0, ck_cols, dims, RHK, RK, HALF, s_uk), LOW) + \
                    _dot(kb, _up_tile(UK, r0 + HALF, LIMIT, 1, ck_cols, dims, RHK, RK, HALF, s_uk), LOW)
                if HAS_BIAS:
                    k1 += tl.load(BK + r0 + dims, mask=h_ok, other=0.0).to(tl.float32)[None, :]
                    k2 += tl.load(BK + r0 + HALF + dims, mask=h_ok, other=0.0).to(tl.float32)[None, :]
                r1 = k1 * cos - k2 * sin
                r2 = k2 * cos + k1 * sin
                s += _dot(tl.where(sel, q1, 0.0), tl.trans(r1), LOW) + \
                    _dot(tl.where(sel, q2, 0.0), tl.trans(r2), LOW)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        va = _latent_half(cv_row, cvs_row, cvz_row, offs_n, n_ok, cv_cols, 0, RHV, RV, s_cvt, s_cvst, group_size,
                          BITS, LOW)
        vb = _latent_half(cv_row, cvs_row, cvz_row, offs_n, n_ok, cv_cols, 1, RHV, RV, s_cvt, s_cvst, group_size,
                          BITS, LOW)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc_za = acc_za * alpha[:, None] + _dot(p, va, LOW)
        acc_zb = acc_zb * alpha[:, None] + _dot(p, vb, LOW)
        m_i = m_new

    # rank space -> head dims, once per program: acc = U_v (sum p z) + b_v sum p (exact fp32 dots)
    acc1 = tl.zeros([ROWS, HALF_PAD], tl.float32)
    acc2 = tl.zeros([ROWS, HALF_PAD], tl.float32)
    for hh in tl.static_range(HEADS_PER_PROG):
        h = head0 + hh
        r0 = h * HEAD_DIM
        sel = (row_head == h)[:, None]
        za = tl.where(sel, acc_za, 0.0)
        zb = tl.where(sel, acc_zb, 0.0)
        acc1 += _dot(za, _up_tile(UV, r0, LIMIT, 0, cv_cols, dims, RHV, RV, HALF, s_uv), 0) + \
            _dot(zb, _up_tile(UV, r0, LIMIT, 1, cv_cols, dims, RHV, RV, HALF, s_uv), 0)
        acc2 += _dot(za, _up_tile(UV, r0 + HALF, LIMIT, 0, cv_cols, dims, RHV, RV, HALF, s_uv), 0) + \
            _dot(zb, _up_tile(UV, r0 + HALF, LIMIT, 1, cv_cols, dims, RHV, RV, HALF, s_uv), 0)
    if HAS_BIAS:
        b_ptr = BV + row_head[:, None] * HEAD_DIM + dims[None, :]
        acc1 += tl.load(b_ptr, mask=q_ok, other=0.0).to(tl.float32) * l_i[:, None]
        acc2 += tl.load(b_ptr + HALF, mask=q_ok, other=0.0).to(tl.float32) * l_i[:, None]

    # window branch (already rotated full keys / values): read by the last split of the row only
    if HAS_WIN_LENS:
        wlen = tl.load(WIN_LEN + b).to(tl.int32)
    else:
        wlen = window_len
    wend = tl.where(split == n_splits - 1, wlen, 0)
    for w0 in range(0, wend, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        w_ok = offs_w < wend
        if HAS_MASK:
            w_ok = w_ok & (tl.load(mask_row + (latent_len + offs_w) * s_mt, mask=w_ok, other=0) != 0)
        ok = w_ok[:, None] & d_ok[None, :]
        s = tl.zeros([ROWS, BLOCK_W], tl.float32)
        for hh in tl.static_range(HEADS_PER_PROG):
            h = head0 + hh
            k_ptr = WK + bl * s_wkb + h * s_wkh + offs_w[:, None] * s_wkt + dims[None, :]
            k1 = tl.load(k_ptr, mask=ok & (h * HEAD_DIM + dims < LIMIT)[None, :], other=0.0).to(tl.float32)
            k2 = tl.load(k_ptr + HALF, mask=ok & (h * HEAD_DIM + dims < LIMIT)[None, :], other=0.0).to(tl.float32)
            sel = (row_head == h)[:, None]
            s += _dot(tl.where(sel, q1, 0.0), tl.trans(k1), LOW) + _dot(tl.where(sel, q2, 0.0), tl.trans(k2), LOW)
        s = tl.where(w_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc1 = acc1 * alpha[:, None]
        acc2 = acc2 * alpha[:, None]
        for hh in tl.static_range(HEADS_PER_PROG):
            h = head0 + hh
            v_ptr = WV + bl * s_wvb + h * s_wvh + offs_w[:, None] * s_wvt + dims[None, :]
            v1 = tl.load(v_ptr, mask=ok & (h * HEAD_DIM + dims < LIMIT)[None, :], other=0.0).to(tl.float32)
            v2 = tl.load(v_ptr + HALF, mask=ok & (h * HEAD_DIM + dims < LIMIT)[None, :], other=0.0).to(tl.float32)
            ph = tl.where((row_head == h)[:, None], p, 0.0)
            acc1 += _dot(ph, v1, LOW)
            acc2 += _dot(ph, v2, LOW)
        m_i = m_new

    if DIRECT:  # one split per row: this program holds every key of its rows
        den = tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptr = OUT + b * s_ob + rows[:, None] * s_oh + dims[None, :]
        tl.store(o_ptr, (acc1 / den).to(OUT.dtype.element_ty), mask=q_ok)  # no valid key: zeros, as the reference
        tl.store(o_ptr + HALF, (acc2 / den).to(OUT.dtype.element_ty), mask=q_ok)
    else:  # partials: P = [acc (total_rows x HEAD_DIM) | m (total_rows) | l (total_rows)]
        prow = (b * (KV_HEADS * GROUP) + rows) * n_splits + split
        tl.store(P + total_rows * HEAD_DIM + prow, m_i, mask=row_ok)
        tl.store(P + total_rows * (HEAD_DIM + 1) + prow, l_i, mask=row_ok)
        a_ptr = P + prow[:, None] * HEAD_DIM + dims[None, :]
        tl.store(a_ptr, acc1, mask=q_ok)
        tl.store(a_ptr + HALF, acc2, mask=q_ok)


@triton.jit(do_not_specialize=["n_splits", "total_rows"])
def _combine_kernel(P, OUT, n_splits, total_rows, s_ob, s_oh, Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    S_BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    """Merge the splits of one (batch row, query head) by their log-sum-exp, ``S_BLOCK`` splits at a time."""
    pid = tl.program_id(0)
    b, hq = pid // Q_HEADS, pid % Q_HEADS
    dims = tl.arange(0, D_PAD)
    d_ok = dims < HEAD_DIM
    top = tl.full([D_PAD], float("-inf"), tl.float32)  # running max, kept as a (constant) vector
    den = tl.zeros([D_PAD], tl.float32)
    num = tl.zeros([D_PAD], tl.float32)
    for s0 in range(0, n_splits, S_BLOCK):
        splits = s0 + tl.arange(0, S_BLOCK)
        s_ok = splits < n_splits
        row = pid * n_splits + splits
        m = tl.load(P + total_rows * HEAD_DIM + row, mask=s_ok, other=float("-inf"))
        part = tl.load(P + total_rows * (HEAD_DIM + 1) + row, mask=s_ok, other=0.0)
        acc = tl.load(P + row[:, None] * HEAD_DIM + dims[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        new = tl.maximum(top, tl.max(m, axis=0))
        safe = tl.where(new == float("-inf"), 0.0, new)
        keep = tl.exp(top - safe)
        w = tl.where(m[:, None] == float("-inf"), 0.0, tl.exp(m[:, None] - safe[None, :]))  # [S_BLOCK, D_PAD]
        den = den * keep + tl.sum(w * part[:, None], axis=0)
        num = num * keep + tl.sum(w * acc, axis=0)
        top = new
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)  # no valid key: zeros, as the reference
    tl.store(OUT + b * s_ob + hq * s_oh + dims, out.to(OUT.dtype.element_ty), mask=d_ok)


# The compiled main kernel of the latest call (what a Triton launch returns; None under the interpreter):
# the GPU suite reads its registers / spills / shared memory for the sweep's notes.
LAST_COMPILED: dict[str, object] = {}


def _pad(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(max(1, n)))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter: few programs


def _latent_args(latent: LatentStore, dummy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Data, scale, zero (the data itself for float latents) and the scale's strides; ``dummy`` (never
    read) in place of empty tensors."""
    if latent.length == 0:
        return dummy, dummy, dummy, 0, 0
    data = latent.data.contiguous()
    if latent.bits is None:
        return data, data, data, 0, 0
    scale, zero = latent.scale.contiguous(), latent.zero.contiguous()
    return data, scale, zero, scale.stride(0), scale.stride(1)


def plan_splits(length: int, split_size: int | None, block_n: int, row_programs: int, sms: int,
                programs_per_sm: int = 4, min_blocks_per_split: int = 2) -> tuple[int, int]:
    """(split size, number of splits) over ``length`` latent tokens, at least one split (the window is
    read by a row's last split, so an empty latent branch still has one).

    Default: as many splits as keep ``row_programs * splits <= programs_per_sm * sms`` (the whole grid
    resident at once, in equal splits: no tail wave), with at least ``min_blocks_per_split`` blocks each.
    """
    if split_size is None:
        blocks = triton.cdiv(max(1, length), block_n)
        want = max(1, (programs_per_sm * sms) // max(1, row_programs))
        want = min(want, max(1, blocks // max(1, min_blocks_per_split)))
        split_size = triton.cdiv(blocks, want) * block_n
    if split_size <= 0 or split_size % block_n:
        raise ValueError(f"split_size ({split_size}) must be a multiple of block_n ({block_n})")
    return split_size, max(1, triton.cdiv(length, split_size))


def decode_attention_triton(
    q: torch.Tensor, latent_k: LatentStore, latent_v: LatentStore, up_k: torch.Tensor,
    bias_k: torch.Tensor | None, up_v: torch.Tensor, bias_v: torch.Tensor | None, positions: torch.Tensor,
    inv_freq: torch.Tensor, window_k: torch.Tensor, window_v: torch.Tensor, *, sm_scale: float,
    rope_scaling: float = 1.0, key_mask: torch.Tensor | None = None, latent_lens: torch.Tensor | None = None,
    window_lens: torch.Tensor | None = None, split_size: int | None = None, block_n: int = 64,
    num_warps: int = 4, num_stages: int = 2, heads_per_program: int | None = None, programs_per_sm: int = 4,
    min_blocks_per_split: int = 2, fast_rope: bool | None = None, keys_transposed: bool = False,
) -> torch.Tensor:
    """Fused decode attention; the arguments of ``reference.decode_attention_reference``, plus tuning:
    ``split_size`` (latent tokens per program; default from the SM count), ``block_n`` (tokens per
    block), ``num_warps`` / ``num_stages``, ``heads_per_program`` (KV heads per program; default: as
    many as fill 16 query rows), ``programs_per_sm`` and ``min_blocks_per_split`` (the default split),
    ``fast_rope`` (hardware sin / cos after an exact range reduction; default: on a GPU for fp16 / bf16
    queries, where its ~1e-6 error is far below the dtype's rounding; never under the CPU interpreter,
    which cannot run inline PTX), ``keys_transposed`` (reconstruct keys as [head dim, tokens])."""
    batch, q_heads, head_dim = q.shape
    kv_heads, window = window_k.shape[1], window_k.shape[2]
    if head_dim % 2 or q_heads % kv_heads:
        raise ValueError(f"head_dim must be even and q_heads a multiple of kv_heads (got {head_dim}, "
                         f"{q_heads}, {kv_heads})")
    if latent_k.bits != latent_v.bits or latent_k.bits not in (None, 8, 4):
        raise ValueError("K and V latents must share a format of None, 8 or 4 bits")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    has_bias = bias_k is not None
    if has_bias != (bias_v is not None):
        raise ValueError("give both biases or neither")
    group, device = q_heads // kv_heads, q.device
    latent_len = latent_k.length
    low = {torch.float16: 1, torch.bfloat16: 2}.get(q.dtype, 0)
    if fast_rope is None:
        fast_rope = device.type == "cuda" and low != 0
    hpp = heads_per_program or max(1, min(kv_heads, 16 // group))
    hpp = min(hpp, kv_heads)
    n_chunks = triton.cdiv(kv_heads, hpp)

    split, n_splits = plan_splits(latent_len, split_size, block_n, batch * n_chunks, _sm_count(device),
                                  programs_per_sm, min_blocks_per_split)
    direct = n_splits == 1
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype, device=device)
    total_rows = batch * q_heads * n_splits
    part = out if direct else torch.empty(total_rows * (head_dim + 2), dtype=torch.float32, device=device)

    def real(t: torch.Tensor) -> torch.Tensor:
        """``t`` on the device, or ``out`` (never read) in place of an empty tensor, whose data pointer
        may be null."""
        return (t if t.device == device else t.to(device)) if t.numel() else out

    q = q.contiguous()
    window_k, window_v = real(window_k.contiguous()), real(window_v.contiguous())
    up_k, up_v = up_k.contiguous(), up_v.contiguous()
    bias_k = bias_k.contiguous() if has_bias else up_k
    bias_v = bias_v.contiguous() if has_bias else up_v
    positions = real(positions)  # int32 or int64, read through its strides
    if inv_freq.device != device or inv_freq.dtype != torch.float32:
        inv_freq = inv_freq.to(device=device, dtype=torch.float32)
    has_mask = key_mask is not None
    mask = out  # never read without a mask
    if has_mask:
        mask = real(key_mask)
        if mask.dtype == torch.bool:
            mask = mask.view(torch.int8)  # no copy; the kernel reads bytes and tests != 0
        elif mask.dtype not in (torch.int8, torch.uint8):
            mask = (mask != 0).view(torch.int8)
    lat_lens = out if latent_lens is None else real(latent_lens)  # any integer dtype
    win_lens = out if window_lens is None else real(window_lens)
    ck, cks, ckz, s_cksb, s_ckst = _latent_args(latent_k, out)
    cv, cvs, cvz, s_cvsb, s_cvst = _latent_args(latent_v, out)
    rk, rv = latent_k.rank, latent_v.rank
    rhk, rhv = (rk + 1) // 2, (rv + 1) // 2
    LAST_COMPILED["main"] = _cskv_decode_kernel[(batch * n_chunks, n_splits)](
        q, ck, cks, ckz, cv, cvs, cvz, up_k, bias_k, up_v, bias_v, positions, inv_freq, window_k, window_v, mask,
        lat_lens, win_lens, out, part,
        float(sm_scale), float(rope_scaling), latent_len, window, split, n_splits, total_rows,
        rk, rhk, rv, rhv, latent_k.group_size,
        q.stride(0), q.stride(1), ck.stride(0), ck.stride(1), s_cksb, s_ckst, cv.stride(0), cv.stride(1),
        s_cvsb, s_cvst, up_k.stride(0), up_v.stride(0), positions.stride(0), positions.stride(-1),
        window_k.stride(0), window_k.stride(1), window_k.stride(2), window_v.stride(0), window_v.stride(1),
        window_v.stride(2), mask.stride(0), mask.stride(-1), out.stride(0), out.stride(1),
        KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, HEADS_PER_PROG=hpp,
        BITS=latent_k.bits or 0, HAS_BIAS=has_bias, HAS_MASK=has_mask, HAS_LAT_LENS=latent_lens is not None,
        HAS_WIN_LENS=window_lens is not None, LOW=low, DIRECT=direct, FAST_ROPE=int(fast_rope),
        KEYS_T=keys_transposed,
        ROWS=_pad(hpp * group), HALF_PAD=_pad(head_dim // 2), RHK_PAD=_pad(rhk), RHV_PAD=_pad(rhv),
        BLOCK_N=block_n, BLOCK_W=min(block_n, _pad(window)), num_warps=num_warps, num_stages=num_stages)
    if not direct:
        _combine_kernel[(batch * q_heads,)](
            part, out, n_splits, total_rows, out.stride(0), out.stride(1), Q_HEADS=q_heads, HEAD_DIM=head_dim,
            S_BLOCK=min(32, _pad(n_splits, 2)), D_PAD=_pad(head_dim, 2), num_warps=2)
    return out
