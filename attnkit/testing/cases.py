"""Conformance cases, generated from what a backend declares it can do.

A backend is tested on everything its `Capabilities` claim and nothing it doesn't: a dtype it
does not list, a head dim outside its range or a feature it does not flag yields no case (the
suite checks separately that such problems are refused rather than computed wrongly).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, replace

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


def heads_id(case) -> str:
    """``B{batch}H{heads_q}x{heads_kv}``: the part of a case's id naming its batch and heads."""
    return f"B{case.batch}H{case.heads_q}x{case.heads_kv}"


@dataclass(frozen=True)
class Heads:
    """Batch and head counts: the fields a dense (`Case`), KV-cache or merge case starts
    with, in this order (subclasses may give them other defaults)."""
    batch: int = 2
    heads_q: int = 2
    heads_kv: int = 2


@dataclass(frozen=True, kw_only=True)
class Options:
    """What every case kind (dense, packed, KV-cache) may ask of a call besides its sizes:
    the mask (causal, window) and softcap; and a tag, the last part of its id. Keyword-only,
    as is every field of a dense or packed case past its dtype: a positional argument there
    is an error, never another field's value."""
    causal: bool = False
    window: tuple[int, int] | None = None
    softcap: float | None = None
    tag: str = ""


@dataclass(frozen=True)
class Case(Options, Heads):
    seqlen_q: int = 64
    seqlen_k: int = 64
    head_dim: int = 64
    dtype: torch.dtype = torch.float16
    _: KW_ONLY
    #: None, or one of "random", "zero", "full", "mixed" (0 and Sk and values between).
    seqlens_k: str | None = None
    #: None: the default 1/sqrt(D).
    scale: float | None = None
    #: "bhsd" (contiguous) or "bshd" (a (B, S, H, D) tensor transposed: non-contiguous).
    layout: str = "bhsd"
    #: Multiplies q and k: large enough that exp overflows fp16 without max-subtraction.
    magnitude: float = 1.0
    grad: bool = True
    #: The case must contain at least one query row that sees no key.
    expect_masked_rows: bool = False

    @property
    def id(self) -> str:
        parts = [
            DTYPE_NAMES[self.dtype],
            heads_id(self),
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

    def reference_orders(self, q, k, v, seqlens_k, dtype, dout=None,
                         grad: bool = False) -> list[tuple]:
        """`reference` in ``dtype`` with every score summed in two other orders: the head dim
        reversed, and permuted (gradients of q and k put back in the inputs' order). A near
        one-hot row follows the rounding of its top two scores, which at scores near 1e4 in
        fp32 varies with the order by more than the rule's factor, so the rule takes the
        plain math's largest error over these orders and the given one."""
        D = q.shape[-1]
        perms = (torch.arange(D - 1, -1, -1),
                 torch.randperm(D, generator=torch.Generator().manual_seed(D)))
        refs = []
        for perm in perms:
            perm = perm.to(q.device)
            out, lse, grads = self.reference(q[..., perm], k[..., perm], v, seqlens_k, dtype,
                                             dout, grad)
            if grads is not None:
                back = torch.argsort(perm)
                grads = (grads[0][..., back], grads[1][..., back], grads[2])
            refs.append((out, lse, grads))
        return refs

    def low_precision_references(self, q, k, v, seqlens_k, dout, grad: bool = True) -> list:
        """The accuracy rule's plain-math references in the case's dtype: `reference`, then
        (below float64) `reference_orders`; the largest error of them counts."""
        plain = self.reference(q, k, v, seqlens_k, self.dtype, dout, grad)
        if self.dtype == torch.float64:
            return [plain]
        return [plain, *self.reference_orders(q, k, v, seqlens_k, self.dtype, dout, grad)]

    def saved_state_grads(self, q, k, v, seqlens_k, dout, dlse=None, out=None, lse=None,
                          dropout=None):
        """(dq, dk, dv) as the contract computes them, in float32 from the state a backend
        saves: its ``out`` (in the input dtype) and ``lse`` (float32) where given, else the
        float32 forward's rounded so; then ``P = exp(S - lse)`` and
        ``delta = rowsum(dout * out) - dlse`` (`reference.backward`). The accuracy rule's
        second low-precision reference for gradients; None for float64 inputs. ``dropout``:
        the call's `attnkit.dropout.Dropout`, whose mask both passes apply."""
        if q.dtype == torch.float64:
            return None
        qc, kc, vc = (t.detach().float() for t in (q, k, v))
        opts = self.options(seqlens_k)
        if out is None or lse is None:
            out32, lse32 = reference.safe(qc, kc, vc, **opts, dropout=dropout)
            out = out32.to(q.dtype) if out is None else out
            lse = lse32 if lse is None else lse
        return reference.backward(qc, kc, vc, out.detach().float(), lse.detach().float(),
                                  dout.float(), dlse=None if dlse is None else dlse.float(),
                                  dropout=dropout, **opts)

    def judge(self, q, k, v, seqlens_k, dout, out=None, grads=None) -> list[tuple[bool, str]]:
        """The accuracy rule on ``out`` and/or ``grads`` (dq, dk, dv) of these inputs, with
        the suite's factors: one ``(ok, message)`` per tensor. For scripts that report rather
        than assert (the suite itself asserts each tensor as it goes)."""
        grad = grads is not None
        ref64 = self.reference(q, k, v, seqlens_k, torch.float64, dout, grad)
        lps = self.low_precision_references(q, k, v, seqlens_k, dout, grad)
        verdicts = []
        if out is not None:
            verdicts.append(accuracy.check("out", out, ref64[0], [r[0] for r in lps],
                                           self.dtype, accuracy.OUT_FACTOR))
        if grad:
            saved = self.saved_state_grads(q, k, v, seqlens_k, dout, out=out) or (None,) * 3
            verdicts += [accuracy.check(f"d{n}", g, ref64[2][i],
                                        [*(r[2][i] for r in lps), saved[i]], self.dtype,
                                        accuracy.GRAD_FACTOR)
                         for i, (n, g) in enumerate(zip("qkv", grads))]
        return verdicts

    def masked_rows(self, seqlens_k) -> torch.Tensor:
        """Boolean (B or 1, 1, Sq): rows that see no key."""
        return ~self._visible(seqlens_k).any(-1)

    def unreached_keys(self, seqlens_k) -> torch.Tensor:
        """Boolean (B or 1, Sk): key positions no query of the batch sees, whether they do
        not exist (``>= seqlens_k[b]``) or lie outside every query's band."""
        return ~self._visible(seqlens_k).any(-2)[:, 0]

    def _visible(self, seqlens_k) -> torch.Tensor:
        return visible_mask(self.seqlen_q, self.seqlen_k, causal=self.causal,
                            window=self.window,
                            seqlens_k=seqlens_k.cpu() if seqlens_k is not None else None)


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


def claims(caps: Capabilities, case: Case) -> bool:
    """Whether the capabilities cover this case (gradients aside: see `fit`)."""
    return (case.dtype in caps.dtypes
            and caps.head_dim_min <= case.head_dim <= caps.head_dim_max
            and (caps.causal or not case.causal)
            and (caps.window or case.window is None)
            and (caps.seqlens_k or case.seqlens_k is None)
            and (caps.softcap or case.softcap is None)
            and (caps.gqa or case.heads_q == case.heads_kv))


def fit(caps: Capabilities, cases) -> list[Case]:
    """The cases these capabilities cover, forward-only where there is no backward."""
    return [c if caps.backward else replace(c, grad=False) for c in cases if claims(caps, c)]


def generate(caps: Capabilities, quick: bool = False, device: str = "cpu") -> list[Case]:
    """All cases for a backend with these capabilities; on a GPU the full grid adds
    `multi_block` sizes."""
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
    # Scores up to ~1e4 (scale 1; q and k ~16 at D=64, which fp16 holds): exp overflows
    # in every dtype unless the max is subtracted, and a max kept in low precision is off
    # by whole units.
    mag = (1e8 / (21.0 * base.head_dim)) ** 0.25
    for d in dtypes:
        if d != torch.float64:
            cases.append(replace(base, dtype=d, scale=1.0, magnitude=round(mag, 1),
                                 causal=caps.causal and not quick, tag="scores1e4"))
    # Forward-only (no autograd graph) path.
    cases.append(replace(base, grad=False))
    if caps.lse and caps.causal and not quick:
        cases.append(replace(base, batch=1, heads_q=1, heads_kv=1, seqlen_q=512,
                             seqlen_k=512, causal=True, tag="long"))

    if not quick and not device.startswith("cpu"):
        cases += fit(caps, multi_block())

    return unique(cases)


def multi_block() -> list[Case]:
    """Sizes that span many GPU tiles, in every feature combination and every head-dim
    padding class: hundreds to thousands of rows and keys, not multiples of any block."""
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    out = []
    for dt in (f16, bf16):
        for d in (64, 80, 128, 256):
            for causal in (False, True):
                out.append(Case(batch=2, heads_q=4, heads_kv=4, seqlen_q=700, seqlen_k=700,
                                head_dim=d, dtype=dt, causal=causal))
    for dt in (f16, bf16, f32):
        out += [
            Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=700, seqlen_k=1031, head_dim=128,
                 dtype=dt, causal=True),
            Case(batch=1, heads_q=3, heads_kv=1, seqlen_q=333, seqlen_k=333, head_dim=72,
                 dtype=dt, window=(50, 20), layout="bshd"),
            Case(batch=3, heads_q=4, heads_kv=4, seqlen_q=260, seqlen_k=515, head_dim=64,
                 dtype=dt, seqlens_k="random", causal=True, softcap=20.0),
            Case(batch=2, heads_q=2, heads_kv=2, seqlen_q=1, seqlen_k=2000, head_dim=128,
                 dtype=dt, seqlens_k="mixed", expect_masked_rows=True, tag="decode"),
        ]
    for d in (8, 24, 40, 96, 111, 160, 200):
        out.append(Case(batch=2, heads_q=4, heads_kv=1, seqlen_q=190, seqlen_k=211,
                        head_dim=d, dtype=bf16, causal=True, window=(64, -1)))
        out.append(Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=150, seqlen_k=129,
                        head_dim=d, dtype=f16, softcap=10.0, magnitude=2.0, layout="bshd"))
    out += [
        Case(batch=2, heads_q=8, heads_kv=2, seqlen_q=1000, seqlen_k=1300, head_dim=128,
             dtype=bf16, causal=True, layout="bshd", seqlens_k="random"),
        Case(batch=2, heads_q=8, heads_kv=2, seqlen_q=1300, seqlen_k=1000, head_dim=64,
             dtype=f16, causal=True, layout="bshd", expect_masked_rows=True),
        Case(batch=2, heads_q=4, heads_kv=1, seqlen_q=1024, seqlen_k=1024, head_dim=128,
             dtype=f16, window=(200, 30), layout="bshd"),
        Case(batch=3, heads_q=4, heads_kv=2, seqlen_q=513, seqlen_k=2049, head_dim=64,
             dtype=bf16, window=(100, 0), causal=True, seqlens_k="mixed",
             expect_masked_rows=True),
        Case(batch=2, heads_q=4, heads_kv=4, seqlen_q=800, seqlen_k=800, head_dim=128,
             dtype=bf16, softcap=20.0, magnitude=2.0, causal=True),
        Case(batch=2, heads_q=4, heads_kv=4, seqlen_q=600, seqlen_k=900, head_dim=96,
             dtype=f32, causal=True),
        Case(batch=1, heads_q=8, heads_kv=2, seqlen_q=2048, seqlen_k=2048, head_dim=128,
             dtype=bf16, causal=True, tag="long"),
        Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=4096, seqlen_k=4096, head_dim=128,
             dtype=bf16, causal=True, tag="long"),
        Case(batch=1, heads_q=16, heads_kv=16, seqlen_q=1, seqlen_k=3000, head_dim=128,
             dtype=f16, causal=True, tag="decode"),
        Case(batch=2, heads_q=2, heads_kv=2, seqlen_q=1024, seqlen_k=96, head_dim=64,
             dtype=f16, window=(0, 0), tag="diag"),
    ]
    return out


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


