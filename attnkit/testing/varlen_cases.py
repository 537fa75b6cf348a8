"""Conformance cases for packed variable-length batches (`attnkit.attention_varlen`),
generated from a backend's capabilities, and their reference: one dense reference call per
sequence, assembled into the packed layout.
"""

from __future__ import annotations

import itertools
from dataclasses import KW_ONLY, dataclass, replace

import torch

from .. import reference
from ..backend import Capabilities
from ..reference import visible_mask
from ..varlen import as_dense
from . import accuracy
from .cases import (
    DTYPE_NAMES,
    DTYPE_ORDER,
    MAX_TESTED_HEAD_DIM,
    Options,
    _primary_dtype,
    heads_id,
    unique,
)

#: Length mixes, as (query lengths, key lengths or None for the same): zero-length
#: sequences first, in the middle and last, single tokens, and lengths that are multiples
#: of no block.
SELF = (0, 17, 1, 0, 33, 5, 0)
CROSS = ((5, 0, 12, 1, 20, 3), (9, 7, 0, 30, 3, 3))
#: Fewer query rows in all than sequences (most sequences have no query).
FEW_QUERIES = ((0, 1, 0, 0, 1, 0), (3, 2, 0, 4, 1, 5))
#: Sizes that span many GPU tiles: long documents beside short ones.
LONG_TAIL = (700, 3, 1, 260, 0, 1031, 64, 2)


