"""attnkit.sdpa against torch.nn.functional.scaled_dot_product_attention itself: forward and
backward over masks (boolean and additive), GQA, dtypes and shapes, Sq != Sk, fully masked
rows; what it refuses and how it says so; the structure it reads from masks."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnkit
import attnkit.dropin
from attnkit.masks import broadcast_mask, mask_structure
from attnkit.testing.accuracy import GRAD_FACTOR, OUT_FACTOR, check

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _auto_backend_on_cpu() -> bool:
    x = torch.zeros(1, 1, 1, 8, requires_grad=True)
    return attnkit.explain(x, x, x).chosen is not None


#: The reference always (the core's tests install no plugin); the backend attnkit picks on
#: this CPU as well where one is installed (the transformers session installs torch-blocked).
BACKENDS = ["reference"] + (["auto"] if _auto_backend_on_cpu() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


#: CUDA where there is one: masks are read on the tensors' device, kernels are attnkit's own.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _band(B, Sq, Sk, *, lengths=None, causal=None, left=None, right=None):
    """A (B, 1, Sq, Sk) boolean mask built the slow way: query i of batch b sees key j iff
    j < L_b and the band around the diagonal d = i + L_b - Sq (``causal``: "tl" puts it at
    d = i instead) allows it."""
    L = torch.tensor(lengths if lengths is not None else [Sk] * B)[:, None, None]
    i = torch.arange(Sq)[None, :, None]
    j = torch.arange(Sk)[None, None, :]
    d = i if causal == "tl" else i + L - Sq
    m = (j < L).expand(len(L), Sq, Sk)
    if causal:
        m = m & (j <= d)
    if right is not None:
        m = m & (j <= d + right)
    if left is not None:
        m = m & (j >= d - left)
    return m[:, None]


def _additive(mask, dtype):
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))


# name -> mask factory (B, Sq, Sk) -> mask or None, plus the is_causal flag
MASKS = {
    "none": (lambda B, Sq, Sk: None, False),
    "is_causal": (lambda B, Sq, Sk: None, True),
    "top_left": (lambda B, Sq, Sk: _band(B, Sq, Sk, causal="tl")[0, 0], False),
    "bottom_right": (lambda B, Sq, Sk: _band(B, Sq, Sk, causal="br")[0], False),
    "window": (lambda B, Sq, Sk: _band(B, Sq, Sk, causal="br", left=3), False),
    "window_two_sided": (lambda B, Sq, Sk: _band(B, Sq, Sk, left=2, right=1)[0, 0], False),
    "key_padding": (lambda B, Sq, Sk: _band(B, 1, Sk, lengths=[Sk, 0, 3][:B] + [Sk] * (B - 3)),
                    False),
    "key_padding_2d": (lambda B, Sq, Sk: _band(B, 1, Sk, lengths=[max(Sk - 2, 0)] + [Sk] * (B - 1))
                       [:, 0, 0][:, None, None, :], False),
    "padded_causal": (lambda B, Sq, Sk: _band(B, Sq, Sk, causal="br",
                                              lengths=[Sk, 1, 2][:B] + [Sk] * (B - 3)), False),
    "padded_window": (lambda B, Sq, Sk: _band(B, Sq, Sk, causal="br", left=1,
                                              lengths=[Sk, 2, 4][:B] + [Sk] * (B - 3)), False),
    "all_masked": (lambda B, Sq, Sk: torch.zeros(Sq, Sk, dtype=torch.bool), False),
    "heads_expanded": (lambda B, Sq, Sk: _band(B, Sq, Sk, causal="tl").expand(B, 4, Sq, Sk),
                       False),
    # What .to(device) makes of an expanded mask: every head stored, all the same.
    "heads_stored": (lambda B, Sq, Sk: _band(B, Sq, Sk, causal="tl").repeat(1, 4, 1, 1),
                     False),
}
SHAPES = [(1, 1), (5, 5), (7, 13), (13, 7), (1, 9), (33, 40)]


def _inputs(B, Hq, Hk, Sq, Sk, D, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, s, D, generator=g).to(device, dtype).requires_grad_()
            for h, s in ((Hq, Sq), (Hk, Sk), (Hk, Sk))]


def _compare(q, k, v, mask, is_causal, gqa, backend, scale=None):
    """attnkit.sdpa against SDPA in q's dtype and in float64, forward and backward."""
    dtype = q.dtype
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator()
                       .manual_seed(7)).to(q.device, dtype)
    mask = None if mask is None else mask.to(q.device)
    args = dict(is_causal=is_causal, enable_gqa=gqa, scale=scale)

    def run(fn, tensors, m):
        ts = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*ts, attn_mask=m, **args)
        out.backward(dout.to(out.dtype))
        return [out.detach()] + [t.grad for t in ts]

    got = run(lambda *a, **kw: attnkit.sdpa(*a, backend=backend, **kw), (q, k, v), mask)
    # The oracle is torch's SDPA on the CPU, whatever device attnkit ran on: its answer for
    # rows that see no key (0) is the same in all its CPU kernels, not so on CUDA.
    cpu = [t.detach().cpu() for t in (q, k, v)]
    m_cpu = None if mask is None else mask.cpu()
    m64 = m_cpu if m_cpu is None or m_cpu.dtype == torch.bool else m_cpu.double()
    dout = dout.cpu()
    ref64 = run(F.scaled_dot_product_attention, [t.double() for t in cpu], m64)
    ref_lp = run(F.scaled_dot_product_attention, cpu, m_cpu)
    for name, g, r64, rlp in zip(("out", "dq", "dk", "dv"), got, ref64, ref_lp):
        assert g.dtype == dtype
        ok, msg = check(name, g, r64, rlp, dtype, OUT_FACTOR if name == "out" else GRAD_FACTOR)
        assert ok, msg


