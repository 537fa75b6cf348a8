"""CPU tests of the cupy backend: registration, availability, launch limits, kernel
arguments, variants."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from attnkit_cupy import _compile, _launch
from attnkit_cupy.backend import CupyBackend

import attnkit
from attnkit.backend_utils import LOG2E
from attnkit.registry import NoBackendError


def test_registered_through_the_entry_point():
    reg = attnkit.backends()["cupy"]
    assert isinstance(reg.backend, CupyBackend)
    assert reg.distribution.startswith("attnkit-cupy")
    assert reg.priority_for("cuda") == 50 and reg.priority_for("cpu") is None


def test_availability_gives_a_reason_when_unusable():
    ok, why = CupyBackend().availability()
    assert isinstance(ok, bool)
    if not torch.cuda.is_available():
        assert not ok and why, "without CUDA the backend must say why it is unavailable"


def test_availability_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    ok, why = CupyBackend().availability()
    assert not ok and "cupy is not importable" in why


def test_cpu_tensors_are_refused_with_reasons():
    q = torch.randn(1, 2, 8, 16)
    reasons = CupyBackend().not_supported_reasons(attnkit.AttentionProblem.from_tensors(q, q, q))
    assert any("device 'cpu'" in r for r in reasons)
    with pytest.raises(NoBackendError, match="cupy"):
        attnkit.attention(q, q, q, backend="cupy")


def _qkv(B=2, Hq=4, Hkv=2, Sq=8, Sk=9, D=16, dtype=torch.float16):
    return (torch.randn(B, Hq, Sq, D).to(dtype), torch.randn(B, Hkv, Sk, D).to(dtype),
            torch.randn(B, Hkv, Sk, D).to(dtype))


def _cuda_problem(monkeypatch, B=2, Hq=4, Sq=8, Sk=9):
    monkeypatch.setattr(attnkit.backend, "cuda_capability", lambda device: (9, 0))
    return attnkit.AttentionProblem(B, Hq, Hq, Sq, Sk, 64, torch.bfloat16,
                                    torch.device("cuda", 0))


@pytest.mark.parametrize("sizes, match", [
    (dict(B=70000), "batch 70000 and query heads 4 must each be <= 65535"),
    (dict(Hq=65536), "query heads 65536 must each be <= 65535"),
    (dict(Sq=1 << 28, Sk=1 << 28), "Sq \\+ Sk = 536870912 must be < 536870912"),
])
def test_launch_limits_are_refused_with_reasons(monkeypatch, sizes, match):
    """The CUDA grid's y/z limit and int32 band arithmetic are the kernels' own limits: the
    backend refuses such problems at selection, saying which limit."""
    reasons = CupyBackend().not_supported_reasons(_cuda_problem(monkeypatch, **sizes))
    assert any(re.search(match, r) for r in reasons), reasons
    assert _launch.limit_reasons(_cuda_problem(monkeypatch)) == []


def test_seqlens_must_be_contiguous_int32():
    """What the kernels read; the core converts the dtype, a strided view reaches them."""
    _launch.check_seqlens(None)
    _launch.check_seqlens(torch.tensor([3, 9], dtype=torch.int32))
    with pytest.raises(TypeError, match=r"seqlens_k \(shape \(2,\), dtype torch.int32"):
        _launch.check_seqlens(torch.tensor([[3, 9], [1, 1]], dtype=torch.int32)[:, 0])
    with pytest.raises(TypeError, match="contiguous int32"):
        _launch.check_seqlens(torch.tensor([3, 9]))


def test_head_dim_buckets():
    assert [_compile.head_dim_bucket(d) for d in (1, 32, 33, 111, 128, 129, 200, 256)] == \
        [32, 32, 64, 128, 128, 192, 256, 256]
    with pytest.raises(ValueError):
        _compile.head_dim_bucket(257)


def test_variants_name_every_kernel_and_fit_shared_memory():
    variants = _compile.all_variants()
    # forward and backward once per feature set (plain, packed, dropout, both); the decode
    # plain, paged by rows and (fp16/bf16) paged by whole pages
    per_source = 3 * len(_compile.HEAD_DIM_BUCKETS) * 4
    whole = _compile.FEAT_PAGED | _compile.FEAT_WHOLE_PAGES
    assert len(variants) == len(set(variants)) == per_source * (
        2 * len(_compile.FEATURES) + len(_compile.DECODE_FEATURES)) - per_source // 3
    assert {v.feat for v in variants if v.source == "decode"} == {0, _compile.FEAT_PAGED, whole}
    assert not [v for v in variants if v.dtype == "fp32" and v.feat == whole]
    assert {v.feat for v in variants if v.source != "decode"} == {0, 1, 2, 3}
    roles = {"forward": {"fwd"}, "backward": {"delta", "dq", "dkdv"}, "decode": {"split", "merge"}}
    for var in variants:
        names = var.kernels()
        assert set(names) == roles[var.source]
        for role in names:
            rows, threads, smem = var.geometry(role)
            assert rows > 0 and threads % 32 == 0
            # 163 KiB: the largest dynamic shared memory an sm_80 block may opt in to.
            assert smem <= 163 * 1024, (var, role, smem)


def test_kernel_source_is_self_contained():
    for src in _compile.SOURCES:
        text = _compile.kernel_source(src)
        assert "#include" not in text  # NVRTC gets no include path and no system headers
        assert "struct Band" in text and "mma.sync" in text


def test_band_arguments():
    """Both sides always apply: an unbounded one is Sq + Sk (never masks), and a bound past
    it is clamped to it."""
    q, k, v = _qkv(Sq=8, Sk=9)
    prob = attnkit.AttentionProblem.from_tensors(q, k, v, causal=True, window=(3, -1))
    assert _launch.band(prob) == (3, 0, True, True) and _launch.band(prob).bounded
    prob = attnkit.AttentionProblem.from_tensors(q, k, v)
    assert _launch.band(prob) == (17, 17, False, False) and not _launch.band(prob).bounded
    prob = attnkit.AttentionProblem.from_tensors(q, k, v, window=(1000, 2))
    assert _launch.band(prob) == (17, 2, True, True)


def test_score_arguments():
    """fp16/bf16 kernels take the scores in log2 units, fp32 in natural ones."""
    q, k, v = _qkv()
    prob = attnkit.AttentionProblem.from_tensors(q, k, v, scale=0.5, softcap=10.0)
    assert _launch.scores(prob, fp32=True) == (np.float32(0.5), np.float32(0.05),
                                               np.float32(10.0))
    assert _launch.scores(prob, fp32=False) == (np.float32(0.5 * LOG2E), np.float32(0.05),
                                                np.float32(10.0 * LOG2E))
    assert all(type(x) is np.float32 for x in _launch.scores(prob, fp32=False))
    prob = attnkit.AttentionProblem.from_tensors(q, k, v, scale=0.5)
    assert _launch.scores(prob, fp32=False)[0] == np.float32(0.5 * LOG2E)


def test_output_layout_follows_the_input():
    q = torch.randn(2, 5, 3, 16).transpose(1, 2)  # (B, S, H, D) passed transposed
    out = _launch._like_layout(q)
    assert out.shape == q.shape and out.stride() == q.stride()
    q = torch.randn(2, 3, 5, 16)
    assert _launch._like_layout(q).is_contiguous()


def test_cuda_problem_without_cupy_gives_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    q = torch.randn(1, 2, 8, 16)
    prob = attnkit.AttentionProblem.from_tensors(q, q, q)
    prob = prob._replace(device=torch.device("cuda", 0))
    reasons = CupyBackend().not_supported_reasons(prob)
    assert any("compute capability" in r for r in reasons)


def test_kernels_over_the_gpus_shared_memory_are_refused(monkeypatch):
    """The tiles are sized for A100/H100 (163/227 KB per block); sm_86/sm_89 allow 99 KB, so
    the kernels that need more are refused there with their numbers, not launched."""
    from attnkit_cupy import backend

    def problem(D, Sq=512, Sk=512, dtype=torch.bfloat16, grad=False):
        return attnkit.AttentionProblem(2, 4, 4, Sq, Sk, D, dtype, torch.device("cuda", 0),
                                        needs_grad=grad)

    def reasons(p, limit, cc=86):
        # The capability comes from the core (through torch), the limit via cupy.
        monkeypatch.setattr(attnkit.backend, "cuda_capability", lambda device: divmod(cc, 10))
        monkeypatch.setattr(backend, "_shared_memory_limit", lambda idx: limit)
        return CupyBackend().not_supported_reasons(p)

    assert reasons(problem(64, grad=True), 101376) == []
    assert reasons(problem(256, grad=True), 166912, cc=80) == []
    (why,) = reasons(problem(256, grad=True), 101376)
    need, kernel = backend.shared_memory_needed(problem(256, grad=True))
    assert kernel.startswith("backward") and need > 101376
    assert why == (f"the {kernel} kernel at head dim 256 (bfloat16) needs {need} bytes of "
                   "shared memory per block; cuda:0 (sm_86) allows 101376")
    (why,) = reasons(problem(128, Sq=1, Sk=4096), 101376)  # split-KV decoding
    assert why.startswith("the decode split kernel at head dim 128")
    assert reasons(problem(128, grad=True), 101376, cc=75) == [
        "cuda:0 has compute capability 7.5; the cupy backend needs 8.0 or newer"]


def test_varlen_and_dropout_are_declared_and_leave_the_decode_kernel():
    """Both are fused in the forward/backward kernels only: a decoding shape with either runs
    the forward kernel (the split-KV decode has neither)."""
    from attnkit_cupy import _decode

    caps = CupyBackend.capabilities
    assert caps.varlen and caps.dropout
    dense = attnkit.AttentionProblem(1, 8, 1, 1, 8192, 128, torch.bfloat16,
                                     torch.device("cuda", 0))
    assert _decode.use_split_kv(dense)
    assert not _decode.use_split_kv(dense._replace(dropout_p=0.1))
    assert not _decode.use_split_kv(dense._replace(varlen=True))


def test_feature_bits_pick_the_kernels():
    names = _compile.variant_for("forward", "bf16", 100, True, False,
                                 _compile.FEAT_DROPOUT).kernels()
    assert names["fwd"].endswith("true, false, 2>")
    names = _compile.variant_for("backward", "fp32", 40, False, True,
                                 _compile.FEAT_VARLEN).kernels()
    assert names["dq"] == "bwd_dq_f32_kernel<64, false, true, 1>"
    assert names["delta"] == "bwd_delta_f32_kernel"
    names = _compile.variant_for("forward", "bf16", 64, False, False,
                                 _compile.FEAT_VARLEN | _compile.FEAT_DROPOUT).kernels()
    assert names["fwd"].endswith("false, false, 3>")
    names = _compile.variant_for("decode", "fp16", 128, True, False, _compile.FEAT_PAGED)
    assert names.kernels()["split"] == "decode_split_kernel<Half, 128, 4, 64, 3, true, false, 1>"
    names = _compile.variant_for("decode", "fp16", 128, True, False,
                                 _compile.FEAT_PAGED | _compile.FEAT_WHOLE_PAGES)
    assert names.kernels()["split"] == "decode_split_kernel<Half, 128, 4, 64, 3, true, false, 2>"
    with pytest.raises(ValueError, match="decode"):
        _compile.Variant("decode", "bf16", 64, False, False, (4, 64, 4), 1).kernels()
    with pytest.raises(ValueError, match="fp32 without FEAT_WHOLE_PAGES"):
        _compile.variant_for("decode", "fp32", 64, False, False,
                             _compile.FEAT_PAGED | _compile.FEAT_WHOLE_PAGES).kernels()
    with pytest.raises(ValueError, match="forward/backward"):
        _compile.Variant("forward", "fp32", 64, False, False, (), _compile.FEAT_PAGED).kernels()


def test_packed_strides_and_vector_loads():
    """A packed (total, H, D) tensor reaches the kernels as (0, head, row, column) strides; a
    column slice of a qkv projection keeps 16-byte loads when its rows stay aligned."""
    qkv = torch.zeros(10, 6, 64, dtype=torch.bfloat16)
    q = qkv[:, :4]
    assert [int(s) for s in _launch._packed_strides(q)] == [0, 64, 6 * 64, 1]
    assert [int(s) for s in _launch._packed_strides(q, 3)] == [0, 64, 6 * 64]
    assert _launch._vec_ok3(64, q, qkv[:, 4:5])
    assert not _launch._vec_ok3(60, qkv[:, :, :60])  # D % 8
    shifted = torch.zeros(10 * 6 * 64 + 1, dtype=torch.bfloat16)[1:].view(10, 6, 64)
    assert not _launch._vec_ok3(64, shifted[:, :4])  # a 2-byte offset start
    with pytest.raises(ValueError, match="total_q \\+ total_k"):
        _launch.check_packed_lengths(_launch.MAX_SEQ_SUM, 0)
    _launch.check_packed_lengths(_launch.MAX_SEQ_SUM - 1, 0)


def test_dropout_state_is_checked_and_passed():
    from attnkit.dropout import Dropout

    q = torch.zeros(1, 1, 4, 8)
    drop = Dropout(0.25, torch.tensor([3, 4], dtype=torch.int64))
    cu_q, cu_k, state, thr, scale = _launch._extras(dropout=drop, q=q)
    assert state == drop.state.data_ptr() and int(cu_q) == int(cu_k) == 0
    assert thr == np.uint32(drop.threshold) and thr.dtype == np.uint32
    assert scale == np.float32(1 / 0.75)
    assert [int(x) for x in _launch._extras()[2:4]] == [0, 0]
    for bad in (torch.tensor([3, 4], dtype=torch.int32), torch.tensor([3, 4, 5]),
                torch.tensor([[3, 5], [4, 6]])[:, 0]):
        with pytest.raises(TypeError, match="dropout.state"):
            _launch._extras(dropout=Dropout(0.25, bad), q=q)
