"""Why a decoding step at 1k keys is sometimes ~3x slower in the bench: host or GPU?

Issue 5's workload (B=16, Hq=32, Hkv=8, D=128, bf16, one query) in several fresh processes.
Per process and contender, four numbers:

- ``bench``: the bench's own timing (`attnkit.bench.timing.measure`, L2 flushed per call);
- ``gpu_flush``: GPU time per call with the same flush, but with the stream held by a
  ``torch.cuda._sleep`` while every call is queued, so no host time can show;
- ``gpu``: the same without the flush (K/V partly in L2);
- ``host``: host time per call (no sync inside the loop).

If ``bench`` is slow while ``gpu_flush`` is fast, the host is the cause; if ``gpu_flush`` is
slow too, the kernel is. Usage: ``python benchmarks/decode_modes.py --procs 6 --out F.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

B, HQ, HKV, D = 16, 32, 8, 128


def _contenders(Sk: int, order):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnkit

    g = torch.Generator(device="cuda").manual_seed(Sk)
    q = torch.randn(B, HQ, 1, D, device="cuda", generator=g).bfloat16()
    kc = torch.randn(B, HKV, Sk, D, device="cuda", generator=g).bfloat16()
    vc = torch.randn(B, HKV, Sk, D, device="cuda", generator=g).bfloat16()
    lens = torch.full((B,), Sk, dtype=torch.int32, device="cuda")

    def flash():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)

    out = {}
    for name in order:
        out[name] = flash if name == "sdpa-flash" else (
            lambda name=name: attnkit.attention_with_kvcache(q, kc, vc, lens, backend=name))
    return out


def _gpu_us(fn, flush, n=40) -> float:
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(n)]
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # ~25 ms: the queue below is enqueued long before it ends
    for a, b in ev:
        if flush is not None:
            flush.zero_()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3


def child(lengths, order) -> dict:
    from attnkit.bench import timing
    from attnkit.bench.timing import host_us

    dev = torch.device("cuda", 0)
    timing.prepare(dev)
    flush = timing._flush_buffer(dev)
    rows = {}
    for Sk in lengths:
        gb = 2 * B * HKV * Sk * D * 2 / 1e9
        for name, fn in _contenders(Sk, order).items():
            fn()
            torch.cuda.synchronize()
            bench = timing.measure(fn, dev).median_ms * 1e3
            rows[f"{name} {Sk}"] = {
                "bench_us": round(bench, 1), "bench_tbs": round(gb / bench * 1e3, 2),
                "gpu_flush_us": round(_gpu_us(fn, flush), 1),
                "gpu_us": round(_gpu_us(fn, None), 1),
                "host_us": round(host_us(fn), 1),
            }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=6)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--contenders", nargs="+", default=["sdpa-flash", "triton", "cupy"],
                    help="timed in this order in every process")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.lengths, args.contenders)))
        return
    procs = []
    for _ in range(args.procs):
        r = subprocess.run([sys.executable, __file__, "--child", "--lengths",
                            *map(str, args.lengths), "--contenders", *args.contenders],
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)
            continue
        procs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"{'proc':>4} {'case':<18} {'bench us':>9} {'TB/s':>6} {'gpu+flush':>10} "
          f"{'gpu':>7} {'host':>7}")
    for i, rows in enumerate(procs):
        for case, r in rows.items():
            print(f"{i:>4} {case:<18} {r['bench_us']:9.1f} {r['bench_tbs']:6.2f} "
                  f"{r['gpu_flush_us']:10.1f} {r['gpu_us']:7.1f} {r['host_us']:7.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": "cuda", "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "processes": procs}, f, indent=1)


if __name__ == "__main__":
    main()
