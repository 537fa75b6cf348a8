"""Paged KV caches in the core: input errors, validation before writing (host and device
modes), append_paged, the gather the dense backends use, selection, and wrong paged backends
the conformance suite catches."""

import pytest
import torch
from wrong_backends import _masked_softmax_times_v

import attnkit
from attnkit.backend import Capabilities
from attnkit.paged import gather_pages
from attnkit.reference_backend import ReferenceBackend
from attnkit.registry import NoBackendError, registry
from attnkit.testing.paged_cases import spoil_table
from attnkit.testing.runner import suite_files


def _inputs(P=4, N=8, D=16, Hkv=2, Hq=4, B=2, lens=(6, 3), s_new=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    kp = torch.randn(N, Hkv, P, D, generator=g, dtype=dtype)
    vp = torch.randn(N, Hkv, P, D, generator=g, dtype=dtype)
    table = torch.tensor([[5, 2, -1], [0, 7, -1]], dtype=torch.int32)[:B]
    q = torch.randn(B, Hq, max(s_new, 1), D, generator=g, dtype=dtype)
    new = [torch.randn(B, Hkv, s_new, D, generator=g, dtype=dtype) for _ in range(2)]
    return q, kp, vp, table, torch.tensor(lens[:B], dtype=torch.int32), new


def _call(q, kp, vp, table, lens, new, **kw):
    kw.setdefault("backend", "reference")
    return attnkit.attention_with_kvcache(q, kp, vp, lens, *new, block_table=table, **kw)


def test_matches_contiguous_cache():
    q, kp, vp, table, lens, new = _inputs(s_new=2, lens=(3, 4))
    q2 = torch.randn(2, 4, 2, 16)
    out, lse = _call(q2, kp, vp, table, lens, new, return_lse=True)
    kc = gather_pages(kp, table, lens + 2, 12).contiguous()
    vc = gather_pages(vp, table, lens + 2, 12).contiguous()
    ref, ref_lse = attnkit.attention(q2, kc, vc, causal=True, seqlens_k=lens + 2,
                                     return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    # The appended positions landed at offset 3 of page 5 and offset 0 of page 2, ...
    assert torch.equal(kp[5, :, 3], new[0][0, :, 0]) and torch.equal(kp[2, :, 0],
                                                                     new[0][0, :, 1])


def test_gather_pages_zero_past_each_sequence():
    kp = torch.full((3, 1, 2, 4), float("nan"))
    kp[1, :, 0] = 1.0
    kp[0, :, :] = 2.0
    table = torch.tensor([[1, -1], [0, 1]], dtype=torch.int32)
    got = gather_pages(kp, table, torch.tensor([1, 3]), 4)
    assert got.shape == (2, 1, 4, 4) and not got.isnan().any()
    assert got[0, 0, :, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert got[1, 0, :, 0].tolist() == [2.0, 2.0, 1.0, 0.0]


@pytest.mark.parametrize("validate", ["host", "device"])
@pytest.mark.parametrize("defect, message", [
    ("negative", "entry \\[0, 1\\] = -1 is needed"),
    ("outside", "entry \\[1, 0\\] = 8 is needed"),
    ("overflow", "paged KV cache overflow: sequence 0 holds 12"),
    ("same_slot", "appended to by two sequences"),
    ("negative_fill", "sequence 1 has -2"),
])
def test_bad_tables_refused_before_writing(defect, message, validate):
    q, kp, vp, table, lens, new = _inputs()
    if defect == "overflow":
        lens[0] = 12
    else:
        spoil_table(table, lens, defect, num_pages=kp.shape[0], fill=-2)
    before = kp.clone(), vp.clone()
    # validate="device" is torch._assert_async: on CPU it raises at once, without the detail.
    error, match = ((ValueError, message + ".*nothing was written") if validate == "host"
                    else (RuntimeError, "paged KV cache"))
    with pytest.raises(error, match=match):
        _call(q, kp, vp, table, lens, new, validate=validate)
    with pytest.raises(error, match=match):
        attnkit.append_paged(kp, vp, table, lens, *new, validate=validate)
    assert torch.equal(kp, before[0]) and torch.equal(vp, before[1])


def test_unneeded_entries_never_read():
    q, kp, vp, table, lens, new = _inputs()
    table[:, 2] = torch.tensor([1 << 30, -7])  # past what either sequence needs
    out = _call(q, kp, vp, table, lens, new)
    assert not out.isnan().any()


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(table=a["table"].long()), "block_table .*must have dtype torch.int32"),
    (lambda a: a.update(table=a["table"][:1]), "block_table .*must have shape \\(B=2"),
    (lambda a: a.update(kp=a["kp"][:, :1]), "must have the same shape \\(num_pages"),
    (lambda a: a.update(kp=a["kp"][..., :8], vp=a["vp"][..., :8]), "D=16\\) to match q"),
    (lambda a: a.update(kp=a["kp"][:, :, :0], vp=a["vp"][:, :, :0]), "page size"),
    (lambda a: a.update(kp=a["kp"].half(), vp=a["vp"].half()), "share one dtype"),
    (lambda a: a.update(validate="later"), "validate must be one of"),
])
def test_input_errors_name_the_tensor(change, message):
    q, kp, vp, table, lens, new = _inputs()
    a = dict(q=q, kp=kp, vp=vp, table=table, lens=lens, validate="host")
    change(a)
    with pytest.raises((TypeError, ValueError), match=message):
        attnkit.attention_with_kvcache(a["q"], a["kp"], a["vp"], a["lens"], *new,
                                       block_table=a["table"], validate=a["validate"],
                                       backend="reference")


