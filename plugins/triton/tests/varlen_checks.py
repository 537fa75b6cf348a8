"""Checks of the varlen kernels shared by the interpreter tests (test_varlen.py) and the GPU
tests (test_varlen_gpu.py); importing this leaves TRITON_INTERPRET alone.

Sequence ``b`` is rows ``cu[b]:cu[b + 1]`` of the packed ``(total, H, D)`` tensors and must
come out exactly as a dense call of its lengths would: bottom-right causal per sequence,
window, softcap, GQA; rows that see no key give out 0, lse -inf and zero gradients. `check`
holds a run to dense reference calls, one per sequence, under the accuracy rule, after
poisoning the key rows no query of their sequence sees (NaN in K, inf in V): a kernel that
read them into a result, or ran into a neighbouring sequence's rows, would show it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch

import attnkit
from attnkit.spec import UNBOUNDED, AttentionProblem
from attnkit.testing.accuracy import GRAD_FACTOR, OUT_FACTOR, assert_close, bit_difference


@dataclass(frozen=True)
class VarlenCase:
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype
    causal: bool = False
    window: tuple[int, int] | None = None
    softcap: float | None = None
    #: "packed" (contiguous), "qkv" (slices of one packed projection; equal lengths) or
    #: "strided" (head stride 1, head-dim stride H)
    layout: str = "packed"
    #: Added to the longest lengths: the bounds a caller passes may exceed them.
    slack: int = 0
    expect_poison: bool = False  # some key row is seen by no query
    expect_masked_rows: bool = False  # some query row sees no key

    @property
    def id(self) -> str:
        def lens(xs):
            return "-".join(map(str, xs)) if len(xs) <= 6 else f"{len(xs)}seqs{sum(xs)}"

        parts = [f"q{lens(self.lens_q)}", f"k{lens(self.lens_k)}",
                 f"h{self.heads_q}x{self.heads_kv}", f"d{self.head_dim}",
                 str(self.dtype).replace("torch.", ""), self.layout]
        if self.causal:
            parts.append("causal")
        if self.window:
            parts.append(f"w{self.window[0]}_{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        return "-".join(parts)

    def problem(self, device="cpu") -> AttentionProblem:
        return AttentionProblem(
            len(self.lens_q), self.heads_q, self.heads_kv, max(self.lens_q) + self.slack,
            max(self.lens_k) + self.slack, self.head_dim, self.dtype, torch.device(device),
            causal=self.causal, scale=self.head_dim ** -0.5,
            window=self.window or (UNBOUNDED, UNBOUNDED), softcap=self.softcap,
            return_lse=True, needs_grad=True, varlen=True)

    def options(self) -> dict:
        return dict(causal=self.causal, window=self.window, softcap=self.softcap)


def band(case: VarlenCase, sq: int, sk: int) -> torch.Tensor:
    """(sq, sk) visibility of one sequence (attnkit.spec's band, bottom-right aligned)."""
    left, right = case.problem().band
    rel = torch.arange(sk)[None, :] - (torch.arange(sq)[:, None] + sk - sq)
    seen = torch.ones(sq, sk, dtype=torch.bool)
    if left is not None:
        seen &= rel >= -left
    if right is not None:
        seen &= rel <= right
    return seen


def offsets(lens, device="cpu") -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def make_inputs(case: VarlenCase, gen, device="cpu"):
    """Clean q, k, v (total, H, D) in the case's layout on ``device``, plus (on the CPU) the
    key rows no query sees and the query rows that see nothing."""
    tq, tk = sum(case.lens_q), sum(case.lens_k)
    Hq, Hkv, D = case.heads_q, case.heads_kv, case.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, case.dtype)

    if case.layout == "qkv":
        assert case.lens_q == case.lens_k
        buf = randn(tq, Hq + 2 * Hkv, D)
        q, k, v = buf[:, :Hq], buf[:, Hq:Hq + Hkv], buf[:, Hq + Hkv:]
    elif case.layout == "strided":
        q = randn(tq, D, Hq).transpose(1, 2)
        k, v = (randn(tk, D, Hkv).transpose(1, 2) for _ in range(2))
    else:
        q, k, v = randn(tq, Hq, D), randn(tk, Hkv, D), randn(tk, Hkv, D)
    unseen_k = torch.zeros(tk, dtype=torch.bool)
    masked_q = torch.zeros(tq, dtype=torch.bool)
    cq, ck = offsets(case.lens_q), offsets(case.lens_k)
    for b, (sq, sk) in enumerate(zip(case.lens_q, case.lens_k)):
        seen = band(case, sq, sk)
        unseen_k[ck[b]:ck[b + 1]] = ~seen.any(0)
        masked_q[cq[b]:cq[b + 1]] = ~seen.any(1)
    return q, k, v, unseen_k, masked_q


