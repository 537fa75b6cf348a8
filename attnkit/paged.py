"""Paged KV caches: page pools addressed through a per-sequence block table.

A serving engine keeps one pool of fixed-size pages per layer instead of one contiguous cache
per sequence: sequence ``b``'s position ``p`` lives at offset ``p % page_size`` of page
``block_table[b, p // page_size]``. Pages are any size from 1, in any order, and may be shared
between sequences (a common prompt prefix). This module holds what the core does for them:

- `attention_paged` (reached through ``attnkit.attention_with_kvcache(..., block_table=)``):
  validate, append the new keys/values into their pages in place, attend on a backend that
  declares ``Capabilities.paged`` (`attnkit.backend.Backend.forward_paged`);
- `append_paged`: the append alone, for an engine that writes tokens without attending;
- `gather_pages`: a sequence-major copy of the keys a table addresses, for backends that
  compute paged attention through their dense path (the reference, torch-blocked).

Validation (``validate``): every condition on the values (fill levels, the table entries
they need, append slots) is one range check of one vector against bounds kept per call
signature, a handful of operations (`check_table`). "host" reads its one boolean (on CUDA
one synchronisation) and, only if it is false, finds the culprit and raises ``ValueError``
naming the sequence before anything is written; "device" never synchronises: the check
feeds one ``torch._assert_async`` queued on the stream before the write, so a violation
stops the stream with a device-side assertion (the CUDA context is unusable afterwards) and
neither the write nor the attention kernel runs. On CPU both raise before writing. A call
that appends nothing, without a left window, on a backend declaring ``paged_checks`` queues
no check under "device": its kernel checks the fill levels and the entries as it reads them
and stops on a bad one (`attnkit.backend.Backend.forward_paged`), so a decoding step costs
the kernel alone; an appending call under "device" is offered to such a backend's
`attnkit.backend.Backend.append_paged` (this module's checks and write in its own kernels).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import kvcache  # the module, not its names: kvcache imports this module first
from .api import _empty_result, autocast_device
from .backend import check_forward_result
from .registry import registry
from .spec import (
    UNBOUNDED,
    AttentionProblem,
    check_heads,
    check_lengths_tensor,
    check_scale,
    check_softcap,
    check_window,
    describe_tensor,
)

VALIDATE_MODES = ("host", "device")


def attention_paged(q, k_pages, v_pages, cache_seqlens, k_new, v_new, block_table, *,
                    causal=True, scale=None, window=None, softcap=None, return_lse=False,
                    backend=None, validate="host"):
    """`attnkit.attention_with_kvcache` with ``block_table`` given (see its docstring)."""
    if autocast_device(q) is not None:  # the pools keep their dtype: nothing is cast
        with torch.autocast(q.device.type, enabled=False):
            return attention_paged(q, k_pages, v_pages, cache_seqlens, k_new, v_new,
                                   block_table, causal=causal, scale=scale, window=window,
                                   softcap=softcap, return_lse=return_lse, backend=backend,
                                   validate=validate)
    options = (causal, scale, window, softcap, return_lse, validate, _table_key(block_table))
    key = kvcache._metadata_key(q, k_pages, v_pages, cache_seqlens, k_new, v_new, options)
    known = _validated.get(key) if key is not None else None
    if known is None:
        s_new = check_paged_inputs(q, k_pages, v_pages, cache_seqlens, k_new, v_new,
                                   block_table, validate)
        problem = paged_problem(q, k_pages, block_table, causal=causal, scale=scale,
                                window=window, softcap=softcap, return_lse=return_lse)
        check = table_check(*block_table.shape, k_pages.shape[0], k_pages.shape[2], s_new,
                            cache_seqlens.dtype, q.device)
        if key is not None and not _capturing(q.device):  # (see table_check)
            if len(_validated) >= _MAX_VALIDATED:
                _validated.clear()
            _validated[key] = (s_new, problem, check)
    else:
        s_new, problem, check = known
    # Refuse (bad options, no backend for this problem) before the pools are written.
    chosen = registry.select(problem, backend)
    table = block_table if block_table.is_contiguous() else block_table.contiguous()
    # Under "device" a backend declaring paged_checks checks what its kernels read: nothing
    # is queued for a step without an append or a left window, and an append is offered to
    # the backend, checks included (None: the core's).
    backend_checks = (validate == "device" and chosen.capabilities.paged_checks
                      and block_table.shape[0] > 0)
    seqlens_k = None
    if backend_checks and s_new and check is not None:
        lens = cache_seqlens if cache_seqlens.is_contiguous() else cache_seqlens.contiguous()
        seqlens_k = chosen.append_paged(k_pages, v_pages, table, lens, k_new, v_new)
    if seqlens_k is None and not (backend_checks and not s_new
                                  and problem.window[0] == UNBOUNDED):
        targets = check_table(k_pages, block_table, cache_seqlens, s_new, validate, check)
        if targets is not None:
            _write(k_pages, v_pages, targets, k_new, v_new)
    if seqlens_k is None:
        # Kernels only read seqlens_k: without an append the caller's int32 tensor is passed
        # as is (one launch less per decoding step), as on the contiguous path.
        seqlens_k = (cache_seqlens if s_new == 0 and cache_seqlens.dtype == torch.int32
                     and cache_seqlens.is_contiguous()
                     else cache_seqlens.to(torch.int32) + s_new)
    if problem.is_empty:
        out, lse = _empty_result(problem, q)
    else:
        out, lse = check_forward_result(
            chosen, q, chosen.forward_paged(problem, q, k_pages, v_pages, table, seqlens_k),
            method="forward_paged")
    return (out, lse) if return_lse else out


#: (S_new, problem, `TableCheck`) of recent calls by their metadata
#: (`attnkit.kvcache._metadata_key` with the table's): a serving loop repeats a few call
#: signatures, and their checks are host time every step. The values (fill levels, table
#: entries) are checked on every call.
_validated: dict = {}
_MAX_VALIDATED = 256


def _table_key(block_table):
    if not isinstance(block_table, torch.Tensor):
        return object()  # never equal: such a call takes the checks, which raise
    return (type(block_table), block_table.shape, block_table.dtype, block_table.device,
            block_table.is_contiguous())


def append_paged(k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                 cache_seqlens: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, *,
                 validate: str = "host") -> None:
    """Write ``k_new``/``v_new`` ``(B, Hkv, S_new, D)`` into page pools in place, at positions
    ``cache_seqlens[b] ... cache_seqlens[b] + S_new - 1`` of sequence ``b``, across page
    boundaries, without attending. Pools ``(num_pages, Hkv, page_size, D)`` with any strides,
    ``block_table`` int32 ``(B, max_pages)``, ``cache_seqlens`` int32/int64 ``(B,)`` (read,
    never modified). Nothing but those slots is written. Raises before writing anything if a
    page an appended (or existing) position needs is negative or outside the pool, if a row
    has too few pages for ``cache_seqlens[b] + S_new`` positions, or if two sequences would
    write one slot (a shared page appended to: copy it first); ``validate`` as in
    `attnkit.paged`."""
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if k_new.dim() != 4:
        raise ValueError(f"{describe_tensor('k_new', k_new)} must have 4 dimensions "
                         "(B, Hkv, S_new, D)")
    s_new = k_new.shape[2]
    with torch.no_grad():  # k_new stands in for the queries (one per new position)
        check_paged_inputs(k_new, k_pages, v_pages, cache_seqlens, k_new, v_new, block_table,
                           validate)
        targets = check_table(k_pages, block_table, cache_seqlens, s_new, validate)
        if targets is not None:
            _write(k_pages, v_pages, targets, k_new, v_new)


def paged_problem(q, k_pages, block_table, *, causal=True, scale=None, window=None,
                  softcap=None, return_lse=False) -> AttentionProblem:
    """The `AttentionProblem` of a paged call: ``seqlen_k`` is a table row's capacity,
    ``page_size`` the pools' page size, ``has_seqlens_k`` always (the fill levels)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    B, Hq, Sq, D = q.shape
    _, Hkv, P, _ = k_pages.shape
    return AttentionProblem(
        B, Hq, Hkv, Sq, block_table.shape[1] * P, D, q.dtype, q.device, causal,
        check_scale(scale, D), check_window(window), True, check_softcap(softcap),
        return_lse, False, torch.are_deterministic_algorithms_enabled(), page_size=P)


