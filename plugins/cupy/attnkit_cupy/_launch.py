"""Argument checks and kernel launches on PyTorch's memory and stream.

Every public function here checks its arguments first (device, dtype, shapes, sizes), then
launches. Kernels read and write the torch tensors in place: they get ``data_ptr()`` and the
element strides, and run on ``torch.cuda.current_stream()`` of the tensors' device, so the
calls order correctly with the surrounding PyTorch work without any synchronization.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import threading

import numpy as np
import torch

from attnkit.spec import AttentionProblem, describe_tensor

from . import _compile

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
LOG2E = 1.0 / math.log(2.0)
#: Grid y/z (heads, batch) limit, and the bound keeping the band arithmetic inside int32.
MAX_GRID_YZ = 65535
MAX_SEQ_SUM = 1 << 29


# -- checks ---------------------------------------------------------------------------------

def check_inputs(q, k, v, seqlens_k, *, require_cuda: bool = True) -> None:
    """Raise ``TypeError``/``ValueError`` unless q, k, v (and seqlens_k) can be launched."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{describe_tensor(name, t)} must be 4-D (B, H, S, D)")
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"{describe_tensor(name, t)}: the cupy backend takes float16, "
                            "bfloat16 or float32")
        if require_cuda and t.device.type != "cuda":
            raise ValueError(f"{describe_tensor(name, t)} must be a CUDA tensor")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError("q, k and v must share one dtype: " + ", ".join(
            describe_tensor(n, t) for n, t in (("q", q), ("k", k), ("v", v))))
    if not (q.device == k.device == v.device):
        raise ValueError("q, k and v must be on one device: " + ", ".join(
            describe_tensor(n, t) for n, t in (("q", q), ("k", k), ("v", v))))
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be (B={B}, Hkv, Sk, D={D}): {describe_tensor('k', k)}, "
                         f"{describe_tensor('v', v)}")
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads must be a multiple of kv heads: {describe_tensor('q', q)}"
                         f", {describe_tensor('k', k)}")
    if not 1 <= D <= _compile.MAX_HEAD_DIM:
        raise ValueError(f"{describe_tensor('q', q)}: head dim must be in "
                         f"[1, {_compile.MAX_HEAD_DIM}] for the cupy backend")
    if 0 in (B, Hq, Sq, Sk):
        raise ValueError(f"empty problem ({describe_tensor('q', q)}, {describe_tensor('k', k)})"
                         ": the core answers these without a backend")
    if max(Hq, B) > MAX_GRID_YZ:
        raise ValueError(f"{describe_tensor('q', q)}: batch and heads must each be <= "
                         f"{MAX_GRID_YZ} (CUDA grid limit)")
    if Sq + Sk >= MAX_SEQ_SUM:
        raise ValueError(f"Sq + Sk = {Sq + Sk} must be < {MAX_SEQ_SUM} for the cupy backend")
    if seqlens_k is not None:
        if seqlens_k.dtype != torch.int32 or not seqlens_k.is_contiguous():
            raise TypeError(f"{describe_tensor('seqlens_k', seqlens_k)} must be a contiguous "
                            "int32 tensor")
        if tuple(seqlens_k.shape) != (B,):
            raise ValueError(f"{describe_tensor('seqlens_k', seqlens_k)} must have shape "
                             f"({B},)")
        if seqlens_k.device != q.device:
            raise ValueError(f"{describe_tensor('seqlens_k', seqlens_k)} must be on q's "
                             f"device {q.device}")


def check_backward(q, out, lse, dout) -> None:
    B, Hq, Sq, _ = q.shape
    for name, t in (("out", out), ("dout", dout)):
        if not isinstance(t, torch.Tensor) or t.shape != q.shape or t.dtype != q.dtype \
                or t.device != q.device:
            got = describe_tensor(name, t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{got} must match {describe_tensor('q', q)} in shape, dtype, device")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, Hq, Sq) \
            or lse.dtype != torch.float32 or lse.device != q.device:
        got = describe_tensor("lse", lse) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"{got} must be float32 of shape ({B}, {Hq}, {Sq}) on {q.device}")


# -- launch helpers -------------------------------------------------------------------------

def _stream_getter():
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:  # the handle as an int, without building a torch Stream object
        return raw
    return lambda device_index: torch.cuda.current_stream(device_index).cuda_stream


#: ``current_stream(device_index)``: the handle of PyTorch's current stream on that device.
current_stream = _stream_getter()


_functions: dict[tuple, object] = {}


def kernel_function(variant, role: str, device_index: int):
    """The device-bound ``cupy.cuda.Function`` of one kernel (cached), launched by
    `run_kernels` with no stream or device context switch per call."""
    key = (variant, role, device_index)
    fn = _functions.get(key)
    if fn is None:
        import cupy

        with cupy.cuda.Device(device_index):
            fn = _functions[key] = _compile.get_kernel(variant, role, device_index).kernel
    return fn


#: ctypes type of each kernel argument kind (Python ints are pointers and i64 strides).
_CTYPES = {int: ctypes.c_int64, np.int64: ctypes.c_int64, np.uint64: ctypes.c_uint64,
           np.int32: ctypes.c_int32, np.float32: ctypes.c_float}


_driver = None  # cupy_backends.cuda.api.driver, imported on the first launch


