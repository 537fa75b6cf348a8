"""fp32 tiles per kernel on a GPU: first-call (compile) time, accuracy against float64, and
do_bench medians of the forward and fwd+bwd with each kernel's own time from the profiler.
The fp32 table in `_configs` (`_FP32`) was chosen with the scratch script this one was made
from: same problem, accuracy rule and timings (benchmarks/NOTES.md, eighteenth session).

    python benchmarks/fp32_tiles.py --head-dim 256 --tiles "32,32,8,1 * *"

``--tiles`` is "forward dK/dV dQ", each block_m,block_n,num_warps,num_stages or ``*`` for the
table's (default: all the table's). Compare candidates in separate processes, each with its
own TRITON_CACHE_DIR, so the first-call time is a cold compile; ``--compile-only`` stops after
the first call, for filling several caches in parallel before timing them one at a time.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch
import triton
from _gpu_profile import kernel_profile  # benchmarks/, beside this script
from attnkit_triton import _configs

import attnkit
from attnkit.bench.grid import attention_flops
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
    ap.add_argument("--maxnreg", type=int, default=None,
                    help="Triton's register cap for the three kernels (default: ptxas's choice)")
    args = ap.parse_args()
    block_d = _configs.padded_head_dim(args.head_dim)
    arch = _configs._arch(torch.device("cuda"))
    if args.tiles:
        table = _configs._fp32_configs(block_d, arch)
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
        _configs._fp32_configs = lambda block_d, arch: tiles
    if args.maxnreg is not None:
        capped = tuple(replace(t, maxnreg=args.maxnreg)
                       for t in _configs._fp32_configs(block_d, arch))
        _configs._fp32_configs = lambda block_d, arch: capped
    label = " ".join(_tag(c) + ("" if c.tma else "/ptr")
                     for c in _configs._fp32_configs(block_d, arch))
    label += f" TMA={os.environ.get('ATTNKIT_TRITON_TMA', 'auto')} maxnreg={args.maxnreg}"

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
    verdicts = case.judge(q, k, v, None, dout, out=out, grads=grads)

    fwd_ms = triton.testing.do_bench(forward, warmup=30, rep=200)
    step_ms = triton.testing.do_bench(step, warmup=30, rep=200)
    kernels, _, _ = kernel_profile(step, calls=10)  # device us per fwd+bwd step
    per_kernel = {n: sum(us for key, us in kernels.items() if n in key) / 1e3 for n in KERNELS}

    shape = (case.batch, case.heads_q, args.seqlen, args.seqlen, args.head_dim, False)
    fwd_tf = attention_flops(*shape, "fwd") / fwd_ms * 1e-9
    step_tf = attention_flops(*shape, "fwd_bwd") / step_ms * 1e-9
    print(f"D={args.head_dim} [{label}] fwd {fwd_ms:.2f} ms ({fwd_tf:.1f} TFLOP/s), "
          f"fwd+bwd {step_ms:.2f} ms ({step_tf:.1f}) | "
          + " ".join(f"{n}={ms:.2f}ms" for n, ms in per_kernel.items() if ms)
          + f" | accurate {all(ok for ok, _ in verdicts)}{same}", flush=True)
    for _, msg in verdicts:
        print("   ", msg)
    return 0 if all(ok for ok, _ in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
