"""attention_with_kvcache, merge_attention, the encoder-decoder example, the decode suite's
ability to fail, and the triton split-KV decode kernel under TRITON_INTERPRET=1."""

import os
import pathlib
import re
import runpy
import subprocess
import sys

import pytest
import torch

import attnkit
from attnkit import reference
from attnkit.reference_backend import ReferenceBackend
from attnkit.registry import NoBackendError, registry
from attnkit.spec import AttentionProblem
from attnkit.testing.accuracy import assert_close

ROOT = pathlib.Path(__file__).resolve().parents[1]
REF = "reference"


def _cache(B=3, Hkv=2, S=10, D=8, dtype=torch.float32, bshd=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if bshd:
        return torch.randn((B, S, Hkv, D), generator=g, dtype=dtype).transpose(1, 2)
    return torch.randn((B, Hkv, S, D), generator=g, dtype=dtype)


@pytest.mark.parametrize("bshd", [False, True], ids=["bhsd", "bshd-cache"])
@pytest.mark.parametrize("seqlens_dtype", [torch.int32, torch.int64])
def test_append_in_place_and_attend_prefix(bshd, seqlens_dtype):
    B, Hq, Hkv, S, D, s_new = 3, 4, 2, 10, 8, 2
    kc, vc = _cache(bshd=bshd), _cache(bshd=bshd, seed=1)
    kc0, vc0 = kc.clone(), vc.clone()
    cs = torch.tensor([0, 5, 8], dtype=seqlens_dtype)
    q, kn, vn = _cache(B, Hq, s_new, D, seed=2), _cache(B, Hkv, s_new, D, seed=3), \
        _cache(B, Hkv, s_new, D, seed=4)
    out, lse = attnkit.attention_with_kvcache(q, kc, vc, cs, kn, vn, backend=REF,
                                              return_lse=True)
    assert cs.tolist() == [0, 5, 8] and cs.dtype == seqlens_dtype
    assert kc.stride() == kc0.stride()  # written in place, same buffer
    for b, L in enumerate(cs.tolist()):
        torch.testing.assert_close(kc[b, :, L:L + s_new], kn[b], rtol=0, atol=0)
        torch.testing.assert_close(vc[b, :, L:L + s_new], vn[b], rtol=0, atol=0)
        untouched = [i for i in range(S) if not L <= i < L + s_new]
        assert torch.equal(kc[b, :, untouched], kc0[b, :, untouched])
        assert torch.equal(vc[b, :, untouched], vc0[b, :, untouched])
        n = L + s_new
        o, lz = reference.safe(q[b:b + 1].double(), kc[b:b + 1, :, :n].double(),
                               vc[b:b + 1, :, :n].double(), causal=True)
        torch.testing.assert_close(out[b:b + 1].double(), o, rtol=0, atol=1e-5)
        torch.testing.assert_close(lse[b:b + 1].double(), lz, rtol=0, atol=1e-5)


def test_no_new_keys_attends_cache_as_is_bottom_right():
    kc, vc = _cache(), _cache(seed=1)
    q = _cache(3, 4, 3, 8, seed=2)
    cs = torch.tensor([0, 2, 10], dtype=torch.int32)
    out = attnkit.attention_with_kvcache(q, kc, vc, cs, backend=REF)
    ref = attnkit.attention(q, kc, vc, seqlens_k=cs, causal=True, backend=REF)
    assert torch.equal(out, ref)
    # Batch 0 has nothing cached; batch 1 (2 keys, 3 queries): query 0 sees nothing.
    assert (out[0] == 0).all() and (out[1, :, 0] == 0).all() and not torch.isnan(out).any()


def test_autocast_leaves_the_cache_dtype_and_the_backend_alone():
    """Under autocast nothing is cast (the caches are written in their own dtype) and the
    backend runs without autocast: the same numbers as outside it."""
    bf16 = torch.bfloat16
    kc, vc = _cache(dtype=bf16), _cache(dtype=bf16, seed=1)
    q = _cache(3, 4, 2, 8, dtype=bf16, seed=2)
    kn, vn = _cache(3, 2, 2, 8, dtype=bf16, seed=3), _cache(3, 2, 2, 8, dtype=bf16, seed=4)
    cs = torch.tensor([0, 5, 8])
    kc2, vc2 = kc.clone(), vc.clone()
    want = attnkit.attention_with_kvcache(q, kc2, vc2, cs, kn, vn, backend=REF)
    with torch.autocast("cpu", dtype=torch.float16):
        got = attnkit.attention_with_kvcache(q, kc, vc, cs, kn, vn, backend=REF)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_window_and_softcap_pass_through():
    kc, vc = _cache(S=30), _cache(S=30, seed=1)
    q, kn, vn = _cache(3, 4, 1, 8, seed=2), _cache(3, 2, 1, 8, seed=3), _cache(3, 2, 1, 8, seed=4)
    cs = torch.tensor([29, 4, 15], dtype=torch.int32)
    out = attnkit.attention_with_kvcache(q, kc, vc, cs, kn, vn, window=(5, 0), softcap=3.0,
                                         scale=0.3, backend=REF)
    ref = attnkit.attention(q, kc, vc, seqlens_k=cs + 1, causal=True, window=(5, 0),
                            softcap=3.0, scale=0.3, backend=REF)
    assert torch.equal(out, ref)


def _call(**over):
    args = dict(q=_cache(3, 4, 2, 8, seed=2), k_cache=_cache(), v_cache=_cache(seed=1),
                cache_seqlens=torch.tensor([0, 5, 8], dtype=torch.int32),
                k_new=_cache(3, 2, 2, 8, seed=3), v_new=_cache(3, 2, 2, 8, seed=4))
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, match", [
    (dict(k_new=None), ValueError, "k_new and v_new must be given together"),
    (dict(q=_cache(3, 4, 1, 8)), ValueError, r"Sq=1 queries but k_new .* S_new=2"),
    (dict(v_cache=_cache(S=11)), ValueError, r"v_cache \(shape \(3, 2, 11, 8\)"),
    (dict(k_cache=_cache(dtype=torch.float64)), TypeError, "must share one dtype"),
    (dict(q=_cache(3, 3, 2, 8)), ValueError, "multiple of kv heads"),
    (dict(k_new=_cache(3, 1, 2, 8), v_new=_cache(3, 1, 2, 8)), ValueError,
     r"k_new \(shape \(3, 1, 2, 8\).* must be \(B=3, Hkv=2"),
    (dict(cache_seqlens=torch.tensor([0, 5, 8])[:2]), ValueError, r"shape \(3,\)"),
    (dict(cache_seqlens=torch.tensor([0.0, 5, 8])), TypeError, "torch.int32 or torch.int64"),
    (dict(cache_seqlens=[0, 5, 8]), TypeError, "cache_seqlens must be an int tensor"),
    (dict(cache_seqlens=torch.tensor([0, -1, 8], dtype=torch.int32)), ValueError, ">= 0"),
    (dict(cache_seqlens=torch.tensor([0, 5, 9], dtype=torch.int32)), ValueError,
     r"overflow: batch 2 holds 9 .* 11 > S_max=10; nothing was written"),
    (dict(q=_cache(3, 4, 2, 8).reshape(3, 4, 16)), ValueError, "must have 4 dimensions"),
])
def test_errors_name_the_input_and_write_nothing(over, exc, match):
    args = _call(**over)
    kc0, vc0 = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(exc, match=match):
        attnkit.attention_with_kvcache(**args, backend=REF)
    assert torch.equal(args["k_cache"], kc0) and torch.equal(args["v_cache"], vc0)


