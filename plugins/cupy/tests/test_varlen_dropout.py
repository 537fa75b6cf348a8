"""GPU tests of the cupy kernels' packed sequences and dropout (``cuda``: skipped without a
GPU the backend can use): packed calls against one dense reference call per sequence, rows of
one sequence poisoned without reaching any other, a max_seqlen bound above the longest
sequence; dropout against the reference with the materialised mask, forward and gradients;
dropout on packed sequences (the keep mask of the dense batch of documents: document d takes
batch index d, rows and columns from its own start) against the per-document reference, a
dense batch of equal documents, and the mask read back. `attnkit check cupy --device cuda`
runs the conformance suite's varlen and dropout cases."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import reference
from attnkit.dropout import Dropout, draw_state
from attnkit.registry import registry
from attnkit.testing.accuracy import GRAD_FACTOR, OUT_FACTOR, assert_close, bit_difference

pytestmark = pytest.mark.cuda

DEV = "cuda"


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _packed(lengths_q, lengths_k, Hq, Hkv, D, dtype, gen, qkv_slice=False):
    """q, k, v packed (total, H, D) and int32 offsets; with ``qkv_slice`` q, k and v are
    column slices of one (total, Hq + 2 Hkv, D) projection (strided rows, read in place)."""
    tq, tk = sum(lengths_q), sum(lengths_k)
    if qkv_slice:
        assert tq == tk
        qkv = torch.randn(tq, Hq + 2 * Hkv, D, generator=gen).to(DEV, dtype)
        q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    else:
        q = torch.randn(tq, Hq, D, generator=gen).to(DEV, dtype)
        k, v = (torch.randn(tk, Hkv, D, generator=gen).to(DEV, dtype) for _ in range(2))

    def offsets(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                            device=DEV)

    return q, k, v, offsets(lengths_q), offsets(lengths_k)


def _per_sequence_reference(q, k, v, cu_q, cu_k, dout, dtype, dropout=None, **opts):
    """out (total_q, Hq, D), lse (Hq, total_q) and dq, dk, dv from dense reference calls, one
    per sequence, in ``dtype``. With ``dropout`` sequence b is batch index b of its call (b
    zero batches before it), so it gets the dense mask's counters of batch b."""
    qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        qs = qq[cq[b]:cq[b + 1]].transpose(0, 1)[None]
        ks = kk[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        vs = vv[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        if ks.shape[2] == 0 or qs.shape[2] == 0:  # no key to see (or no row): 0 and -inf
            outs.append(torch.zeros(qs.shape[2], q.shape[1], q.shape[2], dtype=dtype,
                                    device=DEV))
            lses.append(torch.full((q.shape[1], qs.shape[2]), float("-inf"), dtype=dtype,
                                   device=DEV))
            continue
        if dropout is None:
            o, m = reference.safe(qs, ks, vs, **opts)
        else:
            def at_b(t, b=b):
                return torch.cat([t.new_zeros((b, *t.shape[1:])), t])

            o, m = reference.safe(at_b(qs), at_b(ks), at_b(vs), dropout=dropout, **opts)
            o, m = o[b:], m[b:]
        outs.append(o[0].transpose(0, 1))
        lses.append(m[0])
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    grads = torch.autograd.grad(out, (qq, kk, vv), dout.to(dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (qq, kk, vv))]
    return out.detach(), lse.detach(), grads


def _run(q, k, v, cu_q, cu_k, dout, max_q=None, max_k=None, **opts):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out, lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True,
                                        backend="cupy", **opts)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), lse.detach(), grads


VARLEN_CASES = [
    # (dtype, lengths_q, lengths_k, Hq, Hkv, D, options)
    (torch.bfloat16, [0, 1, 77, 130, 0, 64], [5, 1, 77, 200, 9, 0], 4, 2, 64,
     dict(causal=True)),
    (torch.float16, [33, 0, 129, 1], [40, 17, 100, 1], 2, 1, 128,
     dict(window=(20, 5), softcap=20.0)),
    (torch.bfloat16, [65, 3, 190], [65, 3, 190], 2, 2, 72, dict(causal=True)),
    (torch.float16, [17, 250], [300, 10], 2, 1, 256, dict()),
    (torch.float32, [0, 37, 1, 50], [12, 37, 0, 64], 2, 1, 40, dict(causal=True)),
    (torch.float32, [90, 5], [70, 5], 3, 1, 128, dict(window=(8, 8), softcap=10.0)),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"{str(c[0])[6:]}-D{c[5]}")
