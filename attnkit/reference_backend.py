"""The reference as a backend: selectable by name (``backend="reference"``), never chosen
automatically. Built in, but registered through the same hook as any plugin."""

from __future__ import annotations

import torch

from . import reference
from .backend import Backend, Capabilities
from .hookspecs import hookimpl


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 accumulate in fp32, as the spec asks of every backend.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _options(problem, seqlens_k):
    return dict(causal=problem.causal, scale=problem.scale, window=problem.window,
                seqlens_k=seqlens_k, softcap=problem.softcap)


class ReferenceBackend(Backend):
    name = "reference"
    description = "materialized max-subtracted softmax in PyTorch (the oracle; slow, O(S^2) memory)"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        head_dim_max=1 << 16,
        lse_grad=True,
        dropout=True,
    )

    def forward(self, problem, q, k, v, seqlens_k, dropout=None):
        ct = _compute_dtype(q.dtype)
        out, lse = reference.safe(q.to(ct), k.to(ct), v.to(ct), dropout=dropout,
                                  **_options(problem, seqlens_k))
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return out.to(q.dtype), lse.to(lse_dtype)

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k, dlse=None, dropout=None):
        # Explicit formulas, not autograd: this also runs inside the torch.compile custom
        # op, where autograd is switched off.
        ct = _compute_dtype(q.dtype)
        dq, dk, dv = reference.backward(*(t.to(ct) for t in (q, k, v, out, lse, dout)),
                                        dlse=None if dlse is None else dlse.to(ct),
                                        dropout=dropout, **_options(problem, seqlens_k))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@hookimpl
def attnkit_register_backends(register):
    register(ReferenceBackend(), priority=None)
