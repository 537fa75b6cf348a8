"""The split-KV decode kernel (`attnkit_triton.decode`): its split-count rule and when it
applies (no GPU needed), and the kernel itself through the Triton interpreter against the
float64 reference (``interpreter``: run with TRITON_INTERPRET=1, as nox does)."""

import re

import pytest
import torch
from attnkit_triton import decode as decode_module

from attnkit import reference
from attnkit.spec import AttentionProblem
from attnkit.testing.accuracy import assert_close

DECODE_CASES = [
    # B, Hq, Hkv, Sq, Sk, D, dtype, options, splits
    (2, 4, 2, 1, 100, 16, torch.float32, {}, 3),
    (2, 4, 1, 2, 70, 40, torch.float16, {"causal": True, "seqlens": [0, 50]}, 4),
    (3, 2, 2, 3, 90, 32, torch.bfloat16,
     {"causal": True, "window": (5, 0), "seqlens": [90, 7, 33], "softcap": 5.0, "bshd": True}, 2),
    (1, 8, 2, 1, 600, 64, torch.float16, {"causal": True}, None),  # default split count
    (2, 2, 2, 4, 3, 16, torch.float32, {"causal": True}, 1),  # rows with no key
    (1, 4, 4, 2, 80, 16, torch.float32, {"window": (3, 3)}, 8),  # empty splits
    # fp32 off Hopper reads fewer keys per step (`stream_config`: 16 at head dim 256).
    (1, 8, 2, 2, 70, 200, torch.float32, {"causal": True, "arch": 86}, 3),
    (1, 4, 1, 1, 90, 128, torch.float32, {"arch": 86}, 2),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", DECODE_CASES,
                         ids=[f"{str(c[6])[6:]}-B{c[0]}H{c[1]}x{c[2]}-q{c[3]}k{c[4]}d{c[5]}-"
                              f"splits{c[8]}" for c in DECODE_CASES])
def test_split_kv_decode(case):
    B, Hq, Hkv, Sq, Sk, D, dtype, opts, splits = case
    opts = dict(opts)
    g = torch.Generator().manual_seed(11)
    bshd = opts.pop("bshd", False)

    def rand(h, s):
        if bshd:
            return torch.randn((B, s, h, D), generator=g).to(dtype).transpose(1, 2)
        return torch.randn((B, h, s, D), generator=g).to(dtype)

    q, k, v = rand(Hq, Sq), rand(Hkv, Sk), rand(Hkv, Sk)
    seqlens = opts.pop("seqlens", None)
    seqlens = None if seqlens is None else torch.tensor(seqlens, dtype=torch.int32)
    arch = opts.pop("arch", None)
    problem = AttentionProblem.from_tensors(q, k, v, seqlens_k=seqlens, **opts)
    if splits is None:
        assert decode_module.use_split_kv(problem)
        assert decode_module.num_splits(problem) > 1
    launch = {}
    if arch is not None:  # that GPU's stream tiles, which the interpreter would not pick
        launch = dict(zip(("block_n", "num_warps", "num_stages"),
                          decode_module.stream_config(problem, arch)))
        assert launch["block_n"] < decode_module.stream_config(problem, 90)[0]
    out, lse = decode_module.decode_forward(problem, q, k, v, seqlens, splits=splits, **launch)
    r64 = reference.safe(q.double(), k.double(), v.double(), seqlens_k=seqlens, **opts)
    rlp = reference.safe(q, k, v, seqlens_k=seqlens, **opts)
    assert out.dtype == dtype and out.stride() == q.stride() and lse.dtype == torch.float32
    assert_close("out", out, r64[0], rlp[0], dtype)
    assert_close("lse", lse, r64[1], rlp[1].float(), dtype)
    again = decode_module.decode_forward(problem, q, k, v, seqlens, splits=splits, **launch)
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])


@pytest.mark.interpreter
def test_decode_launch_overrides_are_checked():
    q, kv = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 40, 16)
    problem = AttentionProblem.from_tensors(q, kv, kv)
    for kw, words in (({"splits": 0}, "splits must be in [1, 4096], got 0"),
                      ({"block_n": 24}, "block_n must be a power of two >= 16, got 24"),
                      ({"num_warps": 3}, "num_warps must be a power of two, got 3"),
                      ({"num_stages": 0}, "num_stages must be >= 1, got 0")):
        with pytest.raises(ValueError, match=re.escape(words)):
            decode_module.decode_forward(problem, q, kv, kv, None, **kw)


def _meta_problem(B, Hq, Hkv, Sq, Sk, D=128, dtype=torch.bfloat16, **kw):
    q = torch.empty(B, Hq, Sq, D, device="meta", dtype=dtype)
    k = torch.empty(B, Hkv, Sk, D, device="meta", dtype=dtype)
    return AttentionProblem.from_tensors(q, k, k, **kw)


def test_split_count_heuristic():
    ns = decode_module.num_splits
    h100 = 132
    # The workload: 128 (batch x kv head) programs on 132 SMs -> 2 splits at 1k
    # keys; from LONG_CACHE_KEYS on the programs read unsplit (still on the decode kernel).
    assert ns(_meta_problem(16, 32, 8, 1, 1024, causal=True), h100) == 2
    for keys in (decode_module.LONG_CACHE_KEYS, 65536):
        assert ns(_meta_problem(16, 32, 8, 1, keys, causal=True), h100) == 1
        # ... except in fp32, where one program per SM reads at half the speed of two.
        fp32 = _meta_problem(16, 32, 8, 1, keys, dtype=torch.float32, causal=True)
        assert ns(fp32, h100) == 2
    # Fewer programs than 90% of the SMs: long caches split too.
    assert ns(_meta_problem(14, 32, 8, 1, 65536, causal=True), h100) > 1
    # Batch 1: 8 programs; many splits, the last wave at least 90% full.
    s = ns(_meta_problem(1, 32, 8, 1, 65536), h100)
    assert 8 * s >= h100 and (8 * s / h100) / -(-8 * s // h100) >= 0.9
    # Enough programs already, or too few keys to split.
    assert ns(_meta_problem(64, 32, 8, 1, 8192), h100) == 1
    assert ns(_meta_problem(1, 32, 8, 1, 200), h100) == 1
    # A left window bounds the keys worth splitting.
    assert ns(_meta_problem(1, 32, 8, 1, 65536, window=(500, 0)), h100) <= 3


def test_use_split_kv_only_for_decoding_shapes(monkeypatch):
    monkeypatch.setattr(decode_module, "_sm_count", lambda device: 132)
    use = decode_module.use_split_kv
    assert use(_meta_problem(16, 32, 8, 1, 4096, causal=True))
    assert use(_meta_problem(16, 32, 8, 1, 65536, causal=True))  # one split, same kernel
    assert use(_meta_problem(2, 16, 2, 4, 20000))
    assert not use(_meta_problem(16, 32, 8, 64, 4096))  # prefill-shaped: many queries
    assert not use(_meta_problem(16, 32, 8, 1, 4096, dtype=torch.float64))
    assert not use(_meta_problem(16, 32, 8, 1, 4096, D=512))
    assert not use(_meta_problem(128, 32, 8, 1, 4096))  # enough programs without splitting
    with pytest.raises(ValueError, match="float64"):
        p = _meta_problem(1, 1, 1, 1, 16, D=16, dtype=torch.float64)
        decode_module.decode_forward(p, None, None, None, None)