def check_paged_inputs(q, k_pages, v_pages, cache_seqlens, k_new, v_new, block_table,
                       validate) -> int:
    """Types, shapes, dtypes and devices of a paged call (no values read); returns S_new."""
    from .kvcache import check_call_tensors, check_new_keys

    if validate not in VALIDATE_MODES:
        raise ValueError(f"validate must be one of {VALIDATE_MODES}, got {validate!r}")
    check_call_tensors(q, k_pages, v_pages, k_new, v_new, "(num_pages, Hkv, page_size, D)",
                       "the page pools")
    if k_pages.shape != v_pages.shape:
        raise ValueError("k_cache and v_cache page pools must have the same shape (num_pages, "
                         f"Hkv, page_size, D): {describe_tensor('k_cache', k_pages)}, "
                         f"{describe_tensor('v_cache', v_pages)}")
    B, Hq, Sq, D = q.shape
    _, Hkv, P, Dc = k_pages.shape
    if Dc != D:
        raise ValueError(f"{describe_tensor('k_cache', k_pages)} must be (num_pages, Hkv, "
                         f"page_size, D={D}) to match {describe_tensor('q', q)}")
    if P == 0:
        raise ValueError(f"{describe_tensor('k_cache', k_pages)}: the page size (dimension 2) "
                         "must be at least 1")
    check_heads(q, "k_cache", k_pages, Hq, Hkv, D)
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be an int32 tensor (B, max_pages), got "
                        f"{type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"{describe_tensor('block_table', block_table)} must have dtype "
                        "torch.int32")
    if block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"{describe_tensor('block_table', block_table)} must have shape "
                         f"(B={B}, max_pages), one row of page indices per sequence")
    if block_table.device != q.device:
        raise ValueError(f"{describe_tensor('block_table', block_table)} must be on q's "
                         f"device {q.device}")
    s_new = check_new_keys(q, k_pages, v_pages, k_new, v_new, Hkv)
    check_lengths_tensor("cache_seqlens", cache_seqlens, q, B)
    return s_new