def test_varlen_matches_per_sequence_reference(case):
    dtype, lq, lk, Hq, Hkv, D, opts = case
    gen = torch.Generator().manual_seed(sum(lq) + D)
    q, k, v, cu_q, cu_k = _packed(lq, lk, Hq, Hkv, D, dtype, gen)
    dout = torch.randn(q.shape, generator=gen).to(DEV, dtype)
    out, lse, grads = _run(q, k, v, cu_q, cu_k, dout, **opts)
    ref64 = _per_sequence_reference(q, k, v, cu_q, cu_k, dout, torch.float64, **opts)
    reflp = _per_sequence_reference(q, k, v, cu_q, cu_k, dout, dtype, **opts)
    assert out.shape == q.shape and lse.shape == (Hq, q.shape[0])
    assert_close("out", out, ref64[0], reflp[0], dtype, factor=OUT_FACTOR)
    assert_close("lse", lse, ref64[1], reflp[1], dtype, factor=OUT_FACTOR)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref64[1])), "rows that see no key"
    for name, g, g64, glp in zip("qkv", grads, ref64[2], reflp[2]):
        assert_close(f"d{name}", g, g64, glp, dtype, factor=GRAD_FACTOR)


def test_varlen_reads_a_slice_of_a_packed_projection_in_place():
    gen = torch.Generator().manual_seed(5)
    lengths = [31, 0, 96, 7]
    q, k, v, cu_q, cu_k = _packed(lengths, lengths, 4, 2, 64, torch.bfloat16, gen,
                                  qkv_slice=True)
    assert not q.is_contiguous()
    dout = torch.randn(q.shape, generator=gen).to(DEV, torch.bfloat16)
    got = _run(q, k, v, cu_q, cu_k, dout, causal=True)
    want = _run(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, dout, causal=True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (got[0], got[1], *got[2]),
                          (want[0], want[1], *want[2])):
        assert not bit_difference(name, a, b), bit_difference(name, a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_varlen_poisoned_rows_stay_in_their_sequence(dtype):
    """NaN/inf in one sequence's q, k, v and dout rows, and in the keys of a sequence that
    has no queries, leave every other row's out, lse and gradients bit for bit the same; the
    key rows no query reads get dk = dv = 0. A max_seqlen bound above the longest sequence
    (a CUDA graph's capture bound) changes nothing."""
    gen = torch.Generator().manual_seed(11)
    lq, lk = [40, 0, 70, 1, 33], [50, 23, 70, 0, 64]
    q, k, v, cu_q, cu_k = _packed(lq, lk, 2, 1, 64, dtype, gen)
    dout = torch.randn(q.shape, generator=gen).to(DEV, dtype)
    clean = _run(q, k, v, cu_q, cu_k, dout, causal=True)
    bounded = _run(q, k, v, cu_q, cu_k, dout, max(lq) + 45, max(lk) + 3, causal=True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (clean[0], clean[1], *clean[2]),
                          (bounded[0], bounded[1], *bounded[2])):
        assert not bit_difference(name, a, b), f"larger max_seqlen: {bit_difference(name, a, b)}"
    # sequence 2 (rows 40:110 of q, 73:143 of k) and sequence 1's keys (rows 50:73, no queries)
    q_rows, k_rows, idle = slice(40, 110), slice(73, 143), slice(50, 73)
    assert (clean[2][1][idle] == 0).all() and (clean[2][2][idle] == 0).all()
    keep_q = torch.ones(q.shape[0], dtype=torch.bool, device=DEV)
    keep_q[q_rows] = False
    keep_k = torch.ones(k.shape[0], dtype=torch.bool, device=DEV)
    keep_k[k_rows] = False
    for value in (float("nan"), float("inf"), float("-inf")):
        qp, kp, vp, dp = (t.clone() for t in (q, k, v, dout))
        qp[q_rows], kp[k_rows], vp[k_rows], dp[q_rows] = value, value, value, value
        kp[idle], vp[idle] = value, value
        got = _run(qp, kp, vp, cu_q, cu_k, dp, causal=True)
        pairs = [("out", got[0][keep_q], clean[0][keep_q]),
                 ("lse", got[1][:, keep_q], clean[1][:, keep_q]),
                 ("dq", got[2][0][keep_q], clean[2][0][keep_q]),
                 ("dk", got[2][1][keep_k], clean[2][1][keep_k]),
                 ("dv", got[2][2][keep_k], clean[2][2][keep_k])]
        bad = [d for n, a, b in pairs for d in [bit_difference(n, a, b)] if d]
        assert not bad, f"poisoned with {value}: " + "; ".join(bad)


DROPOUT_CASES = [
    # (dtype, B, Hq, Hkv, Sq, Sk, D, options)
    (torch.bfloat16, 2, 4, 2, 130, 97, 64, dict(causal=True)),
    (torch.float16, 1, 2, 1, 70, 150, 128, dict(window=(30, 4), softcap=15.0)),
    (torch.bfloat16, 1, 2, 2, 64, 64, 256, dict()),
    (torch.float16, 2, 2, 1, 9, 300, 32, dict()),  # a decoding shape: the forward kernel
    (torch.float32, 2, 2, 1, 50, 37, 40, dict(causal=True)),
    (torch.float32, 1, 3, 3, 33, 80, 128, dict(softcap=10.0)),
]


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: f"{str(c[0])[6:]}-D{c[6]}")
def test_dropout_matches_reference_with_the_mask(case, p):
    dtype, B, Hq, Hkv, Sq, Sk, D, opts = case
    seed = 1000 * Sq + D
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=gen).to(DEV, dtype).requires_grad_(True)
    k, v = (torch.randn(B, Hkv, Sk, D, generator=gen).to(DEV, dtype).requires_grad_(True)
            for _ in range(2))
    out, lse = attnkit.attention(q, k, v, **opts, dropout_p=p, return_lse=True,
                                 generator=_gen(seed),
                                 backend="cupy")
    drop = Dropout(p, draw_state(q.device, _gen(seed)))
    dout = torch.randn(out.shape, generator=gen).to(DEV, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def ref(rdtype):
        qq, kk, vv = (t.detach().to(rdtype).requires_grad_(True) for t in (q, k, v))
        o, m = reference.safe(qq, kk, vv, **opts, dropout=drop)
        return o, m, torch.autograd.grad(o, (qq, kk, vv), dout.to(rdtype))

    r64, rlp = ref(torch.float64), ref(dtype)
    assert_close("out", out, r64[0], rlp[0], dtype, factor=OUT_FACTOR)
    assert_close("lse (dropout leaves it alone)", lse.detach(), r64[1], rlp[1], dtype,
                 factor=OUT_FACTOR)
    for name, g, g64, glp in zip("qkv", grads, r64[2], rlp[2]):
        assert_close(f"d{name}", g, g64, glp, dtype, factor=GRAD_FACTOR)
    # The mask is the definition's: another call with the same generator state is the same
    # bits, and without dropout the output differs.
    again = attnkit.attention(q, k, v, **opts, dropout_p=p, generator=_gen(seed),
                              backend="cupy")
    assert not bit_difference("out", again, out)
    plain = attnkit.attention(q, k, v, **opts, backend="cupy")
    assert not torch.equal(plain, out)


def test_dropout_mask_read_back_is_the_definition():
    """q = 0 makes P uniform over the keys and v = I puts key j's kept probability in column
    j: the output is the keep mask, compared bit for bit with attnkit.dropout's."""
    from attnkit.testing import dropout_keep_mask

    for dtype in (torch.bfloat16, torch.float32):
        B, H, Sq, S = 2, 3, 70, 64
        q = torch.zeros(B, H, Sq, S, dtype=dtype, device=DEV)
        eye = torch.eye(S, dtype=dtype, device=DEV).expand(B, H, S, S)
        out = attnkit.attention(q, eye, eye, dropout_p=0.3, generator=_gen(7), backend="cupy")
        want = dropout_keep_mask(draw_state(torch.device(DEV),
                                            _gen(7)),
                                 0.3, B, H, Sq, S)
        bad = ((out > 0.5 / S) != want).sum().item()
        assert bad == 0, f"{dtype}: {bad} keep decisions differ from attnkit.dropout's mask"


# -- dropout on packed sequences ----------------------------------------------------------------

def _varlen_dropout(q, k, v, cu_q, cu_k, dout, drop, max_q=None, max_k=None, **opts):
    """The backend's packed forward and backward with ``drop`` (an `attnkit.dropout.Dropout`),
    called as the core calls a backend declaring varlen and dropout."""
    from attnkit.varlen import varlen_problem

    backend = registry.get("cupy")
    problem = varlen_problem(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True,
                             needs_grad=True, **opts)._replace(dropout_p=drop.p)
    assert not backend.not_supported_reasons(problem)
    out, lse = backend.forward_varlen(problem, q, k, v, cu_q, cu_k, dropout=drop)
    grads = backend.backward_varlen(problem, q, k, v, out, lse, dout, cu_q, cu_k, dropout=drop)
    return out, lse, grads


VARLEN_DROPOUT_CASES = [
    # (dtype, lengths_q, lengths_k, Hq, Hkv, D, options)
    (torch.bfloat16, [0, 1, 77, 130, 64], [5, 1, 77, 200, 64], 4, 2, 64, dict(causal=True)),
    (torch.float16, [33, 129, 1], [40, 100, 1], 2, 1, 128, dict(window=(20, 5), softcap=20.0)),
    (torch.bfloat16, [17, 250], [300, 10], 2, 1, 256, dict()),
    (torch.float32, [37, 1, 50], [37, 0, 64], 2, 1, 40, dict(causal=True)),
    (torch.float32, [90, 5], [70, 5], 3, 1, 128, dict(window=(8, 8))),
]


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("case", VARLEN_DROPOUT_CASES,
                         ids=lambda c: f"{str(c[0])[6:]}-D{c[5]}-{len(c[1])}docs")
def test_varlen_dropout_matches_per_document_reference(case, p):
    dtype, lq, lk, Hq, Hkv, D, opts = case
    gen = torch.Generator().manual_seed(sum(lq) + D + int(100 * p))
    q, k, v, cu_q, cu_k = _packed(lq, lk, Hq, Hkv, D, dtype, gen)
    dout = torch.randn(q.shape, generator=gen).to(DEV, dtype)
    drop = Dropout(p, draw_state(torch.device(DEV), _gen(int(1000 * p) + D)))
    out, lse, grads = _varlen_dropout(q, k, v, cu_q, cu_k, dout, drop, **opts)
    ref64 = _per_sequence_reference(q, k, v, cu_q, cu_k, dout, torch.float64, drop, **opts)
    reflp = _per_sequence_reference(q, k, v, cu_q, cu_k, dout, dtype, drop, **opts)
    assert_close("out", out, ref64[0], reflp[0], dtype, factor=OUT_FACTOR)
    assert_close("lse (dropout leaves it alone)", lse, ref64[1], reflp[1], dtype,
                 factor=OUT_FACTOR)
    for name, g, g64, glp in zip("qkv", grads, ref64[2], reflp[2]):
        assert_close(f"d{name}", g, g64, glp, dtype, factor=GRAD_FACTOR)
    again = _varlen_dropout(q, k, v, cu_q, cu_k, dout, drop, **opts)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (again[0], *again[2])):
        assert not bit_difference(name, a, b), f"not repeatable: {bit_difference(name, a, b)}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_varlen_dropout_of_equal_documents_is_the_dense_batchs(dtype):
    """B documents of one length packed give the dense batch's result with the same state:
    document d takes batch d's mask (a packed call counting rows from the start of the
    packed tensor, or one batch index for all, would drop other elements)."""
    B, H, S, D = 3, 2, 70, 64
    gen = torch.Generator().manual_seed(4)
    q, k, v, dout = (torch.randn(B, H, S, D, generator=gen).to(DEV, dtype) for _ in range(4))
    drop = Dropout(0.3, draw_state(torch.device(DEV), _gen(9)))
    backend = registry.get("cupy")
    problem = attnkit.AttentionProblem.from_tensors(q, k, v, causal=True, return_lse=True)
    problem = problem._replace(dropout_p=drop.p, needs_grad=True)
    out, lse = backend.forward(problem, q, k, v, None, dropout=drop)
    dense_grads = backend.backward(problem, q, k, v, out, lse, dout, None, dropout=drop)

    def packed(t):
        return t.transpose(1, 2).reshape(B * S, H, D)

    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=DEV)
    pout, _, pgrads = _varlen_dropout(packed(q), packed(k), packed(v), cu, cu, packed(dout),
                                      drop, causal=True)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (pout, *pgrads), (out, *dense_grads)):
        torch.testing.assert_close(a, packed(b), **tol, msg=lambda m, n=name: f"{n}: {m}")
    plain = _varlen_dropout(packed(q), packed(k), packed(v), cu, cu, packed(dout),
                            Dropout(0.3, drop.state + 1), causal=True)[0]
    assert not torch.equal(plain, pout), "another state must drop other elements"


