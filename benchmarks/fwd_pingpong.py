"""The Gluon forward with and without ping-pong (`_hopper._PINGPONG`), beside SDPA's flash and
cuDNN kernels, on the grid's shapes.

Per cell (B*S = 16k tokens, H*D = 2048, (B, S, H, D) views, fp16 and bf16, head dim 64 and
128, causal and not, S = 512..16k): both variants' out and lse are compared bitwise (the
turns change only when each warpgroup issues, not what it computes), then the four contenders
are timed in ``--rounds`` interleaved rounds (`attnkit.bench.timing.measure`, L2 flushed
before each call); TFLOP/s of the median over rounds of each round's median. Run in the
fifteenth session on an H200 (`h200/fwd-pingpong.json`).

    python benchmarks/fwd_pingpong.py --out fwd-pingpong.json     # needs an sm_90 GPU
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from _gpu_profile import write_rows  # benchmarks/, beside this script
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.bench import runner, timing
from attnkit.bench.grid import Shape
from attnkit.spec import AttentionProblem
from attnkit_triton import _hopper

SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
PEERS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def _contenders(problem, q, k, v, causal):
    """name -> call: the Gluon forward without and with turns (plans built here, outside
    `_forward_plan`'s cache), then SDPA's kernels on the (B, H, S, D) views."""
    views = _hopper._layout(q, k, v)[0]
    calls = {}
    for name, turns in (("gluon", False), ("pingpong", True)):
        saved = _hopper._PINGPONG[problem.head_dim]
        _hopper._PINGPONG[problem.head_dim] = turns
        try:
            plan = _hopper._forward_plan.__wrapped__(problem, views)
        finally:
            _hopper._PINGPONG[problem.head_dim] = saved
        calls[name] = (lambda plan=plan: _hopper.launch_forward(problem, q, k, v, plan))
    for name, backend in PEERS.items():
        def peer(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        calls[name] = peer
    return calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--head-dims", default="128,64")
    args = p.parse_args()
    rows = []
    for dtype in args.dtypes.split(","):
        for D in (int(d) for d in args.head_dims.split(",")):
            for causal in (False, True):
                for S in SEQLENS:
                    shape = Shape(16384 // S, 2048 // D, S, D, causal, dtype)
                    _, (q, k, v), _ = runner.grid_inputs(shape, "bshd", torch.device("cuda"), 0)
                    q, k, v = (t.detach() for t in (q, k, v))
                    problem = AttentionProblem.from_tensors(q, k, v, causal=causal)
                    calls = _contenders(problem, q, k, v, causal)
                    (o0, l0), (o1, l1) = calls["gluon"](), calls["pingpong"]()
                    same = bool(torch.equal(o0, o1) and torch.equal(l0, l1))
                    times = {name: [] for name in calls}
                    for _ in range(args.rounds):
                        for name, call in calls.items():
                            t = timing.measure(call, "cuda", rep_ms=40)
                            times[name].append(t.median_ms)
                    flops = 4 * shape.batch * shape.heads * S * S * D / (2 if causal else 1)
                    row = {"dtype": dtype, "D": D, "causal": causal, "S": S, "same": same}
                    for name, ms in times.items():
                        row[name] = round(flops / statistics.median(ms) / 1e9, 1)
                    row["pingpong/gluon"] = round(row["pingpong"] / row["gluon"], 3)
                    row["pingpong/cudnn"] = round(row["pingpong"] / row["cudnn"], 3)
                    row["gluon/cudnn"] = round(row["gluon"] / row["cudnn"], 3)
                    rows.append(row)
                    print(row, flush=True)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
