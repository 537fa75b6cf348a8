"""The Gluon Hopper kernels: they compile for sm_90 with this Triton (no GPU needed), the
dispatch says why they do not apply, and on an sm_90 GPU they match the tl kernels."""

from pathlib import Path

import pytest
import torch
from attnkit_triton import _configs, _hopper

import attnkit
from attnkit import reference
from attnkit.spec import AttentionProblem

TOOLS = Path(__file__).parents[1] / "tools"


def test_gluon_kernels_compile_for_sm90(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    import compile_gluon

    results = compile_gluon.compile_variants()
    assert len(results) == 24
    assert all(r.ok for r in results), [r for r in results if not r.ok]


def _problem(**kw):
    base = dict(batch=2, heads_q=4, heads_kv=2, seqlen_q=256, seqlen_k=256, head_dim=128,
                dtype=torch.bfloat16, device=torch.device("cpu"), causal=True, scale=0.1)
    base.update(kw)
    return AttentionProblem(**base)


def test_gluon_dispatch_explains_refusals(monkeypatch):
    q = torch.empty(2, 4, 256, 128, dtype=torch.bfloat16)
    kv = torch.empty(2, 2, 256, 128, dtype=torch.bfloat16)
    assert not _hopper.use_gluon(_problem(), q, kv, kv)
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON", "1")
    with pytest.raises(ValueError, match="not on a CUDA device") as e:
        _hopper.use_gluon(_problem(head_dim=96, seqlen_k=300, softcap=5.0), q, kv, kv)
    for words in ("head dim 96", "Sq=256, Sk=300", "softcap"):
        assert words in str(e.value)
    sbhd = torch.empty(256, 2, 4, 128, dtype=torch.bfloat16).permute(1, 2, 0, 3)
    with pytest.raises(ValueError, match=r"dense in \(B, H, S, D\) or \(B, S, H, D\) order"):
        _hopper.use_gluon(_problem(), sbhd, kv, kv)


def test_gluon_backward_dispatch_explains_refusals(monkeypatch):
    q = torch.empty(2, 4, 256, 128, dtype=torch.bfloat16)
    kv = torch.empty(2, 2, 256, 128, dtype=torch.bfloat16)
    assert not _hopper.use_gluon_backward(_problem(), q, kv, kv, q)
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON_BWD", "1")
    with pytest.raises(ValueError, match="use_deterministic_algorithms") as e:
        _hopper.use_gluon_backward(_problem(deterministic=True, dtype=torch.float32,
                                            scale=0.0), q, kv, kv, q)
    assert "dtype torch.float32" in str(e.value)
    assert "softmax scale 0.0" in str(e.value)
    with pytest.raises(ValueError, match="q, k, v, dout must be dense"):
        _hopper.use_gluon_backward(_problem(), q, kv, kv, q.transpose(2, 3))


def test_gluon_backward_refused_without_a_reduce_add(monkeypatch):
    """Where Gluon names no TMA reduce-add and the gate refuses the builder call that stands in
    for it (`_gluon_backward._tma_add` None), the backward says so; the forward still runs."""
    from types import SimpleNamespace

    monkeypatch.setattr(_hopper, "_arch", lambda device: 90)
    monkeypatch.setattr(_hopper, "internals_reason", lambda: "Triton 9.9.0 is not tested")
    problem = _problem(device=torch.device("cuda"))
    reasons = _hopper._problem_reasons.__wrapped__
    for add, refused in ((None, True), (object(), False)):
        monkeypatch.setattr(_hopper, "kernels", lambda add=add: SimpleNamespace(
            bwd=SimpleNamespace(_tma_add=add)))
        assert reasons(problem, False) == ()
        found = reasons(problem, False, backward=True)
        assert bool(found) == refused
        if refused:
            assert "no TMA reduce-add" in found[0] and "9.9.0 is not tested" in found[0]


@pytest.mark.parametrize("gate", ["", "not tested"])
def test_descriptors_copied_only_where_the_gate_allows(monkeypatch, gate):
    """`_Descriptors` builds its first descriptor through the constructor (which checks it) and
    copies the later ones' fields with a new base, unless the gate refuses that read."""
    from dataclasses import dataclass
    from types import SimpleNamespace

    from attnkit_triton import _triton_internals

    built = []

    @dataclass
    class Descriptor:
        base: object
        shape: list
        strides: list
        block_shape: list
        layout: object

        def __post_init__(self):
            built.append(self.base)

    monkeypatch.setattr(_triton_internals, "_REASON", gate)
    monkeypatch.setattr(_hopper, "kernels", lambda: SimpleNamespace(TensorDescriptor=Descriptor))
    make = _hopper._Descriptors(256, 64, [64, 64], "layout")
    descs = [make(base) for base in ("a", "b", "c")]
    assert [d.base for d in descs] == ["a", "b", "c"]
    assert all(d.shape == [256, 64] and d.strides == [64, 1] for d in descs)
    assert built == (["a"] if not gate else ["a", "b", "c"])


@pytest.mark.parametrize("dims,perm", [
    ((2, 3, 8, 4), (0, 1, 2, 3)), ((2, 8, 3, 4), (0, 2, 1, 3)),  # BHSD, BSHD
    ((1, 8, 1, 4), (0, 2, 1, 3)), ((1, 1, 8, 4), (0, 1, 2, 3)),  # size-1 dims
    ((8, 2, 3, 4), (1, 2, 0, 3)), ((2, 3, 4, 8), (0, 1, 3, 2)),  # SBHD, D not innermost
])
def test_tma_views_follow_torch_contiguity(dims, perm):
    """The 2-D TMA view is read from shape and strides alone (cached per layout): it exists
    exactly when torch calls the tensor contiguous in (B, H, S, D) or (B, S, H, D) order, and
    it addresses every element where the tensor holds it."""
    t = torch.arange(torch.Size(dims).numel()).reshape(dims).permute(perm)
    view = _hopper._view_2d(t.shape, t.stride())
    assert (view is not None) == (t.is_contiguous() or t.transpose(1, 2).is_contiguous())
    if view is not None:
        rows, cols, rb, rh, ch = view
        b, h, s, d = torch.meshgrid(*(torch.arange(n) for n in t.shape), indexing="ij")
        assert rows * cols == t.numel()  # t's values are their own storage offsets
        assert torch.equal((b * rb + h * rh + s) * cols + h * ch + d, t)


def test_auto_mode_takes_a_path_only_where_preferred(monkeypatch):
    monkeypatch.delenv("ATTNKIT_X", raising=False)
    assert _configs.path_enabled("ATTNKIT_X", "x", lambda: [], preferred=True)
    assert not _configs.path_enabled("ATTNKIT_X", "x", lambda: [], preferred=False)
    monkeypatch.setenv("ATTNKIT_X", "1")  # forced: wherever it can apply
    assert _configs.path_enabled("ATTNKIT_X", "x", lambda: [], preferred=False)
    monkeypatch.setenv("ATTNKIT_X", "0")
    assert not _configs.path_enabled("ATTNKIT_X", "x", lambda: [], preferred=True)
    for kind in ("forward", "backward"):  # every shape the kernels cover has a threshold
        for D in (64, 128):
            for causal in (False, True):
                assert _hopper._preferred(kind, _problem(head_dim=D, causal=causal,
                                                         seqlen_q=16384, seqlen_k=16384))


sm90 = pytest.mark.sm90  # an sm_90 GPU, the interpreter off (conftest.py)


def gpu_cases(test):
    """fp16/bf16, D 64/128, causal or not, MHA and GQA 2:1 / 4:1, (B, H, S, D) tensors and
    (B, S, H, D) ones seen through ``.transpose(1, 2)``."""
    for mark in (
        pytest.mark.parametrize("B,Hq,Hkv,S,layout", [
            (1, 2, 2, 128, "bhsd"), (2, 4, 1, 384, "bshd"), (1, 6, 2, 1024, "bshd"),
            (2, 2, 2, 256, "bhsd")]),
        pytest.mark.parametrize("causal", [False, True]),
        pytest.mark.parametrize("D", [64, 128]),
        pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16]),
        sm90,
    ):
        test = mark(test)
    return test