def test_refusal_by_a_backend_without_paged_writes_nothing():
    class Dense(ReferenceBackend):
        name = "dense-only-for-paged-test"
        capabilities = Capabilities(devices=frozenset({"cpu"}),
                                    dtypes=frozenset({torch.float32}))

    registry.register(Dense(), priority=None, plugin="tests")
    try:
        q, kp, vp, table, lens, new = _inputs()
        before = kp.clone()
        with pytest.raises(NoBackendError, match="paged KV caches"):
            _call(q, kp, vp, table, lens, new, backend="dense-only-for-paged-test")
        assert torch.equal(kp, before)
    finally:
        registry.unregister("dense-only-for-paged-test")


def test_empty_batch_and_empty_table():
    q, kp, vp, table, lens, new = _inputs()
    out, lse = _call(q[:0], kp, vp, table[:0], lens[:0], [t[:0] for t in new],
                     return_lse=True)
    assert out.shape == (0, 4, 1, 16) and lse.shape == (0, 4, 1)
    # No pages at all, nothing filled, nothing appended: every row sees no key.
    out, lse = _call(q, kp, vp, table[:, :0].contiguous(), torch.zeros(2, dtype=torch.int32),
                     [None, None], return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_grad_refused_and_autocast_casts_nothing():
    q, kp, vp, table, lens, new = _inputs()
    with pytest.raises(RuntimeError, match="forward only"):
        _call(q.requires_grad_(), kp, vp, table, lens, new)
    q = q.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _call(q, kp, vp, table, lens, new)
    assert out.dtype == torch.float32


def test_transposed_pool_layout():
    """A (num_pages, page_size, Hkv, D) pool passed as .transpose(1, 2) is written and read in
    place."""
    q, kp, vp, table, lens, new = _inputs()
    kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (kp, vp))
    a = _call(q, kp, vp, table, lens, new)
    b = _call(q, kt, vt, table, lens, new)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(kp, kt) and torch.equal(vp, vt)


def test_merge_with_a_contiguous_suffix():
    """A paged prefix and a contiguous suffix merge to attention over their union."""
    q, kp, vp, table, lens, _ = _inputs(s_new=0)
    q = torch.randn(2, 4, 1, 16)
    suffix_k, suffix_v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    o1, l1 = _call(q, kp, vp, table, lens, [None, None], causal=False, return_lse=True)
    o2, l2 = attnkit.attention(q, suffix_k, suffix_v, return_lse=True, backend="reference")
    out, lse = attnkit.merge_attention([o1, o2], [l1, l2])
    kc = torch.cat([gather_pages(kp, table, lens, 6), suffix_k], 2)
    vc = torch.cat([gather_pages(vp, table, lens, 6), suffix_v], 2)
    # Sequence 1 has 3 cached keys: its row of kc holds them, 3 zero rows, then the suffix.
    keep = torch.tensor([[True] * 11, [True] * 3 + [False] * 3 + [True] * 5])
    for b in range(2):
        ref = attnkit.attention(q[b:b + 1], kc[b:b + 1, :, keep[b]], vc[b:b + 1, :, keep[b]],
                                backend="reference")
        torch.testing.assert_close(out[b:b + 1], ref)


# -- wrong paged backends the suite catches -------------------------------------------------

_PAGED_CAPS = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                           head_dim_max=256, paged=True)


class PagedIgnoresTable(ReferenceBackend):
    """Assumes each sequence's pages follow one another from page b * max_pages."""

    name = "wrong-paged-ignores-table"
    capabilities = _PAGED_CAPS

    def forward_paged(self, problem, q, k_pages, v_pages, block_table, seqlens_k):
        B, M = block_table.shape
        ordered = (torch.arange(B * M, dtype=torch.int32) % k_pages.shape[0]).view(B, M)
        return super().forward_paged(problem, q, k_pages, v_pages, ordered, seqlens_k)


