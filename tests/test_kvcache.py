"""attention_with_kvcache, merge_attention, the encoder-decoder example and the decode suite's
ability to fail. (The split-KV kernels' own tests live with their plugins; the decoding loop
on a backend is a conformance case.)"""

import pathlib
import runpy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit
from attnkit import reference
from attnkit.reference_backend import ReferenceBackend
from attnkit.registry import NoBackendError, registry
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


# -- validate="device": the fill levels checked without a host synchronisation ---------------

class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("validate, syncs", [("host", 2), ("device", 0)])
def test_an_appending_step_reads_fill_levels_on_the_host_only_under_host(validate, syncs):
    """A repeated appending step: "host" reads the fill levels' min and max (a
    synchronisation on CUDA), "device" queues one assertion and reads nothing."""
    args = _call()
    with torch.no_grad():
        attnkit.attention_with_kvcache(**_call(), backend=REF, validate=validate)
        with _CountOps() as c:
            attnkit.attention_with_kvcache(**args, backend=REF, validate=validate)
    assert c.ops.count("_local_scalar_dense") == syncs, c.ops
    assert c.ops.count("_assert_async") == (validate == "device"), c.ops


@pytest.mark.parametrize("levels", [[9, 9, 9], [0, 9, 2], [0, -1, 2]])
def test_device_validation_refuses_bad_fill_levels_before_writing(levels):
    """Fill levels below 0, or whose S_new appended positions pass S_max: the assertion
    (raised at once on CPU) comes before the write, on fresh and kept signatures."""
    for _ in range(2):
        args = _call(cache_seqlens=torch.tensor(levels, dtype=torch.int32))
        kc0, vc0 = args["k_cache"].clone(), args["v_cache"].clone()
        with torch.no_grad(), pytest.raises(RuntimeError, match="KV cache: a negative fill"):
            attnkit.attention_with_kvcache(**args, backend=REF, validate="device")
        assert torch.equal(args["k_cache"], kc0) and torch.equal(args["v_cache"], vc0)


def test_device_validation_gives_the_host_checked_result():
    args, again = _call(), _call()
    with torch.no_grad():
        a = attnkit.attention_with_kvcache(**args, backend=REF, validate="host")
        b = attnkit.attention_with_kvcache(**again, backend=REF, validate="device")
    assert torch.equal(a, b) and torch.equal(args["k_cache"], again["k_cache"])


def test_an_append_longer_than_the_cache_is_refused_whatever_the_levels():
    args = _call(q=_cache(3, 4, 12, 8), k_new=_cache(3, 2, 12, 8), v_new=_cache(3, 2, 12, 8),
                 cache_seqlens=torch.zeros(3, dtype=torch.int32))
    for validate in ("host", "device"):
        with torch.no_grad(), pytest.raises(ValueError, match="appends 12 positions to caches "
                                                               "of S_max=10"):
            attnkit.attention_with_kvcache(**args, backend=REF, validate=validate)


def test_validate_must_be_a_mode():
    with torch.no_grad(), pytest.raises(ValueError, match="validate must be one of"):
        attnkit.attention_with_kvcache(**_call(), backend=REF, validate="never")
