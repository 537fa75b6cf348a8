"""Conformance of a backend's part in context parallelism (`attnkit.distributed`), in one
process: every rank's blocks of a ring over 2, 3 and 4 ranks (`simulate_ring`), for both layouts
and both ways of moving K/V. The blocks are calls no other case makes: queries against keys
of a shifted window, causal diagonals whose key block is longer than the query block, and
backward calls given the *global* out and lse, of which the block saw only part. out, lse,
dq, dk and dv of the merged blocks against the reference under the accuracy rule.
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from attnkit.distributed.simulate import simulate_ring
from attnkit.testing import cases as _cases
from attnkit.testing.accuracy import GRAD_FACTOR, assert_close
from attnkit.testing.generate import parametrize_cases


def context_parallel_cases(caps, quick: bool = False) -> list[tuple]:
    """``(case, world, layout, comm)``: each declared mask feature under each layout; the
    sequence is a multiple of every 2P (48 quick, 96 full)."""
    if not caps.lse:
        return []
    base = replace(_cases.small_base(caps, quick), seqlen_q=48 if quick else 96,
                   seqlen_k=48 if quick else 96)
    variants = [replace(base, causal=caps.causal, **_cases.gqa_heads(caps, quick))]
    if caps.window:
        variants.append(replace(base, window=(13, 5)))
        if caps.causal and not quick:
            variants.append(replace(base, window=(20, -1), causal=True))
    if caps.softcap and not quick:
        variants.append(replace(base, softcap=10.0, magnitude=2.0, causal=caps.causal))
    if quick:
        setups = [(2, "headtail", "p2p"), (3, "contiguous", "allgather")]
    else:
        setups = [(2, lay, comm) for lay in ("headtail", "contiguous")
                  for comm in ("p2p", "allgather")]
        setups += [(3, "headtail", "p2p"), (4, "headtail", "p2p"), (4, "contiguous", "allgather")]
    out = []
    for n, (world, layout, comm) in enumerate(setups):
        for variant in (variants if not quick else variants[n % len(variants):][:1]):
            out.append((replace(variant, tag=f"cp{world}-{layout}-{comm}"), world, layout, comm))
    return out


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, {"cp_case": context_parallel_cases})


def test_ring_blocks_merge_to_one_call(cp_case, backend, backend_name, device):
    case, world, layout, comm = cp_case
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, _ = case.make_inputs(device, gen)
    dout = torch.randn(q.shape, generator=gen).to(device, q.dtype) if case.grad else None
    opts = {key: val for key, val in case.options(None).items() if key != "seqlens_k"}
    out, lse, grads = simulate_ring(q, k, v, dout, world=world, layout=layout, comm=comm,
                                    backend=backend_name, **opts)
    where = f"[seed {seed}] {case.id} over {world} ranks, {layout}, {comm}"
    if dout is None:
        dout = torch.zeros_like(q)
    ref64 = case.reference(q, k, v, None, torch.float64, dout, case.grad)
    ref_lp = case.reference(q, k, v, None, q.dtype, dout, case.grad)
    assert_close(f"{where} out", out, ref64[0], ref_lp[0], q.dtype)
    assert_close(f"{where} lse", lse, ref64[1], ref_lp[1], q.dtype)
    if grads is None:
        return
    saved = case.saved_state_grads(q, k, v, None, dout) or (None,) * 3
    for name, g, g64, glp, gs in zip("qkv", grads, ref64[2], ref_lp[2], saved):
        assert_close(f"{where} d{name}", g, g64, (glp, gs), q.dtype, factor=GRAD_FACTOR)
