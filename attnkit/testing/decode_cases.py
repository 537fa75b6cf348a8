"""Decoding cases: a KV cache filled per batch, appended to in place and attended
(`DecodeCase`), and partial results over key splits to merge (`MergeCase`), generated from a
backend's capabilities like the attention cases."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from attnkit import reference
from attnkit.testing.cases import DTYPE_NAMES, DTYPE_ORDER, Heads, Options, heads_id, unique


def cache_case_id(case, parts: list[str], default_layout: str) -> str:
    """A KV-cache case's id: ``parts``, then causal, window, softcap, a layout other than
    ``default_layout`` and the tag."""
    parts = [*parts, "causal" if case.causal else "noncausal"]
    if case.window is not None:
        parts.append(f"win{case.window[0]}_{case.window[1]}")
    if case.softcap is not None:
        parts.append(f"cap{case.softcap:g}")
    if case.layout != default_layout:
        parts.append(case.layout)
    if case.tag:
        parts.append(case.tag)
    return "-".join(parts)


@dataclass(frozen=True)
class DecodeHeads(Heads):
    """The batch and heads of the decoding cases (KV-cache and merge): four sequences, four
    query heads over two kv heads."""
    batch: int = 4
    heads_q: int = 4


@dataclass(frozen=True, kw_only=True)
class CacheCase(Options, DecodeHeads):
    """What every KV-cache case has, contiguous (`DecodeCase`) or paged (`PagedCase`);
    keyword-only past the heads (``causal`` defaults to True here)."""
    #: Positions appended by this call; 0 = attend the cache as it is with ``seqlen_q`` queries.
    s_new: int = 1
    seqlen_q: int = 1
    head_dim: int = 64
    dtype: torch.dtype = torch.float16
    causal: bool = True


@dataclass(frozen=True, kw_only=True)
class DecodeCase(CacheCase):
    s_max: int = 80
    #: "bhsd", or "bshd": (B, S_max, H, D) cache buffers passed transposed (written in place).
    layout: str = "bhsd"

    @property
    def id(self) -> str:
        return cache_case_id(self, [
            DTYPE_NAMES[self.dtype], heads_id(self),
            f"smax{self.s_max}new{self.s_new}q{self.seqlen_q}d{self.head_dim}"], "bhsd")

    def make_inputs(self, device, gen: torch.Generator):
        """``(q, k_cache, v_cache, k_new, v_new, levels)``: random caches in the case's
        layout, filled per batch to ``levels`` (`fill_levels`); k_new/v_new None if
        nothing is appended."""
        B, Hq, Hkv, D = self.batch, self.heads_q, self.heads_kv, self.head_dim
        k_cache = rand((B, Hkv, self.s_max, D), self.dtype, device, gen, self.layout)
        v_cache = rand((B, Hkv, self.s_max, D), self.dtype, device, gen, self.layout)
        q = rand((B, Hq, self.seqlen_q, D), self.dtype, device, gen)
        k_new = v_new = None
        if self.s_new:
            k_new = rand((B, Hkv, self.s_new, D), self.dtype, device, gen)
            v_new = rand((B, Hkv, self.s_new, D), self.dtype, device, gen)
        return q, k_cache, v_cache, k_new, v_new, self.fill_levels(gen)

    def unreached(self, levels: list[int]) -> torch.Tensor:
        """Boolean (B, S_max): cache positions no query sees once ``S_new`` keys are
        appended to each batch's ``levels``."""
        lengths = torch.tensor([L + self.s_new for L in levels])
        seen = reference.visible_mask(self.seqlen_q, self.s_max, causal=self.causal,
                                      window=self.window, seqlens_k=lengths)
        return ~seen.any(-2)[:, 0]

    def fill_levels(self, gen: torch.Generator) -> list[int]:
        """Per batch: empty, full after the append, then random levels."""
        top = self.s_max - self.s_new
        fixed = [0, top]
        rand = torch.randint(0, top + 1, (self.batch,), generator=gen).tolist()
        return [fixed[b] if b < 2 else rand[b] for b in range(self.batch)]


@dataclass(frozen=True)
class MergeCase(DecodeHeads):
    seqlen_q: int = 3
    seqlen_k: int = 90
    head_dim: int = 64
    dtype: torch.dtype = torch.float16
    #: Key splits [bounds[i], bounds[i+1]) (disjoint, covering [0, seqlen_k)).
    bounds: tuple[int, ...] = (0, 30, 31, 90)

    @property
    def id(self) -> str:
        return (f"{DTYPE_NAMES[self.dtype]}-{heads_id(self)}-"
                f"q{self.seqlen_q}k{self.seqlen_k}d{self.head_dim}-parts{len(self.bounds) - 1}")


def decode_dtypes(caps, quick: bool) -> list[torch.dtype]:
    dts = [d for d in DTYPE_ORDER if d in caps.dtypes]
    if quick and len(dts) > 1 and torch.float64 in dts:
        dts.remove(torch.float64)
    return dts


