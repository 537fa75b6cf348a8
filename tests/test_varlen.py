"""attention_varlen's checks of its inputs, its empty cases, max_seqlen bounds, selection and
nested jagged inputs (the numbers themselves are the conformance suite's, suite_varlen)."""

import pytest
import torch

import attnkit
from attnkit.backend import BackendContractError, Capabilities
from attnkit.reference_backend import ReferenceBackend
from attnkit.registry import NoBackendError, registry


def _offsets(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(lens_q=(3, 0, 4), lens_k=(2, 5, 1), hq=2, hkv=1, d=8, dtype=torch.float32):
    q = torch.randn(sum(lens_q), hq, d, dtype=dtype)
    k = torch.randn(sum(lens_k), hkv, d, dtype=dtype)
    v = torch.randn(sum(lens_k), hkv, d, dtype=dtype)
    return q, k, v, _offsets(lens_q), _offsets(lens_k)


@pytest.fixture
def no_kernel(monkeypatch):
    """The reference's varlen entry points raise: a check that passes them ran too late."""
    def boom(*args, **kwargs):
        raise AssertionError("a backend ran before the inputs were checked")

    monkeypatch.setattr(ReferenceBackend, "forward_varlen", boom)
    monkeypatch.setattr(ReferenceBackend, "backward_varlen", boom)


def _call(q, k, v, cu_q, cu_k, *args, **kwargs):
    return attnkit.attention_varlen(q, k, v, cu_q, cu_k, *args, backend="reference", **kwargs)


@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k"])
def test_offsets_must_be_int32(no_kernel, name):
    q, k, v, cu_q, cu_k = _inputs()
    bad = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    bad[name] = bad[name].long()
    with pytest.raises(TypeError, match=rf"{name} \(shape \(4,\), dtype torch.int64.*must have "
                                        r"dtype torch.int32"):
        _call(q, k, v, bad["cu_seqlens_q"], bad["cu_seqlens_k"])


def test_offsets_must_be_on_qs_device(no_kernel):
    q, k, v, cu_q, cu_k = _inputs()
    with pytest.raises(ValueError, match=r"cu_seqlens_k .*device meta.* must be on q's device"):
        _call(q, k, v, cu_q, cu_k.to("meta"))


def test_offsets_must_be_a_vector(no_kernel):
    q, k, v, cu_q, cu_k = _inputs()
    with pytest.raises(ValueError, match=r"cu_seqlens_q .* must have shape \(B \+ 1,\)"):
        _call(q, k, v, cu_q[:0], cu_k)
    with pytest.raises(TypeError, match="cu_seqlens_q must be an int32 tensor"):
        _call(q, k, v, [0, 3, 3, 7], cu_k)


def test_offsets_must_start_at_zero(no_kernel):
    q, k, v, cu_q, cu_k = _inputs()
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[0\] is 1: offsets must start at 0"):
        _call(q, k, v, torch.tensor([1, 3, 3, 7], dtype=torch.int32), cu_k)


def test_offsets_must_not_decrease(no_kernel):
    q, k, v, cu_q, _ = _inputs()
    with pytest.raises(ValueError, match=r"cu_seqlens_k decreases at position 2: "
                                         r"cu_seqlens_k\[1\] = 6 > cu_seqlens_k\[2\] = 4"):
        _call(q, k, v, cu_q, torch.tensor([0, 6, 4, 8], dtype=torch.int32))


def test_last_offset_must_be_the_tensor_length(no_kernel):
    q, k, v, _, cu_k = _inputs()
    # q is longer than the offsets cover: rows past the last offset are refused, not ignored.
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[3\] \(the last offset\) is 6, but q "
                                         r"has 7 rows"):
        _call(q, k, v, torch.tensor([0, 3, 3, 6], dtype=torch.int32), cu_k)


def test_batch_mismatch(no_kernel):
    q, k, v, cu_q, _ = _inputs()
    with pytest.raises(ValueError, match=r"batch mismatch: cu_seqlens_q .* B=3 sequences, "
                                         r"cu_seqlens_k .* B=2"):
        _call(q, k, v, cu_q, torch.tensor([0, 4, 8], dtype=torch.int32))


