"""The Hopper kernels in Gluon: when they run, and their launchers (kernels in
``_gluon_forward`` and ``_gluon_backward``).

Triton's ``tl`` kernels cannot keep a producer warp feeding TMA loads while two consumer
warpgroups alternate tensor-core and softmax work (its automatic warp specialization measured
30-40% slower on the H100); Gluon, shipped with Triton, states that schedule explicitly. It
covers the dense training shape that dominates time: sm_90, fp16/bf16, head dim 64 or 128,
Sq == Sk a multiple of 128, causal or not, GQA, no window/softcap/seqlens_k, q/k/v (and dout)
dense in (B, H, S, D) or (B, S, H, D) order (the latter passed as ``.transpose(1, 2)``), k and
v alike. Everything else takes the ``tl`` kernels, whose results these match (same ``out`` and
natural-log ``lse``; gradients to rounding).

The backward sums dQ over key blocks with TMA reduce-adds, so its dQ rounds differently run to
run: under ``torch.use_deterministic_algorithms(True)`` the deterministic ``tl`` backward runs.
Left to themselves (``auto``) the paths run from the sequence lengths where they measured
faster than ``tl`` (``_MIN_SEQLEN``). ``ATTNKIT_TRITON_GLUON`` / ``ATTNKIT_TRITON_GLUON_BWD``
``=0`` turn them off; ``=1`` takes them wherever they can apply and makes a call they cannot
take an error instead.
"""

from __future__ import annotations

import functools
import types

import torch

from ._backward import prepare
from ._band import LOG2E
from ._configs import interpreting, path_enabled

_ENV = "ATTNKIT_TRITON_GLUON"
_BWD_ENV = "ATTNKIT_TRITON_GLUON_BWD"
BLOCK_M = 128  # query rows per program: two consumer warpgroups of 64
BLOCK_N = 128  # keys per tile (the causal mask assumes BLOCK_N == BLOCK_M)
_MAXNREG = 168  # 12 warps x 32 threads x 168 <= 64K registers; setmaxnreg gives 240/240/24
# Shortest Sq (= Sk) from which auto mode takes the Gluon kernel, per (pass, head dim, causal):
# the bf16 grid on an H100, Gluon vs tl (benchmarks/NOTES.md, "Seventh and eighth sessions").
_MIN_SEQLEN = {
    ("forward", 64, False): 1024, ("forward", 64, True): 4096,
    ("forward", 128, False): 1024, ("forward", 128, True): 512,
    ("backward", 64, False): 4096, ("backward", 64, True): 4096,
    ("backward", 128, False): 1024, ("backward", 128, True): 4096,
}
# Per (head dim, causal): whether the backward takes delta premultiplied by the softmax scale
# (dS = P (dP scale - delta scale), one multiply fewer per score). Measured on an H200 from
# S=4k: 1-5% faster, except at head dim 128 causal, 0-4% slower (NOTES.md, ninth session).
_SCALED_DELTA = {(64, False): True, (64, True): True, (128, False): True, (128, True): False}


@functools.lru_cache(maxsize=1)
def kernels():
    """The Gluon kernel modules (``.fwd``, ``.bwd``, ``.gl``, ``.TensorDescriptor``), or the
    ImportError's text when this Triton lacks Gluon's Hopper API."""
    try:
        from triton.experimental.gluon import language as gl

        from . import _gluon_backward, _gluon_forward
    except Exception as e:  # ImportError, or an API this module does not know
        return f"{type(e).__name__}: {e}"
    return types.SimpleNamespace(fwd=_gluon_forward, bwd=_gluon_backward, gl=gl,
                                 TensorDescriptor=_gluon_forward.TensorDescriptor)


def _preferred(kind: str, problem) -> bool:
    least = _MIN_SEQLEN.get((kind, problem.head_dim, problem.causal))
    return least is not None and problem.seqlen_q >= least


@functools.lru_cache(maxsize=1024)
def _problem_reasons(problem, interpret: bool) -> tuple[str, ...]:
    reasons = []
    if interpret or problem.device.type != "cuda":
        reasons.append("not on a CUDA device")
    elif torch.cuda.get_device_capability(problem.device) != (9, 0):
        reasons.append("needs sm_90 (wgmma)")
    elif isinstance(kernels(), str):
        reasons.append(f"this Triton has no usable Gluon Hopper API ({kernels()})")
    if problem.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {problem.dtype} (fp16/bf16 only)")
    if problem.head_dim not in (64, 128):
        reasons.append(f"head dim {problem.head_dim} (64 or 128 only)")
    if problem.seqlen_q != problem.seqlen_k or problem.seqlen_q % BLOCK_M:
        reasons.append(f"Sq={problem.seqlen_q}, Sk={problem.seqlen_k} (equal, multiples of "
                       f"{BLOCK_M})")
    if problem.has_window or problem.softcap is not None or problem.has_seqlens_k:
        reasons.append("window, softcap or seqlens_k")
    return tuple(reasons)


def _view_2d(t: torch.Tensor):
    """``(rows, columns, rb, rh, ch)`` of the 2-D TMA view of a dense (B, H, S, D) tensor held
    in (B, H, S, D) or (B, S, H, D) order (see ``_fwd_kernel``), else None."""
    B, H, S, D = t.shape
    if t.is_contiguous():
        return B * H * S, D, H * S, S, 0
    if t.transpose(1, 2).is_contiguous():
        return B * S, H * D, S, 0, D
    return None


