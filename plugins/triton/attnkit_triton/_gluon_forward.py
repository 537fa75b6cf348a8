"""Gluon kernels of the Hopper forward (sm_90): warp-specialized, one producer warp, two
consumer warpgroups (see ``_hopper.py`` for when they run and the launcher).

A program owns 128 query rows of one (batch, head): two consumer warpgroups of 64 rows each
(the default partition and one 4-warp worker, 240 registers each after ``setmaxnreg``) and a
1-warp producer (24 registers) that streams K and V tiles through ``NUM_BUF`` shared-memory
slots with TMA. Each slot has "ready" barriers (TMA bytes landed) and "empty" barriers (one
arrival per consumer). Per consumer, the scores of tile j are issued before the ``P V`` of
tile j-1 (FA3's intra-warpgroup overlap): the softmax of tile j runs while the tensor cores
finish ``P V``.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401 (launcher)

# Triton 3.6 names these async_copy_*; newer releases renamed them (same arguments).
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global

LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def init_ring(one_bar, ready_a, ready_b, empty_a, empty_b, NUM_BUF: gl.constexpr):
    """The barriers of a ``NUM_BUF``-slot ring of two operands fed by one producer and drained
    by two consumers: ``one_bar`` (a single load) and each slot's "ready" barriers take one
    arrival (the producer's expect), the "empty" ones two (one per consumer)."""
    mbarrier.init(one_bar, count=1)
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(ready_a.index(i), count=1)
        mbarrier.init(ready_b.index(i), count=1)
        mbarrier.init(empty_a.index(i), count=2)
        mbarrier.init(empty_b.index(i), count=2)


@gluon.jit
def _producer(descs, bufs, bars, scal, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr,
              NUM_BUF: gl.constexpr, ROLE: gl.constexpr):
    q_desc, k_desc, v_desc, o_desc = descs
    q_smem, k_smem, v_smem = bufs
    q_bar, k_ready, v_ready, k_empty, v_empty = bars
    lse_ptr, lse_off, q_row, q_col, kv_row, kv_col, q_start, n_blocks, qk_scale = scal
    # Q for both consumers on one barrier, then K and V per slot.
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [q_row, q_col], q_bar, q_smem.index(0))
    _tma_load(q_desc, [q_row + 64, q_col], q_bar, q_smem.index(1))
    for j in range(n_blocks):
        s = j % NUM_BUF
        ph = (j // NUM_BUF) & 1
        mbarrier.wait(k_empty.index(s), ph ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        _tma_load(k_desc, [kv_row + j * BLOCK_N, kv_col], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), ph ^ 1)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        _tma_load(v_desc, [kv_row + j * BLOCK_N, kv_col], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _softmax(s, m_i, l_i, qk_scale, rows, j, BLOCK_N: gl.constexpr, MASK: gl.constexpr,
             FOLD: gl.constexpr):
    """Online-softmax update for one tile of scores; MASK: the causal diagonal. The running
    max ``m_i`` is in log2 units, or with ``FOLD`` (qk_scale > 0) in raw score units: then the
    row max needs no scaled copy of the tile and each score costs one FMA before exp2, not a
    multiply and an FMA."""
    if not FOLD:
        s = s * qk_scale
    if MASK:
        cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        s = gl.where(rows[:, None] >= cols[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    if FOLD:
        p = gl.exp2(s * qk_scale - (m_new * qk_scale)[:, None])
        alpha = gl.exp2((m_i - m_new) * qk_scale)
    else:
        p = gl.exp2(s - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
    return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _scores(q, k_smem, k_ready, j, NUM_BUF: gl.constexpr, BLOCK_N: gl.constexpr,
            s_layout: gl.constexpr):
    """Issue S_j = Q K_j^T (asynchronous) once K_j has landed."""
    mbarrier.wait(k_ready.index(j % NUM_BUF), (j // NUM_BUF) & 1)
    zero = gl.zeros([64, BLOCK_N], gl.float32, s_layout)
    return warpgroup_mma(q, k_smem.index(j % NUM_BUF).permute((1, 0)), zero, use_acc=False,
                         is_async=True)


@gluon.jit
def _pv(p_op, acc, v_smem, v_ready, j, NUM_BUF: gl.constexpr):
    """Issue O += P_j V_j (asynchronous) once V_j has landed."""
    mbarrier.wait(v_ready.index(j % NUM_BUF), (j // NUM_BUF) & 1)
    return warpgroup_mma(p_op, v_smem.index(j % NUM_BUF), acc, is_async=True)


@gluon.jit
def _step(q, acc, p_op, m_i, l_i, rows, j, qk_scale, bufs, bars, NUM_BUF: gl.constexpr,
          BLOCK_N: gl.constexpr, MASK: gl.constexpr, s_layout: gl.constexpr,
          FOLD: gl.constexpr):
    """Tile j: S_j and P_{j-1} V_{j-1} in flight together, softmax(S_j) while P V runs."""
    q_smem, k_smem, v_smem = bufs
    q_bar, k_ready, v_ready, k_empty, v_empty = bars
    s = _scores(q, k_smem, k_ready, j, NUM_BUF, BLOCK_N, s_layout)
    acc = _pv(p_op, acc, v_smem, v_ready, j - 1, NUM_BUF)
    s = warpgroup_mma_wait(1, deps=(s, ))  # groups retire in order: S_j is done
    mbarrier.arrive(k_empty.index(j % NUM_BUF), count=1)
    p, m_i, l_i, alpha = _softmax(s, m_i, l_i, qk_scale, rows, j, BLOCK_N, MASK, FOLD)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    mbarrier.arrive(v_empty.index((j - 1) % NUM_BUF), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    return acc, gl.convert_layout(p.to(q.dtype), p_op.type.layout), m_i, l_i


@gluon.jit
def _first(q, m_i, l_i, rows, qk_scale, bufs, bars, BLOCK_N: gl.constexpr, MASK: gl.constexpr,
           s_layout: gl.constexpr, p_layout: gl.constexpr, FOLD: gl.constexpr):
    """Tile 0: scores and softmax only (its P V is issued by the next step)."""
    q_smem, k_smem, v_smem = bufs
    q_bar, k_ready, v_ready, k_empty, v_empty = bars
    s = _scores(q, k_smem, k_ready, 0, 1, BLOCK_N, s_layout)
    s = warpgroup_mma_wait(0, deps=(s, ))
    mbarrier.arrive(k_empty.index(0), count=1)
    p, m_i, l_i, alpha = _softmax(s, m_i, l_i, qk_scale, rows, 0, BLOCK_N, MASK, FOLD)
    return gl.convert_layout(p.to(q.dtype), p_layout), m_i, l_i


@gluon.jit
def _consumer(descs, bufs, bars, scal, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr,
              NUM_BUF: gl.constexpr, ROLE: gl.constexpr, FOLD: gl.constexpr):
    """One consumer warpgroup (ROLE 0 or 1): 64 query rows, out and lse written at the end."""
    q_desc, k_desc, v_desc, o_desc = descs
    q_smem, k_smem, v_smem = bufs
    q_bar, k_ready, v_ready, k_empty, v_empty = bars
    lse_ptr, lse_off, q_row, q_col, kv_row, kv_col, q_start, n, qk_scale = scal
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    rows = q_start + ROLE * 64 + gl.arange(0, 64, layout=row_layout)
    q = q_smem.index(ROLE)
    m_i = gl.full([64], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([64], gl.float32, row_layout)
    acc = gl.zeros([64, HEAD_DIM], gl.float32, o_layout)
    mbarrier.wait(q_bar, 0)

    if CAUSAL:  # BLOCK_N == 128 == rows per program: the diagonal is the last tile, alone masked
        if n == 1:
            p_op, m_i, l_i = _first(q, m_i, l_i, rows, qk_scale, bufs, bars, BLOCK_N, True,
                                    s_layout, p_layout, FOLD)
        else:
            p_op, m_i, l_i = _first(q, m_i, l_i, rows, qk_scale, bufs, bars, BLOCK_N, False,
                                    s_layout, p_layout, FOLD)
        for j in range(1, n - 1):
            acc, p_op, m_i, l_i = _step(q, acc, p_op, m_i, l_i, rows, j, qk_scale, bufs, bars,
                                        NUM_BUF, BLOCK_N, False, s_layout, FOLD)
        if n > 1:
            acc, p_op, m_i, l_i = _step(q, acc, p_op, m_i, l_i, rows, n - 1, qk_scale, bufs,
                                        bars, NUM_BUF, BLOCK_N, True, s_layout, FOLD)
    else:
        p_op, m_i, l_i = _first(q, m_i, l_i, rows, qk_scale, bufs, bars, BLOCK_N, False,
                                s_layout, p_layout, FOLD)
        for j in range(1, n):
            acc, p_op, m_i, l_i = _step(q, acc, p_op, m_i, l_i, rows, j, qk_scale, bufs, bars,
                                        NUM_BUF, BLOCK_N, False, s_layout, FOLD)
    acc = _pv(p_op, acc, v_smem, v_ready, n - 1, NUM_BUF)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    mbarrier.arrive(v_empty.index((n - 1) % NUM_BUF), count=1)

    # Every row sees at least its diagonal key (Sq == Sk, no window): l > 0, or NaN for a
    # NaN row, whose out and lse then stay NaN (no test on l that would turn it into -inf).
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    # This warpgroup's Q slot is free once its last score product has completed.
    q.store(out.to(q.dtype))
    fence_async_shared()
    _tma_store(o_desc, [q_row + ROLE * 64, q_col], q)
    if FOLD:
        m_i = m_i * qk_scale
    lse = (m_i + gl.log2(l_i)) * LN2
    gl.store(lse_ptr + lse_off + ROLE * 64 + gl.arange(0, 64, layout=row_layout), lse)
    tma.store_wait(0)


@gluon.jit
def _fwd_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr, S, H, GROUP, qk_scale,
                q_rb, q_rh, q_ch, kv_rb, kv_rh, kv_ch,
                CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, NUM_BUF: gl.constexpr,
                FOLD: gl.constexpr):
    # The descriptors are 2-D views (rows, columns) of 4-D tensors: position s of head h in
    # batch b is row b * rb + h * rh + s, its head dims start at column h * ch (out like q).
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    dtype: gl.constexpr = q_desc.dtype
    n_m = S // 128
    pid_m = n_m - 1 - gl.program_id(0)  # longest causal rows first
    bh = gl.program_id(1)
    q_start = pid_m * 128
    b = bh // H
    h = bh % H
    q_row = b * q_rb + h * q_rh + q_start
    kv_row = b * kv_rb + (h // GROUP) * kv_rh
    lse_off = bh * S + q_start  # lse is (B, H, S) contiguous
    if CAUSAL:
        n_blocks = (q_start + 128) // BLOCK_N
    else:
        n_blocks = S // BLOCK_N

    q_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    init_ring(q_bar, k_ready, v_ready, k_empty, v_empty, NUM_BUF)

    descs = (q_desc, k_desc, v_desc, o_desc)
    bufs = (q_smem, k_smem, v_smem)
    bars = (q_bar, k_ready, v_ready, k_empty, v_empty)
    scal = (lse_ptr, lse_off, q_row, h * q_ch, kv_row, (h // GROUP) * kv_ch, q_start, n_blocks,
            qk_scale)
    gl.warp_specialize([
        (_consumer, (descs, bufs, bars, scal, CAUSAL, BLOCK_N, NUM_BUF, 0, FOLD)),
        (_consumer, (descs, bufs, bars, scal, CAUSAL, BLOCK_N, NUM_BUF, 1, FOLD)),
        (_producer, (descs, bufs, bars, scal, CAUSAL, BLOCK_N, NUM_BUF, 2)),
    ], [4, 1], [240, 24])
