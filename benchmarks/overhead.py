"""Per-call overhead of attnkit's front door: validation, cached selection, autograd wrapper.

Measured on a tiny problem (compute negligible) as the median of many calls, against calling
the backend's ``forward`` directly. Usage: ``python benchmarks/overhead.py [--device cuda]
[--backend NAME] [--out FILE]``.
"""

import argparse
import json
import platform
import statistics
import time

import torch

import attnkit
from attnkit.registry import registry
from attnkit.spec import AttentionProblem


def per_call_us(fn, n=20000, repeats=7):
    for _ in range(200):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None, help="default: the automatic choice")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    q, k, v = (torch.randn(1, 1, 1, 16, device=args.device, dtype=dtype) for _ in range(3))
    problem = AttentionProblem.from_tensors(q, k, v, causal=True)
    name = args.backend or registry.explain(problem).chosen
    backend = registry.select(problem, name)
    n = 2000 if args.device == "cuda" else 20000
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def timed(fn):
        def run():
            fn()
        us = per_call_us(run, n=n)
        sync()
        return us

    rows = {
        "validate (AttentionProblem.from_tensors)": timed(
            lambda: AttentionProblem.from_tensors(q, k, v, causal=True)),
        "select, cached (registry.select)": timed(lambda: registry.select(problem, None)),
        "backend.forward directly": timed(lambda: backend.forward(problem, q, k, v, None)),
        "attnkit.attention()": timed(
            lambda: attnkit.attention(q, k, v, causal=True, backend=name)),
    }
    rows["overhead of attention() over forward"] = (
        rows["attnkit.attention()"] - rows["backend.forward directly"])
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda"
              else platform.processor() or platform.machine(),
              "backend": name, "torch": torch.__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "us_per_call": rows}
    for key, us in rows.items():
        print(f"{key:<44} {us:8.2f} us")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
