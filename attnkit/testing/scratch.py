"""Uninitialised memory made visible: while a backend runs, every allocation it gets
uninitialised from torch holds NaN.

`uninitialised_scratch` wraps torch's uninitialised factories (``torch.empty``,
``empty_like``, ``empty_strided``, ``Tensor.new_empty``, ``Tensor.new_empty_strided``) so
each result has every byte set to 0xFF: NaN in every float dtype, -1 in signed integers.
On CUDA it also fills the caching allocator's free blocks on the current stream, so
allocations made inside torch's own C++ code, which the wrappers cannot see, start from
NaN too. A backend that reads scratch it never wrote (an accumulator not zeroed, a partial
result of an empty split) then turns NaN, where with a fresh allocator it would have read
zeros by luck.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_FUNCTIONS = ("empty", "empty_like", "empty_strided")
_METHODS = ("new_empty", "new_empty_strided")

#: Bytes per allocation of the small pool (the caching allocator's 1 MiB limit).
_SMALL = 1 << 20


class ScratchLog:
    """What `uninitialised_scratch` filled: allocations through the wrappers, and bytes of
    the CUDA allocator's free blocks."""

    def __init__(self):
        self.allocations = 0
        self.cached_bytes = 0


def _fill(t: torch.Tensor) -> None:
    if t.device.type != "meta" and t.untyped_storage().nbytes():
        t.untyped_storage().fill_(0xFF)


def _wrap(fn, log: ScratchLog):
    @functools.wraps(fn)
    def filled(*args, **kwargs):
        t = fn(*args, **kwargs)
        if isinstance(t, torch.Tensor):
            _fill(t)
            log.allocations += 1
        return t

    return filled


def _fill_free_blocks(device: torch.device, reserve: int, log: ScratchLog) -> None:
    """Take every free block the allocator caches for the current stream (small-pool ones in
    1 MiB pieces, which keeps them in their pool), plus ``reserve`` fresh bytes in each pool,
    fill them all and give them back."""
    stream = torch.cuda.current_stream(device).cuda_stream
    sizes = []
    for seg in torch.cuda.memory_snapshot():
        if seg["device"] != device.index or seg["stream"] != stream:
            continue
        small = seg["segment_type"] == "small"
        for block in seg["blocks"]:
            if block["state"] == "inactive":
                n = block["size"]
                sizes += [_SMALL] * (n // _SMALL) + [n % _SMALL] if small else [n]
    sizes += [reserve] + [_SMALL] * 16
    held = []
    for n in sorted((n for n in sizes if n), reverse=True):
        block = torch.empty(n, dtype=torch.uint8, device=device)
        block.fill_(0xFF)
        held.append(block)
        log.cached_bytes += n
    del held  # back to the cache, filled


@contextlib.contextmanager
def uninitialised_scratch(device=None, reserve: int = 64 << 20):
    """Inside the block, torch's uninitialised allocations hold NaN (see the module).

    ``device``: with a CUDA device, also fill the caching allocator's free blocks of the
    current stream and ``reserve`` fresh bytes (for allocations larger than any cached
    block). Yields a `ScratchLog`. Not thread-safe: the wrappers are module attributes."""
    log = ScratchLog()
    saved_functions = {name: getattr(torch, name) for name in _FUNCTIONS}
    saved_methods = {name: getattr(torch.Tensor, name) for name in _METHODS}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        _fill_free_blocks(device, reserve, log)
    try:
        for name, fn in saved_functions.items():
            setattr(torch, name, _wrap(fn, log))
        for name, fn in saved_methods.items():
            setattr(torch.Tensor, name, _wrap(fn, log))
        yield log
    finally:
        for name, fn in saved_functions.items():
            setattr(torch, name, fn)
        for name, fn in saved_methods.items():
            setattr(torch.Tensor, name, fn)