def _layout_reasons(names: str, k: torch.Tensor, v: torch.Tensor, *others) -> list[str]:
    # TMA: a 2-D view and a 16-byte aligned base; k and v share one descriptor geometry.
    if (all(_view_2d(t) is not None and not t.data_ptr() & 15 for t in (k, v, *others))
            and k.stride() == v.stride()):
        return []
    return [f"{names} must be dense in (B, H, S, D) or (B, S, H, D) order, 16-byte aligned, "
            "k and v in one layout"]


def use_gluon(problem, q, k, v) -> bool:
    """Whether this forward call takes the Gluon kernel."""
    def reasons():
        return [*_problem_reasons(problem, interpreting()), *_layout_reasons("q, k, v", k, v, q)]

    return path_enabled(_ENV, "the Gluon forward", reasons, _preferred("forward", problem))


def use_gluon_backward(problem, q, k, v, dout) -> bool:
    """Whether this backward call takes the Gluon kernel (its dQ is summed with atomic adds:
    never when torch was asked for deterministic algorithms)."""
    def reasons():
        found = [*_problem_reasons(problem, interpreting()),
                 *_layout_reasons("q, k, v, dout", k, v, q, dout)]
        if problem.deterministic:  # torch's mode when the forward built the problem
            found.append("torch.use_deterministic_algorithms(True) (its dQ is summed with "
                         "atomic adds)")
        return found

    return path_enabled(_BWD_ENV, "the Gluon backward", reasons,
                        _preferred("backward", problem))


@functools.lru_cache(maxsize=16)
def _smem_layouts(dtype: torch.dtype, head_dim: int):
    gl = kernels().gl
    el = gl.float16 if dtype == torch.float16 else gl.bfloat16
    return (gl.NVMMASharedLayout.get_default_for([64, head_dim], el),
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, head_dim], el))


def launch_forward(problem, q, k, v):
    """``out`` (like q) and ``lse`` (B, Hq, S) float32, natural log, as the ``tl`` forward."""
    TensorDescriptor = kernels().TensorDescriptor
    B, H, S, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    q_layout, kv_layout = _smem_layouts(q.dtype, D)
    (qr, qc, *q_rc), (kr, kc, *kv_rc) = _view_2d(q), _view_2d(k)
    # out = empty_like(q) keeps q's strides; use_gluon checked that v has k's
    q_desc, o_desc = (TensorDescriptor(t, [qr, qc], [qc, 1], [64, D], q_layout)
                      for t in (q, out))
    k_desc, v_desc = (TensorDescriptor(t, [kr, kc], [kc, 1], [BLOCK_N, D], kv_layout)
                      for t in (k, v))
    # D=128: K+V slots are 64 KB each, two fit beside Q; D=64 measured no better with three.
    kernels().fwd._fwd_kernel[(S // BLOCK_M, B * H)](
        q_desc, k_desc, v_desc, o_desc, lse, S, H, problem.group_size,
        problem.scale * LOG2E, *q_rc, *kv_rc, problem.causal, BLOCK_N, 2, num_warps=4,
        maxnreg=_MAXNREG)
    return out, lse


def launch_backward(problem, q, k, v, out, lse, dout):
    """``(dq, dk, dv)`` as the ``tl`` backward computes them, dQ summed in float32."""
    TensorDescriptor = kernels().TensorDescriptor
    B, H, S, D = q.shape
    scaled = _SCALED_DELTA[D, problem.causal]
    delta, lse2 = prepare(q, out, lse, dout, BLOCK_M,  # S % BLOCK_M == 0: no pad rows
                          problem.scale if scaled else 1.0)
    dq = torch.zeros_like(q, dtype=torch.float32)  # keeps q's strides, so q's 2-D view
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    q_layout, kv_layout = _smem_layouts(q.dtype, D)
    (qr, qc, *q_rc), (dr, dc, *do_rc), (kr, kc, *kv_rc) = map(_view_2d, (q, dout, k))
    q_desc = TensorDescriptor(q, [qr, qc], [qc, 1], [64, D], q_layout)
    do_desc = TensorDescriptor(dout, [dr, dc], [dc, 1], [64, D], q_layout)
    dq_desc = TensorDescriptor(dq, [qr, qc], [qc, 1], [64, 64], _dq_layout())
    k_desc, v_desc = (TensorDescriptor(t, [kr, kc], [kc, 1], [BLOCK_N, D], kv_layout)
                      for t in (k, v))
    kernels().bwd._bwd_kernel[(S // BLOCK_N, B * k.shape[1])](
        q_desc, k_desc, v_desc, do_desc, dq_desc, lse2, delta, dk, dv, S, H,
        problem.group_size, problem.scale * LOG2E, problem.scale, *q_rc, *do_rc, *kv_rc, kc,
        problem.causal, 2, scaled, num_warps=4, maxnreg=_MAXNREG)
    return dq.to(q.dtype), dk, dv


@functools.lru_cache(maxsize=1)
def _dq_layout():
    gl = kernels().gl
    return gl.NVMMASharedLayout.get_default_for([64, 64], gl.float32)


__all__ = ["launch_backward", "launch_forward", "use_gluon", "use_gluon_backward"]
