"""Attention dropout in the `tl` kernels: `attnkit.dropout`'s keep mask for one tile.

The mask is ``philox4x32_10(counter=(j // 8, i, b * Hq + h, offset), key=(seed_lo,
seed_hi))``, eight 16-bit draws per call for 8 consecutive key columns (``attnkit.dropout``
defines it; the reference and every backend evaluate the same bits). A tile of BLOCK_M rows
and BLOCK_N columns runs Philox on a (BLOCK_M, BLOCK_N // 8) grid and spreads each call's
128 bits over its 8 columns. The seed and offset are read from the call's ``state`` tensor in
device memory, so a launch needs no host sync and a CUDA graph replays fresh values.
"""

import triton
import triton.language as tl


@triton.jit
def dropout_state(STATE):
    """``(seed, offset)`` of the call: the philox key as int64 (tl.philox splits it into its
    two 32-bit words) and the counter's last word, the low 32 bits of ``state[1]``."""
    seed = tl.load(STATE)
    offset = (tl.load(STATE + 1) & 0xFFFFFFFF).to(tl.uint32)
    return seed, offset


@triton.jit
def keep_tile(seed, offset, bh, rows, n0, threshold,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep decisions (BLOCK_M, BLOCK_N) for query rows ``rows`` of head ``bh = b * Hq + h``
    and key columns ``[n0, n0 + BLOCK_N)``, ``n0`` a multiple of 8."""
    tl.static_assert(BLOCK_N % 8 == 0, "dropout needs key blocks of whole groups of 8")
    groups = (n0 // 8 + tl.arange(0, BLOCK_N // 8)).to(tl.uint32)
    # Broadcast counters: Philox's first rounds run on the row and column vectors alone.
    x0, x1, x2, x3 = tl.philox(seed, groups[None, :], rows.to(tl.uint32)[:, None],
                               bh.to(tl.uint32), offset)
    # Column 8g + e takes word e // 2, half e % 2: join so that flatten order is (word, half).
    words = tl.join(tl.join(x0, x2), tl.join(x1, x3))  # [..., a, b] is word 2a + b
    # Compared before the last join: the reshape to the tile's layout then moves booleans,
    # not 32-bit draws.
    keep = tl.join((words & 0xFFFF) >= threshold, (words >> 16) >= threshold)
    return tl.reshape(keep, (BLOCK_M, BLOCK_N))
