"""Kernel launches on PyTorch's memory and stream, and the limits of the launch geometry.

The core hands backends validated tensors (`attnkit.backend.Backend`); what is checked here is
only what the kernels themselves cannot take. Kernels read and write the torch tensors in
place: they get ``data_ptr()`` and the element strides, and run on PyTorch's current stream of
the tensors' device, so the calls order correctly with the surrounding PyTorch work without
any synchronization. Packed (varlen) calls read their offsets, and dropout calls their philox
state, from device memory inside the kernels: no host sync there either.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

import numpy as np
import torch

from attnkit.backend_utils import (
    BandArgs,
    LaunchCache,
    band_args,
    current_stream,
    score_args,
)
from attnkit.spec import AttentionProblem, describe_tensor

from . import _compile

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: Grid y/z (heads, batch) limit, and the bound keeping the band arithmetic inside int32.
MAX_GRID_YZ = 65535
MAX_SEQ_SUM = 1 << 29


# -- limits ---------------------------------------------------------------------------------

def limit_reasons(problem: AttentionProblem) -> list[str]:
    """Why the launch geometry cannot take ``problem`` (empty if it can): the CUDA grid's y
    and z limits and int32 band arithmetic."""
    reasons = []
    if max(problem.heads_q, problem.batch) > MAX_GRID_YZ:
        reasons.append(f"batch {problem.batch} and query heads {problem.heads_q} must each be "
                       f"<= {MAX_GRID_YZ} (CUDA grid limit)")
    if problem.seqlen_q + problem.seqlen_k >= MAX_SEQ_SUM:
        reasons.append(f"Sq + Sk = {problem.seqlen_q + problem.seqlen_k} must be < "
                       f"{MAX_SEQ_SUM} (int32 band arithmetic)")
    return reasons


def check_packed_lengths(total_q: int, total_k: int) -> None:
    """Packed rows index the band arithmetic in int32, as Sq + Sk does for dense calls."""
    if total_q + total_k >= MAX_SEQ_SUM:
        raise ValueError(f"packed rows total_q + total_k = {total_q + total_k} must be < "
                         f"{MAX_SEQ_SUM} (int32 band arithmetic of the cupy kernels)")


def check_dropout_state(state: torch.Tensor, q: torch.Tensor) -> None:
    """The kernels read the philox seed and offset as two int64 words on q's device."""
    if (state.dtype != torch.int64 or state.numel() != 2 or not state.is_contiguous()
            or state.device != q.device):
        raise TypeError(f"{describe_tensor('dropout.state', state)} must be a contiguous "
                        f"int64 tensor of 2 elements on {q.device}")


def check_seqlens(seqlens_k) -> None:
    """The kernels read ``seqlens_k[b]`` as contiguous int32 (the backend contract)."""
    if seqlens_k is not None and (seqlens_k.dtype != torch.int32
                                  or not seqlens_k.is_contiguous()):
        raise TypeError(f"{describe_tensor('seqlens_k', seqlens_k)} must be a contiguous "
                        "int32 tensor")


# -- launch helpers -------------------------------------------------------------------------

_functions: dict[tuple, object] = {}


def kernel_function(variant, role: str, device_index: int):
    """The device-bound ``cupy.cuda.Function`` of one kernel (cached), launched through its
    `ParamBlock` with no stream or device context switch per call."""
    key = (variant, role, device_index)
    fn = _functions.get(key)
    if fn is None:
        import cupy

        with cupy.cuda.Device(device_index):
            fn = _functions[key] = _compile.get_kernel(variant, role, device_index).kernel
    return fn


#: ctypes type of each kernel argument kind (Python ints are pointers and i64 strides).
_CTYPES = {int: ctypes.c_int64, np.int64: ctypes.c_int64, np.uint64: ctypes.c_uint64,
           np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32, np.float32: ctypes.c_float}


_driver = None  # cupy_backends.cuda.api.driver, imported on the first launch


