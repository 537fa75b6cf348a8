"""Conformance: decoding with a KV cache (`attnkit.attention_with_kvcache`) and
`attnkit.merge_attention`, run against the backend under test.

Every case fills each batch's cache to its own level (0, full, and levels between), appends
``S_new`` positions in place, and checks: the caller's ``cache_seqlens`` is untouched, every
batch's new positions (and nothing else) were written, and ``out``/``lse`` match the
reference computed over each batch's filled prefix alone (no ``seqlens_k``: an independent
path). Problems the backend does not claim (a window, softcap, GQA...) are checked to be
refused, with the caches left unwritten. A decoding loop then steps one call signature
many times, as a model does.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import attnkit
from attnkit import reference
from attnkit.registry import NoBackendError, registry
from attnkit.spec import AttentionProblem
from attnkit.testing.accuracy import assert_close
from attnkit.testing.cases import _primary_dtype
from attnkit.testing.decode_cases import (
    DecodeCase,
    decode_cases,
    decode_dtypes,
    merge_cases,
    rand,
    reference_over_prefix,
)
from attnkit.testing.device_refusal import DEFECTS, assert_refused
from attnkit.testing.generate import parametrize_cases


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, {"decode_case": decode_cases, "merge_case": merge_cases})


def test_decode_step(decode_case, backend, backend_name, device):
    """Append in place, then attend: cache contents, untouched cache_seqlens, accuracy."""
    c = decode_case
    gen = torch.Generator().manual_seed(zlib.crc32(c.id.encode()))
    B, Hq, D = c.batch, c.heads_q, c.head_dim
    q, k_cache, v_cache, k_new, v_new, levels = c.make_inputs(device, gen)
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
    (o64, l64), (olp, llp) = reference_over_prefix(q, k_expect, v_expect, lengths, c, c.dtype)
    assert out.dtype == c.dtype and tuple(out.shape) == (B, Hq, c.seqlen_q, D)
    assert_close("out", out, o64, olp, c.dtype, 2.0)
    if lse is not None:
        assert lse.dtype == (torch.float64 if c.dtype == torch.float64 else torch.float32)
        assert_close("lse", lse, l64, llp, c.dtype, 2.0)


def test_decode_overflow_refused(backend_name, device):
    """S_max overflow raises before anything is written."""
    gen = torch.Generator().manual_seed(7)
    caps = registry.get(backend_name).capabilities
    dt, D = decode_dtypes(caps, True)[0], max(caps.head_dim_min, 16)
    k_cache = rand((2, 1, 8, D), dt, device, gen)
    v_cache = rand((2, 1, 8, D), dt, device, gen)
    before = k_cache.clone(), v_cache.clone()
    q = rand((2, 1, 2, D), dt, device, gen)
    new = rand((2, 1, 2, D), dt, device, gen)
    with torch.no_grad(), pytest.raises(ValueError, match="overflow"):
        attnkit.attention_with_kvcache(
            q, k_cache, v_cache, torch.tensor([3, 7], dtype=torch.int32, device=device),
            new, new, backend=backend_name)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.parametrize("defect", DEFECTS["contiguous"])
def test_decode_bad_fill_level_stops_a_device_check(defect, backend, backend_name, device):
    """validate="device" (no host synchronisation): a fill level below 0 or whose appended
    positions pass S_max stops the call before the write; on CUDA in a child process
    (`attnkit.testing.device_refusal`)."""
    assert_refused("contiguous", backend, backend_name, defect, device)


def test_merge_attention(merge_case, backend, backend_name, device):
    """Partials over disjoint key ranges, some of whose rows saw no key, merge to the full
    result."""
    c = merge_case
    gen = torch.Generator().manual_seed(zlib.crc32(c.id.encode()))
    B, Hq, Hkv, Sq, Sk, D = (c.batch, c.heads_q, c.heads_kv, c.seqlen_q, c.seqlen_k,
                             c.head_dim)
    q = rand((B, Hq, Sq, D), c.dtype, device, gen)
    k = rand((B, Hkv, Sk, D), c.dtype, device, gen)
    v = rand((B, Hkv, Sk, D), c.dtype, device, gen)
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


def test_decoding_loop(backend, backend_name, device, quick):
    """Step after step with fresh queries and appended keys (one call signature, so per-
    signature launch state is reused), on a cache of (B, H, S, D) and one of (B, S, H, D)
    strides, then a step without new keys: every output matches the reference over the
    filled prefix."""
    caps = backend.capabilities
    B, Hq, Hkv = 3, 8 if caps.gqa else 2, 2
    S, D = (80, 16) if quick else (700, 64)
    D = max(caps.head_dim_min, min(D, caps.head_dim_max))
    dt = _primary_dtype(caps)
    gen = torch.Generator().manual_seed(0)
    for layout in ("bhsd", "bshd"):
        k_cache = rand((B, Hkv, S, D), dt, device, gen, layout)
        v_cache = rand((B, Hkv, S, D), dt, device, gen, layout)
        lens = torch.tensor([S // 2, 17, S - 8], dtype=torch.int32, device=device)
        for step in range(5):
            new = step < 4
            q = rand((B, Hq, 1 if new else 2, D), dt, device, gen)
            kv_new = [rand((B, Hkv, 1, D), dt, device, gen) for _ in range(2)] if new else ()
            problem = AttentionProblem.from_tensors(q, k_cache, v_cache, causal=caps.causal,
                                                    seqlens_k=lens + int(new),
                                                    needs_grad=False, check_values=False)
            if backend.not_supported_reasons(problem):
                pytest.skip("refused as declared: "
                            + "; ".join(backend.not_supported_reasons(problem)))
            with torch.no_grad():
                out = attnkit.attention_with_kvcache(q, k_cache, v_cache, lens, *kv_new,
                                                     causal=caps.causal, backend=backend_name)
            if new:
                lens += 1
            levels = lens.tolist()
            (o64, _), (olp, _) = reference_over_prefix(
                q, k_cache, v_cache, levels,
                DecodeCase(causal=caps.causal), dt)
            assert_close(f"{layout} step {step} out", out, o64, olp, dt, 2.0)
