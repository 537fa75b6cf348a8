"""Dropout on packed batches through attention_varlen: the mask is the dense batch of the
documents' (the numbers on each backend are the conformance suite's, suite_varlen_dropout)."""


import pytest
import torch
from dropout_checks import assert_checkpoint_regenerates, reference_without_dropout

import attnkit
from attnkit.registry import NoBackendError, registry

LENS_Q, LENS_K = (5, 0, 7, 3, 7), (6, 4, 9, 0, 9)


def _offsets(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _packed(lens_q=LENS_Q, lens_k=LENS_K, hq=4, hkv=2, d=8, grad=False):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens_q), hq, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(sum(lens_k), hkv, d, generator=gen, dtype=torch.float64)
            for _ in range(2))
    return (*(t.requires_grad_(grad) for t in (q, k, v)), _offsets(lens_q), _offsets(lens_k))


def _padded(t, lens):
    """A packed (total, H, D) tensor as a dense (B, H, max, D) batch, zero padded."""
    out = t.new_zeros(len(lens), t.shape[1], max(lens), t.shape[2])
    for b, (r0, n) in enumerate(zip(_offsets(lens).tolist(), lens)):
        out[b, :, :n] = t[r0:r0 + n].transpose(0, 1)
    return out


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_packed_call_draws_the_padded_dense_calls_bits():
    """Without causal alignment, the padded dense call (keys past each length hidden by
    seqlens_k, query rows past it dropped) computes the same rows with the same mask."""
    q, k, v, cu_q, cu_k = _packed()
    out = attnkit.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=0.4, generator=_gen(5),
                                   backend="reference")
    dense = attnkit.attention(_padded(q, LENS_Q), _padded(k, LENS_K), _padded(v, LENS_K),
                              seqlens_k=torch.tensor(LENS_K, dtype=torch.int32),
                              dropout_p=0.4, generator=_gen(5), backend="reference")
    for b, (r0, n) in enumerate(zip(cu_q.tolist(), LENS_Q)):
        torch.testing.assert_close(out[r0:r0 + n], dense[b, :, :n].transpose(0, 1),
                                   rtol=0, atol=1e-14)
    plain = attnkit.attention_varlen(q, k, v, cu_q, cu_k, backend="reference")
    assert not torch.allclose(out, plain), "dropout_p=0.4 dropped nothing"


@pytest.mark.parametrize("backend", [
    "reference",
    pytest.param("torch-blocked", marks=pytest.mark.skipif(
        "torch-blocked" not in registry.registrations(),
        reason="the torch-blocked plugin is not installed (the core's session)")),
])
def test_seed_reproduces_calls_differ_and_backward_regenerates(backend):
    q, k, v, cu_q, cu_k = _packed(grad=True)

    def f(q, k, v):
        return attnkit.attention_varlen(q, k, v, cu_q, cu_k, causal=True, dropout_p=0.3,
                                        backend=backend)

    torch.manual_seed(2)
    a = f(q, k, v)
    b = f(q, k, v)
    assert not torch.equal(a, b), "consecutive calls drew the same mask"
    assert_checkpoint_regenerates(f, q, k, v)
    torch.manual_seed(2)
    assert torch.equal(f(q, k, v), a)


def test_compiled_matches_eager():
    q, k, v, cu_q, cu_k = _packed(grad=True)

    def f(q, k, v):
        return attnkit.attention_varlen(q, k, v, cu_q, cu_k, 9, 9, dropout_p=0.3,
                                        backend="reference")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        torch.manual_seed(4)
        out = fn(q, k, v)
        results.append((out, torch.autograd.grad(out.square().sum(), (q, k, v))))
    (eager, eager_grads), (comp, comp_grads) = results
    assert torch.equal(comp, eager)
    for x, y in zip(comp_grads, eager_grads):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def test_compiled_refuses_a_generator():
    q, k, v, cu_q, cu_k = _packed()
    gen = _gen(1)
    f = torch.compile(lambda q, k, v: attnkit.attention_varlen(
        q, k, v, cu_q, cu_k, 9, 9, dropout_p=0.3, generator=gen, backend="reference"),
        fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="generator under torch.compile"):
        f(q, k, v)


def test_nested_jagged_inputs_take_dropout():
    q, k, v, cu_q, cu_k = _packed()
    want = attnkit.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=0.3, generator=_gen(3),
                                    backend="reference")

    def nested(t, cu):
        return torch.nested.nested_tensor_from_jagged(t, offsets=cu.long()).transpose(1, 2)

    got = attnkit.attention(nested(q, cu_q), nested(k, cu_k), nested(v, cu_k), dropout_p=0.3,
                            generator=_gen(3), backend="reference")
    assert torch.equal(got.transpose(1, 2).values(), want)


@pytest.mark.parametrize("p,err", [(1.0, ValueError), (-0.1, ValueError), ("0.1", TypeError)])
def test_bad_dropout_p(p, err):
    q, k, v, cu_q, cu_k = _packed()
    with pytest.raises(err, match="dropout_p"):
        attnkit.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=p, backend="reference")


def test_bad_generator():
    q, k, v, cu_q, cu_k = _packed()
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        attnkit.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=0.1, generator=3,
                                 backend="reference")


def test_p_zero_and_an_empty_packing_draw_nothing():
    q, k, v, cu_q, cu_k = _packed()
    gen = _gen(9)
    attnkit.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=0.0, generator=gen,
                             backend="reference")
    e = _packed(lens_q=(0, 0), lens_k=(3, 1))
    out = attnkit.attention_varlen(*e, dropout_p=0.5, generator=gen, backend="reference")
    assert out.shape == (0, 4, 8)
    assert torch.equal(gen.get_state(), _gen(9).get_state())


def test_varlen_backend_without_dropout_refuses_saying_why():
    with reference_without_dropout("varlen-no-dropout"):
        q, k, v, cu_q, cu_k = _packed()
        with pytest.raises(NoBackendError,
                           match="varlen-no-dropout.*dropout_p > 0 not supported"):
            attnkit.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=0.1,
                                     backend="varlen-no-dropout")
        # Without dropout it runs.
        attnkit.attention_varlen(q, k, v, cu_q, cu_k, backend="varlen-no-dropout")
