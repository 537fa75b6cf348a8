"""The attention-dropout keep mask: one counter-based function every backend evaluates.

Element ``(b, h, i, j)`` (batch, query head, query row, key column) of one call is kept iff
its 16-bit draw reaches the threshold:

    x = philox4x32_10(counter=(j // 8, i, b * Hq + h, offset), key=(seed_lo, seed_hi))
    draw = (x[(j % 8) // 2] >> (16 * (j % 2))) & 0xFFFF
    keep = draw >= threshold,   threshold = min(floor(p * 2**16), 2**16 - 1)

and kept probabilities are scaled by ``1 / (1 - p)``. One Philox call serves 8 consecutive
key columns (its 128 bits as eight 16-bit draws): a Philox call costs about as much as the
tile's matmuls for 8 elements, not for one. ``p`` is quantised to ``1/65536``. Each counter
word is 32 bits, so one call covers 2**99 elements. The call's
``(seed, offset)`` come from one draw of the device's torch generator (`draw_state`): a
device tensor, so there is no host sync, a CUDA graph replays with fresh values, and
``torch.manual_seed`` or checkpoint recomputation (which restores the generator) regenerate
the same mask. Philox4x32-10 is Salmon et al.'s generator (SC'11), the one cuRAND and
Triton's ``tl.randint4x`` implement.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def threshold(p: float) -> int:
    """The 16-bit integer a draw must reach to keep an element: ``floor(p * 2**16)``, at
    most ``2**16 - 1``."""
    return min(math.floor(p * 65536.0), 0xFFFF)


def check_dropout_p(p) -> float:
    """``p`` as a float in ``[0, 1)``, else ``ValueError``/``TypeError``."""
    if type(p) is float and 0.0 <= p < 1.0:  # the common case, first: this runs per call
        return p
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {p!r}")
    p = float(p)
    if not 0.0 <= p < 1.0:  # also refuses NaN
        raise ValueError(f"dropout_p must be in [0, 1), got {p!r}")
    return p


@dataclass(frozen=True)
class Dropout:
    """What a backend receives for a call with dropout: ``p``, the integer `threshold`,
    the fp32 ``scale = 1 / (1 - p)``, and ``state``, int64 ``(2,)`` on the device holding
    the philox key (word 0) and the offset counter word (low 32 bits of word 1).

    ``first_batch`` is the batch index the call's batch 0 takes in the mask's counter
    (``b`` becomes ``first_batch + b``): 0 in what the core passes; a backend that runs
    documents ``d0, d0 + 1, ...`` of a packed batch as one dense call of its own passes
    ``at_batch(d0)`` to it."""

    p: float
    state: torch.Tensor
    first_batch: int = 0

    @property
    def threshold(self) -> int:
        return threshold(self.p)

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p)

    def at_batch(self, first: int) -> Dropout:
        """This dropout for a call whose batch 0 is batch ``first`` of the mask."""
        return replace(self, first_batch=self.first_batch + first)


def draw_state(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """One call's philox key and offset: int64 ``(2,)`` drawn on ``device`` from
    ``generator`` (default: the device's default generator)."""
    info = torch.iinfo(torch.int64)
    return torch.randint(info.min, info.max, (2,), dtype=torch.int64, device=device,
                         generator=generator)


def traced_state(dropout_p: float, generator, device: torch.device) -> torch.Tensor | None:
    """The state a call under torch.compile draws inside the graph, from the device's default
    generator (None without dropout); a ``generator`` there is refused."""
    if not dropout_p:
        return None
    if generator is not None:
        raise ValueError("generator under torch.compile is not supported: dropout draws from "
                         "the device's default generator there")
    return draw_state(device)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` 32-bit words of ``a * b`` for a 32-bit constant and 32-bit words held in
    int64, in 16-bit halves so no product leaves int64."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    low = a * b_lo + ((a * b_hi) & 0xFFFF) * 65536  # < 2**49: exact
    return ((a * b_hi) >> 16) + (low >> 32), low & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors (or ints) holding 32-bit words; broadcasts."""
    c = [torch.as_tensor(x, dtype=torch.int64) & _MASK32 for x in (c0, c1, c2, c3)]
    k0 = torch.as_tensor(k0, dtype=torch.int64) & _MASK32
    k1 = torch.as_tensor(k1, dtype=torch.int64) & _MASK32
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _MASK32, (k1 + PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M[0], c[0])
        hi1, lo1 = _mulhilo(PHILOX_M[1], c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return tuple(c)


def keep_where(state: torch.Tensor, p: float, bh, i, j) -> torch.Tensor:
    """Boolean keep decisions at ``(b * Hq + h, query row i, key column j)``, broadcast over
    the three int64 index tensors (a tile of the mask; on ``state``'s device)."""
    state = state.to(torch.int64)
    seed, offset = state[0], state[1] & _MASK32
    j = torch.as_tensor(j, dtype=torch.int64)
    words = philox4x32_10(j >> 3, i, bh, offset, seed & _MASK32, (seed >> 32) & _MASK32)
    e = j & 7
    word = torch.where(e < 4, torch.where(e < 2, words[0], words[1]),
                       torch.where(e < 6, words[2], words[3]))
    draw = (word >> ((e & 1) * 16)) & 0xFFFF
    return draw >= threshold(p)


def keep_mask(state: torch.Tensor, p: float, batch: int, heads: int, seqlen_q: int,
              seqlen_k: int, first_batch: int = 0) -> torch.Tensor:
    """Boolean ``(batch, heads, seqlen_q, seqlen_k)``: the elements one call keeps (on
    ``state``'s device), batches ``first_batch ..`` of the mask. Materialises the whole
    mask: for tests and the reference.

    A packed batch (`attnkit.attention_varlen`) draws the mask of the dense batch of its
    documents: document ``d`` is batch ``d``, its query rows and key columns counted from
    its own first rows, so ``keep_mask(state, p, B, Hq, max_seqlen_q, max_seqlen_k)[d, :,
    :Lq_d, :Lk_d]`` is document ``d``'s mask."""
    dev = state.device
    j = torch.arange(seqlen_k, device=dev, dtype=torch.int64)
    i = torch.arange(seqlen_q, device=dev, dtype=torch.int64)[:, None]
    bh = torch.arange(first_batch * heads, (first_batch + batch) * heads, device=dev,
                      dtype=torch.int64)[:, None, None]
    return keep_where(state, p, bh, i, j).view(batch, heads, seqlen_q, seqlen_k)
