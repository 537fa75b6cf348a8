"""The public API: autograd, torch.compile, explain(), determinism rules."""

import math

import numpy as np
import pytest
import torch

import attnkit
from attnkit import reference
from attnkit.backend import BackendContractError
from attnkit.registry import NoBackendError, registry
from attnkit.spec import AttentionProblem


def _qkv(B=2, Hq=4, Hkv=2, Sq=9, Sk=13, D=16, dtype=torch.float64):
    mk = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    return mk(B, Hq, Sq, D), mk(B, Hkv, Sk, D), mk(B, Hkv, Sk, D)


def test_attention_autograd_matches_reference():
    q, k, v = _qkv()
    seqlens = torch.tensor([13, 4])
    kw = dict(causal=True, window=(5, -1), seqlens_k=seqlens, softcap=3.0)
    out, lse = attnkit.attention(q, k, v, return_lse=True, backend="reference", **kw)
    assert lse.requires_grad  # differentiable: merge_attention and losses on lse need it
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


# -- the backend boundary -------------------------------------------------------------------

@pytest.fixture
def runtime_backend():
    """Register backends for one test; unregistered after it."""
    names = []

    def add(backend, priority=None):
        registry.register(backend, priority=priority)
        names.append(backend.name)
        return backend

    yield add
    for name in names:
        registry.unregister(name)


def _wrong(name, forward=None, backward=None):
    from plugins_for_tests.good import Good

    methods = {"name": name}
    if forward:
        methods["forward"] = forward
    if backward:
        methods["backward"] = backward
    return type(name.title().replace("-", ""), (Good,), methods)()


@pytest.mark.parametrize("fault, message", [
    (lambda o, l: (o.double(), l), "out has dtype torch.float64, expected q's dtype"),
    (lambda o, l: (o[:, :, :-1], l), r"out has shape \(2, 4, 8, 16\), expected \(2, 4, 9, 16\)"),
    (lambda o, l: (o, l.double()), "lse has dtype torch.float64, expected float32"),
    (lambda o, l: (o, l[..., None]), r"lse has shape \(2, 4, 9, 1\), expected \(2, 4, 9\)"),
    (lambda o, l: (o, l.to("meta")), "lse is on meta, expected cpu"),
    (lambda o, l: o, r"forward returned Tensor; the contract is a pair \(out, lse\)"),
])
@pytest.mark.parametrize("grad", [False, True])
def test_forward_outputs_are_checked(runtime_backend, fault, message, grad):
    from plugins_for_tests.good import Good

    def forward(self, problem, q, k, v, seqlens_k):
        return fault(*Good.forward(self, problem, q, k, v, seqlens_k))

    runtime_backend(_wrong("wrong-forward", forward=forward))
    q, k, v = (t.detach().float().requires_grad_(grad) for t in _qkv())
    with pytest.raises(BackendContractError, match=f"backend 'wrong-forward' forward broke the "
                                                   f"contract: {message}|{message}"):
        attnkit.attention(q, k, v, backend="wrong-forward")


@pytest.mark.parametrize("fault, message", [
    (lambda dq, dk, dv: (dq, dk.double(), dv), "dk has dtype torch.float64, expected k's"),
    (lambda dq, dk, dv: (dq, dk, dv.repeat(1, 2, 1, 1)),
     r"dv has shape \(2, 4, 13, 16\), expected \(2, 2, 13, 16\)"),
    (lambda dq, dk, dv: (dq, dk), r"backward returned tuple; the contract is a triple"),
])
def test_backward_outputs_are_checked(runtime_backend, fault, message):
    from plugins_for_tests.good import Good

    def backward(self, *args, **kwargs):
        return fault(*Good.backward(self, *args, **kwargs))

    runtime_backend(_wrong("wrong-backward", backward=backward))
    q, k, v = (t.detach().float().requires_grad_() for t in _qkv())
    out = attnkit.attention(q, k, v, backend="wrong-backward")
    with pytest.raises(BackendContractError, match=f"backend 'wrong-backward' .*{message}"):
        out.sum().backward()


