"""Every rank of a ring in one process: `ring_attention`'s blocks, merges and gradients
without a process group, for the conformance suite (a backend's part in context
parallelism is checked wherever ``attnkit check`` runs) and for timing one rank's steps."""

from __future__ import annotations

import torch

from .layout import global_to_storage, storage_to_global
from .ring import RingCall


def simulate_ring(q, k, v, dout=None, *, world: int, layout: str = "headtail",
                  comm: str = "p2p", causal=False, scale=None, window=None, softcap=None,
                  backend=None):
    """``(out, lse, grads)`` of `ring_attention` over ``world`` ranks, on the whole sequence
    ``q (B, Hq, S, D)``, ``k``/``v (B, Hkv, S, D)`` in global order: the blocks each rank's
    backend would run, merged as the ranks merge them; ``grads`` = ``(dq, dk, dv)`` for the
    loss ``sum(out * dout)``, or None without ``dout``."""
    local = q.shape[2] // world

    def shards(t):
        t = global_to_storage(t, 2, world, layout)
        return [t.narrow(2, r * local, local) for r in range(world)]

    def whole(parts, dtype=None):
        t = torch.cat(parts, dim=2)
        return storage_to_global(t if dtype is None else t.to(dtype), 2, world, layout)

    qs, ks, vs = shards(q), shards(k), shards(v)
    calls = [RingCall(qs[r], ks[r], vs[r], None, r, world, causal, scale, window, softcap,
                      layout, comm, dout is not None, backend) for r in range(world)]
    gathered = torch.stack([k, v])

    def keys(r, t):  # what rank r holds at step t
        if comm == "allgather":
            return gathered
        src = (r - t) % world
        return torch.stack([ks[src], vs[src]])

    outs, lses = [], []
    with torch.no_grad():
        for r, call in enumerate(calls):
            if comm == "allgather":
                out_r, lse_r = call.gathered_forward(qs[r], gathered)
            else:
                out_r, lse_r = call.accumulators(qs[r])
                for t, blocks in enumerate(call.steps):
                    call.forward_step(blocks, qs[r], keys(r, t), out_r, lse_r)
                out_r = out_r.to(q.dtype)
            outs.append(out_r.contiguous())
            lses.append(lse_r)
        out, lse = whole(outs), whole(lses)
        if dout is None:
            return out, lse, None
        douts = [d.contiguous() for d in shards(dout)]
        dqs = []
        dkv = [None] * (1 if comm == "allgather" else world)
        for r, call in enumerate(calls):
            dq = torch.zeros(qs[r].shape, dtype=lses[r].dtype, device=q.device)
            for t, blocks in enumerate(call.steps):
                part = call.backward_step(blocks, qs[r], keys(r, t), outs[r], lses[r],
                                          douts[r], None, dq)
                owner = 0 if comm == "allgather" else (r - t) % world
                dkv[owner] = part if dkv[owner] is None else dkv[owner] + part
            dqs.append(dq)
        dq = whole(dqs, q.dtype)
        if comm == "allgather":
            dk, dv = dkv[0][0].to(k.dtype), dkv[0][1].to(v.dtype)
        else:
            dk, dv = whole([d[0] for d in dkv], k.dtype), whole([d[1] for d in dkv], v.dtype)
    return out, lse, (dq, dk, dv)
