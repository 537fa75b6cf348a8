"""Launch the triton split-KV decode kernel a few times with a given (block_n, warps, stages),
for a profiler to pick one launch (gpu_session.sh decode-d256). Prints the time of the last.

    python benchmarks/decode_launch.py --block-n 32 --warps 4 --stages 3 [--head-dim 256]
"""

from __future__ import annotations

import argparse
import time

import torch
from attnkit_triton import decode

from attnkit.spec import AttentionProblem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block-n", type=int, required=True)
    ap.add_argument("--warps", type=int, required=True)
    ap.add_argument("--stages", type=int, required=True)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--keys", type=int, default=4096)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    g = torch.Generator(a.device).manual_seed(0)
    B, Hq, Hkv = 16, 32, 8  # decode_perf.py's workload

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=a.device, dtype=dtype)

    q, k, v = randn(B, Hq, 1, a.head_dim), randn(B, Hkv, a.keys, a.head_dim), \
        randn(B, Hkv, a.keys, a.head_dim)
    problem = AttentionProblem.from_tensors(q, k, v, causal=True)
    for _ in range(a.launches):
        t0 = time.perf_counter()
        decode.decode_forward(problem, q, k, v, None, block_n=a.block_n, num_warps=a.warps,
                              num_stages=a.stages)
        if a.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    tb = 2 * k.numel() * k.element_size() / seconds / 1e12
    print(f"D={a.head_dim} {a.dtype} {a.keys} keys, block_n={a.block_n} warps={a.warps} "
          f"stages={a.stages}, splits={decode.num_splits(problem)}: last launch "
          f"{seconds * 1e3:.3f} ms wall ({tb:.3f} TB/s of K+V, host time included)")


if __name__ == "__main__":
    main()
