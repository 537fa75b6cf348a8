"""Everything this plugin reads from Triton beyond its public API, behind one version gate.

- Direct launches (`_launcher`) call a compiled kernel's launcher with the arguments Triton's
  own wrapper would pass, which needs the layout of Triton's private launcher: the
  ``CompiledKernel.run`` convention, its C launcher's argument format and the closure of
  its tensor-descriptor wrapper.
- The Gluon plan (`_hopper`) copies a checked TMA descriptor's fields to make the next one.
- The ``tl`` TMA path needs a scratch allocator, set only where the caller has none: Triton
  keeps it in a private ContextVar.
- The Gluon backward's TMA reduce-add is a private builder call on Triton 3.6, which builds
  the op but does not name it in Gluon.

These are read only on the Triton releases they were tested with (`TESTED_TRITON`: 3.6.x on
the H100 and H200). Elsewhere every kernel launches through Triton's public path
(``kernel[grid](...)``, ~23 us more per launch on the H100 host), the allocator is set with
``triton.set_allocator`` and the Gluon backward runs only where Gluon names the op;
`launch_path` says which, and `attnkit backends` shows it. ``ATTNKIT_TRITON_INTERNALS=1``
reads them on an untested release too, to test it (the launch probe still checks);
``=0`` on none.
"""

from __future__ import annotations

import inspect
import os
import sys
from contextvars import ContextVar

import torch
import triton

#: Triton releases (major.minor) the private reads below were tested with on a GPU.
TESTED_TRITON = ("3.6",)
_ENV = "ATTNKIT_TRITON_INTERNALS"
#: The C launcher's leading arguments in Triton 3.6 (grid, stream, function, cooperative, PDL,
#: two scratch buffers, packed and launch metadata, two hooks): what `_middle` fills in.
_BASE_ARGS_FORMAT = "iiiKKppOOOOOO"


def release(version: str) -> str:
    """``major.minor`` of a Triton version string (``3.6.0+git1234`` -> ``3.6``)."""
    return ".".join(version.split("+")[0].split(".")[:2])


def gate_reason(version: str, mode: str = "auto") -> str:
    """Why Triton ``version``'s internals are not read under ``ATTNKIT_TRITON_INTERNALS`` =
    ``mode``; empty where they are."""
    if mode == "0":
        return f"{_ENV}=0"
    if mode == "1" or release(version) in TESTED_TRITON:
        return ""
    return (f"Triton {version} is not a tested release ({', '.join(TESTED_TRITON)}; "
            f"{_ENV}=1 to try it)")


#: Read at import: every launch site's path depends on it.
_REASON = gate_reason(triton.__version__, os.environ.get(_ENV, "auto"))


def internals_reason() -> str:
    """Why this process does not read Triton's internals; empty where it does."""
    return _REASON


def internals_allowed() -> bool:
    return not _REASON


def launch_path() -> str:
    """One line for `attnkit backends`: how kernels launch with this Triton."""
    if _REASON:
        return f"kernels launch through Triton's public path: {_REASON}"
    return f"direct kernel launches (Triton {triton.__version__})"


# -- launcher layout -----------------------------------------------------------------------


def jit_constexpr_names(fn) -> tuple[str, ...] | None:
    """Names of a jit function's parameters from its first constexpr on (which must all be
    constexprs), or None where they are not read (the interpreter, the gate)."""
    params = getattr(fn, "params", None)
    if params is None or _REASON:
        return None
    first = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))
    if not all(p.is_constexpr for p in params[first:]):
        raise TypeError(f"{fn.__name__}: constexpr parameters must come last")
    return tuple(p.name for p in params[first:])


def run_prefix(compiled) -> tuple | None:
    """What ``compiled.run`` takes between the stream and the kernel's arguments: the
    function, packed metadata, launch metadata and the two hooks (none here)."""
    if compiled is None or _REASON:
        return None
    return compiled.function, compiled.packed_metadata, None, None, None


def _middle(compiled) -> tuple:
    """What Triton 3.6's launcher wrapper passes its C launcher between the stream and the
    kernel's arguments: the function, cooperative and PDL flags, two scratch buffers (none
    here), the packed metadata, launch metadata and the two hooks (none here)."""
    run = compiled.run
    return (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
            compiled.packed_metadata, None, None, None)


def _plain_36(run) -> bool:
    """Whether ``run`` (a compiled kernel's launcher) is laid out as Triton 3.6's, with no
    scratch memory to allocate per launch: what both direct paths assume of its C launcher."""
    module = sys.modules.get(type(run).__module__)
    return (getattr(module, "_BASE_ARGS_FORMAT", None) == _BASE_ARGS_FORMAT
            and not getattr(run, "global_scratch_size", 1)
            and not getattr(run, "profile_scratch_size", 1))


