"""Sustained forward (or fwd+bwd) at one shape, per dtype and contender, with the SM clock,
power draw and temperature sampled by ``nvidia-smi`` while it runs: says whether a gap
between dtypes or contenders is the clock.

    python benchmarks/power_probe.py --seqlen 4096 --head-dim 128 --seconds 4 --out probe.json

``--mode fwd_bwd`` times forward and backward together (FLOPs x 3.5, as in ``attnkit bench``).

Each (contender, dtype) segment runs back to back for ``--seconds`` (after a warm-up), in the
order given and then reversed, so a drift in temperature shows as a difference between the
two passes rather than between contenders. Throughput is from CUDA events over the segment.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch
from _gpu_profile import write_rows  # benchmarks/, beside this script

from attnkit.bench import contenders, grid
from attnkit.bench.environment import nvidia_smi

_SAMPLED = ("clocks.sm", "power.draw", "temperature.gpu")


class _Sampler(threading.Thread):
    """Polls nvidia-smi every ``period`` s; each sample is filed under the current label."""

    def __init__(self, index: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.index, self.period = index, period
        self.label, self.samples, self.stop = None, {}, False

    def run(self):
        while not self.stop:
            label = self.label
            got = nvidia_smi(self.index, _SAMPLED)
            if label is not None and label == self.label and "error" not in got:
                self.samples.setdefault(label, []).append([float(got[f]) for f in _SAMPLED])
            time.sleep(self.period)


def _step(contender, causal: bool, dout):
    """One call of ``contender`` (pinned SDPA kernels enter their context per call); with
    ``dout``, forward and ``autograd.grad`` (no accumulation into .grad between steps)."""
    def step(q, k, v):
        with contender.context():
            out = contender.attention(q, k, v, causal=causal)
            if dout is not None:
                torch.autograd.grad(out, (q, k, v), dout)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--contenders", default="triton,sdpa-cudnn")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--mode", choices=("fwd", "fwd_bwd"), default="fwd")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    S, D = a.seqlen, a.head_dim
    B, H = max(1, 16384 // S), 2048 // D
    grad = a.mode == "fwd_bwd"
    flops = grid.attention_flops(B, H, S, S, D, a.causal, a.mode)
    device = torch.device("cuda", torch.cuda.current_device())
    names = a.contenders.split(",")
    order = [(c, d) for d in a.dtypes.split(",") for c in names]
    picked = {}
    for dt in a.dtypes.split(","):
        chosen, left_out = contenders.select(device, grid.DTYPES[dt], D, names)
        if left_out:
            ap.error(f"{dt}: {left_out}")
        picked.update({(c.name, dt): c for c in chosen})
    sampler = _Sampler(device.index)
    sampler.start()
    rows = []
    for rnd, seq in enumerate((order, order[::-1])):
        for name, dt in seq:
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, dout = (torch.randn(B, H, S, D, device="cuda", dtype=grid.DTYPES[dt],
                                         generator=gen) for _ in range(4))
            if grad:
                q, k, v = (t.requires_grad_() for t in (q, k, v))
            fn = _step(picked[name, dt], a.causal, dout if grad else None)
            for _ in range(5):
                fn(q, k, v)
            torch.cuda.synchronize()
            label = f"{rnd}:{name}:{dt}"
            sampler.label = label
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            n, t0 = 0, time.time()
            e0.record()
            while time.time() - t0 < a.seconds:
                for _ in range(8):
                    fn(q, k, v)
                n += 8
                torch.cuda.synchronize()
            e1.record()
            torch.cuda.synchronize()
            sampler.label = None
            ms = e0.elapsed_time(e1) / n
            s = sampler.samples.get(label, [])
            med = [statistics.median(x[i] for x in s) if s else float("nan") for i in range(3)]
            rows.append({"round": rnd, "contender": name, "dtype": dt, "mode": a.mode, "ms": ms,
                         "tflops": flops / ms / 1e9, "sm_mhz": med[0], "power_w": med[1],
                         "temp_c": med[2], "samples": len(s)})
            r = rows[-1]
            print(f"round {rnd} {name:11s} {dt}: {r['tflops']:6.1f} TFLOP/s  "
                  f"{r['sm_mhz']:6.0f} MHz  {r['power_w']:6.1f} W  {r['temp_c']:4.0f} C  "
                  f"({r['samples']} samples)", flush=True)
    sampler.stop = True
    write_rows(a.out, rows, shape={"B": B, "H": H, "S": S, "D": D, "causal": a.causal},
               mode=a.mode, seconds=a.seconds)


if __name__ == "__main__":
    main()
