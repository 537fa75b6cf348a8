"""Conformance of packed variable-length batches (`attnkit.attention_varlen`), for backends
that declare ``Capabilities.varlen``; a backend that does not is checked to refuse them.

- Each case against one dense reference call per sequence, under the accuracy rule: out,
  lse, dq, dk, dv (with an lse gradient for ``lse_grad`` backends); rows that see no key
  give 0 / -inf / zero dq.
- One sequence's rows never reach another's results: q, k, v and dout rows of one sequence
  poisoned with NaN and +-inf leave every other sequence's out, lse and gradients bit for bit
  the clean run's. Key rows no query sees (a sequence without queries, keys outside every
  band) poisoned so leave everything bit for bit the same, and get zero dk, dv.
- Uninitialised torch allocations filled with NaN change nothing; repeated calls are equal
  bit for bit (gradients too, for a deterministic backward).
- ``torch.compile(fullgraph=True)`` gives eager's results; nested jagged tensors through
  `attnkit.attention` give `attention_varlen`'s.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

import attnkit
from attnkit.registry import NoBackendError
from attnkit.testing import varlen_cases
from attnkit.testing.accuracy import GRAD_FACTOR, OUT_FACTOR, assert_close, bit_difference
from attnkit.testing.checks import assert_grads
from attnkit.testing.generate import parametrize_cases
from attnkit.testing.scratch import uninitialised_scratch

POISONS = (float("nan"), float("inf"), float("-inf"))
NAMES = ("out", "lse", "dq", "dk", "dv")


def pytest_generate_tests(metafunc):
    parametrize_cases(
        metafunc, {"varlen_case": varlen_cases.generate,
                   "varlen_isolation_case": varlen_cases.isolation_cases},
        skip_reason="the backend does not declare varlen (test_varlen_refused checks it refuses)")


def _seeded(case):
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), f"[seed {seed}] {case.id}"


def _call(backend_name, case, q, k, v, cu_q, cu_k, lse: bool):
    res = attnkit.attention_varlen(q, k, v, cu_q, cu_k, **case.call_args(), return_lse=lse,
                                   backend=backend_name)
    return res if lse else (res, None)


def _results(backend_name, case, inputs, dout, lse: bool) -> dict:
    """out, lse and (with a backward) dq, dk, dv of one call, detached; None where absent."""
    q, k, v, cu_q, cu_k = inputs
    q, k, v = (t.detach().requires_grad_(case.grad) for t in (q, k, v))
    out, lse_t = _call(backend_name, case, q, k, v, cu_q, cu_k, lse)
    grads = torch.autograd.grad(out, (q, k, v), dout) if case.grad else (None,) * 3
    return dict(zip(NAMES, (out.detach(), lse_t, *grads)))


def test_varlen_matches_reference(varlen_case, backend, backend_name, device):
    case, caps = varlen_case, backend.capabilities
    gen, where = _seeded(case)
    q, k, v, cu_q, cu_k = case.make_inputs(device, gen)
    if case.grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out, lse = _call(backend_name, case, q, k, v, cu_q, cu_k, caps.lse)
    assert out.dtype == q.dtype and tuple(out.shape) == tuple(q.shape), (
        f"{where}: out is {out.dtype} {tuple(out.shape)}, expected {q.dtype} {tuple(q.shape)}")
    dout = torch.randn(out.shape, generator=gen).to(device, q.dtype)
    ref64 = case.reference(q, k, v, torch.float64, dout, case.grad)
    ref_lp = case.reference(q, k, v, q.dtype, dout, case.grad)
    assert_close(f"{where} out", out, ref64[0], ref_lp[0], q.dtype, factor=OUT_FACTOR)
    masked = case.masked_rows().to(out.device)
    if masked.any():
        assert (out[masked] == 0).all(), f"{where}: rows that see no key must give out == 0"
    if lse is not None:
        want = torch.float64 if q.dtype == torch.float64 else torch.float32
        assert lse.dtype == want and tuple(lse.shape) == (q.shape[1], q.shape[0]), (
            f"{where}: lse is {lse.dtype} {tuple(lse.shape)}, expected {want} "
            f"{(q.shape[1], q.shape[0])} (Hq, total_q)")
        assert_close(f"{where} lse", lse, ref64[1], ref_lp[1], q.dtype, factor=OUT_FACTOR)
        if masked.any():
            assert (lse[:, masked] == float("-inf")).all(), \
                f"{where}: rows that see no key must give lse == -inf"
    if not case.grad:
        return
    grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    saved = case.saved_state_grads(q, k, v, dout, out, lse) or (None,) * 3
    assert_grads(where, grads, (q, k, v), ref64[2], ref_lp[2], saved, masked)
    if lse is not None and caps.lse_grad:
        _check_lse_gradient(case, where, q, k, v, out, lse, dout, gen)


def _check_lse_gradient(case, where, q, k, v, out, lse, dout, gen):
    """A loss on out and lse: dlse holds values on rows that see no key too (their
    gradients stay 0); the references count it only on rows that see keys."""
    dlse = torch.randn(lse.shape, generator=gen).to(lse.device, lse.dtype)
    # An empty batch's lse is a constant the core made (no backend ran): out carries the graph.
    pairs = [(t, g) for t, g in ((out, dout), (lse, dlse)) if t.requires_grad]
    grads = torch.autograd.grad([t for t, _ in pairs], (q, k, v), [g for _, g in pairs])
    ref64 = case.reference(q, k, v, torch.float64, dout, dlse=dlse)[2]
    ref_lp = case.reference(q, k, v, q.dtype, dout, dlse=dlse)[2]
    seen = ~case.masked_rows().to(q.device)
    saved = (case.saved_state_grads(q, k, v, dout, out, lse, dlse=torch.where(seen, dlse, 0))
             or (None,) * 3)
    for name, g, g64, glp, gs in zip("qkv", grads, ref64, ref_lp, saved):
        assert_close(f"{where} d{name} (loss on out and lse)", g, g64, (glp, gs), q.dtype,
                     factor=GRAD_FACTOR)


def _sequence_rows(case):
    """The sequence whose rows the leak check poisons: the one with the most query rows
    that also has keys."""
    return max((r for r in case.ranges() if r[1] > r[0] and r[3] > r[2]),
               key=lambda r: r[1] - r[0])


def test_varlen_sequences_do_not_leak(varlen_isolation_case, backend, backend_name, device):
    case = varlen_isolation_case
    gen, where = _seeded(case)
    inputs = case.make_inputs(device, gen)
    q, k, v, cu_q, cu_k = inputs
    dout = torch.randn(q.shape, generator=gen).to(device, q.dtype)
    lse = backend.capabilities.lse
    clean = _results(backend_name, case, inputs, dout, lse)
    q0, q1, k0, k1 = _sequence_rows(case)
    rows = {"q": (q0, q1), "k": (k0, k1), "v": (k0, k1)}
    keep_q = torch.ones(q.shape[0], dtype=torch.bool, device=device)
    keep_q[q0:q1] = False
    keep_k = torch.ones(k.shape[0], dtype=torch.bool, device=device)
    keep_k[k0:k1] = False
    for value in POISONS:
        poisoned = []
        for name, t in zip("qkv", (q, k, v)):
            t = t.detach().clone()
            t[slice(*rows[name])] = value
            poisoned.append(t)
        dp = dout.clone()
        dp[q0:q1] = value
        got = _results(backend_name, case, (*poisoned, cu_q, cu_k), dp, lse)
        bad = []
        for name, keep, dim in (("out", keep_q, 0), ("lse", keep_q, 1), ("dq", keep_q, 0),
                                ("dk", keep_k, 0), ("dv", keep_k, 0)):
            if clean[name] is None:
                continue
            a, b = (t[:, keep] if dim else t[keep] for t in (got[name], clean[name]))
            d = bit_difference(f"{name} of the other sequences", a, b)
            if d:
                bad.append(d)
        assert not bad, (f"{where}: with q rows {q0}:{q1} and k/v rows {k0}:{k1} (one "
                         f"sequence) and its dout set to {value}: " + "; ".join(bad))


def test_varlen_unreached_keys_are_never_read(varlen_isolation_case, backend, backend_name,
                                              device):
    case = varlen_isolation_case
    gen, where = _seeded(case)
    inputs = case.make_inputs(device, gen)
    q, k, v, cu_q, cu_k = inputs
    unreached = case.unreached_keys().to(device)
    assert unreached.any(), f"{where}: the case was meant to have keys no query sees"
    dout = torch.randn(q.shape, generator=gen).to(device, q.dtype)
    lse = backend.capabilities.lse
    clean = _results(backend_name, case, inputs, dout, lse)
    for name in ("dk", "dv") if case.grad else ():
        assert (clean[name][unreached] == 0).all(), \
            f"{where}: {name} of keys no query sees must be 0"
    for value in POISONS:
        kp, vp = (t.detach().clone() for t in (k, v))
        kp[unreached] = value
        vp[unreached] = value
        got = _results(backend_name, case, (q, kp, vp, cu_q, cu_k), dout, lse)
        bad = [d for n in NAMES if clean[n] is not None
               for d in [bit_difference(n, got[n], clean[n])] if d]
        assert not bad, (f"{where}: with the {int(unreached.sum())} key rows no query sees "
                         f"set to {value}: " + "; ".join(bad))


def test_varlen_scratch_and_repeatability(varlen_isolation_case, backend, backend_name,
                                          device):
    """Uninitialised allocations filled with NaN change nothing, and a second call gives the
    first's out and lse bit for bit (its gradients too, for a deterministic backward)."""
    case = varlen_isolation_case
    caps = backend.capabilities
    gen, where = _seeded(case)
    inputs = case.make_inputs(device, gen)
    dout = torch.randn(inputs[0].shape, generator=gen).to(device, inputs[0].dtype)
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(caps.deterministic, warn_only=True)
    try:
        clean = _results(backend_name, case, inputs, dout, caps.lse)
        again = _results(backend_name, case, inputs, dout, caps.lse)
        with uninitialised_scratch(device) as log:
            got = _results(backend_name, case, inputs, dout, caps.lse)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    compared = NAMES if caps.deterministic else ("out", "lse")
    bad = [d for n in compared if clean[n] is not None
           for d in [bit_difference(n, again[n], clean[n])] if d]
    assert not bad, f"{where}: a second identical call differs: " + "; ".join(bad)
    bad = [d for n in compared if clean[n] is not None
           for d in [bit_difference(n, got[n], clean[n])] if d]
    assert not bad, (f"{where}: with uninitialised allocations filled with NaN "
                     f"({log.allocations} through torch's factories, {log.cached_bytes} "
                     "cached bytes): " + "; ".join(bad))