def c_launcher(compiled):
    """``(C launcher, middle arguments)`` of a kernel without tensor descriptors (its
    launcher not wrapped in Python) on a `_plain_36` launcher, else None."""
    if _REASON:
        return None
    run = getattr(compiled, "run", None)
    launch = getattr(run, "launch", None)
    if launch is None or inspect.isfunction(launch) or not _plain_36(run):
        return None
    return launch, _middle(compiled)


def tensordesc_launcher(compiled, positions: set):
    """``(C launcher, descriptor encoder, descriptors' metadata, middle arguments)`` under the
    Python wrapper that Triton 3.6's launcher puts around a kernel taking host tensor
    descriptors at argument ``positions``, else None."""
    if _REASON:
        return None
    run = getattr(compiled, "run", None)
    inner = getattr(run, "launch", None)
    try:
        closure = inspect.getclosurevars(inner)
    except TypeError:  # not a Python function: a launcher without the wrapper
        return None
    launcher = closure.nonlocals.get("launcher")
    indices = closure.nonlocals.get("tensordesc_indices")
    metas = closure.nonlocals.get("tensordesc_meta")
    expand = inner.__globals__.get("make_tensordesc_arg")
    if (launcher is None or expand is None or indices != positions or not _plain_36(run)
            or not metas or not all(isinstance(m, dict) for m in metas)):
        return None
    return launcher, expand, metas, _middle(compiled)


def _hook_active(hook) -> bool:
    # Newer Triton keeps the hooks as (usually empty) HookChain objects, older ones as None.
    return hook is not None and bool(getattr(hook, "calls", True))


def hooks_set() -> bool:
    """Whether a launch hook (a profiler) is set, which only Triton's path calls."""
    rt = getattr(getattr(triton, "knobs", None), "runtime", None)
    if rt is None:
        return True  # a Triton without knobs: do not guess its launcher's convention
    return _hook_active(rt.launch_enter_hook) or _hook_active(rt.launch_exit_hook)


# -- Gluon ---------------------------------------------------------------------------------


def descriptor_fields(desc) -> dict | None:
    """A checked Gluon TMA descriptor's fields with the base left out, from which a copy with
    another base is the descriptor the constructor would build (its checks read only the
    geometry and the base's alignment); None where they are not read."""
    fields = getattr(desc, "__dict__", None)  # a Triton with slotted descriptors
    if fields is None or _REASON:
        return None
    return {**fields, "base": None}


def gluon_tma_reduce_add(tma):
    """Gluon's TMA reduce-add into global memory (``cp.reduce.async.bulk.tensor``), or None:
    Triton 3.6 builds the op but names it only in its builder, called here where the gate
    allows."""
    public = getattr(tma, "async_atomic_add", None)
    if public is not None or _REASON:
        return public
    from triton._C.libtriton import ir
    from triton.language.core import builtin

    @builtin
    def tma_add(tensor_desc, coord, src, _semantic=None):
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD,
                                                  tensor_desc.handle, coord, src.handle)

    return tma_add


# -- scratch allocator ---------------------------------------------------------------------


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


_ALLOCATOR_VAR: tuple | None = None  # (Triton's "no allocator" value, its ContextVar)
#: Whether ours was set in this context: follows Triton's ContextVar across threads and tasks.
_allocator_set: ContextVar[bool] = ContextVar("attnkit_triton_allocator_set", default=False)


def ensure_allocator() -> None:
    """Device-side descriptors need global scratch memory from a host allocator. Triton keeps
    it in a ContextVar, so it is per thread: the autograd engine runs the backward on its own
    thread. Where the gate allows, set ours wherever none is set (a caller's own allocator is
    left alone); elsewhere set it once per context through the public API."""
    global _ALLOCATOR_VAR
    if _REASON:
        if not _allocator_set.get():
            triton.set_allocator(_alloc)
            _allocator_set.set(True)
        return
    if _ALLOCATOR_VAR is None:
        try:
            from triton.runtime._allocation import _NULL_ALLOCATOR, _allocator

            _ALLOCATOR_VAR = (_NULL_ALLOCATOR, _allocator)
        except ImportError:  # another Triton layout: setting it again is harmless
            _ALLOCATOR_VAR = ()
    if _ALLOCATOR_VAR and _ALLOCATOR_VAR[1].get() is not _ALLOCATOR_VAR[0]:
        return
    triton.set_allocator(_alloc)
