"""Ring attention: each rank holds a shard of the sequence (queries, keys and values) and
meets every other rank's keys and values, passed around the ring (``comm="p2p"``) or
gathered at once (``comm="allgather"``).

The forward merges the partial results of the ring steps in float32 (float64 for float64
inputs), out and lse, never rounding between steps; the backward calls each backend's
backward with the *global* out and lse of the rows it touches, so each block's gradient is
already its exact share of the whole, and sums dK/dV in the same wide dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..api import attention, autocast_device
from ..backend import check_backward_result, check_forward_result
from ..kvcache import merge_attention
from ..registry import registry
from ..spec import AttentionProblem, check_window
from .group import (
    agree,
    all_gather,
    call_signature,
    comm_device,
    global_rank,
    group_info,
    reduce_scatter,
)
from .layout import (
    check_layout,
    check_local_shards,
    global_to_storage,
    rank_chunks,
    storage_to_global,
)
from .plan import Block, plan

COMMS = ("p2p", "allgather")
_LAYOUT_CODES = {"headtail": 1, "contiguous": 2}
_COMM_CODES = {"p2p": 1, "allgather": 2}


@torch.compiler.disable  # process-group calls stay eager: a compiled model breaks its graph here
def ring_attention(q, k, v, *, group=None, causal=False, scale=None, window=None,
                   softcap=None, layout="headtail", comm="p2p", return_lse=False,
                   backend=None):
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Every rank passes its shards ``q (B, Hq, S_local, D)``, ``k``/``v (B, Hkv, S_local, D)``
    of one problem of length ``S = P * S_local`` (``P`` ranks), cut by ``layout``
    (`attnkit.distributed.shard` cuts a whole sequence that way), and gets its shard of
    ``out`` (and of ``lse``, ``(B, Hq, S_local)``, with ``return_lse``): the same numbers as
    `attnkit.attention` over the whole sequence, up to the rounding of merging exact partial
    results in float32 (float64 for float64 inputs). Queries and keys share positions, so
    ``causal`` and ``window`` mean what they mean for one call with ``Sq == Sk``.

    Arguments:
        group: the process group (default: the whole world). NCCL for CUDA tensors, gloo for
            CPU ones.
        causal, scale, window, softcap, backend: as for `attnkit.attention`; ``backend``
            runs every block (None: the best one for each block).
        layout: ``"headtail"`` (default; rank ``r`` holds chunks ``r`` and ``2P - 1 - r`` of
            ``2P``, so causal work is balanced; ``S_local`` must be even) or
            ``"contiguous"`` (rank ``r`` holds the ``r``-th of ``P`` pieces).
        comm: ``"p2p"`` passes K/V around the ring, ``P - 1`` asynchronous send/receive
            pairs overlapped with each step's compute (the backward passes K/V again, and the
            accumulating dK/dV ``P`` times); ``"allgather"`` gathers K/V once (the backward
            gathers them again and reduce-scatters dK/dV), holding ``S`` keys at a time.
        return_lse: also return this rank's shard of lse. Its gradient reaches q and k on
            backends that declare ``lse_grad``.

    Every call starts with one all-gather of a few integers: shapes, dtypes and options
    that differ across ranks, or an input that some rank refuses (``S_local`` odd under
    head-tail, a bad option, no backend for a block), raise on every rank before any data
    moves (`attnkit.distributed.CallMismatchError` on the ranks that had nothing against
    their own inputs). A failure after that point (a rank that dies or raises mid-call)
    cannot be announced: the other ranks wait in their next send, receive or collective
    until the process group's ``timeout`` (``init_process_group(timeout=...)``) expires,
    and then raise (gloo raises ``RuntimeError``/``DistBackendError`` from the wait; NCCL's
    watchdog aborts the communicator, which takes the process down unless
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` says otherwise). They never wait forever, and they
    never return a partial result.

    Differentiable once (autograd); under ``torch.autocast`` the inputs are cast as
    `attnkit.attention` casts them; inside ``torch.compile`` the call runs eagerly (a graph
    break). Every rank must run the backward of every call that needs one (a loss over
    every rank's output does): the backward communicates.
    """
    device_type = autocast_device(q)
    if device_type is not None:
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (t.to(dtype) if t.dtype in (torch.float32, torch.float16, torch.bfloat16)
                   else t for t in (q, k, v))
        with torch.autocast(device_type, enabled=False):
            return ring_attention(q, k, v, group=group, causal=causal, scale=scale,
                                  window=window, softcap=softcap, layout=layout, comm=comm,
                                  return_lse=return_lse, backend=backend)
    rank, world = group_info(group)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v))
    fields = dict.fromkeys(("causal", "scale", "window_left", "window_right", "softcap",
                            "layout", "comm", "needs_grad", "return_lse"), 0)
    error, setup = None, None
    try:
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
        setup = RingCall(q, k, v, group, rank, world, causal, scale, window, softcap, layout,
                         comm, needs_grad, backend)
        p = setup.problem
        fields.update(causal=p.causal, scale=p.scale, window_left=p.window[0],
                      window_right=p.window[1], softcap=p.softcap, layout=_LAYOUT_CODES[layout],
                      comm=_COMM_CODES[comm], needs_grad=needs_grad, return_lse=return_lse)
    except Exception as e:  # raised on every rank by `agree`, not on this one alone
        error = e
    like = q if isinstance(q, torch.Tensor) else torch.empty(0)
    agree(group, comm_device(group, like), call_signature({"q": q, "k": k, "v": v}, fields),
          error)
    if setup.problem.is_empty:  # nothing to exchange: every rank's shard is empty alike
        return attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                         return_lse=return_lse, backend=backend)
    if needs_grad:
        out, lse = _RingFunction.apply(q, k, v, setup)
    else:
        out, lse = setup.forward(q, k, v)
    return (out, lse) if return_lse else out


