"""Launching compiled kernels without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` re-derives every argument's specialization, builds a
cache key and options and looks the kernel up on each call: 31 us per launch on the H100
host, against 8 us for the compiled kernel's own launcher (docs/tuning.md). A decoding step
launches one kernel and a backward three, each worth tens of microseconds of GPU time, so
that cost is the GPU waiting.
`Sites` goes one step further for call sites that repeat a signature (every training and
decoding step): the key is built once per call from the caller's tensors, not per argument.

`FastKernel` holds a kernel and the names of its constexprs; its `direct` launches a site's
first call through Triton's own path (which compiles or finds the kernel and returns it) and
keeps a `DirectLaunch`, which later calls the compiled kernel's launcher with the same
arguments Triton would pass. Launch hooks (profilers) and the interpreter always take
Triton's path, and so does every launch on a Triton release whose launcher layout was not
tested (`_triton_internals`, which holds every read of Triton's private launcher). A probe
kernel checks once per process that the direct call computes what Triton's path does; if
not, everything takes Triton's path, with a warning.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from attnkit.backend_utils import current_stream

from ._configs import interpreting
from ._triton_internals import (
    c_launcher,
    hooks_set,
    internals_allowed,
    jit_constexpr_names,
    run_prefix,
    tensordesc_launcher,
)

#: ``ATTNKIT_TRITON_FAST_LAUNCH=0`` (read at import) sends every launch through Triton's path,
#: for comparisons; tests flip ``ENABLED``.
ENABLED = os.environ.get("ATTNKIT_TRITON_FAST_LAUNCH") != "0"
#: Sites per kernel before the cache is emptied (distinct shapes, layouts, scales).
_MAX_ENTRIES = 512
_probe_state: bool | None = None  # None: not yet probed
_raw_state = False  # whether the probe found the C launcher callable as `c_launcher` lays it out


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a slower constexpr function in newer
    Triton)."""
    return -(-a // b)


class FastKernel:
    """A jit function whose launch sites go direct (`direct`): every runtime argument is
    passed positionally, every constexpr by name."""

    def __init__(self, fn):
        self.fn = fn
        # None: the interpreter's function or an untested Triton, always launched through
        # Triton's path
        self.constexpr_names = jit_constexpr_names(fn) or ()

    def direct(self, grid, args, constexprs, fixed=()) -> DirectLaunch:
        """Launch once through Triton's path, as ``self.fn[grid](*args, *fixed,
        **constexprs)``, and return a `DirectLaunch` for later calls of this launch site,
        which pass only ``args``: the caller's own key must fix ``fixed``, the grid, the
        constexprs and the specialization of ``args`` (tensor dtypes and 16-byte alignment,
        every other argument's value). Triton's path takes arguments `launch` cannot key
        (Gluon's tensor descriptors)."""
        _fast_enabled()  # the one-time probe runs here, on a first call, not on a later one
        return DirectLaunch(self, grid, constexprs, self.fn[grid](*args, *fixed, **constexprs),
                            fixed)


class DirectLaunch:
    """One launch site with its kernel, grid, constexprs and trailing arguments (``fixed``:
    strides, sizes, scales) resolved: ``site(*args)`` calls the compiled kernel's launcher
    with ``args`` and no key at all. Pointers may be passed as ints (a workspace's parts,
    without building tensor views) while `fast_launches` is true."""

    def __init__(self, kernel: FastKernel, grid, constexprs, compiled, fixed=()):
        self.kernel, self.grid, self.constexprs, self.compiled = kernel, grid, constexprs, compiled
        self.fixed = tuple(fixed)
        self.tail = (*self.fixed, *(constexprs[n] for n in kernel.constexpr_names))
        self.gx, self.gy, self.gz = (tuple(grid) + (1, 1))[:3]
        self.raw = _raw_launcher(compiled)
        self.prefix = run_prefix(compiled)

    def __call__(self, *args):
        if self.compiled is None or not _fast_enabled():
            return self.kernel.fn[self.grid](*args, *self.fixed, **self.constexprs)
        self.run(current_stream(torch.cuda.current_device()), *args)
        return self.compiled

    def run(self, stream: int, *args):
        """Launch directly on ``stream``; the caller checked `fast_launches` and that
        ``compiled`` is set (one check per step instead of one per launch)."""
        raw = self.raw
        if raw is not None:
            raw[0](self.gx, self.gy, self.gz, stream, *raw[1], *args, *self.tail)
            return
        self.compiled.run(self.gx, self.gy, self.gz, stream, *self.prefix, *args, *self.tail)


class TmaLaunch:
    """A direct launch of a kernel that takes host tensor descriptors (the Gluon kernels).

    Triton 3.6's launcher encodes every descriptor into a ``CUtensorMap`` on each call, through
    a Python wrapper and a driver call per descriptor (five per Gluon backward launch). An
    encoding depends only on the base address and the descriptor's geometry, which the
    site's key fixes, so this keeps each argument position's encodings by base address and
    calls the C launcher with them. ``wrap`` returns None where Triton's launcher is not laid
    out as this expects; the site then keeps Triton's wrapper.
    """

    @classmethod
    def wrap(cls, site: DirectLaunch, makers) -> TmaLaunch | None:
        """``makers[i]`` builds position ``i``'s descriptor from a tensor (None: a plain
        argument passed as given)."""
        found = tensordesc_launcher(site.compiled,
                                    {i for i, m in enumerate(makers) if m is not None})
        return None if found is None else cls(site, makers, *found)

    def __init__(self, site: DirectLaunch, makers, launcher, expand, metas, middle):
        self.site, self.launcher, self.expand = site, launcher, expand
        self.grid = (site.gx, site.gy, site.gz)
        self.middle = middle
        metas = iter(metas)
        # per position: None (plain), or (maker, its descriptor's metadata, encodings by address)
        self.slots = [None if m is None else (m, next(metas), {}) for m in makers]

    def __call__(self, tensors, stream: int | None = None) -> None:
        """Launch on ``stream`` (default: the current one); the caller checked
        `fast_launches`."""
        if stream is None:
            stream = current_stream(torch.cuda.current_device())
        args = [*self.grid, stream, *self.middle]
        for t, slot in zip(tensors, self.slots):
            if slot is None:
                args.append(t)
                continue
            maker, meta, encodings = slot
            ptr = t.data_ptr()
            encoded = encodings.get(ptr)
            if encoded is None:
                if len(encodings) >= _MAX_ENTRIES:
                    encodings.clear()
                encoded = encodings[ptr] = self.expand(maker(t), meta)
            args.extend(encoded)
        self.launcher(*args, *self.site.tail)


def _raw_launcher(compiled):
    """`c_launcher`, called without Triton's Python wrapper (a few us per launch, twice that
    on the autograd engine's thread), where the probe found that this computes what
    Triton's path does; else None."""
    return c_launcher(compiled) if _raw_state else None


def layout_key(*tensors) -> tuple:
    """What a kernel's specialization reads from tensor arguments besides the problem: each
    one's dtype, strides and address modulo 16 (None for an absent one)."""
    return tuple(None if t is None else (t.dtype, t.stride(), t.data_ptr() & 15)
                 for t in tensors)


class Sites:
    """One kernel's launch sites by call signature. The first call of a signature goes
    through `FastKernel` and keeps a `DirectLaunch`; later calls launch it with no per-argument
    key: a training step repeats a few signatures, and keying ~30 arguments per launch was
    most of a short problem's host time (docs/tuning.md)."""

    def __init__(self, kernel: FastKernel):
        self.kernel = kernel
        self.sites: dict = {}

    def launch(self, key, args, setup) -> DirectLaunch:
        """Launch with ``args`` followed by the site's fixed arguments. ``key`` must fix the
        grid, the constexprs, the fixed arguments and the specialization of every argument
        in ``args`` that is not a fresh allocation (see `layout_key`); ``setup()`` returns
        ``(grid, constexprs, fixed)`` and runs only for a new key. Returns the site, which a
        caller whose own cache fixes the key may launch again itself."""
        site = self.sites.get(key)
        if site is not None:
            site(*args)
            return site
        grid, constexprs, fixed = setup()
        if len(self.sites) >= _MAX_ENTRIES:
            self.sites.clear()
        site = self.sites[key] = self.kernel.direct(grid, args, constexprs, fixed)
        return site


def fast_launches() -> bool:
    """Whether launches go directly to compiled kernels (else through Triton's path, where
    every pointer must be a tensor)."""
    return _fast_enabled()


def _fast_enabled() -> bool:
    if not ENABLED or interpreting() or hooks_set():
        return False
    if _probe_state is None:
        _probe()
    return _probe_state


@triton.jit
def _probe_kernel(X, Y, n, a, C: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < n
    tl.store(Y + i, tl.load(X + i, mask=ok) * a + C + n, mask=ok)


def _probe() -> None:
    """Launch a small kernel through Triton's path, its compiled launcher and (`_raw_state`)
    the C launcher under it, and compare (once per process). An untested Triton is not
    probed: its launches take Triton's path, as `_triton_internals.launch_path` says."""
    global _probe_state, _raw_state
    _probe_state = False  # while probing, and for good if it fails
    if not internals_allowed():
        return
    try:
        x = torch.arange(8, dtype=torch.float32, device="cuda")
        y_ref, y_fast, y_raw = (torch.full_like(x, -1.0) for _ in range(3))
        compiled = _probe_kernel[(1,)](x, y_ref, 5, 0.5, C=3.0, BLOCK=8)
        device = triton.runtime.driver.active.get_current_device()
        stream = triton.runtime.driver.active.get_current_stream(device)
        compiled.run(1, 1, 1, stream, *run_prefix(compiled), x, y_fast, 5, 0.5, 3.0, 8)
        same = torch.equal(y_ref, y_fast)
        raw = c_launcher(compiled)
        if raw is not None:
            try:  # a launcher that refuses these arguments is simply not used
                raw[0](1, 1, 1, stream, *raw[1], x, y_raw, 5, 0.5, 3.0, 8)
                _raw_state = torch.equal(y_ref, y_raw)
            except Exception:
                pass
    except Exception as e:  # a Triton whose launcher takes other arguments
        warnings.warn(f"attnkit-triton: direct kernel launches disabled ({type(e).__name__}: "
                      f"{e}); every launch takes Triton's slower path", RuntimeWarning,
                      stacklevel=3)
        return
    if not same:
        warnings.warn("attnkit-triton: direct kernel launches disabled (the probe kernel "
                      "computed something else than through Triton's path)", RuntimeWarning,
                      stacklevel=3)
        return
    _probe_state = True
