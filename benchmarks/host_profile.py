"""Where the host time of one call goes: wall time per call (back to back, one sync at the
end), GPU time per call (CUDA events, no L2 flush), and a cProfile of the host side.

A call whose host time exceeds its GPU time leaves the GPU waiting: that is what makes small
problems (S=512 forward, decoding at 1k) slower than their kernels. Usage:
``python benchmarks/host_profile.py [--out DIR] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnkit
from attnkit.bench.timing import host_us, wall_us


def _cases():
    dev, bf = "cuda", torch.bfloat16
    r = lambda *s: torch.randn(*s, device=dev, dtype=bf)  # noqa: E731
    tiny = [r(1, 1, 1, 16) for _ in range(3)]
    s512 = [r(32, 16, 512, 128) for _ in range(3)]
    s512g = [t.clone().requires_grad_() for t in s512]
    do512 = torch.randn_like(s512[0])
    q1 = r(16, 32, 1, 128)
    kc, vc = r(16, 8, 1024, 128), r(16, 8, 1024, 128)
    lens = torch.full((16,), 1024, dtype=torch.int32, device=dev)

    def sdpa_flash(q, k, v, **kw):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, **kw)

    def fwd_bwd(fn):
        def run():
            out = fn()
            torch.autograd.backward(out, do512)
        return run

    # As the bench times it: (B, S, H, D) leaves passed as transposed views, autograd.grad.
    leaves = [r(32, 512, 16, 128).requires_grad_() for _ in range(3)]
    bshd = [t.transpose(1, 2) for t in leaves]
    do_bshd = r(32, 512, 16, 128).transpose(1, 2)

    def fwd_grad(fn):
        return lambda: torch.autograd.grad(fn(), leaves, do_bshd)

    cases = {}
    for b in ("triton", "cupy"):
        cases[f"{b} fwd tiny"] = lambda b=b: attnkit.attention(*tiny, causal=True, backend=b)
        cases[f"{b} fwd S512 D128"] = lambda b=b: attnkit.attention(*s512, causal=True,
                                                                    backend=b)
        cases[f"{b} fwd+bwd S512 D128"] = fwd_bwd(
            lambda b=b: attnkit.attention(*s512g, causal=True, backend=b))
        cases[f"{b} fwd+grad S512 D128 bshd"] = fwd_grad(
            lambda b=b: attnkit.attention(*bshd, causal=True, backend=b))
        cases[f"{b} decode 1k"] = lambda b=b: attnkit.attention_with_kvcache(
            q1, kc, vc, lens, causal=True, backend=b)
    cases["sdpa-flash fwd tiny"] = lambda: sdpa_flash(*tiny, is_causal=True)
    cases["sdpa-flash fwd S512 D128"] = lambda: sdpa_flash(*s512, is_causal=True)
    cases["sdpa-flash fwd+bwd S512 D128"] = fwd_bwd(lambda: sdpa_flash(*s512g, is_causal=True))
    cases["sdpa-flash fwd+grad S512 D128 bshd"] = fwd_grad(lambda: sdpa_flash(*bshd,
                                                                              is_causal=True))
    cases["sdpa-flash decode 1k"] = lambda: sdpa_flash(q1, kc, vc, enable_gqa=True)
    return cases


def _gpu_us(fn, n):
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(n)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in ev)[n // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    out = Path(args.out) if args.out else None
    rows = {}
    profiles = []
    for name, fn in _cases().items():
        if args.only and not any(o in name for o in args.only):
            continue
        try:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        except Exception as e:  # report, go on with the others
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        wall, host = wall_us(fn, args.calls), host_us(fn, args.calls)
        gpu = _gpu_us(fn, min(args.calls, 50))
        rows[name] = {"wall_us": round(wall, 1), "host_us": round(host, 1),
                      "event_us": round(gpu, 1)}
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("tottime").print_stats(18)
        profiles.append(f"==== {name} ({args.calls} calls)\n{s.getvalue()}")
    print(f"{'case':<30} {'wall us':>9} {'host us':>9} {'event us':>9}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<30} {r['error']}")
        else:
            print(f"{name:<30} {r['wall_us']:9.1f} {r['host_us']:9.1f} {r['event_us']:9.1f}")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "host_profile.txt").write_text("\n".join(profiles))
        (out / "host_profile.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
             "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
