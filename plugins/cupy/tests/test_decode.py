"""The split-KV decode path: routing and argument checks (CPU), accuracy against the float64
reference (GPU, skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from attnkit_cupy import _compile, _decode, _launch
from attnkit_cupy.backend import CupyBackend

import attnkit
from attnkit import reference
from attnkit.backend_utils import choose_splits
from attnkit.spec import AttentionProblem
from attnkit.testing.accuracy import check

H100_SMS = 132


def _problem(B=16, Hq=32, Hkv=8, Sq=1, Sk=4096, D=128, dtype=torch.bfloat16, **kw):
    return AttentionProblem(B, Hq, Hkv, Sq, Sk, D, dtype, torch.device("cuda", 0),
                            scale=D ** -0.5, **kw)


# -- routing (the split rule) ---------------------------------------------------------------

@pytest.mark.parametrize("Sk", [1024, 4096, 16384, 65536])
def test_issue_workload_runs_unsplit(Sk):
    # 128 programs keep 97% of 132 SMs busy: one split (measured faster than two).
    p = _problem(Sk=Sk, causal=True)
    assert _decode.row_blocks(p) == 1
    assert _decode.num_splits(p, H100_SMS) == 1
    assert choose_splits(128, Sk, H100_SMS) == 2  # the fill-everything default would split
    assert _decode.use_split_kv(p)


@pytest.mark.parametrize("changes, decode", [
    (dict(B=2, Sq=16), True),       # up to 16 queries stay on the decode path
    (dict(Sq=17), False),           # more is a prefill: the forward kernel
    (dict(B=64), True),             # 64 x 8 programs: one split, still one read per kv head
    (dict(Sk=255), False),          # too few keys to be worth it
    (dict(B=1, Hq=1, Hkv=1, Sk=300), True),
    (dict(Sk=0), False),            # empty problems never reach a backend
])
def test_routing(changes, decode):
    assert _decode.use_split_kv(_problem(**changes)) is decode


def test_few_programs_split():
    p = _problem(B=1, Hq=32, Hkv=8, Sk=65536)
    s = _decode.num_splits(p, H100_SMS)
    assert s == choose_splits(8, 65536, H100_SMS, fill=0.9) and 8 * s >= H100_SMS


def test_split_rule_counts_row_blocks():
    # 8 query heads per kv head x 16 queries = 128 rows = 8 blocks of 16 per kv head.
    p = _problem(B=2, Hq=16, Hkv=2, Sq=16, Sk=8192)
    assert _decode.row_blocks(p) == 8
    assert _decode.num_splits(p, H100_SMS) == choose_splits(2 * 2 * 8, 8192, H100_SMS,
                                                            fill=0.9)
    # A left window bounds the keys one row block can see.
    p = _problem(B=1, Hq=8, Hkv=1, Sk=100_000, window=(300, -1))
    assert _decode.num_splits(p, H100_SMS) == choose_splits(1, 301, H100_SMS, fill=0.9) == 2


def test_plan_for_the_issue_workload():
    p = _problem(Sk=16384, causal=True)
    plan = _decode._plan(p, 2, None)
    assert plan.split_grid == (2, 16 * 8, 1) and plan.merge_grid == (16 * 32 // 4,)
    assert plan.n_part == 16 * 32 * 2
    assert plan.variant == _compile.variant_for("decode", "bf16", 128, True, False)
    assert plan.split_block == (plan.variant.tiles[0] * 32,)
    tiled = _decode._plan(p, 2, (2, 32, 4))
    assert tiled.variant.tiles == (2, 32, 4) and tiled.split_block == (64,)


def test_backend_forward_routes_decoding_shapes(monkeypatch):
    calls = []
    monkeypatch.setattr(_decode, "use_split_kv", lambda p: p.seqlen_q <= 16)
    monkeypatch.setattr(_decode, "decode_forward", lambda *a: calls.append("decode"))
    monkeypatch.setattr(_launch, "forward", lambda *a: calls.append("forward"))
    backend = CupyBackend()
    q = torch.randn(1, 2, 1, 16)
    backend.forward(_problem(B=1, Hq=2, Hkv=2, Sq=1, Sk=1, D=16), q, q, q, None)
    q = torch.randn(1, 2, 40, 16)
    backend.forward(_problem(B=1, Hq=2, Hkv=2, Sq=40, Sk=40, D=16), q, q, q, None)
    assert calls == ["decode", "forward"]


# -- argument checks ------------------------------------------------------------------------

def _inputs(B=2, Hq=4, Hkv=2, Sq=1, Sk=300, D=64, dtype=torch.float16, seqlens=False):
    q = torch.randn(B, Hq, Sq, D).to(dtype)
    k, v = (torch.randn(B, Hkv, Sk, D).to(dtype) for _ in range(2))
    s = torch.tensor([Sk, 5][:B], dtype=torch.int32) if seqlens else None
    return AttentionProblem.from_tensors(q, k, v, seqlens_k=s, causal=True), q, k, v, s


def test_checks_accept_valid_arguments():
    p, q, k, v, s = _inputs(seqlens=True)
    _decode.check_args(p, q, k, v, s, require_cuda=False)
    _decode.check_args(p, q, k, v, s, splits=100, tiles=(2, 32, 4), require_cuda=False)


@pytest.mark.parametrize("kw, match", [
    (dict(splits=0), "splits"), (dict(splits=5000), "splits"), (dict(splits=True), "splits"),
    (dict(splits=2.0), "splits"),
    (dict(tiles=(4, 32, 3)), "multiple of 16"),      # 8 keys per warp: below one mma
    (dict(tiles=(3, 48, 3)), "warps in"),
    (dict(tiles=(4, 64, 1)), "stages"),
    (dict(tiles=(8, 256, 8)), "shared"),             # 578 KiB of stages
    (dict(tiles=[4, 64, 3]), "tuple"),
])
def test_checks_reject_bad_overrides(kw, match):
    p, q, k, v, s = _inputs()
    with pytest.raises(ValueError, match=match):
        _decode.check_args(p, q, k, v, s, require_cuda=False, **kw)


def test_checks_reject_tiles_for_fp32():
    p, q, k, v, s = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="fixed tiles"):
        _decode.check_args(p, q, k, v, s, tiles=(4, 64, 3), require_cuda=False)


def test_checks_reject_tensors_of_another_problem():
    p, q, k, v, s = _inputs()
    other = _inputs(Sk=301)
    with pytest.raises(ValueError, match="do not match the problem"):
        _decode.check_args(other[0], q, k, v, s, require_cuda=False)
    p_s, *_ = _inputs(seqlens=True)
    with pytest.raises(ValueError, match="do not match the problem"):
        _decode.check_args(p_s, q, k, v, None, require_cuda=False)


def test_checks_reject_too_many_queries_and_a_too_large_grid():
    p, q, k, v, s = _inputs(Sq=17)
    with pytest.raises(ValueError, match="at most 16"):
        _decode.check_args(p, q, k, v, s, require_cuda=False)
    big = AttentionProblem(40000, 2, 2, 1, 300, 64, torch.float16, torch.device("cpu"))
    q = torch.empty(40000, 2, 1, 64, dtype=torch.float16, device="meta")
    k = torch.empty(40000, 2, 300, 64, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="grid"):
        _decode.check_args(big, q, k, k, None, require_cuda=False)


def test_checks_name_what_the_kernel_cannot_take():
    p, q, k, v, s = _inputs()
    with pytest.raises(ValueError, match=r"q \(shape \(2, 4, 1, 64\), .* takes CUDA tensors"):
        _decode.decode_forward(p, q, k, v, s)
    with pytest.raises(ValueError, match="do not match the problem"):
        _decode.check_args(p, q, k.float(), v.float(), s, require_cuda=False)
    with pytest.raises(ValueError, match="do not match the problem"):
        _decode.check_args(p, q, k, v[:, :, :299], s, require_cuda=False)
    p_s, q, k, v, s = _inputs(seqlens=True)
    with pytest.raises(TypeError, match="contiguous int32"):
        _decode.check_args(p_s, q, k, v, s.to(torch.int64), require_cuda=False)
    p64, *tensors = _inputs(dtype=torch.float64)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        _decode.check_args(p64, *tensors, require_cuda=False)
    long = AttentionProblem(1, 1, 1, 1, 1 << 29, 64, torch.float16, torch.device("cpu"))
    q = torch.empty(1, 1, 1, 64, dtype=torch.float16, device="meta")
    k = torch.empty(1, 1, 1 << 29, 64, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="int32 band arithmetic"):
        _decode.check_args(long, q, k, k, None, require_cuda=False)


# -- variants -------------------------------------------------------------------------------

def test_decode_variants_are_listed_and_fit():
    decode = [v for v in _compile.all_variants() if v.source == "decode"]
    # plain and paged by rows, and paged by whole pages for fp16 and bf16
    assert len(decode) == len(_compile.HEAD_DIM_BUCKETS) * 4 * (3 * 2 + 2 * 1)
    for var in decode:
        assert set(var.kernels()) == {"split", "merge"}
        rows, threads, smem = var.geometry("split")
        assert rows == _compile.DECODE_ROWS and threads % 32 == 0
        assert smem <= 163 * 1024, (var, smem)  # sm_80's opt-in limit
        if var.dtype != "fp32":
            _decode.check_tiles(var.dtype, var.dp, var.tiles)
    assert "decode_split_kernel<BF16, 128, 4, 64, 3, true, false, 0>" in \
        _compile.variant_for("decode", "bf16", 128, True, False).kernels().values()
    assert "decode_split_f32_kernel<64, false, true, true>" in _compile.variant_for(
        "decode", "fp32", 40, False, True, _compile.FEAT_PAGED).kernels().values()


def test_decode_source_is_self_contained():
    text = _compile.kernel_source("decode")
    assert "#include" not in text
    assert "decode_split_kernel" in text and "decode_merge_kernel" in text


# -- GPU ------------------------------------------------------------------------------------

gpu = pytest.mark.cuda  # a CUDA device the cupy backend can use (conftest.py)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# dtype, B, Hq, Hkv, Sq, Sk, D, options, seqlens ("mixed": 0, Sk, Sk/2, 1, ...), splits, bshd
GPU_CASES = [
    (BF16, 4, 8, 2, 1, 3000, 128, {}, None, None, False),
    (F16, 3, 4, 4, 3, 1500, 64, {"causal": True}, None, 3, False),
    (F32, 4, 8, 2, 1, 2000, 40, {"causal": True}, "mixed", None, False),
    (BF16, 4, 8, 2, 3, 1000, 256, {"softcap": 20.0}, None, 100, True),
    (F16, 4, 8, 2, 1, 777, 40, {"window": (100, 0)}, "mixed", 1, False),
    (F32, 2, 4, 4, 3, 900, 256, {"window": (50, 3), "softcap": 5.0}, None, 3, True),
    (BF16, 4, 32, 8, 1, 4096, 128, {"causal": True}, "mixed", None, False),
    (F16, 2, 4, 1, 3, 513, 128, {"causal": True}, "random", 100, False),
    (F32, 4, 8, 2, 1, 1024, 64, {}, None, 1, True),
    (BF16, 3, 4, 4, 3, 2000, 64, {"window": (7, 7), "softcap": 3.0}, "mixed", 3, False),
    (F16, 4, 4, 1, 3, 3000, 256, {"causal": True}, "mixed", None, True),
    (BF16, 2, 16, 2, 16, 1200, 128, {"causal": True}, "random", 3, False),  # 8 row blocks
    (F32, 3, 8, 8, 1, 1500, 128, {"causal": True, "softcap": 30.0}, "mixed", 100, False),
    (F16, 2, 4, 2, 1, 600, 36, {}, "mixed", 3, True),                        # scalar loads
]


def _case_id(c):
    dtype, B, Hq, Hkv, Sq, Sk, D, opts, seqlens, splits, bshd = c
    tags = [str(dtype)[6:], f"B{B}H{Hq}x{Hkv}q{Sq}k{Sk}d{D}", *opts, f"seqlens-{seqlens}",
            f"splits-{splits}"] + (["bshd"] if bshd else [])
    return "-".join(tags)


def _make(dtype, B, Hq, Hkv, Sq, Sk, D, seqlens, bshd, gen):
    def rand(h, s):
        shape = (B, s, h, D) if bshd else (B, h, s, D)
        t = torch.randn(shape, generator=gen, device="cuda").to(dtype)
        return t.transpose(1, 2) if bshd else t

    q, k, v = rand(Hq, Sq), rand(Hkv, Sk), rand(Hkv, Sk)
    lens = None
    if seqlens == "mixed":
        lens = torch.tensor([(0, Sk, Sk // 2, 1)[b % 4] for b in range(B)], dtype=torch.int32,
                            device="cuda")
    elif seqlens == "random":
        lens = torch.randint(0, Sk + 1, (B,), generator=gen, device="cuda", dtype=torch.int32)
    return q, k, v, lens


@gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_decode_matches_reference(case):
    dtype, B, Hq, Hkv, Sq, Sk, D, opts, seqlens, splits, bshd = case
    gen = torch.Generator(device="cuda").manual_seed(1234)
    q, k, v, lens = _make(dtype, B, Hq, Hkv, Sq, Sk, D, seqlens, bshd, gen)
    problem = AttentionProblem.from_tensors(q, k, v, seqlens_k=lens, **opts)
    out, lse = _decode.decode_forward(problem, q, k, v, lens, splits=splits)
    assert out.dtype == dtype and out.shape == q.shape and out.stride() == _launch._like_layout(
        q).stride()
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq)
    ref64 = reference.safe(q.double(), k.double(), v.double(), seqlens_k=lens, **opts)
    ref_lp = reference.safe(q, k, v, seqlens_k=lens, **opts)
    for name, got, r64, rlp in (("out", out, ref64[0], ref_lp[0]),
                                ("lse", lse, ref64[1], ref_lp[1].float())):
        ok, msg = check(name, got, r64, rlp, dtype, 2.0)
        assert ok, msg
    masked = ~reference.visible_mask(Sq, Sk, seqlens_k=lens, causal=opts.get("causal", False),
                                     window=opts.get("window")).any(-1)
    masked = masked.expand(B, Hq, Sq)
    assert (out[masked] == 0).all() and (lse[masked] == float("-inf")).all()
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    out2, lse2 = _decode.decode_forward(problem, q, k, v, lens, splits=splits)
    assert torch.equal(out, out2) and torch.equal(lse, lse2), "not bitwise repeatable"


@gpu
@pytest.mark.parametrize("tiles", [(2, 32, 4), (4, 64, 2), (8, 128, 2), (2, 64, 3)])
def test_alternative_tiles_match_reference(tiles):
    gen = torch.Generator(device="cuda").manual_seed(7)
    q, k, v, lens = _make(BF16, 3, 8, 2, 2, 2500, 128, "random", False, gen)
    problem = AttentionProblem.from_tensors(q, k, v, seqlens_k=lens, causal=True)
    out, lse = _decode.decode_forward(problem, q, k, v, lens, splits=5, tiles=tiles)
    ref64 = reference.safe(q.double(), k.double(), v.double(), seqlens_k=lens, causal=True)
    ref_lp = reference.safe(q, k, v, seqlens_k=lens, causal=True)
    ok, msg = check("out", out, ref64[0], ref_lp[0], BF16, 2.0)
    assert ok, msg


@gpu
def test_backend_routes_decoding_through_split_kv(monkeypatch):
    seen = []
    real = _decode.decode_forward
    monkeypatch.setattr(_decode, "decode_forward", lambda *a, **kw: seen.append(1) or real(
        *a, **kw))
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, lens = _make(F16, 2, 8, 2, 1, 4096, 128, "random", False, gen)
    out, lse = attnkit.attention_with_kvcache(q, k, v, lens, return_lse=True, backend="cupy")
    assert seen == [1]
    ref = reference.safe(q.double(), k.double(), v.double(), seqlens_k=lens, causal=True)
    assert (out.double() - ref[0]).abs().max() < 1e-2


@gpu
def test_decode_64bit_offsets():
    """k/v whose second batch starts past 2^31 elements."""
    B, H, S, D = 2, 2, 600, 64
    stride_b = (1 << 31) + 4096
    try:
        buf = torch.randn(stride_b + H * S * D + 4096, device="cuda", dtype=torch.float16)
    except torch.OutOfMemoryError:
        pytest.skip("cannot allocate the 4 GiB buffer")
    k = buf.as_strided((B, H, S, D), (stride_b, S * D, D, 1))
    v = buf.as_strided((B, H, S, D), (stride_b, S * D, D, 1), storage_offset=2048)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.float16)
    problem = AttentionProblem.from_tensors(q, k, v, causal=True)
    out, _ = _decode.decode_forward(problem, q, k, v, None, splits=3)
    ref = reference.safe(q.double(), k.double(), v.double(), causal=True)[0]
    del buf
    torch.cuda.empty_cache()
    assert (out.double() - ref).abs().max() < 1e-2
