"""Host time of a short causal training step on our path, segment by segment.

bf16 D=128 (or ``--head-dim``) causal S=512 (B=32, H=2048/D, (B, S, H, D) views: the grid's
host-bound cells). Host microseconds per call (min and median of 7 batches of 40), calls
queued back to back with the GPU held by ``torch.cuda._sleep`` so no launch waits on it:
our fwd+grad, forward and ``autograd.grad`` beside SDPA-flash's; then the pieces of the
triton backend's forward and backward called directly (route checks, allocations, each
launch, the Gluon launchers), and cProfiles of our backward on the autograd thread and of
the no-grad forward. Complements `host_split.py` (engine against node). Run in the eleventh
session before and after the host path changes, in the sixteenth at head dim 64
(benchmarks/NOTES.md).

    python benchmarks/host_segments.py [--head-dim 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time

import torch
import torch.nn.functional as F
from attnkit_triton import _backward, _configs, _hopper
from attnkit_triton import backend as tb
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnkit
from attnkit.api import _AttentionFunction
from attnkit.registry import registry
from attnkit.spec import AttentionProblem

N = 40


def held(fn, n=N):
    """``(min, median)`` host us per call over 7 batches of ``n``, the GPU kept busy."""
    res = []
    for _ in range(7):
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        res.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return min(res), statistics.median(res)


def _profiled_backward(call, n=100) -> cProfile.Profile:
    """cProfile of our Function's backward, which runs on the autograd engine's thread."""
    prof, orig = cProfile.Profile(), _AttentionFunction.backward

    def backward(ctx, *grads):
        prof.enable()
        try:
            return orig(ctx, *grads)
        finally:
            prof.disable()

    _AttentionFunction.backward = staticmethod(backward)
    try:
        for _ in range(n):
            call()
    finally:
        _AttentionFunction.backward = staticmethod(orig)
    return prof


def training_cell(D=128, S=512, causal=True, dtype=torch.bfloat16):
    """The bench's fwd+bwd cell: ``(leaves, (q, k, v) views, dout, ours, flash)``, the last
    two the forward calls (triton, SDPA-flash)."""
    B, H = 16384 // S, 2048 // D
    leaves = [torch.randn(B, S, H, D, device="cuda", dtype=dtype).requires_grad_()
              for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in leaves)
    dout = torch.randn(B, S, H, D, device="cuda", dtype=dtype).transpose(1, 2)

    def flash():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def ours():
        return attnkit.attention(q, k, v, causal=causal, backend="triton")

    return leaves, (q, k, v), dout, ours, flash


def step_rows(rows: dict, name: str, forward, leaves, dout) -> None:
    """After a warm-up, ``rows[name + " fwd+grad"]`` (a training step) and ``rows[name +
    " fwd (grad), dropped"]`` (its forward alone)."""
    for _ in range(3):
        torch.autograd.grad(forward(), leaves, dout)
    rows[f"{name} fwd+grad"] = held(lambda: torch.autograd.grad(forward(), leaves, dout))
    rows[f"{name} fwd (grad), dropped"] = held(forward)


def host_table(D=128, S=512, causal=True, dtype=torch.bfloat16):
    """``({row: (min, median) us}, cProfile text)`` for one grid shape."""
    leaves, (q, k, v), dout, ours, flash = training_cell(D, S, causal, dtype)
    rows = {}
    for name, f in (("triton", ours), ("flash", flash)):
        step_rows(rows, name, f, leaves, dout)
        outs = iter([f() for _ in range(N)] * 7)
        rows[f"{name} grad"] = held(
            lambda outs=outs: torch.autograd.grad(next(outs), leaves, dout, retain_graph=True))
        with torch.no_grad():
            rows[f"{name} fwd no_grad"] = held(f)
    problem = AttentionProblem.from_tensors(q, k, v, causal=causal)
    be = registry.select(problem, "triton")
    rows["from_tensors"] = held(lambda: AttentionProblem.from_tensors(q, k, v, causal=causal))
    rows["Function.apply"] = held(lambda: _AttentionFunction.apply(q, k, v, None, problem, be))
    short = tb._short(problem)
    with torch.no_grad():
        out, lse = be.forward(problem, q, k, v, None)
        rows["be.forward"] = held(lambda: be.forward(problem, q, k, v, None))
        rows["  use_gluon"] = held(lambda: _hopper.use_gluon(problem, q, k, v))
        if _hopper.use_gluon(problem, q, k, v):
            rows["  hopper.launch_forward"] = held(
                lambda: _hopper.launch_forward(problem, q, k, v))
        rows["be.backward"] = held(lambda: be.backward(problem, q, k, v, out, lse, dout, None))
        rows["  use_gluon_backward"] = held(
            lambda: _hopper.use_gluon_backward(problem, q, k, v, dout))
        cfgs = _configs.backward_configs(D, causal, dtype, q.device, short)
        rows["  use_tma"] = held(lambda: tb.use_tma(problem, q, k, v, dout))
        rows["  prepare"] = held(lambda: _backward.prepare(q, out, lse, dout, 128))
        rows["  empty_like x3"] = held(
            lambda: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))
        rows["  zeros_like f32"] = held(lambda: torch.zeros_like(q, dtype=torch.float32))
        rows["  layout_key"] = held(lambda: _backward.layout_key(q, k, v, dout, None))
        tma = tb.use_tma(problem, q, k, v, dout)
        delta, lse2 = _backward.prepare(q, out, lse, dout, 128).unbind(0)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        rows["  launch_dkdv"] = held(lambda: _backward.launch_dkdv(
            problem, q, k, v, dout, delta, lse2, None, dk, dv, cfgs[0], tma and cfgs[0].tma))
        rows["  launch_dq"] = held(lambda: _backward.launch_dq(
            problem, q, k, v, dout, delta, lse2, None, dq, cfgs[1], tma and cfgs[1].tma))
        os.environ["ATTNKIT_TRITON_GLUON_BWD"] = "1"
        try:
            be.backward(problem, q, k, v, out, lse, dout, None)
            rows["be.backward gluon"] = held(
                lambda: be.backward(problem, q, k, v, out, lse, dout, None))
            rows["  hopper.launch_backward"] = held(
                lambda: _hopper.launch_backward(problem, q, k, v, out, lse, dout))
        finally:
            del os.environ["ATTNKIT_TRITON_GLUON_BWD"]
    text = io.StringIO()
    prof = _profiled_backward(lambda: torch.autograd.grad(ours(), leaves, dout))
    text.write("cProfile: our Function.backward on the autograd thread, 100 calls\n")
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        for _ in range(100):
            ours()
        prof.disable()
    text.write("cProfile: attnkit.attention without grad, 100 calls\n")
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    torch.cuda.synchronize()
    return rows, text.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--head-dim", type=int, default=128,
                   help="64 takes the tl backward at S=512 (`_hopper._MIN_SEQLEN`)")
    args = p.parse_args()
    rows, prof = host_table(D=args.head_dim)
    text = "".join(f"{k:<28} min {mn:8.1f} med {md:8.1f} us\n" for k, (mn, md) in rows.items())
    print(text + prof)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + prof)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
