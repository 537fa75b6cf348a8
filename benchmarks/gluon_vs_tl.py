"""Gluon against ``tl`` at short lengths: where auto mode should switch (`_hopper._MIN_SEQLEN`).

bf16, the grid's shapes (B*S = 16k tokens, H*D = 2048, (B, S, H, D) views) at S = 512..4k,
head dim 64 and 128, causal and not. The triton backend's forward and backward are called
directly (no autograd), each path forced in turn (``ATTNKIT_TRITON_GLUON(_BWD)=0`` / ``=1``)
in one process; microseconds, the minimum over `attnkit.bench.timing.measure` (L2 flushed
before each call). Run in the eleventh session on an H200 (`h200/gluon-vs-tl-short.json`).

    python benchmarks/gluon_vs_tl.py --out gluon-vs-tl.json     # needs an sm_90 GPU
"""

from __future__ import annotations

import argparse
import functools
import os

import torch
from _gpu_profile import record  # benchmarks/, beside this script

from attnkit.bench import runner, timing
from attnkit.bench.grid import Shape
from attnkit.registry import registry
from attnkit.spec import AttentionProblem

SWITCHES = {"fwd": "ATTNKIT_TRITON_GLUON", "bwd": "ATTNKIT_TRITON_GLUON_BWD"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    return record(p.parse_args().out, _rows())


def _rows():
    for D in (64, 128):
        for causal in (False, True):
            for S in (512, 1024, 2048, 4096):
                shape = Shape(16384 // S, 2048 // D, S, D, causal, "bf16")
                _, (q, k, v), dout = runner.grid_inputs(shape, "bshd", torch.device("cuda"), 0)
                q, k, v, dout = (t.detach() for t in (q, k, v, dout))
                problem = AttentionProblem.from_tensors(q, k, v, causal=causal)
                be = registry.select(problem, "triton")
                out, lse = be.forward(problem, q, k, v, None)
                calls = {"fwd": functools.partial(be.forward, problem, q, k, v, None),
                         "bwd": functools.partial(be.backward, problem, q, k, v, out, lse,
                                                  dout, None)}
                row = {"D": D, "causal": causal, "S": S}
                for mode, env in SWITCHES.items():
                    for path, value in (("tl", "0"), ("gluon", "1")):
                        os.environ[env] = value
                        t = timing.measure(calls[mode], "cuda", rep_ms=60)
                        row[f"{mode}_{path}"] = round(t.min_ms * 1e3, 1)
                    del os.environ[env]
                yield row


if __name__ == "__main__":
    raise SystemExit(main())
