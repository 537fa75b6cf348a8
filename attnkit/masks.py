"""Dense attention masks read back as structure: causal, a sliding window, per-batch key counts.

`mask_structure` answers whether a boolean (or 0/-inf additive) mask is exactly a band that
`attention` computes from its options, and with which options. It reads the mask a few times
on its own device (a pass that counts the visible keys of each row, two that find each row's
first and last visible key) and then reads a few numbers on the host: one device sync per
call (two for a mask that is one row per batch but not a key prefix: the prefix test, then the
band's). A key-padding prefix, the common case, takes about a dozen small operations.
`cached_structure` remembers the answer per mask tensor (until it is modified in place or
freed), so a model that passes one mask to every layer syncs once per forward, not per layer.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch

from .spec import UNBOUNDED, describe_tensor

_NONE = -(2**62)  # "no row": below any real band offset


class MaskStructure(NamedTuple):
    """`attention`'s options that compute exactly what a mask allows.

    ``key_limit``: keys at or past it are visible to no query of any batch (the caller slices
    them off); ``seqlens_k``: per-batch key counts (``None`` when they are all ``key_limit``).
    """

    causal: bool
    window: tuple[int, int] | None  # None: unbounded on both sides
    key_limit: int
    seqlens_k: torch.Tensor | None


def visible_keys(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as booleans, True where a key is visible. Additive masks must hold only 0
    (visible) and -inf (masked); any other bias is not structure."""
    if mask.dtype == torch.bool:
        return mask
    return mask == 0


def mask_structure(mask: torch.Tensor, batch: int, seqlen_q: int) -> MaskStructure | None:
    """The structure of ``mask`` (already broadcast-checked, shape ``(Bm, Sqm, Sk)`` with
    ``Bm`` in ``{1, batch}`` and ``Sqm`` in ``{1, seqlen_q}``), or None if it has none.

    Query ``i`` of batch ``b`` must see exactly the keys
    ``max(0, d - left) <= j <= min(Sk_b - 1, d + right)``, ``d = i + Sk_b - Sq``: `attention`'s
    band, bottom-right aligned to the batch's key count ``Sk_b``. ``Sk_b`` is one past the last
    key any row of the batch sees, ``right`` and ``left`` the widest reach past and before the
    diagonal any row shows; the mask is then compared with the band they define, row by row.
    """
    Bm, Sqm, Sk = mask.shape
    vis = visible_keys(mask)
    counts = vis.sum(-1)                                                    # (Bm, Sqm)
    as_bytes = vis.view(torch.uint8)
    last = (Sk - 1) - as_bytes.flip(-1).argmax(-1)                         # True key of a row
    if Sqm == 1:
        found = _key_prefix(mask, counts, last, batch)
        if found is not None:
            return found
    first = as_bytes.argmax(-1)                                            # first max = first
    if Sqm != seqlen_q:  # a key-padding mask: every query row the same
        counts, first, last = (t.expand(Bm, seqlen_q) for t in (counts, first, last))
    seen = counts > 0
    keys_b = torch.where(seen, last, -1).amax(-1) + 1                      # Sk_b, (Bm,)
    rows = torch.arange(seqlen_q, device=mask.device)
    diag = rows + (keys_b - seqlen_q).unsqueeze(-1)                        # (Bm, Sq)
    right = torch.where(seen, last - diag, _NONE).amax()
    left = torch.where(seen, diag - first, _NONE).amax()
    # Which reach is unbounded (it never cuts a row) is decided here, on the device, so the
    # comparison below and the options returned agree.
    right_open = right >= seqlen_q - 1
    left_open = left >= keys_b.amax() - 1
    hi = torch.minimum(keys_b.unsqueeze(-1) - 1, torch.where(right_open, Sk, diag + right))
    lo = torch.where(left_open, 0, diag - left).clamp(min=0)
    expect = (hi - lo + 1).clamp(min=0)
    same = (counts == expect) & (~seen | ((first == lo) & (last == hi)))
    no_rows = ~seen.any()
    ok = (same.all() & (right >= 0) & (left >= 0)) | no_rows
    if mask.dtype != torch.bool:
        ok = ok & ((mask == 0) | (mask == float("-inf"))).all()
    summary = torch.stack([ok, no_rows, left, right, left_open, right_open,
                           keys_b.amin(), keys_b.amax()]).tolist()  # the one sync
    ok, no_rows, left, right, left_open, right_open, kmin, kmax = summary
    if not ok:
        return None
    if no_rows:  # every query sees nothing: no key is needed at all
        return MaskStructure(False, (UNBOUNDED, UNBOUNDED), 0, None)
    causal = not right_open and right == 0
    window = (UNBOUNDED if left_open else int(left),
              UNBOUNDED if right_open or causal else int(right))
    seqlens = None
    if kmin != kmax:
        seqlens = (keys_b if Bm == batch else keys_b.expand(batch)).to(torch.int32)
    return MaskStructure(causal, window, int(kmax), seqlens)