class PagedWholePagesTimesZero(ReferenceBackend):
    """Reads every slot of each needed page and hides the unfilled ones by multiplying by 0:
    right on clean pools, NaN from the poisoned slots past a sequence's keys."""

    name = "wrong-paged-whole-pages"
    capabilities = _PAGED_CAPS

    def forward_paged(self, problem, q, k_pages, v_pages, block_table, seqlens_k):
        pages = block_table.long().clamp(0, k_pages.shape[0] - 1)
        k, v = (p[pages].permute(0, 2, 1, 3, 4).flatten(2, 3) for p in (k_pages, v_pages))
        return _masked_softmax_times_v(problem, q, k, v, seqlens_k)


class PagedZeroesFreeSlots(ReferenceBackend):
    """Tidies the pools: writes zeros into the slots past each sequence's keys."""

    name = "wrong-paged-writes-pool"
    capabilities = _PAGED_CAPS

    def forward_paged(self, problem, q, k_pages, v_pages, block_table, seqlens_k):
        k_pages.nan_to_num_(0.0)
        return super().forward_paged(problem, q, k_pages, v_pages, block_table, seqlens_k)


@pytest.mark.parametrize("wrong, expected", [
    (PagedIgnoresTable, "*AssertionError: out: *"),
    (PagedWholePagesTimesZero, "*out: * NaN value(s)*"),
    (PagedZeroesFreeSlots, "*backend forward_paged wrote into its input k_pages*"),
])
def test_suite_catches_wrong_paged_backend(pytester, wrong, expected):
    backend = wrong()
    registry.register(backend, priority=None, plugin="tests")
    try:
        result = pytester.runpytest_inprocess(
            *suite_files(), "-p", "attnkit.testing.plugin",
            f"--attnkit-backend={backend.name}", "--attnkit-quick", "-p", "no:cacheprovider",
            "-k", "paged")
    finally:
        registry.unregister(backend.name)
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) > 0, f"{backend.name} passed the suite: {outcomes}"
    result.stdout.fnmatch_lines([expected])


def test_suite_passes_reference_paged(pytester):
    result = pytester.runpytest_inprocess(
        *suite_files(), "-p", "attnkit.testing.plugin", "--attnkit-backend=reference",
        "--attnkit-quick", "-p", "no:cacheprovider", "-k", "paged")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) > 20 and outcomes.get("failed", 0) == 0, outcomes
    result.stdout.fnmatch_lines(["*forward_paged *"])


def test_paged_serving_example_matches_recompute():
    import pathlib
    import runpy

    root = pathlib.Path(__file__).resolve().parents[1]
    mod = runpy.run_path(str(root / "examples" / "paged_serving.py"))
    for page_size in (1, 4, 5):
        assert mod["main"](backend="reference", page_size=page_size, steps=3,
                           verbose=False) < 1e-4


def test_a_repeated_signature_still_checks_the_values():
    """The per-signature cache keeps shape checks, never the fill levels or the entries."""
    q, kp, vp, table, lens, new = _inputs()
    _call(q, kp, vp, table, lens, new)
    bad = table.clone()
    bad[0, 1] = 99
    before = kp.clone()
    with pytest.raises(ValueError, match="entry \\[0, 1\\] = 99"):
        _call(q, kp, vp, bad, lens, new)
    with pytest.raises(ValueError, match="overflow"):
        _call(q, kp, vp, table, lens + 6, new)
    assert torch.equal(kp, before)


class PagedWithoutWindowOrSoftcap(ReferenceBackend):
    name = "paged-no-window-softcap"
    capabilities = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                                head_dim_max=256, paged=True, window=False, softcap=False)


def test_suite_checks_refusals_of_a_partial_paged_backend(pytester):
    """A paged backend that does not declare windows or softcap passes: those cases are
    checked to be refused (nothing written), the others computed."""
    backend = PagedWithoutWindowOrSoftcap()
    registry.register(backend, priority=None, plugin="tests")
    try:
        result = pytester.runpytest_inprocess(
            *suite_files(), "-p", "attnkit.testing.plugin",
            f"--attnkit-backend={backend.name}", "--attnkit-quick", "-p", "no:cacheprovider",
            "-k", "paged_step", "-rs")
    finally:
        registry.unregister(backend.name)
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("passed", 0) > 10, outcomes
    result.stdout.fnmatch_lines(["*refused as declared: a sliding window not supported*",
                                 "*refused as declared: softcap not supported*"],
                                consecutive=False)
