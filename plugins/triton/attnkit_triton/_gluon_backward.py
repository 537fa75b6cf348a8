"""Gluon kernel of the Hopper backward (sm_90): dK, dV and dQ in one warp-specialized kernel
(see ``_hopper.py`` for when it runs and the launcher).

A program owns 128 keys of one (batch, kv head), split between two consumer warpgroups of 64
keys (240 registers each after ``setmaxnreg``), which hold dK and dV in registers over every
query block and query head of the GQA group that sees their keys. A 1-warp producer streams
64-row Q and dO tiles, with their rows of lse2 and delta, through ``NUM_BUF`` shared-memory
slots with TMA. Per query block a consumer computes, in its keys' orientation (keys x
queries, so P^T and dS^T are already the left operands of the dV and dK products and stay in
registers):

    S^T = K Q^T - lse2 / c,  P^T = exp2(S^T c),  dP^T = V dO^T - delta,
    dS^T = P^T dP^T scale,  dV += P^T dO,  dK += dS^T Q        (c = scale log2(e))

lse2 and delta enter as the MMAs' initial accumulators, read from shared memory just before
the MMAs are issued: the consumer waits on no global load and the rows hold no registers of
their own (at head dim 128 the kernel no longer spills). Measured 7-17% faster than loading
them from global memory beside the MMAs (docs/tuning.md).

dQ += dS K spans both warpgroups' keys: each writes its dS^T to shared memory, the two meet
on an mbarrier, and each computes one half of the block's dQ columns (head dim 128; at head
dim 64 the warpgroups take turns), stages it in shared memory and adds it into a float32
buffer with a TMA reduce-add (``cp.reduce.async.bulk.tensor``), which the warpgroup does not
wait for until it next needs that buffer. With ``DQ_LAG`` a warpgroup computes a block's dQ
share one block later, so the two may drift a block apart instead of meeting every block
(where that pays: ``_hopper._DQ_LAG``).

Five products instead of the seven of the deterministic ``tl`` backward, at the price of
run-to-run rounding differences in dQ: this kernel is never used under
``torch.use_deterministic_algorithms(True)``.
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

from ._gluon_forward import _tma_load, init_ring
from ._triton_internals import gluon_tma_reduce_add

# None where this Triton names no such op and the gate refuses the builder call that builds
# it: `_hopper` then takes the tl backward.
_tma_add = gluon_tma_reduce_add(tma)

BLOCK_M = gl.constexpr(64)  # query rows per tile


@gluon.jit
def _bwd_producer(descs, bufs, bars, coords, NUM_BUF: gl.constexpr):
    """One warp: K and V once, then every (query head, query block)'s Q tile with its delta
    and lse2 rows, and its dO tile."""
    q_desc, k_desc, v_desc, do_desc, stats_desc = descs
    k_smem, v_smem, q_smem, do_smem, stats_smem = bufs
    kv_bar, q_ready, do_ready, q_empty, do_empty = bars
    b, hk, H, GROUP, m_lo, n_m, kv_row, kv_col, q_rb, q_rh, q_ch, do_rb, do_rh, do_ch = coords
    BH = gl.num_programs(1) * GROUP  # B * H: stats rows are delta (b H + h), then lse2
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
    _tma_load(k_desc, [kv_row, kv_col], kv_bar, k_smem)
    _tma_load(v_desc, [kv_row, kv_col], kv_bar, v_smem)
    for it in range(GROUP * n_m):
        h = hk * GROUP + it // n_m
        m0 = m_lo + (it % n_m) * BLOCK_M
        s = it % NUM_BUF
        ph = (it // NUM_BUF) & 1
        mbarrier.wait(q_empty.index(s), ph ^ 1)
        mbarrier.expect(q_ready.index(s),
                        q_desc.block_type.nbytes + 2 * stats_desc.block_type.nbytes)
        _tma_load(q_desc, [b * q_rb + h * q_rh + m0, h * q_ch], q_ready.index(s),
                  q_smem.index(s))
        _tma_load(stats_desc, [b * H + h, m0], q_ready.index(s), stats_smem.index(2 * s))
        _tma_load(stats_desc, [BH + b * H + h, m0], q_ready.index(s),
                  stats_smem.index(2 * s + 1))
        mbarrier.wait(do_empty.index(s), ph ^ 1)
        mbarrier.expect(do_ready.index(s), do_desc.block_type.nbytes)
        _tma_load(do_desc, [b * do_rb + h * do_rh + m0, h * do_ch], do_ready.index(s),
                  do_smem.index(s))


@gluon.jit
def _dq_part(ds_smem, base, k_smem, dq_smem, dq_desc, dq_row, dq_col, c: gl.constexpr,
             dq_layout: gl.constexpr):
    """Adds columns 64c .. 64c + 63 of one query block's dQ (dS K over the program's 128
    keys: both warpgroups' dS^T, buffers ``base`` and ``base + 1``) into the float32 dQ
    with a TMA reduce from shared memory."""
    zero = gl.zeros([BLOCK_M, 64], gl.float32, dq_layout)
    k0 = k_smem.slice(0, 64, dim=0).slice(64 * c, 64, dim=1)
    k1 = k_smem.slice(64, 64, dim=0).slice(64 * c, 64, dim=1)
    dq = warpgroup_mma(ds_smem.index(base).permute((1, 0)), k0, zero, use_acc=False,
                       is_async=True)
    dq = warpgroup_mma(ds_smem.index(base + 1).permute((1, 0)), k1, dq, is_async=True)
    dq = warpgroup_mma_wait(0, deps=(dq, ))
    tma.store_wait(0)  # the previous reduce has read this warpgroup's buffer
    dq_smem.store(dq)
    fence_async_shared()
    _tma_add(dq_desc, [dq_row, dq_col + 64 * c], dq_smem)


@gluon.jit
def _dq_block(j, ds_smem, ds_bar, k_smem, dq_smem, dq_desc, coords, ROLE: gl.constexpr,
              dq_layout: gl.constexpr):
    """Query block ``j``'s share of dQ for this warpgroup, once both dS^T halves are in."""
    b, hk, GROUP, n_m, m_lo, q_rb, q_rh, q_ch = coords
    HEAD_DIM: gl.constexpr = k_smem.shape[1]
    DS_BUF: gl.constexpr = ds_bar.shape[0]
    slot = j % DS_BUF
    mbarrier.wait(ds_bar.index(slot), (j // DS_BUF) & 1)
    h = hk * GROUP + j // n_m
    dq_row = b * q_rb + h * q_rh + m_lo + (j % n_m) * BLOCK_M
    if HEAD_DIM == 128:  # each warpgroup computes one 64-column half
        _dq_part(ds_smem, 2 * slot, k_smem, dq_smem, dq_desc, dq_row, h * q_ch, ROLE,
                 dq_layout)
    else:  # head dim 64: the warpgroups take turns
        if j % 2 == ROLE:
            _dq_part(ds_smem, 2 * slot, k_smem, dq_smem, dq_desc, dq_row, h * q_ch, 0,
                     dq_layout)


@gluon.jit
def _bwd_consumer(descs, bufs, bars, scal, CAUSAL: gl.constexpr, NUM_BUF: gl.constexpr,
                  DQ_LAG: gl.constexpr, ROLE: gl.constexpr):
    """One consumer warpgroup (ROLE 0 or 1): keys 64 * ROLE .. 64 * ROLE + 63 of the program."""
    q_desc, k_desc, v_desc, do_desc, dq_desc = descs
    k_smem, v_smem, q_smem, do_smem, ds_smem, dq_smem, stats_smem = bufs
    kv_bar, q_ready, do_ready, q_empty, do_empty, ds_bar = bars
    (b, hk, GROUP, m_lo, n_m, kv_row, kv_col, q_rb, q_rh, q_ch, dk_ptr, dv_ptr, ld_kv, qk_scale,
     scale) = scal
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    dtype: gl.constexpr = k_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout,
                                                  k_width=2)
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, 64, 16])
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    DS_BUF: gl.constexpr = ds_bar.shape[0]  # dS^T slots per warpgroup (see _bwd_kernel)
    dq_coords = (b, hk, GROUP, n_m, m_lo, q_rb, q_rh, q_ch)

    keys = m_lo + ROLE * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    k_w = k_smem.slice(ROLE * 64, 64, dim=0)
    v_w = v_smem.slice(ROLE * 64, 64, dim=0)
    dk = gl.zeros([64, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([64, HEAD_DIM], gl.float32, acc_layout)
    zero = gl.zeros([64, BLOCK_M], gl.float32, s_layout)
    inv_qk_scale = 1.0 / qk_scale  # nonzero: _hopper refuses scale 0
    mbarrier.wait(kv_bar, 0)
    for it in range(GROUP * n_m):
        m0 = m_lo + (it % n_m) * BLOCK_M
        s = it % NUM_BUF
        ph = (it // NUM_BUF) & 1
        q_s = q_smem.index(s)
        do_s = do_smem.index(s)
        mbarrier.wait(q_ready.index(s), ph)
        lse2 = stats_smem.index(2 * s + 1).load(s_layout)  # (1, BLOCK_M) rows
        st = warpgroup_mma(k_w, q_s.permute((1, 0)), zero - lse2 * inv_qk_scale,
                           is_async=True)
        delta = stats_smem.index(2 * s).load(s_layout)
        mbarrier.wait(do_ready.index(s), ph)
        dpt = warpgroup_mma(v_w, do_s.permute((1, 0)), zero - delta, is_async=True)
        st = warpgroup_mma_wait(1, deps=(st, ))
        pt = gl.exp2(st * qk_scale)
        if CAUSAL:  # causal: m_lo is the program's first key; mask the two diagonal blocks
            if m0 < m_lo + 128:
                cols = gl.arange(0, BLOCK_M, layout=col_layout)
                pt = gl.where((m0 + cols)[None, :] >= keys[:, None], pt, 0.0)
        dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), op_layout), do_s, dv, is_async=True)
        dpt = warpgroup_mma_wait(1, deps=(dpt, ))
        ds_op = (pt * dpt * scale).to(dtype)
        dk = warpgroup_mma(gl.convert_layout(ds_op, op_layout), q_s, dk, is_async=True)
        # Both warpgroups' dS^T in shared memory. A buffer is written again DS_BUF blocks
        # later, when the other warpgroup has finished reading it: it has passed a later
        # block's barrier, two blocks later without DQ_LAG, four with it.
        slot = it % DS_BUF
        ds_smem.index(2 * slot + ROLE).store(ds_op)
        fence_async_shared()
        mbarrier.arrive(ds_bar.index(slot), count=1)
        dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
        mbarrier.arrive(q_empty.index(s), count=1)
        mbarrier.arrive(do_empty.index(s), count=1)
        if DQ_LAG:  # the previous block's dQ: the other warpgroup may be a block behind
            if it > 0:
                _dq_block(it - 1, ds_smem, ds_bar, k_smem, dq_smem.index(ROLE), dq_desc,
                          dq_coords, ROLE, dq_layout)
        else:
            _dq_block(it, ds_smem, ds_bar, k_smem, dq_smem.index(ROLE), dq_desc, dq_coords,
                      ROLE, dq_layout)
    if DQ_LAG:
        if GROUP * n_m > 0:
            _dq_block(GROUP * n_m - 1, ds_smem, ds_bar, k_smem, dq_smem.index(ROLE), dq_desc,
                      dq_coords, ROLE, dq_layout)
    # dK was scaled through dS; both written once, from registers.
    rows = kv_row + ROLE * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))
    cols = kv_col + gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    offs = rows.to(gl.int64)[:, None] * ld_kv + cols[None, :]
    gl.store(dk_ptr + offs, dk.to(dtype))
    gl.store(dv_ptr + offs, dv.to(dtype))
    tma.store_wait(0)


