"""Where the host time of one training step's attention goes (triton vs SDPA-flash).

bf16 D=128 causal S=512 B=32 H=16, (B, S, H, D) leaves passed as transposed views (the
bench's layout). Host microseconds per call, calls queued back to back with the GPU held by
`torch.cuda._sleep` so no launch waits on it: the forward with grad, `autograd.grad` of
those outputs, and the triton backend's forward / backward called directly (no autograd).
Also the autograd engine's own cost on CUDA tensors (`autograd.grad` through one built-in
node and through one trivial Python Function) and the host time spent inside our Function's
backward during `autograd.grad`, which splits the engine from our code.
Usage: ``python benchmarks/host_split.py``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnkit
from attnkit.api import _AttentionFunction
from attnkit.registry import registry
from attnkit.spec import AttentionProblem

N = 30


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


def _held(fn, n=N):
    """Host us per call of ``fn(i)``, the GPU kept busy so nothing blocks."""
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


def main():
    r = lambda: torch.randn(32, 512, 16, 128, device="cuda", dtype=torch.bfloat16)  # noqa
    leaves = [r().requires_grad_() for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in leaves)
    dout = r().transpose(1, 2)

    def flash(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    row = {}
    x = torch.randn(8, device="cuda", requires_grad=True)
    gx = torch.randn(8, device="cuda")
    for name, make in (("engine: built-in node", lambda: x * 2),
                       ("engine: trivial Python Function", lambda: _Identity.apply(x))):
        ys = [make() for _ in range(N + 3)]
        for y in ys[N:]:
            torch.autograd.grad(y, x, gx)
        row[name] = _held(lambda i, ys=ys: torch.autograd.grad(ys[i], x, gx))
    for name, fwd in (("triton", lambda: attnkit.attention(q, k, v, causal=True,
                                                           backend="triton")),
                      ("sdpa-flash", lambda: flash(q, k, v))):
        for _ in range(3):
            torch.autograd.grad(fwd(), leaves, dout)
        outs = [None] * N
        row[f"{name} fwd"] = _held(lambda i, o=outs, f=fwd: o.__setitem__(i, f()))
        row[f"{name} grad"] = _held(lambda i, o=outs: torch.autograd.grad(o[i], leaves, dout))
        row[f"{name} fwd+grad"] = _held(
            lambda i, f=fwd: torch.autograd.grad(f(), leaves, dout))
        row[f"{name} fwd, dropped"] = _held(lambda i, f=fwd: f())
    inside, backward = [], _AttentionFunction.backward

    def timed(ctx, *grads):
        t0 = time.perf_counter()
        result = backward(ctx, *grads)
        inside.append((time.perf_counter() - t0) * 1e6)
        return result

    _AttentionFunction.backward = staticmethod(timed)
    try:
        outs = [attnkit.attention(q, k, v, causal=True, backend="triton") for _ in range(N)]
        row["triton grad (timing its node)"] = _held(
            lambda i: torch.autograd.grad(outs[i], leaves, dout))
        row["  inside Function.backward"] = sum(inside) / len(inside)
    finally:
        _AttentionFunction.backward = staticmethod(backward)
    problem = AttentionProblem.from_tensors(q, k, v, causal=True)
    be = registry.select(problem, "triton")
    row["triton Function.apply"] = _held(
        lambda i: _AttentionFunction.apply(q, k, v, None, problem, be))
    row["from_tensors"] = _held(lambda i: AttentionProblem.from_tensors(q, k, v, causal=True))
    with torch.no_grad():
        row["triton attention, no_grad"] = _held(
            lambda i: attnkit.attention(q, k, v, causal=True, backend="triton"))
        out, lse = be.forward(problem, q, k, v, None)
        row["triton backend.forward"] = _held(lambda i: be.forward(problem, q, k, v, None))
        row["triton backend.backward"] = _held(
            lambda i: be.backward(problem, q, k, v, out, lse, dout, None))
        row["torch.empty_like x4"] = _held(lambda i: [torch.empty_like(t) for t in (q, k, v,
                                                                                   out)])
    for key, val in row.items():
        print(f"{key:<28} {val:8.1f} us")


if __name__ == "__main__":
    main()