# -- gradients through lse ------------------------------------------------------------------

@pytest.fixture
def lse_grad_backend(runtime_backend):
    from plugins_for_tests.lse_grad import LseGradReference

    return runtime_backend(LseGradReference())


@pytest.mark.parametrize("compiled", [False, True])
def test_lse_gradient_reaches_q_and_k(lse_grad_backend, compiled):
    """A loss on out and lse: dlse goes to a backend declaring lse_grad, as a keyword, in
    lse's dtype and contiguous; the gradients match autograd through the naive formula."""
    torch._dynamo.reset()
    q, k, v = _qkv()
    seqlens = torch.tensor([13, 4])
    kw = dict(causal=True, window=(5, -1), seqlens_k=seqlens, softcap=3.0)

    def f(q, k, v):
        out, lse = attnkit.attention(q, k, v, return_lse=True, backend=lse_grad_backend.name,
                                     **kw)
        return (out ** 2).sum() + (lse.clamp(min=-1e4) ** 2).sum()

    if compiled:
        f = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(f(q, k, v), (q, k, v))
    ref_out, ref_lse = reference.naive(q, k, v, **kw)
    want = torch.autograd.grad((ref_out ** 2).sum()
                               + (ref_lse.clamp(min=-1e4) ** 2).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    (dlse,) = lse_grad_backend.dlse_seen
    assert dlse.dtype == torch.float64 and dlse.shape == (2, 4, 9) and dlse.is_contiguous()


def test_only_lse_in_the_loss(lse_grad_backend):
    q, k, v = _qkv()
    _, lse = attnkit.attention(q, k, v, return_lse=True, backend=lse_grad_backend.name)
    got = torch.autograd.grad(lse.sum(), (q, k, v), allow_unused=True)
    want = torch.autograd.grad(reference.naive(q, k, v)[1].sum(), (q, k, v), allow_unused=True)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert not got[2].abs().max() > 1e-12  # v does not enter lse


def test_dlse_only_for_backends_that_declare_it(runtime_backend):
    """A backend without lse_grad never sees the keyword: an unused or zero lse gradient is
    dropped, a nonzero one raises naming the backend."""
    from plugins_for_tests.good import Good

    calls = []

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k):  # no dlse parameter
        calls.append(problem)
        return Good.backward(self, problem, q, k, v, out, lse, dout, seqlens_k)

    runtime_backend(_wrong("no-lse-grad", backward=backward))
    q, k, v = _qkv(dtype=torch.float32)
    out, lse = attnkit.attention(q, k, v, return_lse=True, backend="no-lse-grad")
    torch.autograd.grad(out.sum(), q, retain_graph=True)
    torch.autograd.grad(out.sum() + (lse * 0).sum(), q, retain_graph=True)
    assert len(calls) == 2
    for loss in (lse.sum(), out.sum() + lse[0, 0, 0]):
        with pytest.raises(RuntimeError, match=r"backend 'no-lse-grad' cannot differentiate "
                                               r"through lse .*lse_grad"):
            torch.autograd.grad(loss, q, retain_graph=True)
    assert len(calls) == 2


# -- NaN query rows -------------------------------------------------------------------------

@pytest.mark.parametrize("grad", [False, True])
def test_nan_query_row_stays_nan(grad):
    q, k, v = (t.detach() for t in _qkv())
    q[1, 2, 3, 0] = float("nan")
    q.requires_grad_(grad)
    out, lse = attnkit.attention(q, k, v, return_lse=True, backend="reference")
    assert out[1, 2, 3].isnan().all() and lse[1, 2, 3].isnan()
    rows = torch.ones(lse.shape, dtype=torch.bool)
    rows[1, 2, 3] = False
    assert not out[rows].isnan().any() and not lse[rows].isnan().any()


# -- torch.vmap -----------------------------------------------------------------------------

def _cpu_backends():
    ok = []
    for name, reg in registry.registrations().items():
        probe = AttentionProblem(1, 1, 1, 1, 1, 16, torch.float64, torch.device("cpu"),
                                 needs_grad=True)
        if reg.availability[0] and not reg.backend.not_supported_reasons(probe):
            ok.append(name)
    return ok


