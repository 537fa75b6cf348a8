"""Split-KV ("flash-decoding") forward: few queries over a long key range.

A decoding step has one (or a few) query rows per head and thousands of keys. One program per
(batch, head) would leave most SMs idle while it walks the whole cache, so here the key range
of every (batch, kv head) is cut into ``num_splits`` chunks read by separate programs; each
writes a partial ``(out, lse)`` in fp32, and the last of them to finish merges the partials
with the online-softmax rescaling (`attnkit.merge_attention` is the same math in PyTorch).
One launch per step: a second merge kernel cost a launch of host time and a few microseconds
of GPU time at 1k keys (docs/tuning.md).

GQA: one program handles all ``group * Sq`` query rows of its kv head, so each K/V tile is
read from memory once per kv head, not once per query head.

Paged caches (``PAGED``): K and V are page pools ``(num_pages, Hkv, page_size, D)`` and the
kernel looks every key's page up in the block table as it loads the tile (no gather copy):
key ``j`` of batch ``b`` is row ``j % page_size`` of page ``block_table[b, j // page_size]``,
addressed in 64-bit. The rest (splits, merge, masks) is the contiguous kernel's.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from attnkit.backend_utils import (
    LaunchCache,
    SplitWorkspace,
    band_args,
    choose_splits,
    current_stream,
    score_args,
    visible_span,
)
from attnkit.backend_utils import sm_count as _cuda_sm_count
from attnkit.spec import AttentionProblem

from ._band import tanh, valid_keys
from ._configs import _arch, interpreting
from ._launcher import DirectLaunch, FastKernel, cdiv, fast_launches, layout_key

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float32: tl.float32}
MAX_HEAD_DIM = 256
#: Queries per call this path is meant for (a decoding step, a few speculative tokens).
MAX_DECODE_QUERIES = 16
#: SM count assumed off-GPU (TRITON_INTERPRET=1 on CPU tensors), kept small so that tiny test
#: shapes still split.
_INTERPRETER_SMS = 4


# -- kernels -------------------------------------------------------------------------------

@triton.jit
def _split_kv_kernel(
    Q, K, V, SEQLENS, PART_O, PART_L, O, LSE, COUNTERS, BLOCK_TABLE,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    Hq, Hkv, Sq, Sk, num_splits,
    qk_scale, cap_log2, left, right, n_pages,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, IEEE_DOT: tl.constexpr,
    PAGED: tl.constexpr = False, PAGE_SIZE: tl.constexpr = 1,
    TILE_IN_PAGE: tl.constexpr = False, CHECK_PAGES: tl.constexpr = False,
):
    """One (key split, batch x kv head, row block): partial out and lse (log2 units) of the
    rows ``r = i * GROUP + g`` (query ``i`` of query head ``kv_head * GROUP + g``). The last
    split of a (batch x kv head, row block) to finish merges all of them into O and LSE: it
    knows it is last from a counter in COUNTERS, which it sets back to 0 for the next launch.

    IEEE_DOT: fp32 products without tf32 (fp32 inputs need fp32 accuracy); also used for bf16
    under TRITON_INTERPRET=1, whose bf16 tl.dot returns garbage (triton 3.9).

    PAGED: K and V are page pools, ``stride_kb``/``stride_vb`` their page strides, and
    BLOCK_TABLE the contiguous int32 ``(B, Sk // PAGE_SIZE)`` table (Sk: a row's capacity).
    TILE_IN_PAGE: every key tile lies in one page (tiles start at multiples of BLOCK_N, which
    divides PAGE_SIZE: no left window), so one table entry is read per tile.
    CHECK_PAGES: a fill level outside ``[0, Sk]`` or a table entry read outside
    ``[0, n_pages)`` stops the kernel (`_stop_if`) before it addresses anything
    (`Capabilities.paged_checks`; without it the core checked them, and fill levels are
    clamped)."""
    pid = tl.program_id(0)
    split = pid % num_splits
    bh = pid // num_splits
    b = bh // Hkv
    kvh = bh % Hkv
    r0 = tl.program_id(1) * BLOCK_M
    n_rows = GROUP * Sq

    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    qi = rows // GROUP
    h = kvh * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    if CHECK_PAGES:
        sk_b = tl.load(SEQLENS + b)
        _stop_if((sk_b < 0) | (sk_b > Sk) | ((sk_b > 0) & (n_pages == 0)))
    elif HAS_SEQLENS:
        sk_b = valid_keys(SEQLENS, b, Sk, True)
    else:
        sk_b = Sk + r0 * 0
    off = sk_b - Sq  # bottom-right alignment: query i's diagonal is key i + off

    # Keys any row of this block can see, then this program's share of them.
    i_first = r0 // GROUP
    i_last = (tl.minimum(r0 + BLOCK_M, n_rows) - 1) // GROUP
    lo = r0 * 0
    hi = sk_b
    if HAS_LEFT:
        lo = tl.maximum(i_first + off - left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(hi, i_last + off + right + 1)
    n_keys = tl.maximum(hi - lo, 0)
    chunk = tl.cdiv(tl.cdiv(n_keys, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)

    b64 = b.to(tl.int64)
    q_ptrs = (Q + b64 * stride_qb + h[:, None].to(tl.int64) * stride_qh
              + qi[:, None] * stride_qs + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if PAGED:
        k_base = K + kvh.to(tl.int64) * stride_kh
        v_base = V + kvh.to(tl.int64) * stride_vh
        table_row = BLOCK_TABLE + b64 * (Sk // PAGE_SIZE)
    else:
        k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in tl.range(start, end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        if BLOCK_D == HEAD_DIM:
            kv_mask = col_ok[:, None]
        else:
            kv_mask = col_ok[:, None] & d_ok[None, :]
        if TILE_IN_PAGE:
            page = tl.load(table_row + j0 // PAGE_SIZE)
            if CHECK_PAGES:
                page = _checked_page(page, n_pages)
            page = page.to(tl.int64)
            slot = cols % PAGE_SIZE
            k_rows = page * stride_kb + slot * stride_ks
            v_rows = page * stride_vb + slot * stride_vs
        elif PAGED:
            # Columns past `end` read entry 0 of the row (always needed when any key is).
            page = tl.load(table_row + tl.where(col_ok, cols, 0) // PAGE_SIZE)
            if CHECK_PAGES:
                page = _checked_page(page, n_pages)
            page = page.to(tl.int64)
            slot = cols % PAGE_SIZE
            k_rows = page * stride_kb + slot * stride_ks
            v_rows = page * stride_vb + slot * stride_vs
        else:
            k_rows = cols * stride_ks
            v_rows = cols * stride_vs
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        if IEEE_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k).to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if HAS_SOFTCAP:
            s = cap_log2 * tanh(s * qk_scale)
        else:
            s = s * qk_scale
        visible = col_ok[None, :]
        if HAS_LEFT or HAS_RIGHT:
            rel = cols[None, :] - qi[:, None] - off
            if HAS_LEFT:
                visible = visible & (rel >= -left)
            if HAS_RIGHT:
                visible = visible & (rel <= right)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        if IEEE_DOT:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # A split that saw no key: l = 0 -> out 0, lse -inf. A NaN row keeps l = NaN: NaN both.
    empty = l_i == 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    # Partials are (B, Hq, Sq, num_splits[, D]), so the merge reads one row's splits in a run.
    part = ((b64 * Hq + h.to(tl.int64)) * Sq + qi) * num_splits + split
    part_mask = row_ok[:, None] & d_ok[None, :]
    tl.store(PART_L + part, lse2, mask=row_ok)
    tl.store(PART_O + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=part_mask)

    # Every thread's partial is stored before one thread's release-ordered increment.
    tl.debug_barrier()
    counter = COUNTERS + bh * tl.num_programs(1) + tl.program_id(1)
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
        _merge_rows(PART_O, PART_L, O, LSE, part - split, row_ok, part_mask, b64, h, qi,
                    offs_d, stride_ob, stride_oh, stride_os, stride_od, Hq, Sq, num_splits,
                    HEAD_DIM)


@triton.jit
def _stop_if(bad):
    """A device-side trap in every thread holding a true element of ``bad`` (the launch fails
    and the CUDA context with it, as after a failed ``torch._assert_async``): Triton compiles
    ``tl.device_assert`` only in debug mode, which also checks every integer operation."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $1, 0; @p trap; mov.b32 $0, 0; }",
                              "=r,r", [bad.to(tl.int32)], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def _checked_page(page, n_pages):
    """``page`` after `_stop_if` on an entry outside the pool, clamped into it: a load the
    pipeliner issues before this iteration's trap still addresses a page of the pool (the
    kernel checked ``n_pages > 0`` where it has keys)."""
    _stop_if((page < 0) | (page >= n_pages))
    return tl.minimum(tl.maximum(page, 0), n_pages - 1)


@triton.jit
def _merge_rows(PART_O, PART_L, O, LSE, part0, row_ok, part_mask, b64, h, qi, offs_d,
                stride_ob, stride_oh, stride_os, stride_od, Hq, Sq, num_splits,
                HEAD_DIM: tl.constexpr):
    """out = sum_s w_s out_s / sum_s w_s with w_s = 2^(lse_s - max lse), splits in order
    (bitwise the same every run). Loads bypass L1 (.cg): the partials come from other SMs."""
    m = tl.full(part0.shape, float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(PART_L + part0 + s, mask=row_ok, other=float("-inf"),
                                  cache_modifier=".cg"))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros(part0.shape, tl.float32)
    acc = tl.zeros(part_mask.shape, tl.float32)
    for s in range(num_splits):
        w = tl.math.exp2(tl.load(PART_L + part0 + s, mask=row_ok, other=float("-inf"),
                                 cache_modifier=".cg") - m_safe)  # 0: a split saw no key
        o_s = tl.load(PART_O + (part0 + s)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=part_mask, other=0.0, cache_modifier=".cg")
        acc += w[:, None] * o_s
        total += w
    # No split saw a key: total = 0 -> out 0, lse -inf. A NaN partial makes total NaN.
    empty = total == 0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("-inf"),
                   (m_safe + tl.math.log2(tl.where(empty, 1.0, total))) * 0.6931471805599453)
    o_ptrs = (O + b64 * stride_ob + h[:, None].to(tl.int64) * stride_oh
              + qi[:, None] * stride_os + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=part_mask)
    tl.store(LSE + (b64 * Hq + h) * Sq + qi, lse, mask=row_ok)


