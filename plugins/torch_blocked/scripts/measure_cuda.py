"""CUDA measurements of torch-blocked: correctness, speed on the standard grid, memory.

    python plugins/torch_blocked/scripts/measure_cuda.py --out $OUT/torch_blocked_cuda.json

1. Correctness on the GPU (the half-precision GEMM path exists only there): a dozen cases
   over every feature, fp16/bf16/fp32, against the float64 reference under the conformance
   rule (`attnkit.testing.accuracy`).
2. Speed, the standard grid (FlashAttention's: B * S = 16k tokens, H = 2048 / D, D = 64 and
   128, causal and not, fp16 then bf16, S = 512 .. 16k; inputs (B, S, H, D) passed as
   ``.transpose(1, 2)``): torch-blocked against SDPA's math and flash kernels, forward and
   forward+backward, CUDA-event medians. All shapes have Sq == Sk, where SDPA's top-left
   causal mask equals attnkit's bottom-right one.
3. Memory: peak ``torch.cuda.max_memory_allocated`` growth of one forward+backward at B=1,
   H=8, D=64, fp16, S = 1k .. 16k, for torch-blocked, `reference`, SDPA math and flash
   (OOM recorded as such).

A time budget (--budget-s, default 170) bounds the run: cells past it are recorded as
"skipped: time budget", never silently dropped. Every cell that fails records its error and
the run goes on. ``--device cpu --quick`` runs a tiny version anywhere (smoke test).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import attnkit
from attnkit import reference
from attnkit.testing.accuracy import check

T0 = time.perf_counter()
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def elapsed() -> float:
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, device, warmup=1, reps=3, max_s=4.0) -> float:
    """Median milliseconds of ``fn``; CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - start_all > max_s:
            break
    return statistics.median(times)


def error_text(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError):
        return "OOM"
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"


# -- 1. correctness -------------------------------------------------------------------------

CORRECTNESS_CASES = [
    # (tag, dtype, B, Hq, Hkv, Sq, Sk, D, options, layout)
    ("plain", "fp16", 2, 4, 4, 300, 300, 64, {}, "bhsd"),
    ("plain", "bf16", 2, 4, 4, 300, 300, 64, {}, "bhsd"),
    ("plain", "fp32", 2, 4, 4, 300, 300, 64, {}, "bhsd"),
    ("causal Sq>Sk", "fp16", 2, 4, 4, 1200, 700, 128, {"causal": True}, "bhsd"),
    ("causal Sq<Sk", "bf16", 2, 4, 4, 500, 2100, 64, {"causal": True}, "bshd"),
    ("window", "fp16", 2, 4, 4, 1500, 1500, 64, {"window": (256, 0)}, "bhsd"),
    ("seqlens_k", "fp16", 4, 4, 2, 400, 1300, 64, {"seqlens": [0, 1300, 650, 1]}, "bhsd"),
    ("seqlens_k causal", "bf16", 3, 8, 2, 300, 1100, 128,
     {"causal": True, "seqlens": [1100, 20, 700]}, "bhsd"),
    ("softcap", "fp16", 2, 4, 4, 700, 700, 64, {"softcap": 30.0, "causal": True}, "bhsd"),
    ("gqa bshd", "fp16", 2, 8, 2, 900, 900, 64, {"causal": True}, "bshd"),
    ("odd head dim", "fp16", 1, 2, 2, 333, 333, 40, {}, "bhsd"),
    ("head dim 256", "bf16", 1, 2, 2, 600, 600, 256, {"causal": True}, "bhsd"),
    ("large scores", "fp16", 1, 4, 4, 512, 512, 64, {"magnitude": 8.0}, "bhsd"),
    ("fp32 causal gqa", "fp32", 2, 4, 2, 1000, 1000, 64, {"causal": True}, "bshd"),
]


def _make(B, H, S, D, dtype, device, layout, mag=1.0, grad=False, gen=None):
    shape = (B, S, H, D) if layout == "bshd" else (B, H, S, D)
    t = (torch.randn(shape, generator=gen, device=device) * mag).to(dtype)
    t = t.transpose(1, 2) if layout == "bshd" else t
    return t.requires_grad_(grad)


