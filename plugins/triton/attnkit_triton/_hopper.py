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

Both need Gluon's Hopper API (`kernels` says why where it is missing). The backward also needs
Gluon's TMA reduce-add, which Triton 3.6 builds only through a private builder call: made
only on the Triton releases it was tested with (`_triton_internals`).
Measurements behind the thresholds and switches below: docs/tuning.md.
"""

from __future__ import annotations

import functools
import types

import torch

from attnkit.backend_utils import LOG2E

from ._backward import cast_dense, fresh_layout, launch_prep
from ._configs import _arch, interpreting, path_enabled
from ._launcher import FastKernel, TmaLaunch, current_stream, fast_launches
from ._triton_internals import descriptor_fields, internals_reason

_ENV = "ATTNKIT_TRITON_GLUON"
_BWD_ENV = "ATTNKIT_TRITON_GLUON_BWD"
BLOCK_M = 128  # query rows per program: two consumer warpgroups of 64
BLOCK_N = 128  # keys per tile (the causal mask assumes BLOCK_N == BLOCK_M)
_MAXNREG = 168  # 12 warps x 32 threads x 168 <= 64K registers; setmaxnreg gives 240/240/24
# Shortest Sq (= Sk) from which auto mode takes the Gluon kernel, per (pass, head dim, causal):
# where Gluon beat tl in the bf16 grid (H100; head dim 128 and the backwards re-timed on an
# H200: at head dim 64 the backward ties at 512 non-causal and is 8% slower causal).
_MIN_SEQLEN = {
    ("forward", 64, False): 1024, ("forward", 64, True): 4096,
    ("forward", 128, False): 512, ("forward", 128, True): 512,
    ("backward", 64, False): 1024, ("backward", 64, True): 1024,
    ("backward", 128, False): 512, ("backward", 128, True): 512,
}
# Per (head dim, causal): whether a warpgroup computes each query block's dQ share a block
# late (``_bwd_consumer``). H200: +0-4% at head dim 64 (S >= 4k); at 128 within the spread.
_DQ_LAG = {(64, False): True, (64, True): True, (128, False): False, (128, True): False}


@functools.lru_cache(maxsize=1)
def kernels():
    """The Gluon kernel modules (``.fwd``, ``.bwd``, ``.gl``, ``.TensorDescriptor``), or the
    ImportError's text when this Triton lacks Gluon's Hopper API. ``.bwd._tma_add`` is None
    where the backward's TMA reduce-add is not available."""
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
def _problem_reasons(problem, interpret: bool, backward: bool = False) -> tuple[str, ...]:
    reasons = []
    if interpret or problem.device.type != "cuda":
        reasons.append("not on a CUDA device")
    elif _arch(problem.device) != 90:
        reasons.append("needs sm_90 (wgmma)")
    elif isinstance(kernels(), str):
        reasons.append(f"this Triton has no usable Gluon Hopper API ({kernels()})")
    elif backward and kernels().bwd._tma_add is None:
        reasons.append("this Triton's Gluon names no TMA reduce-add, and the private builder "
                       f"call that stands in for it is not made: {internals_reason()}")
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


def _view_2d(shape, stride):
    """``(rows, columns, rb, rh, ch)`` of the 2-D TMA view of a dense (B, H, S, D) tensor held
    in (B, H, S, D) or (B, S, H, D) order (see ``_fwd_kernel``), else None. Dense as torch's
    ``is_contiguous`` has it: size-1 dims may have any stride."""
    B, H, S, D = shape
    if _dense(shape, stride, (0, 1, 2, 3)):
        return B * H * S, D, H * S, S, 0
    if _dense(shape, stride, (0, 2, 1, 3)):
        return B * S, H * D, S, 0, D
    return None


def _dense(shape, stride, order) -> bool:
    expected = 1
    for dim in reversed(order):
        if shape[dim] != 1 and stride[dim] != expected:
            return False
        expected *= shape[dim]
    return True


@functools.lru_cache(maxsize=1024)
def _views(q_shape, kv_shape, q_strides: tuple, k_stride, v_stride):
    """The 2-D views of the q-shaped tensors (q, then dout) and the one view k and v share,
    or None when one is not dense in either order or v's strides are not k's. Cached: the
    layout is checked on every call, from strides alone."""
    views = tuple(_view_2d(q_shape, st) for st in q_strides)
    kv = _view_2d(kv_shape, k_stride)
    if None in views or kv is None or v_stride != k_stride:
        return None
    return views, kv


def _layout(q, k, v, dout=None):
    """``(views, aligned)``: `_views` of these tensors and whether every base is 16-byte
    aligned (TMA's requirement; descriptors' strides are aligned by their shapes)."""
    qs = (q.stride(),) if dout is None else (q.stride(), dout.stride())
    ptrs = q.data_ptr() | k.data_ptr() | v.data_ptr() | (0 if dout is None else
                                                          dout.data_ptr())
    return _views(q.shape, k.shape, qs, k.stride(), v.stride()), not ptrs & 15


