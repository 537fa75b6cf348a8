"""FlashAttention-2 with PyTorch tensor operations on blocks.

Forward: the outer loop walks query blocks, the inner loop the key/value blocks that block
can see. Each row keeps a running max ``m`` and running sum ``l``; a new key block raises the
max, the accumulator and ``l`` are rescaled by ``exp(m_old - m_new)``, and at the end
``out = acc / l`` and ``lse = m + log(l)``. Nothing ``Sq x Sk`` is ever held: the largest
temporaries are one ``(rows of a query block) x (keys of a key block)`` tile.

Backward: the same walk, recomputing each tile's probabilities from ``q``, ``k`` and the
saved ``lse`` (``P = exp(S - lse)``), with ``D = rowsum(dO * O) - dlse`` and
``dS = P * (dP - D)``; ``dq`` is accumulated per query block, ``dk`` and ``dv`` in fp32
buffers the size of ``k`` and ``v``.

Scores stay in natural-log units in both passes, so ``m`` is one of the very scores the
backward recomputes and ``lse = m + log(l)`` is rounded once; only the differences
``S - m`` and ``S - lse`` (small where P matters) are scaled by ``log2(e)`` for ``exp2``.
A base-2 ``m`` converted to the natural ``lse`` and back would be off by an ulp of the score,
which large scores (~1e8 in fp32) turn into a factor ``2**16`` on P.

Masking is by selection, never by arithmetic (0 x NaN = NaN): hidden scores are replaced by
``-inf``, and keys no row of a batch sees (beyond ``seqlens_k[b]`` or outside every row's
band; "dead") are kept out of every product that sums over keys, so whatever they hold (NaN,
inf) never reaches a result: on CPU each batch's ``P @ V`` and ``dS @ K`` sum over its own
seen keys only (and dP's dead columns are overwritten with 0); elsewhere dead K/V rows are
zeroed in the tile. Only boundary tiles can hold dead keys; the interior is never masked.

Work follows the mask: for every query block, `_Band.key_blocks` returns only the key blocks
some row of it can see, split into fully visible blocks (no mask built) and the few that
straddle a boundary of the causal / window / seqlens_k band (masked). The causal forward
therefore computes about half the tiles of the non-causal one.

GQA never repeats K/V: the query heads of one kv group are folded into the rows of the tile,
``q`` block ``(B, Hq, n, D)`` -> ``(B, Hkv, group * n, D)``, so one matmul per tile serves
the whole group and ``dS^T @ Q`` sums dk/dv over the group for free.

Precision: statistics and accumulators are fp32 (fp64 for fp64 inputs). On CPU, fp16/bf16
inputs are upcast (K and V once, O(S) extra memory; q per block). On CUDA/XPU fp16/bf16
operands go to the GEMMs as they are and the GEMMs return fp32 (``torch.bmm(..., out_dtype)``,
fp32 accumulation), as FlashAttention does; P and dS are rounded to the input dtype before
their matmuls, also as FlashAttention does.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass, field

import torch

from attnkit.backend_utils import LOG2E
from attnkit.dropout import Dropout, keep_where

#: Env var overriding the block sizes for every call: "BQxBK", e.g. "128x512".
BLOCKS_ENV = "ATTNKIT_TORCH_BLOCKED_BLOCKS"
#: Env var: "0" makes fp16/bf16 on CUDA/XPU upcast to fp32 GEMMs instead of running
#: half-precision GEMMs with fp32 results (for comparison, or a torch without the latter).
MIXED_ENV = "ATTNKIT_TORCH_BLOCKED_MIXED"

#: Score-tile budget per device type, in elements of ``B * Hq * block_q * block_k``: large
#: enough that the per-op Python/launch overhead (~10 ops per tile) is small against the
#: tile's work, bounded so that a tile and its few same-sized temporaries take a fixed amount
#: of memory, independent of the sequence length.
TILE_BUDGET = {"cpu": 1 << 20, "cuda": 1 << 25, "xpu": 1 << 25, "mps": 1 << 23}


@dataclass(frozen=True)
class BlockSizes:
    """Rows of a query block and keys of a key block (both upper bounds: blocks are split
    evenly, so a sequence of 97 with ``q=64`` gives blocks of 49 and 48)."""

    q: int
    k: int

    def __post_init__(self):
        if not (isinstance(self.q, int) and isinstance(self.k, int) and self.q > 0
                and self.k > 0):
            raise ValueError(f"block sizes must be positive ints, got q={self.q!r}, "
                             f"k={self.k!r}")


def parse_blocks(text: str) -> BlockSizes:
    """``"128x512"`` (or ``"128,512"``) -> ``BlockSizes(128, 512)``."""
    parts = text.replace(",", "x").lower().split("x")
    try:
        bq, bk = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{BLOCKS_ENV}={text!r}: expected 'BQxBK', e.g. '128x512'") from None
    return BlockSizes(bq, bk)


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    p = 1 << max(0, int(x).bit_length() - 1) if x >= 1 else 1
    return min(hi, max(lo, p))


def default_block_sizes(device_type: str, dtype: torch.dtype, batch: int, heads_q: int,
                        head_dim: int) -> BlockSizes:
    """Block sizes for a problem on a device (measured on CPU; see docs/tuning.md, torch-blocked).

    The budget (`TILE_BUDGET`) is halved for fp64 and scaled down for head dims above 128
    (the q/acc blocks grow with D). With ``BH = B * Hq`` tiles batched together:

    - CPU: ``block_q`` = 256 rows (128 when BH > 16: the batched tile is big enough, and
      short query blocks waste less on the causal diagonal); ``block_k`` fills the budget,
      a power of two in [256, 4096]. GEMMs of fewer than ~128 rows run far below peak, and a
      long key block costs nothing on the diagonal (masked segments are block_q wide).
    - GPU: ``block_k`` = 1024 (512 on MPS); ``block_q`` fills the budget, a power of two in
      [128, 1024]: each op must move enough data to hide its ~5-10 us launch.
    """
    budget = TILE_BUDGET.get(device_type, 1 << 22)
    if dtype == torch.float64:
        budget //= 2
    if head_dim > 128:
        budget = budget * 128 // head_dim
    bh = max(1, batch * heads_q)
    if device_type == "cpu":
        bq = 256 if bh <= 16 else 128
        return BlockSizes(bq, _pow2_clamp(budget // (bh * bq), 256, 4096))
    bk = 512 if device_type == "mps" else 1024
    return BlockSizes(_pow2_clamp(budget // (bh * bk), 128, 1024), bk)


def resolve_block_sizes(override: BlockSizes | None, device_type, dtype, batch, heads_q,
                        head_dim) -> BlockSizes:
    """Explicit sizes, else the env var, else the device default."""
    if override is not None:
        return override
    env = os.environ.get(BLOCKS_ENV, "").strip()
    if env:
        return parse_blocks(env)
    return default_block_sizes(device_type, dtype, batch, heads_q, head_dim)


@dataclass
class WorkCount:
    """What a call computed: tiles, tiles that needed a mask, and score elements."""

    tiles: int = 0
    masked_tiles: int = 0
    #: Score elements computed, ``sum(B * Hq * n * m)`` over tiles.
    elements: int = 0
    query_blocks: int = 0
    empty_query_blocks: int = 0
    block_sizes: BlockSizes | None = field(default=None)

    def add_tile(self, rows: int, keys: int, masked: bool) -> None:
        self.tiles += 1
        self.masked_tiles += int(masked)
        self.elements += rows * keys


def _split(lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into ``ceil((hi - lo) / size)`` nearly equal pieces."""
    n = hi - lo
    if n <= 0:
        return []
    pieces = -(-n // size)
    base, extra = divmod(n, pieces)
    out, start = [], lo
    for p in range(pieces):
        end = start + base + (1 if p < extra else 0)
        out.append((start, end))
        start = end
    return out


class _Band:
    """Which keys each query row sees (spec: ``j < Sk_b`` and
    ``-left <= j - (i + Sk_b - Sq) <= right``), asked block by block.

    With per-batch ``seqlens_k`` the diagonal offset ``Sk_b - Sq`` differs per batch. The
    tiles are computed for all batches at once (one matmul per tile, Python overhead
    independent of B), so a key block is visited if *any* batch's row sees it and is
    unmasked only if *every* batch's row sees all of it: the visited range is the union over
    batches (from the smallest and largest ``Sk_b``), and the batches shorter than the
    longest pay for masked columns. Looping per batch would skip exactly, at B times the
    per-tile overhead; the union is the better trade for the usual padded batches and for
    decoding (Sq = 1), where tiles are small and overhead dominates.
    """

    def __init__(self, seqlen_q, seqlen_k, band, seqlens_k, device):
        self.left, self.right = band
        self.seqlen_q = seqlen_q
        if seqlens_k is None:
            self.lens = None
            sk_min = sk_max = seqlen_k
        else:
            host = seqlens_k.tolist()  # one device sync per call: block ranges live on host
            sk_min, sk_max = min(host), max(host)
            if sk_min < 0 or sk_max > seqlen_k:  # the core checks only CPU tensors' values
                raise ValueError(f"seqlens_k values must lie in [0, Sk={seqlen_k}], got min "
                                 f"{sk_min}, max {sk_max}")
            self.lens = seqlens_k.to(torch.long).view(-1, 1, 1, 1, 1)
        self.sk_min, self.sk_max = sk_min, sk_max
        self.off_min, self.off_max = sk_min - seqlen_q, sk_max - seqlen_q
        self.arange = torch.arange(max(seqlen_q, seqlen_k), device=device)
        self._masks: dict = {}
        # Keys some row of batch b sees: [first_b, Sk_b) (the last row's band reaches
        # Sk_b - 1 + right, right >= 0); the others are dead. Tiles are shared by the
        # batches, so a tile holds a dead key iff j0 < max_b first_b or j1 > min_b Sk_b.
        lens = [seqlen_k] if seqlens_k is None else host
        self._seen = [(0 if self.left is None else max(0, n - seqlen_q - self.left), n)
                      for n in lens]
        self._first_max = max(f for f, _ in self._seen)
        self._end_min = min(e for _, e in self._seen)
        self._dead: dict = {}
        # On CPU a batched GEMM loops over the batches anyway, so contracting each batch
        # over its own seen keys costs a few calls; elsewhere one selection pass over the
        # tile's K/V (`drop_dead_keys`) costs less than B launches.
        self.per_batch = torch.device(device).type == "cpu"

    def key_blocks(self, i0: int, i1: int, block_k: int) -> list[tuple[int, int, bool]]:
        """Key blocks ``(j0, j1, needs_mask)`` that rows ``[i0, i1)`` can see."""
        left, right = self.left, self.right
        lo = 0 if left is None else max(0, i0 + self.off_min - left)
        hi = self.sk_max if right is None else min(self.sk_max, i1 + self.off_max + right)
        if hi <= lo:
            return []
        # Keys every row of the block sees, in every batch, less the one edge column on a
        # bounded side: the masked segments are then exactly n wide and, for causal with
        # block_q == block_k, line up with the key blocks (no one-column tiles).
        full_lo = lo if left is None else max(lo, i1 + self.off_max - left)
        full_hi = self.sk_min if right is None else min(self.sk_min, i0 + self.off_min + right)
        full_hi = min(full_hi, hi)
        if full_lo < full_hi:
            segments = [(lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True)]
        else:
            segments = [(lo, hi, True)]
        return [(a, b, masked) for s0, s1, masked in segments
                for a, b in _split(s0, s1, block_k)]

    def hidden(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """Boolean ``(B or 1, 1, 1, n, m)``: True where row i must not see key j."""
        key = (j0 - i0, i1 - i0, j1 - j0) if self.lens is None else (i0, i1, j0, j1)
        cached = self._masks.get(key)
        if cached is not None:
            return cached
        rel = self.arange[j0:j1].view(1, -1) - self.arange[i0:i1].view(-1, 1)  # j - i
        if self.lens is None:
            off = self.off_min
            hidden = torch.zeros_like(rel, dtype=torch.bool)
            if self.left is not None:
                hidden |= rel < off - self.left
            if self.right is not None:
                hidden |= rel > off + self.right
            hidden = hidden.view(1, 1, 1, *rel.shape)
        else:
            rel = rel.view(1, 1, 1, *rel.shape) - (self.lens - self.seqlen_q)
            hidden = self.arange[j0:j1].view(1, 1, 1, 1, -1) >= self.lens
            if self.left is not None:
                hidden = hidden | (rel < -self.left)
            if self.right is not None:
                hidden = hidden | (rel > self.right)
        if len(self._masks) < 64:  # causal/window diagonals repeat: build each shape once
            self._masks[key] = hidden
        return hidden

    def has_dead_keys(self, j0: int, j1: int) -> bool:
        """Whether some key of ``[j0, j1)`` is seen by no row of some batch."""
        return j0 < self._first_max or j1 > self._end_min

    def seen_columns(self, j0: int, j1: int) -> list[tuple[int, int]]:
        """Per batch, the columns ``[lo, hi)`` of the tile ``[j0, j1)`` (0-based) holding the
        keys some row sees; ``hi <= lo`` when it holds none."""
        m = j1 - j0
        return [(min(max(f - j0, 0), m), min(max(e - j0, 0), m)) for f, e in self._seen]

    def drop_dead_keys(self, t: torch.Tensor, j0: int, j1: int) -> torch.Tensor:
        """K or V rows ``[j0, j1)`` (``(B, Hkv, m, D)``) with the keys no row sees replaced
        by 0: a selection, since 0 x NaN is still NaN in a product."""
        dead = self._dead.get((j0, j1))
        if dead is None:
            pos = self.arange[j0:j1].view(1, 1, -1, 1)
            first, end = (torch.tensor(c, device=pos.device).view(-1, 1, 1, 1)
                          for c in zip(*self._seen))
            dead = (pos < first) | (pos >= end)
            if len(self._dead) < 64:
                self._dead[(j0, j1)] = dead
        return torch.where(dead, 0, t)


def _add_mm_seen_(prec, acc, a, b, seen) -> None:
    """``acc += a @ b`` contracted, batch by batch, over the key columns ``seen`` (from
    `_Band.seen_columns`) only: ``a (B, Hkv, n, m)``, ``b (B, Hkv, m, D)``."""
    for i, (lo, hi) in enumerate(seen):
        if hi > lo:
            prec.add_mm_(acc[i], a[i, :, :, lo:hi], b[i, :, lo:hi])


def _bmm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 batched GEMM with fp32 accumulation and an fp32 result (CUDA/XPU)."""
    return torch.bmm(a, b, out_dtype=torch.float32)


def _has_fp32_out_gemm() -> bool:
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 8)


@dataclass(frozen=True)
class _Precision:
    """Dtypes of one call: ``compute`` for statistics and accumulators, ``operand`` for what
    the GEMMs read (the input dtype when ``mixed``, else ``compute``)."""

    compute: torch.dtype
    operand: torch.dtype

    @classmethod
    def for_inputs(cls, q: torch.Tensor, mixed: bool | None) -> _Precision:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        half = q.dtype in (torch.float16, torch.bfloat16)
        if mixed is None:
            mixed = (half and q.device.type in ("cuda", "xpu") and _has_fp32_out_gemm()
                     and os.environ.get(MIXED_ENV, "1") != "0")
        return cls(compute, q.dtype if (mixed and half) else compute)

    @property
    def mixed(self) -> bool:
        return self.operand != self.compute

    def mm(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None
           ) -> torch.Tensor:
        """``a @ b`` over matching leading dims, result in ``compute`` (into ``out`` if given
        and the operands are in ``compute``)."""
        if not self.mixed:
            return torch.matmul(a, b) if out is None else torch.matmul(a, b, out=out)
        lead = a.shape[:-2]
        out = _bmm_fp32_out(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
        return out.view(*lead, a.shape[-2], b.shape[-1])

    def add_mm_(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``acc += a @ b`` in place (``acc`` in ``compute``; may be a slice of a buffer)."""
        if self.mixed:
            acc.add_(self.mm(a.to(self.operand), b))
            return
        acc3 = acc.view(-1, *acc.shape[-2:])
        acc3.baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))