@pytest.mark.parametrize("Sq,Sk", SHAPES)
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_matches_sdpa_fp32(mask_name, Sq, Sk, backend, device):
    make, is_causal = MASKS[mask_name]
    q, k, v = _inputs(3, 4, 4, Sq, Sk, 16, torch.float32, seed=Sq * 100 + Sk, device=device)
    _compare(q, k, v, make(3, Sq, Sk), is_causal, gqa=False, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_name,additive", [
    ("is_causal", False), ("bottom_right", False), ("bottom_right", True),
    ("padded_window", False), ("padded_window", True), ("key_padding", True)])
def test_matches_sdpa_dtypes_and_additive(dtype, mask_name, additive, backend, device):
    make, is_causal = MASKS[mask_name]
    mask = make(3, 11, 19)
    if additive:
        mask = _additive(mask, dtype)
    q, k, v = _inputs(3, 2, 2, 11, 19, 32, dtype, seed=3, device=device)
    _compare(q, k, v, mask, is_causal, gqa=False, backend=backend)


@pytest.mark.parametrize("Hq,Hk", [(8, 2), (6, 1), (4, 4)])
@pytest.mark.parametrize("mask_name", ["none", "is_causal", "padded_causal", "window"])
def test_matches_sdpa_gqa(Hq, Hk, mask_name, backend, device):
    make, is_causal = MASKS[mask_name]
    q, k, v = _inputs(3, Hq, Hk, 9, 12, 8, torch.float32, seed=Hq, device=device)
    _compare(q, k, v, make(3, 9, 12), is_causal, gqa=True, backend=backend)


def test_mqa_broadcasts_without_enable_gqa(backend, device):
    q, k, v = _inputs(2, 4, 1, 5, 6, 8, torch.float32, seed=1, device=device)
    _compare(q, k, v, None, True, gqa=False, backend=backend)


def test_scale(backend, device):
    q, k, v = _inputs(2, 2, 2, 7, 13, 8, torch.float64, seed=2, device=device)
    _compare(q, k, v, MASKS["padded_window"][0](2, 7, 13), False, gqa=False,
             backend=backend, scale=0.3)


def test_fully_masked_rows_give_zero_and_zero_gradients_like_sdpa(backend, device):
    # Bottom-right causal with Sq > Sk: the first Sq - Sk queries see no key.
    q, k, v = _inputs(1, 2, 2, 6, 3, 8, torch.float32, seed=4, device=device)
    mask = _band(1, 6, 3, causal="br").to(device)
    out = attnkit.sdpa(q, k, v, attn_mask=mask, backend=backend)
    ref = F.scaled_dot_product_attention(*(t.cpu() for t in (q, k, v)), attn_mask=mask.cpu())
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert torch.equal(ref[:, :, :3], torch.zeros_like(ref[:, :, :3]))  # this torch's SDPA
    out.sum().backward()
    assert torch.equal(q.grad[:, :, :3], torch.zeros_like(q.grad[:, :, :3]))
    assert not torch.isnan(q.grad).any() and not torch.isnan(k.grad).any()


@pytest.mark.parametrize("shape", ["3d", "5d", "key_batch_1"])
def test_other_layouts(shape, backend):
    g = torch.Generator().manual_seed(5)
    if shape == "3d":
        q, k, v = (torch.randn(3, n, 8, generator=g) for n in (5, 7, 7))
        mask = _band(3, 5, 7, causal="br")[:, 0]
    elif shape == "5d":
        q, k, v = (torch.randn(2, 3, 2, n, 8, generator=g) for n in (5, 7, 7))
        mask = _band(1, 5, 7, causal="tl")[0]
    else:
        q = torch.randn(3, 2, 5, 8, generator=g)
        k, v = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(2))
        mask = None
    got = attnkit.sdpa(q, k, v, attn_mask=mask, backend=backend)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_transposed_bshd_inputs(backend):
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, n, 4, 16, generator=g).transpose(1, 2) for n in (9, 9, 9))
    torch.testing.assert_close(attnkit.sdpa(q, k, v, is_causal=True, backend=backend),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               atol=2e-5, rtol=1e-5)