def correctness(device, quick):
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for tag, dt, B, Hq, Hkv, Sq, Sk, D, opts, layout in CORRECTNESS_CASES:
        if quick:
            Sq, Sk = max(1, Sq // 10), max(1, Sk // 10)
        dtype = DTYPES[dt]
        opts = dict(opts)
        mag = opts.pop("magnitude", 1.0)
        lens = opts.pop("seqlens", None)
        if lens is not None:
            lens = torch.tensor([min(x, Sk) for x in lens], dtype=torch.int32, device=device)
        row = {"case": tag, "dtype": dt, "shape": [B, Hq, Hkv, Sq, Sk, D], "layout": layout,
               "options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}}
        try:
            q = _make(B, Hq, Sq, D, dtype, device, layout, mag, True, gen)
            k = _make(B, Hkv, Sk, D, dtype, device, layout, mag, True, gen)
            v = _make(B, Hkv, Sk, D, dtype, device, layout, 1.0, True, gen)
            out, lse = attnkit.attention(q, k, v, seqlens_k=lens, return_lse=True,
                                         backend="torch-blocked", **opts)
            dout = torch.randn(out.shape, generator=gen, device=device).to(dtype)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            refs = {}
            for name, rdt in (("64", torch.float64), ("lp", dtype)):
                qq, kk, vv = (t.detach().to(rdt).requires_grad_(True) for t in (q, k, v))
                with torch.enable_grad():
                    o, l_ = reference.safe(qq, kk, vv, seqlens_k=lens, **opts)
                    g = torch.autograd.grad(o, (qq, kk, vv), dout.to(rdt))
                refs[name] = (o.detach(), l_.detach(), g)
            checks = [check("out", out, refs["64"][0], refs["lp"][0], dtype, 2),
                      check("lse", lse, refs["64"][1], refs["lp"][1], dtype, 2)]
            for i, n in enumerate("qkv"):
                checks.append(check(f"d{n}", grads[i], refs["64"][2][i], refs["lp"][2][i],
                                    dtype, 3))
            row["ok"] = all(ok for ok, _ in checks)
            row["details"] = [msg for _, msg in checks]
        except Exception as e:  # record and go on
            row["ok"] = False
            row["error"] = error_text(e)
            row["traceback"] = traceback.format_exc(limit=4)
        rows.append(row)
        log(f"correctness {tag:18s} {dt}: {'ok' if row['ok'] else 'FAIL'} "
            f"{row.get('error', '')}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# -- 2. speed --------------------------------------------------------------------------------

def _sdpa_ctx(kind):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}[kind])


def _run(impl, q, k, v, causal, dout):
    if impl == "torch-blocked":
        out = attnkit.attention(q, k, v, causal=causal, backend="torch-blocked")
    else:
        with _sdpa_ctx(impl.split("-")[1]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if dout is not None:
        torch.autograd.grad(out, (q, k, v), dout)
    return out


def speed(device, quick, budget_s, dtypes):
    from attnkit_torch_blocked.blocked import default_block_sizes

    seqlens = (128, 256) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    tokens, model_dim = (512, 128) if quick else (16384, 2048)
    impls = ("torch-blocked", "sdpa-math", "sdpa-flash")
    rows = []
    for dt in dtypes:
        for D in (64, 128):
            for causal in (False, True):
                for S in seqlens:
                    B, H = max(1, tokens // S), model_dim // D
                    flops = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
                    bs = default_block_sizes(device.type, DTYPES[dt], B, H, D)
                    for mode in ("fwd", "fwd_bwd"):
                        row = {"dtype": dt, "batch": B, "heads": H, "seqlen": S, "head_dim": D,
                               "causal": causal, "mode": mode, "block_sizes": [bs.q, bs.k]}
                        f = flops * (3.5 if mode == "fwd_bwd" else 1.0)
                        for impl in impls:
                            if elapsed() > budget_s:
                                row[impl] = {"status": "skipped: time budget"}
                                continue
                            try:
                                grad = mode == "fwd_bwd"
                                q, k, v = (_make(B, H, S, D, DTYPES[dt], device, "bshd",
                                                 grad=grad) for _ in range(3))
                                dout = torch.randn(B, H, S, D, device=device,
                                                   dtype=DTYPES[dt]) if grad else None
                                ms = bench_ms(functools.partial(_run, impl, q, k, v, causal,
                                                                dout), device)
                                row[impl] = {"status": "ok", "ms": ms, "tflops": f / ms / 1e9}
                            except Exception as e:
                                row[impl] = {"status": error_text(e)}
                            finally:
                                q = k = v = dout = None
                                if device.type == "cuda":
                                    torch.cuda.empty_cache()
                        fl = row["sdpa-flash"].get("ms")
                        tb = row["torch-blocked"].get("ms")
                        if fl and tb:
                            row["torch_blocked_vs_flash"] = fl / tb
                        mt = row["sdpa-math"].get("ms")
                        if mt and tb:
                            row["torch_blocked_vs_math"] = mt / tb
                        rows.append(row)
                        log("speed " + " ".join(
                            f"{dt} D{D} {'causal' if causal else 'full  '} S{S:<5d} {mode:7s}"
                            .split()) + "  " + "  ".join(
                            f"{i} " + (f"{row[i]['tflops']:6.1f} TF" if "tflops" in row[i]
                                       else row[i]["status"][:24]) for i in impls))
    return rows


# -- 3. memory -------------------------------------------------------------------------------

def memory(device, quick, budget_s):
    seqlens = (256, 512) if quick else (1024, 2048, 4096, 8192, 16384)
    B, H, D, dtype = 1, 8, 64, torch.float16
    impls = ("torch-blocked", "reference", "sdpa-math", "sdpa-flash")
    rows = []
    for S in seqlens:
        row = {"seqlen": S, "batch": B, "heads": H, "head_dim": D, "dtype": "fp16",
               "inputs_bytes": 4 * B * H * S * D * 2}
        for impl in impls:
            if elapsed() > budget_s:
                row[impl] = {"status": "skipped: time budget"}
                continue
            q = k = v = dout = None
            try:
                q, k, v = (_make(B, H, S, D, dtype, device, "bhsd", grad=True)
                           for _ in range(3))
                dout = torch.randn(B, H, S, D, device=device, dtype=dtype)
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                if impl == "reference":
                    out = attnkit.attention(q, k, v, backend="reference")
                    torch.autograd.grad(out, (q, k, v), dout)
                else:
                    _run(impl, q, k, v, False, dout)
                sync(device)
                extra = (torch.cuda.max_memory_allocated() - base
                         if device.type == "cuda" else None)
                row[impl] = {"status": "ok", "extra_bytes": extra}
            except Exception as e:
                row[impl] = {"status": error_text(e)}
            finally:
                q = k = v = dout = out = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        log(f"memory S={S:<6d} " + "  ".join(
            f"{i} " + (f"{row[i]['extra_bytes'] / 2**20:8.1f} MiB"
                       if row[i].get("extra_bytes") is not None else row[i]["status"][:12])
            for i in impls))
    return rows


def environment(device):
    import attnkit_torch_blocked

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "torch": torch.__version__,
           "python": platform.python_version(), "attnkit": attnkit.__version__,
           "attnkit_torch_blocked": attnkit_torch_blocked.__version__,
           "device": str(device),
           "env": {k: v for k, v in os.environ.items() if k.startswith("ATTNKIT_")}}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."),
                                                  "torch_blocked_cuda.json"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--budget-s", type=float, default=170.0)
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--skip", default="", help="comma list of: correctness,speed,memory")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    result = {"environment": environment(device)}

    def save():
        result["elapsed_s"] = elapsed()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    # Correctness and memory are cheap and matter most; speed gets the rest of the budget,
    # with memory's share held back.
    if "correctness" not in skip:
        result["correctness"] = correctness(device, args.quick)
        save()
    if "speed" not in skip:
        result["speed"] = speed(device, args.quick, args.budget_s - 25,
                                [d for d in args.dtypes.split(",") if d])
        save()
    if "memory" not in skip:
        result["memory"] = memory(device, args.quick, args.budget_s)
    save()

    # Short table last.
    print(f"\nwrote {args.out} ({elapsed():.0f}s)")
    if "correctness" in result:
        bad = [f"{r['case']}/{r['dtype']}" for r in result["correctness"] if not r["ok"]]
        print(f"correctness: {len(result['correctness']) - len(bad)}/"
              f"{len(result['correctness'])} ok" + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    if "speed" in result:
        print(f"{'dtype':5} {'D':>4} {'causal':6} {'S':>6} {'mode':8} {'blocked':>8} "
              f"{'math':>8} {'flash':>8}  TFLOP/s")
        for r in result["speed"]:
            cells = [r[i].get("tflops") for i in ("torch-blocked", "sdpa-math", "sdpa-flash")]
            print(f"{r['dtype']:5} {r['head_dim']:4d} {str(r['causal']):6} {r['seqlen']:6d} "
                  f"{r['mode']:8} " + " ".join(f"{c:8.1f}" if c else f"{'-':>8}"
                                              for c in cells))
    if "memory" in result:
        for r in result["memory"]:
            print(f"mem S={r['seqlen']:6d} " + " ".join(
                f"{i}=" + (f"{r[i]['extra_bytes'] / 2**20:.0f}MiB"
                           if r[i].get("extra_bytes") is not None else r[i]["status"][:10])
                for i in ("torch-blocked", "reference", "sdpa-math", "sdpa-flash")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
