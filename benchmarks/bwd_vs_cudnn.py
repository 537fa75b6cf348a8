"""Backward alone: triton against SDPA's cuDNN kernel, with an optional kernel profile.

The script behind `h200/gluon-bwd-variants.json` (ninth session), less the variant switches
(constexpr flags in the kernel, reverted after the run). Each cell times
``torch.autograd.grad`` of a kept forward (`triton.testing.do_bench` median, warm-up 50 ms,
rep 300 ms), bf16, B*S = 16k tokens, H*D = 2048, and checks every gradient against cuDNN's
(max error over max |grad|). Environment variables such as ``ATTNKIT_TRITON_GLUON_BWD=0``
select the path, so two runs compare two paths.

    python benchmarks/bwd_vs_cudnn.py [--seqlens 4096,16384] [--profile] [--out FILE]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _gpu_profile import kernel_profile, write_rows  # benchmarks/, beside this script
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import attnkit


def _cell(D, causal, S, profile):
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
    err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
              for a, b in zip(got, ref))
    row = {"D": D, "causal": causal, "S": S, "err": err}
    for name, out in (("cudnn", o_ref), ("triton", o)):
        def backward(out=out):
            return torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

        row[name] = flops / do_bench(backward, warmup=50, rep=300) / 1e9
        if profile:
            row[f"{name}_kernels_us"] = kernel_profile(backward)[0]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", default="4096,8192,16384")
    p.add_argument("--profile", action="store_true", help="per-kernel device time per call")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for D in (128, 64):
        for causal in (False, True):
            for S in map(int, args.seqlens.split(",")):
                rows.append(_cell(D, causal, S, args.profile))
                r = rows[-1]
                print(f"D={D:3} {'causal' if causal else 'full  '} S={S:5}  cudnn "
                      f"{r['cudnn']:4.0f}  triton {r['triton']:4.0f} TFLOP/s  "
                      f"{r['triton'] / r['cudnn']:.2f}x  err {r['err']:.1e}", flush=True)
                for side in ("triton", "cudnn"):
                    for name, us in sorted(r.get(f"{side}_kernels_us", {}).items(),
                                           key=lambda kv: -kv[1]):
                        print(f"    {side:6} {us:9.1f} us  {name}")
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