def test_empty_problems(backend):
    q, k, v = _inputs(2, 2, 2, 0, 5, 8, torch.float32, seed=0)
    assert attnkit.sdpa(q, k, v, attn_mask=torch.ones(0, 5, dtype=torch.bool),
                        backend=backend).shape == q.shape
    q, k, v = _inputs(2, 2, 2, 4, 0, 8, torch.float32, seed=0)
    out = attnkit.sdpa(q, k, v, is_causal=True, backend=backend)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_compiles_whole_without_a_mask_and_with_a_break_with_one():
    q, k, v = _inputs(1, 2, 2, 3, 5, 8, torch.float32, seed=8)
    mask = _band(1, 3, 5, causal="br")

    def call(q, k, v, **kw):
        return attnkit.sdpa(q, k, v, backend="reference", **kw)

    whole = torch.compile(call, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(whole(q, k, v, is_causal=True), call(q, k, v, is_causal=True))
    broken = torch.compile(call, backend="aot_eager")  # the mask is read on the host
    torch.testing.assert_close(broken(q, k, v, attn_mask=mask), call(q, k, v, attn_mask=mask))


# -- what reaches attention: structure, nothing dense ----------------------------------------

def _options_seen(monkeypatch, *args, **kwargs):
    seen = {}

    def spy(q, k, v, **options):
        seen.update(options, q=q, k=k, v=v)
        return torch.zeros_like(q)

    monkeypatch.setattr(attnkit.dropin, "attention", spy)
    attnkit.sdpa(*args, **kwargs)
    return seen


@pytest.mark.parametrize("Sq,Sk,expect", [
    (5, 5, dict(causal=True, window=None, k_len=5)),
    (3, 8, dict(causal=True, window=None, k_len=3)),   # keys past Sq sliced off, not read
    (8, 3, dict(causal=False, window=(-1, 5), k_len=3)),
])
def test_is_causal_becomes_a_band(monkeypatch, Sq, Sk, expect):
    q, k, v = _inputs(1, 1, 1, Sq, Sk, 4, torch.float32, seed=0)
    seen = _options_seen(monkeypatch, q, k, v, is_causal=True)
    assert seen["causal"] == expect["causal"] and seen.get("window") == expect["window"]
    assert seen["k"].shape[2] == expect["k_len"] and seen.get("seqlens_k") is None
    assert seen["k"].data_ptr() == k.data_ptr()  # a view, no copy


@pytest.mark.parametrize("mask,expect", [
    (_band(2, 4, 6, causal="tl"), (True, (-1, -1), 4, None)),
    (_band(2, 4, 6, causal="br"), (True, (-1, -1), 6, None)),
    (_band(2, 4, 6, causal="br", left=2), (True, (2, -1), 6, None)),
    (_band(2, 4, 6, left=1, right=2), (False, (1, 2), 6, None)),
    (_band(2, 1, 6, lengths=[6, 2]), (False, (-1, -1), 6, [6, 2])),
    (_band(2, 4, 6, causal="br", lengths=[3, 5]), (True, (-1, -1), 5, [3, 5])),
    (_band(2, 1, 6, lengths=[2, 2]), (False, (-1, -1), 2, None)),
    (torch.zeros(2, 1, 4, 6, dtype=torch.bool), (False, (-1, -1), 0, None)),
])
def test_mask_structure(mask, expect):
    m = broadcast_mask(mask, 2, 3, 4, 6, torch.float32)
    found = mask_structure(m, 2, 4)
    causal, window, limit, seqlens = found
    assert (causal, window or (-1, -1), limit) == expect[:3]  # None: unbounded
    assert (None if seqlens is None else seqlens.tolist()) == expect[3]
    additive = mask_structure(broadcast_mask(_additive(mask, torch.float32), 2, 3, 4, 6,
                                             torch.float32), 2, 4)
    assert additive[:3] == found[:3]


# -- refusals ----------------------------------------------------------------------------------

def test_refuses_masks_it_cannot_express():
    q, k, v = _inputs(2, 2, 2, 4, 6, 8, torch.float32, seed=0)
    left_padding = ~_band(2, 1, 6, lengths=[0, 2])  # keys 0 and 1 masked in batch 1
    left_padding[0] = True
    hole = torch.ones(4, 6, dtype=torch.bool)
    hole[:, 3] = False
    bias = torch.randn(4, 6)
    nan_mask = torch.zeros(4, 6)
    nan_mask[1, 1] = float("nan")
    per_head = _band(2, 4, 6, causal="br").repeat(1, 2, 1, 1)
    per_head[:, 1] = True
    for mask in (left_padding, hole, bias, nan_mask):
        with pytest.raises(ValueError, match=r"attn_mask \(shape .* is not a mask attnkit "
                                             r"computes.*scaled_dot_product_attention"):
            attnkit.sdpa(q, k, v, attn_mask=mask)
    with pytest.raises(ValueError, match="differs between heads"):
        attnkit.sdpa(q, k, v, attn_mask=per_head)
    # The same values in every head, materialised (as .to(device) or .contiguous() leave an
    # expanded mask): read as one mask, as SDPA computes it.
    same = _band(2, 4, 6, causal="br").repeat(1, 2, 1, 1)
    torch.testing.assert_close(attnkit.sdpa(q, k, v, attn_mask=same, backend="reference"),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=same))


