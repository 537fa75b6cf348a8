"""Conformance cases, generated from what a backend declares it can do.

A backend is tested on everything its `Capabilities` claim and nothing it doesn't: a dtype it
does not list, a head dim outside its range or a feature it does not flag yields no case (the
suite checks separately that such problems are refused rather than computed wrongly).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import reference
from ..backend import Capabilities
from ..reference import visible_mask
from . import accuracy

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float64: "fp64"}
DTYPE_ORDER = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Head dims worth testing: powers of two, odd multiples of 8 and a prime; the backend's
#: declared extremes are added. Generated cases stop at 256 (larger ones only test time).
HEAD_DIMS = (16, 32, 40, 64, 72, 96, 111, 128, 160, 256)
HEAD_DIMS_QUICK = (16, 40, 64)
MAX_TESTED_HEAD_DIM = 256


@dataclass(frozen=True)
class Case:
    batch: int = 2
    heads_q: int = 2
    heads_kv: int = 2
    seqlen_q: int = 64
    seqlen_k: int = 64
    head_dim: int = 64
    dtype: torch.dtype = torch.float16
    causal: bool = False
    window: tuple[int, int] | None = None
    #: None, or one of "random", "zero", "full", "mixed" (0 and Sk and values between).
    seqlens_k: str | None = None
    softcap: float | None = None
    #: None: the default 1/sqrt(D).
    scale: float | None = None
    #: "bhsd" (contiguous) or "bshd" (a (B, S, H, D) tensor transposed: non-contiguous).
    layout: str = "bhsd"
    #: Multiplies q and k: large enough that exp overflows fp16 without max-subtraction.
    magnitude: float = 1.0
    grad: bool = True
    #: The case must contain at least one query row that sees no key.
    expect_masked_rows: bool = False
    tag: str = ""

    @property
    def id(self) -> str:
        parts = [
            DTYPE_NAMES[self.dtype],
            f"B{self.batch}H{self.heads_q}x{self.heads_kv}",
            f"q{self.seqlen_q}k{self.seqlen_k}d{self.head_dim}",
        ]
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        if self.seqlens_k:
            parts.append(f"seqlens-{self.seqlens_k}")
        if self.softcap is not None:
            parts.append(f"cap{self.softcap:g}")
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        if self.layout != "bhsd":
            parts.append(self.layout)
        if self.magnitude != 1.0:
            parts.append(f"mag{self.magnitude:g}")
        if not self.grad:
            parts.append("fwd")
        if self.tag:
            parts.append(self.tag)
        return "-".join(parts)

    def make_inputs(self, device, generator: torch.Generator | None = None):
        """Fresh random q, k, v (never zeros) in the case's layout, plus seqlens_k."""
        B, Hq, Hkv, Sq, Sk, D = (self.batch, self.heads_q, self.heads_kv, self.seqlen_q,
                                 self.seqlen_k, self.head_dim)

        def rand(h, s, mag):
            shape = (B, s, h, D) if self.layout == "bshd" else (B, h, s, D)
            t = torch.randn(shape, generator=generator, dtype=torch.float32) * mag
            t = t.to(device=device, dtype=self.dtype)
            return t.transpose(1, 2) if self.layout == "bshd" else t

        q, k, v = rand(Hq, Sq, self.magnitude), rand(Hkv, Sk, self.magnitude), rand(Hkv, Sk, 1.0)
        seqlens = None
        if self.seqlens_k is not None:
            if self.seqlens_k == "zero":
                lens = [0] * B
            elif self.seqlens_k == "full":
                lens = [Sk] * B
            elif self.seqlens_k == "mixed":
                lens = [(0, Sk, max(Sk // 2, 1), 1)[b % 4] for b in range(B)]
            else:
                lens = torch.randint(0, Sk + 1, (B,), generator=generator).tolist()
            seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        return q, k, v, seqlens

    def options(self, seqlens_k) -> dict:
        return dict(causal=self.causal, window=self.window, seqlens_k=seqlens_k,
                    softcap=self.softcap, scale=self.scale)

    def reference(self, q, k, v, seqlens_k, dtype, dout, grad: bool = True):
        """``(out, lse, grads)`` of the reference with the inputs cast to `dtype`: float64
        gives ``ref64``, the input dtype ``ref_lp`` (the accuracy rule's two references)."""
        qq, kk, vv = (t.detach().to(dtype).requires_grad_(grad) for t in (q, k, v))
        with torch.enable_grad():
            out, lse = reference.safe(qq, kk, vv, **self.options(seqlens_k))
            grads = torch.autograd.grad(out, (qq, kk, vv), dout.to(dtype)) if grad else None
        return out.detach(), lse.detach(), grads

    def judge(self, q, k, v, seqlens_k, dout, out=None, grads=None) -> list[tuple[bool, str]]:
        """The accuracy rule on ``out`` and/or ``grads`` (dq, dk, dv) of these inputs, with
        the suite's factors: one ``(ok, message)`` per tensor. For scripts that report rather
        than assert (the suite itself asserts each tensor as it goes)."""
        grad = grads is not None
        ref64 = self.reference(q, k, v, seqlens_k, torch.float64, dout, grad)
        ref_lp = self.reference(q, k, v, seqlens_k, self.dtype, dout, grad)
        verdicts = []
        if out is not None:
            verdicts.append(accuracy.check("out", out, ref64[0], ref_lp[0], self.dtype,
                                           accuracy.OUT_FACTOR))
        if grad:
            verdicts += [accuracy.check(f"d{n}", g, g64, glp, self.dtype, accuracy.GRAD_FACTOR)
                         for n, g, g64, glp in zip("qkv", grads, ref64[2], ref_lp[2])]
        return verdicts

    def masked_rows(self, seqlens_k) -> torch.Tensor:
        """Boolean (B or 1, 1, Sq): rows that see no key."""
        m = visible_mask(self.seqlen_q, self.seqlen_k, causal=self.causal, window=self.window,
                         seqlens_k=seqlens_k.cpu() if seqlens_k is not None else None)
        return ~m.any(-1)


def _dtypes(caps: Capabilities, quick: bool):
    dts = [d for d in DTYPE_ORDER if d in caps.dtypes]
    # float64 is only tested where it is the backend's only dtype or the grid is full.
    if quick and len(dts) > 1 and torch.float64 in dts:
        dts.remove(torch.float64)
    return dts


def _primary_dtype(caps: Capabilities):
    for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        if d in caps.dtypes:
            return d
    raise ValueError(f"capabilities declare no float dtype: {caps}")


def generate(caps: Capabilities, quick: bool = False) -> list[Case]:
    """All cases for a backend with these capabilities."""
    dt = _primary_dtype(caps)
    dtypes = _dtypes(caps, quick)
    lo, hi = caps.head_dim_min, min(caps.head_dim_max, MAX_TESTED_HEAD_DIM)
    dims = sorted({d for d in (HEAD_DIMS_QUICK if quick else HEAD_DIMS) if lo <= d <= hi}
                  | {lo, hi})
    S = 48 if quick else 97  # not a multiple of any block size
    base = Case(dtype=dt, seqlen_q=S, seqlen_k=S, head_dim=64 if lo <= 64 <= hi else lo,
                grad=caps.backward)
    if quick:
        base = replace(base, batch=1)
    cases: list[Case] = []

    # Every declared dtype, and every head dim in each.
    for d in dtypes:
        for hd in dims:
            cases.append(replace(base, dtype=d, head_dim=hd))

    # Sequence lengths: 1, non-multiples of any block, Sq > Sk and Sq < Sk.
    pairs = ([(1, 1), (1, 33), (33, 1), (17, 50), (50, 17)] if quick else
             [(1, 1), (1, 300), (300, 1), (113, 257), (257, 113), (128, 128), (7, 5)])
    for sq, sk in pairs:
        cases.append(replace(base, seqlen_q=sq, seqlen_k=sk))
        if caps.causal:
            cases.append(replace(base, seqlen_q=sq, seqlen_k=sk, causal=True,
                                 expect_masked_rows=sq > sk))

    if caps.causal:
        for d in dtypes:
            cases.append(replace(base, dtype=d, causal=True))
    if caps.window:
        for win in ((8, 0), (16, 16), (-1, 4), (3, -1), (0, 0)):
            cases.append(replace(base, window=win))
        cases.append(replace(base, window=(4, 4), causal=True, seqlen_q=S, seqlen_k=S + 20))
        # A window far from the keys: rows of Sq > Sk fall off the left edge.
        cases.append(replace(base, window=(2, 0), seqlen_q=S + 20, seqlen_k=S // 2,
                             expect_masked_rows=True))
    if caps.seqlens_k:
        for mode in ("random", "zero", "full", "mixed"):
            cases.append(replace(base, batch=4, seqlens_k=mode,
                                 expect_masked_rows=mode in ("zero", "mixed")))
        if caps.causal:
            cases.append(replace(base, batch=4, seqlens_k="mixed", causal=True,
                                 expect_masked_rows=True))
            cases.append(replace(base, batch=3, seqlens_k="random", causal=True,
                                 seqlen_q=5, seqlen_k=S))
    if caps.softcap:
        cases.append(replace(base, softcap=5.0, magnitude=3.0))
        if caps.causal:
            cases.append(replace(base, softcap=30.0, causal=True))
    # Any finite scale: zero (uniform weights over the visible keys) and negative ones too,
    # where the largest scaled score belongs to the smallest raw one (a kernel that keeps
    # the row max of raw scores must not do so here).
    cases.append(replace(base, scale=0.3))
    cases.append(replace(base, scale=0.0, causal=caps.causal))
    cases.append(replace(base, scale=-0.2, causal=caps.causal, magnitude=2.0))
    if caps.gqa:
        cases.append(replace(base, heads_q=6, heads_kv=2))
        cases.append(replace(base, heads_q=4, heads_kv=1, causal=caps.causal))
    # Non-contiguous: a (B, S, H, D) tensor passed transposed.
    cases.append(replace(base, layout="bshd"))
    if caps.gqa and caps.causal:
        cases.append(replace(base, layout="bshd", heads_q=4, heads_kv=2, causal=True))
    # Scores up to ~50: exp overflows fp16 unless the max is subtracted.
    for d in dtypes:
        cases.append(replace(base, dtype=d, magnitude=8.0, tag="overflow"))
    # Forward-only (no autograd graph) path.
    cases.append(replace(base, grad=False))
    if caps.lse and caps.causal and not quick:
        cases.append(replace(base, batch=1, heads_q=1, heads_kv=1, seqlen_q=512,
                             seqlen_k=512, causal=True, tag="long"))

    seen, unique = set(), []
    for c in cases:
        if c.id not in seen:
            seen.add(c.id)
            unique.append(c)
    return unique


def refused_problems(caps: Capabilities) -> list[tuple[str, Case]]:
    """Problems the backend does *not* claim: the suite checks each is refused, not run."""
    dt = _primary_dtype(caps)
    base = Case(dtype=dt, seqlen_q=16, seqlen_k=16, grad=False,
                head_dim=max(caps.head_dim_min, min(64, caps.head_dim_max)))
    out = []
    for d in DTYPE_ORDER:
        if d not in caps.dtypes:
            out.append((f"dtype {d}", replace(base, dtype=d)))
    if caps.head_dim_max < 1 << 12:
        out.append(("head dim above range", replace(base, head_dim=caps.head_dim_max + 8)))
    if caps.head_dim_min > 1:
        out.append(("head dim below range", replace(base, head_dim=caps.head_dim_min - 1)))
    for flag, case in (
        ("causal", replace(base, causal=True)),
        ("window", replace(base, window=(4, 4))),
        ("seqlens_k", replace(base, seqlens_k="random")),
        ("softcap", replace(base, softcap=10.0)),
        ("gqa", replace(base, heads_q=4, heads_kv=2)),
        ("backward", replace(base, grad=True)),
    ):
        if not getattr(caps, flag):
            out.append((flag, case))
    return out


def repeatable(caps: Capabilities, quick: bool = False) -> list[Case]:
    """Three representative cases for the bitwise run-to-run check."""
    base = Case(dtype=_primary_dtype(caps), seqlen_q=48 if quick else 130,
                seqlen_k=48 if quick else 130, batch=2,
                head_dim=max(caps.head_dim_min, min(64, caps.head_dim_max)), grad=caps.backward)
    out = [base]
    if caps.causal:
        out.append(replace(base, causal=True, heads_q=4 if caps.gqa else 2,
                           heads_kv=2, seqlen_q=base.seqlen_q // 2))
    if caps.seqlens_k:
        out.append(replace(base, batch=3, seqlens_k="random"))
    return out
