"""CPU measurements of torch-blocked: speed against SDPA, and peak memory against `reference`.

    python plugins/torch_blocked/scripts/measure_cpu.py --out benchmarks/torch_blocked_cpu.json

Speed: fp32, B=1, H=8, D=64, bottom-right causal and not, forward and forward+backward,
torch-blocked (through `attnkit.attention`) against
``torch.nn.functional.scaled_dot_product_attention`` on the same inputs. The two are timed
interleaved, and each figure is the *minimum* over repeats: on a shared machine the minimum
is the figure least disturbed by other processes (the load average is recorded beside it).

Memory: peak extra memory of one forward+backward at B=1, H=8, D=64 fp32 per sequence length,
each point in a fresh subprocess: the resident set (``/proc/self/statm``, which every page
torch's CPU allocator touches counts toward) sampled every 0.5 ms by a thread while the step
runs, less the resident set once q, k, v and dout exist (after a warm-up step and
``malloc_trim``, so freed heap pages do not hide growth). ``reference`` materializes S x S
matrices and is measured only up to S = 4096.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

B, H, D = 1, 8, 64


def _load() -> float:
    return os.getloadavg()[0]


def _inputs(S, grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g).requires_grad_(grad) for _ in range(3)]


def _step(impl, q, k, v, causal, backward, dout=None):
    import attnkit

    if impl == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # Sq == Sk: same mask
    else:
        out = attnkit.attention(q, k, v, causal=causal, backend=impl)
    if backward:
        torch.autograd.grad(out, (q, k, v), dout)
    return out


def _time(fn, reps):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def speed(seqlens, reps, rounds):
    rows = []
    for S in seqlens:
        for causal in (False, True):
            for mode in ("fwd", "fwd_bwd"):
                backward = mode == "fwd_bwd"
                q, k, v = _inputs(S, backward)
                dout = torch.randn(B, H, S, D) if backward else None
                fns = {impl: functools.partial(_step, impl, q, k, v, causal, backward, dout)
                       for impl in ("torch-blocked", "sdpa")}
                best = {impl: float("inf") for impl in fns}
                load0 = _load()
                for _ in range(rounds):  # interleave, so both see the same machine
                    for impl, fn in fns.items():
                        best[impl] = min(best[impl], _time(fn, reps))
                flops = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
                flops *= 3.5 if backward else 1.0
                row = {
                    "seqlen": S, "causal": causal, "mode": mode,
                    "torch_blocked_ms": best["torch-blocked"] * 1e3,
                    "sdpa_ms": best["sdpa"] * 1e3,
                    "torch_blocked_gflops": flops / best["torch-blocked"] / 1e9,
                    "sdpa_gflops": flops / best["sdpa"] / 1e9,
                    "throughput_vs_sdpa": best["sdpa"] / best["torch-blocked"],
                    "load_avg_1m": [round(load0, 2), round(_load(), 2)],
                }
                rows.append(row)
                print(f"S={S:5d} causal={causal!s:5} {mode:7s} torch-blocked "
                      f"{row['torch_blocked_ms']:8.1f} ms  sdpa {row['sdpa_ms']:8.1f} ms  "
                      f"ratio {row['throughput_vs_sdpa']:.2f}  (load {row['load_avg_1m']})",
                      flush=True)
    return rows


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_point(impl, S):
    """Run in a subprocess: peak resident-set growth (bytes) over one forward+backward."""
    # Warm up first (plugin loading, allocator and BLAS/thread-pool buffers): the baseline
    # then holds everything but what this step allocates.
    qw, kw, vw = _inputs(128, True)
    _step(impl, qw, kw, vw, False, True, torch.randn(B, H, 128, D))
    del qw, kw, vw
    q, k, v = _inputs(S, True)
    dout = torch.randn(B, H, S, D)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back: RSS = live memory
    base = peak = _rss()
    done = threading.Event()

    def sample():  # torch ops release the GIL, so this runs beside them
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    _step(impl, q, k, v, False, True, dout)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak = max(peak, _rss())
    # (seconds include the sampler's GIL contention: not a speed figure)
    return {"extra_bytes": peak - base, "seconds_with_sampler": seconds}


def memory(seqlens, reference_max):
    rows = []
    for S in seqlens:
        row = {"seqlen": S, "inputs_bytes": 4 * B * H * S * D * 4}
        for impl in ("torch-blocked", "reference", "sdpa"):
            if impl == "reference" and S > reference_max:
                row[impl] = None
                continue
            res = subprocess.run(
                [sys.executable, __file__, "--memory-point", impl, str(S)],
                capture_output=True, text=True, check=False)
            if res.returncode != 0:
                row[impl] = {"error": res.stderr.strip().splitlines()[-1:]}
            else:
                row[impl] = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        cells = "  ".join(
            f"{impl} " + (f"{row[impl]['extra_bytes'] / 2**20:8.1f} MiB"
                          if row[impl] and "extra_bytes" in row[impl] else "       -    ")
            for impl in ("torch-blocked", "reference", "sdpa"))
        print(f"S={S:6d}  {cells}", flush=True)
    return rows


def plot(result, path):
    """Two panels: throughput relative to SDPA, and peak memory against sequence length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib: {e}") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for causal in (False, True):
        for mode, style in (("fwd", "-o"), ("fwd_bwd", "--s")):
            pts = [(r["seqlen"], r["throughput_vs_sdpa"]) for r in result.get("speed", [])
                   if r["causal"] == causal and r["mode"] == mode]
            if pts:
                ax1.plot(*zip(*pts), style, label=f"{mode}{' causal' if causal else ''}")
    ax1.axhline(0.7, color="gray", lw=0.8, ls=":")
    ax1.set(xscale="log", xlabel="sequence length", ylabel="throughput / SDPA",
            title="torch-blocked vs SDPA, CPU fp32, B=1 H=8 D=64", ylim=(0, 1.2))
    ax1.legend(fontsize=8)
    for impl in ("torch-blocked", "reference", "sdpa"):
        pts = [(r["seqlen"], r[impl]["extra_bytes"] / 2**20) for r in result.get("memory", [])
               if r.get(impl) and "extra_bytes" in r[impl]]
        if pts:
            ax2.plot(*zip(*pts), "-o", label=impl)
    ax2.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="MiB",
            title="peak extra memory, forward+backward")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def environment():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    import attnkit_torch_blocked
    from attnkit_torch_blocked.blocked import default_block_sizes

    import attnkit

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "attnkit": attnkit.__version__,
        "attnkit_torch_blocked": getattr(attnkit_torch_blocked, "__version__", "0.1.0"),
        "block_sizes": {
            "B1_H8_D64_fp32": vars(default_block_sizes("cpu", torch.float32, B, H, D)),
        },
        "env_blocks": os.environ.get("ATTNKIT_TORCH_BLOCKED_BLOCKS"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/torch_blocked_cpu.json")
    ap.add_argument("--seqlens", default="512,1024,2048,4096")
    ap.add_argument("--memory-seqlens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--reference-max", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plot", help="also write this PNG")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-point", nargs=2, metavar=("IMPL", "S"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_point:
        print(json.dumps(_memory_point(args.memory_point[0], int(args.memory_point[1]))))
        return 0

    result = {"environment": environment(),
              "shape": {"batch": B, "heads": H, "head_dim": D, "dtype": "float32"},
              "speed_method": "min over rounds x reps of time.perf_counter, interleaved with "
                              "SDPA; throughput_vs_sdpa = sdpa_ms / torch_blocked_ms",
              "memory_method": "peak resident-set growth over one forward+backward: "
                               "/proc/self/statm sampled every 0.5 ms by a thread, one fresh "
                               "subprocess per point, baseline after a warm-up step, the "
                               "inputs and malloc_trim(0)"}
    # A section not rerun (--skip-speed / --skip-memory) keeps its previous figures.
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        for key in ("speed", "memory"):
            if key in previous:
                result[key] = previous[key]
    if not args.skip_speed:
        result["speed"] = speed([int(s) for s in args.seqlens.split(",")], args.reps,
                                args.rounds)
    if not args.skip_memory:
        result["memory"] = memory([int(s) for s in args.memory_seqlens.split(",")],
                                  args.reference_max)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