def test_refused_backend_writes_nothing():
    args = _call()
    kc0 = args["k_cache"].clone()
    with pytest.raises(NoBackendError, match="unknown backend"):
        attnkit.attention_with_kvcache(**args, backend="no-such-backend")
    assert torch.equal(args["k_cache"], kc0)


def test_gradients_are_refused_forward_only():
    args = _call(q=_cache(3, 4, 2, 8, seed=2).requires_grad_(True))
    with pytest.raises(RuntimeError, match="forward only.*q require"):
        attnkit.attention_with_kvcache(**args, backend=REF)
    with torch.no_grad():  # the same call without autograd is fine
        attnkit.attention_with_kvcache(**args, backend=REF)


# -- merge_attention ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_merge_equals_full_attention(dtype):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 5, 16, generator=g).to(dtype)
    k = torch.randn(3, 2, 40, 16, generator=g).to(dtype)
    v = torch.randn(3, 2, 40, 16, generator=g).to(dtype)
    lens = torch.tensor([0, 9, 40], dtype=torch.int32)  # batch 0 sees nothing at all
    outs, lses = [], []
    for a, z in ((0, 10), (10, 11), (11, 40)):
        o, lz = attnkit.attention(q, k[:, :, a:z], v[:, :, a:z], return_lse=True, backend=REF,
                                  seqlens_k=(lens - a).clamp(0, z - a).to(torch.int32))
        outs.append(o)
        lses.append(lz)
    out, lse = attnkit.merge_attention(outs, lses)
    r64 = reference.safe(q.double(), k.double(), v.double(), seqlens_k=lens)
    rlp = reference.safe(q, k, v, seqlens_k=lens)
    assert out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close("out", out, r64[0], rlp[0], dtype)
    assert_close("lse", lse, r64[1], rlp[1], dtype)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()