class ParamBlock:
    """One kernel's arguments as ``cuLaunchKernel`` takes them: a ctypes value per argument
    and the array of their addresses, built (and filled with ``args``) once per launch site;
    each call refills all arguments, or only some (`launch_slots`).
    CuPy's own launch wraps every argument in a new object on every call (~30 arguments per
    kernel), a sixth of a decoding step's host time (docs/tuning.md)."""

    def __init__(self, args):
        self.values = [_CTYPES[type(a)](a) for a in args]
        self.addresses = (ctypes.c_void_p * len(args))(
            *[ctypes.addressof(v) for v in self.values])
        self.pointer = ctypes.addressof(self.addresses)
        self.lock = threading.Lock()

    def launch(self, fn, grid, block, args, smem: int, stream_ptr: int) -> None:
        """Fill every argument, then launch."""
        self.launch_slots(fn, grid, block, range(len(self.values)), args, smem, stream_ptr)

    def launch_slots(self, fn, grid, block, slots, args, smem: int, stream_ptr: int) -> None:
        """Refill only the arguments at ``slots`` (e.g. the pointers, when the rest were
        filled once for a launch site), then launch."""
        global _driver
        if _driver is None:
            from cupy_backends.cuda.api import driver as _driver
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        values = self.values
        with self.lock:  # the driver copies the values at launch; refill only after that
            for i, a in zip(slots, args):
                values[i].value = a
            _driver.launchKernel(fn.ptr, gx, gy, gz, block[0], 1, 1, smem, stream_ptr,
                                self.pointer, 0)


_param_blocks = LaunchCache(1024)


def param_block(site, args) -> ParamBlock:
    """The parameter block of one launch site (e.g. a variant and kernel role) for
    arguments of these types, built on first use."""
    key = (site, tuple(map(type, args)))
    block = _param_blocks.get(key)
    if block is None:
        block = _param_blocks.put(key, ParamBlock(args))
    return block


_NOTHING = contextlib.nullcontext()  # reusable


def on_device(device_index: int):
    """A context making ``device_index`` CUDA's current device (``cuLaunchKernel`` launches
    on the current context); nothing to do, and nearly free, when it already is."""
    import cupy

    if cupy.cuda.runtime.getDevice() == device_index:
        return _NOTHING
    return cupy.cuda.Device(device_index)


def _launch(variant, role, grid, args, device_index):
    """One kernel of ``variant`` through ``cuLaunchKernel`` on torch's current stream of
    ``device_index``."""
    _, threads, smem = variant.geometry(role)
    params = param_block((variant, role), args)
    fn = kernel_function(variant, role, device_index)
    with on_device(device_index):
        params.launch(fn, grid, (threads,), args, smem, current_stream(device_index))


def _ptr(t: torch.Tensor | None):
    return np.uint64(0 if t is None else t.data_ptr())


def _strides(t: torch.Tensor, n: int = 4):
    return [np.int64(s) for s in t.stride()[:n]]


def _i32(*xs):
    return [np.int32(x) for x in xs]


def _f32(*xs):
    return [np.float32(x) for x in xs]


def _like_layout(t: torch.Tensor, shape=None) -> torch.Tensor:
    """An uninitialized tensor with t's shape and a unit column stride; a (B, S, H, D) tensor
    passed transposed gets a (B, S, H, D) buffer, anything else (B, H, S, D)."""
    B, H, S, D = t.shape if shape is None else shape
    if t.stride(1) < t.stride(2):
        return torch.empty((B, S, H, D), dtype=t.dtype, device=t.device).transpose(1, 2)
    return torch.empty((B, H, S, D), dtype=t.dtype, device=t.device)


def _vec_ok3(D: int, *tensors) -> bool:
    """`_vec_ok` for packed (total, H, D) tensors."""
    if D % 8:
        return False
    return all(t.stride(2) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) % 8 == 0
               and t.stride(1) % 8 == 0 for t in tensors)


def _packed_strides(t: torch.Tensor, n: int = 4):
    """A packed (total, H, D) tensor's strides in the kernels' (batch, head, row, column)
    order: the batch stride is unused (rows start at the sequence's offset)."""
    return [np.int64(s) for s in (0, t.stride(1), t.stride(0), t.stride(2))[:n]]


def _vec_ok(D: int, *tensors) -> bool:
    """Whether 16-byte cp.async can load every row: unit column stride, 16-byte aligned rows."""
    if D % 8:
        return False
    for t in tensors:
        if t.stride(3) != 1 or t.data_ptr() % 16:
            return False
        if any(s % 8 for s in t.stride()[:3]):
            return False
    return True


def band(problem: AttentionProblem, rows: int | None = None) -> BandArgs:
    """The kernels apply both sides of the band: an unbounded side is Sq + Sk, which never
    masks (and bounds the int32 arithmetic); for packed calls ``rows`` = total_q + total_k
    (no sequence is longer, whatever its max_seqlen bound says)."""
    return band_args(problem, unbounded=problem.seqlen_q + problem.seqlen_k if rows is None
                     else rows)


