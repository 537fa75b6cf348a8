"""Conformance under ``torch.compile(fullgraph=True)``: the call goes through attnkit's
custom op (fake shapes while tracing, the backend at run time) and must give eager's
results. Inductor compiles the graph on a GPU; on CPU ``aot_eager`` (the same custom op
and autograd path, without inductor's CPU code generation, which is not attnkit's)."""

from __future__ import annotations

import random

import torch

import attnkit
from attnkit.testing.cases import Case, _primary_dtype


def test_compile_fullgraph_matches_eager(backend, backend_name, device, quick):
    """out bit for bit eager's (the same kernels run); gradients within the accuracy rule
    (a backend may take a different backward path between calls, e.g. one with atomics)."""
    caps = backend.capabilities
    S = 64 if quick else 256
    case = Case(batch=2, heads_q=4, heads_kv=2 if caps.gqa else 4, seqlen_q=S, seqlen_k=S,
                head_dim=max(caps.head_dim_min, min(64, caps.head_dim_max)),
                dtype=_primary_dtype(caps), causal=caps.causal,
                seqlens_k="random" if caps.seqlens_k else None, grad=caps.backward)
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, lens = case.make_inputs(device, gen)
    q, k, v = (t.requires_grad_(case.grad) for t in (q, k, v))
    weight = torch.randn(q.shape, generator=gen).to(device, q.dtype)

    def step(q, k, v):
        out = attnkit.attention(q, k, v, causal=case.causal, seqlens_k=lens,
                                backend=backend_name)
        # A linear loss: its gradient, dout, is `weight` exactly, in eager and compiled alike.
        return out, (out.float() * weight.float()).sum()

    compiler = "aot_eager" if device.startswith("cpu") else "inductor"
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    where = f"[seed {seed}] {case.id} ({compiler})"
    results = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        out, loss = fn(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v)) if case.grad else None
        results[name] = (out.detach(), loss.detach(), grads)
    (out_e, loss_e, grads_e), (out_c, loss_c, grads_c) = results["eager"], results["compiled"]
    assert torch.equal(out_c, out_e), f"{where}: compiled out differs from eager's"
    # Inductor sums the loss's terms in its own order: allow the fp32 rounding of such a sum
    # (their magnitudes' sum times 1e-6), not a fixed relative error of a sum that cancels.
    atol = 1e-6 * float((out_e.float() * weight.float()).abs().sum())
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=atol, msg=lambda m: f"{where}: {m}")
    if case.grad:
        for name, grads in (("eager", grads_e), ("compiled", grads_c)):
            verdicts = case.judge(q, k, v, lens, weight, grads=grads)
            bad = [msg for ok, msg in verdicts if not ok]
            assert not bad, f"{where}: {name} gradients: " + "; ".join(bad)
