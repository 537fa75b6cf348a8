"""Conformance of gradients through lse, for backends that declare
``Capabilities.lse_grad`` (``backward(..., dlse=...)``; others are skipped, saying so).

- A loss on both out and lse: dq, dk, dv against the reference's under the accuracy rule,
  with dlse holding values on rows that see no key too (their gradients stay 0).
- `attnkit.merge_attention` of the keys split into 2 to 8 parts, where the merged out
  reaches each part through its lse: dq, dk, dv are those of one call over all keys, under
  the rule.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

import attnkit
from attnkit import reference
from attnkit.testing import cases as _cases
from attnkit.testing.accuracy import GRAD_FACTOR, assert_close
from attnkit.testing.generate import parametrize_cases

#: Key splits of the merge check (quick: the fewest and the most).
PARTS = (2, 3, 5, 8)
PARTS_QUICK = (2, 8)


#: The cases: one per declared feature a kernel takes a different path for.
lse_grad_cases = _cases.feature_variants


def merge_parts_cases(caps, quick: bool = False) -> list[tuple[_cases.Case, int]]:
    """Non-causal (a causal mask does not split into causal parts), with ``seqlens_k`` where
    declared: batch 0 sees no key, so every part's rows there are empty."""
    base = replace(_cases.small_base(caps, quick), batch=3, **_cases.gqa_heads(caps, quick),
                   seqlens_k="mixed" if caps.seqlens_k else None)
    return [(replace(base, tag=f"parts{p}"), p) for p in (PARTS_QUICK if quick else PARTS)]


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, {"lse_grad_case": lse_grad_cases,
                                 "merge_parts": merge_parts_cases})


def _require_lse_grad(backend):
    caps = backend.capabilities
    if not getattr(caps, "lse_grad", False):
        pytest.skip(f"backend {backend.name!r} does not declare lse_grad")
    if not (caps.lse and caps.backward):
        pytest.skip(f"backend {backend.name!r} declares lse_grad without lse and backward")


def _references(case, q, k, v, seqlens_k, dout, dlse, out, lse):
    """Per gradient: (ref64, (ref_lp, `Case.saved_state_grads`)) for a loss
    ``sum(out * dout) + sum(lse * dlse)``; dlse counts only on rows that see keys."""
    seen = ~case.masked_rows(seqlens_k).to(q.device).expand(dlse.shape)
    dlse = torch.where(seen, dlse, 0)
    opts = case.options(seqlens_k)

    def autograd_grads(dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
        with torch.enable_grad():
            out, lse = reference.safe(qq, kk, vv, **opts)
            return torch.autograd.grad((out, lse), (qq, kk, vv),
                                       (dout.to(dtype), dlse.to(lse.dtype)))

    ref64, ref_lp = autograd_grads(torch.float64), autograd_grads(q.dtype)
    saved = case.saved_state_grads(q, k, v, seqlens_k, dout, dlse, out, lse) or (None,) * 3
    return [(g64, (glp, gs)) for g64, glp, gs in zip(ref64, ref_lp, saved)]


def test_loss_on_out_and_lse(lse_grad_case, backend, backend_name, device):
    _require_lse_grad(backend)
    case = lse_grad_case
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, seqlens_k = case.make_inputs(device, gen)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out, lse = attnkit.attention(q, k, v, **case.options(seqlens_k), return_lse=True,
                                 backend=backend_name)
    dout = torch.randn(q.shape, generator=gen).to(device, q.dtype)
    dlse = torch.randn(lse.shape, generator=gen).to(device, lse.dtype)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    where = f"[seed {seed}] {case.id}"
    refs = _references(case, q, k, v, seqlens_k, dout, dlse, out, lse)
    for name, g, (g64, glp) in zip("qkv", grads, refs):
        assert_close(f"{where} d{name}", g, g64, glp, q.dtype, factor=GRAD_FACTOR)
    masked = case.masked_rows(seqlens_k).to(device).expand(q.shape[:3])
    if masked.any():
        assert (grads[0][masked] == 0).all(), \
            f"{where}: rows that see no key need dq == 0, whatever dlse holds there"


def test_merge_of_key_splits(merge_parts, backend, backend_name, device):
    """Partials over 2..8 disjoint key ranges, merged; gradients reach every part through
    its out and its lse."""
    _require_lse_grad(backend)
    case, parts = merge_parts
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, seqlens_k = case.make_inputs(device, gen)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    Sk = case.seqlen_k
    cuts = sorted(random.Random(seed).sample(range(1, Sk), parts - 1))
    bounds = [0, *cuts, Sk]
    outs, lses = [], []
    for a, z in zip(bounds[:-1], bounds[1:]):
        lens = None if seqlens_k is None else (seqlens_k - a).clamp(0, z - a).to(torch.int32)
        o, lse = attnkit.attention(q, k[:, :, a:z], v[:, :, a:z], **case.options(lens),
                                   return_lse=True, backend=backend_name)
        outs.append(o)
        lses.append(lse)
    out, _ = attnkit.merge_attention(outs, lses)
    dout = torch.randn(q.shape, generator=gen).to(device, q.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref64 = case.reference(q, k, v, seqlens_k, torch.float64, dout)
    ref_lp = case.reference(q, k, v, seqlens_k, q.dtype, dout)
    saved = case.saved_state_grads(q, k, v, seqlens_k, dout) or (None,) * 3
    where = f"[seed {seed}] {case.id} keys split at {cuts}"
    for name, g, g64, glp, gs in zip("qkv", grads, ref64[2], ref_lp[2], saved):
        assert_close(f"{where} d{name}", g, g64, (glp, gs), q.dtype, factor=GRAD_FACTOR)