@pytest.mark.parametrize("backend", _cpu_backends())
def test_vmap_folds_the_mapped_dimension_into_the_batch(backend):
    """vmap over q and v (k shared, seqlens_k mapped), gradients of the outer tensors, and
    per-sample gradients (vmap of grad): each equal to a loop of calls."""
    torch.manual_seed(0)
    n = 3
    q = torch.randn(n, 2, 4, 5, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 7, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n, 2, 2, 7, 16, dtype=torch.float64, requires_grad=True)
    seqlens = torch.tensor([[7, 3], [2, 0], [5, 7]], dtype=torch.int32)

    def f(q, v, s):
        return attnkit.attention(q, k, v, causal=True, seqlens_k=s, return_lse=True,
                                 backend=backend)

    out, lse = torch.vmap(f)(q, v, seqlens)
    loop = [f(q[i], v[i], seqlens[i]) for i in range(n)]
    torch.testing.assert_close(out, torch.stack([o for o, _ in loop]))
    torch.testing.assert_close(lse, torch.stack([s for _, s in loop]))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(torch.stack([o for o, _ in loop]), (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)

    def loss(q, v):
        return (attnkit.attention(q, k.detach(), v, causal=True, backend=backend) ** 2).sum()

    per_sample = torch.vmap(torch.func.grad(loss, argnums=(0, 1)))(q.detach(), v.detach())
    for i in range(n):
        want = torch.autograd.grad(loss(q[i], v[i]), (q, v))
        torch.testing.assert_close(per_sample[0][i], want[0][i])
        torch.testing.assert_close(per_sample[1][i], want[1][i])
    # a mapped dimension elsewhere than first, and an output placed elsewhere
    moved = torch.vmap(lambda q: attnkit.attention(q, k, v[0], backend=backend), in_dims=2,
                       out_dims=1)(q.detach().movedim(0, 2))
    torch.testing.assert_close(moved.movedim(1, 0), torch.stack(
        [attnkit.attention(q[i], k, v[0], backend=backend) for i in range(n)]))


def test_func_transforms_are_differentiable_once():
    q, k, v = (t.detach() for t in _qkv())

    def loss(q):
        return (attnkit.attention(q, k, v, backend="reference") ** 2).sum()

    torch.testing.assert_close(torch.func.grad(loss)(q),
                               torch.autograd.grad(loss(q.requires_grad_()), q)[0])
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.func.grad(lambda q: torch.func.grad(loss)(q).sum())(q.detach())
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(loss, (q.detach(),), (q.detach(),))


def test_vmap_validates_each_sample():
    q, k, v = (t.detach() for t in _qkv())
    with pytest.raises(ValueError, match=r"head dim mismatch: q \(shape \(2, 4, 9, 16\)"):
        torch.vmap(lambda q: attnkit.attention(q, k[..., :8], v[..., :8]))(q[None])


# -- numpy scalars --------------------------------------------------------------------------

def test_numpy_scalars_are_numbers():
    q, k, v = (t.detach() for t in _qkv())
    kw = dict(scale=np.float32(0.1), softcap=np.float64(2.5),
              window=(np.int64(4), np.int32(1)), backend="reference")
    want = attnkit.attention(q, k, v, scale=float(np.float32(0.1)), softcap=2.5, window=(4, 1),
                             backend="reference")
    torch.testing.assert_close(attnkit.attention(q, k, v, **kw), want, rtol=0, atol=0)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attnkit.attention(q, k, v, **kw),
                             backend="aot_eager")  # a graph break there: runs eagerly
    torch.testing.assert_close(compiled(q, k, v), want, rtol=0, atol=0)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attnkit.attention(q, k, v, **kw), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(Exception, match=r"scale is a numpy value inside torch.compile.*"
                                        r"scale=float\(x\)"):
        compiled(q, k, v)
    with pytest.raises(TypeError, match="window left must be an int"):
        attnkit.attention(q, k, v, window=(np.bool_(True), 0))
    with pytest.raises(TypeError, match="window right must be an int"):
        attnkit.attention(q, k, v, window=(1, np.float32(2)))