class ParamBlock:
    """One kernel's arguments as ``cuLaunchKernel`` takes them: a ctypes value per argument
    and the array of their addresses, built (and filled with ``args``) once per launch site;
    each call refills all arguments, or only some (`launch_slots`).
    CuPy's own launch wraps every argument in a new object on every call (~30 arguments per
    kernel); this cut a decoding step's host time from ~133 to ~112 us on the H100
    (benchmarks/NOTES.md, cupy decode)."""

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


_param_blocks: dict[tuple, ParamBlock] = {}


def param_block(site, args) -> ParamBlock:
    """The parameter block of one launch site (e.g. a variant and kernel role) for
    arguments of these types, built on first use."""
    key = (site, tuple(map(type, args)))
    block = _param_blocks.get(key)
    if block is None:
        if len(_param_blocks) > 1024:
            _param_blocks.clear()
        block = _param_blocks[key] = ParamBlock(args)
    return block


def run_kernels(launches, device_index: int) -> None:
    """``launches``: (ParamBlock, function, grid, block, args, shared_mem) tuples, run in
    order through ``cuLaunchKernel`` on torch's current stream of ``device_index``."""
    with on_device(device_index):
        stream = current_stream(device_index)
        for params, fn, grid, block, args, smem in launches:
            params.launch(fn, grid, block, args, smem, stream)


_NOTHING = contextlib.nullcontext()  # reusable


def on_device(device_index: int):
    """A context making ``device_index`` CUDA's current device (``cuLaunchKernel`` launches
    on the current context); nothing to do, and nearly free, when it already is."""
    import cupy

    if cupy.cuda.runtime.getDevice() == device_index:
        return _NOTHING
    return cupy.cuda.Device(device_index)


def _launch(variant, role, grid, args, device_index):
    _, threads, smem = variant.geometry(role)
    run_kernels([(param_block((variant, role), args),
                  kernel_function(variant, role, device_index), grid, (threads,), args, smem)],
                device_index)


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


def _band_args(problem: AttentionProblem):
    """(has_band, left, right): unbounded sides become Sq + Sk, which never masks."""
    cap = problem.seqlen_q + problem.seqlen_k
    left, right = problem.band
    has_band = left is not None or right is not None
    return (has_band, cap if left is None else min(left, cap),
            cap if right is None else min(right, cap))


def _score_args(problem: AttentionProblem, fp32: bool):
    """Scale/softcap constants: fp16/bf16 kernels work in log2 units, fp32 in natural ones."""
    scale = problem.scale
    if problem.softcap is None:
        return (scale, 0.0, 0.0) if fp32 else (scale * LOG2E, 0.0, 0.0)
    cap = problem.softcap
    return (scale, scale / cap, cap) if fp32 else (scale * LOG2E, scale / cap, cap * LOG2E)


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


# -- forward / backward ---------------------------------------------------------------------

def forward(problem: AttentionProblem, q, k, v, seqlens_k):
    check_inputs(q, k, v, seqlens_k)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dtype = _DTYPE_NAMES[q.dtype]
    has_band, left, right = _band_args(problem)
    variant = _compile.variant_for("forward", dtype, D, has_band, problem.softcap is not None)
    out = _like_layout(q)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    fp32 = dtype == "fp32"
    vec = (not fp32) and _vec_ok(D, q, k, v)
    args = (
        _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), _ptr(seqlens_k),
        *_strides(q), *_strides(k), *_strides(v), *_strides(out, 3),
        *_i32(Hq, Hq // Hkv, Sq, Sk, D, left, right),
        *_f32(*_score_args(problem, fp32)), np.int32(vec),
    )
    bm = variant.geometry("fwd")[0]
    _launch(variant, "fwd", (-(-Sq // bm), Hq, B), args, _device_index(q))
    return out, lse


def backward(problem: AttentionProblem, q, k, v, out, lse, dout, seqlens_k):
    check_inputs(q, k, v, seqlens_k)
    check_backward(q, out, lse, dout)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dtype = _DTYPE_NAMES[q.dtype]
    fp32 = dtype == "fp32"
    dev = _device_index(q)
    lse = lse if lse.is_contiguous() else lse.contiguous()
    has_band, left, right = _band_args(problem)
    variant = _compile.variant_for("backward", dtype, D, has_band, problem.softcap is not None)

    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    _launch(variant, "delta", (-(-Sq // 4), Hq, B),
            (_ptr(out), _ptr(dout), _ptr(delta), *_strides(out), *_strides(dout),
             *_i32(Hq, Sq, D)), dev)

    dq, dk, dv = _like_layout(q), _like_layout(k), _like_layout(v)
    vec = (not fp32) and _vec_ok(D, q, k, v, dout)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    tail = (*_i32(Hq, Hq // Hkv, Sq, Sk, D, left, right),
            *_f32(*_score_args(problem, fp32), problem.scale), np.int32(vec))
    inputs = (_ptr(q), _ptr(k), _ptr(v), _ptr(dout), _ptr(lse), _ptr(delta), _ptr(seqlens_k))

    bm = variant.geometry("dq")[0]
    _launch(variant, "dq", (-(-Sq // bm), Hq, B),
            (*inputs, _ptr(dq), *common, *_strides(dq, 3), *tail), dev)
    bk = variant.geometry("dkdv")[0]
    _launch(variant, "dkdv", (-(-Sk // bk) * variant.chunks(), Hkv, B),
            (*inputs, _ptr(dk), _ptr(dv), *common, *_strides(dk, 3), *_strides(dv, 3), *tail),
            dev)
    return dq, dk, dv