def _key_prefix(mask, counts, last, batch: int) -> MaskStructure | None:
    """The common key-padding mask, one row per batch that is a prefix of the keys: its
    structure from a handful of operations (one sync), or None to try the general band."""
    prefix = (counts == 0) | (last + 1 == counts)
    ok = prefix.all()
    if mask.dtype != torch.bool:
        ok = ok & ((mask == 0) | (mask == float("-inf"))).all()
    ok, kmin, kmax = torch.stack([ok, counts.amin(), counts.amax()]).tolist()
    if not ok:
        return None
    seqlens = None
    if kmin != kmax:
        keys_b = counts[:, 0]
        seqlens = (keys_b if keys_b.shape[0] == batch else keys_b.expand(batch)).to(torch.int32)
    return MaskStructure(False, None, int(kmax), seqlens)


def broadcast_mask(mask, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
                   q_dtype: torch.dtype, name: str = "attn_mask") -> torch.Tensor:
    """``mask`` checked against SDPA's rules (bool, q's dtype or float32; broadcastable to
    ``(B, Hq, Sq, Sk)``) and returned as a ``(Bm, Sqm, Sk)`` view of its first head: attention's
    band is the same for all heads, which `cached_structure` checks where the mask has them."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in (q_dtype, torch.float32):
        raise TypeError(f"{describe_tensor(name, mask)}: a mask is bool (True = visible) or "
                        f"additive in the query's dtype {q_dtype} or float32")
    if mask.dim() > 4 or any(s not in (1, full) for s, full in
                             zip(mask.shape[::-1], (seqlen_k, seqlen_q, heads, batch))):
        raise ValueError(f"{describe_tensor(name, mask)} does not broadcast to (B, Hq, Sq, Sk) "
                         f"= {(batch, heads, seqlen_q, seqlen_k)}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
    # A dimension expanded with stride 0 holds one value: keep one.
    m = m[tuple(slice(0, 1) if m.stride(i) == 0 else slice(None) for i in range(4))]
    return m[:, 0].expand(m.shape[0], m.shape[2], seqlen_k)


def _heads_differ(attn_mask: torch.Tensor) -> torch.Tensor | None:
    """A device boolean: whether a 4-D mask with a materialised head dimension holds different
    values in some head (None where it has one head)."""
    if attn_mask.dim() < 4 or attn_mask.shape[1] == 1 or attn_mask.stride(1) == 0:
        return None
    return (attn_mask != attn_mask[:, :1]).any()


def _read(attn_mask, mask, batch, seqlen_q, name) -> MaskStructure | None:
    differ = _heads_differ(attn_mask)
    if differ is not None and bool(differ):  # one sync, for a mask that has heads
        raise ValueError(
            f"{describe_tensor(name, attn_mask)} differs between heads; attnkit computes one "
            "mask for all heads (pass a mask whose head dimension is 1)")
    return mask_structure(mask, batch, seqlen_q)


#: Masks whose structure `cached_structure` keeps: a model's few masks of one step.
CACHE_SIZE = 16
_cache: OrderedDict[int, tuple] = OrderedDict()


def cached_structure(attn_mask: torch.Tensor, batch: int, heads: int, seqlen_q: int,
                     seqlen_k: int, q_dtype: torch.dtype,
                     name: str = "attn_mask") -> MaskStructure | None:
    """`mask_structure` of `broadcast_mask` of ``attn_mask``, after checking that a mask with
    a head dimension holds the same values in every head (else a ``ValueError``), remembered
    for that ``attn_mask`` tensor while it lives and is not modified in place (its version
    counter): the read costs a device sync and the broadcast a few views, which a model's
    later layers, passed the same mask, then skip. Inference tensors (no version counter) and
    traced calls are read every time."""
    def read():
        mask = broadcast_mask(attn_mask, batch, heads, seqlen_q, seqlen_k, q_dtype, name)
        return _read(attn_mask, mask, batch, seqlen_q, name)

    if (not isinstance(attn_mask, torch.Tensor) or attn_mask.is_inference()
            or torch.compiler.is_compiling()):
        return read()
    key = (attn_mask._version, tuple(attn_mask.shape), attn_mask.stride(), attn_mask.dtype,
           attn_mask.device, attn_mask.storage_offset(), batch, heads, seqlen_q, seqlen_k,
           q_dtype)
    ident = id(attn_mask)
    entry = _cache.get(ident)
    if entry is not None and entry[0]() is attn_mask and entry[1] == key:
        _cache.move_to_end(ident)
        return entry[2]
    found = read()
    _cache[ident] = (weakref.ref(attn_mask, lambda _, ident=ident: _forget(ident)), key, found)
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return found


def _forget(ident: int) -> None:
    """Drop a freed mask's entry (unless the id was already reused by a newer entry)."""
    entry = _cache.get(ident)
    if entry is not None and entry[0]() is None:
        del _cache[ident]