def _layout_reasons(names: str, layout) -> list[str]:
    views, aligned = layout
    if views is not None and aligned:
        return []
    return [f"{names} must be dense in (B, H, S, D) or (B, S, H, D) order, 16-byte aligned, "
            "k and v in one layout"]


def use_gluon(problem, q, k, v) -> bool:
    """Whether this forward call takes the Gluon kernel."""
    def reasons():
        return [*_problem_reasons(problem, interpreting()),
                *_layout_reasons("q, k, v", _layout(q, k, v))]

    return path_enabled(_ENV, "the Gluon forward", reasons, _preferred("forward", problem))


def use_gluon_backward(problem, q, k, v, dout) -> bool:
    """Whether this backward call takes the Gluon kernel (its dQ is summed with atomic adds:
    never when torch was asked for deterministic algorithms)."""
    def reasons():
        found = [*_problem_reasons(problem, interpreting(), backward=True),
                 *_layout_reasons("q, k, v, dout", _layout(q, k, v, dout))]
        if not abs(problem.scale) >= 1e-30:  # the kernel divides by it (``_bwd_consumer``)
            found.append(f"softmax scale {problem.scale} (|scale| >= 1e-30 only)")
        if problem.deterministic:  # torch's mode when the forward built the problem
            found.append("torch.use_deterministic_algorithms(True) (its dQ is summed with "
                         "atomic adds)")
        return found

    return path_enabled(_BWD_ENV, "the Gluon backward", reasons,
                        _preferred("backward", problem))


class _Descriptors:
    """TMA descriptors of one geometry. The first is built by ``TensorDescriptor``, which
    checks it; its checks depend only on the geometry and the base's 16-byte alignment (which
    `use_gluon` checks per call), so later ones copy its fields with a new base where
    `descriptor_fields` reads them: ~3x cheaper, and a launch builds four or five."""

    def __init__(self, rows: int, cols: int, block: list, layout):
        self.cls = kernels().TensorDescriptor
        self.geometry = ([rows, cols], [cols, 1], block, layout)
        self.fields = None

    def __call__(self, base):
        cls = self.cls
        if self.fields is None:
            desc = cls(base, *self.geometry)
            self.fields = descriptor_fields(desc) or False
            return desc
        if self.fields is False:
            return cls(base, *self.geometry)
        desc = object.__new__(cls)
        desc.__dict__.update(self.fields)
        desc.base = base
        return desc


class _Plan:
    """One launch signature of a Gluon kernel (cached per problem and layout): descriptor
    makers by role, the launch's ``(grid, constexprs, fixed arguments)`` and the role of each
    launch argument (``roles``: a descriptor maker's name, or None for a plain tensor). The
    first call goes through Triton's path; later ones launch directly (`TmaLaunch`, else a
    `DirectLaunch` that still lets Triton encode the descriptors), skipping Triton's per-call
    argument binding and, with `TmaLaunch`, re-encoding descriptors whose tensors' addresses
    repeat, as a training step's do."""

    def __init__(self, kernel, setup, roles, **descriptors):
        self.kernel, self.setup, self.site, self.direct = kernel, setup, None, None
        self.steps = None  # the backward's (prep site, cast site): see `launch_backward`
        self.makers = [None if r is None else descriptors[r] for r in roles]

    def launch(self, tensors) -> None:
        direct = self.direct
        if direct and fast_launches():
            direct(tensors)
            return
        args = [t if m is None else m(t) for m, t in zip(self.makers, tensors)]
        if self.site is None:
            grid, constexprs, fixed = self.setup
            self.site = FastKernel(self.kernel).direct(grid, args, constexprs, fixed)
        else:
            self.site(*args)
        if direct is None and self.site.compiled is not None and fast_launches():
            self.direct = TmaLaunch.wrap(self.site, self.makers) or False  # False: asked once


@functools.lru_cache(maxsize=256)
def _forward_plan(problem, views):
    """Descriptor makers and the launch of one forward signature."""
    (q_view,), kv_view = views
    D, S = problem.head_dim, problem.seqlen_q
    q_layout, kv_layout = _smem_layouts(problem.dtype, D)
    (qr, qc, *q_rc), (kr, kc, *kv_rc) = q_view, kv_view
    # D=128: K+V slots are 64 KB each, two fit beside Q; D=64 measured no better with three.
    return _Plan(
        kernels().fwd._fwd_kernel, roles=("q", "kv", "kv", "q", None),
        q=_Descriptors(qr, qc, [64, D], q_layout),
        kv=_Descriptors(kr, kc, [BLOCK_N, D], kv_layout),
        setup=((S // BLOCK_M, problem.batch * problem.heads_q),
               dict(CAUSAL=problem.causal, BLOCK_N=BLOCK_N, NUM_BUF=2,
                    FOLD=problem.scale > 0, num_warps=4, maxnreg=_MAXNREG),
               (S, problem.heads_q, problem.group_size, problem.scale * LOG2E, *q_rc,
                *kv_rc)))


@functools.lru_cache(maxsize=16)
def _smem_layouts(dtype: torch.dtype, head_dim: int):
    gl = kernels().gl
    el = gl.float16 if dtype == torch.float16 else gl.bfloat16
    return (gl.NVMMASharedLayout.get_default_for([64, head_dim], el),
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, head_dim], el))


