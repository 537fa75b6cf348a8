"""Conformance: results depend on nothing they must not.

- Keys no query sees, at or past ``seqlens_k[b]`` (decoding: past ``cache_seqlens[b] +
  S_new``) or outside every query's band, are never read: filled with NaN, then +inf, then
  -inf, out, lse and gradients are the clean run's bit for bit, and the gradients of those
  keys are 0 in both.
- Scratch a backend gets uninitialised from torch (`attnkit.testing.scratch`) is never
  read before it is written: filled with NaN, the results are bit for bit a plain run's.
- A NaN in one query row stays in that row: its out and lse are NaN, every other row is the
  clean run's bit for bit.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

import attnkit
from attnkit.spec import AttentionProblem
from attnkit.testing import cases as _cases
from attnkit.testing.accuracy import bit_difference
from attnkit.testing.decode_cases import isolation_cases
from attnkit.testing.generate import parametrize_cases
from attnkit.testing.scratch import uninitialised_scratch

POISONS = (float("nan"), float("inf"), float("-inf"))
NAMES = ("out", "lse", "dq", "dk", "dv")


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, {"unreached_case": _cases.unreached_cases,
                                 "scratch_case": _cases.scratch_cases,
                                 "nan_row_case": _cases.nan_row_cases,
                                 "decode_isolation_case": isolation_cases})


def _seeded(case):
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), f"[seed {seed}] {case.id}"


def _results(backend_name, case, q, k, v, seqlens_k, dout, lse: bool) -> dict:
    """out, lse and (with a backward) dq, dk, dv of one call, detached; None where absent."""
    q, k, v = (t.detach().requires_grad_(case.grad) for t in (q, k, v))
    res = attnkit.attention(q, k, v, **case.options(seqlens_k), return_lse=lse,
                            backend=backend_name)
    out, lse_t = res if lse else (res, None)
    grads = torch.autograd.grad(out, (q, k, v), dout) if case.grad else (None,) * 3
    return dict(zip(NAMES, (out.detach(), lse_t, *grads)))


def _differences(got: dict, want: dict) -> list[str]:
    return [d for n in NAMES if want[n] is not None
            for d in [bit_difference(n, got[n], want[n])] if d]


def test_unreached_keys_are_never_read(unreached_case, backend, backend_name, device):
    case = unreached_case
    gen, where = _seeded(case)
    q, k, v, seqlens_k = case.make_inputs(device, gen)
    unreached = case.unreached_keys(seqlens_k)
    assert unreached.any(), f"{where}: the case was meant to have keys no query sees"
    keys = unreached.to(device)[:, None, :, None]  # (B or 1, 1, Sk, 1)
    dout = torch.randn(q.shape, generator=gen).to(device, q.dtype)
    lse = backend.capabilities.lse
    clean = _results(backend_name, case, q, k, v, seqlens_k, dout, lse)
    for name in ("dk", "dv") if case.grad else ():
        g = clean[name]
        assert (g.masked_select(keys.expand_as(g)) == 0).all(), \
            f"{where}: {name} of keys no query sees must be 0"
    for value in POISONS:
        kp, vp = (t.detach().clone().masked_fill_(keys, value) for t in (k, v))
        bad = _differences(_results(backend_name, case, q, kp, vp, seqlens_k, dout, lse), clean)
        assert not bad, (f"{where}: with the {int(unreached.sum())} key positions no query "
                         f"sees set to {value} in k and v: " + "; ".join(bad))


def test_uninitialised_scratch_is_never_read(scratch_case, backend, backend_name, device):
    case = scratch_case
    gen, where = _seeded(case)
    q, k, v, seqlens_k = case.make_inputs(device, gen)
    dout = torch.randn(q.shape, generator=gen).to(device, q.dtype)
    lse = backend.capabilities.lse
    clean = _results(backend_name, case, q, k, v, seqlens_k, dout, lse)
    with uninitialised_scratch(device) as log:
        got = _results(backend_name, case, q, k, v, seqlens_k, dout, lse)
    bad = _differences(got, clean)
    assert not bad, (f"{where}: with uninitialised allocations filled with NaN "
                     f"({log.allocations} through torch's factories, {log.cached_bytes} "
                     "cached bytes): " + "; ".join(bad))


def test_nan_query_row_stays_in_its_row(nan_row_case, backend, backend_name, device):
    case = nan_row_case
    gen, where = _seeded(case)
    q, k, v, seqlens_k = case.make_inputs(device, gen)
    b, h, i = case.batch - 1, case.heads_q - 1, case.seqlen_q // 2  # sees keys in every case
    lse = backend.capabilities.lse
    clean = _results(backend_name, case, q, k, v, seqlens_k, None, lse)
    qn = q.clone()
    qn[b, h, i, 0] = float("nan")
    got = _results(backend_name, case, qn, k, v, seqlens_k, None, lse)
    row = f"{where}: the row with a NaN in q (batch {b}, head {h}, query {i})"
    assert got["out"][b, h, i].isnan().all(), f"{row}: out is {got['out'][b, h, i].tolist()}"
    others = torch.ones(q.shape[:3], dtype=torch.bool, device=q.device)
    others[b, h, i] = False
    if lse:
        assert got["lse"][b, h, i].isnan(), f"{row}: lse is {got['lse'][b, h, i].item()}"
    bad = [d for n in ("out", "lse") if clean[n] is not None
           for d in [bit_difference(f"{n} of the other rows", got[n][others], clean[n][others])]
           if d]
    assert not bad, f"{row}: " + "; ".join(bad)


# -- decoding ------------------------------------------------------------------------------

def _decode(backend, backend_name, c, inputs, poison=None):
    """``(out, lse, k_cache, v_cache)`` after one call on copies of the caches; ``poison``:
    ``(positions, value)`` written into the copies first."""
    q, k_cache, v_cache, k_new, v_new, levels = inputs
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    if poison is not None:
        where, value = poison
        for t in (k_cache, v_cache):
            t.masked_fill_(where, value)
    lse = backend.capabilities.lse
    cache_seqlens = torch.tensor(levels, dtype=torch.int32, device=q.device)
    with torch.no_grad():
        res = attnkit.attention_with_kvcache(
            q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal=c.causal,
            window=c.window, softcap=c.softcap, return_lse=lse, backend=backend_name)
    out, lse_t = res if lse else (res, None)
    return out, lse_t, k_cache, v_cache


def _decode_inputs(c, backend, device):
    gen = torch.Generator().manual_seed(zlib.crc32(c.id.encode()))
    inputs = c.make_inputs(device, gen)
    q, k_cache, v_cache, _, _, levels = inputs
    lengths = torch.tensor([L + c.s_new for L in levels], dtype=torch.int32, device=device)
    problem = AttentionProblem.from_tensors(
        q, k_cache, v_cache, causal=c.causal, window=c.window, softcap=c.softcap,
        seqlens_k=lengths, return_lse=backend.capabilities.lse, needs_grad=False)
    reasons = backend.not_supported_reasons(problem)
    if reasons:  # test_decode_step checks the refusal itself
        pytest.skip(f"refused as declared: {'; '.join(reasons)}")
    return inputs


def test_decode_unreached_cache_is_never_read(decode_isolation_case, backend, backend_name,
                                              device):
    c = decode_isolation_case
    inputs = _decode_inputs(c, backend, device)
    unreached = c.unreached(inputs[-1])
    assert unreached.any(), f"{c.id}: the case was meant to have cache positions no query sees"
    where = unreached.to(device)[:, None, :, None]
    clean = _decode(backend, backend_name, c, inputs)
    for value in POISONS:
        got = _decode(backend, backend_name, c, inputs, (where, value))
        expect_k, expect_v = (t.clone().masked_fill_(where, value) for t in clean[2:])
        bad = [d for d in (bit_difference("out", got[0], clean[0]),
                           clean[1] is not None and bit_difference("lse", got[1], clean[1]),
                           bit_difference("k_cache", got[2], expect_k),
                           bit_difference("v_cache", got[3], expect_v)) if d]
        assert not bad, (f"{c.id}: with the {int(unreached.sum())} cache positions no query "
                         f"sees set to {value}: " + "; ".join(bad))


def test_decode_uninitialised_scratch_is_never_read(decode_isolation_case, backend,
                                                    backend_name, device):
    c = decode_isolation_case
    inputs = _decode_inputs(c, backend, device)
    clean = _decode(backend, backend_name, c, inputs)
    with uninitialised_scratch(device) as log:
        got = _decode(backend, backend_name, c, inputs)
    bad = [d for n, a, b in zip(("out", "lse", "k_cache", "v_cache"), got, clean)
           if b is not None for d in [bit_difference(n, a, b)] if d]
    assert not bad, (f"{c.id}: with uninitialised allocations filled with NaN "
                     f"({log.allocations} through torch's factories, {log.cached_bytes} "
                     "cached bytes): " + "; ".join(bad))
