"""The `triton` backend: capabilities, availability and the choice of launch path.

Two load paths: plain pointers (any strides, any CUDA GPU Triton supports, the CPU
interpreter) and Hopper tensor descriptors (TMA), chosen per call where the device, the
Triton version and every tensor's layout allow them. ``ATTNKIT_TRITON_TMA=0`` forces the
pointer path (``=1`` asks for TMA and raises where it cannot apply), for comparisons.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

from attnkit.backend import Backend, Capabilities
from attnkit.backend_utils import LaunchCache
from attnkit.paged import check_table

from ._backward import BackwardSites, launch_backward, launch_backward_varlen
from ._configs import (
    KernelConfig,
    _arch,
    backward_configs,
    forward_config,
    interpreting,
    padded_head_dim,
    path_enabled,
    short_seqlen,
)
from ._forward import launch_forward, launch_forward_varlen
from ._hopper import _BWD_ENV as _GLUON_BWD_ENV
from ._hopper import _ENV as _GLUON_ENV
from ._hopper import backward_plan, forward_plan, use_gluon, use_gluon_backward
from ._hopper import launch_backward as launch_backward_hopper
from ._hopper import launch_forward as launch_forward_hopper
from ._launcher import layout_key
from ._triton_internals import ensure_allocator as _ensure_allocator
from ._triton_internals import launch_path
from .decode import decode_forward, num_splits, use_split_kv
from .paged_append import append_checked, takes

_APPEND_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_TMA_ENV = "ATTNKIT_TRITON_TMA"


def _triton_has_descriptors() -> bool:
    import triton.language as tl

    return hasattr(tl, "make_tensor_descriptor") and hasattr(__import__("triton"),
                                                             "set_allocator")


def _tma_layout_ok(t: torch.Tensor) -> bool:
    """TMA: 16-byte aligned base and strides, unit stride on the head dim."""
    st = t.stride()
    if st[-1] != 1 or t.data_ptr() & 15:
        return False
    es = t.element_size()
    return not any((s * es) & 15 for s in st[:-1])


@functools.lru_cache(maxsize=1024)
def _tma_problem_reasons(problem, interpret: bool) -> tuple[str, ...]:
    """Why TMA cannot apply, from the problem alone (cached: this runs on every call)."""
    reasons = []
    if interpret or problem.device.type != "cuda":
        reasons.append("not on a CUDA device")
    elif _arch(problem.device) < 90:
        reasons.append("needs sm90+")
    elif not _triton_has_descriptors():
        reasons.append("this Triton has no tl.make_tensor_descriptor")
    if padded_head_dim(problem.head_dim) != problem.head_dim:
        reasons.append(f"head dim {problem.head_dim} is not a power of two >= 16")
    return tuple(reasons)


def use_tma(problem, *tensors: torch.Tensor) -> bool:
    """Whether this call takes the tensor-descriptor path."""
    def reasons():
        found = list(_tma_problem_reasons(problem, interpreting()))
        if not all(_tma_layout_ok(t) for t in tensors):
            found.append("a tensor is not 16-byte aligned with unit head-dim stride")
        return found

    if not path_enabled(_TMA_ENV, "TMA", reasons):
        return False
    _ensure_allocator()
    return True


@dataclass(frozen=True, slots=True)
class GluonRoute:
    """The sm_90 warp-specialized kernels (`_hopper`), with their launch plan (forward or
    backward). Their descriptors are host-side: no device allocator is needed."""

    plan: object
    tma = False  # not a field: the `tl` routes' flag, False here


@dataclass(frozen=True, slots=True)
class ForwardRoute:
    """The `tl` forward kernel with its config, through tensor descriptors or not."""

    config: KernelConfig
    tma: bool


@dataclass(frozen=True, slots=True)
class BackwardRoute:
    """The `tl` backward kernels (dK/dV and dQ configs), their launch sites kept after the
    first call, through tensor descriptors or not."""

    dkdv: KernelConfig
    dq: KernelConfig
    kept: BackwardSites
    tma: bool


@functools.lru_cache(maxsize=1024)
def _decode_splits(problem, interpret: bool) -> int:
    """Key splits of the split-KV decode kernel for this problem, 0 where it does not apply
    (cached per problem: the rule walks candidate split counts). Dropout takes the `tl`
    forward, which has the mask."""
    return num_splits(problem) if use_split_kv(problem) and not problem.dropout_p else 0


@functools.lru_cache(maxsize=1024)
def _paged_splits(problem, interpret: bool) -> int:
    return num_splits(problem)


class TritonBackend(Backend):
    name = "triton"
    description = ("fused Triton kernels: online-softmax forward, recomputing backward "
                   "(dK/dV per key block, dQ per query block); TMA on Hopper, and a "
                   f"warp-specialized Gluon forward on sm_90; {launch_path()}")
    capabilities = Capabilities(
        devices=frozenset({"cuda", "cpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        head_dim_min=1,
        head_dim_max=256,
        deterministic=True,  # no atomics: dK/dV are summed over GQA groups in registers
        # Triton's supported range; the tables assume cp.async and bf16 mma.
        cuda_capability_min=(8, 0),
        lse_grad=True,  # dlse enters through delta in the backward's prep kernel
        varlen=True,  # the pointer path's kernels; see `forward_varlen`
        paged=True,  # the split-KV kernel looks pages up in the block table (decode.py)
        paged_checks=True,  # and checks each entry it reads (CHECK_PAGES; the interpreter:
        # forward_paged, on the host)
        dropout=True,  # in the `tl` kernels (`_dropout`); see `_forward_route`
    )

    def availability(self) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        if interpreting():
            return True, "TRITON_INTERPRET=1: kernels run on CPU tensors through the interpreter"
        try:
            if not torch.cuda.is_available():
                return False, "no CUDA device (set TRITON_INTERPRET=1 to run on CPU, slowly)"
        except Exception as e:  # never raise from availability
            return False, f"CUDA check failed: {e}"
        return True, ""

    def conformance_modules(self) -> tuple[str, ...]:
        return ("attnkit_triton.suite_launch_paths",)

    def not_supported_reasons(self, problem) -> list[str]:
        reasons = super().not_supported_reasons(problem)
        if problem.device.type == "cpu" and not interpreting():
            reasons.append("cpu tensors run only under the Triton interpreter "
                           "(TRITON_INTERPRET=1)")
        if problem.device.type == "cuda" and interpreting():
            reasons.append("TRITON_INTERPRET=1 runs kernels on CPU tensors; cuda tensors "
                           "need the interpreter off")
        return reasons

    def forward(self, problem, q, k, v, seqlens_k, dropout=None):
        splits = _decode_splits(problem, interpreting())
        if splits:  # decoding: split the keys so every SM reads the cache
            with _on_device(q):
                return decode_forward(problem, q, k, v, seqlens_k, splits=splits)
        layout = layout_key(q, k, v, seqlens_k)
        key = ("forward", problem, layout, os.environ.get(_GLUON_ENV),
               os.environ.get(_TMA_ENV))
        route = _route(key, lambda: self._forward_route(problem, q, k, v))
        with _on_device(q):
            if type(route) is GluonRoute:  # sm_90 dense training shapes: warp-specialized
                return launch_forward_hopper(problem, q, k, v, route.plan)
            return launch_forward(problem, q, k, v, seqlens_k, route.config, route.tma, layout,
                                  dropout)

    def forward_paged(self, problem, q, k_pages, v_pages, block_table, seqlens_k):
        # Every paged call, decoding or several queries, takes the split-KV kernel (row
        # blocks cover any query count); splits from the table's capacity, as for S_max.
        if interpreting():  # CHECK_PAGES traps on a GPU only
            check_table(k_pages, block_table, seqlens_k, 0, "host")
        with _on_device(q):
            return decode_forward(problem, q, k_pages, v_pages, seqlens_k,
                                  splits=_paged_splits(problem, interpreting()),
                                  block_table=block_table)

    def append_paged(self, k_pages, v_pages, block_table, cache_seqlens, k_new, v_new):
        # One launch for the checks and the write (paged_append.py); long appends (chunked
        # prefill) and dtypes the kernels do not take are the core's.
        if k_pages.dtype not in _APPEND_DTYPES or not takes(block_table, k_new.shape[2]):
            return None
        with _on_device(k_pages):
            return append_checked(k_pages, v_pages, block_table, cache_seqlens, k_new, v_new)

    def _forward_route(self, problem, q, k, v) -> GluonRoute | ForwardRoute:
        # The warp-specialized Gluon kernels have no dropout mask: dropout takes `tl`'s. The
        # key fixes the layout, so the launch plan too.
        if not problem.dropout_p and use_gluon(problem, q, k, v):
            return GluonRoute(forward_plan(problem, q, k, v))
        return self._tl_forward_route(problem, q, k, v)

    def _tl_forward_route(self, problem, q, k, v) -> ForwardRoute:
        cfg = forward_config(problem.head_dim, problem.causal, q.dtype, q.device,
                             _short(problem), problem.dropout_p > 0)
        return ForwardRoute(cfg, cfg.tma and use_tma(problem, q, k, v))

    # Varlen takes the `tl` kernels, through pointers or through tensor descriptors built
    # per sequence in the kernel (bounded by its length, so rows past it load as 0), with
    # the dense tables' tiles. Not the Gluon kernels: their host-side descriptors span whole
    # (batch, head) planes, so a sequence's boundary tiles would load its neighbour's rows.
    # Dropout too: the kernels' sequence index is the mask's batch index.
    def forward_varlen(self, problem, q, k, v, cu_seqlens_q, cu_seqlens_k, dropout=None):
        key = ("forward_varlen", problem, layout_key(q, k, v), os.environ.get(_TMA_ENV))
        route = _route(key, lambda: self._tl_forward_route(problem, q, k, v))
        with _on_device(q):
            return launch_forward_varlen(problem, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                         route.config, route.tma, dropout)

    def backward_varlen(self, problem, q, k, v, out, lse, dout, cu_seqlens_q, cu_seqlens_k,
                        dlse=None, dropout=None):
        key = ("backward_varlen", problem, layout_key(q, k, v, dout), os.environ.get(_TMA_ENV))
        route = _route(key, lambda: self._tl_backward_route(problem, q, k, v, dout))
        with _on_device(q):
            return launch_backward_varlen(problem, q, k, v, out, lse, dout, cu_seqlens_q,
                                          cu_seqlens_k, route.dkdv, route.dq, route.tma, dlse,
                                          dropout)

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k, dlse=None, dropout=None):
        layout = layout_key(q, k, v, dout, seqlens_k)
        key = ("backward", problem, layout, os.environ.get(_GLUON_BWD_ENV),
               os.environ.get(_TMA_ENV))
        route = _route(key, lambda: self._backward_route(problem, q, k, v, dout))
        with _on_device(q):
            if type(route) is GluonRoute:
                return launch_backward_hopper(problem, q, k, v, out, lse, dout, route.plan,
                                              dlse)
            return launch_backward(problem, q, k, v, out, lse, dout, seqlens_k, route.dkdv,
                                   route.dq, route.tma, layout, route.kept, dlse, dropout)

    def _backward_route(self, problem, q, k, v, dout) -> GluonRoute | BackwardRoute:
        if not problem.dropout_p and use_gluon_backward(problem, q, k, v, dout):
            return GluonRoute(backward_plan(problem, q, k, v, dout))
        return self._tl_backward_route(problem, q, k, v, dout)

    def _tl_backward_route(self, problem, q, k, v, dout) -> BackwardRoute:
        dkdv_cfg, dq_cfg = backward_configs(problem.head_dim, problem.causal, q.dtype,
                                            q.device, _short(problem), problem.dropout_p > 0)
        return BackwardRoute(dkdv_cfg, dq_cfg, BackwardSites(),
                             use_tma(problem, q, k, v, dout))


#: Each call's route by (pass, problem, `layout_key` of the tensors the checks read, the path
#: switches' environment values): the checks are the same for every call of a signature, and
#: redoing them was a tenth of a short training step's host time.
_routes = LaunchCache(1024)


def _route(key, make):
    """The remembered route for ``key``, else ``make()``'s (which runs the checks)."""
    route = _routes.get(key)
    if route is None:
        route = _routes.put(key, make())
    elif route.tma:  # Triton's allocator for device-side descriptors is per thread
        _ensure_allocator()
    return route


def _short(problem) -> bool:
    return max(problem.seqlen_q, problem.seqlen_k) <= short_seqlen(problem.head_dim)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device (switching
    only when needed; the switch costs microseconds on every call)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
