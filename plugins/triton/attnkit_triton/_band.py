"""Device helpers shared by the forward and backward kernels: the visible band as block
ranges, the band mask, tanh for the softcap, the matrix product at the right precision and
masked tile loads/stores.

The band (attnkit.spec): query ``i`` of a batch with ``Sk_b`` valid keys sees key ``j`` iff
``j < Sk_b`` and ``-left <= j - (i + Sk_b - Sq) <= right``. Block ranges are split in three:
a leading and a trailing run of boundary blocks that need the mask, and the fully visible
middle that pays for no mask and no bounds checks.
"""

import triton
import triton.language as tl


@triton.jit
def _cdiv_up(x, BLOCK: tl.constexpr):
    """Round a non-negative x up to a multiple of BLOCK."""
    return (x + BLOCK - 1) // BLOCK * BLOCK


@triton.jit
def valid_keys(SEQLENS, b, Sk, HAS_SEQLENS: tl.constexpr):
    """Keys of batch ``b``: ``seqlens_k[b]`` clamped to ``[0, Sk]`` (the host does not read
    seqlens_k on CUDA, so an out-of-range value must stay in bounds), else ``Sk``."""
    if HAS_SEQLENS:
        return tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), Sk)
    else:
        return Sk


@triton.jit
def key_range(m0, Sq, Sk_b, left, right,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks seen by queries ``[m0, m0 + BLOCK_M)``: ``(lo, full_lo, full_hi, hi)``,
    multiples of BLOCK_N; ``[lo, full_lo)`` and ``[full_hi, hi)`` need the mask."""
    off = Sk_b - Sq
    m_last = tl.minimum(m0 + BLOCK_M, Sq) - 1
    lo = m0 * 0
    hi = Sk_b + m0 * 0
    full_lo = lo
    full_hi = Sk_b // BLOCK_N * BLOCK_N
    if HAS_LEFT:
        lo = tl.maximum(m0 + off - left, 0)
        full_lo = _cdiv_up(tl.maximum(m_last + off - left, 0), BLOCK_N)
    if HAS_RIGHT:
        hi = tl.minimum(hi, m_last + off + right + 1)
        full_hi = tl.maximum(tl.minimum(Sk_b, m0 + off + right + 1), 0) // BLOCK_N * BLOCK_N
    lo_a = lo // BLOCK_N * BLOCK_N
    hi_c = tl.where(hi > lo, _cdiv_up(tl.maximum(hi, 0), BLOCK_N), lo_a)
    full_lo = tl.minimum(tl.maximum(full_lo, lo_a), hi_c)
    full_hi = tl.maximum(tl.minimum(full_hi, hi_c), full_lo)
    return lo_a, full_lo, full_hi, hi_c


@triton.jit
def query_range(n0, Sq, Sk_b, left, right,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks that see keys ``[n0, n0 + BLOCK_N)``: ``(lo, full_lo, full_hi, hi)``,
    multiples of BLOCK_M. The middle also keeps whole query blocks inside ``Sq`` so its
    loads need no row checks."""
    off = Sk_b - Sq
    n_last = tl.minimum(n0 + BLOCK_N, Sk_b) - 1
    lo = n0 * 0
    hi = Sq + n0 * 0
    full_lo = lo
    full_hi = Sq // BLOCK_M * BLOCK_M + n0 * 0
    if HAS_RIGHT:
        lo = tl.maximum(n0 - off - right, 0)
        full_lo = _cdiv_up(tl.maximum(n0 + BLOCK_N - 1 - off - right, 0), BLOCK_M)
    if HAS_LEFT:
        hi = tl.minimum(hi, n_last - off + left + 1)
        full_hi = tl.maximum(tl.minimum(Sq, n0 - off + left + 1), 0) // BLOCK_M * BLOCK_M
    # Keys past Sk_b exist in memory but not in the problem: nothing to do for them.
    hi = tl.where(n0 < Sk_b, hi, lo)
    lo_a = lo // BLOCK_M * BLOCK_M
    hi_c = tl.where(hi > lo, _cdiv_up(tl.maximum(hi, 0), BLOCK_M), lo_a)
    # A key block running past Sk_b has no fully visible query block.
    full_hi = tl.where(n0 + BLOCK_N <= Sk_b, full_hi, 0)
    full_lo = tl.minimum(tl.maximum(full_lo, lo_a), hi_c)
    full_hi = tl.maximum(tl.minimum(full_hi, hi_c), full_lo)
    return lo_a, full_lo, full_hi, hi_c


@triton.jit
def seen_keys(Sq, Sk_b, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """``[lo, hi)``: the keys of a batch that some query sees. K/V rows outside it may hold
    anything (NaN, inf), so boundary blocks select them to 0 instead of multiplying by 0."""
    lo = 0
    hi = Sk_b
    if HAS_LEFT:
        lo = tl.maximum(Sk_b - Sq - left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(Sk_b, Sk_b + right)
    return lo, hi


@triton.jit
def band_mask(rows, cols, off, Sk_b, left, right,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Visibility of keys ``cols`` to queries ``rows`` (broadcast shapes)."""
    mask = cols < Sk_b
    rel = cols - rows - off
    if HAS_LEFT:
        mask = mask & (rel >= -left)
    if HAS_RIGHT:
        mask = mask & (rel <= right)
    return mask


@triton.jit
def tanh(x):
    # sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|) <= 1: no overflow for any x.
    e = tl.math.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


#: `mma` precisions (the kernels' PREC constexpr).
PREC_NATIVE, PREC_IEEE, PREC_UPCAST = 0, 1, 2


def dot_precision(dtype, interpreting: bool) -> int:
    """fp32 inputs multiply in true fp32 (no silent tf32); under the interpreter bfloat16
    operands are widened first because its dot misreads bfloat16 values."""
    import torch

    if dtype == torch.float32:
        return PREC_IEEE
    if interpreting and dtype == torch.bfloat16:
        return PREC_UPCAST
    return PREC_NATIVE


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """``a @ b (+ acc)`` in fp32 accumulation at the precision PREC asks for."""
    if PREC == 2:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if PREC == 0:
        out = tl.dot(a, b, acc)
    else:
        out = tl.dot(a, b, acc, input_precision="ieee")
    return out


@triton.jit
def _load_rows(ptrs, keep, offs_d, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr,
               CHECK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile: rows where ``keep`` ([rows, 1]) is false (CHECK_ROWS) and
    columns ``d >= HEAD_DIM`` (CHECK_D) are not read and hold 0."""
    if CHECK_ROWS:
        if CHECK_D:
            t = tl.load(ptrs, mask=keep & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            t = tl.load(ptrs, mask=keep, other=0.0)
    else:
        if CHECK_D:
            t = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr,
              CHECK_ROWS: tl.constexpr, CHECK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, zero outside ``rows < n_rows`` and ``d < HEAD_DIM``."""
    # The row test on the broadcast [rows, 1] shape, not broadcast after: the compiler then
    # keeps the mask out of packed predicate words.
    return _load_rows(ptrs, rows[:, None] < n_rows, offs_d, HEAD_DIM, CHECK_ROWS, CHECK_D)


@triton.jit
def _keys_kept(cols, lo, hi, HAS_LO: tl.constexpr):
    """``lo <= cols < hi`` (``cols < hi`` unless HAS_LO)."""
    if HAS_LO:
        keep = (cols >= lo) & (cols < hi)
    else:
        keep = cols < hi
    return keep


@triton.jit
def load_keys(ptrs, cols, lo, hi, offs_d, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
              HAS_LO: tl.constexpr, CHECK_D: tl.constexpr):
    """Load a [cols, BLOCK_D] K or V tile. MASKED (a boundary block): rows outside
    ``[lo, hi)`` (`seen_keys`) are not read and hold 0; HAS_LO: ``lo`` may be above 0."""
    return _load_rows(ptrs, _keys_kept(cols, lo, hi, HAS_LO)[:, None], offs_d, HEAD_DIM,
                      MASKED, CHECK_D)


@triton.jit
def zero_keys(t, cols, lo, hi, HAS_LO: tl.constexpr):
    """``t`` (a K or V tile as TMA loaded it) with rows outside ``[lo, hi)`` selected to 0."""
    return tl.where(_keys_kept(cols, lo, hi, HAS_LO)[:, None], t, tl.zeros_like(t))


@triton.jit
def store_tile(ptrs, value, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr,
               CHECK_D: tl.constexpr):
    if CHECK_D:
        tl.store(ptrs, value, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, value, mask=rows[:, None] < n_rows)
