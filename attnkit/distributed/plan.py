"""Which parts of a query shard see which parts of a key shard, as attnkit calls.

Positions are global. The mask is a band: query at position ``i`` sees key ``j`` iff
``-left <= j - i <= right`` (``None`` = unbounded; causal is ``right = 0``), the global
problem having ``Sq == Sk``. A block of queries ``[qs, qe)`` against keys ``[ks, ke)`` is
one attnkit call whose bottom-right-aligned window reproduces that band: with
``d = qe - ke`` (query end minus key end), the call's window is ``(left - d, right + d)``.
Keys no query of the block can see, and queries that see no key of the block, are cut off
first, which is also what keeps both sides of that window non-negative.
"""

from __future__ import annotations

from typing import NamedTuple


class Block(NamedTuple):
    """One call: local query rows ``[q0, q1)`` against local key rows ``[k0, k1)``, with the
    bottom-right window sides ``left``/``right`` (None = unbounded; ``right == 0`` is causal).
    """

    q0: int
    q1: int
    k0: int
    k1: int
    left: int | None
    right: int | None

    @property
    def full(self) -> bool:
        return self.left is None and self.right is None

    def options(self) -> dict:
        """``causal``/``window`` for `attnkit.attention` on this block."""
        causal = self.right == 0
        right = None if causal else self.right
        if self.left is None and right is None:
            return {"causal": causal, "window": None}
        return {"causal": causal,
                "window": (-1 if self.left is None else self.left, -1 if right is None else right)}


def _block(qs, qn, qo, ks, kn, ko, left, right) -> Block | None:
    qe, ke = qs + qn, ks + kn
    ks2 = ks if left is None else max(ks, qs - left)
    ke2 = ke if right is None else min(ke, qe + right)
    if ke2 <= ks2:
        return None
    qs2 = qs if right is None else max(qs, ks2 - right)
    qe2 = qe if left is None else min(qe, ke2 + left)
    if qe2 <= qs2:
        return None
    d = qe2 - ke2
    nq, nk = qe2 - qs2, ke2 - ks2
    lo = None if left is None or left - d >= nk - 1 else left - d
    hi = None if right is None or right + d >= nq - 1 else right + d
    return Block(qo + qs2 - qs, qo + qe2 - qs, ko + ks2 - ks, ko + ke2 - ks, lo, hi)


def plan(q_chunks: list[tuple[int, int]], k_chunks: list[tuple[int, int]],
         left: int | None, right: int | None) -> list[Block]:
    """The calls that compute attention of the query chunks against the key chunks.

    Each chunk is ``(global start, length)``; a shard's chunks lie one after another in its
    local rows, in the order given. Every visible (query, key) pair is in exactly one block.
    """
    blocks = []
    qo = 0
    for qs, qn in q_chunks:
        ko = 0
        for ks, kn in k_chunks:
            b = _block(qs, qn, qo, ks, kn, ko, left, right)
            if b is not None:
                blocks.append(b)
            ko += kn
        qo += qn
    return _coalesce(blocks)


def _join_keys(a: Block, b: Block) -> Block | None:
    """``a`` then ``b`` as one call over their adjacent key rows, if the merged call's window
    is the same mask: ``a`` fully visible, ``b`` without a left bound, and ``b``'s right bound
    (relative to the merged corner) not cutting into ``a``'s keys."""
    if (a.q0, a.q1) != (b.q0, b.q1) or a.k1 != b.k0 or not a.full or b.left is not None:
        return None
    nq, nk_b = a.q1 - a.q0, b.k1 - b.k0
    if b.right is not None and nq - 1 - nk_b > b.right:
        return None
    return Block(a.q0, a.q1, a.k0, b.k1, None, b.right)


def _join_queries(a: Block, b: Block) -> Block | None:
    """Two fully visible blocks over the same keys and adjacent query rows, as one call."""
    if a.full and b.full and (a.k0, a.k1) == (b.k0, b.k1) and a.q1 == b.q0:
        return Block(a.q0, b.q1, a.k0, a.k1, None, None)
    return None


def _coalesce(blocks: list[Block]) -> list[Block]:
    """Fewer, larger calls for the same mask (a head-tail shard's two chunks against one
    key chunk, or one query chunk against both of a shard's key chunks)."""
    for join in (_join_keys, _join_queries):
        merged = True
        while merged:
            merged = False
            for i in range(len(blocks)):
                for j in range(len(blocks)):
                    joined = None if i == j else join(blocks[i], blocks[j])
                    if joined is not None:
                        blocks = [x for n, x in enumerate(blocks) if n not in (i, j)] + [joined]
                        merged = True
                        break
                if merged:
                    break
    return sorted(blocks)
