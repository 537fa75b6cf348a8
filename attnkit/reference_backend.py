"""The reference as a backend: selectable by name (``backend="reference"``), never chosen
automatically. Built in, but registered through the same hook as any plugin."""

from __future__ import annotations

import torch

from . import reference
from .backend import Backend, Capabilities
from .hookspecs import hookimpl
from .paged import forward_paged_via_dense
from .varlen import as_dense, host_sequences


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
        varlen=True,
        paged=True,
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

    # Paged caches: the definition, the keys each table row addresses laid out in order.
    def forward_paged(self, problem, q, k_pages, v_pages, block_table, seqlens_k):
        return forward_paged_via_dense(self.forward, problem, q, k_pages, v_pages,
                                       block_table, seqlens_k)

    # Packed batches: one dense call per sequence (the definition of varlen attention), with
    # dropout's mask at the sequence's batch index.
    def forward_varlen(self, problem, q, k, v, cu_seqlens_q, cu_seqlens_k, dropout=None):
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype,
                         device=q.device)
        for b, (q0, q1, k0, k1) in enumerate(host_sequences(problem, cu_seqlens_q,
                                                            cu_seqlens_k, q.shape[0],
                                                            k.shape[0])):
            if q1 > q0 and k1 > k0:  # else every row sees no key: 0 / -inf as set
                o, m = self.forward(problem, as_dense(q, q0, q1), as_dense(k, k0, k1),
                                    as_dense(v, k0, k1), None, dropout=_at(dropout, b))
                out[q0:q1] = o[0].transpose(0, 1)
                lse[:, q0:q1] = m[0]
        return out, lse

    def backward_varlen(self, problem, q, k, v, out, lse, dout, cu_seqlens_q, cu_seqlens_k,
                        dlse=None, dropout=None):
        dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        for b, (q0, q1, k0, k1) in enumerate(host_sequences(problem, cu_seqlens_q,
                                                            cu_seqlens_k, q.shape[0],
                                                            k.shape[0])):
            if q1 > q0 and k1 > k0:
                g = self.backward(problem, as_dense(q, q0, q1), as_dense(k, k0, k1),
                                  as_dense(v, k0, k1), as_dense(out, q0, q1),
                                  lse[None, :, q0:q1], as_dense(dout, q0, q1), None,
                                  dlse=None if dlse is None else dlse[None, :, q0:q1],
                                  dropout=_at(dropout, b))
                for grad, t, r0, r1 in zip((dq, dk, dv), g, (q0, k0, k0), (q1, k1, k1)):
                    grad[r0:r1] = t[0].transpose(0, 1)
        return dq, dk, dv


def _at(dropout, b):
    return None if dropout is None else dropout.at_batch(b)


@hookimpl
def attnkit_register_backends(register):
    register(ReferenceBackend(), priority=None)
