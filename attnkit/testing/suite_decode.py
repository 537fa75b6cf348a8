"""Conformance: decoding with a KV cache (`attnkit.attention_with_kvcache`) and
`attnkit.merge_attention`, run against the backend under test.

Every case fills each batch's cache to its own level (0, full, and levels between), appends
``S_new`` positions in place, and checks: the caller's ``cache_seqlens`` is untouched, every
batch's new positions (and nothing else) were written, and ``out``/``lse`` match the
reference computed over each batch's filled prefix alone (no ``seqlens_k``: an independent
path). Problems the backend does not claim (a window, softcap, GQA...) are checked to be
refused, with the caches left unwritten.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import pytest
import torch

import attnkit
from attnkit import reference
from attnkit.registry import NoBackendError, registry
from attnkit.spec import AttentionProblem
from attnkit.testing.accuracy import assert_close
from attnkit.testing.cases import DTYPE_NAMES, DTYPE_ORDER


@dataclass(frozen=True)
class DecodeCase:
    batch: int = 4
    heads_q: int = 4
    heads_kv: int = 2
    s_max: int = 80
    #: Positions appended by this call; 0 = attend the cache as it is with ``seqlen_q`` queries.
    s_new: int = 1
    seqlen_q: int = 1
    head_dim: int = 64
    dtype: torch.dtype = torch.float16
    causal: bool = True
    window: tuple[int, int] | None = None
    softcap: float | None = None
    #: "bhsd", or "bshd": (B, S_max, H, D) cache buffers passed transposed (written in place).
    layout: str = "bhsd"
    tag: str = ""

    @property
    def id(self) -> str:
        parts = [DTYPE_NAMES[self.dtype], f"B{self.batch}H{self.heads_q}x{self.heads_kv}",
                 f"smax{self.s_max}new{self.s_new}q{self.seqlen_q}d{self.head_dim}"]
        parts.append("causal" if self.causal else "noncausal")
        if self.window is not None:
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        if self.softcap is not None:
            parts.append(f"cap{self.softcap:g}")
        if self.layout != "bhsd":
            parts.append(self.layout)
        if self.tag:
            parts.append(self.tag)
        return "-".join(parts)

    def fill_levels(self, gen: torch.Generator) -> list[int]:
        """Per batch: empty, full after the append, then random levels."""
        top = self.s_max - self.s_new
        fixed = [0, top]
        rand = torch.randint(0, top + 1, (self.batch,), generator=gen).tolist()
        return [fixed[b] if b < 2 else rand[b] for b in range(self.batch)]


@dataclass(frozen=True)
class MergeCase:
    batch: int = 4
    heads_q: int = 4
    heads_kv: int = 2
    seqlen_q: int = 3
    seqlen_k: int = 90
    head_dim: int = 64
    dtype: torch.dtype = torch.float16
    #: Key splits [bounds[i], bounds[i+1]) (disjoint, covering [0, seqlen_k)).
    bounds: tuple[int, ...] = (0, 30, 31, 90)

    @property
    def id(self) -> str:
        return (f"{DTYPE_NAMES[self.dtype]}-B{self.batch}H{self.heads_q}x{self.heads_kv}-"
                f"q{self.seqlen_q}k{self.seqlen_k}d{self.head_dim}-parts{len(self.bounds) - 1}")


def _dtypes(caps, quick: bool) -> list[torch.dtype]:
    dts = [d for d in DTYPE_ORDER if d in caps.dtypes]
    if quick and len(dts) > 1 and torch.float64 in dts:
        dts.remove(torch.float64)
    return dts


def decode_cases(caps, quick: bool = False) -> list[DecodeCase]:
    dts = _dtypes(caps, quick)
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
    seen, unique = set(), []
    for c in cases:
        if c.id not in seen:
            seen.add(c.id)
            unique.append(c)
    return unique


def merge_cases(caps, quick: bool = False) -> list[MergeCase]:
    dts = _dtypes(caps, quick)
    hd = 64 if caps.head_dim_min <= 64 <= caps.head_dim_max else caps.head_dim_min
    cases = [MergeCase(dtype=d, head_dim=hd) for d in dts]
    cases.append(MergeCase(dtype=dts[0], head_dim=hd, bounds=(0, 90)))
    cases.append(MergeCase(dtype=dts[0], head_dim=hd, heads_q=4, heads_kv=4, seqlen_q=1,
                           bounds=(0, 10, 20, 40, 89, 90)))
    return cases


def pytest_generate_tests(metafunc):
    name = metafunc.config.getoption("--attnkit-backend", default=None)
    if not name:
        return
    caps = registry.get(name).capabilities
    quick = metafunc.config.getoption("--attnkit-quick", default=False)
    prefix = f"{name}-{metafunc.config.getoption('--attnkit-device', default='cpu')}"
    if "decode_case" in metafunc.fixturenames:
        cs = decode_cases(caps, quick)
        metafunc.parametrize("decode_case", cs, ids=[f"{prefix}-{c.id}" for c in cs])
    if "merge_case" in metafunc.fixturenames:
        ms = merge_cases(caps, quick)
        metafunc.parametrize("merge_case", ms, ids=[f"{prefix}-{c.id}" for c in ms])


def _rand(shape, dtype, device, gen, layout="bhsd"):
    """Fresh random values (never zeros); "bshd" returns a transposed (B, S, H, D) buffer."""
    if layout == "bshd":
        B, H, S, D = shape
        t = torch.randn((B, S, H, D), generator=gen, dtype=torch.float32)
        return t.to(device=device, dtype=dtype).transpose(1, 2)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _reference_over_prefix(q, k, v, lengths, case, dtype):
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


def test_decode_step(decode_case, backend, backend_name, device):
    """Append in place, then attend: cache contents, untouched cache_seqlens, accuracy."""
    c = decode_case
    gen = torch.Generator().manual_seed(zlib.crc32(c.id.encode()))
    B, Hq, Hkv, D = c.batch, c.heads_q, c.heads_kv, c.head_dim
    k_cache = _rand((B, Hkv, c.s_max, D), c.dtype, device, gen, c.layout)
    v_cache = _rand((B, Hkv, c.s_max, D), c.dtype, device, gen, c.layout)
    q = _rand((B, Hq, c.seqlen_q, D), c.dtype, device, gen)
    k_new = v_new = None
    if c.s_new:
        k_new = _rand((B, Hkv, c.s_new, D), c.dtype, device, gen)
        v_new = _rand((B, Hkv, c.s_new, D), c.dtype, device, gen)
    levels = c.fill_levels(gen)
    cache_seqlens = torch.tensor(levels, dtype=torch.int32, device=device)
    seqlens_before = cache_seqlens.clone()
    k_before, v_before = k_cache.clone(), v_cache.clone()
    lse_wanted = backend.capabilities.lse
    opts = dict(causal=c.causal, window=c.window, softcap=c.softcap, return_lse=lse_wanted,
                backend=backend_name)

    problem = AttentionProblem.from_tensors(
        q, k_cache, v_cache, causal=c.causal, window=c.window, softcap=c.softcap,
        seqlens_k=cache_seqlens + c.s_new, return_lse=lse_wanted, needs_grad=False)
    reasons = backend.not_supported_reasons(problem)
    if reasons:
        with torch.no_grad(), pytest.raises(NoBackendError):
            attnkit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                           **opts)
        assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before), \
            "a refused call wrote into the cache"
        pytest.skip(f"refused as declared: {'; '.join(reasons)}")

    with torch.no_grad():
        res = attnkit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                             **opts)
    out, lse = res if lse_wanted else (res, None)

    assert torch.equal(cache_seqlens, seqlens_before), "cache_seqlens was modified"
    k_expect, v_expect = k_before.clone(), v_before.clone()
    for b, L in enumerate(levels):
        if c.s_new:
            k_expect[b, :, L:L + c.s_new] = k_new[b]
            v_expect[b, :, L:L + c.s_new] = v_new[b]
    for b, L in enumerate(levels):
        assert torch.equal(k_cache[b], k_expect[b]), \
            f"k_cache of batch {b} (fill {L}, S_new {c.s_new}) is not as expected"
        assert torch.equal(v_cache[b], v_expect[b]), \
            f"v_cache of batch {b} (fill {L}, S_new {c.s_new}) is not as expected"

    lengths = [L + c.s_new for L in levels]
    (o64, l64), (olp, llp) = _reference_over_prefix(q, k_expect, v_expect, lengths, c, c.dtype)
    assert out.dtype == c.dtype and tuple(out.shape) == (B, Hq, c.seqlen_q, D)
    assert_close("out", out, o64, olp, c.dtype, 2.0)
    if lse is not None:
        assert lse.dtype == (torch.float64 if c.dtype == torch.float64 else torch.float32)
        assert_close("lse", lse, l64, llp, c.dtype, 2.0)


def test_decode_overflow_refused(backend_name, device):
    """S_max overflow raises before anything is written."""
    gen = torch.Generator().manual_seed(7)
    caps = registry.get(backend_name).capabilities
    dt, D = _dtypes(caps, True)[0], max(caps.head_dim_min, 16)
    k_cache = _rand((2, 1, 8, D), dt, device, gen)
    v_cache = _rand((2, 1, 8, D), dt, device, gen)
    before = k_cache.clone(), v_cache.clone()
    q = _rand((2, 1, 2, D), dt, device, gen)
    new = _rand((2, 1, 2, D), dt, device, gen)
    with torch.no_grad(), pytest.raises(ValueError, match="overflow"):
        attnkit.attention_with_kvcache(
            q, k_cache, v_cache, torch.tensor([3, 7], dtype=torch.int32, device=device),
            new, new, backend=backend_name)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_merge_attention(merge_case, backend, backend_name, device):
    """Partials over disjoint key ranges, some of whose rows saw no key, merge to the full
    result."""
    c = merge_case
    gen = torch.Generator().manual_seed(zlib.crc32(c.id.encode()))
    B, Hq, Hkv, Sq, Sk, D = (c.batch, c.heads_q, c.heads_kv, c.seqlen_q, c.seqlen_k,
                             c.head_dim)
    q = _rand((B, Hq, Sq, D), c.dtype, device, gen)
    k = _rand((B, Hkv, Sk, D), c.dtype, device, gen)
    v = _rand((B, Hkv, Sk, D), c.dtype, device, gen)
    # Batch 0 has no key, batch 1 only keys of the first part: later partials see nothing.
    lens = [0, max(c.bounds[1] // 2, 1)] + torch.randint(1, Sk + 1, (B - 2,),
                                                         generator=gen).tolist()
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    outs, lses = [], []
    for a, z in zip(c.bounds[:-1], c.bounds[1:]):
        part_lens = (seqlens - a).clamp(0, z - a).to(torch.int32)
        kp, vp = k[:, :, a:z], v[:, :, a:z]
        problem = AttentionProblem.from_tensors(q, kp, vp, seqlens_k=part_lens,
                                                return_lse=True, needs_grad=False)
        reasons = backend.not_supported_reasons(problem)
        if reasons:
            with pytest.raises(NoBackendError):
                attnkit.attention(q, kp, vp, seqlens_k=part_lens, return_lse=True,
                                  backend=backend_name)
            pytest.skip(f"refused as declared: {'; '.join(reasons)}")
        o, lse = attnkit.attention(q, kp, vp, seqlens_k=part_lens, return_lse=True,
                                   backend=backend_name)
        outs.append(o)
        lses.append(lse)
    out, lse = attnkit.merge_attention(outs, lses)
    s_cpu = seqlens.cpu()
    r64 = reference.safe(q.cpu().double(), k.cpu().double(), v.cpu().double(), seqlens_k=s_cpu)
    rlp = reference.safe(q.cpu(), k.cpu(), v.cpu(), seqlens_k=s_cpu)
    assert out.dtype == c.dtype
    assert_close("merged out", out, r64[0], rlp[0], c.dtype, 2.0)
    assert_close("merged lse", lse, r64[1], rlp[1], c.dtype, 2.0)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all(), \
        "a row no partial saw must merge to out 0, lse -inf"
