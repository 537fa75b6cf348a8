"""The public API: autograd, torch.compile, explain(), determinism rules."""

import pytest
import torch

import attnkit
from attnkit import reference
from attnkit.registry import NoBackendError, registry


def _qkv(B=2, Hq=4, Hkv=2, Sq=9, Sk=13, D=16, dtype=torch.float64):
    mk = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    return mk(B, Hq, Sq, D), mk(B, Hkv, Sk, D), mk(B, Hkv, Sk, D)


def test_attention_autograd_matches_reference():
    q, k, v = _qkv()
    seqlens = torch.tensor([13, 4])
    kw = dict(causal=True, window=(5, -1), seqlens_k=seqlens, softcap=3.0)
    out, lse = attnkit.attention(q, k, v, return_lse=True, backend="reference", **kw)
    assert not lse.requires_grad
    ref_out, ref_lse = reference.naive(q, k, v, **kw)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref_out, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_backward_sees_only_out_and_lse(monkeypatch):
    q, k, v = _qkv(dtype=torch.float32)
    backend = registry.get("reference")
    seen = {}
    real = backend.backward

    def spy(problem, q, k, v, out, lse, dout, seqlens_k):
        seen["shapes"] = [t.shape for t in (out, lse)]
        return real(problem, q, k, v, out, lse, dout, seqlens_k)

    monkeypatch.setattr(backend, "backward", spy)
    attnkit.attention(q, k, v, backend="reference").sum().backward()
    assert seen["shapes"] == [(2, 4, 9, 16), (2, 4, 9)]


class _NoGrad(torch.autograd.Function):
    """Passes its input on and sends no gradient back (an undefined one)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return None


def test_backward_without_a_gradient_for_out(monkeypatch):
    """No zeros tensor is made for lse's gradient (autograd would fill one per backward), so
    a backward whose out gradient is undefined gets None and gives no gradient, without
    calling the backend."""
    q, k, v = _qkv()
    monkeypatch.setattr(registry.get("reference"), "backward", None)  # must not be called
    out = attnkit.attention(q, k, v, backend="reference")
    (dq,) = torch.autograd.grad(_NoGrad.apply(out).sum() + q.sum(), q)
    assert torch.equal(dq, torch.ones_like(q))


def test_second_derivative_raises_instead_of_being_wrong():
    """A backward made of kernels has no derivative: differentiating the gradients must
    raise (torch-blocked's failed inside its out= matmuls). The reference's backward is torch
    ops but treats lse as a constant, so its second derivative came out wrong (off by 2.5 on
    a 6.3 entry) before this raised. The first derivative, with create_graph=True, is exact."""
    backend = "reference"
    q, k, v = _qkv()
    out = attnkit.attention(q, k, v, causal=True, backend=backend)
    got = torch.autograd.grad((out**2).sum(), (q, k, v), create_graph=True)
    ref = reference.naive(q, k, v, causal=True)[0]
    want = torch.autograd.grad((ref**2).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="attnkit.attention is differentiable once"):
        torch.autograd.grad(got[0].pow(2).sum(), k)
    # dout without a graph of its own (out.sum()): still refused, not "unused in the graph"
    (dq,) = torch.autograd.grad(attnkit.attention(q, k, v, backend=backend).sum(), q,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        dq.sum().backward()


def test_explain_and_backends():
    q, k, v = _qkv(dtype=torch.float32)
    ex = attnkit.explain(q, k, v, causal=True, backend="ignored")
    assert any(v.name == "reference" for v in ex.verdicts)
    assert "reference" in attnkit.backends()


def test_named_backend_that_cannot_run_says_why():
    from plugins_for_tests.good import Good

    registry.register(Good(), priority=None)
    try:
        q, k, v = _qkv(dtype=torch.float64)
        with pytest.raises(NoBackendError) as e:
            attnkit.attention(q, k, v, softcap=2.0, backend="good")
        msg = str(e.value)
        assert "backend 'good' cannot compute q (B=2, Hq=4, Sq=9, D=16)" in msg
        assert "dtype torch.float64 not in supported" in msg and "softcap not supported" in msg
    finally:
        registry.unregister("good")


def test_deterministic_mode_refuses_nondeterministic_backward():
    from plugins_for_tests.good import Good

    class Racy(Good):
        name = "racy"
        capabilities = Good.capabilities.__class__(
            devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}), deterministic=False)

    registry.register(Racy(), priority=None)
    try:
        q, k, v = _qkv(dtype=torch.float32)
        attnkit.attention(q, k, v, backend="racy")  # fine by default
        torch.use_deterministic_algorithms(True)
        with pytest.raises(NoBackendError, match="not deterministic"):
            attnkit.attention(q, k, v, backend="racy")
        with torch.no_grad():  # no backward needed: allowed
            attnkit.attention(q, k, v, backend="racy")
    finally:
        torch.use_deterministic_algorithms(False)
        registry.unregister("racy")


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    torch._dynamo.reset()
    q, k, v = _qkv(dtype=torch.float32)
    seqlens = torch.tensor([13, 7], dtype=torch.int32)

    def f(q, k, v):
        out, lse = attnkit.attention(q, k, v, causal=True, seqlens_k=seqlens, return_lse=True,
                                     backend="reference")
        return (out * 2).sum() + lse.clamp(min=-1e4).sum()

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    loss = compiled(q, k, v)
    torch.testing.assert_close(loss, f(q, k, v))
    got = torch.autograd.grad(loss, (q, k, v))
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("compiled", [False, True])
def test_autocast_casts_inputs_like_sdpa(compiled):
    """Under autocast, mixed fp32/bf16 inputs (an fp32 rotary embedding before a bf16 v) run
    in the autocast dtype, as SDPA does; gradients come back in each input's dtype."""
    torch._dynamo.reset()
    q, k = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    f = lambda q, k, v: attnkit.attention(q, k, v, causal=True, backend="reference")  # noqa: E731
    if compiled:
        f = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = f(q, k, v)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == sdpa.dtype == torch.bfloat16
    # the same numbers as bf16 inputs outside autocast: the backend ran with autocast off
    want = attnkit.attention(q.bfloat16(), k.bfloat16(), v, causal=True, backend="reference")
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    g = torch.randn_like(out)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # backward inside autocast, too
        got = torch.autograd.grad(out, (q, k, v), g)
    assert [t.dtype for t in got] == [torch.float32, torch.float32, torch.bfloat16]
    want = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # float64 is not autocast's to change, here as elsewhere
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attnkit.attention(*(t.detach().double() for t in (q, k, v)), backend="reference")
    assert out.dtype == torch.float64


def test_compile_validates_inputs():
    torch._dynamo.reset()
    q, k, v = _qkv(dtype=torch.float32)
    compiled = torch.compile(lambda q, k, v: attnkit.attention(q, k, v, backend="reference"),
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="head dim mismatch"):
        compiled(q, k[..., :8], v[..., :8])
