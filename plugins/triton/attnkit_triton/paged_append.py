"""The append of a paged decoding step in one launch: the checks `attnkit.paged` makes before
writing (fill levels, every table entry the sequences' positions need, no slot appended to
by two sequences) and the write of the new keys and values into their pages.

The core's version is a score of small operations (a range check of one vector, the append
slots sorted for repeats, two indexed stores), each a launch of host time and a few
microseconds of GPU time per layer and step; here every program makes the whole check, then
writes its share of the slots, so no program writes when any check fails (`decode._stop_if`
traps first), and the fill levels after the append come out of the same launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnkit.paged import check_table

from ._configs import interpreting
from ._launcher import FastKernel, Sites, layout_key
from .decode import _stop_if

#: Most appended positions (batch x S_new) the kernel takes: each program compares every
#: pair of slots, so longer appends (chunked prefill) are left to the core.
MAX_SLOTS = 256
#: Most table entries (batch x max_pages) each program reads for the check.
MAX_ENTRIES = 1 << 18
_PROGRAMS = 64  # programs sharing the writes (each checks everything first)


@triton.jit
def _slot(TABLE, LENS, s, S_new, M, PAGE_SIZE: tl.constexpr):
    """Page and offset of appended position ``s`` (sequence ``s // S_new``, its
    ``s % S_new``-th new position), int64, and its table entry."""
    b = s // S_new
    pos = tl.load(LENS + b).to(tl.int64) + s % S_new
    col = tl.minimum(tl.maximum(pos // PAGE_SIZE, 0), M - 1)  # in the row while unchecked
    entry = tl.load(TABLE + b.to(tl.int64) * M + col)
    return entry, pos % PAGE_SIZE


@triton.jit
def _append_kernel(
    K_PAGES, V_PAGES, TABLE, LENS, K_NEW, V_NEW, SEQLENS_OUT,
    stride_kp, stride_kh, stride_ks, stride_kd,
    stride_vp, stride_vh, stride_vs, stride_vd,
    stride_nb, stride_nh, stride_ns, stride_nd,
    stride_mb, stride_mh, stride_ms, stride_md,
    B, M, n_pages, S_new, Hkv, D,
    PAGE_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SLOTS: tl.constexpr,
    CHECK: tl.constexpr,
):
    """Check, then write the slots ``pid, pid + num_programs, ...`` of the ``B * S_new``
    appended positions; program 0 writes ``SEQLENS_OUT = LENS + S_new`` (int32). TABLE is
    the contiguous int32 ``(B, M)`` block table, LENS int32 or int64. CHECK: 0 no check (the
    host checked), 1 a violation traps, 2 (the check's tests, which run in the interpreter,
    where nothing traps) the number of violations goes to ``SEQLENS_OUT[0]`` instead and
    nothing is written."""
    pid = tl.program_id(0)
    n_slots = B * S_new
    n_write = n_slots
    cap = M * PAGE_SIZE
    if CHECK != 0:  # fill levels and entries 1024 at a time, slot pairs 32 x all at a time
        bad = tl.zeros([], tl.int32)
        for b0 in range(0, B, 1024):  # fill levels in [0, cap - S_new]
            bs = b0 + tl.arange(0, 1024)
            lens = tl.load(LENS + bs, mask=bs < B, other=0).to(tl.int64)
            bad += tl.sum(((bs < B) & ((lens < 0) | (lens > cap - S_new))).to(tl.int32))
        for e0 in range(0, B * M, 1024):  # entries of every needed page in [0, n_pages)
            es = e0 + tl.arange(0, 1024)
            ok = es < B * M
            lens = tl.load(LENS + es // M, mask=ok, other=0).to(tl.int64)
            need = ok & ((es % M) * PAGE_SIZE < lens + S_new)
            entry = tl.load(TABLE + es, mask=need, other=0)
            bad += tl.sum((need & ((entry < 0) | (entry >= n_pages))).to(tl.int32))
        # No slot twice: every slot against every later one.
        js = tl.arange(0, BLOCK_SLOTS)
        j_ok = js < n_slots
        e_j, o_j = _slot(TABLE, LENS, tl.where(j_ok, js, 0), S_new, M, PAGE_SIZE)
        slot_j = e_j.to(tl.int64) * PAGE_SIZE + o_j
        for i0 in range(0, n_slots, 32):
            i_s = i0 + tl.arange(0, 32)
            i_ok = i_s < n_slots
            e_i, o_i = _slot(TABLE, LENS, tl.where(i_ok, i_s, 0), S_new, M, PAGE_SIZE)
            slot_i = e_i.to(tl.int64) * PAGE_SIZE + o_i
            same = ((slot_i[:, None] == slot_j[None, :]) & (i_s[:, None] < js[None, :])
                    & i_ok[:, None] & j_ok[None, :])
            bad += tl.sum(tl.sum(same.to(tl.int32), 1), 0)
        if CHECK == 1:
            _stop_if(bad > 0)
        else:
            n_write = tl.where(bad > 0, 0, n_slots)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for s in range(pid, n_write, tl.num_programs(0)):
        b = (s // S_new).to(tl.int64)
        i = s % S_new
        entry, off = _slot(TABLE, LENS, s, S_new, M, PAGE_SIZE)
        page = entry.to(tl.int64)
        for h in range(0, Hkv):
            k = tl.load(K_NEW + b * stride_nb + h * stride_nh + i * stride_ns
                        + offs_d * stride_nd, mask=d_ok)
            tl.store(K_PAGES + page * stride_kp + h * stride_kh + off * stride_ks
                     + offs_d * stride_kd, k, mask=d_ok)
            v = tl.load(V_NEW + b * stride_mb + h * stride_mh + i * stride_ms
                        + offs_d * stride_md, mask=d_ok)
            tl.store(V_PAGES + page * stride_vp + h * stride_vh + off * stride_vs
                     + offs_d * stride_vd, v, mask=d_ok)
    if pid == 0:
        for b0 in range(0, B, 1024):
            bs = b0 + tl.arange(0, 1024)
            lens = tl.load(LENS + bs, mask=bs < B, other=0)
            tl.store(SEQLENS_OUT + bs, (lens + S_new).to(tl.int32), mask=bs < B)
        if CHECK == 2:
            tl.store(SEQLENS_OUT, bad)


_SITES = Sites(FastKernel(_append_kernel))


def takes(block_table: torch.Tensor, s_new: int) -> bool:
    """Whether `append_checked` takes an append of ``s_new`` positions per sequence."""
    B, M = block_table.shape
    return 0 < B * s_new <= MAX_SLOTS and 0 < B * M <= MAX_ENTRIES


def append_checked(k_pages, v_pages, block_table, cache_seqlens, k_new, v_new):
    """`Backend.append_paged`'s contract (see `attnkit.backend`), in one launch on CUDA; the
    interpreter checks on the host first (its kernel cannot trap). Returns the int32 fill
    levels after the append. ``block_table`` contiguous int32 ``(B, M)``; ``takes`` true."""
    if interpreting():
        check_table(k_pages, block_table, cache_seqlens, k_new.shape[2], "host")
    return launch(k_pages, v_pages, block_table, cache_seqlens, k_new, v_new,
                  check=0 if interpreting() else 1)


def launch(k_pages, v_pages, block_table, cache_seqlens, k_new, v_new, *, check: int):
    """The kernel with ``CHECK=check``; the ``(B,)`` int32 tensor it writes."""
    B, M = block_table.shape
    N, Hkv, P, D = k_pages.shape
    s_new = k_new.shape[2]
    out = torch.empty(B, dtype=torch.int32, device=k_pages.device)
    args = (k_pages, v_pages, block_table, cache_seqlens, k_new, v_new, out)
    key = (layout_key(*args[:6]), B, M, N, Hkv, P, D, s_new, check)

    def setup():
        fixed = (*k_pages.stride(), *v_pages.stride(), *k_new.stride(), *v_new.stride(),
                 B, M, N, s_new, Hkv, D)
        grid = (min(B * s_new, _PROGRAMS),)
        return grid, dict(PAGE_SIZE=P, BLOCK_D=triton.next_power_of_2(D),
                          BLOCK_SLOTS=max(triton.next_power_of_2(B * s_new), 32),
                          CHECK=check), fixed

    _SITES.launch(key, args, setup)
    return out


__all__ = ["MAX_ENTRIES", "MAX_SLOTS", "append_checked", "takes"]