def test_tensor_shapes(no_kernel):
    q, k, v, cu_q, cu_k = _inputs()
    with pytest.raises(ValueError, match=r"q \(shape \(1, 7, 2, 8\).* must have 3 dimensions"):
        _call(q[None], k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        _call(q, k, v[:-1], cu_q, cu_k)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        _call(q[:, :1].expand(-1, 3, -1), k.expand(-1, 2, -1), v.expand(-1, 2, -1), cu_q, cu_k)
    with pytest.raises(TypeError, match="share one dtype"):
        _call(q.double(), k, v, cu_q, cu_k)


def test_max_seqlen_must_bound_the_lengths(no_kernel):
    q, k, v, cu_q, cu_k = _inputs()
    with pytest.raises(ValueError, match=r"max_seqlen_q=3 is smaller than sequence 2's length "
                                         r"4 \(cu_seqlens_q\[3\] - cu_seqlens_q\[2\]\)"):
        _call(q, k, v, cu_q, cu_k, 3, 5)
    for bad in (True, -1, 2.5):
        with pytest.raises(TypeError, match="max_seqlen_k must be a non-negative int"):
            _call(q, k, v, cu_q, cu_k, 4, bad)


def test_larger_max_seqlen_gives_the_same_result():
    q, k, v, cu_q, cu_k = _inputs()
    exact = _call(q, k, v, cu_q, cu_k, 4, 5, causal=True, return_lse=True)
    for bounds in ((100, 9), (None, None), (4, None)):
        got = _call(q, k, v, cu_q, cu_k, *bounds, causal=True, return_lse=True)
        assert all(torch.equal(a, b) for a, b in zip(got, exact)), bounds


def test_explain_varlen_uses_max_seqlen_and_names_refusals():
    class DenseOnly(ReferenceBackend):
        name = "test-dense-only"
        capabilities = Capabilities(devices=frozenset({"cpu"}),
                                    dtypes=frozenset({torch.float32}))

    registry.register(DenseOnly(), priority=5, plugin="tests")
    try:
        q, k, v, cu_q, cu_k = _inputs()
        ex = attnkit.explain_varlen(q, k, v, cu_q, cu_k)
        assert (ex.problem.batch, ex.problem.seqlen_q, ex.problem.seqlen_k) == (3, 4, 5)
        assert ex.problem.varlen and "packed varlen" in str(ex)
        verdict = next(vd for vd in ex.verdicts if vd.name == "test-dense-only")
        assert verdict.reasons == ["packed variable-length batches (attention_varlen) not "
                                   "supported"]
        assert attnkit.explain_varlen(q, k, v, cu_q, cu_k, 50, 60).problem.seqlen_k == 60
        with pytest.raises(NoBackendError, match="test-dense-only.*attention_varlen"):
            attnkit.attention_varlen(q, k, v, cu_q, cu_k, backend="test-dense-only")
    finally:
        registry.unregister("test-dense-only")


def test_backend_results_are_checked(monkeypatch):
    q, k, v, cu_q, cu_k = _inputs()
    monkeypatch.setattr(ReferenceBackend, "forward_varlen",
                        lambda self, p, q, k, v, a, b: (q.clone(), torch.zeros(q.shape[:2])))
    with pytest.raises(BackendContractError, match=r"'reference' forward_varlen broke the "
                                                   r"contract: lse has shape \(7, 2\), "
                                                   r"expected \(2, 7\)"):
        _call(q, k, v, cu_q, cu_k)


def test_empty_batches_are_answered_by_the_core(no_kernel):
    # No query row, no key anywhere, no sequence: 0 / -inf and zero gradients.
    for lens_q, lens_k in (((0, 0), (3, 1)), ((2, 3), (0, 0)), ((), ())):
        q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out, lse = _call(q, k, v, cu_q, cu_k, return_lse=True)
        assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
        assert (out == 0).all() and (lse == float("-inf")).all()
        out.sum().backward()
        assert all((t.grad == 0).all() for t in (q, k, v))


def test_autocast_casts_like_attention():
    q, k, v, cu_q, cu_k = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _call(q, k, v, cu_q, cu_k)
    assert out.dtype == torch.bfloat16
    want = _call(*(t.bfloat16() for t in (q, k, v)), cu_q, cu_k)
    assert torch.equal(out, want)


def _nested(t, cu):
    return torch.nested.nested_tensor_from_jagged(t, offsets=cu.long()).transpose(1, 2)


def test_nested_jagged_inputs_run_as_varlen():
    q, k, v, cu_q, cu_k = _inputs()
    out, lse = attnkit.attention(_nested(q, cu_q), _nested(k, cu_k), _nested(v, cu_k),
                                 causal=True, return_lse=True, backend="reference")
    want, want_lse = _call(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    assert out.is_nested and out.shape[0] == 3 and out.shape[1] == 2
    assert torch.equal(out.transpose(1, 2).values(), want)
    assert torch.equal(lse.transpose(1, 2).values(), want_lse.t())


def test_nested_jagged_mistakes():
    q, k, v, cu_q, cu_k = _inputs()
    qn, kn, vn = _nested(q, cu_q), _nested(k, cu_k), _nested(v, cu_k)
    dense = torch.randn(3, 1, 5, 8)
    with pytest.raises(TypeError, match=r"k is a dense tensor of shape \(3, 1, 5, 8\); with "
                                        "nested inputs"):
        attnkit.attention(qn, dense, dense)
    with pytest.raises(ValueError, match="seqlens_k does not apply"):
        attnkit.attention(qn, kn, vn, seqlens_k=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"must have shape \(B, H, j, D\), ragged in dim 2"):
        attnkit.attention(qn.transpose(1, 2), kn.transpose(1, 2), vn.transpose(1, 2))
    with pytest.raises(ValueError, match="k and v must have the same sequence lengths"):
        other = _offsets((1, 6, 1))
        attnkit.attention(qn, kn, _nested(v, other), backend="reference")


def test_compiled_call_takes_new_packings_and_bounds():
    # The second packing makes torch.compile trace the total and max_seqlen symbolically.
    def step(q, k, v, cu_q, cu_k, max_q, max_k):
        out = attnkit.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                       backend="reference")
        return out.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for lens_q, lens_k in (((3, 0, 4), (2, 5, 1)), ((6, 1), (6, 9)), ((2, 2, 2, 5), (1,) * 4)):
        q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k)
        q.requires_grad_()
        bounds = (max(lens_q) + 1, max(lens_k))
        got = compiled(q, k, v, cu_q, cu_k, *bounds)
        (dq,) = torch.autograd.grad(got, q)
        want = step(q, k, v, cu_q, cu_k, *bounds)
        assert torch.equal(got, want)
        assert torch.allclose(dq, torch.autograd.grad(want, q)[0])
    with pytest.raises(ValueError, match="max_seqlen_q=1 is smaller than sequence 3's length 5"):
        compiled(q, k, v, cu_q, cu_k, 1, 1)
