"""The one-launch paged append (paged_append.py) under the interpreter: its writes against
the core's, and its check, run in its counting mode (the interpreter cannot trap), against
the core's host check on random tables with defects."""

from __future__ import annotations

import random

import pytest
import torch
from attnkit_triton import paged_append

from attnkit.paged import _write, check_table

pytestmark = pytest.mark.interpreter


def _case(rng: random.Random, defect: bool):
    B, M, P, Hkv, D, s_new = (rng.randint(1, 5), rng.randint(1, 6), rng.choice((1, 3, 4, 16)),
                              rng.randint(1, 2), rng.choice((8, 24)), rng.randint(1, 3))
    N = B * M + rng.randint(0, 3)
    cap = M * P
    s_new = min(s_new, cap)  # a row holds the append (else no values are checked)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    pools = [torch.randn(N, Hkv, P, D, generator=g) for _ in range(2)]
    table = torch.randperm(N, generator=g)[:B * M].to(torch.int32).view(B, M)
    lens = [rng.randint(0, max(cap - s_new, 0)) for _ in range(B)]
    if defect:
        what, b = rng.choice(("fill", "entry", "share")), rng.randrange(B)
        if what == "fill":
            lens[b] = rng.choice((-1, cap - s_new + 1, cap + 7))
        elif what == "entry":
            table[b, rng.randrange(M)] = rng.choice((-1, N, N + 5))
        elif B > 1:
            table[b] = table[(b + 1) % B]
            lens[b] = lens[(b + 1) % B]
    lens = torch.tensor(lens, dtype=rng.choice((torch.int32, torch.int64)))
    new = [torch.randn(B, Hkv, s_new, D, generator=g) for _ in range(2)]
    return pools, table.contiguous(), lens, new


def _core(pools, table, lens, new):
    """The core's host check and write on copies: (pools after, or None if refused)."""
    kp, vp = (p.clone() for p in pools)
    try:
        targets = check_table(kp, table, lens, new[0].shape[2], "host")
    except ValueError:
        return None
    _write(kp, vp, targets, *new)
    return kp, vp


def test_writes_and_fill_levels_equal_the_cores():
    rng = random.Random(3)
    for _ in range(25):
        pools, table, lens, new = _case(rng, defect=False)
        want = _core(pools, table, lens, new)
        kp, vp = (p.clone() for p in pools)
        new[0] = new[0].transpose(1, 2).contiguous().transpose(1, 2)  # any strides
        out = paged_append.launch(kp, vp, table, lens, *new, check=0)
        assert torch.equal(kp, want[0]) and torch.equal(vp, want[1])
        assert out.dtype == torch.int32 and out.tolist() == (lens + new[0].shape[2]).tolist()


def test_the_kernels_check_agrees_with_the_cores():
    """Counting mode (``CHECK=2``): no violation exactly where the core's host check passes,
    and then the same writes; with one, nothing written."""
    rng = random.Random(11)
    seen = {"valid": 0, "refused": 0}
    for i in range(60):
        pools, table, lens, new = _case(rng, defect=i % 2 == 1)
        want = _core(pools, table, lens, new)
        kp, vp = (p.clone() for p in pools)
        out = paged_append.launch(kp, vp, table, lens, *new, check=2)
        if want is None:
            assert int(out[0]) > 0, (table, lens)
            assert torch.equal(kp, pools[0]) and torch.equal(vp, pools[1])
        else:
            assert int(out[0]) == 0, (table, lens)
            assert torch.equal(kp, want[0]) and torch.equal(vp, want[1])
        seen["valid" if want is not None else "refused"] += 1
    assert min(seen.values()) >= 20, seen


def test_takes_short_appends_only():
    table = torch.zeros(4, 8, dtype=torch.int32)
    assert paged_append.takes(table, 1)
    assert not paged_append.takes(table, paged_append.MAX_SLOTS // 4 + 1)
    assert not paged_append.takes(torch.zeros(4, 0, dtype=torch.int32), 1)
