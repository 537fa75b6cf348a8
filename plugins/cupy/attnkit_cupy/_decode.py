"""Split-KV ("flash-decoding") forward for decoding-shaped problems (kernels/decode.cu).

With Sq <= 16 queries and a long cache, `forward`'s one block per (query tile, head, batch)
leaves most SMs idle and reads K/V once per query head. Here every (batch, kv head, block of
16 of its group's query rows) is cut into ``splits`` key chunks read by separate blocks, each
writing a partial (out, lse) into one fp32 workspace; a merge kernel combines them exactly.
The split count is `attnkit.backend_utils.choose_splits`, shared with the triton backend.

Paged KV caches (`attnkit.backend.Backend.forward_paged`) run the same kernels compiled with
``PAGED``: K and V are page pools and each tile's rows are looked up in the block table as they
load (no gather copy), through a window of the table held in shared memory; the kernel checks
each entry it reads and each fill level (`Capabilities.paged_checks`). Every paged call takes
this path, decoding or several queries (row blocks of 16 cover any query count).

Host work per call is kept small: everything that depends only on the `AttentionProblem`
(variant, grid, constant kernel arguments) is computed once and cached.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

from attnkit.backend_utils import (
    MIN_KEYS_PER_SPLIT,
    WAVE_EFFICIENCY,
    LaunchCache,
    SplitWorkspace,
    choose_splits,
    current_stream,
    sm_count,
    visible_span,
)
from attnkit.spec import AttentionProblem, describe_tensor

from . import _compile, _launch

#: Queries per call this path is for (a decoding step, a few speculative tokens).
MAX_DECODE_QUERIES = 16
#: Upper bound on a forced split count (tests, tuning); the rule picks at most 128.
MAX_FORCED_SPLITS = 4096
#: Largest dynamic shared memory a block may opt in to on sm_90 (227 KiB).
MAX_SMEM = 227 * 1024


def row_blocks(problem: AttentionProblem) -> int:
    """Split blocks per (batch, kv head): its ``group * Sq`` query rows, 16 per block."""
    return -(-(problem.group_size * problem.seqlen_q) // _compile.DECODE_ROWS)


@functools.lru_cache(maxsize=4096)
def num_splits(problem: AttentionProblem, sms: int) -> int:
    """`choose_splits` over this kernel's (batch x kv head x row block) programs on a device
    with ``sms`` SMs."""
    programs = problem.batch * problem.heads_kv * row_blocks(problem)
    # No split once the programs keep 90% of the SMs busy: one split reads faster than two
    # there, at every cache length (docs/tuning.md).
    return choose_splits(programs, visible_span(problem), sms, fill=WAVE_EFFICIENCY)


def use_split_kv(problem: AttentionProblem) -> bool:
    """True for decoding-shaped problems: ``Sq <= 16`` queries over at least
    ``MIN_KEYS_PER_SPLIT`` visible keys. This kernel then runs even with a single split: it
    reads each K/V head once for its whole query group, where the forward kernel reads it
    once per query head with mostly empty query tiles. Packed (varlen) and dropout calls run
    the forward kernel, which has those features. Paged calls always take it (the kernel
    reads pages through the block table)."""
    if problem.page_size and not problem.is_empty:
        return True
    if (problem.seqlen_q > MAX_DECODE_QUERIES or problem.is_empty or problem.varlen
            or problem.dropout_p > 0):
        return False
    return visible_span(problem) >= MIN_KEYS_PER_SPLIT


def grid_reasons(problem: AttentionProblem) -> list[str]:
    """Why the split kernel's grid cannot take ``problem`` (empty if it can): batch x kv
    heads and the row blocks are its y and z dimensions."""
    reasons = []
    if problem.batch * problem.heads_kv > _launch.MAX_GRID_YZ:
        reasons.append(f"batch x kv heads = {problem.batch * problem.heads_kv} must be <= "
                       f"{_launch.MAX_GRID_YZ} (CUDA grid limit of the split-KV kernel)")
    if row_blocks(problem) > _launch.MAX_GRID_YZ:
        reasons.append(f"query heads per kv head x Sq = "
                       f"{problem.group_size * problem.seqlen_q} rows must be <= "
                       f"{_launch.MAX_GRID_YZ * _compile.DECODE_ROWS} (CUDA grid limit of the "
                       "split-KV kernel)")
    return reasons


# -- argument checks ------------------------------------------------------------------------

def check_tiles(dtype: str, head_dim: int, tiles) -> None:
    """Raise ``ValueError`` unless ``tiles = (warps, keys per tile, stages)`` can be compiled
    and launched for a fp16/bf16 problem of this head dim (fp32 has fixed tiles)."""
    if dtype == "fp32":
        raise ValueError("tiles apply to the fp16/bf16 decode kernel; fp32 has fixed tiles "
                         f"{_compile.DECODE_F32} (warps, keys, stages)")
    if not (isinstance(tiles, tuple) and len(tiles) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) for x in tiles)):
        raise ValueError(f"tiles must be a tuple (warps, keys per tile, stages) of ints, got "
                         f"{tiles!r}")
    nw, bn, st = tiles
    if nw not in (1, 2, 4, 8) or bn < 16 or bn > 256 or bn % (16 * nw) or not 2 <= st <= 8:
        raise ValueError(f"tiles {tiles}: need warps in (1, 2, 4, 8), keys per tile in "
                         "[16, 256] and a multiple of 16 * warps, stages in [2, 8]")
    var = _compile.Variant("decode", dtype, _compile.head_dim_bucket(head_dim), False, False,
                           tiles)
    smem = var.geometry("split")[2]
    if smem > MAX_SMEM:
        raise ValueError(f"tiles {tiles} at head dim {head_dim} need {smem} bytes of shared "
                         f"memory per block, more than {MAX_SMEM}")


def check_args(problem: AttentionProblem, q, k, v, seqlens_k, splits=None, tiles=None, *,
               require_cuda: bool = True, block_table=None) -> None:
    """What `decode_forward` takes beyond the backend contract (the core validated the
    problem): tensors that are the problem's, on a CUDA device (unless not ``require_cuda``),
    a problem the kernel and its grid take, and valid ``splits`` / ``tiles`` overrides. With
    ``block_table`` (``problem.page_size`` > 0) k and v are page pools."""
    p = problem
    kv_shape = (p.batch, p.heads_kv, p.seqlen_k, p.head_dim)
    if p.page_size:
        check_paged(p, k, seqlens_k, block_table)
        kv_shape = (k.shape[0], p.heads_kv, p.page_size, p.head_dim)
    elif block_table is not None:
        raise ValueError("block_table is given only for a paged problem (page_size > 0)")
    if (tuple(q.shape) != (p.batch, p.heads_q, p.seqlen_q, p.head_dim)
            or tuple(k.shape) != kv_shape or tuple(v.shape) != kv_shape
            or not q.dtype == k.dtype == v.dtype == p.dtype
            or not q.device == k.device == v.device
            or (seqlens_k is not None) != p.has_seqlens_k):
        raise ValueError(
            f"tensors do not match the problem {p.describe()}: "
            + ", ".join(describe_tensor(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
            + f", seqlens_k {'given' if seqlens_k is not None else 'None'}")
    if require_cuda and q.device.type != "cuda":
        raise ValueError(f"{describe_tensor('q', q)}: the split-KV decode kernel takes CUDA "
                         "tensors")
    _launch.check_seqlens(seqlens_k)
    limits = _launch.limit_reasons(p)
    if limits:
        raise ValueError(f"the cupy kernels cannot take {p.describe()}: " + "; ".join(limits))
    if p.dtype not in _launch._DTYPE_NAMES:
        raise ValueError(f"the split-KV decode kernel takes float16, bfloat16 or float32, "
                         f"got {p.dtype}")
    if p.seqlen_q > MAX_DECODE_QUERIES and not p.page_size:
        raise ValueError(f"the split-KV decode kernel takes at most {MAX_DECODE_QUERIES} "
                         f"queries, got Sq={p.seqlen_q}")
    grid = grid_reasons(p)
    if grid:
        raise ValueError(f"the split-KV decode kernel cannot take {p.describe()}: "
                         + "; ".join(grid))
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int)
                               or not 1 <= splits <= MAX_FORCED_SPLITS):
        raise ValueError(f"splits must be an int in [1, {MAX_FORCED_SPLITS}], got {splits!r}")
    if tiles is not None:
        check_tiles(_launch._DTYPE_NAMES[q.dtype], p.head_dim, tiles)


def check_paged(problem: AttentionProblem, k_pages, seqlens_k, block_table) -> None:
    """A paged call's table, fill levels and pools as the kernel indexes them: an int32
    contiguous ``(B, seqlen_k / page_size)`` table on the pools' device, ``seqlens_k`` given,
    pools of ``problem.page_size`` rows per page and fewer than 2^31 pages."""
    p = problem
    if block_table is None:
        raise ValueError(f"a paged problem (page size {p.page_size}) needs its block_table")
    if seqlens_k is None:
        raise ValueError("a paged call needs seqlens_k (each sequence's keys)")
    if (block_table.dtype != torch.int32 or not block_table.is_contiguous()
            or block_table.dim() != 2 or block_table.shape[0] != p.batch
            or block_table.shape[1] * p.page_size != p.seqlen_k
            or block_table.device != k_pages.device):
        raise ValueError(
            f"{describe_tensor('block_table', block_table)} must be int32, contiguous, (B="
            f"{p.batch}, {p.seqlen_k // p.page_size}) (capacity {p.seqlen_k} / page size "
            f"{p.page_size}), on the pools' device {k_pages.device}")
    if k_pages.dim() != 4 or k_pages.shape[2] != p.page_size:
        raise ValueError(f"{describe_tensor('k_pages', k_pages)} must be (num_pages, Hkv, "
                         f"page_size={p.page_size}, D)")
    if k_pages.shape[0] >= 1 << 31:
        raise ValueError(f"{describe_tensor('k_pages', k_pages)}: the kernel indexes fewer "
                         "than 2^31 pages")


# -- launch ---------------------------------------------------------------------------------

class _Plan(NamedTuple):
    """What one problem's launches need beyond the tensors' pointers and strides."""

    variant: _compile.Variant
    splits: int
    split_grid: tuple
    split_block: tuple
    split_smem: int
    merge_grid: tuple
    merge_block: tuple
    n_part: int  # partial rows: B * Hq * Sq * splits
    split_tail: tuple  # constant kernel arguments after the strides (numpy scalars)
    merge_tail: tuple
    fp32: bool


@functools.lru_cache(maxsize=1024)
def _plan(problem: AttentionProblem, splits: int, tiles) -> _Plan:
    B, Hq, Hkv, Sq, Sk, D = (problem.batch, problem.heads_q, problem.heads_kv,
                             problem.seqlen_q, problem.seqlen_k, problem.head_dim)
    dtype = _launch._DTYPE_NAMES[problem.dtype]
    fp32 = dtype == "fp32"
    left, right, *_ = bounds = _launch.band(problem)
    variant = _compile.variant_for("decode", dtype, D, bounds.bounded,
                                   problem.softcap is not None)
    tiles = variant.tiles if tiles is None else tiles
    variant = _compile.Variant("decode", dtype, variant.dp, variant.band, variant.softcap,
                               tiles, _paged_feature(problem, tiles, bounds.has_left))
    nrows = B * Hq * Sq
    _, split_threads, split_smem = variant.geometry("split")
    merge_rows, merge_threads, _ = variant.geometry("merge")
    return _Plan(
        variant=variant, splits=splits,
        split_grid=(splits, B * Hkv, row_blocks(problem)), split_block=(split_threads,),
        split_smem=split_smem,
        merge_grid=(-(-nrows // merge_rows),), merge_block=(merge_threads,),
        n_part=nrows * splits,
        split_tail=(*_launch._i32(Hq, Hkv, problem.group_size, Sq, Sk, D, left, right, splits),
                    *_launch.scores(problem, fp32)),
        merge_tail=(*_launch._i32(Hq, Sq, D, splits), np.int64(nrows)),
        fp32=fp32,
    )


def _paged_feature(problem: AttentionProblem, tiles, has_left: bool) -> int:
    """The decode variant's paged bits: none for contiguous caches; one lookup per tile where
    the page size is a multiple of the tile's keys and no left window moves a split's first
    key off a tile boundary (splits start at multiples of the tile otherwise); else per row."""
    P = problem.page_size
    if not P:
        return 0
    if problem.dtype == torch.float32 or has_left:
        return _compile.FEAT_PAGED
    if P % tiles[1] == 0:
        return _compile.FEAT_PAGED | _compile.FEAT_WHOLE_PAGES
    return _compile.FEAT_PAGED


class _Prepared(NamedTuple):
    """One call signature's launches, checked once: constant arguments are filled into the
    parameter blocks here; each call refills only the pointers."""

    plan: _Plan
    device_index: int
    out_strides: tuple  # q's layout: (B, Sq, Hq, D) memory for a transposed q
    workspace: SplitWorkspace
    split_fn: object
    merge_fn: object
    split_params: _launch.ParamBlock
    merge_params: _launch.ParamBlock


#: Split-block argument slots of q, k, v, partial out, partial lse, seqlens_k and the block
#: table (after 12 strides, 9 ints, 3 floats and vec: `split_arguments`); merge-block slots
#: of partial out, partial lse, out, lse (the order of the kernels' parameters).
_SPLIT_POINTERS = (0, 1, 2, 3, 4, 5, 31)
_MERGE_POINTERS = (0, 1, 2, 3)
_prepared = LaunchCache(256)


def _signature(problem, q, k, v, seqlens_k, splits, tiles, block_table=None):
    """Everything `check_args` and `_prepare` read from the tensors (not their addresses,
    except whether they are 16-byte aligned), or None when it cannot be hashed."""
    try:
        key = (problem, splits, tiles,
               None if block_table is None else (
                   type(block_table), block_table.shape, block_table.dtype,
                   block_table.device, block_table.is_contiguous()),
               type(q), q.shape, q.stride(), q.dtype, q.device,
               type(k), k.shape, k.stride(), k.dtype, k.device,
               type(v), v.shape, v.stride(), v.dtype, v.device,
               (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15,
               None if seqlens_k is None else (
                   type(seqlens_k), seqlens_k.shape, seqlens_k.dtype, seqlens_k.device,
                   seqlens_k.is_contiguous()))
        hash(key)
    except (AttributeError, TypeError):  # not tensors: check_args says what is wrong
        return None
    return key


def split_arguments(problem, plan, q, k, v, vec: bool, block_table=None) -> tuple:
    """The split kernel's arguments, pointers (the `_SPLIT_POINTERS` slots) as 0
    placeholders. Last come the paged ones: the table, its row length, the page size, its
    log2 if a power of two (else -1) and the pool's page count (zeros for contiguous caches:
    the kernel ignores them). Pointers and strides are Python ints: the kernel's pointer and
    i64 parameters are 64-bit."""
    P = problem.page_size
    shift = P.bit_length() - 1 if P & (P - 1) == 0 else -1
    paged = (_launch._i32(block_table.shape[1], P, shift, k.shape[0]) if P
             else _launch._i32(0, 0, 0, 0))
    return (0, 0, 0, 0, 0, 0, *q.stride(), *k.stride(), *v.stride(), *plan.split_tail,
            np.int32(vec), 0, *paged)


def _prepare(problem, q, k, v, seqlens_k, splits, tiles, block_table=None) -> _Prepared:
    check_args(problem, q, k, v, seqlens_k, splits, tiles, block_table=block_table)
    if splits is None:
        splits = num_splits(problem, sm_count(q.device))
    plan = _plan(problem, splits, tiles)
    out_strides = _launch._like_layout(q).stride()  # out in q's layout (once per signature)
    vec = (not plan.fp32) and _launch._vec_ok(problem.head_dim, q, k, v)
    # Pointers (placeholders 0 here) and strides as Python ints: the kernels' pointer and i64
    # parameters are 64-bit.
    split_args = split_arguments(problem, plan, q, k, v, vec, block_table)
    merge_args = (0, 0, 0, 0, *out_strides[:3], *plan.merge_tail)
    device_index = _launch._device_index(q)
    return _Prepared(
        plan=plan, device_index=device_index,
        out_strides=out_strides,
        # One allocation per step for the partials and the returned lse.
        workspace=SplitWorkspace.of(problem, splits),
        split_fn=_launch.kernel_function(plan.variant, "split", device_index),
        merge_fn=_launch.kernel_function(plan.variant, "merge", device_index),
        split_params=_launch.ParamBlock(split_args),
        merge_params=_launch.ParamBlock(merge_args),
    )


def decode_forward(problem: AttentionProblem, q, k, v, seqlens_k, splits: int | None = None,
                   tiles: tuple | None = None, block_table=None):
    """`Backend.forward`'s contract with the key range split across blocks.

    Returns ``(out, lse)`` as `_launch.forward` does: out in q's dtype and layout, lse float32
    ``(B, Hq, Sq)`` natural log; rows that see no key get out 0 and lse -inf. ``splits``
    (default: the split rule for this device) and ``tiles`` (fp16/bf16 only: warps, keys per
    tile, stages; default `_compile.DECODE_TILES`) override the launch, for tests and tuning;
    the result depends on them only through rounding, and is bitwise the same run to run for
    one configuration. A paged problem (``problem.page_size`` > 0) passes k and v as page
    pools ``(num_pages, Hkv, page_size, D)`` and ``block_table``, as
    `attnkit.backend.Backend.forward_paged` receives them.

    A decoding loop calls this with one signature (problem, shapes, strides, dtypes, devices,
    alignment) every step: the checks and launch setup run once per signature, and a step
    costs two allocations and two launches.
    """
    key = _signature(problem, q, k, v, seqlens_k, splits, tiles, block_table)
    prep = _prepared.get(key) if key is not None else None
    if prep is None:
        prep = _prepare(problem, q, k, v, seqlens_k, splits, tiles, block_table)
        if key is not None:
            _prepared.put(key, prep)
    plan = prep.plan
    dev = q.device
    work, lse = prep.workspace.allocate(dev)
    out = torch.empty_strided(q.shape, prep.out_strides, dtype=q.dtype, device=dev)
    part_o, part_l = prep.workspace.part_pointers(work)
    index = prep.device_index
    with _launch.on_device(index):
        stream = current_stream(index)
        prep.split_params.launch_slots(
            prep.split_fn, plan.split_grid, plan.split_block, _SPLIT_POINTERS,
            (q.data_ptr(), k.data_ptr(), v.data_ptr(), part_o, part_l,
             0 if seqlens_k is None else seqlens_k.data_ptr(),
             0 if block_table is None else block_table.data_ptr()), plan.split_smem, stream)
        prep.merge_params.launch_slots(
            prep.merge_fn, plan.merge_grid, plan.merge_block, _MERGE_POINTERS,
            (part_o, part_l, out.data_ptr(), lse.data_ptr()), 0, stream)
    return out, lse
