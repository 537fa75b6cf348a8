"""Conformance: dropout on packed variable-length batches, for backends that declare both
``varlen`` and ``dropout``.

A packed call draws the keep mask of the dense batch of its sequences: sequence ``b`` is
batch ``b``, its query rows and key columns counted from its own first rows (`attnkit.dropout`
defines the mask). (a) Exactness: out and gradients equal the per-sequence reference computed
with that mask, under the accuracy rule (with the saved-state second reference). (b) Identity:
the mask read back from the packed output (q = 0 makes P uniform, v one-hot puts key j in
column j) is bit for bit ``dropout_keep_mask(state, p, B, Hq, max_q, max_k)[b, :, :Lq_b,
:Lk_b]``. A backend declaring ``varlen`` without ``dropout`` must refuse a packed call with
dropout.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest
import torch

import attnkit
import attnkit.testing
from attnkit.dropout import Dropout, draw_state
from attnkit.registry import NoBackendError
from attnkit.testing import varlen_cases
from attnkit.testing.accuracy import GRAD_FACTOR, OUT_FACTOR, assert_close
from attnkit.testing.generate import parametrize_cases

P = 0.25
#: The identity check's packing: an empty query sequence, an empty key sequence, a single
#: query, and two equal sequences side by side (a backend may run those as one dense call).
MASK_LENS = ((5, 0, 12, 1, 20, 7, 7), (9, 7, 0, 30, 3, 9, 9))


def cases(caps, quick: bool = False) -> list[varlen_cases.VarlenCase]:
    """The quick varlen cases (every feature a backend declares, zero-length and single
    sequences, GQA, the qkv layout) and an equal-length packing, each with dropout."""
    if not (caps.varlen and caps.dropout):
        return []
    base = varlen_cases._base(caps, quick)
    extra = replace(base, lens_q=(24,) * 4, causal=caps.causal, tag="equal")
    return varlen_cases._fit(caps, [*varlen_cases.generate(caps, quick=True), extra])


def pytest_generate_tests(metafunc):
    parametrize_cases(
        metafunc, {"varlen_dropout_case": cases},
        skip_reason="the backend does not declare both varlen and dropout")


def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def test_varlen_dropout_matches_reference_with_the_mask(varlen_dropout_case, backend_name,
                                                        device):
    case = varlen_dropout_case
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    where = f"[seed {seed}] {case.id} p={P}"
    q, k, v, cu_q, cu_k = case.make_inputs(device, gen)
    q, k, v = (t.requires_grad_(case.grad) for t in (q, k, v))
    out = attnkit.attention_varlen(q, k, v, cu_q, cu_k, **case.call_args(), dropout_p=P,
                                   generator=_generator(device, seed), backend=backend_name)
    drop = Dropout(P, draw_state(q.device, _generator(device, seed)))
    dout = torch.randn(q.shape, generator=gen).to(device, q.dtype)
    ref64 = case.reference(q, k, v, torch.float64, dout, case.grad, dropout=drop)
    ref_lp = case.reference(q, k, v, q.dtype, dout, case.grad, dropout=drop)
    assert_close(f"{where} out", out, ref64[0], ref_lp[0], q.dtype, factor=OUT_FACTOR)
    if not case.grad:
        return
    grads = torch.autograd.grad(out, (q, k, v), dout)
    lse32 = case.forward_reference(*(t.detach().float() for t in (q, k, v)))[1]
    saved = case.saved_state_grads(q, k, v, dout, out, lse32, dropout=drop) or (None,) * 3
    for name, g, g64, glp, gs in zip("qkv", grads, ref64[2], ref_lp[2], saved):
        assert_close(f"{where} d{name}", g, g64, (glp, gs), q.dtype, factor=GRAD_FACTOR)


def _mask_inputs(caps, device):
    """q = 0 and v one-hot (key j of every sequence in column j), packed per MASK_LENS."""
    S = min(32, caps.head_dim_max)
    lens_q, lens_k = MASK_LENS[0], tuple(min(n, S) for n in MASK_LENS[1])
    dtype = varlen_cases._primary_dtype(caps)
    heads = 3
    q = torch.zeros(sum(lens_q), heads, S, dtype=dtype, device=device)
    eye = torch.eye(S, dtype=dtype, device=device)
    v = torch.cat([eye[:n] for n in lens_k]).unsqueeze(1).expand(-1, heads, -1)
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32,
                               device=device) for lens in (lens_q, lens_k))
    return q, v, cu_q, cu_k, lens_q, lens_k


def test_varlen_dropout_mask_is_the_dense_batch_of_documents(backend, backend_name, device):
    caps = backend.capabilities
    if not (caps.varlen and caps.dropout):
        pytest.skip("the backend does not declare both varlen and dropout")
    seed = random.randrange(2**31)
    q, v, cu_q, cu_k, lens_q, lens_k = _mask_inputs(caps, device)
    out = attnkit.attention_varlen(q, v, v, cu_q, cu_k, dropout_p=P,
                                   generator=_generator(device, seed), backend=backend_name)
    state = draw_state(torch.device(device), _generator(device, seed))
    want = attnkit.testing.dropout_keep_mask(state, P, len(lens_q), q.shape[1], max(lens_q),
                                             max(lens_k)).to(out.device)
    bad = []
    for b, (q0, lq, lk) in enumerate(zip(cu_q.tolist(), lens_q, lens_k)):
        if lq == 0 or lk == 0:
            continue
        # Each kept key contributes c / Lk to its column; a dropped one 0.
        got = (out[q0:q0 + lq, :, :lk] > 0.5 / lk).transpose(0, 1)
        n = (got != want[b, :, :lq, :lk]).sum().item()
        if n:
            bad.append(f"sequence {b} (rows {q0}:{q0 + lq}, {lk} keys): {n} of {got.numel()}")
    assert not bad, (f"[seed {seed}] keep decisions differ from the dense batch-of-sequences "
                     "mask of attnkit.dropout: " + "; ".join(bad))


def test_varlen_dropout_refused_unless_declared(backend, backend_name, device):
    caps = backend.capabilities
    if not caps.varlen or caps.dropout:
        pytest.skip("checked where the backend declares varlen but not dropout")
    case = replace(varlen_cases._base(caps, True), lens_q=(3, 4), heads_q=1, heads_kv=1,
                   grad=False)
    q, k, v, cu_q, cu_k = case.make_inputs(device)
    with pytest.raises(NoBackendError, match="dropout_p > 0 not supported"):
        attnkit.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=P, backend=backend_name)