def repeatable(caps: Capabilities, quick: bool = False, device: str = "cpu") -> list[Case]:
    """Three representative cases for the bitwise run-to-run check; on a GPU the full grid
    adds `LAUNCH_STATE_CASES`."""
    base = Case(dtype=_primary_dtype(caps), seqlen_q=48 if quick else 130,
                seqlen_k=48 if quick else 130, batch=2,
                head_dim=max(caps.head_dim_min, min(64, caps.head_dim_max)), grad=caps.backward)
    out = [base]
    if caps.causal:
        out.append(replace(base, causal=True, heads_q=4 if caps.gqa else 2,
                           heads_kv=2, seqlen_q=base.seqlen_q // 2))
    if caps.seqlens_k:
        out.append(replace(base, batch=3, seqlens_k="random"))
    if not quick and not device.startswith("cpu"):
        out += fit(caps, LAUNCH_STATE_CASES)
    return out


#: Problems of launch-path interest for repeated calls on a GPU: a training-sized grid,
#: odd head dims, GQA with (B, S, H, D) tensors, a window, seqlens_k, softcap at head dim 256.
LAUNCH_STATE_CASES = (
    Case(32, 32, 32, 512, 512, 64, torch.bfloat16, causal=True, layout="bshd"),
    Case(2, 4, 4, 97, 97, 40, torch.float16),
    Case(2, 6, 2, 130, 257, 128, torch.float16, causal=True, layout="bshd"),
    Case(3, 4, 1, 77, 200, 96, torch.bfloat16, window=(16, 8)),
    Case(4, 2, 2, 64, 300, 64, torch.float16, causal=True, seqlens_k="random"),
    Case(2, 2, 2, 97, 97, 256, torch.bfloat16, softcap=5.0),
)


def small_base(caps: Capabilities, quick: bool) -> Case:
    """The isolation and lse-gradient cases' base: one head in quick mode (an interpreter
    steps every program)."""
    lo, hi = caps.head_dim_min, min(caps.head_dim_max, MAX_TESTED_HEAD_DIM)
    S = 48 if quick else 97
    return Case(dtype=_primary_dtype(caps), seqlen_q=S, seqlen_k=S, batch=1 if quick else 2,
                heads_q=1 if quick else 2, heads_kv=1 if quick else 2,
                head_dim=64 if lo <= 64 <= hi else lo, grad=caps.backward)


def gqa_heads(caps: Capabilities, quick: bool) -> dict:
    """Query and kv heads of a GQA variant of `small_base` (none without GQA)."""
    if not caps.gqa:
        return {}
    return dict(heads_q=2, heads_kv=1) if quick else dict(heads_q=4, heads_kv=2)


def unique(cases) -> list[Case]:
    seen, out = set(), []
    for c in cases:
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


def unreached_cases(caps: Capabilities, quick: bool = False) -> list[Case]:
    """Cases with keys no query sees: past ``seqlens_k[b]`` (0, Sk and lengths between),
    left of the first query's window, and causal with a window and Sq < Sk."""
    base = small_base(caps, quick)
    S = base.seqlen_q
    out = []
    if caps.seqlens_k:
        out.append(replace(base, batch=4, seqlens_k="mixed", causal=caps.causal,
                           expect_masked_rows=True))
    if caps.window and caps.causal:
        out.append(replace(base, seqlen_q=S // 2, seqlen_k=S + 20, window=(6, -1),
                           causal=True))
    if caps.window and (not quick or not caps.causal):
        out.append(replace(base, seqlen_q=17, seqlen_k=S, window=(8, 3)))
    if not quick and caps.window and caps.seqlens_k:
        out.append(replace(base, batch=3, seqlen_q=30, seqlens_k="random", window=(16, 4),
                           layout="bshd", **gqa_heads(caps, quick)))
    return unique(out)


def feature_variants(caps: Capabilities, quick: bool = False) -> list[Case]:
    """One small case per declared feature a kernel takes a different path for (masks,
    lengths, windows, softcap, strides)."""
    base = small_base(caps, quick)
    gqa = gqa_heads(caps, quick)
    out = [replace(base, causal=caps.causal, **gqa)]
    if caps.seqlens_k:
        out.append(replace(base, batch=4, seqlens_k="mixed", expect_masked_rows=True))
    if not quick:
        if caps.window:
            out.append(replace(base, window=(16, 4), seqlen_q=40))
        if caps.softcap:
            out.append(replace(base, softcap=10.0, magnitude=2.0))
        out.append(replace(base, layout="bshd", **gqa))
    return unique(out)


def scratch_cases(caps: Capabilities, quick: bool = False) -> list[Case]:
    """Cases for the uninitialised-scratch check: the feature variants and a decoding shape
    (each a path a backend may allocate differently for)."""
    out = feature_variants(caps, quick)
    if not quick:
        out.append(replace(small_base(caps, quick), batch=1, seqlen_q=1, seqlen_k=600,
                           heads_q=8 if caps.gqa else 2, heads_kv=2, causal=caps.causal,
                           tag="decode"))
    return unique(out)


def nan_row_cases(caps: Capabilities, quick: bool = False) -> list[Case]:
    """Forward cases in which one query row (one that sees keys) gets a NaN."""
    base = replace(small_base(caps, quick), grad=False)
    out = [base]
    if caps.causal:
        out.append(replace(base, causal=True, **gqa_heads(caps, quick)))
    return unique(out)