def _varlen_or_skip(backend):
    if not backend.capabilities.varlen:
        pytest.skip("the backend does not declare varlen (test_varlen_refused checks it "
                    "refuses)")


def test_varlen_compile_fullgraph_matches_eager(backend, backend_name, device, quick):
    """Through the attnkit::attention_varlen custom op, with max_seqlen given (the form a
    CUDA graph captures) and computed: out bit for bit eager's, gradients within the rule."""
    _varlen_or_skip(backend)
    caps = backend.capabilities
    base = varlen_cases._base(caps, quick)
    case = replace(base, lens_q=varlen_cases.CROSS[0],
                                lens_k=varlen_cases.CROSS[1], causal=caps.causal,
                                slack=3, **varlen_cases._gqa(caps, quick))
    gen, where = _seeded(case)
    q, k, v, cu_q, cu_k = case.make_inputs(device, gen)
    q, k, v = (t.requires_grad_(case.grad) for t in (q, k, v))
    weight = torch.randn(q.shape, generator=gen).to(device, q.dtype)
    compiler = "aot_eager" if device.startswith("cpu") else "inductor"
    for max_q, max_k in (case.max_seqlens(), (None, None)):
        def step(q, k, v, max_q=max_q, max_k=max_k):
            out = attnkit.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k,
                                           causal=case.causal, backend=backend_name)
            return out, (out.float() * weight.float()).sum()

        compiled = torch.compile(step, fullgraph=True, backend=compiler)
        results = {}
        for name, fn in (("eager", step), ("compiled", compiled)):
            out, loss = fn(q, k, v)
            grads = torch.autograd.grad(loss, (q, k, v)) if case.grad else None
            results[name] = (out.detach(), grads)
        at = f"{where} ({compiler}, max_seqlen {max_q}, {max_k})"
        assert torch.equal(results["compiled"][0], results["eager"][0]), \
            f"{at}: compiled out differs from eager's"
        if case.grad:
            out = results["eager"][0]
            bad = [msg for ok, msg in case.judge_grads(q, k, v, weight, out, _lse_of(
                backend_name, case, q, k, v, cu_q, cu_k), results["compiled"][1]) if not ok]
            assert not bad, f"{at}: compiled gradients: " + "; ".join(bad)