class _Workspace:
    """Reused tile buffers, one flat allocation per slot sized for the largest tile.

    A fresh multi-MiB tile per key block costs page faults on CPU (allocations that large
    go straight to the OS and come back zero-filled); writing every tile into one buffer
    avoids them. Tiles of one call differ in size by at most a row or column (`_split`): a
    contiguous prefix of the slot's buffer, viewed at the tile's shape, holds each.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        flat = self._flat.get(slot)
        if flat is None or flat.numel() < numel:
            flat = self._flat[slot] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return flat[:numel].view(shape)


def _workspace(prec, q):
    """Buffers for the fp32/fp64 GEMM path on CPU; elsewhere the caching allocator reuses
    memory already (and the mixed path's fp32-output GEMM takes no ``out``)."""
    if prec.mixed or q.device.type != "cpu":
        return None
    return _Workspace(q.device, prec.compute)


def _buf(ws, slot, shape):
    return None if ws is None else ws.get(slot, shape)


def _fold_rows(t: torch.Tensor, i0: int, i1: int, heads_kv: int, dtype: torch.dtype,
               factor: float = 1.0, ws=None, slot: str = "") -> torch.Tensor:
    """Rows ``[i0, i1)`` of a ``(B, Hq, S, D)`` tensor as ``(B, Hkv, group * n, D)`` in
    ``dtype``, times ``factor``: one copy of the block (cast, scale and GQA fold together)."""
    B, Hq, _, D = t.shape
    n, group = i1 - i0, Hq // heads_kv
    shape = (B, heads_kv, group, n, D)
    out = torch.empty(shape, dtype=dtype, device=t.device) if ws is None else ws.get(slot, shape)
    out.copy_(t[:, :, i0:i1].view(B, heads_kv, group, n, D))
    if factor != 1.0:
        out.mul_(factor)  # in `dtype`, not in the (half) input dtype
    return out.view(B, heads_kv, group * n, D)


def _fold_stat(t: torch.Tensor, i0: int, i1: int, heads_kv: int) -> torch.Tensor:
    """Rows ``[i0, i1)`` of a per-row ``(B, Hq, S)`` statistic as ``(B, Hkv, group * n)``."""
    B, Hq, _ = t.shape
    return t[:, :, i0:i1].reshape(B, heads_kv, (Hq // heads_kv) * (i1 - i0))


def _unfold(t: torch.Tensor, heads_q: int) -> torch.Tensor:
    """``(B, Hkv, group * n, ...)`` back to ``(B, Hq, n, ...)``."""
    B, heads_kv, rows = t.shape[:3]
    n = rows // (heads_q // heads_kv)
    return t.reshape(B, heads_q, n, *t.shape[3:])


# exp(x) = exp2(x * LOG2E): PyTorch's CPU kernels compute exp2 about five times as fast as
# exp, which pays for the extra multiply.
def _exp_(x: torch.Tensor) -> torch.Tensor:
    """``exp`` in place, through the faster ``exp2``."""
    return x.mul_(LOG2E).exp2_()


def _scores(prec, qf, kb, s_factor, softcap, keep_tanh=False, ws=None):
    """One tile of (capped) scores in natural-log units, in ``compute``; and ``tanh`` if
    the softcap backward needs it."""
    s = prec.mm(qf, kb.transpose(-1, -2), out=_buf(ws, "s", (*qf.shape[:-1], kb.shape[-2])))
    if s_factor != 1.0:
        s.mul_(s_factor)
    if softcap is None:
        return s, None
    # The scale carries 1 / softcap, so tanh's argument is already scores / softcap.
    if not keep_tanh:
        return s.tanh_().mul_(softcap), None
    t = torch.tanh(s)
    return torch.mul(t, softcap, out=s), t


def _factors(prec, scale, softcap):
    """How ``scale`` (or ``scale / softcap``) is applied: folded into the fp32 copy of the
    q block (``q_factor``), or, when q is a raw half operand, onto the fp32 scores
    (``s_factor``)."""
    total = scale / softcap if softcap is not None else scale
    return (1.0, total) if prec.mixed else (total, 1.0)


@contextlib.contextmanager
def _ieee_fp32(prec: _Precision, device: torch.device):
    """fp32 GEMMs at fp32 accuracy on CUDA, even if the caller enabled TF32 globally (the
    spec forbids silent TF32); the caller's setting is restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    if prec.operand != torch.float32 or device.type != "cuda" or previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _exact_fp32_gemms(fn):
    """Run ``fn(q, ...)`` under `_ieee_fp32` for its inputs."""

    @functools.wraps(fn)
    def wrapper(q, *args, **kwargs):
        with _ieee_fp32(_Precision.for_inputs(q, kwargs.get("mixed")), q.device):
            return fn(q, *args, **kwargs)

    return wrapper


@_exact_fp32_gemms
def _prepare(q, k, v, scale, band, seqlens_k, softcap, blocks, mixed, work):
    """What the forward and the backward share: precision, block sizes, the band geometry,
    score factors, K/V in the operand dtype and the tile workspace."""
    B, Hq, Sq, D = q.shape
    prec = _Precision.for_inputs(q, mixed)
    bs = resolve_block_sizes(blocks, q.device.type, q.dtype, B, Hq, D)
    geo = _Band(Sq, k.shape[2], band, seqlens_k, q.device)
    q_factor, s_factor = _factors(prec, scale, softcap)
    # Half K/V are cast once (O(S) memory), not once per query block.
    kc, vc = k.to(prec.operand), v.to(prec.operand)
    if work is not None:
        work.block_sizes = bs
    return prec, bs, geo, q_factor, s_factor, kc, vc, _workspace(prec, q)


def blocked_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    band: tuple[int | None, int | None] = (None, None),
    seqlens_k: torch.Tensor | None = None,
    softcap: float | None = None,
    blocks: BlockSizes | None = None,
    mixed: bool | None = None,
    work: WorkCount | None = None,
    dropout: Dropout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` for ``q (B, Hq, Sq, D)``, ``k``/``v (B, Hkv, Sk, D)`` (any strides).

    ``band`` is `AttentionProblem.band` (causal folded into the window; None = unbounded).
    ``out`` is contiguous in q's dtype; ``lse`` fp32 (fp64 for fp64 inputs) ``(B, Hq, Sq)``.
    ``dropout`` drops P tile by tile with `attnkit.dropout`'s mask after ``l`` has summed it.
    """
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    prec, bs, geo, q_factor, s_factor, kc, vc, ws = _prepare(
        q, k, v, scale, band, seqlens_k, softcap, blocks, mixed, work)
    ct = prec.compute

    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=ct, device=q.device)
    for i0, i1 in _split(0, Sq, bs.q):
        tiles = geo.key_blocks(i0, i1, bs.k)
        if work is not None:
            work.query_blocks += 1
            work.empty_query_blocks += int(not tiles)
        if not tiles:  # every row of the block sees no key
            out[:, :, i0:i1] = 0
            lse[:, :, i0:i1] = float("-inf")
            continue
        qf = _fold_rows(q, i0, i1, Hkv, prec.operand, q_factor, ws, "q")
        rows = qf.shape[2]
        m = l = acc = None
        any_masked = False
        for j0, j1, masked in tiles:
            s, _ = _scores(prec, qf, kc[:, :, j0:j1], s_factor, softcap, ws=ws)
            vb = vc[:, :, j0:j1]
            seen = None  # per batch, the columns to contract P @ V over; None: all
            if masked:
                any_masked = True
                s.view(B, Hkv, Hq // Hkv, i1 - i0, j1 - j0).masked_fill_(
                    geo.hidden(i0, i1, j0, j1), float("-inf"))
                if geo.has_dead_keys(j0, j1):
                    if geo.per_batch:
                        seen = geo.seen_columns(j0, j1)
                    else:
                        vb = geo.drop_dead_keys(vb, j0, j1)
            tile_max = s.amax(-1)
            m_new = tile_max if m is None else torch.maximum(m, tile_max)
            # A row that has seen only masked keys has m = -inf: subtract 0 instead, so
            # exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
            m_ref = m_new.masked_fill(m_new == float("-inf"), 0) if any_masked else m_new
            p = _exp_(s.sub_(m_ref.unsqueeze(-1)))
            if m is None:
                l = p.sum(-1)
                p = _drop(p, dropout, Hq, i0, i1, j0, j1)
                acc_shape = (*p.shape[:-1], D)
                if seen is None:
                    acc = prec.mm(p.to(prec.operand), vb, out=_buf(ws, "acc", acc_shape))
                else:
                    acc = _buf(ws, "acc", acc_shape)
                    acc = (torch.zeros(acc_shape, dtype=ct, device=q.device) if acc is None
                           else acc.zero_())
            else:
                alpha = _exp_(m - m_ref)  # <= 1; 0 while the row had seen nothing
                l = l.mul_(alpha).add_(p.sum(-1))
                p = _drop(p, dropout, Hq, i0, i1, j0, j1)
                acc.mul_(alpha.unsqueeze(-1))
                if seen is None:
                    prec.add_mm_(acc, p, vb)
            if seen is not None:
                _add_mm_seen_(prec, acc, p, vb, seen)
            m = m_new
            if work is not None:
                work.add_tile(B * Hq * (i1 - i0), j1 - j0, masked)
        # Rows that saw no key: l = 0 -> out 0, lse = 0 + log(0) = -inf.
        m_ref = m.masked_fill(m == float("-inf"), 0) if any_masked else m
        acc.div_(torch.where(l > 0, l, 1).unsqueeze(-1))
        out[:, :, i0:i1] = _unfold(acc.view(B, Hkv, rows, D), Hq)
        lse[:, :, i0:i1] = _unfold(m_ref.add_(torch.log(l)), Hq)
    return out, lse


def _keep(dropout, heads_q, i0, i1, j0, j1, like) -> torch.Tensor:
    """The keep mask of one folded tile: ``like`` is ``(B, Hkv, group * n, j1 - j0)``, its
    row ``g * n + r`` is query head ``hkv * group + g``, query row ``i0 + r``."""
    B, Hkv, rows, cols = like.shape
    group, dev = heads_q // Hkv, like.device
    first = dropout.first_batch * heads_q  # a packed batch's run of documents: not batch 0
    bh = torch.arange(first, first + B * heads_q, device=dev).view(B, Hkv, group, 1, 1)
    i = torch.arange(i0, i1, device=dev).view(-1, 1)
    j = torch.arange(j0, j1, device=dev)
    return keep_where(dropout.state, dropout.p, bh, i, j).view(B, Hkv, rows, cols)


def _apply(t, keep, dropout):
    return torch.where(keep, t * dropout.scale, 0)


def _drop(p, dropout, heads_q, i0, i1, j0, j1):
    return p if dropout is None else _apply(p, _keep(dropout, heads_q, i0, i1, j0, j1, p),
                                            dropout)


@_exact_fp32_gemms
def blocked_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    *,
    scale: float,
    band: tuple[int | None, int | None] = (None, None),
    seqlens_k: torch.Tensor | None = None,
    softcap: float | None = None,
    blocks: BlockSizes | None = None,
    mixed: bool | None = None,
    work: WorkCount | None = None,
    dlse: torch.Tensor | None = None,
    dropout: Dropout | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` from the saved ``out`` and ``lse``, recomputing P tile by tile.
    ``dlse`` (``(B, Hq, Sq)``, or None for zero) is the gradient reaching ``lse``;
    ``dropout`` regenerates the forward's keep mask per tile (``dV = (cZP)^T dO``,
    ``dP = cZ (dO V^T)``)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    prec, bs, geo, q_factor, s_factor, kc, vc, ws = _prepare(
        q, k, v, scale, band, seqlens_k, softcap, blocks, mixed, work)
    ct = prec.compute

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # fp32 accumulators for dk/dv; for fp32 inputs they are the results themselves.
    dk = torch.zeros((B, Hkv, Sk, D), dtype=ct, device=q.device)
    dv = torch.zeros((B, Hkv, Sk, D), dtype=ct, device=q.device)
    for i0, i1 in _split(0, Sq, bs.q):
        tiles = geo.key_blocks(i0, i1, bs.k)
        if work is not None:
            work.query_blocks += 1
            work.empty_query_blocks += int(not tiles)
        if not tiles:
            dq[:, :, i0:i1] = 0
            continue
        n = i1 - i0
        qf = _fold_rows(q, i0, i1, Hkv, prec.operand, q_factor)
        do = _fold_rows(dout, i0, i1, Hkv, prec.operand)
        # D = rowsum(dO * O) - dlse, in fp32 from the saved (input-dtype) out: lse's own
        # gradient is dlse * P, which folds into dS = P * (dP - D).
        delta = _fold_rows(dout, i0, i1, Hkv, ct).mul_(_fold_rows(out, i0, i1, Hkv, ct)).sum(-1)
        if dlse is not None:
            delta.sub_(_fold_stat(dlse, i0, i1, Hkv).to(ct))
        lse_b = _fold_stat(lse, i0, i1, Hkv).to(ct)
        # Rows that saw no key (lse = -inf) get P = exp(s - inf) = 0: zero gradients, no NaN.
        lse_b = lse_b.masked_fill(lse_b == float("-inf"), float("inf")).unsqueeze(-1)
        dq_acc = torch.zeros((B, Hkv, qf.shape[2], D), dtype=ct, device=q.device)
        for j0, j1, masked in tiles:
            kb, vb = kc[:, :, j0:j1], vc[:, :, j0:j1]
            s, t = _scores(prec, qf, kb, s_factor, softcap, keep_tanh=True, ws=ws)
            seen = None
            if masked:
                hidden = geo.hidden(i0, i1, j0, j1)
                s.view(B, Hkv, Hq // Hkv, n, j1 - j0).masked_fill_(hidden, float("-inf"))
                if t is not None:  # tanh of a dead key's NaN score would reach dS
                    t.view(B, Hkv, Hq // Hkv, n, j1 - j0).masked_fill_(hidden, 0)
                # P is 0 on dead keys, but dP (from V) and dQ (from K) would still read them.
                if geo.has_dead_keys(j0, j1):
                    if geo.per_batch:
                        seen = geo.seen_columns(j0, j1)
                    else:
                        kb, vb = geo.drop_dead_keys(kb, j0, j1), geo.drop_dead_keys(vb, j0, j1)
            p = _exp_(s.sub_(lse_b))
            keep = None if dropout is None else _keep(dropout, Hq, i0, i1, j0, j1, p)
            p_op = (p if keep is None else _apply(p, keep, dropout)).to(prec.operand)
            prec.add_mm_(dv[:, :, j0:j1], p_op.transpose(-1, -2), do)
            dp = prec.mm(do, vb.transpose(-1, -2), out=_buf(ws, "dp", s.shape))
            if seen is not None:  # dead keys' columns of dP were read from their V rows
                for i, (lo, hi) in enumerate(seen):
                    dp[i, :, :, :lo].fill_(0)
                    dp[i, :, :, max(hi, lo):].fill_(0)
            if keep is not None:
                dp = _apply(dp, keep, dropout)
            ds = dp.sub_(delta.unsqueeze(-1)).mul_(p)  # dS = P * (dP - D)
            if t is not None:  # through the cap: d(c tanh(u/c))/du = 1 - tanh^2
                ds.mul_(t.mul_(t).neg_().add_(1))
            ds_op = ds.to(prec.operand)
            if seen is None:
                prec.add_mm_(dq_acc, ds_op, kb)
            else:
                _add_mm_seen_(prec, dq_acc, ds_op, kb, seen)
            prec.add_mm_(dk[:, :, j0:j1], ds_op.transpose(-1, -2), qf)
            if work is not None:
                work.add_tile(B * Hq * n, j1 - j0, masked)
        dq[:, :, i0:i1] = _unfold(dq_acc.mul_(scale), Hq)
    # dk accumulated dS^T @ (q * q_factor); the chain rule wants scale * dS^T @ q. A zero
    # scale made q_factor and dk zero already.
    if q_factor != 0.0 and scale / q_factor != 1.0:
        dk.mul_(scale / q_factor)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


__all__ = [
    "BLOCKS_ENV",
    "BlockSizes",
    "WorkCount",
    "blocked_backward",
    "blocked_forward",
    "default_block_sizes",
    "parse_blocks",
    "resolve_block_sizes",
]
