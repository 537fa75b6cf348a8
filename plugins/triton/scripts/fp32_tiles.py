"""fp32 tiles per kernel on a GPU: first-call (compile) time, accuracy against float64, and
do_bench medians of the forward and fwd+bwd with each kernel's own time from the profiler.
The fp32 table in `_configs` (`_FP32`) was chosen with the scratch script this one was made
from: same problem, accuracy rule and timings (benchmarks/NOTES.md, eighteenth session).

    python plugins/triton/scripts/fp32_tiles.py --head-dim 256 --tiles "32,32,8,1 * *"

``--tiles`` is "forward dK/dV dQ", each block_m,block_n,num_warps,num_stages or ``*`` for the
table's (default: all the table's). Compare candidates in separate processes, each with its
own TRITON_CACHE_DIR, so the first-call time is a cold compile; ``--compile-only`` stops after
the first call, for filling several caches in parallel before timing them one at a time.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import triton
from attnkit_triton import _configs
from torch.profiler import ProfilerActivity, profile

import attnkit
from attnkit.testing import accuracy
from attnkit.testing.cases import Case

KERNELS = ("_fwd_kernel", "_prep_kernel", "_dkdv_kernel", "_dq_kernel")


def _tag(cfg) -> str:
    return f"{cfg.block_m},{cfg.block_n},{cfg.num_warps},{cfg.num_stages}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dim", type=int, required=True)
    ap.add_argument("--tiles", default=None)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--same-as", metavar="PATH", default=None,
                    help="save the forward output here, or if the file exists, say whether "
                         "the output is bitwise equal to it")
    args = ap.parse_args()
    if args.tiles:
        table = _configs._fp32_configs(_configs.padded_head_dim(args.head_dim))
        given = args.tiles.split()
        try:
            tiles = [tuple(map(int, (_tag(cur) if t == "*" else t).split(",")))
                     for t, cur in zip(given, table)]
        except ValueError:
            tiles = []
        if len(given) != 3 or len(tiles) != 3 or any(len(t) != 4 for t in tiles):
            ap.error(f"--tiles {args.tiles!r}: give three tiles (forward, dK/dV, dQ), each "
                     "block_m,block_n,num_warps,num_stages or *")
        tiles = tuple(_configs.KernelConfig(*t) for t in tiles)
        _configs._fp32_configs = lambda block_d: tiles
    label = " ".join(map(_tag, _configs._fp32_configs(_configs.padded_head_dim(args.head_dim))))

    # magnitude 2: scores large enough that a backward recomputing them differently shows.
    case = Case(4, 8, 8, args.seqlen, args.seqlen, args.head_dim, torch.float32, magnitude=2.0)
    gen = torch.Generator().manual_seed(0)
    q, k, v, _ = case.make_inputs("cuda", gen)
    dout = torch.randn(q.shape, generator=gen).cuda()
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def forward():
        return attnkit.attention(q, k, v, backend="triton")

    def step():
        return torch.autograd.grad(forward(), (q, k, v), dout)

    t0 = time.perf_counter()
    out = forward()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    print(f"D={args.head_dim} [{label}] first call: forward {t1 - t0:.1f} s, "
          f"backward {time.perf_counter() - t1:.1f} s", flush=True)
    if args.compile_only:
        return 0

    same = ""
    if args.same_as and os.path.exists(args.same_as):
        same = f" | output bitwise equal to {args.same_as}: " \
            f"{torch.equal(out.detach(), torch.load(args.same_as))}"
    elif args.same_as:
        torch.save(out.detach(), args.same_as)
    ref64, ref32 = (case.reference(q, k, v, None, dt, dout) for dt in (torch.float64,
                                                                       torch.float32))
    verdicts = [accuracy.check("out", out, ref64[0], ref32[0], torch.float32)] + [
        accuracy.check(f"d{n}", g, g64, g32, torch.float32, factor=3.0)
        for n, g, g64, g32 in zip("qkv", grads, ref64[2], ref32[2])]
    del ref64, ref32

    fwd_ms = triton.testing.do_bench(forward, warmup=30, rep=200)
    step_ms = triton.testing.do_bench(step, warmup=30, rep=200)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    per_kernel = {}
    for e in prof.key_averages():
        name = next((n for n in KERNELS if n in e.key), None)
        if name:
            per_kernel[name] = per_kernel.get(name, 0.0) + e.device_time_total / e.count / 1e3

    flops = 4 * case.batch * case.heads_q * args.seqlen ** 2 * args.head_dim
    print(f"D={args.head_dim} [{label}] fwd {fwd_ms:.2f} ms ({flops / fwd_ms * 1e-9:.1f} "
          f"TFLOP/s), fwd+bwd {step_ms:.2f} ms ({3.5 * flops / step_ms * 1e-9:.1f}) | "
          + " ".join(f"{n}={per_kernel[n]:.2f}ms" for n in KERNELS if n in per_kernel)
          + f" | accurate {all(ok for ok, _ in verdicts)}{same}", flush=True)
    for _, msg in verdicts:
        print("   ", msg)
    return 0 if all(ok for ok, _ in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