@dataclass(frozen=True)
class VarlenCase(Options):
    lens_q: tuple[int, ...]
    #: None: the key lengths are the query lengths (self-attention over one packing).
    lens_k: tuple[int, ...] | None = None
    heads_q: int = 2
    heads_kv: int = 2
    head_dim: int = 64
    dtype: torch.dtype = torch.float16
    _: KW_ONLY
    #: "packed": contiguous (total, H, D) tensors; "qkv": q, k and v sliced out of one
    #: (total, Hq + 2 Hkv, D) projection (strided, read in place).
    layout: str = "packed"
    #: max_seqlen passed as the longest length plus this (a larger upper bound); None: the
    #: call passes None and the core computes it.
    slack: int | None = 0
    magnitude: float = 1.0
    grad: bool = True

    @property
    def keys(self) -> tuple[int, ...]:
        return self.lens_q if self.lens_k is None else self.lens_k

    @property
    def batch(self) -> int:
        return len(self.lens_q)

    @property
    def id(self) -> str:
        parts = [DTYPE_NAMES[self.dtype], heads_id(self),
                 f"tq{sum(self.lens_q)}tk{sum(self.keys)}d{self.head_dim}"]
        if self.lens_k is not None:
            parts.append("cross")
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        if self.softcap is not None:
            parts.append(f"cap{self.softcap:g}")
        if self.layout != "packed":
            parts.append(self.layout)
        if self.slack is None:
            parts.append("maxNone")
        elif self.slack:
            parts.append(f"max+{self.slack}")
        if not self.grad:
            parts.append("fwd")
        if self.tag:
            parts.append(self.tag)
        return "-".join(parts)

    def offsets(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32,
                                  device=device) for lens in (self.lens_q, self.keys))

    def ranges(self) -> list[tuple[int, int, int, int]]:
        """``(q0, q1, k0, k1)`` of every sequence."""
        cq = [0, *itertools.accumulate(self.lens_q)]
        ck = [0, *itertools.accumulate(self.keys)]
        return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(self.batch)]

    def max_seqlens(self) -> tuple[int | None, int | None]:
        if self.slack is None:
            return None, None
        return max(self.lens_q, default=0) + self.slack, max(self.keys, default=0) + self.slack

    def make_inputs(self, device, generator: torch.Generator | None = None):
        """Fresh random ``q, k, v, cu_seqlens_q, cu_seqlens_k`` in the case's layout."""
        Tq, Tk, D = sum(self.lens_q), sum(self.keys), self.head_dim
        Hq, Hkv = self.heads_q, self.heads_kv

        def rand(*shape, mag=1.0):
            t = torch.randn(shape, generator=generator, dtype=torch.float32) * mag
            return t.to(device=device, dtype=self.dtype)

        if self.layout == "qkv":
            if Tq != Tk:
                raise ValueError(f"{self.id}: the qkv layout needs equal query and key rows")
            qkv = rand(Tq, Hq + 2 * Hkv, D)
            qkv[:, :Hq + Hkv] *= self.magnitude
            q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
        else:
            q, k, v = rand(Tq, Hq, D, mag=self.magnitude), rand(Tk, Hkv, D,
                                                                mag=self.magnitude), rand(
                Tk, Hkv, D)
        return (q, k, v, *self.offsets(device))

    def options(self) -> dict:
        return dict(causal=self.causal, window=self.window, softcap=self.softcap)

    def call_args(self) -> dict:
        max_q, max_k = self.max_seqlens()
        return dict(max_seqlen_q=max_q, max_seqlen_k=max_k, **self.options())

    def _visible(self, lq: int, lk: int) -> torch.Tensor:
        return visible_mask(lq, lk, causal=self.causal, window=self.window)[0, 0].expand(lq, lk)

    def masked_rows(self) -> torch.Tensor:
        """Boolean ``(total_q,)``: query rows that see no key."""
        return torch.cat([~self._visible(q1 - q0, k1 - k0).any(-1)
                          for q0, q1, k0, k1 in self.ranges()] or [torch.zeros(0, dtype=bool)])

    def unreached_keys(self) -> torch.Tensor:
        """Boolean ``(total_k,)``: key rows no query sees (a sequence without queries, or
        outside every query's band)."""
        return torch.cat([~self._visible(q1 - q0, k1 - k0).any(-2)
                          for q0, q1, k0, k1 in self.ranges()] or [torch.zeros(0, dtype=bool)])

    def forward_reference(self, q, k, v, dropout=None):
        """``(out (total_q, Hq, D), lse (Hq, total_q))``: one dense `reference.safe` call
        per sequence, packed, in q's dtype, differentiable (lse too). ``dropout``: the
        call's `attnkit.dropout.Dropout`, sequence ``b`` drawn as batch ``b``."""
        outs, lses = [], []
        for b, (q0, q1, k0, k1) in enumerate(self.ranges()):
            if q1 > q0 and k1 > k0:
                o, m = reference.safe(as_dense(q, q0, q1), as_dense(k, k0, k1),
                                      as_dense(v, k0, k1), **self.options(),
                                      dropout=None if dropout is None else dropout.at_batch(b))
                outs.append(o[0].transpose(0, 1))
                lses.append(m[0])
            else:  # no query, or no key: every row gives 0 / -inf
                outs.append(torch.zeros_like(q[q0:q1]))
                lses.append(q.new_full((q.shape[1], q1 - q0), float("-inf")))
        if not outs:
            return torch.zeros_like(q), q.new_zeros((q.shape[1], 0))
        return torch.cat(outs), torch.cat(lses, 1)

    def reference(self, q, k, v, dtype, dout, grad: bool = True, dlse=None, dropout=None):
        """``(out, lse, grads)`` of `forward_reference` with the inputs cast to ``dtype``
        (float64: ``ref64``; the input dtype: ``ref_lp``), gradients of
        ``sum(out * dout) + sum(lse * dlse)`` with dlse counted only on rows that see keys."""
        qq, kk, vv = (t.detach().to(dtype).requires_grad_(grad) for t in (q, k, v))
        with torch.enable_grad():
            out, lse = self.forward_reference(qq, kk, vv, dropout)
            grads = None
            if grad:
                outputs, seeds = [out], [dout.to(dtype)]
                if dlse is not None:
                    seen = ~self.masked_rows().to(q.device)
                    outputs.append(torch.where(seen, lse, 0))
                    seeds.append(torch.where(seen, dlse, 0).to(dtype))
                live = [(o, s) for o, s in zip(outputs, seeds) if o.requires_grad]
                grads = (torch.autograd.grad([o for o, _ in live], (qq, kk, vv),
                                             [s for _, s in live], allow_unused=True)
                         if live else (None,) * 3)
                grads = tuple(torch.zeros_like(t) if g is None else g
                              for g, t in zip(grads, (qq, kk, vv)))
        return out.detach(), lse.detach(), grads

    def saved_state_grads(self, q, k, v, dout, out, lse, dlse=None, dropout=None):
        """The contract's backward in float32 from the backend's saved ``out`` and ``lse``,
        per sequence (the accuracy rule's second low-precision reference for gradients);
        None for float64 inputs. ``dropout`` as in `forward_reference`."""
        if q.dtype == torch.float64:
            return None
        qc, kc, vc, oc, dc = (t.detach().float() for t in (q, k, v, out, dout))
        lc = lse.detach().float()
        grads = tuple(torch.zeros_like(t) for t in (qc, kc, vc))
        for b, (q0, q1, k0, k1) in enumerate(self.ranges()):
            if q1 > q0 and k1 > k0:
                g = reference.backward(
                    as_dense(qc, q0, q1), as_dense(kc, k0, k1), as_dense(vc, k0, k1),
                    as_dense(oc, q0, q1), lc[None, :, q0:q1], as_dense(dc, q0, q1),
                    dlse=None if dlse is None else dlse.float()[None, :, q0:q1],
                    scale=None, **self.options(),
                    dropout=None if dropout is None else dropout.at_batch(b))
                for t, part, r0, r1 in zip(grads, g, (q0, k0, k0), (q1, k1, k1)):
                    t[r0:r1] = part[0].transpose(0, 1)
        return grads

    def judge_grads(self, q, k, v, dout, out, lse, grads) -> list[tuple[bool, str]]:
        """The accuracy rule on ``grads`` (dq, dk, dv) of these inputs."""
        ref64 = self.reference(q, k, v, torch.float64, dout)
        ref_lp = self.reference(q, k, v, self.dtype, dout)
        saved = self.saved_state_grads(q, k, v, dout, out, lse) or (None,) * 3
        return [accuracy.check(f"d{n}", g, g64, (glp, gs), self.dtype, accuracy.GRAD_FACTOR)
                for n, g, g64, glp, gs in zip("qkv", grads, ref64[2], ref_lp[2], saved)]


