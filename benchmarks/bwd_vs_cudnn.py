"""Backward alone: triton against SDPA's cuDNN kernel, with an optional kernel profile.

The script behind `h200/gluon-bwd-variants.json` (ninth session), less the variant switches
(constexpr flags in the kernel, reverted after the run). Each cell times
``torch.autograd.grad`` of a kept forward (`triton.testing.do_bench` median, warm-up 50 ms,
rep 300 ms), bf16, B*S = 16k tokens, H*D = 2048, and checks every gradient against cuDNN's
(max error over max |grad|). Environment variables such as ``ATTNKIT_TRITON_GLUON_BWD=0``
select the path, so two runs compare two paths. ``--dq-lag 0,1`` times the Gluon backward
once per value of its ``DQ_LAG`` switch (``_hopper._DQ_LAG``) in each cell, in the order
given and then reversed (twelfth session, `h200/gluon-bwd-dq-lag.json`).

    python benchmarks/bwd_vs_cudnn.py [--seqlens 4096,16384] [--profile] [--dq-lag 0,1]
                                      [--out FILE]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _gpu_profile import kernel_profile, write_rows  # benchmarks/, beside this script
from attnkit_triton import _hopper
from attnkit_triton import backend as triton_backend
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import attnkit


def _set_dq_lag(D, causal, lag) -> None:
    """Switch the Gluon backward's DQ_LAG for one shape; cached plans and routes go with it."""
    _hopper._DQ_LAG[D, causal] = bool(lag)
    _hopper._backward_plan.cache_clear()
    triton_backend._routes.clear()


def _rel_err(got, ref) -> float:
    """Max |got - ref| over max |ref|, the worst of the gradients."""
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
               for a, b in zip(got, ref))


def _cell(D, causal, S, profile, lags=()):
    B, H = 16384 // S, 2048 // D
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g, device="cuda", dtype=torch.bfloat16)
               .requires_grad_(True) for _ in range(3))
    do = torch.randn(q.shape, generator=g, device="cuda", dtype=q.dtype)
    flops = 2.5 * 4 * B * H * S * S * D / (2 if causal else 1)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        o_ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    o = attnkit.attention(q, k, v, causal=causal, backend="triton")
    ref = torch.autograd.grad(o_ref, (q, k, v), do, retain_graph=True)
    got = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    row = {"D": D, "causal": causal, "S": S, "err": _rel_err(got, ref)}
    for name, out in (("cudnn", o_ref), ("triton", o)):
        def backward(out=out):
            return torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

        row[name] = flops / do_bench(backward, warmup=50, rep=300) / 1e9
        if profile:
            row[f"{name}_kernels_us"] = kernel_profile(backward)[0]
    if lags:  # each value's gradients checked as above, then timed in order and reversed
        default = _hopper._DQ_LAG[D, causal]
        try:
            times = {}
            for lag in (*lags, *reversed(lags)):
                _set_dq_lag(D, causal, lag)
                if lag not in times:
                    row[f"lag{lag}_err"] = _rel_err(
                        torch.autograd.grad(o, (q, k, v), do, retain_graph=True), ref)
                times.setdefault(lag, []).append(do_bench(
                    lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True),
                    warmup=50, rep=300))
            for lag, ms in times.items():
                row[f"lag{lag}"] = flops / (sum(ms) / len(ms)) / 1e9
        finally:
            _set_dq_lag(D, causal, default)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", default="4096,8192,16384")
    p.add_argument("--profile", action="store_true", help="per-kernel device time per call")
    p.add_argument("--dq-lag", default="", help="DQ_LAG values to time, e.g. 0,1")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lags = tuple(int(x) for x in args.dq_lag.split(",") if x)
    rows = []
    for D in (128, 64):
        for causal in (False, True):
            for S in map(int, args.seqlens.split(",")):
                rows.append(_cell(D, causal, S, args.profile, lags))
                r = rows[-1]
                print(f"D={D:3} {'causal' if causal else 'full  '} S={S:5}  cudnn "
                      f"{r['cudnn']:4.0f}  triton {r['triton']:4.0f} TFLOP/s  "
                      f"{r['triton'] / r['cudnn']:.2f}x  err {r['err']:.1e}" + "".join(
                          f"  lag{lag} {r[f'lag{lag}']:4.0f}" for lag in lags), flush=True)
                for side in ("triton", "cudnn"):
                    for name, us in sorted(r.get(f"{side}_kernels_us", {}).items(),
                                           key=lambda kv: -kv[1]):
                        print(f"    {side:6} {us:9.1f} us  {name}")
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
