"""Checks only a CUDA device can pose: stream ordering and element offsets past 2^31.

Each takes a backend name and a CUDA device, raises ``AssertionError`` with numbers on a
wrong result, and ``pytest.skip`` where the device cannot hold the problem (naming the
bytes). The suite runs them (`suite_cuda`); a plugin's own tests may too.
"""

from __future__ import annotations

import pytest
import torch

import attnkit

from . import accuracy
from .cases import Case, _primary_dtype

#: Element offset the large checks reach past: where 32-bit offset arithmetic wraps.
PAST = 1 << 31


def _head_dim(caps) -> int:
    return max(caps.head_dim_min, min(64, caps.head_dim_max))


def _keep_busy(stream, work: torch.Tensor, rounds: int = 20) -> None:
    """Queue tens of milliseconds of matmuls on ``stream``."""
    with torch.cuda.stream(stream):
        for _ in range(rounds):
            work = work @ work
            work = work / work.norm()


def side_stream(backend_name: str, device: str = "cuda") -> None:
    """Inputs written on a side stream, the call and its backward under
    ``torch.cuda.stream(side)``, the results read on that stream only.

    Twice: with the side stream busy before the inputs are written (a kernel queued on
    another stream would read them before they exist), and with the default stream busy
    (a kernel queued there would finish after the side stream has read its result)."""
    caps = attnkit.backends()[backend_name].backend.capabilities
    case = Case(batch=2, heads_q=4, heads_kv=2 if caps.gqa else 4, seqlen_q=512, seqlen_k=512,
                head_dim=_head_dim(caps), dtype=_primary_dtype(caps), causal=caps.causal,
                grad=caps.backward)
    side = torch.cuda.Stream(device)
    work = torch.randn(4096, 4096, device=device)
    gen = torch.Generator().manual_seed(0)
    for busy in ("side", "default"):
        q0, k0, v0, _ = case.make_inputs("cpu", gen)
        dout0 = torch.randn(q0.shape, generator=gen).to(case.dtype)
        sources = [t.to(device) for t in (q0, k0, v0, dout0)]
        torch.cuda.synchronize(device)
        if busy == "default":
            _keep_busy(torch.cuda.current_stream(device), work)
        with torch.cuda.stream(side):
            if busy == "side":
                _keep_busy(side, work)
            # Made and written on the side stream, after its busy work.
            q, k, v, dout = (torch.zeros_like(t).copy_(t) for t in sources)
            q, k, v = (t.requires_grad_(case.grad) for t in (q, k, v))
            out = attnkit.attention(q, k, v, causal=case.causal, backend=backend_name)
            grads = torch.autograd.grad(out, (q, k, v), dout) if case.grad else ()
            # Read on the side stream, which is all its caller may wait for.
            got = [t.detach().clone() for t in (out, *grads)]
        side.synchronize()
        got = [t.cpu() for t in got]
        torch.cuda.synchronize(device)
        verdicts = case.judge(q0, k0, v0, None, dout0, out=got[0],
                              grads=tuple(got[1:]) if case.grad else None)
        bad = [msg for ok, msg in verdicts if not ok]
        assert not bad, (f"{busy} stream kept busy: the results read on the side stream are "
                         "wrong (kernels not queued on the current stream?): " + "; ".join(bad))


def _need(device: str, nbytes: int, what: str) -> None:
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    need = nbytes + (512 << 20)  # the buffers, plus room for the backend's own
    if free < need:
        pytest.skip(f"{what} needs {need} bytes ({need / 2**30:.1f} GiB) of free memory on "
                    f"{device}; {free} bytes ({free / 2**30:.1f} GiB) are free")


