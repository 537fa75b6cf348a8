"""Why triton's fwd+bwd cell at causal S=16k takes longer than its fwd and bwd cells together.

The grids of 2026-11-22 (H100) and 2026-12-02 (H200) both show it (benchmarks/NOTES.md, ninth
session): +3 to +17% at S=16k causal (B=1), within -8..+5% everywhere else and for cuDNN.
This times, with the grid's own inputs, calls and method (`attnkit.bench.runner.grid_inputs`,
`mode_call`, `timing.measure`: L2 flushed, CUDA events, median), the three modes at a few
(B, S) so the effect can be pinned on the batch or the seqlen, with each Gluon path on and
off, and profiles a few calls of each mode to say whether a kernel got slower (per-kernel
device time) or the GPU sat idle (busy < wall). Run in the tenth session
(`h200/fwd-bwd-gap.json`, by this script's first version, which drew its own random inputs
and defined the same three calls itself): -4..+5% everywhere, GPU busy 97-99%; the grid's
excess came from its backend-major order, since changed (`attnkit/bench/runner.py`).

    python benchmarks/fwd_bwd_gap.py --out gap.json     # needs an sm_90 GPU
"""

from __future__ import annotations

import argparse
import os

import torch
from _gpu_profile import kernel_profile, write_rows  # benchmarks/, beside this script

import attnkit
from attnkit.bench import runner, timing
from attnkit.bench.grid import Shape

SHAPES = [(2, 8192, True), (1, 16384, True), (2, 16384, True), (1, 8192, True),
          (1, 16384, False)]
PATHS = {"gluon fwd+bwd": {}, "tl fwd": {"ATTNKIT_TRITON_GLUON": "0"},
         "tl bwd": {"ATTNKIT_TRITON_GLUON_BWD": "0"}}


def _triton(q, k, v, causal):
    return attnkit.attention(q, k, v, causal=causal, backend="triton")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for B, S, causal in SHAPES:
        # The grid's own inputs and timed calls: bf16, H=16, D=128, (B, S, H, D) views.
        leaves, views, dout = runner.grid_inputs(Shape(B, 16, S, 128, causal, "bf16"), "bshd",
                                                 torch.device("cuda"), 0)
        for path, env in PATHS.items():
            for key in ("ATTNKIT_TRITON_GLUON", "ATTNKIT_TRITON_GLUON_BWD"):
                os.environ.pop(key, None)
            os.environ.update(env)
            fns = {mode: runner.mode_call(_triton, mode, leaves, views, dout, causal)
                   for mode in ("fwd", "bwd", "fwd_bwd")}
            row = {"B": B, "S": S, "causal": causal, "path": path}
            for mode, fn in fns.items():
                fn()
                t = timing.measure(fn, "cuda", first_call_done=True)
                kernels, busy, wall = kernel_profile(fn)
                row[mode] = {"median_ms": t.median_ms, "min_ms": t.min_ms,
                             "busy_us": busy, "wall_us": wall, "kernels_us": kernels}
            row["excess"] = row["fwd_bwd"]["median_ms"] / (
                row["fwd"]["median_ms"] + row["bwd"]["median_ms"]) - 1
            rows.append(row)
            print(f"B={B} S={S:5} {'causal' if causal else 'full  '} {path:14} "
                  f"fwd {row['fwd']['median_ms']:.3f} bwd {row['bwd']['median_ms']:.3f} "
                  f"fwd_bwd {row['fwd_bwd']['median_ms']:.3f} excess {row['excess']:+.1%} "
                  f"busy/wall fwd_bwd {row['fwd_bwd']['busy_us']:.0f}/"
                  f"{row['fwd_bwd']['wall_us']:.0f} us", flush=True)
            for mode in ("fwd", "bwd", "fwd_bwd"):
                top = sorted(row[mode]["kernels_us"].items(), key=lambda kv: -kv[1])[:4]
                print(f"    {mode:8}" + "  ".join(f"{n[:28]} {us:.0f}" for n, us in top))
        del leaves, views, dout
        timing.release_memory(torch.device("cuda"), collect=True)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