def claims(caps: Capabilities, case: VarlenCase) -> bool:
    return (caps.varlen and case.dtype in caps.dtypes
            and caps.head_dim_min <= case.head_dim <= caps.head_dim_max
            and (caps.causal or not case.causal)
            and (caps.window or case.window is None)
            and (caps.softcap or case.softcap is None)
            and (caps.gqa or case.heads_q == case.heads_kv))


def _fit(caps: Capabilities, cases) -> list[VarlenCase]:
    return unique(c if caps.backward else replace(c, grad=False)
                  for c in cases if claims(caps, c))


def _base(caps: Capabilities, quick: bool) -> VarlenCase:
    lo, hi = caps.head_dim_min, min(caps.head_dim_max, MAX_TESTED_HEAD_DIM)
    return VarlenCase(lens_q=SELF, dtype=_primary_dtype(caps), head_dim=64 if lo <= 64 <= hi
                      else lo, heads_q=1 if quick else 2, heads_kv=1 if quick else 2,
                      grad=caps.backward)


def _gqa(caps: Capabilities, quick: bool) -> dict:
    if not caps.gqa:
        return {}
    return dict(heads_q=2, heads_kv=1) if quick else dict(heads_q=6, heads_kv=2)


def generate(caps: Capabilities, quick: bool = False, device: str = "cpu") -> list[VarlenCase]:
    """The varlen cases a backend declaring these capabilities is held to (none without
    ``varlen``). Quick mode keeps a few small ones (an interpreter steps every program)."""
    if not caps.varlen:
        return []
    base = _base(caps, quick)
    cross = replace(base, lens_q=CROSS[0], lens_k=CROSS[1])
    few = replace(base, lens_q=FEW_QUERIES[0], lens_k=FEW_QUERIES[1])
    gqa = _gqa(caps, quick)
    out = [
        base,
        replace(cross, causal=True, slack=None, **gqa),  # rows of Lq > Lk see no key
        replace(few, causal=caps.causal, slack=5),
        replace(base, layout="qkv", causal=caps.causal, window=(8, 0) if caps.window
                else None, **gqa),
        replace(cross, softcap=10.0, magnitude=2.0, head_dim=40),
    ]
    if quick:
        return _fit(caps, out)
    lo, hi = caps.head_dim_min, min(caps.head_dim_max, MAX_TESTED_HEAD_DIM)
    for d in sorted({16, 72, 111, 128, 256, lo, hi}):
        if lo <= d <= hi:
            out.append(replace(base, head_dim=d, causal=caps.causal))
    for dt in DTYPE_ORDER:
        if dt in caps.dtypes:
            out.append(replace(cross, dtype=dt, causal=caps.causal))
    out += [
        replace(base, causal=True),
        replace(base, window=(4, 4)),
        replace(cross, window=(3, 2), slack=11),
        replace(cross, window=(6, -1), causal=True, **gqa),
        replace(few, causal=False),
        replace(base, heads_q=4, heads_kv=1, causal=caps.causal),
        replace(base, layout="qkv", softcap=5.0, magnitude=3.0),
        replace(cross, grad=False, causal=caps.causal),
        replace(base, lens_q=(1,) * 9, causal=caps.causal, tag="tokens"),
        replace(base, lens_q=(24,) * 4, causal=caps.causal, tag="equal"),
        replace(base, lens_q=(0, 0, 0), lens_k=(0, 0, 0), tag="empty"),
        replace(base, lens_q=(3, 5), lens_k=(0, 0), tag="nokeys"),
    ]
    if not device.startswith("cpu"):
        out += [
            replace(base, lens_q=LONG_TAIL, causal=True, heads_q=4, heads_kv=2, head_dim=128,
                    dtype=torch.bfloat16, tag="longtail"),
            replace(base, lens_q=LONG_TAIL[::-1], lens_k=LONG_TAIL, layout="packed",
                    window=(100, 20), dtype=torch.float16, tag="longtail"),
            replace(base, lens_q=(513,) * 4, causal=True, layout="qkv", heads_q=4,
                    heads_kv=1, head_dim=64, dtype=torch.bfloat16, tag="equal"),
        ]
    return _fit(caps, out)


def isolation_cases(caps: Capabilities, quick: bool = False) -> list[VarlenCase]:
    """Cases for the checks that one sequence's rows never reach another's results, and
    that keys no query sees are never read."""
    if not caps.varlen:
        return []
    base = _base(caps, quick)
    out = [replace(base, lens_q=CROSS[0], lens_k=CROSS[1], causal=caps.causal,
                   window=(4, 1) if caps.window else None, **_gqa(caps, quick))]
    if not quick:  # key rows of sequences without queries
        out.append(replace(base, lens_q=FEW_QUERIES[0], lens_k=FEW_QUERIES[1],
                           causal=caps.causal, **_gqa(caps, quick)))
    return _fit(caps, out)