def forward_plan(problem, q, k, v) -> _Plan:
    """The launch plan of a forward call that `use_gluon` accepted (callers that cache their
    route per layout keep it, and pass it to `launch_forward`)."""
    return _forward_plan(problem, _layout(q, k, v)[0])


def launch_forward(problem, q, k, v, plan: _Plan | None = None):
    """``out`` (like q) and ``lse`` (B, Hq, S) float32, natural log, as the ``tl`` forward."""
    B, H, S, D = q.shape
    out = torch.empty_like(q)  # keeps q's strides, so q's 2-D view
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    plan = plan or forward_plan(problem, q, k, v)
    plan.launch((q, k, v, out, lse))
    return out, lse


@functools.lru_cache(maxsize=256)
def _backward_plan(problem, views):
    """Descriptor makers and the launch of one backward signature."""
    (q_view, do_view), kv_view = views
    D, S, causal = problem.head_dim, problem.seqlen_q, problem.causal
    q_layout, kv_layout = _smem_layouts(problem.dtype, D)
    (qr, qc, *q_rc), (dr, dc, *do_rc), (kr, kc, *kv_rc) = q_view, do_view, kv_view
    return _Plan(
        kernels().bwd._bwd_kernel, roles=("q", "kv", "kv", "do", "dq", "stats", None, None),
        q=_Descriptors(qr, qc, [64, D], q_layout), do=_Descriptors(dr, dc, [64, D], q_layout),
        dq=_Descriptors(qr, qc, [64, 64], _dq_layout()),
        kv=_Descriptors(kr, kc, [BLOCK_N, D], kv_layout),
        stats=_Descriptors(2 * problem.batch * problem.heads_q, S, [1, 64], _stats_layout()),
        setup=((S // BLOCK_N, problem.batch * problem.heads_kv),
               dict(CAUSAL=causal, NUM_BUF=2, DQ_LAG=_DQ_LAG[D, causal], num_warps=4,
                    maxnreg=_MAXNREG),
               (S, problem.heads_q, problem.group_size, problem.scale * LOG2E, problem.scale,
                *q_rc, *do_rc, *kv_rc, kc)))


def backward_plan(problem, q, k, v, dout) -> _Plan:
    """As `forward_plan`, for a backward call that `use_gluon_backward` accepted."""
    return _backward_plan(problem, _layout(q, k, v, dout)[0])


def launch_backward(problem, q, k, v, out, lse, dout, plan: _Plan | None = None, dlse=None):
    """``(dq, dk, dv)`` as the ``tl`` backward computes them, dQ summed in float32: the prep
    kernel (delta, lse2, zeroing dQ), this kernel, dQ's cast. After a first call through
    the keyed launch sites, the plan keeps those two sites and launches all three directly
    with one stream lookup: this runs on the autograd engine's thread, where every
    microsecond of Python counts twice (docs/tuning.md). ``dlse`` (the gradient reaching
    lse, or None) enters through delta in the prep kernel: a call with it launches the prep
    through its key and keeps no sites."""
    plan = plan or backward_plan(problem, q, k, v, dout)
    dq_acc = torch.empty_like(q, dtype=torch.float32)  # keeps q's strides, so q's 2-D view
    stats = torch.empty((2, problem.batch * problem.heads_q, problem.seqlen_q),
                        dtype=torch.float32, device=q.device)  # S % BLOCK_M == 0: no pad
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    tensors = (q, k, v, dout, dq_acc, stats, dk, dv)
    steps = plan.steps
    same = fresh_layout(q, out, lse)  # then the plan's key fixes the prep and cast sites' too
    if steps and same and dlse is None and fast_launches():
        stream = current_stream(q.device.index)
        steps[0].run(stream, out, dout, lse, stats, dq_acc, lse)
        plan.direct(tensors, stream)
        steps[1].run(stream, dq_acc, dq)
        return dq, dk, dv
    if dlse is None:
        prep = launch_prep(q, out, lse.contiguous(), dout, stats, dq_acc)
    else:
        prep = launch_prep(q, out, lse.contiguous(), dout, stats, dq_acc,
                           dlse=dlse.contiguous())
    plan.launch(tensors)
    cast = cast_dense(dq_acc, dq)
    if (steps is None and same and dlse is None and plan.direct and prep.compiled
            and cast.compiled):
        plan.steps = (prep, cast)  # plan.direct set: fast launches were on
    return dq, dk, dv


@functools.lru_cache(maxsize=1)
def _dq_layout():
    gl = kernels().gl
    return gl.NVMMASharedLayout.get_default_for([64, 64], gl.float32)


@functools.lru_cache(maxsize=1)
def _stats_layout():
    """Unswizzled: the rows are read as (1, 64) tiles in the MMA accumulator's layout."""
    return kernels().gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


__all__ = ["backward_plan", "forward_plan", "launch_backward", "launch_forward", "use_gluon",
           "use_gluon_backward"]
