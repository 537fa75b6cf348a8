"""DeepSpeed-Ulysses: an all-to-all turns sequence shards of every head into whole
sequences of ``1/P`` of the heads; one local `attnkit.attention` call (any backend, any
option); an all-to-all turns the result back. Exact: the all-to-alls only move data."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..api import attention
from ..registry import registry
from ..spec import AttentionProblem, check_lengths_tensor, describe_tensor
from .group import agree, call_signature, comm_device, group_info
from .layout import check_layout, check_local_shards, global_to_storage, storage_to_global

_LAYOUT_CODES = {"headtail": 1, "contiguous": 2}


@torch.compiler.disable  # process-group calls stay eager: a compiled model breaks its graph here
def ulysses_attention(q, k, v, *, group=None, layout="headtail", causal=False, scale=None,
                      window=None, seqlens_k=None, softcap=None, return_lse=False,
                      backend=None):
    """Exact attention over a sequence sharded across the ranks of ``group``, by exchanging
    sequence shards for head shards.

    Every rank passes its shards ``q (B, Hq, S_local, D)``, ``k``/``v (B, Hkv, S_local, D)``
    cut by ``layout`` (as for `ring_attention`; the default ``"headtail"`` matches it, so one
    data loader serves both) and gets its shard of `attnkit.attention` over the whole
    sequence: the same numbers, since the local call is one call over the whole sequence
    for ``Hq / P`` heads. ``Hq`` must be divisible by ``P``. Kv heads are split likewise
    when ``Hkv`` is divisible by ``P``; otherwise each kv head is repeated ``f`` times, the
    least ``f`` making ``f * Hkv`` divisible by ``P`` (its gradients summed back), which
    keeps every query head with its kv head (GQA and MQA with any ``Hkv``).

    The other arguments are `attnkit.attention`'s (``seqlens_k``, counting keys of the whole
    sequence in global positions, must be the same on every rank). Errors, the agreement
    every call starts with, and a rank failing mid-call are as described for
    `ring_attention`: refusals raise on every rank; a failure after the first all-to-all
    makes the others raise when the process group's timeout expires.

    Communication: one all-to-all for q, one for k and v together, one for out (and one for
    lse with ``return_lse``); the backward the same in reverse.
    """
    rank, world = group_info(group)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v))
    fields = dict.fromkeys(("causal", "scale", "window_left", "window_right", "softcap",
                            "layout", "needs_grad", "return_lse", "seqlens_k"), 0)
    error, repeat = None, 1
    try:
        check_layout(layout)
        problem = AttentionProblem.from_tensors(
            q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
            return_lse=return_lse, needs_grad=needs_grad)
        check_local_shards("Ulysses", q, k, world, layout)
        repeat = _kv_repeat(q, k, world)
        if seqlens_k is not None:
            _check_global_lengths(seqlens_k, q, world)
        if not problem.is_empty:  # a backend for the local call, chosen before data moves
            whole = q.shape[2] * world
            registry.select(problem._replace(
                heads_q=q.shape[1] // world, heads_kv=k.shape[1] * repeat // world,
                seqlen_q=whole, seqlen_k=whole, has_seqlens_k=seqlens_k is not None), backend)
        fields.update(causal=problem.causal, scale=problem.scale,
                      window_left=problem.window[0], window_right=problem.window[1],
                      softcap=problem.softcap, layout=_LAYOUT_CODES[layout],
                      needs_grad=needs_grad, return_lse=return_lse,
                      seqlens_k=seqlens_k is not None)
    except Exception as e:  # raised on every rank by `agree`, not on this one alone
        error = e
    like = q if isinstance(q, torch.Tensor) else torch.empty(0)
    agree(group, comm_device(group, like), call_signature({"q": q, "k": k, "v": v}, fields),
          error)
    if problem.is_empty:
        return attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                         seqlens_k=seqlens_k, return_lse=return_lse, backend=backend)
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    qh = _AllToAll.apply(q, True, group, world, layout)
    kvh = _AllToAll.apply(torch.stack([k, v]), True, group, world, layout)
    result = attention(qh, kvh[0], kvh[1], causal=causal, scale=scale, window=window,
                       seqlens_k=seqlens_k, softcap=softcap, return_lse=return_lse,
                       backend=backend)
    if not return_lse:
        return _AllToAll.apply(result, False, group, world, layout)
    out, lse = result
    return (_AllToAll.apply(out, False, group, world, layout),
            _AllToAll.apply(lse.unsqueeze(-1), False, group, world, layout).squeeze(-1))


def _kv_repeat(q, k, world: int) -> int:
    """How many times each kv head is repeated so that the kv heads split over the ranks
    with their query heads: ``f = P / gcd(Hkv, P)``. With ``P | Hq = g * Hkv``, ``f``
    always divides the group size ``g``, so query head ``h`` still reads kv head
    ``h // (g / f)`` of the repeated heads, and those lie on its rank."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq % world:
        raise ValueError(f"{describe_tensor('q', q)}: Ulysses splits the {hq} query heads over "
                         f"{world} ranks, so Hq must be divisible by {world}")
    return world // math.gcd(hkv, world)


def _check_global_lengths(seqlens_k, q, world: int) -> None:
    check_lengths_tensor("seqlens_k", seqlens_k, q, q.shape[0])
    total = q.shape[2] * world
    if seqlens_k.device.type == "cpu" and seqlens_k.numel():
        lo, hi = (int(x) for x in torch.aminmax(seqlens_k))
        if lo < 0 or hi > total:
            raise ValueError(f"{describe_tensor('seqlens_k', seqlens_k)} values must lie in "
                             f"[0, {total}] (the whole sequence), got min {lo}, max {hi}")


def _seq_to_heads(x, group, world: int, layout: str) -> torch.Tensor:
    """``(..., H, S_local, D)`` sequence shards -> ``(..., H / P, S, D)`` head shards, the
    sequence in global order."""
    heads = x.shape[-3]
    send = x.unflatten(-3, (world, heads // world)).movedim(-4, 0).contiguous()
    recv = torch.empty_like(send)  # recv[p]: rank p's sequence shard of this rank's heads
    dist.all_to_all_single(recv, send, group=group)
    whole = recv.movedim(0, -3).flatten(-3, -2)
    return storage_to_global(whole, whole.dim() - 2, world, layout)


def _heads_to_seq(x, group, world: int, layout: str) -> torch.Tensor:
    """The inverse of `_seq_to_heads`."""
    whole = global_to_storage(x, x.dim() - 2, world, layout)
    send = whole.unflatten(-2, (world, whole.shape[-2] // world)).movedim(-3, 0).contiguous()
    recv = torch.empty_like(send)  # recv[p]: this rank's sequence shard of rank p's heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.movedim(0, -4).flatten(-4, -3)


class _AllToAll(torch.autograd.Function):
    """`_seq_to_heads` (``to_heads``) or `_heads_to_seq`, the other one its backward."""

    @staticmethod
    def forward(ctx, x, to_heads, group, world, layout):
        ctx.args = (to_heads, group, world, layout)
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, world, layout)

    @staticmethod
    def backward(ctx, grad):
        to_heads, *args = ctx.args
        back = _heads_to_seq if to_heads else _seq_to_heads
        return back(grad.contiguous(), *args), None, None, None, None