def offsets_past_2_31_inputs(backend_name: str, device: str = "cuda") -> None:
    """q, k and v whose second batch starts past element 2^31 of one ~4 GiB buffer (fp16 or
    bf16; more for wider dtypes): offsets computed in 32 bits wrap there. Forward, lse and
    backward against the reference on compact copies."""
    caps = attnkit.backends()[backend_name].backend.capabilities
    dt = _primary_dtype(caps)
    case = Case(batch=2, heads_q=4, heads_kv=2 if caps.gqa else 4, seqlen_q=128, seqlen_k=128,
                head_dim=_head_dim(caps), dtype=dt, causal=caps.causal, grad=caps.backward)
    Hq, Hkv, S, D = case.heads_q, case.heads_kv, case.seqlen_q, case.head_dim
    stride_b = PAST + 4096
    sizes = (Hq * S * D, Hkv * S * D, Hkv * S * D)
    numel = stride_b + sum(sizes)
    _need(device, numel * torch.empty((), dtype=dt).element_size(),
          "q, k, v with batch offsets past 2^31 elements")
    buf = torch.empty(numel, dtype=dt, device=device)
    gen = torch.Generator().manual_seed(0)
    q0, k0, v0, _ = case.make_inputs("cpu", gen)
    dout0 = torch.randn(q0.shape, generator=gen).to(dt)
    views, offset = [], 0
    for t, n in zip((q0, k0, v0), sizes):
        view = buf.as_strided(t.shape, (stride_b, S * D, D, 1), storage_offset=offset)
        view.copy_(t.to(device))
        views.append(view.requires_grad_(case.grad))  # a leaf: buf needs no gradient
        offset += n
    q, k, v = views
    res = attnkit.attention(q, k, v, causal=case.causal, return_lse=caps.lse,
                            backend=backend_name)
    out, lse = res if caps.lse else (res, None)
    grads = torch.autograd.grad(out, (q, k, v), dout0.to(device)) if case.grad else None
    torch.cuda.synchronize(device)
    got_out, got_lse = out.detach().cpu(), None if lse is None else lse.cpu()
    got_grads = None if grads is None else tuple(g.cpu() for g in grads)
    del out, lse, res, grads, q, k, v, views, buf
    torch.cuda.empty_cache()
    verdicts = case.judge(q0, k0, v0, None, dout0, out=got_out, grads=got_grads)
    if got_lse is not None:
        r64 = case.reference(q0, k0, v0, None, torch.float64, dout0, grad=False)
        rlp = case.reference(q0, k0, v0, None, dt, dout0, grad=False)
        verdicts.append(accuracy.check("lse", got_lse, r64[1], rlp[1], dt))
    bad = [msg for ok, msg in verdicts if not ok]
    assert not bad, "batch offsets past 2^31 elements: " + "; ".join(bad)


def offsets_past_2_31_outputs(backend_name: str, device: str = "cuda") -> None:
    """A (B, S, H, D) q of 2^31 + 2^27 elements over 64 keys, forward only (~9 GB in fp16):
    the last rows of q and out lie past element 2^31. Rows at both ends are checked."""
    caps = attnkit.backends()[backend_name].backend.capabilities
    dt = _primary_dtype(caps)
    B, H, Sk = 2, 16, 64
    D = _head_dim(caps)
    Sq = (PAST + PAST // 16) // (B * H * D)
    es = torch.empty((), dtype=dt).element_size()
    _need(device, 2 * B * Sq * H * D * es + B * H * Sq * 8,
          "a q and out of 2^31 + 2^27 elements")
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.empty((B, Sq, H, D), dtype=dt, device=device).normal_(generator=gen)
    q = q.transpose(1, 2)
    k, v = (torch.randn((B, H, Sk, D), generator=gen, device=device).to(dt) for _ in range(2))
    with torch.no_grad():
        if caps.lse:
            out, lse = attnkit.attention(q, k, v, return_lse=True, backend=backend_name)
        else:
            out, lse = attnkit.attention(q, k, v, backend=backend_name), None
    torch.cuda.synchronize(device)
    n = 256
    bad = []
    for b, rows in ((0, slice(0, n)), (B - 1, slice(Sq - n, Sq))):
        qs, ks, vs = q[b:b + 1, :, rows].cpu(), k[b:b + 1].cpu(), v[b:b + 1].cpu()
        case = Case(batch=1, heads_q=H, heads_kv=H, seqlen_q=n, seqlen_k=Sk, head_dim=D,
                    dtype=dt, grad=False)
        unused = torch.zeros(qs.shape, dtype=dt)
        r64 = case.reference(qs, ks, vs, None, torch.float64, unused, grad=False)
        rlp = case.reference(qs, ks, vs, None, dt, unused, grad=False)
        where = f"batch {b} rows {rows.start}..{rows.stop - 1}"
        checks = [("out", out, 0)] + ([("lse", lse, 1)] if lse is not None else [])
        for name, got, i in checks:
            ok, msg = accuracy.check(f"{where} {name}", got[b:b + 1, :, rows].cpu(), r64[i],
                                     rlp[i], dt)
            if not ok:
                bad.append(msg)
    del q, k, v, out, lse
    torch.cuda.empty_cache()
    assert not bad, "q and out past 2^31 elements: " + "; ".join(bad)