def reference(case: VarlenCase, q, k, v, dout, dlse, dtype):
    """Packed (out, lse, dq, dk, dv) from one dense reference call per sequence, inputs
    cast to ``dtype``."""
    cq, ck = offsets(case.lens_q), offsets(case.lens_k)
    dev = q.device
    out = torch.zeros(q.shape, dtype=dtype, device=dev)
    lse = torch.full((case.heads_q, q.shape[0]), float("-inf"), dtype=dtype, device=dev)
    grads = [torch.zeros(t.shape, dtype=dtype, device=dev) for t in (q, k, v)]
    for b in range(len(case.lens_q)):
        rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if case.lens_q[b] == 0 or case.lens_k[b] == 0:  # nothing seen: 0, -inf, 0
            continue

        def dense(t, rows):  # (S, H, D) rows -> (1, H, S, D)
            return t[rows].detach().to(dtype).transpose(0, 1).unsqueeze(0).requires_grad_()

        qb, kb, vb = dense(q, rq), dense(k, rk), dense(v, rk)
        ob, lb = attnkit.attention(qb, kb, vb, **case.options(), return_lse=True,
                                   backend="reference")
        gb = torch.autograd.grad((ob, lb), (qb, kb, vb),
                                 (dense(dout, rq), dlse[:, rq].to(dtype).unsqueeze(0)))
        out[rq] = ob.detach()[0].transpose(0, 1)
        lse[:, rq] = lb.detach()[0]
        for g, gd, rows in zip(grads, gb, (rq, rk, rk)):
            g[rows] = gd[0].transpose(0, 1)
    return out, lse, *grads


def through_backend(problem, q, k, v, cq, ck, dout, dlse):
    """The backend's own route (pointers, or tensor descriptors where it takes them)."""
    backend = attnkit.backends()["triton"].backend
    assert not backend.not_supported_reasons(problem)
    out, lse = backend.forward_varlen(problem, q, k, v, cq, ck)
    return out, lse, *backend.backward_varlen(problem, q, k, v, out, lse, dout, cq, ck, dlse)


def through_descriptors(problem, q, k, v, cq, ck, dout, dlse):
    """The launches with tensor descriptors forced in every kernel (the backend takes them
    on sm_90+ where the tables say; the interpreter runs them too)."""
    from attnkit_triton._backward import launch_backward_varlen
    from attnkit_triton._configs import backward_configs, forward_config
    from attnkit_triton._forward import launch_forward_varlen
    from attnkit_triton._triton_internals import ensure_allocator

    if q.is_cuda:  # device-side descriptors take scratch memory from Triton's allocator
        ensure_allocator()
    args = (problem.head_dim, problem.causal, problem.dtype, q.device)
    fwd, dkdv, dq = (replace(c, tma=True) for c in (forward_config(*args),
                                                       *backward_configs(*args)))
    out, lse = launch_forward_varlen(problem, q, k, v, cq, ck, fwd, True)
    return out, lse, *launch_backward_varlen(problem, q, k, v, out, lse, dout, cq, ck, dkdv,
                                             dq, True, dlse)