def _make(layout, B, S, H, D, dtype):
    if layout == "bshd":
        return torch.randn(B, S, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    return torch.randn(B, H, S, D, device="cuda", dtype=dtype)


@gpu_cases
def test_gluon_forward_matches_tl_forward_on_cuda(monkeypatch, dtype, D, causal, B, Hq, Hkv, S,
                                                  layout):
    torch.manual_seed(S + D)

    q, k, v = (_make(layout, B, S, H, D, dtype) for H in (Hq, Hkv, Hkv))
    ref, ref_lse = reference.safe(q.double(), k.double(), v.double(), causal=causal)
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON", "1")  # an error if the Gluon path cannot apply
    out, lse = attnkit.attention(q, k, v, causal=causal, backend="triton", return_lse=True)
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON", "0")
    out_tl, lse_tl = attnkit.attention(q, k, v, causal=causal, backend="triton",
                                       return_lse=True)
    err, err_tl = ((o.double() - ref).abs().max().item() for o in (out, out_tl))
    assert err <= 1.5 * err_tl + 1e-3, (err, err_tl)
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4
    # the training step: backward from the Gluon forward's out and lse
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON", "1")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    o = attnkit.attention(qg, kg, vg, causal=causal, backend="triton")
    o.backward(torch.ones_like(o))
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON", "0")
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    ot = attnkit.attention(qt, kt, vt, causal=causal, backend="triton")
    ot.backward(torch.ones_like(ot))
    for a, b in ((qg, qt), (kg, kt), (vg, vt)):
        tol = 2e-2 * b.grad.abs().max().item() + 1e-2
        assert (a.grad - b.grad).abs().max().item() <= tol


@sm90
@pytest.mark.parametrize("scale", [0.3, -0.2, 0.0])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_gluon_forward_takes_any_scale_on_cuda(monkeypatch, D, causal, scale):
    """A positive scale is folded into exp2's argument (the row max kept in raw scores);
    zero and negative ones take the kernel's scaled form. Both against float64, within the
    ``tl`` forward's own error."""
    torch.manual_seed(D)
    q, k, v = (_make("bshd", 2, 256, H, D, torch.bfloat16) for H in (4, 2, 2))
    ref, ref_lse = reference.safe(q.double(), k.double(), v.double(), causal=causal,
                                  scale=scale)
    results = []
    for path in ("1", "0"):  # "1": an error if the Gluon path cannot apply
        monkeypatch.setenv("ATTNKIT_TRITON_GLUON", path)
        results.append(attnkit.attention(q, k, v, causal=causal, scale=scale,
                                         backend="triton", return_lse=True))
    (out, lse), (out_tl, _) = results
    err, err_tl = ((o.double() - ref).abs().max().item() for o in (out, out_tl))
    assert err <= 1.5 * err_tl + 1e-3, (err, err_tl)
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4


@gpu_cases
def test_gluon_backward_matches_reference_on_cuda(monkeypatch, dtype, D, causal, B, Hq, Hkv, S,
                                                  layout):
    """Gradients within twice the tl backward's error from a float64 reference, with random
    dout, GQA, both layouts; under deterministic algorithms the tl backward runs instead."""
    torch.manual_seed(S + D + causal)

    q, k, v, dout = (_make(layout, B, S, H, D, dtype) for H in (Hq, Hkv, Hkv, Hq))

    def grads(mode, on=(q, k, v)):
        monkeypatch.setenv("ATTNKIT_TRITON_GLUON_BWD", mode)
        leaves = [t.detach().clone().requires_grad_() for t in on]
        out = attnkit.attention(*leaves, causal=causal, backend="triton")
        return torch.autograd.grad(out, leaves, dout)

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(reference.safe(*leaves, causal=causal)[0], leaves, dout.double())
    for name, g, g_tl, r in zip(("dq", "dk", "dv"), grads("1"), grads("0"), ref):
        assert g.dtype == dtype and g.shape == r.shape, name
        err, err_tl = ((x.double() - r).abs().max().item() for x in (g, g_tl))
        assert err <= 2 * err_tl + 1e-3, (name, err, err_tl)

    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(ValueError, match="use_deterministic_algorithms"):
            grads("1")
        first, second = grads("auto"), grads("auto")
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_dense_rounds_as_torch_on_cuda(dtype):
    """The Gluon backward's dQ cast (`cast_dense`, a direct launch in place of ``.to``)
    rounds as torch does, in any dense layout, at sizes that are not whole blocks."""
    from attnkit_triton._backward import cast_dense

    torch.manual_seed(0)
    x = torch.randn(3, 1000, 5, 64, device="cuda").transpose(1, 2) * 1e3
    y, y2 = torch.empty_like(x, dtype=dtype), torch.empty_like(x[:1], dtype=dtype)
    cast_dense(x, y)
    cast_dense(x[:1], y2)  # a second signature of the same launch site
    assert torch.equal(y, x.to(dtype)) and torch.equal(y2, x[:1].to(dtype))


def test_gluon_backward_keeps_its_launch_sites(monkeypatch):
    """The Gluon backward's first call goes through the keyed prep and cast sites and the
    plan's launch; later calls launch the kept sites and the plan's direct launch on one
    stream with the same arguments, unless out is laid out unlike q (then the keyed path
    again). Bookkeeping only: fakes stand in for the launches (no GPU)."""
    from types import SimpleNamespace

    log = []

    def site(name):
        return SimpleNamespace(compiled=True, run=lambda stream, *a: log.append((name, stream, a)))

    monkeypatch.setattr(_hopper, "launch_prep", lambda q, out, lse, dout, stats, dq_acc: (
        log.append(("prep", None, (out, dout, lse, stats, dq_acc))) or site("prep")))
    monkeypatch.setattr(_hopper, "cast_dense", lambda x, y: (
        log.append(("cast", None, (x, y))) or site("cast")))
    monkeypatch.setattr(_hopper, "fast_launches", lambda: True)
    monkeypatch.setattr(_hopper, "current_stream", lambda index: 7)
    plan = SimpleNamespace(steps=None, launch=lambda t: log.append(("main", None, t)),
                           direct=lambda t, stream: log.append(("main", stream, t)))
    problem = SimpleNamespace(batch=1, heads_q=2, seqlen_q=128)
    q, k, v, dout = (torch.randn(1, 128, 2, 64).transpose(1, 2) for _ in range(4))
    out, lse = torch.empty_like(q), torch.empty(1, 2, 128)
    for call in range(3):
        log.clear()
        dq, dk, dv = _hopper.launch_backward(problem, q, k, v, out, lse, dout, plan)
        assert [(n, s) for n, s, _ in log] == (
            [("prep", None), ("main", None), ("cast", None)] if call == 0
            else [("prep", 7), ("main", 7), ("cast", 7)])
        # The direct prep launch also passes lse as the unread dlse pointer.
        (_, _, (o, d, l_, stats, dq_acc, *unread)), (_, _, main), (_, _, (x, y)) = log
        assert unread == ([] if call == 0 else [lse])
        assert o is out and d is dout and l_ is lse and x is dq_acc and y is dq
        assert main[:4] == (q, k, v, dout) and main[4:] == (dq_acc, stats, dk, dv)
        assert stats.shape == (2, 2, 128) and dq_acc.dtype == torch.float32
        assert dq.stride() == q.stride() and dq_acc.stride() == q.stride()
    log.clear()
    _hopper.launch_backward(problem, q, k, v, out.contiguous(), lse, dout, plan)
    assert [s for _, s, _ in log] == [None, None, None]  # out not laid out as q: keyed path
