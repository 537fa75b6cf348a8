"""The backward kernels, recomputing probabilities from the saved ``lse``:

1. ``_prep_kernel``: ``delta = rowsum(dO * O)`` (less ``dlse``, the gradient reaching lse,
   when the loss used it) and ``lse`` in log2 units, into row buffers
   padded to a whole number of query blocks (pad rows: delta 0, lse +inf, so p = 0 there and
   the kernels read them without masks). A fully masked row's lse is -inf; it becomes +inf
   too, so its probabilities are exactly 0 instead of exp2(-inf + inf) = NaN. For the Gluon
   backward it also zeroes the float32 dQ that kernel sums into.
2. ``_dkdv_kernel``: one program per (key block, batch * kv head); it loops over the query
   heads of the GQA group and the query blocks that see its keys, so dK/dV are summed in
   registers: no atomics, deterministic.
3. ``_dq_kernel``: one program per (query block, batch * query head), looping over key blocks.
"""

import torch
import triton
import triton.language as tl

from attnkit.backend_utils import band_args, current_stream, score_args

from ._band import (
    band_mask,
    key_range,
    load_keys,
    load_tile,
    mma,
    query_range,
    seen_keys,
    store_tile,
    tanh,
    valid_keys,
    zero_keys,
)
from ._configs import KernelConfig, launch_options, padded_head_dim
from ._dropout import dropout_state, keep_tile
from ._forward import _flags, dropout_key, dropout_scalars, packed_view, varlen_grid
from ._launcher import DirectLaunch, FastKernel, Sites, cdiv, fast_launches, layout_key