def check(case: VarlenCase, run, device="cpu"):
    """``run(problem, q, k, v, cu_q, cu_k, dout, dlse) -> (out, lse, dq, dk, dv)`` against
    the per-sequence reference, with the unseen key rows poisoned."""
    problem = case.problem(device)
    gen = torch.Generator().manual_seed(sum(map(ord, case.id)))
    q, k, v, unseen_k, masked_q = make_inputs(case, gen, device)
    assert unseen_k.any() == case.expect_poison
    assert masked_q.any() == case.expect_masked_rows
    dout = torch.randn(q.shape, generator=gen).to(device, case.dtype)
    # Rows that see no key get an lse gradient too: it must change nothing.
    dlse = torch.randn(case.heads_q, q.shape[0], generator=gen).to(device)
    ref64 = reference(case, q, k, v, dout, dlse, torch.float64)
    ref_lp = reference(case, q, k, v, dout, dlse, case.dtype)

    # Poison what no query may see: NaN in K, inf in V (written through the views, so a
    # qkv projection's other slices keep their values).
    unseen_k, masked_q = unseen_k.to(device), masked_q.to(device)
    k[unseen_k] = float("nan")
    v[unseen_k] = float("inf")
    cq, ck = offsets(case.lens_q, device), offsets(case.lens_k, device)
    out, lse, dq, dk, dv = run(problem, q, k, v, cq, ck, dout, dlse)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (case.heads_q, q.shape[0])
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), (q, k, v)):
        assert got.dtype == want.dtype and got.shape == want.shape, name

    assert_close(f"{case.id} out", out, ref64[0], ref_lp[0], case.dtype, factor=OUT_FACTOR)
    assert_close(f"{case.id} lse", lse, ref64[1], ref_lp[1], case.dtype, factor=OUT_FACTOR)
    for name, got, g64, glp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref64[2:], ref_lp[2:]):
        assert_close(f"{case.id} {name}", got, g64, glp, case.dtype, factor=GRAD_FACTOR)
    assert (out[masked_q] == 0).all() and (lse[:, masked_q] == float("-inf")).all()
    assert (dq[masked_q] == 0).all()
    assert (dk[unseen_k] == 0).all() and (dv[unseen_k] == 0).all()


def check_equal_lengths_bitwise(B, S, Hq, Hkv, D, dtype, causal, device="cpu"):
    """Equal lengths are a dense batch laid out (B, S, H, D): the dense `tl` call on that
    view runs the same tiles through the same kernels (the varlen branch only moves the
    bases), so out, lse and every gradient (with an lse gradient) agree bit for bit. The
    caller keeps the dense call off the Gluon kernels."""
    case = VarlenCase((S,) * B, (S,) * B, Hq, Hkv, D, dtype, causal=causal)
    gen = torch.Generator().manual_seed(1)
    q, k, v = make_inputs(case, gen, device)[:3]
    dout = torch.randn(q.shape, generator=gen).to(device, dtype)
    dlse = torch.randn(Hq, B * S, generator=gen).to(device)
    cq = ck = offsets(case.lens_q, device)
    out, lse, *grads = through_backend(case.problem(device), q, k, v, cq, ck, dout, dlse)

    def dense(t):  # (B * S, H, D) -> (B, H, S, D), in place
        return t.detach().view(B, S, t.shape[1], D).transpose(1, 2).requires_grad_()

    qd, kd, vd = dense(q), dense(k), dense(v)
    out_d, lse_d = attnkit.attention(qd, kd, vd, causal=causal, return_lse=True,
                                     backend="triton")
    grads_d = torch.autograd.grad((out_d, lse_d), (qd, kd, vd),
                                  (dense(dout), dlse.view(Hq, B, S).transpose(0, 1)))

    def packed(t):  # (B, H, S, D) -> (B * S, H, D)
        return t.detach().transpose(1, 2).reshape(B * S, t.shape[1], D)

    pairs = [("out", out, packed(out_d)),
             ("lse", lse, lse_d.detach().transpose(0, 1).reshape(Hq, B * S))]
    pairs += [(f"d{n}", g, packed(gd)) for n, g, gd in zip("qkv", grads, grads_d)]
    diffs = [bit_difference(name, got, want) for name, got, want in pairs]
    assert not any(diffs), "\n".join(d for d in diffs if d)