@gluon.jit
def _bwd_kernel(q_desc, k_desc, v_desc, do_desc, dq_desc, stats_desc, dk_ptr, dv_ptr,
                S, H, GROUP, qk_scale, scale, q_rb, q_rh, q_ch, do_rb, do_rh, do_ch,
                kv_rb, kv_rh, kv_ch, ld_kv,
                CAUSAL: gl.constexpr, NUM_BUF: gl.constexpr, DQ_LAG: gl.constexpr):
    # 2-D views as in the forward (``_fwd_kernel``); dq_desc views a float32 buffer laid out
    # like q, dk/dv are laid out like k (ld_kv columns). stats_desc views the (2 B H, S)
    # float32 rows of delta, then of lse (log2), in (1, 64) boxes.
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    dtype: gl.constexpr = k_desc.dtype
    n0 = gl.program_id(0) * 128  # causal: the programs with the most query blocks first
    bh = gl.program_id(1)
    HKV = H // GROUP
    b = bh // HKV
    hk = bh % HKV
    if CAUSAL:
        m_lo = n0
    else:
        m_lo = n0 * 0
    n_m = (S - m_lo) // BLOCK_M

    k_smem = gl.allocate_shared_memory(dtype, [128, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [128, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_M, HEAD_DIM], do_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, BLOCK_M], dtype)
    DS_BUF: gl.constexpr = 4 if DQ_LAG else 2  # the reuse argument is in _bwd_consumer
    ds_smem = gl.allocate_shared_memory(dtype, [2 * DS_BUF, 64, BLOCK_M], ds_layout)  # [slot, role]
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    do_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    ds_bar = gl.allocate_shared_memory(gl.int64, [DS_BUF, 1], mbarrier.MBarrierLayout())
    dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, 64], dq_desc.layout)  # role
    stats_smem = gl.allocate_shared_memory(gl.float32, [2 * NUM_BUF, 1, BLOCK_M],
                                           stats_desc.layout)  # [slot: delta, lse2]
    init_ring(kv_bar, q_ready, do_ready, q_empty, do_empty, NUM_BUF)
    for i in gl.static_range(DS_BUF):
        mbarrier.init(ds_bar.index(i), count=2)

    kv_row = b * kv_rb + hk * kv_rh + n0
    descs = (q_desc, k_desc, v_desc, do_desc, dq_desc)
    bufs = (k_smem, v_smem, q_smem, do_smem, ds_smem, dq_smem, stats_smem)
    bars = (kv_bar, q_ready, do_ready, q_empty, do_empty, ds_bar)
    scal = (b, hk, GROUP, m_lo, n_m, kv_row, hk * kv_ch, q_rb, q_rh, q_ch, dk_ptr, dv_ptr, ld_kv,
            qk_scale, scale)
    gl.warp_specialize([
        (_bwd_consumer, (descs, bufs, bars, scal, CAUSAL, NUM_BUF, DQ_LAG, 0)),
        (_bwd_consumer, (descs, bufs, bars, scal, CAUSAL, NUM_BUF, DQ_LAG, 1)),
        (_bwd_producer, ((q_desc, k_desc, v_desc, do_desc, stats_desc),
                         (k_smem, v_smem, q_smem, do_smem, stats_smem), bars[:5],
                         (b, hk, H, GROUP, m_lo, n_m, kv_row, hk * kv_ch, q_rb, q_rh, q_ch,
                          do_rb, do_rh, do_ch), NUM_BUF)),
    ], [4, 1], [240, 24])