class TableCheck(NamedTuple):
    """Constant tensors of `check_table` for one signature (batch, table and pool shapes,
    ``S_new``, the fill levels' dtype, the device), made by kernels (no host copy: a first
    call may be captured in a CUDA graph). The checked vector is the needed entries
    (``B * M``; the need mask itself without pages), the fill levels (``B``) and, with an
    append into several sequences, the gaps between the sorted append slots
    (``B * S_new - 1``)."""

    first: torch.Tensor  # per table column j: j * page_size - S_new
    new: torch.Tensor  # 0 .. S_new - 1, int64: the appended positions past a fill level
    zero: torch.Tensor  # 0-d, the table's dtype: `where`'s fill for entries not needed
    lo: torch.Tensor  # bounds of the vector: entries [0, N - 1], fill levels
    hi: torch.Tensor  # [0, M * P - S_new], gaps >= 1


_TABLE_CHECKS: dict = {}  # `TableCheck` by signature, up to _MAX_VALIDATED


def table_check(B: int, M: int, N: int, P: int, s_new: int, lens_dtype,
                device) -> TableCheck | None:
    """The `TableCheck` of a signature (kept: a few per serving loop); None where no row
    can hold ``S_new`` positions (refused whatever the values)."""
    if M * P < s_new:
        return None
    key = (B, M, N, P, s_new, lens_dtype, device)
    made = _TABLE_CHECKS.get(key)
    if made is None:
        # The compare runs in the fill levels' dtype where the table's positions fit it.
        fits = lens_dtype == torch.int64 or M * P < 2**31
        first = torch.arange(-s_new, M * P - s_new, P, device=device,
                             dtype=lens_dtype if fits else torch.int64)
        n_gaps = B * s_new - 1 if s_new and B > 1 else 0
        dtype = torch.int64 if lens_dtype == torch.int64 or n_gaps else torch.int32
        lo = torch.zeros(B * M + B + n_gaps, dtype=dtype, device=device)
        hi = torch.empty_like(lo)
        top = torch.iinfo(dtype).max  # bounds past the dtype hold every value it has
        hi[:B * M].fill_(min(max(N - 1, 0), top))
        hi[B * M:B * M + B].fill_(min(M * P - s_new, top))
        lo[B * M + B:].fill_(1)
        hi[B * M + B:].fill_(top)
        zero = torch.zeros((), dtype=torch.int32, device=device)
        new = torch.arange(s_new, device=device)
        made = TableCheck(first, new, zero, lo, hi)
        if not _capturing(device):  # captured kernels fill them only when the graph replays
            if len(_TABLE_CHECKS) >= _MAX_VALIDATED:
                del _TABLE_CHECKS[next(iter(_TABLE_CHECKS))]  # the oldest: a loop's own stay
            _TABLE_CHECKS[key] = made
    return made


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_table(k_pages, block_table, cache_seqlens, s_new, validate,
                check: TableCheck | None = None) -> tuple | None:
    """The values of a paged call: fill levels >= 0, ``cache_seqlens[b] + S_new`` positions
    within the row's pages, every entry they need in ``[0, num_pages)``, and no slot written
    by two sequences. All four are one range check of one vector (the needed entries, the
    fill levels, the gaps between sorted append slots; see `TableCheck`, ``check`` if the
    caller kept it): "device" queues it as one ``torch._assert_async`` (no host
    synchronisation), "host" reads its one boolean and, only when it is false, finds the
    culprit and raises ``ValueError``. Returns the append's targets (`_targets`), or None
    without an append."""
    B, M = block_table.shape
    if B == 0:
        return None
    N, _, P, _ = k_pages.shape
    lens, ok, targets = cache_seqlens, None, None
    if check is None:
        check = table_check(B, M, N, P, s_new, lens.dtype, lens.device)
    if check is not None:
        # Page j is needed iff j * P - S_new < lens[b] (no sum that could overflow).
        need = check.first < lens.unsqueeze(1)
        parts = [(need if N == 0 else torch.where(need, block_table, check.zero)).reshape(-1),
                 lens]
        if s_new:
            targets = _targets(block_table, lens, check.new, P, N)
            if B > 1:
                slots = _sorted_slots(targets, P)
                parts.append(slots[1:] - slots[:-1])
        z = torch.cat(parts)
        ok = (z.clamp(check.lo, check.hi) == z).all()
    if validate == "device":
        if ok is None:
            ok = torch.zeros((), dtype=torch.bool, device=lens.device)
        torch._assert_async(
            ok,
            "paged KV cache: a negative fill level, too few pages for a sequence's positions, "
            "a needed block_table entry outside [0, num_pages), or two sequences appending "
            "into one slot (validate='host' says which)")
        return targets
    if ok is not None and bool(ok):  # the one synchronisation of a host check
        return targets
    _raise_culprit(k_pages, block_table, cache_seqlens, s_new, targets)


