"""Per-cell ratios of one attnkit backend against SDPA-flash and cuDNN from a bench.json.

    python benchmarks/ratios.py benchmarks/h100/bench.json triton
"""

import json
import sys


def main(path, backend):
    cells = json.load(open(path))["cells"]
    t = {}
    for c in cells:
        if c["status"] == "ok":
            key = (c["dtype"], c["head_dim"], c["causal"], c["seqlen_q"], c["mode"])
            t.setdefault(key, {})[c["backend"]] = c["tflops"]
    modes = ("fwd", "fwd_bwd")
    print(f"{backend}: throughput ratio vs sdpa-flash / sdpa-cudnn, fwd | fwd+bwd")
    worst = {}
    for dtype in ("bf16", "fp16"):
        for d in (64, 128):
            for causal in (False, True):
                print(f"{dtype} D={d} {'causal' if causal else 'non-causal'}")
                for s in sorted({k[3] for k in t}):
                    parts = []
                    for m in modes:
                        row = t.get((dtype, d, causal, s, m), {})
                        if backend not in row:
                            parts.append("   n/a    ")
                            continue
                        f = row[backend] / row["sdpa-flash"]
                        # A run without cuDNN (--backends) has no cuDNN column: nan.
                        c = row[backend] / row.get("sdpa-cudnn", float("nan"))
                        worst.setdefault(("flash", m), []).append((f, dtype, d, causal, s))
                        if d == 128 and s >= 4096 and "sdpa-cudnn" in row:
                            worst.setdefault(("cudnn D128 S>=4k", m), []).append(
                                (c, dtype, d, causal, s))
                        parts.append(f"{f:4.2f} {c:4.2f}  {row[backend]:5.0f}")
                    print(f"  {s:>6}  " + " | ".join(parts))
    for key, vals in sorted(worst.items()):
        lo, hi = min(vals), max(vals)
        print(f"ratio vs {key[0]} ({key[1]}): min {lo[0]:.2f} at {lo[1:]}, "
              f"max {hi[0]:.2f} at {hi[1:]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