def _lse_of(backend_name, case, q, k, v, cu_q, cu_k):
    with torch.no_grad():
        return attnkit.attention_varlen(q, k, v, cu_q, cu_k, **case.call_args(),
                                        return_lse=True, backend="reference")[1]


def test_varlen_nested_jagged(backend, backend_name, device):
    """`attnkit.attention` on nested jagged (B, H, j, D) tensors gives `attention_varlen`'s
    out and lse bit for bit, nested with q's offsets, and its gradients."""
    _varlen_or_skip(backend)
    caps = backend.capabilities
    case = replace(varlen_cases._base(caps, True), lens_q=(5, 0, 9),
                                lens_k=(3, 4, 1), causal=caps.causal)
    gen, where = _seeded(case)
    q, k, v, cu_q, cu_k = case.make_inputs(device, gen)
    want, want_lse = _call(backend_name, case, q, k, v, cu_q, cu_k, caps.lse)

    def nested(t, cu):
        leaf = t.detach().clone().requires_grad_(case.grad)
        return leaf, torch.nested.nested_tensor_from_jagged(leaf, offsets=cu.long()
                                                            ).transpose(1, 2)

    (ql, qn), (kl, kn), (vl, vn) = nested(q, cu_q), nested(k, cu_k), nested(v, cu_k)
    res = attnkit.attention(qn, kn, vn, causal=case.causal, return_lse=caps.lse,
                            backend=backend_name)
    out, lse = res if caps.lse else (res, None)
    assert out.is_nested and out.dim() == 4, f"{where}: out must be nested (B, H, j, D)"
    d = bit_difference("out", out.transpose(1, 2).values(), want)
    assert not d, f"{where}: nested call vs attention_varlen: {d}"
    if lse is not None:
        d = bit_difference("lse", lse.transpose(1, 2).values().transpose(0, 1), want_lse)
        assert not d, f"{where}: nested call vs attention_varlen: {d}"
    if case.grad:
        dout = torch.randn(q.shape, generator=gen).to(device, q.dtype)
        out.transpose(1, 2).values().backward(dout)
        bad = [msg for ok, msg in case.judge_grads(q, k, v, dout, want, want_lse if lse
                                                   is not None else _lse_of(
                                                       backend_name, case, q, k, v, cu_q,
                                                       cu_k), (ql.grad, kl.grad, vl.grad))
               if not ok]
        assert not bad, f"{where}: nested gradients: " + "; ".join(bad)


def test_varlen_refused(backend, backend_name, device):
    """A backend that does not declare varlen refuses a packed batch (and nested jagged
    tensors), naming itself, instead of computing it."""
    if backend.capabilities.varlen:
        pytest.skip("the backend declares varlen (its cases run above)")
    caps = backend.capabilities
    case = replace(varlen_cases._base(caps, True), lens_q=(3, 4),
                                heads_q=2, heads_kv=2, grad=False)
    q, k, v, cu_q, cu_k = case.make_inputs(device)
    with pytest.raises(NoBackendError, match=backend_name):
        attnkit.attention_varlen(q, k, v, cu_q, cu_k, backend=backend_name)
