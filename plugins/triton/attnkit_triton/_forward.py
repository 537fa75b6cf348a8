"""The forward kernel: one program per (query block, batch * query head).

Tiled ``Q K^T``, the online softmax in registers (exp2, with log2(e) folded into the scale),
``P V`` accumulated in fp32; writes ``out`` and the natural-log ``lse``. Key blocks outside
the visible band are never visited, and only boundary blocks pay for the mask.

Two load paths share the kernel: plain pointers (any strides, any GPU, the interpreter) and
Hopper tensor descriptors (TMA) where the layout allows them (``USE_TMA``).
"""

import torch
import triton
import triton.language as tl

from attnkit.backend_utils import band_args, score_args
from attnkit.dropout import threshold as keep_threshold

from ._band import (
    band_mask,
    dot_precision,
    key_range,
    load_keys,
    load_tile,
    mma,
    seen_keys,
    store_tile,
    tanh,
    valid_keys,
    zero_keys,
)
from ._configs import KernelConfig, interpreting, launch_options
from ._dropout import dropout_state, keep_tile
from ._launcher import FastKernel, Sites, cdiv, layout_key


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k, v, n0, cols, rows, off, Sk_b, left, right,
              qk_scale, cap_in, unit, seed, offset, bh, threshold,
              MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              SOFTCAP: tl.constexpr, FOLD: tl.constexpr, PREC: tl.constexpr,
              DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Scores s with exp2's argument s * unit - m * unit: m is the running max of s. FOLD
    # keeps s unscaled (the max of raw scores is the max of scaled ones when unit > 0), so
    # each score costs one FMA instead of a multiply and then an FMA.
    qk = mma(q, tl.trans(k), None, PREC)
    if SOFTCAP:
        s = tanh(qk * cap_in)
    elif FOLD:
        s = qk
    else:
        s = qk * qk_scale
    if MASKED:
        mask = band_mask(rows[:, None], cols[None, :], off, Sk_b, left, right,
                         HAS_LEFT, HAS_RIGHT)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    if SOFTCAP or FOLD:
        p = tl.math.exp2(s * unit - (m_use * unit)[:, None])
        alpha = tl.math.exp2((m_i - m_use) * unit)
    else:
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:  # l sums every probability; P V takes the kept ones (scaled by c at the end)
        p = tl.where(keep_tile(seed, offset, bh, rows, n0, threshold, BLOCK_M, BLOCK_N), p, 0.0)
    acc = acc * alpha[:, None]
    acc = mma(p.to(v.dtype), v, acc, PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, skn, skd, svn, svd,
                start, end, rows, off, kv_lo, kv_hi, Sk_b, left, right, qk_scale, cap_in, unit,
                seed, offset, bh, threshold,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, FOLD: tl.constexpr, USE_TMA: tl.constexpr,
                PREC: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_tile = offs_n[:, None] * skn + offs_d[None, :] * skd
    v_tile = offs_n[:, None] * svn + offs_d[None, :] * svd
    for n0 in tl.range(start, end, BLOCK_N):
        cols = n0 + offs_n
        if USE_TMA:
            k = k_desc.load([n0, 0])
            v = v_desc.load([n0, 0])
            if MASKED:  # unseen keys' scores are selected away; P V needs their V rows 0
                v = zero_keys(v, cols, kv_lo, kv_hi, HAS_LEFT)
        else:
            n0_64 = tl.cast(n0, tl.int64)
            k = load_keys(k_base + n0_64 * skn + k_tile, cols, kv_lo, kv_hi, offs_d, HEAD_DIM,
                          MASKED, HAS_LEFT, BLOCK_D != HEAD_DIM)
            v = load_keys(v_base + n0_64 * svn + v_tile, cols, kv_lo, kv_hi, offs_d, HEAD_DIM,
                          MASKED, HAS_LEFT, BLOCK_D != HEAD_DIM)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k, v, n0, cols, rows, off, Sk_b, left,
                                  right, qk_scale, cap_in, unit, seed, offset, bh, threshold,
                                  MASKED, HAS_LEFT, HAS_RIGHT, SOFTCAP, FOLD, PREC, DROPOUT,
                                  BLOCK_M, BLOCK_N)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SEQLENS, CU_Q, STATE,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                sob, soh, som, sod,
                H, Sq, Sk, GROUP, qk_scale, cap_in, unit, left, right, threshold, drop_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_SEQLENS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, FOLD: tl.constexpr, REVERSE_M: tl.constexpr,
                USE_TMA: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr,
                DROPOUT: tl.constexpr):
    pid_m = tl.program_id(0)
    if REVERSE_M:  # causal: the longest rows first, so the short ones fill the tail
        pid_m = tl.num_programs(0) - 1 - pid_m
    if VARLEN:
        # Grid (query blocks of the longest sequence, H, B). SEQLENS and CU_Q are cu_seqlens_k
        # and cu_seqlens_q; the Sq argument is total_q (lse's row stride). From here on Sq, Sk
        # and Sk_b are sequence b's lengths and the bases point at its first rows, so tensor
        # descriptors end at the sequence's end too (rows past it load as 0, stores stop).
        h = tl.program_id(1)
        b = tl.program_id(2)
        hk = h // GROUP
        m0 = pid_m * BLOCK_M
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(SEQLENS + b)
        lse_base = LSE + h.to(tl.int64) * Sq + q0
        Sq = tl.load(CU_Q + b + 1) - q0
        Sk_b = tl.load(SEQLENS + b + 1) - k0
        Sk = Sk_b
        if m0 >= Sq:  # past this sequence's end: the next sequence's rows are not ours
            return
        off = Sk_b - Sq
        q_base = Q + q0.to(tl.int64) * sqm + h.to(tl.int64) * sqh
        k_base = K + k0.to(tl.int64) * skn + hk.to(tl.int64) * skh
        v_base = V + k0.to(tl.int64) * svn + hk.to(tl.int64) * svh
        o_base = O + q0.to(tl.int64) * som + h.to(tl.int64) * soh
    else:
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        m0 = pid_m * BLOCK_M
        Sk_b = valid_keys(SEQLENS, b, Sk, HAS_SEQLENS)
        off = Sk_b - Sq

        # 64-bit base offsets: tensors may exceed 2^31 elements.
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        o_base = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(q_base, shape=[Sq, HEAD_DIM], strides=[sqm, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(k_base, shape=[Sk, HEAD_DIM], strides=[skn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[Sk, HEAD_DIM], strides=[svn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        q = q_desc.load([m0, 0])
    else:
        k_desc = k_base
        v_desc = v_base
        q_ptrs = q_base + m0.to(tl.int64) * sqm + offs_m[:, None] * sqm + offs_d[None, :] * sqd
        q = load_tile(q_ptrs, rows, Sq, offs_d, HEAD_DIM, True, BLOCK_D != HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
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
    # Leading boundary blocks (window's left edge), the unmasked middle, then the trailing
    # boundary (diagonal, right edge, end of the valid keys).
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc,
                                skn, skd, svn, svd, lo, full_lo, rows, off, kv_lo, kv_hi, Sk_b,
                                left, right, qk_scale, cap_in, unit, seed, offset, drop_bh,
                                threshold, HEAD_DIM, BLOCK_N, BLOCK_D, True, HAS_LEFT, HAS_RIGHT,
                                SOFTCAP, FOLD, USE_TMA, PREC, DROPOUT, BLOCK_M)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc,
                                skn, skd, svn, svd, full_lo, full_hi, rows, off, kv_lo, kv_hi, Sk_b,
                                left, right, qk_scale, cap_in, unit, seed, offset, drop_bh,
                                threshold, HEAD_DIM, BLOCK_N, BLOCK_D, False, HAS_LEFT, HAS_RIGHT,
                                SOFTCAP, FOLD, USE_TMA, PREC, DROPOUT, BLOCK_M)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc,
                                skn, skd, svn, svd, full_hi, hi, rows, off, kv_lo, kv_hi, Sk_b,
                                left, right, qk_scale, cap_in, unit, seed, offset, drop_bh,
                                threshold, HEAD_DIM, BLOCK_N, BLOCK_D, True, HAS_LEFT, HAS_RIGHT,
                                SOFTCAP, FOLD, USE_TMA, PREC, DROPOUT, BLOCK_M)

    # Rows that saw no key: l = 0, acc = 0 -> out 0 and lse -inf. A NaN row keeps l = NaN,
    # so its out and lse stay NaN.
    empty = l_i == 0.0
    if DROPOUT:  # kept probabilities scaled by c = 1 / (1 - p), once
        out = acc * (drop_scale / tl.where(empty, 1.0, l_i))[:, None]
    else:
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if SOFTCAP or FOLD:
        m_i = m_i * unit
    lse = tl.where(empty, float("-inf"),
                   (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if VARLEN:
        tl.store(lse_base + rows, lse, mask=rows < Sq)
    else:
        tl.store(LSE + bh.to(tl.int64) * Sq + rows, lse, mask=rows < Sq)
    if USE_TMA:
        o_desc = tl.make_tensor_descriptor(o_base, shape=[Sq, HEAD_DIM], strides=[som, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        o_desc.store([m0, 0], out.to(O.dtype.element_ty))
    else:
        o_ptrs = o_base + m0.to(tl.int64) * som + offs_m[:, None] * som + offs_d[None, :] * sod
        store_tile(o_ptrs, out.to(O.dtype.element_ty), rows, Sq, offs_d, HEAD_DIM,
                   BLOCK_D != HEAD_DIM)


_FWD = Sites(FastKernel(_fwd_kernel))


def _flags(problem, has_seqlens: bool, dtype, use_tma: bool) -> dict:
    """The constexprs the forward and backward kernels share."""
    band = band_args(problem)
    return dict(HAS_SEQLENS=has_seqlens, HAS_LEFT=band.has_left, HAS_RIGHT=band.has_right,
                SOFTCAP=problem.softcap is not None, USE_TMA=use_tma,
                PREC=dot_precision(dtype, interpreting()), VARLEN=problem.varlen,
                DROPOUT=problem.dropout_p > 0)


def dropout_scalars(problem) -> tuple[int, float]:
    """The kernels' ``threshold`` and ``drop_scale`` arguments (unread without dropout)."""
    if not problem.dropout_p:
        return 0, 1.0
    return keep_threshold(problem.dropout_p), 1.0 / (1.0 - problem.dropout_p)


def dropout_key(dropout) -> int | None:
    """What a launch key needs of the call's dropout state: its address modulo 16, which
    Triton specializes pointers on (None without dropout)."""
    return None if dropout is None else dropout.state.data_ptr() & 15


def _fold(problem) -> bool:
    """The FOLD constexpr: the scale goes into exp2's argument when its sign keeps the max."""
    return problem.softcap is None and problem.scale > 0


def _scalars(problem, fold: bool, Sq: int, Sk: int) -> tuple:
    """The forward kernel's arguments after the strides: H, Sq, Sk, GROUP, qk_scale, cap_in,
    unit (the log2 multiplier of the scores the kernel keeps: see `_fwd_step`), left,
    right, threshold, drop_scale."""
    left, right, _, _ = band_args(problem)
    qk_scale, cap_in, cap_out = score_args(problem)
    unit = cap_out if problem.softcap is not None else (qk_scale if fold else 1.0)
    return (problem.heads_q, Sq, Sk, problem.group_size, qk_scale, cap_in, unit, left, right,
            *dropout_scalars(problem))


def launch_forward(problem, q, k, v, seqlens_k, cfg: KernelConfig, use_tma: bool,
                   layout=None, dropout=None):
    """``layout``: `layout_key` of (q, k, v, seqlens_k) if the caller has it. ``dropout``
    (an `attnkit.dropout.Dropout`) is given exactly when ``problem.dropout_p > 0``."""
    B, Hq, Sq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)

    def setup():
        fold = _fold(problem)
        return (cdiv(Sq, cfg.block_m), B * Hq), dict(
            HEAD_DIM=D, BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            REVERSE_M=problem.band[1] is not None, FOLD=fold,
            **launch_options(cfg),
            **_flags(problem, seqlens_k is not None, q.dtype, use_tma)), (
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *_scalars(problem, fold, problem.seqlen_q, problem.seqlen_k))

    # out and lse are fresh allocations: their layout follows from q's and the problem, so
    # the key fixes every stride and scalar after the pointers. The last pointer stands in
    # for cu_seqlens_q, unread, and for the dropout state without dropout.
    last = seqlens_k if seqlens_k is not None else lse
    _FWD.launch((problem, cfg, use_tma, layout or layout_key(q, k, v, seqlens_k),
                 dropout_key(dropout)),
                (q, k, v, out, lse, last, last, last if dropout is None else dropout.state),
                setup)
    return out, lse


def packed_view(t: torch.Tensor) -> torch.Tensor:
    """A packed ``(total, H, D)`` tensor as ``(1, H, total, D)``, in place: the varlen
    kernels take its strides in the dense kernels' (batch, head, row, dim) order, the batch
    stride unread (a sequence starts at its offset), and the backward's prep reads it as one
    dense batch (delta and lse2 are row-wise)."""
    return t.unsqueeze(0).transpose(1, 2)


def varlen_grid(blocks: int, heads: int, batch: int) -> tuple[int, int, int]:
    """The varlen kernels' grid (blocks of the longest sequence, heads, sequences): heads
    and sequences on axes of their own, each of which CUDA caps at 65535 programs."""
    if batch > 65535:
        raise ValueError(f"attnkit-triton: a varlen call takes at most 65535 sequences "
                         f"(cu_seqlens has B + 1 = {batch + 1} offsets)")
    return (blocks, heads, batch)


def launch_forward_varlen(problem, q, k, v, cu_seqlens_q, cu_seqlens_k, cfg: KernelConfig,
                          use_tma: bool = False, dropout=None):
    """Packed ``q (total_q, Hq, D)``, ``k``/``v (total_k, Hkv, D)``: ``out`` (contiguous,
    q's shape) and ``lse (Hq, total_q)``. One launch over (query blocks of the longest
    sequence, Hq, B); programs past their sequence's end return at once. ``use_tma``: tensor
    descriptors per sequence (the caller checked that they apply). ``dropout`` exactly when
    ``problem.dropout_p > 0``: the kernel's batch index is the sequence's and its rows and
    columns count from the sequence's start, which is the packed mask's definition."""
    total_q, Hq, D = q.shape
    total_k = k.shape[0]
    out = torch.empty((total_q, Hq, D), dtype=q.dtype, device=q.device)
    if total_k == 0:  # no keys at all (zero-length key sequences): every row sees none
        return out.zero_(), torch.full((Hq, total_q), float("-inf"), dtype=torch.float32,
                                        device=q.device)
    lse = torch.empty((Hq, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0:
        return out, lse

    def setup():
        fold = _fold(problem)
        return varlen_grid(cdiv(problem.seqlen_q, cfg.block_m), Hq, problem.batch), dict(
            HEAD_DIM=D, BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            REVERSE_M=problem.band[1] is not None, FOLD=fold,
            **launch_options(cfg), **_flags(problem, False, q.dtype, use_tma)), (
            *(s for t in (q, k, v, out) for s in packed_view(t).stride()),
            *_scalars(problem, fold, total_q, total_k))

    # The totals fix lse's row stride and out's strides, which the problem (holding only
    # the longest lengths) does not.
    _FWD.launch(("varlen", problem, cfg, use_tma, total_q, total_k,
                 layout_key(q, k, v, cu_seqlens_q, cu_seqlens_k), dropout_key(dropout)),
                (q, k, v, out, lse, cu_seqlens_k, cu_seqlens_q,
                 cu_seqlens_q if dropout is None else dropout.state), setup)
    return out, lse


__all__ = ["launch_forward", "launch_forward_varlen", "packed_view", "varlen_grid"]
