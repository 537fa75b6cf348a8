"""Medians of repeated calls (CUDA events on a GPU, ``time.perf_counter`` on a CPU) and peak
memory of one call.

The scheme is ``triton.testing.do_bench``'s: one call to compile / warm caches, one timed call
to estimate the cost, then enough warm-up calls to fill ``warmup_ms`` and enough timed calls
to fill ``rep_ms`` (at least ``min_reps``), with L2 flushed before each timed GPU call so a
small problem is not timed out of a warm cache. It is written here rather than imported so a
slow call (a materializing peer at 16k) costs a handful of calls instead of do_bench's
minimum of seven, and so the same code times CPUs.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Bytes zeroed before each timed GPU call: larger than any current GPU's L2 cache.
_FLUSH_BYTES = 256 << 20
_flush_buffers: dict[torch.device, torch.Tensor] = {}


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    reps: int


def _flush_buffer(device: torch.device) -> torch.Tensor:
    buf = _flush_buffers.get(device)
    if buf is None:
        buf = _flush_buffers[device] = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)
    return buf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        return _time_cuda(fn, device, 1)[0]
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _time_cuda(fn: Callable[[], object], device: torch.device, reps: int) -> list[float]:
    """Event pairs around each call, L2 flushed before each, one sync at the end (a sync per
    call would add launch latency to calls that should overlap with the CPU's work)."""
    flush = _flush_buffer(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def measure(fn: Callable[[], object], device: torch.device | str, *, warmup_ms: float = 25.0,
            rep_ms: float = 100.0, min_reps: int = 3, max_reps: int = 1000,
            first_call_done: bool = False) -> Timing:
    """The median and minimum time of ``fn()`` in milliseconds.

    ``first_call_done`` says the caller already ran ``fn`` once (e.g. to measure memory), so
    compilation and autotuning are behind us. A call slower than ``rep_ms`` is timed once
    (the estimate is the measurement): a materializing peer at 16k should cost seconds, not
    minutes.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not first_call_done:
        fn()
        _sync(device)
    estimate = max(_time_once(fn, device), 1e-3)
    if estimate >= rep_ms:
        return Timing(estimate, estimate, 1)
    for _ in range(min(max_reps, int(warmup_ms / estimate))):
        fn()
    _sync(device)
    reps = max(min_reps, min(max_reps, int(rep_ms / estimate)))
    if device.type == "cuda":
        times = _time_cuda(fn, device, reps)
    else:
        times = [_time_once(fn, device) for _ in range(reps)]
    return Timing(statistics.median(times), min(times), reps)



def time_cell(cell, fn: Callable[[], object], device, spec, first_call_done: bool = True
              ) -> Timing:
    """`measure` with ``spec``'s warm-up and repetitions; the median, minimum and repetition
    count are stored on ``cell`` (``ms``, ``ms_min``, ``reps``)."""
    t = measure(fn, device, warmup_ms=spec.warmup_ms, rep_ms=spec.rep_ms,
                min_reps=spec.min_reps, max_reps=spec.max_reps, first_call_done=first_call_done)
    cell.ms, cell.ms_min, cell.reps = t.median_ms, t.min_ms, t.reps
    return t

def peak_memory(fn: Callable[[], object], device: torch.device | str,
                baseline: int = 0) -> tuple[int, int] | None:
    """Run ``fn`` once and return ``(peak, extra)`` bytes allocated by torch on a CUDA device:
    the peak during the call minus ``baseline`` (pass what was allocated before the inputs
    were made, so ``peak`` counts inputs plus the call), and the peak minus what was allocated
    just before the call (what the call itself needed). None on devices whose allocator keeps
    no peak statistics (the call still runs)."""
    device = torch.device(device)
    if device.type != "cuda":
        fn()
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak - baseline, peak - before


def prepare(device: torch.device | str) -> None:
    """Allocate the L2 flush buffer up front, so it sits outside every memory measurement."""
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        _flush_buffer(device)


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e)
    return "out of memory" in msg.lower() or "CUDA_ERROR_OUT_OF_MEMORY" in msg


def is_sticky_cuda_error(e: BaseException) -> bool:
    """Errors after which the CUDA context is unusable for the rest of the process."""
    msg = str(e).lower()
    return any(s in msg for s in ("illegal memory access", "device-side assert",
                                  "unspecified launch failure", "misaligned address",
                                  "illegal instruction", "cudaerrorlaunchfailure"))


def release_memory(device: torch.device | str, collect: bool = False) -> None:
    """Give cached blocks back (so one contender's large buffers do not crowd the next);
    ``collect`` also runs the garbage collector, which costs tens of ms with torch loaded,
    so only after a failure, whose traceback may have held tensors in cycles."""
    if collect:
        gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()

