"""Conformance: paged KV caches (`attnkit.attention_with_kvcache(..., block_table=)`,
`attnkit.append_paged`), run against the backend under test.

Every case appends into page pools in place and attends, then checks: out and lse match the
reference over the same keys laid out contiguously (`paged_cases`: the pools are built from
contiguous caches); the pools changed in the appended slots and nowhere else, bit for bit
(NaN poison in every slot that holds no key included); ``cache_seqlens`` and the table are
untouched. A backend that does not declare ``paged`` must refuse every case before writing.
Bad tables (a needed entry negative or outside the pool, too few pages, two sequences
appending into one slot, a negative fill level) are refused before anything is written.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import attnkit
from attnkit.paged import paged_problem
from attnkit.registry import NoBackendError
from attnkit.testing.accuracy import assert_close
from attnkit.testing.decode_cases import rand, reference_over_prefix
from attnkit.testing.device_refusal import DEFECTS, assert_refused
from attnkit.testing.generate import parametrize_cases
from attnkit.testing.paged_cases import (
    PagedCase,
    bits,
    paged_cases,
    small_paged_inputs,
    spoil_small_table,
)


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, {"paged_case": paged_cases})


def _unchanged(inputs, kp, vp, what):
    assert torch.equal(bits(inputs.k_pages), bits(kp)) and torch.equal(
        bits(inputs.v_pages), bits(vp)), what


@pytest.mark.parametrize("validate", ["host", "device"])
def test_paged_step(paged_case, validate, backend, backend_name, device):
    """Append into pages, attend; pools, fill levels, table and results as specified, with
    the values checked on the host or on the device (where a backend declaring
    ``paged_checks`` may check and append itself, `Backend.append_paged`)."""
    c = paged_case
    gen = torch.Generator().manual_seed(zlib.crc32(c.id.encode()))
    x = c.make_inputs(device, gen)
    lens = torch.tensor(x.levels, dtype=torch.int32, device=device)
    lens_before, table_before = lens.clone(), x.block_table.clone()
    kp_before, vp_before = x.k_pages.clone(), x.v_pages.clone()
    lse_wanted = backend.capabilities.lse
    opts = dict(block_table=x.block_table, causal=c.causal, window=c.window, softcap=c.softcap,
                return_lse=lse_wanted, backend=backend_name, validate=validate)
    problem = paged_problem(x.q, x.k_pages, x.block_table, causal=c.causal, window=c.window,
                            softcap=c.softcap, return_lse=lse_wanted)
    reasons = backend.not_supported_reasons(problem)
    if reasons:
        with torch.no_grad(), pytest.raises(NoBackendError):
            attnkit.attention_with_kvcache(x.q, x.k_pages, x.v_pages, lens, x.k_new, x.v_new,
                                           **opts)
        _unchanged(x, kp_before, vp_before, "a refused call wrote a pool")
        pytest.skip(f"refused as declared: {'; '.join(reasons)}")
    expect_kp, expect_vp, kc, vc = x.expected_after_append()
    with torch.no_grad():
        res = attnkit.attention_with_kvcache(x.q, x.k_pages, x.v_pages, lens, x.k_new,
                                             x.v_new, **opts)
    out, lse = res if lse_wanted else (res, None)
    assert torch.equal(lens, lens_before), "cache_seqlens was modified"
    assert torch.equal(x.block_table, table_before), "block_table was modified"
    _unchanged(x, expect_kp, expect_vp,
               "the pools differ from the expected ones outside (or in) the appended slots")
    lengths = [L + c.s_new for L in x.levels]
    (o64, l64), (olp, llp) = reference_over_prefix(x.q, kc, vc, lengths, c, c.dtype)
    assert out.dtype == c.dtype and tuple(out.shape) == tuple(x.q.shape)
    assert_close("out", out, o64, olp, c.dtype, 2.0)
    if lse is not None:
        assert_close("lse", lse, l64, llp, c.dtype, 2.0)


@pytest.mark.parametrize("defect", ["negative", "outside", "too_few", "same_slot",
                                    "negative_fill"])
def test_paged_bad_table_refused(defect, backend, backend_name, device):
    """Each defect raises ValueError before anything is written (validate="host")."""
    if not backend.capabilities.paged:
        pytest.skip("the backend does not declare paged (refusal: test_paged_step)")
    q, (kp, vp), table, lens, (kn, vn) = small_paged_inputs(backend.capabilities, device)
    table, lens = spoil_small_table(table, lens, defect, kp.shape[0])
    before = kp.clone(), vp.clone()
    with torch.no_grad(), pytest.raises(ValueError, match="nothing was written"):
        attnkit.attention_with_kvcache(q, kp, vp, lens, kn, vn, block_table=table,
                                       causal=backend.capabilities.causal,
                                       backend=backend_name)
    assert torch.equal(bits(kp), bits(before[0])) and torch.equal(bits(vp), bits(before[1]))
    with torch.no_grad(), pytest.raises(ValueError, match="nothing was written"):
        attnkit.append_paged(kp, vp, table, lens, kn, vn)
    assert torch.equal(bits(kp), bits(before[0])) and torch.equal(bits(vp), bits(before[1]))


@pytest.mark.parametrize("kind, defect", [(k, d) for k in ("paged", "paged_append")
                                           for d in DEFECTS[k]])
def test_paged_bad_table_stops_a_device_check(kind, defect, backend, backend_name, device):
    """validate="device", a call that appends nothing (a decoding step) or one token per
    sequence: a needed entry outside the pool, a fill level outside the row's capacity or
    two sequences appending into one slot stops the call, whether the core queues the check
    or the backend makes it (``Capabilities.paged_checks``, `Backend.append_paged`); on CUDA
    in a child process (`attnkit.testing.device_refusal`)."""
    if not backend.capabilities.paged:
        pytest.skip("the backend does not declare paged (refusal: test_paged_step)")
    assert_refused(kind, backend, backend_name, defect, device)


def test_append_paged_then_attend(backend, backend_name, device):
    """`append_paged` then an attend-only call equals the call that appends and attends,
    bit for bit (one backend, one problem), and writes only the appended slots."""
    if not backend.capabilities.paged:
        pytest.skip("the backend does not declare paged (refusal: test_paged_step)")
    q, (kp, vp), table, lens, (kn, vn) = small_paged_inputs(backend.capabilities, device)
    kp2, vp2 = kp.clone(), vp.clone()
    with torch.no_grad():
        causal = backend.capabilities.causal
        both = attnkit.attention_with_kvcache(q, kp, vp, lens, kn, vn, block_table=table,
                                              causal=causal, backend=backend_name)
        attnkit.append_paged(kp2, vp2, table, lens, kn, vn)
        assert torch.equal(bits(kp), bits(kp2)) and torch.equal(bits(vp), bits(vp2))
        after = attnkit.attention_with_kvcache(q, kp2, vp2, lens + 1, block_table=table,
                                               causal=causal, backend=backend_name)
    assert torch.equal(both, after)


def test_paged_decoding_loop(backend, backend_name, device, quick):
    """An engine's loop: pages handed out as sequences grow, a prefix page shared, several
    steps of one token, each checked against the reference over the contiguous keys."""
    caps = backend.capabilities
    if not caps.paged:
        pytest.skip("the backend does not declare paged (refusal: test_paged_step)")
    case = PagedCase(page_size=3, batch=3, heads_q=4 if caps.gqa else 2, heads_kv=2,
                     head_dim=max(caps.head_dim_min, min(32, caps.head_dim_max)),
                     dtype=next(d for d in (torch.float16, torch.bfloat16, torch.float32,
                                            torch.float64) if d in caps.dtypes),
                     max_len=8, s_new=0, pages="shared", causal=caps.causal)
    gen = torch.Generator().manual_seed(11)
    x = case.make_inputs(device, gen)
    B, Hkv, P, D = case.batch, case.heads_kv, case.page_size, case.head_dim
    steps = 3 if quick else 6
    n_pages = x.k_pages.shape[0] + B * (-(-steps // P) + 1)
    grow = [torch.full((n_pages - x.k_pages.shape[0], Hkv, P, D), float("nan"),
                       dtype=case.dtype, device=device) for _ in range(2)]
    kp, vp = (torch.cat([p, g]) for p, g in zip((x.k_pages, x.v_pages), grow))
    free = list(range(x.k_pages.shape[0], n_pages))
    levels = list(x.levels)
    cap = (max(levels) + steps) // P + 2
    table = torch.full((B, cap), -1, dtype=torch.int32)
    table[:, :x.block_table.shape[1]] = x.block_table.cpu()
    table[table >= x.k_pages.shape[0]] = -1  # the garbage entry of the inputs
    kc = torch.cat([x.k_contig, x.k_contig.new_zeros((B, Hkv, steps + P, D))], 2)
    vc = torch.cat([x.v_contig, x.v_contig.new_zeros((B, Hkv, steps + P, D))], 2)
    for step in range(steps):
        for b, L in enumerate(levels):
            if L % P == 0 and table[b, L // P] < 0:  # a fresh page for the next position
                table[b, L // P] = free.pop()
        dev_table = table.to(device)
        q = rand((B, case.heads_q, 1, D), case.dtype, device, gen)
        kn, vn = (rand((B, Hkv, 1, D), case.dtype, device, gen) for _ in range(2))
        lens = torch.tensor(levels, dtype=torch.int32, device=device)
        with torch.no_grad():
            out = attnkit.attention_with_kvcache(q, kp, vp, lens, kn, vn, block_table=dev_table,
                                                 causal=case.causal, backend=backend_name)
        for b, L in enumerate(levels):
            kc[b, :, L], vc[b, :, L] = kn[b, :, 0].cpu(), vn[b, :, 0].cpu()
        levels = [L + 1 for L in levels]
        (o64, _), (olp, _) = reference_over_prefix(q, kc, vc, levels, case, case.dtype)
        assert_close(f"step {step} out", out, o64, olp, case.dtype, 2.0)


def test_paged_pool_past_2_31(backend, backend_name, device):
    """On CUDA: K and V pools interleaved in one buffer of more than 2^31 elements, a
    sequence whose pages lie at both ends of it (offsets computed in 32 bits wrap)."""
    from attnkit.testing import cuda_checks

    if not device.startswith("cuda"):
        pytest.skip(f"CUDA only (device {device!r}): run with --device cuda")
    caps = backend.capabilities
    if not caps.paged:
        pytest.skip("the backend does not declare paged (refusal: test_paged_step)")
    dt = next(d for d in (torch.float16, torch.bfloat16, torch.float32) if d in caps.dtypes)
    P, Hkv, D = 16, 1, max(caps.head_dim_min, min(64, caps.head_dim_max))
    page = 2 * Hkv * P * D  # a K page and its V page, side by side
    n_pages = cuda_checks.PAST // page + 4
    cuda_checks._need(device, n_pages * page * torch.empty((), dtype=dt).element_size(),
                      "page pools past 2^31 elements")
    kv = torch.empty((n_pages, 2, Hkv, P, D), dtype=dt, device=device)
    k_pages, v_pages = kv[:, 0], kv[:, 1]
    table = torch.tensor([[n_pages - 1, 0, n_pages - 3]], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(0)
    L = 2 * P + 3
    kc, vc = (rand((1, Hkv, L, D), dt, "cpu", gen) for _ in range(2))
    for p in range(L):
        k_pages[int(table[0, p // P]), :, p % P] = kc[0, :, p].to(device)
        v_pages[int(table[0, p // P]), :, p % P] = vc[0, :, p].to(device)
    q = rand((1, 2 * Hkv if caps.gqa else Hkv, 1, D), dt, device, gen)
    with torch.no_grad():
        out = attnkit.attention_with_kvcache(
            q, k_pages, v_pages, torch.tensor([L], dtype=torch.int32, device=device),
            block_table=table, causal=caps.causal, backend=backend_name)
    torch.cuda.synchronize(device)
    out = out.cpu()
    del kv, k_pages, v_pages
    torch.cuda.empty_cache()
    (o64, _), (olp, _) = reference_over_prefix(q, kc, vc, [L], PagedCase(causal=caps.causal),
                                               dt)
    assert_close("out (pages past 2^31 elements)", out, o64, olp, dt, 2.0)
