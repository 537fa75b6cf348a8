"""Split-KV ("flash-decoding") forward for decoding-shaped problems (kernels/decode.cu).

With Sq <= 16 queries and a long cache, `forward`'s one block per (query tile, head, batch)
leaves most SMs idle and reads K/V once per query head. Here every (batch, kv head, block of
16 of its group's query rows) is cut into ``splits`` key chunks read by separate blocks, each
writing a partial (out, lse) into one fp32 workspace; a merge kernel combines them exactly.
The split count is `attnkit.backend_utils.choose_splits`, shared with the triton backend.

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
    the forward kernel, which has those features."""
    if (problem.seqlen_q > MAX_DECODE_QUERIES or problem.is_empty or problem.varlen
            or problem.dropout_p > 0):
        return False
    return visible_span(problem) >= MIN_KEYS_PER_SPLIT


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
               require_cuda: bool = True) -> None:
    """What `decode_forward` takes beyond the backend contract (the core validated the
    problem): tensors that are the problem's, on a CUDA device (unless not ``require_cuda``),
    a problem the kernel and its grid take, and valid ``splits`` / ``tiles`` overrides."""
    p = problem
    kv_shape = (p.batch, p.heads_kv, p.seqlen_k, p.head_dim)
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
    if p.seqlen_q > MAX_DECODE_QUERIES:
        raise ValueError(f"the split-KV decode kernel takes at most {MAX_DECODE_QUERIES} "
                         f"queries, got Sq={p.seqlen_q}")
    if p.batch * p.heads_kv > _launch.MAX_GRID_YZ:
        raise ValueError(f"batch x kv heads = {p.batch * p.heads_kv} exceeds the CUDA grid "
                         f"limit {_launch.MAX_GRID_YZ} of the split-KV decode kernel")
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int)
                               or not 1 <= splits <= MAX_FORCED_SPLITS):
        raise ValueError(f"splits must be an int in [1, {MAX_FORCED_SPLITS}], got {splits!r}")
    if tiles is not None:
        check_tiles(_launch._DTYPE_NAMES[q.dtype], p.head_dim, tiles)


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
    if tiles is not None:
        variant = _compile.Variant("decode", dtype, variant.dp, variant.band, variant.softcap,
                                   tiles)
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


#: Split-block argument slots of q, k, v, partial out, partial lse, seqlens_k; merge-block
#: slots of partial out, partial lse, out, lse (the order of the kernels' parameters).
_SPLIT_POINTERS = (0, 1, 2, 3, 4, 5)
_MERGE_POINTERS = (0, 1, 2, 3)
_prepared = LaunchCache(256)


def _signature(problem, q, k, v, seqlens_k, splits, tiles):
    """Everything `check_args` and `_prepare` read from the tensors (not their addresses,
    except whether they are 16-byte aligned), or None when it cannot be hashed."""
    try:
        key = (problem, splits, tiles,
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


def _prepare(problem, q, k, v, seqlens_k, splits, tiles) -> _Prepared:
    check_args(problem, q, k, v, seqlens_k, splits, tiles)
    if splits is None:
        splits = num_splits(problem, sm_count(q.device))
    plan = _plan(problem, splits, tiles)
    out_strides = _launch._like_layout(q).stride()  # out in q's layout (once per signature)
    vec = (not plan.fp32) and _launch._vec_ok(problem.head_dim, q, k, v)
    # Pointers (placeholders 0 here) and strides as Python ints: the kernels' pointer and i64
    # parameters are 64-bit.
    split_args = (0, 0, 0, 0, 0, 0, *q.stride(), *k.stride(), *v.stride(), *plan.split_tail,
                  np.int32(vec))
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
                   tiles: tuple | None = None):
    """`Backend.forward`'s contract with the key range split across blocks.

    Returns ``(out, lse)`` as `_launch.forward` does: out in q's dtype and layout, lse float32
    ``(B, Hq, Sq)`` natural log; rows that see no key get out 0 and lse -inf. ``splits``
    (default: the split rule for this device) and ``tiles`` (fp16/bf16 only: warps, keys per
    tile, stages; default `_compile.DECODE_TILES`) override the launch, for tests and tuning;
    the result depends on them only through rounding, and is bitwise the same run to run for
    one configuration.

    A decoding loop calls this with one signature (problem, shapes, strides, dtypes, devices,
    alignment) every step: the checks and launch setup run once per signature, and a step
    costs two allocations and two launches.
    """
    key = _signature(problem, q, k, v, seqlens_k, splits, tiles)
    prep = _prepared.get(key) if key is not None else None
    if prep is None:
        prep = _prepare(problem, q, k, v, seqlens_k, splits, tiles)
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
             0 if seqlens_k is None else seqlens_k.data_ptr()), plan.split_smem, stream)
        prep.merge_params.launch_slots(
            prep.merge_fn, plan.merge_grid, plan.merge_block, _MERGE_POINTERS,
            (part_o, part_l, out.data_ptr(), lse.data_ptr()), 0, stream)
    return out, lse