def _raise_culprit(k_pages, block_table, cache_seqlens, s_new, targets):
    """The ``ValueError`` of a failed host check, naming the sequence or entry (reads the
    values again: only on failure)."""
    B, M = block_table.shape
    N, _, P, _ = k_pages.shape
    lens = cache_seqlens.to(torch.int64)
    lo, hi = int(lens.min()), int(lens.max()) + s_new
    if lo < 0:
        b = int(torch.argmin(lens))
        raise ValueError(f"{describe_tensor('cache_seqlens', cache_seqlens)} values must be "
                         f">= 0; sequence {b} has {lo}; nothing was written")
    if hi > M * P:
        b = int(torch.argmax(lens))
        L = int(lens[b])
        raise ValueError(
            f"paged KV cache overflow: sequence {b} holds {L} positions and {s_new} new ones "
            f"need {L + s_new} > {M} pages x page size {P} = {M * P} in its "
            f"{describe_tensor('block_table', block_table)} row; nothing was written")
    need = torch.arange(0, M * P, P, device=lens.device) < (lens + s_new)[:, None]
    bad_page = need & ((block_table < 0) | (block_table >= N))
    n_bad = int(bad_page.sum())
    if n_bad:
        b, j = (int(x) for x in bad_page.nonzero()[0])
        raise ValueError(
            f"{describe_tensor('block_table', block_table)}: entry [{b}, {j}] = "
            f"{int(block_table[b, j])} is needed (sequence {b} has {int(lens[b])} + {s_new} "
            f"positions, page size {P}) but is not a page of the pool "
            f"{describe_tensor('k_cache', k_pages)} (valid: 0 .. {N - 1}); {n_bad} such "
            "entries; nothing was written")
    # What is left of the range check: sorted append slots that repeat.
    slots = _sorted_slots(targets, P)
    dup = int((slots[1:] == slots[:-1]).sum())
    raise ValueError(
        f"{dup} slot(s) of the page pool would be appended to by two sequences (their "
        f"{describe_tensor('block_table', block_table)} rows share the page their new "
        "positions fall in); copy a shared page before appending into it; nothing was "
        "written")