def test_varlen_dropout_mask_read_back_is_the_definition():
    """q = 0 makes P uniform over a document's keys and v = I puts key j's kept probability in
    column j: each document's output is its rows and columns of the dense batch's mask."""
    from attnkit.testing import dropout_keep_mask

    lq, lk, H, D = [40, 0, 64, 9], [64, 7, 33, 1], 3, 64
    p = 0.3
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.zeros(sum(lq), H, D, dtype=dtype, device=DEV)
        k = torch.zeros(sum(lk), H, D, dtype=dtype, device=DEV)
        v = torch.cat([torch.eye(n, D, dtype=dtype, device=DEV) for n in lk])[:, None]
        v = v.expand(sum(lk), H, D).contiguous()
        cu_q, cu_k = (torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32,
                                   device=DEV) for x in (lq, lk))
        drop = Dropout(p, draw_state(torch.device(DEV), _gen(21)))
        out = _varlen_dropout(q, k, v, cu_q, cu_k, torch.zeros_like(q), drop)[0]
        want = dropout_keep_mask(drop.state, p, len(lq), H, max(lq), max(lk))
        cq = [0, *torch.tensor(lq).cumsum(0).tolist()]
        for d, (nq, nk) in enumerate(zip(lq, lk)):
            if nq == 0:
                continue
            got = out[cq[d]:cq[d] + nq, :, :nk].transpose(0, 1) > 0.5 / nk
            bad = (got != want[d, :, :nq, :nk]).sum().item()
            assert bad == 0, f"{dtype}, document {d}: {bad} keep decisions differ"
