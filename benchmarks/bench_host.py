"""The bench's own cells, with the host side of every timed call recorded.

`attnkit bench` sometimes reads a triton cell well above its kernel time (decode at 1k,
bf16 D=128 causal fwd+bwd at 512/1k) while `decode_modes.py` never does. This runs the bench's
`run_decode` / `run_grid` unchanged, with `timing._time_cuda` wrapped so that each timed
iteration also records its host time (flush launch to end-event record) and the SM clock is
read before and after each cell. A slow median with host time per iteration above the GPU's
(flush + kernels) means the GPU waited for the host; a slow median with fast host iterations
means the GPU itself was slower. Usage: ``python benchmarks/bench_host.py [--grid] --out F``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from attnkit.bench import contenders as contenders_mod
from attnkit.bench import runner, timing
from attnkit.bench.grid import DecodeSpec, GridSpec
from attnkit.bench.progress import Progress

_iters: list[list[float]] = []


def _time_cuda_recording(fn, device, reps):
    flush = timing._flush_buffer(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    host, fn_host = [], []
    for start, end in events:
        t0 = time.perf_counter()
        flush.zero_()
        start.record()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        end.record()
        host.append((time.perf_counter() - t0) * 1e6)
        fn_host.append((t2 - t1) * 1e6)
    torch.cuda.synchronize(device)
    _iters.append([host, fn_host])
    return [s.elapsed_time(e) for s, e in events]


def _clock() -> int | None:
    try:
        return torch.cuda.clock_rate()
    except Exception:
        return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grid", action="store_true", help="bf16 D=128 causal 512/1k grid cells")
    p.add_argument("--backends", default="sdpa-flash,cupy,triton")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    timing._time_cuda = _time_cuda_recording
    dev = torch.device("cuda", 0)
    names = a.backends.split(",")
    conts, _ = contenders_mod.select(dev, torch.bfloat16, 128, names)
    real_run = runner._Session.run

    def run(self, cell, body):
        c0 = _clock()
        n0 = len(_iters)
        out = real_run(self, cell, body)
        c1 = _clock()
        timed = _iters[n0:]
        host, fn_host = timed[-1] if timed else ([], [])
        out.notes.append(json.dumps({
            "clock_mhz": [c0, c1],
            "host_iter_us": [round(statistics.median(host), 1),
                             round(sorted(host)[int(0.9 * len(host))], 1)] if host else None,
            "fn_host_us": [round(statistics.median(fn_host), 1),
                           round(max(fn_host), 1)] if fn_host else None}))
        return out

    runner._Session.run = run
    if a.grid:
        spec = GridSpec(seqlens=(512, 1024), head_dims=(128,), causal=(True,),
                        dtypes=("bf16",), modes=("fwd_bwd",), tokens=16384, model_dim=2048)
        cells = runner.run_grid(spec, conts, dev, Progress(enabled=False))
    else:
        spec = DecodeSpec(cache_lens=(1024, 4096))
        cells = runner.run_decode(spec, conts, dev, Progress(enabled=False))
    rows = []
    for c in cells:
        d = json.loads(c.notes[-1]) if c.notes else {}
        rows.append(dict(backend=c.backend, mode=c.mode, sk=c.seqlen_k, us=c.ms and c.ms * 1e3,
                         us_min=c.ms_min and c.ms_min * 1e3, reps=c.reps,
                         ratio=c.ratio_vs_sdpa_flash, **d))
        print(f"{c.backend:11s} {c.mode:7s} {c.seqlen_k:5d} med {rows[-1]['us']:7.1f} "
              f"min {rows[-1]['us_min']:7.1f} x{c.ratio_vs_sdpa_flash or 0:.3f} "
              f"host/iter {d.get('host_iter_us')} fn {d.get('fn_host_us')} "
              f"clk {d.get('clock_mhz')}", flush=True)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