def _sorted_slots(targets, P) -> torch.Tensor:
    """Every appended position's slot in the pool (``page * P + offset``), sorted: two equal
    neighbours are two sequences appending into one slot."""
    return torch.add(targets[1], targets[0], alpha=P).view(-1).sort().values


def _targets(block_table, lens, new, P, N):
    """``(page, offset)``, int64 ``(B, S_new)`` each: where every appended position goes
    (the table holds at least ``S_new`` positions). Positions are clamped into the table and
    pages into the pool: in range after a host check; with "device" they keep the write in
    bounds while its assertion is in flight."""
    M = block_table.shape[1]
    pos = (lens.unsqueeze(1) + new).clamp_(0, M * P - 1)
    col = torch.div(pos, P, rounding_mode="floor")
    page = block_table.gather(1, col).to(torch.int64).clamp_(0, max(N - 1, 0))
    return page, pos.remainder(P)


def _write(k_pages, v_pages, targets, k_new, v_new) -> None:
    """One indexed store per pool: the indexed view ``pool[page, :, offset]`` is
    ``(B, S_new, Hkv, D)`` (advanced indices around a slice)."""
    page, off = targets
    k_pages[page, :, off] = k_new.permute(0, 2, 1, 3)
    v_pages[page, :, off] = v_new.permute(0, 2, 1, 3)


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor, seqlens_k: torch.Tensor,
                 n_keys: int) -> torch.Tensor:
    """The keys (or values) of every sequence as a ``(B, Hkv, n_keys, D)`` tensor (a
    ``(B, n_keys, Hkv, D)`` buffer, transposed): position ``p`` of row ``b`` from its page, 0
    at ``p >= seqlens_k[b]`` (those slots are never read: their table entries may be
    anything). ``n_keys`` at most the table's capacity."""
    B = block_table.shape[0]
    N, H, P, D = pages.shape
    pos = torch.arange(n_keys, device=pages.device)
    live = pos[None, :] < seqlens_k.to(torch.int64)[:, None]  # (B, n)
    if N == 0 or B == 0 or n_keys == 0:
        return pages.new_zeros((B, n_keys, H, D)).transpose(1, 2)
    col = torch.div(pos, P, rounding_mode="floor").expand(B, n_keys)
    page = torch.where(live, block_table.gather(1, col).to(torch.int64), 0)
    got = pages[page, :, (pos % P).expand(B, n_keys)]  # (B, n, H, D)
    return torch.where(live[:, :, None, None], got, 0).transpose(1, 2)


def forward_paged_via_dense(forward, problem, q, k_pages, v_pages, block_table, seqlens_k):
    """`Backend.forward_paged` through a backend's dense ``forward``: the pages each sequence
    needs gathered into sequence-major copies (one host read of the longest length), then
    attention with ``seqlens_k``."""
    n_keys = int(seqlens_k.max()) if seqlens_k.numel() else 0
    if n_keys == 0:
        return _empty_result(problem, q)
    k = gather_pages(k_pages, block_table, seqlens_k, n_keys)
    v = gather_pages(v_pages, block_table, seqlens_k, n_keys)
    dense = problem._replace(seqlen_k=n_keys, page_size=0)
    return forward(dense, q, k, v, seqlens_k)
