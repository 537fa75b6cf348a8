"""Speed of the Triton backend beside PyTorch SDPA's FLASH_ATTENTION and CUDNN_ATTENTION.

Standard grid: bf16 and fp16, head dim 64 and 128, causal and not, seqlen 512..16k with
batch * seqlen = 16k tokens and H = 2048 / D. Times are triton.testing.do_bench medians of
the public call (``attnkit.attention(..., backend="triton")`` vs
``F.scaled_dot_product_attention`` under one SDPA backend), forward under no_grad and
forward + backward. FLOPs = 4 * B * H * S^2 * D (halved for causal); backward = 2.5x forward.

    python plugins/triton/scripts/perf.py [--quick] [--sweep] [--json PATH] [--jobs N]

``--sweep`` times candidate tile configs per kernel at S=4k (bf16) and prints the best.
Kernels are compiled first by N parallel worker processes (Triton's disk cache is shared),
so the timing pass does not wait on the compiler one kernel at a time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnkit
from attnkit.spec import AttentionProblem

SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def grid(quick: bool):
    for dt in ("bf16", "fp16"):
        for d in (64, 128):
            for causal in (False, True):
                for s in ((1024, 16384) if quick else SEQLENS):
                    yield dt, d, causal, s


def inputs(dt: str, d: int, s: int, grad: bool):
    b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=DTYPES[dt]).requires_grad_(grad)
               for _ in range(3))
    return q, k, v, torch.randn_like(q)


def flops(d: int, s: int, causal: bool) -> float:
    b, h = 16384 // s, 2048 // d
    f = 4.0 * b * h * s * s * d
    return f / 2 if causal else f


def bench(fn) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def _impl_fns(impl: str, q, k, v, dout, causal: bool):
    if impl == "triton":
        def fwd():
            return attnkit.attention(q, k, v, causal=causal, backend="triton")
    else:
        def fwd():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def fwd_nograd():
        with torch.no_grad():
            return fwd()

    def fwd_bwd():
        out = fwd()
        return torch.autograd.grad(out, (q, k, v), dout)

    return fwd_nograd, fwd_bwd


_SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def measure_cell(dt, d, causal, s, impls=("triton", "flash", "cudnn")):
    q, k, v, dout = inputs(dt, d, s, grad=True)
    row = {"dtype": dt, "D": d, "causal": causal, "S": s, "B": 16384 // s, "H": 2048 // d}
    f = flops(d, s, causal)
    for impl in impls:
        fwd, fwd_bwd = _impl_fns(impl, q, k, v, dout, causal)
        ctx = sdpa_kernel([_SDPA[impl]]) if impl in _SDPA else _null()
        try:
            with ctx:
                t_f = bench(fwd)
                t_fb = bench(fwd_bwd)
            row[f"{impl}_fwd"] = f / t_f * 1e-9
            row[f"{impl}_fwdbwd"] = 3.5 * f / t_fb * 1e-9
        except Exception as e:  # e.g. cuDNN refusing a shape: record, keep going
            row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _warm_cell(args):
    dt, d, causal, s = args
    q, k, v, dout = inputs(dt, d, s, grad=True)
    out = attnkit.attention(q, k, v, causal=causal, backend="triton")
    torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    return args


def parallel(fn, tasks, jobs: int):
    """Run fn over tasks in `jobs` spawned processes (compiles fill Triton's disk cache)."""
    if jobs <= 1:
        return [fn(t) for t in tasks]
    ctx = mp.get_context("spawn")
    with ctx.Pool(jobs) as pool:
        return pool.map(fn, tasks, chunksize=1)


# -- config sweep ----------------------------------------------------------------------------

FWD_CANDIDATES = [
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
    (128, 64, 8, 2),
]
DKDV_CANDIDATES = [
    (32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3),
    (16, 128, 4, 4), (32, 32, 4, 3), (64, 32, 4, 3), (16, 64, 4, 3), (32, 64, 4, 2),
    (32, 64, 2, 3),
]
DQ_CANDIDATES = [
    (128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3),
    (128, 64, 8, 3), (32, 32, 4, 3), (64, 16, 4, 3), (32, 64, 4, 3),
]


def _sweep_tasks(seqlen: int = 4096, head_dims=(64, 128)):
    from attnkit_triton._configs import KernelConfig

    tasks = []
    for d in head_dims:
        for causal in (False, True):
            for tma in (True, False):
                for kind, cands in (("fwd", FWD_CANDIDATES), ("dkdv", DKDV_CANDIDATES),
                                    ("dq", DQ_CANDIDATES)):
                    for bm, bn, w, st in cands:
                        cfg = KernelConfig(bm, bn, w, st, block_d=d)
                        tasks.append((kind, d, causal, tma, cfg, seqlen))
                cfg = KernelConfig(128, 128 if d == 64 else 64, 8, 2, block_d=d, warp_spec=True)
                if tma:
                    tasks.append(("fwd", d, causal, tma, cfg, seqlen))
    return tasks


def _run_sweep_task(task, timed=False):
    from attnkit_triton import _backward, _forward

    kind, d, causal, tma, cfg, s = task
    if tma:
        from attnkit_triton.backend import _ensure_allocator
        _ensure_allocator()
    q, k, v, dout = inputs("bf16", d, s, grad=False)
    problem = AttentionProblem.from_tensors(q, k, v, causal=causal)
    try:
        if kind == "fwd":
            def fn():
                return _forward.launch_forward(problem, q, k, v, None, cfg, tma)
        else:
            out, lse = _forward.launch_forward(problem, q, k, v, None,
                                               replace(cfg, block_m=128, block_n=64,
                                                       num_warps=8, num_stages=2,
                                                       warp_spec=False), tma)
            delta, lse2 = _backward.prepare(q, out, lse, dout, 128).unbind(0)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            if kind == "dkdv":
                def fn():
                    _backward.launch_dkdv(problem, q, k, v, dout, delta, lse2, None, dk, dv,
                                          cfg, tma)
            else:
                def fn():
                    _backward.launch_dq(problem, q, k, v, dout, delta, lse2, None, dq, cfg,
                                        tma)
        fn()
        torch.cuda.synchronize()
        if not timed:
            return task, None
        ms = bench(fn)
        f = flops(d, s, causal) * (1.0 if kind == "fwd" else 1.25)  # bwd ~2.5x split in two
        return task, f / ms * 1e-9
    except Exception as e:
        return task, f"{type(e).__name__}: {str(e)[:160]}"


def sweep(jobs: int, results: dict, seqlen: int = 4096, head_dims=(64, 128)):
    tasks = _sweep_tasks(seqlen, head_dims)
    parallel(_run_sweep_task, tasks, jobs)  # compile everything in parallel
    rows = []
    for t in tasks:
        rows.append(_run_sweep_task(t, timed=True))
        print("  sweep", t[0], f"D={t[1]} causal={t[2]} tma={int(t[3])}", t[4], rows[-1][1],
              flush=True)
    best = {}
    for (kind, d, causal, tma, cfg, _), tf in rows:
        key = f"{kind} D={d} causal={causal}"
        tag = (f"tma={int(tma)} {cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
               + (" ws" if cfg.warp_spec else ""))
        results.setdefault("sweep", []).append({"key": key, "config": tag, "tflops": tf})
        if isinstance(tf, float) and tf > best.get(key, ("", 0.0))[1]:
            best[key] = (tag, tf)
    print(f"\nsweep (bf16, S={seqlen}; TFLOP/s per kernel, bwd kernels counted as 1.25x fwd):")
    for key, (tag, tf) in sorted(best.items()):
        print(f"  {key:28s} best {tag:34s} {tf:7.1f}")
    errors = [r for r in results["sweep"] if isinstance(r["tflops"], str)]
    for r in errors[:10]:
        print(f"  error {r['key']} {r['config']}: {r['tflops']}")


def call_overhead() -> dict:
    """Host time per forward call on a tiny problem (GPU work negligible): microseconds."""
    q, k, v, _ = inputs("bf16", 64, 128, grad=False)
    q, k, v = (t[:1, :1] for t in (q, k, v))
    out = {}
    for impl in ("triton", "flash"):
        fwd, _ = _impl_fns(impl, q, k, v, None, False)
        with (sdpa_kernel([_SDPA[impl]]) if impl in _SDPA else _null()):
            for _ in range(20):
                fwd()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(300):
                fwd()
            torch.cuda.synchronize()
        out[impl] = (time.perf_counter() - t0) / 300 * 1e6
    print(f"host time per forward call: triton {out['triton']:.0f} us, "
          f"SDPA flash {out['flash']:.0f} us", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-seqlen", type=int, default=4096)
    ap.add_argument("--sweep-d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__, "grid": []}
    t0 = time.time()
    if args.sweep:
        sweep(args.jobs, results, args.sweep_seqlen, tuple(args.sweep_d))
        print(f"sweep took {time.time() - t0:.0f}s", flush=True)
    if not args.no_grid:
        results["call_overhead_us"] = call_overhead()
        cells = list(grid(args.quick))
        # One warm-up per kernel variant (the seqlen only changes launch sizes).
        parallel(_warm_cell, sorted({(dt, d, c, 1024) for dt, d, c, _ in cells}), args.jobs)
        for cell in cells:
            results["grid"].append(measure_cell(*cell))
            if args.json:
                _dump(args.json, results)
        print_table(results["grid"])
    if args.json:
        _dump(args.json, results)
    print(f"perf took {time.time() - t0:.0f}s on {results['device']}")
    return 0


def _dump(path, results):
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def print_table(rows):
    print("\nTFLOP/s (median); ratio = triton / other. fwd | fwd+bwd")
    print(f"{'dt':4s} {'D':>3s} {'c':1s} {'S':>5s} | {'tri':>5s} {'fla':>5s} {'cud':>5s} "
          f"{'/fla':>5s} {'/cud':>5s} | {'tri':>5s} {'fla':>5s} {'cud':>5s} {'/fla':>5s} "
          f"{'/cud':>5s}")
    for r in rows:
        cells = []
        for mode in ("fwd", "fwdbwd"):
            t, fl, cu = (r.get(f"{i}_{mode}") for i in ("triton", "flash", "cudnn"))
            cells.append(" ".join(f"{x:5.0f}" if x else "  n/a" for x in (t, fl, cu)) + " "
                         + " ".join(f"{t / x:5.2f}" if (t and x) else "  n/a" for x in (fl, cu)))
        print(f"{r['dtype']:4s} {r['D']:3d} {'c' if r['causal'] else '-'} {r['S']:5d} | "
              + " | ".join(cells), flush=True)
    errs = [(r, k, v) for r in rows for k, v in r.items() if k.endswith("_error")]
    for r, k, v in errs[:8]:
        print(f"  {r['dtype']} D={r['D']} S={r['S']} causal={r['causal']} {k}: {v}")


if __name__ == "__main__":
    sys.exit(main())