def test_refusals_name_what_is_wrong():
    q, k, v = _inputs(2, 4, 2, 4, 6, 8, torch.float32, seed=0)
    mask = _band(2, 4, 6, causal="br")
    with pytest.raises(ValueError, match="not both"):
        attnkit.sdpa(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        attnkit.sdpa(q, k, v)
    with pytest.raises(ValueError, match="head dim"):
        attnkit.sdpa(q, k, v[..., :4], enable_gqa=True)
    with pytest.raises(ValueError, match=r"does not broadcast.*\(2, 4, 4, 6\)"):
        attnkit.sdpa(q, k, v, attn_mask=torch.ones(3, 6, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(TypeError, match="int64"):
        attnkit.sdpa(q, k, v, attn_mask=torch.ones(4, 6, dtype=torch.int64), enable_gqa=True)
    with pytest.raises(ValueError, match="requires grad"):
        attnkit.sdpa(q, k, v, attn_mask=torch.zeros(4, 6, requires_grad=True),
                     enable_gqa=True)


# -- the host-overhead measurement -------------------------------------------------------------

def test_overhead_rows_for_every_contender_and_case():
    from attnkit.bench.dropin import CASES, format_rows, sdpa_overhead

    rows = sdpa_overhead("cpu", calls=1, batches=1, backend="reference")
    assert [(r.case, r.contender) for r in rows] == [
        (c.name, n) for c in CASES for n in ("torch sdpa", "attnkit.attention", "attnkit.sdpa")]
    assert all(r.error == "" and r.host_us > 0 for r in rows), [r for r in rows if r.error]
    assert "attnkit.sdpa" in format_rows(rows)
    failing = sdpa_overhead("cpu", cases=CASES[:1], calls=1, batches=1, backend="no-such")
    assert [bool(r.error) for r in failing] == [False, True, True]


def readme_snippet(section: str) -> str:
    """The first python block of a README section, as a reader would copy it."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = text[text.index(f"## {section}"):]
    body = body[:body.index("\n## ", 1)]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_readme_snippet_runs():
    if not _auto_backend_on_cpu():  # the snippet calls attnkit.sdpa as a user would
        pytest.skip("no backend attnkit picks on this CPU (the core's tests install none)")
    exec(compile(readme_snippet("Drop-in for `scaled_dot_product_attention`"), "README", "exec"),
         {})


def test_dropout_reaches_attention():
    """dropout_p is attention's: the same seed drops the same elements."""
    q, k, v = _inputs(2, 4, 2, 4, 6, 8, torch.float32, seed=0)
    torch.manual_seed(3)
    got = attnkit.sdpa(q, k, v, dropout_p=0.3, enable_gqa=True, backend="reference")
    torch.manual_seed(3)
    want = attnkit.attention(q, k, v, dropout_p=0.3, backend="reference")
    assert torch.equal(got, want)
    assert not torch.equal(got, attnkit.sdpa(q, k, v, enable_gqa=True, backend="reference"))


def test_mask_structure_read_once_per_mask_until_modified(monkeypatch):
    """A model passes one mask to every layer: its structure (a device sync) is read once,
    and again only after an in-place change; a freed mask's entry goes with it."""
    import attnkit.masks as masks

    reads = []
    real = masks.mask_structure
    monkeypatch.setattr(masks, "mask_structure", lambda *a: reads.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = _band(2, 5, 5, lengths=[5, 3]).clone()
    for _ in range(3):
        got = attnkit.sdpa(q, k, v, attn_mask=mask, backend="reference")
    assert len(reads) == 1
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    mask[1, ..., 3:] = True  # in place: batch 1 now sees every key
    got = attnkit.sdpa(q, k, v, attn_mask=mask, backend="reference")
    assert len(reads) == 2
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    other = mask.clone()  # same values, another tensor: read afresh
    attnkit.sdpa(q, k, v, attn_mask=other, backend="reference")
    assert len(reads) == 3
    ident = id(other)
    del other
    assert ident not in masks._cache