# -- KV caches that an append would corrupt -------------------------------------------------

SHAPE = (2, 2, 8, 16)  # (B, Hkv, S_max, D)


def _decode_step(k_cache, v_cache, append=True):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 16)
    new = (torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)) if append else (None, None)
    return attnkit.attention_with_kvcache(q, k_cache, v_cache, torch.tensor([3, 1]), *new,
                                          backend="reference")


def _shifted():
    n = math.prod(SHAPE)
    buf = torch.zeros(n + 16)
    return buf[:n].view(SHAPE), buf[16:].view(SHAPE)


@pytest.mark.parametrize("caches, message", [
    (lambda: (torch.zeros(SHAPE),) * 2, r"k_cache and v_cache are the same tensor"),
    (_shifted, r"k_cache \(shape \(2, 2, 8, 16\).* overlap in memory"),
    (lambda: (torch.zeros(2, 1, 8, 16).expand(SHAPE), torch.zeros(SHAPE)),
     r"k_cache \(shape \(2, 2, 8, 16\).* has stride 0 in dimension 1"),
    (lambda: (torch.zeros(SHAPE), torch.zeros(2, 2, 1, 16).expand(SHAPE)),
     r"v_cache .* has stride 0 in dimension 2"),
], ids=["same-tensor", "shifted-overlap", "expanded-k", "expanded-v"])
def test_kvcache_refuses_caches_an_append_would_corrupt(caches, message):
    with torch.no_grad():
        _decode_step(torch.zeros(SHAPE), torch.zeros(SHAPE))  # same metadata, validated
        k_cache, v_cache = caches()
        before = (k_cache.clone(), v_cache.clone())
        with pytest.raises(ValueError, match=message):
            _decode_step(k_cache, v_cache)
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
        _decode_step(k_cache, v_cache, append=False)  # reading them is fine


def test_kvcache_interleaved_in_one_buffer_is_fine():
    """k and v as the two halves of a (B, S, 2, Hkv, D) buffer share memory but no element."""
    kv = torch.zeros(2, 8, 2, 2, 16)
    k_cache, v_cache = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    with torch.no_grad():
        got = _decode_step(k_cache, v_cache)
        want = _decode_step(torch.zeros(SHAPE), torch.zeros(SHAPE))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert kv[0, 3, 0].abs().sum() > 0 and kv[0, 3, 1].abs().sum() > 0  # both written


def test_kvcache_takes_numpy_scalars():
    with torch.no_grad():
        q = torch.randn(2, 4, 1, 16)
        k_cache, v_cache = torch.randn(SHAPE), torch.randn(SHAPE)
        lens = torch.tensor([5, 8])
        got = attnkit.attention_with_kvcache(q, k_cache, v_cache, lens, scale=np.float32(0.25),
                                             window=(np.int64(3), np.int64(0)),
                                             backend="reference")
        want = attnkit.attention_with_kvcache(q, k_cache, v_cache, lens, scale=0.25,
                                              window=(3, 0), backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_backends_receive_seqlens_k_int32_and_contiguous(monkeypatch, requires_grad):
    q, k, v = (t.detach().requires_grad_(requires_grad) for t in _qkv(dtype=torch.float32))
    strided = torch.tensor([[13, 0], [4, 0]])[:, 0]  # int64, stride 2
    backend = registry.get("reference")
    seen = []
    for name in ("forward", "backward"):
        real = getattr(backend, name)

        def spy(*args, _real=real, **kwargs):
            lengths = args[4] if len(args) == 5 else args[7]
            seen.append((lengths.dtype, lengths.is_contiguous(), lengths.tolist()))
            return _real(*args, **kwargs)

        monkeypatch.setattr(backend, name, spy)
    out = attnkit.attention(q, k, v, seqlens_k=strided, backend="reference")
    if requires_grad:
        out.sum().backward()
    assert seen and all(s == (torch.int32, True, [13, 4]) for s in seen), seen