class RingCall:
    """One call's validated problem and its plan: for each step, the blocks this rank
    computes and the backend each block runs on (selected before any data moves, so that a
    block no backend can run is refused on every rank alike)."""

    def __init__(self, q, k, v, group, rank, world, causal, scale, window, softcap, layout,
                 comm, needs_grad, backend):
        check_layout(layout)
        if comm not in COMMS:
            raise ValueError(f"comm must be one of {COMMS}, got {comm!r}")
        self.problem = AttentionProblem.from_tensors(
            q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
            return_lse=True, needs_grad=needs_grad)
        check_local_shards("ring attention", q, k, world, layout)
        self.group, self.rank, self.world = group, rank, world
        self.layout, self.comm, self.backend_name = layout, comm, backend
        if self.problem.is_empty:
            return
        local = q.shape[2]
        left, right = self.problem.band
        mine = rank_chunks(rank, world, local, layout)
        if comm == "p2p":  # step t holds the keys of rank (rank - t) mod P
            self.steps = [plan(mine, rank_chunks((rank - t) % world, world, local, layout),
                               left, right) for t in range(world)]
        else:  # one step, against the gathered keys in global order
            self.steps = [plan(mine, [(0, local * world)], left, right)]
        self.backends = {b: self._select(b, needs_grad) for blocks in self.steps for b in blocks}

    def _select(self, block: Block, needs_grad: bool):
        options = block.options()
        problem = self.problem._replace(
            seqlen_q=block.q1 - block.q0, seqlen_k=block.k1 - block.k0,
            causal=options["causal"], window=check_window(options["window"]),
            needs_grad=needs_grad)
        return problem, registry.select(problem, self.backend_name)

    # -- communication ---------------------------------------------------------------------

    def _rotate(self, send: torch.Tensor, recv: torch.Tensor):
        """Start sending ``send`` to the next rank and receiving ``recv`` from the previous."""
        nxt = global_rank(self.group, (self.rank + 1) % self.world)
        prv = global_rank(self.group, (self.rank - 1) % self.world)
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, nxt, self.group),
                                       dist.P2POp(dist.irecv, recv, prv, self.group)])

    def _gather_kv(self, k, v) -> torch.Tensor:
        """``(2, B, Hkv, S, D)``: every rank's K and V, in global sequence order."""
        kv = torch.stack([k, v])
        gathered = kv.new_empty((self.world * 2, *kv.shape[1:]))
        all_gather(gathered, kv, self.group)
        whole = gathered.unflatten(0, (self.world, 2)).movedim(0, 3).flatten(3, 4)
        return storage_to_global(whole, 3, self.world, self.layout)

    def _reduce_scatter_kv(self, dkv: torch.Tensor) -> torch.Tensor:
        """Sum ``(2, B, Hkv, S, D)`` over the ranks and keep this rank's shard of it."""
        local = dkv.shape[3] // self.world
        per_rank = global_to_storage(dkv, 3, self.world, self.layout).unflatten(
            3, (self.world, local)).movedim(3, 0).contiguous().flatten(0, 1)
        mine = dkv.new_empty((2, *dkv.shape[1:3], local, dkv.shape[4]))
        reduce_scatter(mine, per_rank, self.group)
        return mine

    # -- forward ---------------------------------------------------------------------------

    def _block_forward(self, block, q, kv):
        problem, backend = self.backends[block]
        qb = q[:, :, block.q0:block.q1]
        kb, vb = (kv[i, :, :, block.k0:block.k1] for i in range(2))
        return check_forward_result(backend, qb, backend.forward(problem, qb, kb, vb, None))

    def forward(self, q, k, v):
        """``(out, lse)`` of this rank's queries over the whole sequence."""
        if self.comm == "allgather":
            return self.gathered_forward(q, self._gather_kv(k, v))
        acc, acc_lse = self.accumulators(q)
        kv, spare = torch.stack([k, v]), None
        for t, blocks in enumerate(self.steps):
            works = None
            if t < self.world - 1:
                spare = torch.empty_like(kv) if spare is None else spare
                works = self._rotate(kv, spare)
            self.forward_step(blocks, q, kv, acc, acc_lse)
            if works is not None:
                _wait(works)
                kv, spare = spare, kv
        return acc.to(q.dtype), acc_lse

    @staticmethod
    def accumulators(q):
        """Zero out and ``-inf`` lse in the wide dtype: no key seen yet."""
        wide = _wide(q.dtype)
        return (torch.zeros(q.shape, dtype=wide, device=q.device),
                torch.full(q.shape[:3], float("-inf"), dtype=wide, device=q.device))

    def forward_step(self, blocks, q, kv, acc, acc_lse) -> None:
        """Merge the blocks of one ring step, against the keys and values ``kv``
        ``(2, B, Hkv, S_local, D)``, into the accumulators."""
        for block in blocks:
            out_b, lse_b = self._block_forward(block, q, kv)
            rows = slice(block.q0, block.q1)
            acc[:, :, rows], acc_lse[:, :, rows] = merge_attention(
                [acc[:, :, rows], out_b.to(acc.dtype)], [acc_lse[:, :, rows], lse_b.to(acc.dtype)])

    def gathered_forward(self, q, kv):
        """``(out, lse)`` against the gathered keys and values in global order: one block
        per query row, so no merging."""
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=_wide(q.dtype), device=q.device)
        for block in self.steps[0]:
            out[:, :, block.q0:block.q1], lse[:, :, block.q0:block.q1] = \
                self._block_forward(block, q, kv)
        return out, lse

    # -- backward --------------------------------------------------------------------------

    def _block_backward(self, block, q, kv, out, lse, dout, dlse):
        problem, backend = self.backends[block]
        rows = slice(block.q0, block.q1)
        qb = q[:, :, rows]
        kb, vb = (kv[i, :, :, block.k0:block.k1] for i in range(2))
        kwargs = {}
        if dlse is not None and backend.capabilities.lse_grad:
            kwargs["dlse"] = dlse[:, :, rows].contiguous()
        grads = backend.backward(problem, qb, kb, vb, out[:, :, rows].contiguous(),
                                 lse[:, :, rows].contiguous(), dout[:, :, rows].contiguous(),
                                 None, **kwargs)
        return check_backward_result(backend, qb, kb, vb, grads)

    def backward(self, q, k, v, out, lse, dout, dlse):
        """``(dq, dk, dv)`` of this rank's shards."""
        dlse = self._lse_gradient(lse, dlse)
        dq = torch.zeros(q.shape, dtype=_wide(q.dtype), device=q.device)
        if self.comm == "allgather":
            dkv = self.backward_step(self.steps[0], q, self._gather_kv(k, v), out, lse, dout,
                                     dlse, dq)
            mine = self._reduce_scatter_kv(dkv)
            return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype)
        kv, spare = torch.stack([k, v]), None
        incoming, sending, dkv_works = None, None, None
        for t, blocks in enumerate(self.steps):
            kv_works = None
            if t < self.world - 1:
                spare = torch.empty_like(kv) if spare is None else spare
                kv_works = self._rotate(kv, spare)
            local = self.backward_step(blocks, q, kv, out, lse, dout, dlse, dq)
            if dkv_works is not None:  # the dK/dV of these keys summed by the ranks before
                _wait(dkv_works)
                local += incoming
            if self.world > 1:  # on to the next rank; after P passes they are home
                sending, incoming = local, torch.empty_like(local)
                dkv_works = self._rotate(sending, incoming)
            else:
                incoming = local
            if kv_works is not None:
                _wait(kv_works)
                kv, spare = spare, kv
        if dkv_works is not None:
            _wait(dkv_works)
        return dq.to(q.dtype), incoming[0].to(k.dtype), incoming[1].to(v.dtype)

    def backward_step(self, blocks, q, kv, out, lse, dout, dlse, dq) -> torch.Tensor:
        """The blocks' gradients: dq added into ``dq``; dK/dV of the keys ``kv`` returned,
        ``(2, B, Hkv, S_kv, D)`` in the wide dtype."""
        dkv = torch.zeros(kv.shape, dtype=dq.dtype, device=dq.device)
        for block in blocks:
            dq_b, dk_b, dv_b = self._block_backward(block, q, kv, out, lse, dout, dlse)
            dq[:, :, block.q0:block.q1] += dq_b
            dkv[0, :, :, block.k0:block.k1] += dk_b
            dkv[1, :, :, block.k0:block.k1] += dv_b
        return dkv

    def _lse_gradient(self, lse, dlse):
        if dlse is None:
            return None
        missing = sorted({b.name for _, b in self.backends.values()
                          if not b.capabilities.lse_grad})
        if missing and bool((dlse != 0).any()):
            raise RuntimeError(
                f"backend(s) {missing} cannot differentiate through lse (their Capabilities "
                "do not declare lse_grad), but the loss depends on the lse ring_attention "
                "returned; detach lse, or use a backend that declares lse_grad")
        return dlse.to(lse.dtype).contiguous()


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial results are merged and gradients summed in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _wait(works) -> None:
    for work in works:
        work.wait()


class _RingFunction(torch.autograd.Function):
    """Saves the local q, k, v and the merged out and lse; the backward runs the ring again."""

    @staticmethod
    def forward(ctx, q, k, v, setup):
        out, lse = setup.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = setup
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        # Every rank must take part in the backward's communication, even one whose loss
        # ignored its shard: a missing gradient counts as zeros.
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        autocast = autocast_device(q)
        off = (torch.autocast(autocast, enabled=False) if autocast
               else contextlib.nullcontext())
        with torch.no_grad(), off:
            dq, dk, dv = ctx.setup.backward(q, k, v, out.contiguous(), lse, dout, dlse)
        return dq, dk, dv, None