def decode_cases(caps, quick: bool = False) -> list[DecodeCase]:
    dts = decode_dtypes(caps, quick)
    hd = 64 if caps.head_dim_min <= 64 <= caps.head_dim_max else caps.head_dim_min
    base = DecodeCase(dtype=dts[0], head_dim=hd, s_max=40 if quick else 80)
    cases = [replace(base, dtype=d) for d in dts]
    for s_new in (2, 4) if quick else (2, 3, 5):
        cases.append(replace(base, s_new=s_new, seqlen_q=s_new))
    # Attend the cache as it is: one query, and several (bottom-right aligned).
    cases.append(replace(base, s_new=0, seqlen_q=1))
    cases.append(replace(base, s_new=0, seqlen_q=3))
    # Cross-attention style: not causal, nothing appended.
    cases.append(replace(base, s_new=0, seqlen_q=2, causal=False))
    cases.append(replace(base, s_new=2, seqlen_q=2, causal=False))
    # GQA / MQA.
    cases.append(replace(base, heads_q=6, heads_kv=2, s_new=2, seqlen_q=2))
    cases.append(replace(base, heads_q=8, heads_kv=1))
    cases.append(replace(base, heads_q=2, heads_kv=2))
    # Sliding windows (refused by backends that do not declare them).
    cases.append(replace(base, window=(16, 0)))
    cases.append(replace(base, window=(8, 8), causal=False, s_new=3, seqlen_q=3))
    cases.append(replace(base, softcap=10.0))
    cases.append(replace(base, layout="bshd", heads_q=4, heads_kv=2, s_new=2, seqlen_q=2))
    # Long enough for split-KV kernels to split (with few batch x kv-head programs).
    long = 300 if quick else 700
    cases.append(replace(base, batch=2, heads_q=4, heads_kv=1, s_max=long, tag="long"))
    if not quick:
        cases.append(replace(base, batch=3, heads_q=8, heads_kv=2, s_max=long, s_new=4,
                             seqlen_q=4, window=(200, 0), tag="long"))
        # Split-KV kernels in every dtype class, head dims off the power-of-two path, a
        # window and softcap together (each where declared; the dtype or head dim where
        # listed).
        for dt, hd, s_new, opts in ((torch.bfloat16, 128, 1, {}),
                                    (torch.float16, 40, 3, dict(window=(100, 0), softcap=20.0)),
                                    (torch.float32, 64, 2, dict(causal=False))):
            if dt in caps.dtypes and caps.head_dim_min <= hd <= caps.head_dim_max:
                cases.append(replace(base, batch=3, heads_q=8, heads_kv=2, s_max=long,
                                     dtype=dt, head_dim=hd, s_new=s_new, seqlen_q=s_new,
                                     tag="long", **opts))
    return unique(cases)


def isolation_cases(caps, quick: bool = False) -> list[DecodeCase]:
    """Cases for the checks that the cache beyond each batch's keys (and out of every
    query's band) is never read, and that scratch is never read unwritten: a short cache, a
    split-KV one, and (full grid) a windowed one and several queries."""
    dts = decode_dtypes(caps, quick)
    hd = 64 if caps.head_dim_min <= 64 <= caps.head_dim_max else caps.head_dim_min
    base = DecodeCase(dtype=dts[0], head_dim=hd, s_max=40 if quick else 80)
    long = 300 if quick else 700
    cases = [replace(base, s_new=2, seqlen_q=2),
             replace(base, batch=2, heads_q=4, heads_kv=1, s_max=long, tag="long")]
    if not quick:
        cases += [replace(base, batch=3, heads_q=8, heads_kv=2, s_max=long, s_new=3,
                          seqlen_q=3, window=(100, 0), tag="long"),
                  replace(base, s_new=0, seqlen_q=3, causal=False)]
    return cases


def merge_cases(caps, quick: bool = False) -> list[MergeCase]:
    dts = decode_dtypes(caps, quick)
    hd = 64 if caps.head_dim_min <= 64 <= caps.head_dim_max else caps.head_dim_min
    cases = [MergeCase(dtype=d, head_dim=hd) for d in dts]
    cases.append(MergeCase(dtype=dts[0], head_dim=hd, bounds=(0, 90)))
    cases.append(MergeCase(dtype=dts[0], head_dim=hd, heads_q=4, heads_kv=4, seqlen_q=1,
                           bounds=(0, 10, 20, 40, 89, 90)))
    return cases


def rand(shape, dtype, device, gen, layout="bhsd"):
    """Fresh random values (never zeros); "bshd" returns a transposed (B, S, H, D) buffer."""
    if layout == "bshd":
        B, H, S, D = shape
        t = torch.randn((B, S, H, D), generator=gen, dtype=torch.float32)
        return t.to(device=device, dtype=dtype).transpose(1, 2)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def reference_over_prefix(q, k, v, lengths, case, dtype):
    """Per batch, the reference over keys [0, L_b) only: (ref64 out, lse), (ref_lp out, lse)."""
    B, Hq, Sq, D = q.shape
    outs = {"64": [], "lp": []}
    lses = {"64": [], "lp": []}
    opts = dict(causal=case.causal, window=case.window, softcap=case.softcap)
    for b, L in enumerate(lengths):
        for key, ct in (("64", torch.float64), ("lp", dtype)):
            if L == 0:  # no key at all: the spec's fully masked rows
                outs[key].append(torch.zeros((1, Hq, Sq, D), dtype=ct))
                lses[key].append(torch.full((1, Hq, Sq), float("-inf"), dtype=torch.float64))
                continue
            o, lse = reference.safe(q[b:b + 1].cpu().to(ct), k[b:b + 1, :, :L].cpu().to(ct),
                                    v[b:b + 1, :, :L].cpu().to(ct), **opts)
            outs[key].append(o)
            lses[key].append(lse.to(torch.float64))
    return ((torch.cat(outs["64"]), torch.cat(lses["64"])),
            (torch.cat(outs["lp"]), torch.cat(lses["lp"])))
