"""Backward alone: triton against SDPA's cuDNN kernel, with an optional kernel profile.

The script behind `h200/gluon-bwd-variants.json` (ninth session), less the variant switches
(constexpr flags in the kernel, reverted after the run). Each cell times
``torch.autograd.grad`` of a kept forward (`triton.testing.do_bench` median, warm-up 50 ms,
rep 300 ms), bf16, B*S = 16k tokens, H*D = 2048, and checks every gradient against cuDNN's
(max error over max |grad|). Environment variables such as ``ATTNKIT_TRITON_GLUON_BWD=0``
select the path, so two runs compare two paths. ``--variants L0,L1`` times the Gluon
backward once per variant in each cell, in the order given and then reversed, each variant's
gradients checked as above: a letter and a value per switch of `_hopper`'s tables, set for
the cell's head dim and causal mode (``L``: ``_DQ_LAG``; the twelfth session's
`h200/gluon-bwd-dq-lag.json`). The thirteenth session's `h200/gluon-bwd-stats.json` came
from a version with two more switches, since folded into the kernel (``S``: how lse and
delta are read, ``T``: dQ by turns at head dim 128; NOTES.md).

    python benchmarks/bwd_vs_cudnn.py [--seqlens 4096,16384] [--head-dims 128,64]
                                      [--profile] [--variants L0,L1] [--out FILE]
"""

from __future__ import annotations

import argparse
import re

import torch
import torch.nn.functional as F
from _gpu_profile import kernel_profile, write_rows  # benchmarks/, beside this script
from attnkit_triton import _hopper
from attnkit_triton import backend as triton_backend
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import attnkit


def _switch(D, causal, variant: str) -> str:
    """Set the Gluon backward's switches for one shape from a variant string such as ``L1``;
    returns the previous values (a variant string too). Cached plans and routes go with
    them."""
    tables = {"L": (_hopper._DQ_LAG, (D, causal))}
    before = "".join(f"{k}{int(t[key])}" for k, (t, key) in tables.items())
    for letter, value in re.findall(r"([A-Z])(\d)", variant):
        table, key = tables[letter]
        table[key] = type(table[key])(int(value))
    _hopper._backward_plan.cache_clear()
    triton_backend._routes.clear()
    return before


def _rel_err(got, ref) -> float:
    """Max |got - ref| over max |ref|, the worst of the gradients."""
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
               for a, b in zip(got, ref))


def _cell(D, causal, S, profile, variants=()):
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
    if variants:  # each one's gradients checked as above, then timed in order and reversed
        default = _switch(D, causal, "")
        try:
            times = {}
            for name in (*variants, *reversed(variants)):
                _switch(D, causal, name)
                if name not in times:
                    row[f"{name}_err"] = _rel_err(
                        torch.autograd.grad(o, (q, k, v), do, retain_graph=True), ref)
                times.setdefault(name, []).append(do_bench(
                    lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True),
                    warmup=50, rep=300))
            for name, ms in times.items():
                row[name] = flops / (sum(ms) / len(ms)) / 1e9
        finally:
            _switch(D, causal, default)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", default="4096,8192,16384")
    p.add_argument("--profile", action="store_true", help="per-kernel device time per call")
    p.add_argument("--head-dims", default="128,64")
    p.add_argument("--variants", default="",
                   help="Gluon backward variants to time, e.g. L0,L1")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    variants = tuple(x for x in args.variants.split(",") if x)
    rows = []
    for D in map(int, args.head_dims.split(",")):
        for causal in (False, True):
            for S in map(int, args.seqlens.split(",")):
                rows.append(_cell(D, causal, S, args.profile, variants))
                r = rows[-1]
                print(f"D={D:3} {'causal' if causal else 'full  '} S={S:5}  cudnn "
                      f"{r['cudnn']:4.0f}  triton {r['triton']:4.0f} TFLOP/s  "
                      f"{r['triton'] / r['cudnn']:.2f}x  err {r['err']:.1e}" + "".join(
                          f"  {name} {r[name]:4.0f} ({r[f'{name}_err']:.0e})"
                          for name in variants), flush=True)
                for side in ("triton", "cudnn"):
                    for name, us in sorted(r.get(f"{side}_kernels_us", {}).items(),
                                           key=lambda kv: -kv[1]):
                        print(f"    {side:6} {us:9.1f} us  {name}")
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