@triton.jit
def _prep_kernel(O, DO, LSE, STATS, DQ, DLSE,
                 sob, soh, som, sod, sdb, sdh, sdm, sdd, sqb, sqh, sqm, sqd,
                 H, Sq, Sq_pad, half,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 ZERO_DQ: tl.constexpr, HAS_DLSE: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o_ptrs = (O + b.to(tl.int64) * sob + h.to(tl.int64) * soh
              + rows.to(tl.int64)[:, None] * som + offs_d[None, :] * sod)
    do_ptrs = (DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
               + rows.to(tl.int64)[:, None] * sdm + offs_d[None, :] * sdd)
    o = load_tile(o_ptrs, rows, Sq, offs_d, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    do = load_tile(do_ptrs, rows, Sq, offs_d, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(LSE + bh.to(tl.int64) * Sq + rows, mask=rows < Sq, other=float("-inf"))
    if HAS_DLSE:  # dS = P (dP - (delta - dlse)); rows that saw no key keep P = 0, whatever dlse
        dlse = tl.load(DLSE + bh.to(tl.int64) * Sq + rows, mask=rows < Sq, other=0.0)
        delta = tl.where(lse == float("-inf"), delta, delta - dlse)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(STATS + bh.to(tl.int64) * Sq_pad + rows, delta)  # delta, then lse2 ``half`` on
    tl.store(STATS + half + bh.to(tl.int64) * Sq_pad + rows, lse2)
    if ZERO_DQ:  # the float32 dQ that the Gluon backward sums into: one launch less
        dq_ptrs = (DQ + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
                   + rows.to(tl.int64)[:, None] * sqm + offs_d[None, :] * sqd)
        store_tile(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), rows, Sq, offs_d,
                   HEAD_DIM, BLOCK_D != HEAD_DIM)


@triton.jit
def _scores_t(qk, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """Scores in log2 units and, with a softcap, tanh's value (for its derivative)."""
    if SOFTCAP:
        t = tanh(qk * cap_in)
        s = t * cap_out
    else:
        t = qk
        s = qk * qk_scale
    return s, t


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, q_desc, do_desc,
                 sqm, sqd, sdm, sdd, start, end, cols, off, Sq, Sk_b, left, right,
                 qk_scale, cap_in, cap_out, n0, seed, offset, bh, threshold, drop_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                 MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 SOFTCAP: tl.constexpr, USE_TMA: tl.constexpr, PREC: tl.constexpr,
                 VARLEN: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_tile = offs_m[:, None] * sqm + offs_d[None, :] * sqd
    do_tile = offs_m[:, None] * sdm + offs_d[None, :] * sdd
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + offs_m
        if USE_TMA:
            q = q_desc.load([m0, 0])
            do = do_desc.load([m0, 0])
        else:
            m0_64 = tl.cast(m0, tl.int64)
            q = load_tile(q_base + m0_64 * sqm + q_tile, rows, Sq, offs_d, HEAD_DIM,
                          MASKED, BLOCK_D != HEAD_DIM)
            do = load_tile(do_base + m0_64 * sdm + do_tile, rows, Sq, offs_d, HEAD_DIM,
                           MASKED, BLOCK_D != HEAD_DIM)
        if VARLEN:
            if MASKED:  # rows past the sequence are the next one's (or past the buffer)
                lse2 = tl.load(lse2_base + rows, mask=rows < Sq, other=float("inf"))
                delta = tl.load(delta_base + rows, mask=rows < Sq, other=0.0)
            else:
                lse2 = tl.load(lse2_base + rows)
                delta = tl.load(delta_base + rows)
        else:
            lse2 = tl.load(lse2_base + rows)
            delta = tl.load(delta_base + rows)
        if PREC == 0:
            qk_t = mma(k, tl.trans(q), None, PREC)
        else:
            # fp32: the forward's orientation, so the scores (and their rounding) match the
            # ones lse was computed from; large scores amplify any mismatch into p.
            qk_t = tl.trans(mma(q, tl.trans(k), None, PREC))
        s_t, t_t = _scores_t(qk_t, qk_scale, cap_in, cap_out, SOFTCAP)
        if MASKED:
            mask = band_mask(rows[None, :], cols[:, None], off, Sk_b, left, right,
                             HAS_LEFT, HAS_RIGHT)
            s_t = tl.where(mask, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if DROPOUT:  # dV = (c Z P)^T dO (c once, at the end); dP = c Z (dO V^T)
            keep_t = tl.trans(keep_tile(seed, offset, bh, rows, n0, threshold, BLOCK_M,
                                        BLOCK_N))
            dv = mma(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, dv, PREC)
            dp_t = mma(v, tl.trans(do), None, PREC)
            dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
        else:
            dv = mma(p_t.to(do.dtype), do, dv, PREC)
            dp_t = mma(v, tl.trans(do), None, PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        if MASKED:
            if USE_TMA:  # TMA loaded unseen keys' K/V rows as they are: 0 x NaN above
                ds_t = tl.where(mask, ds_t, 0.0)
        dk = mma(ds_t.to(q.dtype), q, dk, PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, SEQLENS, CU_Q, STATE,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sdb, sdh, sdm, sdd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                 HKV, Sq, Sq_pad, Sk, GROUP, scale, qk_scale, cap_in, cap_out, left, right,
                 threshold, drop_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_SEQLENS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 SOFTCAP: tl.constexpr, USE_TMA: tl.constexpr, PREC: tl.constexpr,
                 VARLEN: tl.constexpr, DROPOUT: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    if VARLEN:
        # Grid (key blocks of the longest sequence, HKV, B); SEQLENS and CU_Q are
        # cu_seqlens_k and cu_seqlens_q. From here on Sq, Sk_b and Sk (the bound of the
        # stores and descriptors) are sequence b's lengths, and the bases point at its first
        # rows.
        hk = tl.program_id(1)
        b = tl.program_id(2)
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(SEQLENS + b)
        Sq = tl.load(CU_Q + b + 1) - q0
        Sk_b = tl.load(SEQLENS + b + 1) - k0
        Sk = Sk_b
        if n0 >= Sk:  # past this sequence's end: the next sequence's keys are not ours
            return
        off = Sk_b - Sq
        cols = n0 + tl.arange(0, BLOCK_N)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k_base = K + k0.to(tl.int64) * skn + hk.to(tl.int64) * skh
        v_base = V + k0.to(tl.int64) * svn + hk.to(tl.int64) * svh
    else:
        bh = tl.program_id(1)
        b = bh // HKV
        hk = bh % HKV
        Sk_b = valid_keys(SEQLENS, b, Sk, HAS_SEQLENS)
        off = Sk_b - Sq
        cols = n0 + tl.arange(0, BLOCK_N)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)

        k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh

    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[Sk, HEAD_DIM], strides=[skn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[Sk, HEAD_DIM], strides=[svn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        # Unseen keys' rows as memory holds them: the boundary blocks select their dS to 0.
        k = k_desc.load([n0, 0])
        v = v_desc.load([n0, 0])
    else:
        # Unseen keys' rows are not read: 0, so their dP, dS, dK and dV are 0 too.
        kv_lo, kv_hi = seen_keys(Sq, Sk_b, left, right, HAS_LEFT, HAS_RIGHT)
        n0_64 = tl.cast(n0, tl.int64)
        k = load_keys(k_base + n0_64 * skn + offs_n[:, None] * skn + offs_d[None, :] * skd,
                      cols, kv_lo, kv_hi, offs_d, HEAD_DIM, True, HAS_LEFT, BLOCK_D != HEAD_DIM)
        v = load_keys(v_base + n0_64 * svn + offs_n[:, None] * svn + offs_d[None, :] * svd,
                      cols, kv_lo, kv_hi, offs_d, HEAD_DIM, True, HAS_LEFT, BLOCK_D != HEAD_DIM)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if DROPOUT:
        seed, offset = dropout_state(STATE)
    else:
        seed = 0
        offset = 0
    lo, full_lo, full_hi, hi = query_range(n0, Sq, Sk_b, left, right, BLOCK_M, BLOCK_N,
                                           HAS_LEFT, HAS_RIGHT)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        if VARLEN:  # lse2 and delta are (Hq, Sq_pad) rows of the packed queries
            q_base = Q + q0.to(tl.int64) * sqm + h.to(tl.int64) * sqh
            do_base = DO + q0.to(tl.int64) * sdm + h.to(tl.int64) * sdh
            row_base = h.to(tl.int64) * Sq_pad + q0
        else:
            q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
            do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
            row_base = (b * (HKV * GROUP) + h).to(tl.int64) * Sq_pad
        if USE_TMA:
            q_desc = tl.make_tensor_descriptor(q_base, shape=[Sq, HEAD_DIM],
                                               strides=[sqm, 1], block_shape=[BLOCK_M, BLOCK_D])
            do_desc = tl.make_tensor_descriptor(do_base, shape=[Sq, HEAD_DIM],
                                                strides=[sdm, 1],
                                                block_shape=[BLOCK_M, BLOCK_D])
        else:
            q_desc = q_base
            do_desc = do_base
        drop_bh = b * (HKV * GROUP) + h  # the mask's head: the query head's
        # Boundary blocks below the band, the fully visible middle, boundary blocks above.
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, LSE2 + row_base, DELTA + row_base,
                              q_desc, do_desc, sqm, sqd, sdm, sdd, lo, full_lo, cols, off, Sq,
                              Sk_b, left, right, qk_scale, cap_in, cap_out, n0, seed, offset,
                              drop_bh, threshold, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_D, True,
                              HAS_LEFT, HAS_RIGHT, SOFTCAP, USE_TMA, PREC, VARLEN, DROPOUT,
                              BLOCK_N)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, LSE2 + row_base, DELTA + row_base,
                              q_desc, do_desc, sqm, sqd, sdm, sdd, full_lo, full_hi, cols, off,
                              Sq, Sk_b, left, right, qk_scale, cap_in, cap_out, n0, seed,
                              offset, drop_bh, threshold, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_D,
                              False, HAS_LEFT, HAS_RIGHT, SOFTCAP, USE_TMA, PREC, VARLEN,
                              DROPOUT, BLOCK_N)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, LSE2 + row_base, DELTA + row_base,
                              q_desc, do_desc, sqm, sqd, sdm, sdd, full_hi, hi, cols, off, Sq,
                              Sk_b, left, right, qk_scale, cap_in, cap_out, n0, seed, offset,
                              drop_bh, threshold, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_D, True,
                              HAS_LEFT, HAS_RIGHT, SOFTCAP, USE_TMA, PREC, VARLEN, DROPOUT,
                              BLOCK_N)

    dk = dk * scale  # d(scores)/d(qk) = scale (softcap's tanh' is applied per element)
    if DROPOUT:
        dv = dv * drop_scale
    if VARLEN:
        dk_base = DK + k0.to(tl.int64) * sdkn + hk.to(tl.int64) * sdkh
        dv_base = DV + k0.to(tl.int64) * sdvn + hk.to(tl.int64) * sdvh
    else:
        dk_base = DK + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh
        dv_base = DV + b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh
    dk_ptrs = (dk_base
               + n0.to(tl.int64) * sdkn + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd)
    dv_ptrs = (dv_base
               + n0.to(tl.int64) * sdvn + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd)
    store_tile(dk_ptrs, dk.to(DK.dtype.element_ty), cols, Sk, offs_d, HEAD_DIM,
               BLOCK_D != HEAD_DIM)
    store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), cols, Sk, offs_d, HEAD_DIM,
               BLOCK_D != HEAD_DIM)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, skn, skd, svn, svd,
               start, end, rows, off, kv_lo, kv_hi, Sk_b, left, right, qk_scale, cap_in,
               cap_out, seed, offset, bh, threshold, drop_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, USE_TMA: tl.constexpr, PREC: tl.constexpr,
               DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_tile = offs_n[:, None] * skn + offs_d[None, :] * skd
    v_tile = offs_n[:, None] * svn + offs_d[None, :] * svd
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        if USE_TMA:
            k = k_desc.load([n0, 0])
            v = v_desc.load([n0, 0])
            if MASKED:  # dS K and dO V^T must not meet unseen keys' rows: 0 x NaN
                k = zero_keys(k, cols, kv_lo, kv_hi, HAS_LEFT)
                v = zero_keys(v, cols, kv_lo, kv_hi, HAS_LEFT)
        else:
            n0_64 = tl.cast(n0, tl.int64)
            k = load_keys(k_base + n0_64 * skn + k_tile, cols, kv_lo, kv_hi, offs_d, HEAD_DIM,
                          MASKED, HAS_LEFT, BLOCK_D != HEAD_DIM)
            v = load_keys(v_base + n0_64 * svn + v_tile, cols, kv_lo, kv_hi, offs_d, HEAD_DIM,
                          MASKED, HAS_LEFT, BLOCK_D != HEAD_DIM)
        qk = mma(q, tl.trans(k), None, PREC)
        s, t = _scores_t(qk, qk_scale, cap_in, cap_out, SOFTCAP)
        if MASKED:
            mask = band_mask(rows[:, None], cols[None, :], off, Sk_b, left, right,
                             HAS_LEFT, HAS_RIGHT)
            s = tl.where(mask, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = mma(do, tl.trans(v), None, PREC)
        if DROPOUT:  # dP = c Z (dO V^T); delta = rowsum(dO * O) is unchanged
            keep = keep_tile(seed, offset, bh, rows, n0, threshold, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = mma(ds.to(k.dtype), k, dq, PREC)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, SEQLENS, CU_Q, STATE,
               sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
               sdb, sdh, sdm, sdd, sdqb, sdqh, sdqm, sdqd,
               H, Sq, Sq_pad, Sk, GROUP, scale, qk_scale, cap_in, cap_out, left, right,
               threshold, drop_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_SEQLENS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, REVERSE_M: tl.constexpr, USE_TMA: tl.constexpr,
               PREC: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr):
    pid_m = tl.program_id(0)
    if REVERSE_M:
        pid_m = tl.num_programs(0) - 1 - pid_m
    if VARLEN:
        # Grid (query blocks of the longest sequence, H, B), and lengths and bases as the
        # forward's.
        h = tl.program_id(1)
        b = tl.program_id(2)
        hk = h // GROUP
        m0 = pid_m * BLOCK_M
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(SEQLENS + b)
        Sq = tl.load(CU_Q + b + 1) - q0
        Sk_b = tl.load(SEQLENS + b + 1) - k0
        Sk = Sk_b
        if m0 >= Sq:
            return
        off = Sk_b - Sq
        rows = m0 + tl.arange(0, BLOCK_M)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_base = Q + q0.to(tl.int64) * sqm + h.to(tl.int64) * sqh
        do_base = DO + q0.to(tl.int64) * sdm + h.to(tl.int64) * sdh
        k_base = K + k0.to(tl.int64) * skn + hk.to(tl.int64) * skh
        v_base = V + k0.to(tl.int64) * svn + hk.to(tl.int64) * svh
    else:
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        m0 = pid_m * BLOCK_M
        Sk_b = valid_keys(SEQLENS, b, Sk, HAS_SEQLENS)
        off = Sk_b - Sq
        rows = m0 + tl.arange(0, BLOCK_M)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)

        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
        k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    m0_64 = tl.cast(m0, tl.int64)
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(q_base, shape=[Sq, HEAD_DIM], strides=[sqm, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        do_desc = tl.make_tensor_descriptor(do_base, shape=[Sq, HEAD_DIM], strides=[sdm, 1],
                                            block_shape=[BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(k_base, shape=[Sk, HEAD_DIM], strides=[skn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[Sk, HEAD_DIM], strides=[svn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        q = q_desc.load([m0, 0])
        do = do_desc.load([m0, 0])
    else:
        k_desc = k_base
        v_desc = v_base
        q = load_tile(q_base + m0_64 * sqm + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                      rows, Sq, offs_d, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
        do = load_tile(do_base + m0_64 * sdm + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
                       rows, Sq, offs_d, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    if VARLEN:  # lse2 and delta are (Hq, Sq_pad) rows of the packed queries
        row_base = h.to(tl.int64) * Sq_pad + q0
        lse2 = tl.load(LSE2 + row_base + rows, mask=rows < Sq, other=float("inf"))
        delta = tl.load(DELTA + row_base + rows, mask=rows < Sq, other=0.0)
    else:
        lse2 = tl.load(LSE2 + bh.to(tl.int64) * Sq_pad + rows)
        delta = tl.load(DELTA + bh.to(tl.int64) * Sq_pad + rows)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if DROPOUT:  # the mask's counter: (key column // 8, query row, b * Hq + h, offset)
        seed, offset = dropout_state(STATE)
        drop_bh = b * H + h
    else:
        seed = 0
        offset = 0
        drop_bh = 0
    lo, full_lo, full_hi, hi = key_range(m0, Sq, Sk_b, left, right, BLOCK_M, BLOCK_N,
                                         HAS_LEFT, HAS_RIGHT)
    kv_lo, kv_hi = seen_keys(Sq, Sk_b, left, right, HAS_LEFT, HAS_RIGHT)
    dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, skn, skd, svn, svd,
                    lo, full_lo, rows, off, kv_lo, kv_hi, Sk_b, left, right, qk_scale, cap_in,
                    cap_out, seed, offset, drop_bh, threshold, drop_scale, HEAD_DIM, BLOCK_N,
                    BLOCK_D, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, USE_TMA, PREC, DROPOUT,
                    BLOCK_M)
    dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, skn, skd, svn, svd,
                    full_lo, full_hi, rows, off, kv_lo, kv_hi, Sk_b, left, right, qk_scale, cap_in,
                    cap_out, seed, offset, drop_bh, threshold, drop_scale, HEAD_DIM, BLOCK_N,
                    BLOCK_D, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, USE_TMA, PREC, DROPOUT,
                    BLOCK_M)
    dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, skn, skd, svn, svd,
                    full_hi, hi, rows, off, kv_lo, kv_hi, Sk_b, left, right, qk_scale, cap_in,
                    cap_out, seed, offset, drop_bh, threshold, drop_scale, HEAD_DIM, BLOCK_N,
                    BLOCK_D, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, USE_TMA, PREC, DROPOUT,
                    BLOCK_M)
    dq = dq * scale
    if VARLEN:
        dq_base = DQ + q0.to(tl.int64) * sdqm + h.to(tl.int64) * sdqh
    else:
        dq_base = DQ + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh
    dq_ptrs = (dq_base
               + m0_64 * sdqm + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd)
    store_tile(dq_ptrs, dq.to(DQ.dtype.element_ty), rows, Sq, offs_d, HEAD_DIM,
               BLOCK_D != HEAD_DIM)


_PREP_BLOCK_M = 64


_PREP, _DKDV, _DQ = (Sites(FastKernel(k)) for k in (_prep_kernel, _dkdv_kernel, _dq_kernel))


def _stats(q, pad_to: int) -> torch.Tensor:
    B, Hq, Sq, _ = q.shape
    pad_to = max(pad_to, _PREP_BLOCK_M)
    return torch.empty((2, B * Hq, cdiv(Sq, pad_to) * pad_to), dtype=torch.float32,
                       device=q.device)


def prepare(q, out, lse, dout, pad_to: int, dlse=None) -> torch.Tensor:
    """``stats`` (2, B * Hq, Sq_pad) float32: ``delta`` (less ``dlse`` if given) and log2
    ``lse`` as row buffers (``stats.unbind(0)``)."""
    stats = _stats(q, pad_to)
    launch_prep(q, out, lse.contiguous(), dout, stats,
                dlse=None if dlse is None else dlse.contiguous())
    return stats


def launch_prep(q, out, lse, dout, stats, dq_acc=None, dlse=None) -> DirectLaunch:
    """`prepare`'s launch into ``stats`` (its rows a multiple of the prep block), returning
    its site: the Gluon backward's plan launches it again without the key. ``dq_acc``, if
    given (q's shape, float32), is zeroed by the same launch. ``dlse`` (float32, lse's shape,
    contiguous), if given, is subtracted from delta; without it the site's last pointer is
    lse again, unread."""
    B, Hq, Sq, D = q.shape
    Sq_pad = stats.shape[2]
    zero = dq_acc is not None
    has_dlse = dlse is not None
    return _PREP.launch(
        (q.dtype, q.shape, Sq_pad, layout_key(out, dout, lse, dq_acc, dlse)),
        (out, dout, lse, stats, dq_acc if zero else stats, dlse if has_dlse else lse),
        lambda: ((Sq_pad // _PREP_BLOCK_M, B * Hq),
                 dict(HEAD_DIM=D, BLOCK_D=padded_head_dim(D), BLOCK_M=_PREP_BLOCK_M,
                      ZERO_DQ=zero, HAS_DLSE=has_dlse, num_warps=4),
                 (*out.stride(), *dout.stride(), *(dq_acc.stride() if zero else (0,) * 4),
                  Hq, Sq, Sq_pad, B * Hq * Sq_pad)))


@triton.jit
def _cast_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n).to(Y.dtype.element_ty), mask=offs < n)


_CAST = Sites(FastKernel(_cast_kernel))
_CAST_BLOCK = 4096


def cast_dense(x: torch.Tensor, y: torch.Tensor) -> DirectLaunch:
    """``y.copy_(x)`` for two tensors of one layout, dense in memory (any dim order), in one
    direct launch: torch's copy costs a few times more host time, which the autograd
    engine's thread pays twice over (docs/tuning.md). Returns the launch site (see
    `launch_prep`)."""
    n = x.numel()
    return _CAST.launch(
        (x.dtype, y.dtype, n, (x.data_ptr() | y.data_ptr()) & 15), (x, y),
        lambda: ((cdiv(n, _CAST_BLOCK),), dict(BLOCK=_CAST_BLOCK, num_warps=4), (n,)))


def _launch_grads(sites, problem, q, k, v, dout, delta, lse2, seqlens_k, grads, heads, grid,
                  cfg: KernelConfig, use_tma: bool, layout, cu_seqlens_q=None, dropout=None,
                  **constexprs):
    """One of the two gradient kernels, which share their argument list but for the
    gradient tensors written and the head count of the grid's second axis. Varlen
    (``cu_seqlens_q`` given): q, k, v, dout and the gradients are 4-D views of the packed
    tensors (`packed_view`), ``seqlens_k`` is cu_seqlens_k and ``layout`` fixes the
    totals. ``dropout``: the call's `attnkit.dropout.Dropout`, exactly when
    ``problem.dropout_p > 0``."""
    def setup():
        left, right, _, _ = band_args(problem)
        return grid, dict(
            HEAD_DIM=q.shape[3], BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, **launch_options(cfg),
            **constexprs,
            **_flags(problem, seqlens_k is not None and cu_seqlens_q is None, q.dtype,
                     use_tma)), (
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
            *(s for g in grads for s in g.stride()),
            heads, q.shape[2], delta.shape[1], k.shape[2], problem.group_size,
            problem.scale, *score_args(problem), left, right, *dropout_scalars(problem))

    # delta, lse2 and the gradients are fresh allocations: their layout follows from the
    # rest, so the key fixes every stride and scalar after the pointers. Without dropout
    # the state's place holds another pointer, unread.
    last = seqlens_k if seqlens_k is not None else delta
    return sites.launch(
        (problem, cfg, use_tma, layout or layout_key(q, k, v, dout, seqlens_k),
         dropout_key(dropout)),
        (q, k, v, dout, lse2, delta, *grads, last,
         cu_seqlens_q if cu_seqlens_q is not None else last,
         last if dropout is None else dropout.state),
        setup)


def launch_dkdv(problem, q, k, v, dout, delta, lse2, seqlens_k, dk, dv, cfg: KernelConfig,
                use_tma: bool, layout=None, dropout=None) -> DirectLaunch:
    """``layout``: `layout_key` of (q, k, v, dout, seqlens_k) if the caller has it."""
    B, Hkv, Sk = k.shape[0], k.shape[1], k.shape[2]
    return _launch_grads(_DKDV, problem, q, k, v, dout, delta, lse2, seqlens_k, (dk, dv), Hkv,
                         (cdiv(Sk, cfg.block_n), B * Hkv), cfg, use_tma, layout,
                         dropout=dropout)


def launch_dq(problem, q, k, v, dout, delta, lse2, seqlens_k, dq, cfg: KernelConfig,
              use_tma: bool, layout=None, dropout=None) -> DirectLaunch:
    """``layout``: `layout_key` of (q, k, v, dout, seqlens_k) if the caller has it."""
    B, Hq, Sq = q.shape[0], q.shape[1], q.shape[2]
    return _launch_grads(_DQ, problem, q, k, v, dout, delta, lse2, seqlens_k, (dq,), Hq,
                         (cdiv(Sq, cfg.block_m), B * Hq), cfg, use_tma, layout,
                         dropout=dropout, REVERSE_M=problem.band[1] is not None)


def fresh_layout(q, out, lse) -> bool:
    """Whether out and lse are laid out as our forwards' fresh outputs are (out with q's
    strides, lse contiguous, both 16-byte aligned): a backward route's key, which sees q, k,
    v and dout, then also fixes the prep launch's, so the route's kept sites may launch."""
    return (out.stride() == q.stride() and lse.is_contiguous()
            and not (out.data_ptr() | lse.data_ptr()) & 15)


class BackwardSites:
    """One route's three launch sites (prep, dK/dV, dQ), kept after its first call."""

    __slots__ = ("sites",)

    def __init__(self):
        self.sites: tuple[DirectLaunch, DirectLaunch, DirectLaunch] | None = None


def launch_backward(problem, q, k, v, out, lse, dout, seqlens_k,
                    dkdv_cfg: KernelConfig, dq_cfg: KernelConfig, use_tma: bool, layout=None,
                    kept: BackwardSites | None = None, dlse=None, dropout=None):
    """``layout``: `layout_key` of (q, k, v, dout, seqlens_k) if the caller has it. ``kept``:
    the caller's route's sites (one per problem and layout of q, k, v, dout, seqlens_k): after
    a first call, later ones make their four allocations and three direct launches with no
    key built, as the Gluon backward's plan does (this runs on the autograd engine's thread,
    where Python costs about twice as much; docs/tuning.md). ``dlse``: the gradient reaching
    lse (float32, lse's shape, contiguous) or None; the kept prep site is the one without
    it, so a call with it launches its prep through the key. ``dropout``: the call's
    `attnkit.dropout.Dropout`, exactly when ``problem.dropout_p > 0``; the kept sites hold
    a 16-byte aligned state's specialization, so another state goes through the keys."""
    same = fresh_layout(q, out, lse) and not dropout_key(dropout)
    stats = _stats(q, max(dkdv_cfg.block_m, dq_cfg.block_m))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if kept is not None and kept.sites is not None and same and fast_launches():
        prep, dkdv, dq_site = kept.sites
        delta = stats.data_ptr()  # stats[0]; lse2 is stats[1]
        lse2 = delta + stats.stride(0) * 4
        last = seqlens_k if seqlens_k is not None else delta
        state = last if dropout is None else dropout.state
        stream = current_stream(q.device.index)
        if dlse is None:
            prep.run(stream, out, dout, lse, stats, stats, lse)
        else:
            launch_prep(q, out, lse, dout, stats, dlse=dlse)
        dkdv.run(stream, q, k, v, dout, lse2, delta, dk, dv, last, last, state)
        dq_site.run(stream, q, k, v, dout, lse2, delta, dq, last, last, state)
        return dq, dk, dv
    delta, lse2 = stats.unbind(0)
    if dlse is None:
        prep = launch_prep(q, out, lse.contiguous(), dout, stats)
    else:
        prep = launch_prep(q, out, lse.contiguous(), dout, stats, dlse=dlse.contiguous())
    layout = layout or layout_key(q, k, v, dout, seqlens_k)
    dkdv = launch_dkdv(problem, q, k, v, dout, delta, lse2, seqlens_k, dk, dv, dkdv_cfg,
                       use_tma and dkdv_cfg.tma, layout, dropout)
    dq_site = launch_dq(problem, q, k, v, dout, delta, lse2, seqlens_k, dq, dq_cfg,
                        use_tma and dq_cfg.tma, layout, dropout)
    sites = (prep, dkdv, dq_site)
    if (kept is not None and same and dlse is None
            and all(site.compiled is not None for site in sites)):
        kept.sites = sites
    return dq, dk, dv


def launch_backward_varlen(problem, q, k, v, out, lse, dout, cu_seqlens_q, cu_seqlens_k,
                           dkdv_cfg: KernelConfig, dq_cfg: KernelConfig, use_tma: bool = False,
                           dlse=None, dropout=None):
    """`launch_backward` for packed tensors: ``q (total_q, Hq, D)``, ``k``/``v (total_k,
    Hkv, D)``, ``lse (Hq, total_q)``; returns contiguous gradients of the inputs' shapes.
    The prep runs on the packed rows as one dense batch (`packed_view`); the dK/dV and dQ
    kernels then read each sequence's rows of delta and lse2. ``use_tma``: tensor
    descriptors per sequence where each kernel's config allows them (as `launch_backward`).
    ``dropout``: the forward's, exactly when ``problem.dropout_p > 0`` (regenerated per
    sequence as `launch_forward_varlen` draws it)."""
    total_q, Hq, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    dq = torch.empty((total_q, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((total_k, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((total_k, Hkv, D), dtype=v.dtype, device=v.device)
    if total_q == 0 or total_k == 0:  # no query sees a key: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    qv, kv_, vv, dov = (packed_view(t) for t in (q, k, v, dout))
    stats = _stats(qv, max(dkdv_cfg.block_m, dq_cfg.block_m))
    delta, lse2 = stats.unbind(0)
    launch_prep(qv, packed_view(out), lse.contiguous().unsqueeze(0), dov, stats,
                dlse=None if dlse is None else dlse.contiguous().unsqueeze(0))
    # The totals fix the strides of the fresh gradients and stats, which the problem does not.
    layout = ("varlen", total_q, total_k, layout_key(q, k, v, dout, cu_seqlens_q, cu_seqlens_k))
    B = problem.batch
    _launch_grads(_DKDV, problem, qv, kv_, vv, dov, delta, lse2, cu_seqlens_k,
                  (packed_view(dk), packed_view(dv)), Hkv,
                  varlen_grid(cdiv(problem.seqlen_k, dkdv_cfg.block_n), Hkv, B), dkdv_cfg,
                  use_tma and dkdv_cfg.tma, layout, cu_seqlens_q, dropout)
    _launch_grads(_DQ, problem, qv, kv_, vv, dov, delta, lse2, cu_seqlens_k,
                  (packed_view(dq),), Hq,
                  varlen_grid(cdiv(problem.seqlen_q, dq_cfg.block_m), Hq, B), dq_cfg,
                  use_tma and dq_cfg.tma, layout, cu_seqlens_q, dropout,
                  REVERSE_M=problem.band[1] is not None)
    return dq, dk, dv