def test_merge_ignores_garbage_of_empty_partials():
    out1 = torch.randn(2, 3, 4)
    lse1 = torch.randn(2, 3)
    junk = torch.full((2, 3, 4), float("nan"))
    ninf = torch.full((2, 3), float("-inf"))
    out, lse = attnkit.merge_attention([out1, junk], [lse1, ninf])
    assert torch.equal(out, out1) and torch.equal(lse, lse1)
    out, lse = attnkit.merge_attention([junk, junk], [ninf, ninf])
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_merge_is_order_free_and_handles_huge_lse():
    outs = [torch.randn(1, 2, 3, 8) for _ in range(3)]
    lses = [torch.tensor([[[1000.0, -1000.0, 0.0]] * 2]),
            torch.tensor([[[999.0, -999.0, 1.0]] * 2]), torch.full((1, 2, 3), -5.0)]
    a = attnkit.merge_attention(outs, lses)
    b = attnkit.merge_attention(outs[::-1], lses[::-1])
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert torch.isfinite(a[0]).all() and torch.isfinite(a[1]).all()
    torch.testing.assert_close(a[1][0, 0, 0], torch.logaddexp(torch.tensor(1000.0),
                                                              torch.tensor(999.0)))


@pytest.mark.parametrize("outs, lses, match", [
    ([], [], "at least one pair"),
    ([torch.zeros(2, 3)], [], "one lse per out"),
    ([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(2), torch.zeros(2)], "must match"),
    ([torch.zeros(2, 3)], [torch.zeros(3)], r"must have shape \(2,\)"),
])
def test_merge_errors(outs, lses, match):
    with pytest.raises(ValueError, match=match):
        attnkit.merge_attention(outs, lses)


# -- the example and the suite ---------------------------------------------------------------

def test_encoder_decoder_example_matches_recompute():
    mod = runpy.run_path(str(ROOT / "examples" / "encoder_decoder.py"))
    worst = mod["main"](backend=REF, steps=6, verbose=False)
    assert worst < 1e-4


class IgnoresSeqlens(ReferenceBackend):
    """Wrong for every KV cache: attends over the whole buffer, garbage included."""

    name = "wrong-ignores-seqlens"

    def forward(self, problem, q, k, v, seqlens_k):
        return super().forward(problem, q, k, v, None)


def test_decode_suite_catches_a_backend_ignoring_cache_fill(pytester):
    registry.register(IgnoresSeqlens(), priority=None, plugin="tests")
    try:
        suite = ROOT / "attnkit" / "testing" / "suite_decode.py"
        result = pytester.runpytest_inprocess(
            str(suite), "-p", "attnkit.testing.plugin", "--attnkit-backend",
            "wrong-ignores-seqlens", "--attnkit-quick", "-p", "no:cacheprovider")
    finally:
        registry.unregister("wrong-ignores-seqlens")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) > 0, outcomes
    result.stdout.fnmatch_lines(["*max|got - ref64|*"])


# -- the triton split-KV decode kernel, interpreted on CPU -----------------------------------

