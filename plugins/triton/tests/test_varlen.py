"""Packed variable-length batches (`forward_varlen`, `backward_varlen`) through the Triton
interpreter, against dense reference calls on each sequence.

Lengths cross the interpreter's 32-row query and 16-row key tiles and include 0 and 1; the
checks themselves (`varlen_checks`: poisoned unseen keys, rows that see nothing, the
accuracy rule) are shared with the GPU tests, test_varlen_gpu.py.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
from varlen_checks import (  # noqa: E402
    VarlenCase,
    check,
    check_equal_lengths_bitwise,
    make_inputs,
    offsets,
    through_backend,
    through_descriptors,
)

import attnkit  # noqa: E402
from attnkit.spec import AttentionProblem  # noqa: E402

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

CASES = [
    # A zero-length key sequence between two others, a single token, no mask.
    VarlenCase((5, 3, 37, 1), (20, 0, 45, 1), 2, 2, 32, F16, expect_masked_rows=True),
    # Causal per sequence with Sq > Sk (the first rows see nothing), zero-length queries
    # whose keys nobody sees, GQA, bounds above the longest lengths.
    VarlenCase((0, 33, 40, 18, 0), (17, 17, 9, 40, 6), 4, 2, 16, F32, causal=True, slack=5,
               expect_poison=True, expect_masked_rows=True),
    # A window that leaves the first keys unseen, with softcap and an odd head dim.
    VarlenCase((1, 30, 12), (40, 50, 3), 2, 1, 24, BF16, window=(4, 2), softcap=5.0,
               layout="strided", expect_poison=True, expect_masked_rows=True),
    # Self-attention read in place from one packed qkv projection, causal, MQA.
    VarlenCase((1, 40, 0, 23), (1, 40, 0, 23), 4, 1, 16, F16, causal=True, layout="qkv"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_varlen_matches_dense_reference_per_sequence(case):
    check(case, through_backend)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[CASES[1].id, CASES[3].id])
def test_varlen_through_tensor_descriptors(case):
    """Descriptors built per sequence end at its last row: the next sequence's rows load as
    0 (out of bounds), stores stop there, and unseen keys inside a sequence (loaded as memory
    holds them) are selected away as in the dense kernels."""
    check(case, through_descriptors)


def test_equal_lengths_match_the_dense_kernels_bit_for_bit():
    check_equal_lengths_bitwise(2, 37, 2, 1, 16, F16, causal=True)


def _tiny(lens_q, lens_k):
    case = VarlenCase(tuple(lens_q), tuple(lens_k), 2, 1, 16, F32, causal=True)
    gen = torch.Generator().manual_seed(0)
    return case, *make_inputs(case, gen)[:3]


@pytest.mark.parametrize("lens_q, lens_k", [((0, 0), (3, 4)), ((3, 4), (0, 0))],
                         ids=["no-queries", "no-keys"])
def test_empty_totals(lens_q, lens_k):
    """No queries at all (the bounds still say keys exist), or no keys: nothing launches on
    empty tensors; rows that see nothing give 0 / -inf / zero gradients."""
    backend = attnkit.backends()["triton"].backend
    case, q, k, v = _tiny(lens_q, lens_k)
    problem = case.problem()._replace(seqlen_q=4, seqlen_k=4)
    cq, ck = offsets(lens_q), offsets(lens_k)
    out, lse = backend.forward_varlen(problem, q, k, v, cq, ck)
    assert out.shape == q.shape and lse.shape == (2, q.shape[0])
    assert (out == 0).all() and (lse == float("-inf")).all()
    grads = backend.backward_varlen(problem, q, k, v, out, lse, torch.ones_like(out), cq, ck)
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and (g == 0).all()


def test_more_sequences_than_a_grid_axis_takes():
    from attnkit_triton._forward import varlen_grid

    assert varlen_grid(3, 8, 65535) == (3, 8, 65535)
    with pytest.raises(ValueError, match="at most 65535 sequences"):
        varlen_grid(3, 8, 65536)


def test_dense_launches_keep_varlen_off():
    """The varlen kernels' branch is a constexpr: a dense call compiles without it."""
    from attnkit_triton._forward import _flags

    dense = AttentionProblem(1, 2, 2, 8, 8, 16, F32, torch.device("cpu"))
    assert _flags(dense, False, F32, False)["VARLEN"] is False
    assert _flags(dense._replace(varlen=True), False, F32, False)["VARLEN"] is True
    assert attnkit.backends()["triton"].backend.capabilities.varlen


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_varlen_dropout_equal_lengths_match_the_dense_kernels_bit_for_bit():
    """Equal lengths with dropout: the packed call draws sequence b's mask as the dense
    call's batch b (rows and columns from the sequence's start), so the two agree bit for
    bit, gradients too."""
    B, S, Hq, Hkv, D = 2, 37, 2, 1, 16
    case = VarlenCase((S,) * B, (S,) * B, Hq, Hkv, D, F16, causal=True)
    q, k, v = (t.detach().requires_grad_() for t in make_inputs(case, _seeded(1))[:3])
    cu = offsets(case.lens_q)
    out = attnkit.attention_varlen(q, k, v, cu, cu, causal=True, dropout_p=0.3,
                                   generator=_seeded(5), backend="triton")
    dout = torch.randn(out.shape, generator=_seeded(2)).to(F16)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def dense(t):
        return t.detach().view(B, S, t.shape[1], D).transpose(1, 2).requires_grad_()

    qd, kd, vd = dense(q), dense(k), dense(v)
    out_d = attnkit.attention(qd, kd, vd, causal=True, dropout_p=0.3, generator=_seeded(5),
                              backend="triton")
    grads_d = torch.autograd.grad(out_d, (qd, kd, vd), dense(dout))
    for name, got, want in (("out", out, out_d), *zip(("dq", "dk", "dv"), grads, grads_d)):
        assert torch.equal(got.detach(), want.detach().transpose(1, 2).reshape(got.shape)), \
            name


def test_varlen_dropout_through_tensor_descriptors():
    """Descriptors forced, with dropout: the reference's per-sequence mask, forward and
    backward."""
    from dataclasses import replace

    from attnkit_triton._backward import launch_backward_varlen
    from attnkit_triton._configs import backward_configs, forward_config
    from attnkit_triton._forward import launch_forward_varlen

    from attnkit.dropout import Dropout, draw_state

    case = VarlenCase((5, 3, 37, 1), (20, 0, 45, 1), 2, 1, 16, F32, causal=True)
    q, k, v = make_inputs(case, _seeded(3))[:3]
    cq, ck = offsets(case.lens_q), offsets(case.lens_k)
    problem = case.problem()._replace(dropout_p=0.3)
    drop = Dropout(0.3, draw_state(q.device, _seeded(7)))
    args = (problem.head_dim, problem.causal, problem.dtype, q.device, False, True)
    fwd, dkdv, dq = (replace(c, tma=True) for c in (forward_config(*args),
                                                       *backward_configs(*args)))
    out, lse = launch_forward_varlen(problem, q, k, v, cq, ck, fwd, True, drop)
    dout = torch.randn(out.shape, generator=_seeded(4))
    grads = launch_backward_varlen(problem, q, k, v, out, lse, dout, cq, ck, dkdv, dq, True,
                                   None, drop)
    ref = attnkit.backends()["reference"].backend
    ro, rl = ref.forward_varlen(problem, q, k, v, cq, ck, dropout=drop)
    rgrads = ref.backward_varlen(problem, q, k, v, ro, rl, dout, cq, ck, dropout=drop)
    for name, got, want in (("out", out, ro), *zip(("dq", "dk", "dv"), grads, rgrads)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