def scores(problem: AttentionProblem, fp32: bool) -> tuple:
    """Scale and softcap as float32 kernel arguments: fp16/bf16 kernels work in log2 units,
    fp32 in natural ones."""
    return tuple(_f32(*score_args(problem, log2=not fp32)))


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


# -- forward / backward ---------------------------------------------------------------------

def _extras(cu_q=None, cu_k=None, dropout=None, q=None) -> tuple:
    """The trailing arguments of every forward/backward kernel: packed offsets, the dropout
    state, its keep threshold and 1 / (1 - p) (unused by the kernels without the feature)."""
    if dropout is None:
        return _ptr(cu_q), _ptr(cu_k), _ptr(None), np.uint32(0), np.float32(1.0)
    check_dropout_state(dropout.state, q)
    return (_ptr(cu_q), _ptr(cu_k), _ptr(dropout.state), np.uint32(dropout.threshold),
            np.float32(dropout.scale))


def _feat(dropout) -> int:
    return 0 if dropout is None else _compile.FEAT_DROPOUT


def forward(problem: AttentionProblem, q, k, v, seqlens_k, dropout=None):
    check_seqlens(seqlens_k)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dtype = _DTYPE_NAMES[q.dtype]
    left, right, *_ = bounds = band(problem)
    variant = _compile.variant_for("forward", dtype, D, bounds.bounded,
                                   problem.softcap is not None, _feat(dropout))
    out = _like_layout(q)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    fp32 = dtype == "fp32"
    vec = (not fp32) and _vec_ok(D, q, k, v)
    args = (
        _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), _ptr(seqlens_k),
        *_strides(q), *_strides(k), *_strides(v), *_strides(out, 3),
        *_i32(Hq, Hq // Hkv, Sq, Sk, D, left, right),
        *scores(problem, fp32), np.int32(vec), *_extras(dropout=dropout, q=q),
    )
    bm = variant.geometry("fwd")[0]
    _launch(variant, "fwd", (-(-Sq // bm), Hq, B), args, _device_index(q))
    return out, lse


def forward_varlen(problem: AttentionProblem, q, k, v, cu_seqlens_q, cu_seqlens_k,
                   dropout=None):
    """Packed sequences: one block per (query tile of the longest sequence, head, sequence);
    a block past its sequence's end exits. ``out (total_q, Hq, D)``, ``lse (Hq, total_q)``.
    With ``dropout`` the keep mask is the dense one of the batch of documents: sequence d
    takes batch index d's counters, rows and columns counted from its own start."""
    total_q, Hq, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    check_packed_lengths(total_q, total_k)
    B = problem.batch
    dtype = _DTYPE_NAMES[q.dtype]
    left, right, *_ = bounds = band(problem, total_q + total_k)
    variant = _compile.variant_for("forward", dtype, D, bounds.bounded,
                                   problem.softcap is not None,
                                   _compile.FEAT_VARLEN | _feat(dropout))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, total_q), dtype=torch.float32, device=q.device)
    fp32 = dtype == "fp32"
    vec = (not fp32) and _vec_ok3(D, q, k, v)
    args = (
        _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), _ptr(None),
        *_packed_strides(q), *_packed_strides(k), *_packed_strides(v),
        *_packed_strides(out, 3),
        *_i32(Hq, Hq // Hkv, total_q, total_k, D, left, right),
        *scores(problem, fp32), np.int32(vec),
        *_extras(cu_seqlens_q, cu_seqlens_k, dropout, q),
    )
    bm = variant.geometry("fwd")[0]
    if problem.seqlen_q and B:
        _launch(variant, "fwd", (-(-problem.seqlen_q // bm), Hq, B), args, _device_index(q))
    return out, lse


def backward(problem: AttentionProblem, q, k, v, out, lse, dout, seqlens_k, dlse=None,
             dropout=None):
    check_seqlens(seqlens_k)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dtype = _DTYPE_NAMES[q.dtype]
    fp32 = dtype == "fp32"
    dev = _device_index(q)
    lse = lse if lse.is_contiguous() else lse.contiguous()
    # The delta kernel subtracts dlse (the core's: contiguous, lse's dtype) from each row.
    dlse = dlse if dlse is None or dlse.is_contiguous() else dlse.contiguous()
    left, right, *_ = bounds = band(problem)
    variant = _compile.variant_for("backward", dtype, D, bounds.bounded,
                                   problem.softcap is not None, _feat(dropout))

    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    _launch(variant, "delta", (-(-Sq // 4), Hq, B),
            (_ptr(out), _ptr(dout), _ptr(dlse), _ptr(delta), *_strides(out), *_strides(dout),
             *_i32(Hq, Sq, D)), dev)

    dq, dk, dv = _like_layout(q), _like_layout(k), _like_layout(v)
    vec = (not fp32) and _vec_ok(D, q, k, v, dout)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    tail = (*_i32(Hq, Hq // Hkv, Sq, Sk, D, left, right),
            *scores(problem, fp32), np.float32(problem.scale), np.int32(vec),
            *_extras(dropout=dropout, q=q))
    inputs = (_ptr(q), _ptr(k), _ptr(v), _ptr(dout), _ptr(lse), _ptr(delta), _ptr(seqlens_k))

    bm = variant.geometry("dq")[0]
    _launch(variant, "dq", (-(-Sq // bm), Hq, B),
            (*inputs, _ptr(dq), *common, *_strides(dq, 3), *tail), dev)
    bk = variant.geometry("dkdv")[0]
    _launch(variant, "dkdv", (-(-Sk // bk) * variant.chunks(), Hkv, B),
            (*inputs, _ptr(dk), _ptr(dv), *common, *_strides(dk, 3), *_strides(dv, 3), *tail),
            dev)
    return dq, dk, dv


def backward_varlen(problem: AttentionProblem, q, k, v, out, lse, dout, cu_seqlens_q,
                    cu_seqlens_k, dlse=None, dropout=None):
    """Packed sequences: delta over all total_q rows as one batch, then dQ and dK/dV blocks
    per (tile of the longest sequence, head, sequence), as in `forward_varlen`; ``dropout``
    regenerates `forward_varlen`'s mask."""
    total_q, Hq, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    check_packed_lengths(total_q, total_k)
    B = problem.batch
    dtype = _DTYPE_NAMES[q.dtype]
    fp32 = dtype == "fp32"
    dev = _device_index(q)
    lse = lse if lse.is_contiguous() else lse.contiguous()  # (Hq, total_q)
    dlse = dlse if dlse is None or dlse.is_contiguous() else dlse.contiguous()
    left, right, *_ = bounds = band(problem, total_q + total_k)
    variant = _compile.variant_for("backward", dtype, D, bounds.bounded,
                                   problem.softcap is not None,
                                   _compile.FEAT_VARLEN | _feat(dropout))

    # (Hq, total_q) is the dense (1, Hq, total_q) layout the delta kernel writes.
    delta = torch.empty((Hq, total_q), dtype=torch.float32, device=q.device)
    _launch(variant, "delta", (-(-total_q // 4), Hq, 1),
            (_ptr(out), _ptr(dout), _ptr(dlse), _ptr(delta), *_packed_strides(out),
             *_packed_strides(dout), *_i32(Hq, total_q, D)), dev)

    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    vec = (not fp32) and _vec_ok3(D, q, k, v, dout)
    common = (*_packed_strides(q), *_packed_strides(k), *_packed_strides(v),
              *_packed_strides(dout))
    tail = (*_i32(Hq, Hq // Hkv, total_q, total_k, D, left, right),
            *scores(problem, fp32), np.float32(problem.scale), np.int32(vec),
            *_extras(cu_seqlens_q, cu_seqlens_k, dropout, q))
    inputs = (_ptr(q), _ptr(k), _ptr(v), _ptr(dout), _ptr(lse), _ptr(delta), _ptr(None))

    if problem.seqlen_q and B:
        bm = variant.geometry("dq")[0]
        _launch(variant, "dq", (-(-problem.seqlen_q // bm), Hq, B),
                (*inputs, _ptr(dq), *common, *_packed_strides(dq, 3), *tail), dev)
    if problem.seqlen_k and B:
        bk = variant.geometry("dkdv")[0]
        _launch(variant, "dkdv", (-(-problem.seqlen_k // bk) * variant.chunks(), Hkv, B),
                (*inputs, _ptr(dk), _ptr(dv), *common, *_packed_strides(dk, 3),
                 *_packed_strides(dv, 3), *tail), dev)
    return dq, dk, dv
