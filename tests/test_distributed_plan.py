"""The block plan of attnkit.distributed against the mask it must reproduce, position by
position (no processes: the plan is arithmetic)."""

import itertools
import random

import pytest

from attnkit.distributed.layout import rank_chunks, storage_order
from attnkit.distributed.plan import Block, plan


def _positions(chunks):
    return [s + i for s, n in chunks for i in range(n)]


def _covered(blocks, qpos, kpos):
    """How many blocks make each (query row, key row) pair visible, under attnkit's
    bottom-right window semantics."""
    seen = {}
    for b in blocks:
        nq, nk = b.q1 - b.q0, b.k1 - b.k0
        for i, j in itertools.product(range(nq), range(nk)):
            rel = j - i - (nk - nq)
            if (b.left is None or rel >= -b.left) and (b.right is None or rel <= b.right):
                key = (qpos[b.q0 + i], kpos[b.k0 + j])
                seen[key] = seen.get(key, 0) + 1
    return seen


def _expected(qpos, kpos, left, right):
    return {(i, j): 1 for i in qpos for j in kpos
            if (left is None or j - i >= -left) and (right is None or j - i <= right)}


BANDS = [(None, None), (None, 0), (3, 0), (0, 0), (2, 5), (None, 4), (7, None), (1, None),
         (20, 0)]


@pytest.mark.parametrize("layout", ["headtail", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plan_reproduces_the_band(layout, world):
    local = 6 if layout == "headtail" else 5
    for left, right in BANDS:
        for rank, src in itertools.product(range(world), repeat=2):
            qc = rank_chunks(rank, world, local, layout)
            kc = rank_chunks(src, world, local, layout)
            qpos, kpos = _positions(qc), _positions(kc)
            blocks = plan(qc, kc, left, right)
            for b in blocks:  # every call is one attnkit can make: sides >= 0
                assert b.left is None or b.left >= 0
                assert b.right is None or b.right >= 0
                assert b.q1 > b.q0 and b.k1 > b.k0
            assert _covered(blocks, qpos, kpos) == _expected(qpos, kpos, left, right), \
                (layout, world, rank, src, left, right, blocks)


def test_plan_against_the_whole_gathered_sequence():
    rng = random.Random(0)
    for _ in range(200):
        world = rng.randint(1, 4)
        layout = rng.choice(["headtail", "contiguous"])
        c = rng.randint(1, 5)
        local = c * (2 if layout == "headtail" else 1)
        left = rng.choice([None, 0, 1, 3, 9])
        right = rng.choice([None, 0, 1, 4])
        rank = rng.randrange(world)
        qc = rank_chunks(rank, world, local, layout)
        kc = [(0, local * world)]
        blocks = plan(qc, kc, left, right)
        qpos, kpos = _positions(qc), _positions(kc)
        assert _covered(blocks, qpos, kpos) == _expected(qpos, kpos, left, right)


def test_headtail_causal_calls_are_balanced():
    """Each rank's causal work is the same under head-tail, and the plan makes at most two
    calls per ring step (one off the diagonal)."""
    world, local = 4, 8
    work = []
    for rank in range(world):
        total = 0
        for src in range(world):
            blocks = plan(rank_chunks(rank, world, local, "headtail"),
                          rank_chunks(src, world, local, "headtail"), None, 0)
            assert len(blocks) == (2 if src == rank else 1)
            total += sum(len(_covered([b], list(range(local)), list(range(local))))
                         for b in blocks)
        work.append(total)
    assert len(set(work)) == 1, work


def test_storage_order_matches_torch_head_tail_balancer():
    balancer = pytest.importorskip(
        "torch.distributed.tensor.experimental._context_parallel._load_balancer")
    for world in (1, 2, 3, 4, 8):
        seq = 2 * world * 3
        want = balancer._HeadTailLoadBalancer(seq, world, "cpu")._generate_indices()[0].tolist()
        got = [g * 3 + i for g in storage_order(world, "headtail") for i in range(3)]
        assert got == want


def test_block_options():
    assert Block(0, 4, 0, 4, None, 0).options() == {"causal": True, "window": None}
    assert Block(0, 4, 0, 4, 2, 0).options() == {"causal": True, "window": (2, -1)}
    assert Block(0, 4, 0, 4, None, 3).options() == {"causal": False, "window": (-1, 3)}
    assert Block(0, 4, 0, 4, None, None).options() == {"causal": False, "window": None}
