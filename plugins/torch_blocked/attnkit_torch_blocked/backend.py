"""The attnkit `Backend` around `blocked_forward` / `blocked_backward`."""

from __future__ import annotations

import torch

from attnkit.backend import Backend, Capabilities
from attnkit.paged import forward_paged_via_dense
from attnkit.varlen import as_dense, host_sequences

from .blocked import BlockSizes, blocked_backward, blocked_forward


def _runs(sequences):
    """Consecutive sequences of equal ``(Lq, Lk)`` merged into ``(q0, q1, k0, k1, n, d)``:
    their rows are ``n`` equal blocks, one dense batch of ``n`` (an equal-length packing is
    one call) whose first is sequence ``d`` (dropout's batch index). Sequences without
    queries or without keys are left out (0 / -inf, as set)."""
    runs = []
    last = None  # the sequence before this one, to merge only neighbours
    for d, (q0, q1, k0, k1) in enumerate(sequences):
        if q1 == q0 or k1 == k0:
            continue
        if runs and last == d - 1:
            a0, a1, b0, b1, n, d0 = runs[-1]
            if a1 == q0 and b1 == k0 and (a1 - a0) == n * (q1 - q0) and (b1 - b0) == n * (
                    k1 - k0):
                runs[-1] = (a0, q1, b0, k1, n + 1, d0)
                last = d
                continue
        runs.append((q0, q1, k0, k1, 1, d))
        last = d
    return runs


def _at(dropout, d):
    return None if dropout is None else dropout.at_batch(d)


def _stat(t, q0, q1, n):
    """Columns ``[q0, q1)`` of a per-row ``(Hq, total_q)`` statistic as ``(n, Hq, L)``."""
    return t[:, q0:q1].unflatten(1, (n, -1)).transpose(0, 1)


class TorchBlockedBackend(Backend):
    """FlashAttention-2 in PyTorch ops; runs wherever torch does.

    Block sizes: ``block_q``/``block_k`` here, else the ``ATTNKIT_TORCH_BLOCKED_BLOCKS`` env
    var (``"BQxBK"``), else per device and problem size (`blocked.default_block_sizes`).
    """

    name = "torch-blocked"
    description = ("FlashAttention-2 (online softmax over blocks) in PyTorch ops; "
                   "O(S) memory, any device")
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        head_dim_min=1,
        head_dim_max=256,
        causal=True, gqa=True, window=True, seqlens_k=True, softcap=True, lse=True,
        backward=True,
        # Tiles are visited in a fixed order and accumulated without atomics.
        deterministic=True,
        lse_grad=True,
        varlen=True,
        dropout=True,
        paged=True,
    )

    def __init__(self, block_q: int | None = None, block_k: int | None = None):
        if (block_q is None) != (block_k is None):
            raise ValueError("give both block_q and block_k, or neither")
        self.blocks = None if block_q is None else BlockSizes(block_q, block_k)

    def _options(self, problem, seqlens_k):
        return dict(scale=problem.scale, band=problem.band, seqlens_k=seqlens_k,
                    softcap=problem.softcap, blocks=self.blocks)

    def forward(self, problem, q, k, v, seqlens_k, dropout=None):
        return blocked_forward(q, k, v, dropout=dropout, **self._options(problem, seqlens_k))

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k, dlse=None, dropout=None):
        return blocked_backward(q, k, v, out, lse, dout, dlse=dlse, dropout=dropout,
                                **self._options(problem, seqlens_k))

    # Paged caches: each row's pages gathered into a sequence-major copy (one host read of
    # the longest fill level), then the dense blocked forward with seqlens_k.
    def forward_paged(self, problem, q, k_pages, v_pages, block_table, seqlens_k):
        return forward_paged_via_dense(self.forward, problem, q, k_pages, v_pages,
                                       block_table, seqlens_k)

    # Packed batches: the offsets are read on the host once, and each run of consecutive
    # equal-length sequences is one dense blocked call on views of the packed tensors.
    def forward_varlen(self, problem, q, k, v, cu_seqlens_q, cu_seqlens_k, dropout=None):
        opts = self._options(problem, None)
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"),
                         dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                         device=q.device)
        for q0, q1, k0, k1, n, d in _runs(host_sequences(problem, cu_seqlens_q, cu_seqlens_k,
                                                         q.shape[0], k.shape[0])):
            o, m = blocked_forward(as_dense(q, q0, q1, n), as_dense(k, k0, k1, n),
                                   as_dense(v, k0, k1, n), dropout=_at(dropout, d), **opts)
            as_dense(out, q0, q1, n).copy_(o)
            lse[:, q0:q1].unflatten(1, (n, -1)).copy_(m.transpose(0, 1))
        return out, lse

    def backward_varlen(self, problem, q, k, v, out, lse, dout, cu_seqlens_q, cu_seqlens_k,
                        dlse=None, dropout=None):
        opts = self._options(problem, None)
        dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        for q0, q1, k0, k1, n, d in _runs(host_sequences(problem, cu_seqlens_q, cu_seqlens_k,
                                                         q.shape[0], k.shape[0])):
            grads = blocked_backward(
                as_dense(q, q0, q1, n), as_dense(k, k0, k1, n), as_dense(v, k0, k1, n),
                as_dense(out, q0, q1, n), _stat(lse, q0, q1, n), as_dense(dout, q0, q1, n),
                dlse=None if dlse is None else _stat(dlse, q0, q1, n), dropout=_at(dropout, d),
                **opts)
            for g, t, r0, r1 in zip(grads, (dq, dk, dv), (q0, k0, k0), (q1, k1, k1)):
                as_dense(t, r0, r1, n).copy_(g)
        return dq, dk, dv
