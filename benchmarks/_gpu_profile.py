"""What `bwd_vs_cudnn.py` and `fwd_bwd_gap.py` share: per-kernel device time of a few calls,
and their JSON with the bench's own environment record (device, clocks, versions, date)."""

from __future__ import annotations

import json

import torch

from attnkit.bench.environment import environment


def kernel_profile(fn, calls: int = 5):
    """``(per-kernel device us per call, their sum, wall us per call)`` over ``calls`` calls
    after one unprofiled call: a busy sum below the wall time means the GPU sat idle."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)  # torch >= 2.4; older: cuda_
        if us is None:
            us = e.self_cuda_time_total
        if us > 0:
            kernels[e.key[:60]] = us / calls
    return kernels, sum(kernels.values()), start.elapsed_time(end) * 1e3 / calls


def write_rows(path: str | None, rows: list, **meta) -> None:
    """``meta``: what the run compared (top-level keys beside the environment and rows)."""
    if path:
        with open(path, "w") as f:
            json.dump({"environment": environment(torch.device("cuda")), **meta, "rows": rows},
                      f, indent=1)


def record(path: str | None, rows, **meta) -> int:
    """Print each row of an iterable as it is measured, then `write_rows` them: 0 (exit)."""
    kept = []
    for row in rows:
        kept.append(row)
        print(row, flush=True)
    write_rows(path, kept, **meta)
    return 0