_SPLIT = FastKernel(_split_kv_kernel)


# -- launch configuration ------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _sm_count(device: torch.device) -> int:
    return _cuda_sm_count(device) if device.type == "cuda" else _INTERPRETER_SMS


def _tiles(problem: AttentionProblem) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D): rows of one kv head's query group, and D."""
    block_d = max(16, _next_pow2(problem.head_dim))
    rows = problem.group_size * problem.seqlen_q
    return min(max(16, _next_pow2(rows)), 64 if block_d <= 128 else 32), block_d


def stream_config(problem: AttentionProblem, arch: int | None) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages): keys per step, warps, and the pipeline depth of the
    key loads, on a GPU of compute capability ``arch`` (None: the interpreter).

    fp32 at head dims 128 and 256 on Hopper: two stages (two programs fit an SM), and eight
    warps at 256 (four spill). Off Hopper three fp32 stages would not fit the shared memory
    (99 KB on sm_86/sm_89), so fp32 reads half the keys per step in two stages with four warps
    (tools/compile_tables.py checks every choice against each GPU's limit). Measurements:
    docs/tuning.md. Paged caches get more stages for the same K/V prefetch depth (below).
    """
    block_d = _tiles(problem)[1]
    block_n = 64 if block_d <= 128 else 32
    if problem.dtype != torch.float32 or arch is None or block_d < 128:
        block_n, warps, stages = block_n, 4, 3
    elif arch != 90:
        block_n, warps, stages = block_n // 2, 4, 2
    else:
        block_n, warps, stages = block_n, 4 if block_d == 128 else 8, 2
    if problem.page_size:
        # The table load feeds the K/V loads' addresses: Triton's pipeliner splits the
        # stages between the two levels of loads (ceil((stages - 2) / 2) each), so 2s - 1
        # stages keep as many K/V tiles in flight as s stages do for a contiguous cache.
        stages = 2 * stages - 1
    return block_n, warps, stages


#: From this many visible keys on, programs that keep `WAVE_EFFICIENCY` of the SMs busy read
#: the cache unsplit (as fast as two splits there; at 1k keys two stay faster). Not fp32,
#: where one program per SM reads at half the speed of two (docs/tuning.md).
LONG_CACHE_KEYS = 4096


def _programs(problem: AttentionProblem) -> int:
    """Programs of the kernel without splitting: (batch x kv head x row block)."""
    block_m, _ = _tiles(problem)
    return problem.batch * problem.heads_kv * cdiv(problem.group_size * problem.seqlen_q,
                                                   block_m)


def num_splits(problem: AttentionProblem, sm_count: int | None = None) -> int:
    """How many key splits `decode_forward` uses: `attnkit.backend_utils.choose_splits` over
    this kernel's programs, with no split for a long cache whose programs nearly fill the SMs."""
    if sm_count is None:
        sm_count = _sm_count(problem.device)
    long_keys = None if problem.dtype == torch.float32 else LONG_CACHE_KEYS
    return choose_splits(_programs(problem), visible_span(problem), sm_count,
                         long_keys=long_keys)


def _kernel_supports(problem: AttentionProblem) -> list[str]:
    reasons = []
    if problem.dtype not in _TL_DTYPES:
        reasons.append(f"dtype {problem.dtype} (split-KV kernel takes fp16, bf16, fp32)")
    if problem.head_dim > MAX_HEAD_DIM:
        reasons.append(f"head dim {problem.head_dim} > {MAX_HEAD_DIM}")
    return reasons


def use_split_kv(problem: AttentionProblem) -> bool:
    """True for decoding-shaped problems: few queries (``Sq <= MAX_DECODE_QUERIES``), a key
    range long enough to split, and too few (batch x kv head) programs to fill the SMs. The
    kernel then runs even where `num_splits` is 1: it reads each K/V head once for its whole
    query group, where the forward kernel reads it once per query head."""
    if _kernel_supports(problem) or problem.is_empty:
        return False
    if problem.seqlen_q > MAX_DECODE_QUERIES:
        return False
    return choose_splits(_programs(problem), visible_span(problem), _sm_count(problem.device)) > 1


class _Prepared(NamedTuple):
    """One call signature's launch site and output layout (see `_launch`)."""

    split: DirectLaunch
    out_strides: tuple  # q's layout, as torch.empty_like(q) gives
    n_groups: int  # split counters the launch uses
    tail: tuple  # every argument after the tensors: strides, sizes, scales
    workspace: SplitWorkspace


_prepared = LaunchCache(256)

#: Split counters of the fused merge per (device, stream). Between launches every counter is
#: 0 (the last split of each group sets its own back), so one buffer serves all launches on a
#: stream, which runs them one after another.
_counters: dict = {}


def _counters_for(dev: torch.device, stream: int, n: int) -> torch.Tensor:
    buf = _counters.get((dev, stream))
    if buf is None or buf.numel() < n:
        buf = _counters[(dev, stream)] = torch.zeros(max(n, 4096), dtype=torch.int32,
                                                     device=dev)
    return buf


def _signature(problem, q, k, v, seqlens_k, config, block_table=None):
    """What fixes the kernel's specialization besides the problem: strides, dtypes and
    16-byte alignment of every tensor argument (workspace parts are aligned by construction),
    and a pool's page count (an argument kept with the launch site)."""
    return problem, config, layout_key(q, k, v, seqlens_k, block_table), _pool_pages(problem, k)


def _pool_pages(problem, k) -> int:
    """The kernel's ``n_pages``: the pools' page count (1 for a contiguous cache)."""
    return k.shape[0] if problem.page_size else 1


def _launch(problem, key, prep, q, k, v, seqlens_k, splits, block_n, num_warps, num_stages,
            block_table=None):
    """One launch. The first call of a signature (``prep`` None) goes through `FastKernel`
    (Triton's path if the kernel is new) and keeps the resolved launch site; later calls hand
    the compiled kernel its arguments directly: a decoding step repeats one signature, and
    this is most of its host time."""
    dev = q.device
    workspace = SplitWorkspace.of(problem, splits) if prep is None else prep.workspace
    work, lse = workspace.allocate(dev)
    fast = prep is not None and prep.split.compiled is not None and fast_launches()
    # Workspace parts as addresses on the direct path: no tensor views to build.
    part_o, part_l = workspace.part_pointers(work) if fast else workspace.part_views(work)
    # q's layout: a transposed (B, S, H, D) q gets the same out.
    out = (torch.empty_like(q) if prep is None else
           torch.empty_strided(q.shape, prep.out_strides, dtype=q.dtype, device=dev))
    stream = current_stream(dev.index) if dev.type == "cuda" else 0
    if prep is None:
        n_groups = problem.batch * problem.heads_kv * cdiv(
            problem.group_size * problem.seqlen_q, _tiles(problem)[0])
        tail = (*q.stride(), *k.stride(), *v.stride(), *out.stride(),
                *_split_scalars(problem, splits), _pool_pages(problem, k))
    else:
        n_groups, tail = prep.n_groups, prep.tail
    args = (q, k, v, seqlens_k if seqlens_k is not None else q, part_o, part_l, out, lse,
            _counters_for(dev, stream, n_groups), block_table if block_table is not None else q,
            *tail)
    if fast:
        prep.split.run(stream, *args)
    elif prep is not None:
        prep.split(*args)
    else:
        _prepare(problem, key, args, n_groups, tail, workspace, seqlens_k is not None, splits,
                 block_n, num_warps, num_stages)
    return out, lse


def _prepare(problem, key, args, n_groups, tail, workspace, has_seqlens, splits, block_n,
             num_warps, num_stages):
    """The first call of a signature: launch through `FastKernel` and keep the site."""
    B, Hkv, Sq, D = problem.batch, problem.heads_kv, problem.seqlen_q, problem.head_dim
    G = problem.group_size
    block_m, block_d = _tiles(problem)
    default_n, default_warps, default_stages = stream_config(
        problem, None if interpreting() else _arch(problem.device))
    band = band_args(problem)
    split = _SPLIT.direct(
        (splits * B * Hkv, cdiv(G * Sq, block_m)), args,
        dict(GROUP=G, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n or default_n,
             BLOCK_D=block_d, HAS_SEQLENS=has_seqlens, HAS_LEFT=band.has_left,
             HAS_RIGHT=band.has_right, HAS_SOFTCAP=problem.softcap is not None,
             IEEE_DOT=args[0].dtype == torch.float32 or (
                 args[0].dtype == torch.bfloat16 and interpreting()),
             PAGED=problem.page_size > 0, PAGE_SIZE=max(problem.page_size, 1),
             TILE_IN_PAGE=(problem.page_size > 0 and not band.has_left
                           and problem.page_size % (block_n or default_n) == 0),
             CHECK_PAGES=problem.page_size > 0 and not interpreting(),
             num_warps=num_warps or default_warps, num_stages=num_stages or default_stages))
    _prepared.put(key, _Prepared(split, args[6].stride(), n_groups, tail, workspace))


@functools.lru_cache(maxsize=1024)
def _split_scalars(problem: AttentionProblem, splits: int) -> tuple:
    """The split kernel's scalar arguments after the strides: ..., qk_scale, cap_log2 (the
    scores' multipliers before and after the softcap's tanh), left, right."""
    band, score = band_args(problem), score_args(problem)
    qk_scale, cap_log2 = ((score.cap_in, score.cap_out) if problem.softcap is not None
                          else (score.qk_scale, score.cap_out))
    return (problem.heads_q, problem.heads_kv, problem.seqlen_q, problem.seqlen_k, splits,
            qk_scale, cap_log2, band.left, band.right)


# -- public --------------------------------------------------------------------------------

def decode_forward(
    problem: AttentionProblem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seqlens_k: torch.Tensor | None,
    *,
    splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`Backend.forward`'s contract with the key range split across programs; with
    ``block_table``, `Backend.forward_paged`'s (``problem.page_size`` > 0, k and v page pools).

    Any strides, GQA, the band of ``problem.band`` (causal, window), ``seqlens_k`` (None or
    int32 contiguous ``(B,)`` on q's device), softcap; rows that see no key get out 0 and lse
    -inf. Returns ``(out, lse)``: out in q's dtype and layout, lse float32 ``(B, Hq, Sq)``.

    ``splits`` (default: `num_splits`), ``block_n``, ``num_warps`` and ``num_stages``
    (default: `stream_config`) override the launch configuration, for tests and tuning; the
    result does not depend on them beyond rounding. It is bitwise the same run to run for one
    configuration.
    """
    refused = _refused(problem)
    if refused:
        raise ValueError(refused)
    if splits is None:
        splits = num_splits(problem)
    key = _signature(problem, q, k, v, seqlens_k, (splits, block_n, num_warps, num_stages),
                     block_table)
    prep = _prepared.get(key)
    if prep is None:  # a signature seen before passed these checks
        _check(seqlens_k, splits, block_n, num_warps, num_stages)
        _check_paged(problem, k, seqlens_k, block_table)
    return _launch(problem, key, prep, q, k, v, seqlens_k, splits, block_n, num_warps,
                   num_stages, block_table)


@functools.lru_cache(maxsize=1024)
def _refused(problem: AttentionProblem) -> str:
    """Why the kernel cannot take ``problem`` ("" if it can); cached: it runs every step."""
    reasons = _kernel_supports(problem)
    if reasons:
        return (f"split-KV decode kernel cannot compute {problem.describe()}: "
                + "; ".join(reasons))
    if problem.is_empty:
        return "decode_forward got an empty problem; the core answers those"
    if problem.device.type != "cuda" and not interpreting():
        return (f"split-KV decode kernel runs on CUDA tensors (or with TRITON_INTERPRET=1); "
                f"got tensors on {problem.device}")
    return ""


def _check_paged(problem, k, seqlens_k, block_table) -> None:
    """A paged call's table and pools as the kernel indexes them."""
    if (block_table is None) != (problem.page_size == 0):
        raise ValueError("block_table is given exactly when problem.page_size > 0")
    if block_table is None:
        return
    if seqlens_k is None:
        raise ValueError("a paged call needs seqlens_k (each sequence's keys)")
    if (block_table.dtype != torch.int32 or not block_table.is_contiguous()
            or block_table.dim() != 2
            or block_table.shape[1] * problem.page_size != problem.seqlen_k):
        raise ValueError(f"block_table must be int32, contiguous, (B, seqlen_k / page_size); "
                         f"got {block_table.dtype} {tuple(block_table.shape)} for "
                         f"{problem.describe()}")
    if k.shape[2] != problem.page_size:
        raise ValueError(f"page pool of shape {tuple(k.shape)} does not have page size "
                         f"{problem.page_size}")


def _check(seqlens_k, splits, block_n, num_warps, num_stages) -> None:
    if seqlens_k is not None and (seqlens_k.dtype != torch.int32
                                  or not seqlens_k.is_contiguous()):
        raise ValueError("seqlens_k must be int32 and contiguous (the core converts it)")
    if not 1 <= splits <= 4096:
        raise ValueError(f"splits must be in [1, 4096], got {splits}")
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if num_warps is not None and (num_warps < 1 or num_warps & (num_warps - 1)):
        raise ValueError(f"num_warps must be a power of two, got {num_warps}")
    if num_stages is not None and num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