#: Triton picks the interpreter when its kernels are decorated, so the kernel runs happen in a
#: subprocess started with TRITON_INTERPRET=1 (test_decode_kernel_under_interpreter).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted_only = pytest.mark.skipif(
    not INTERPRETED, reason="run in a TRITON_INTERPRET=1 subprocess by "
    "test_decode_kernel_under_interpreter")


@pytest.fixture(scope="module")
def decode_module():
    """The triton plugin's split-KV decode module (needs the plugin and triton installed)."""
    pytest.importorskip("triton")
    return pytest.importorskip("attnkit_triton.decode")


def test_decode_kernel_under_interpreter():
    if INTERPRETED:
        pytest.skip("this is the interpreter subprocess itself")
    pytest.importorskip("triton")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "interpreted"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # The decode cases and test_decode_launch_overrides_are_checked_interpreted.
    assert f"{len(DECODE_CASES) + 1} passed" in r.stdout, r.stdout[-2000:]


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


@pytest.mark.parametrize("case", DECODE_CASES,
                         ids=[f"{str(c[6])[6:]}-B{c[0]}H{c[1]}x{c[2]}-q{c[3]}k{c[4]}d{c[5]}-"
                              f"splits{c[8]}" for c in DECODE_CASES])
@interpreted_only
def test_split_kv_decode_interpreted(decode_module, case):
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


@interpreted_only
def test_decode_launch_overrides_are_checked_interpreted(decode_module):
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


def test_split_count_heuristic(decode_module):
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


def test_use_split_kv_only_for_decoding_shapes(decode_module, monkeypatch):
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


# -- repeated calls (a decoding loop) --------------------------------------------------------

def test_repeated_signature_still_checks_fill_levels():
    """The validated problem is reused for a repeated call signature; the fill levels are
    values and are checked on every call that appends."""
    args = _call()
    attnkit.attention_with_kvcache(**args, backend=REF)
    full = dict(args, cache_seqlens=torch.tensor([9, 9, 9], dtype=torch.int32))
    kc0 = full["k_cache"].clone()
    with pytest.raises(ValueError, match="overflow"):
        attnkit.attention_with_kvcache(**full, backend=REF)
    assert torch.equal(full["k_cache"], kc0)
    with pytest.raises(ValueError, match=">= 0"):
        attnkit.attention_with_kvcache(**dict(args, cache_seqlens=torch.tensor(
            [0, -1, 2], dtype=torch.int32)), backend=REF)


def _gpu_backend(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reg = attnkit.backends().get(name)
    if reg is None or not reg.availability[0]:
        pytest.skip(f"backend {name} is not available here")
    return name


@pytest.mark.parametrize("name", ["triton", "cupy"])
def test_decoding_loop_on_cuda(name):
    """Step after step with fresh queries and appended keys (one call signature, so the
    backends' per-signature launch caches are hit), then a cache of other strides and a
    step without new keys: every output equals the reference over the filled prefix."""
    backend = _gpu_backend(name)
    B, Hq, Hkv, S, D, dt = 3, 8, 2, 700, 64, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(shape, generator=g, device="cuda").to(dt)

    def check(out, q, kc, vc, lens):
        for b, n in enumerate(lens.tolist()):
            o64, _ = reference.safe(q[b:b + 1].double(), kc[b:b + 1, :, :n].double(),
                                    vc[b:b + 1, :, :n].double(), causal=True)
            olp, _ = reference.safe(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n],
                                    causal=True)
            assert_close(f"{name} out[{b}]", out[b:b + 1], o64, olp, dt)

    for layout in ("bhsd", "bshd"):
        kc, vc = rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
        if layout == "bshd":
            kc, vc = (rnd(B, S, Hkv, D).transpose(1, 2) for _ in range(2))
        lens = torch.tensor([300, 17, 512], dtype=torch.int32, device="cuda")
        for _ in range(4):
            q, kn, vn = rnd(B, Hq, 1, D), rnd(B, Hkv, 1, D), rnd(B, Hkv, 1, D)
            out = attnkit.attention_with_kvcache(q, kc, vc, lens, kn, vn, backend=backend)
            lens += 1
            check(out, q, kc, vc, lens)
        q = rnd(B, Hq, 2, D)
        out = attnkit.attention_with_kvcache(q, kc, vc, lens, backend=backend)
        check(out, q, kc, vc, lens)
