"""Decoding with a KV cache, and merging attention computed over disjoint key sets.

- `attention_with_kvcache`: append the new keys/values of a decoding step into preallocated
  caches (in place) and attend over each batch's filled prefix. Because causal masks are
  aligned to the bottom-right corner of each batch's *valid* keys (DESIGN.md), attention over
  a cache is plain `attnkit.attention` with ``seqlens_k = cache_seqlens + S_new``: the newest
  query sees every cached key, the ones before it one key fewer each.
- `merge_attention`: the online-softmax rescaling as a public function, to combine partial
  results (out, lse) over disjoint key sets, e.g. a cached prefix and a fresh suffix, or
  key splits computed on different devices.
- `append_paged` (from `attnkit.paged`): new keys/values written into a paged cache's pages
  without attending.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .api import autocast_device, run_problem
from .paged import VALIDATE_MODES, append_paged, attention_paged
from .registry import registry
from .spec import (
    FLOAT_DTYPES,
    AttentionProblem,
    check_heads,
    check_lengths_tensor,
    describe_tensor,
)


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    *,
    block_table: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    validate: str = "host",
):
    """Attention of new queries over a KV cache, appending new keys/values first.

    Arguments:
        q: ``(B, Hq, Sq, D)``, the queries of this step.
        k_cache, v_cache: ``(B, Hkv, S_max, D)``, preallocated; positions
            ``< cache_seqlens[b]`` of batch ``b`` hold its keys/values so far. Any strides (a
            ``(B, S_max, Hkv, D)`` buffer passed as ``.transpose(1, 2)`` is written and read in
            place).
        cache_seqlens: int32/int64 ``(B,)`` on q's device: how many positions of each batch's
            cache are filled **before** this call. It is read, never modified: the caller
            advances it (``cache_seqlens += S_new``) once the step is accepted.
        k_new, v_new: ``(B, Hkv, S_new, D)`` or both ``None``. When given they are written in
            place into the caches at positions ``cache_seqlens[b] ... cache_seqlens[b] + S_new
            - 1`` of every batch, then attended; ``Sq`` must equal ``S_new`` (query ``i`` is the
            token at position ``cache_seqlens[b] + i``). Without them (``S_new = 0``) the ``Sq``
            queries attend over the filled prefix as it is, bottom-right aligned.
        block_table: int32 ``(B, max_pages)``, or None for contiguous caches. Given, the
            caches are page pools ``(num_pages, Hkv, page_size, D)`` (any page size from 1,
            any strides: a ``(num_pages, page_size, Hkv, D)`` pool is passed as
            ``.transpose(1, 2)``), and sequence ``b``'s position ``p`` is at offset
            ``p % page_size`` of page ``block_table[b, p // page_size]``. Pages may be in
            any order and shared between sequences (a common prefix); entries past the
            pages a sequence needs are never read and may hold anything (-1). Appends span
            page boundaries; appending into a slot another sequence reads as a key changes
            its keys too (copy a shared page before appending into it). Backends declare
            this with ``Capabilities.paged`` (`attnkit.backend.Backend.forward_paged`).
        causal, scale, window, softcap, return_lse, backend: as in `attnkit.attention`; the
            masks apply over each batch's ``cache_seqlens[b] + S_new`` valid keys. ``causal``
            defaults to True (a decoder's self-attention); use False for cross-attention over an
            encoder's outputs.
        validate: "host" (default): the fill levels (and, paged, the table entries they
            need) are checked on the host before anything is written (on CUDA one
            synchronisation; a contiguous cache without an append needs none: its kernels
            clamp fill levels), raising ``ValueError`` naming the sequence and entry.
            "device": no synchronisation (CUDA graphs, decoding loops that keep the host
            ahead of the GPU, engines that build their own tables): the same conditions are
            one ``torch._assert_async`` queued before the write, so a bad fill level or
            table stops the stream with a device-side assertion before anything is written
            or read (the CUDA context is unusable afterwards; on CPU it raises at once; see
            `attnkit.paged`). A paged call appending nothing, without a left window, on a
            backend declaring ``Capabilities.paged_checks`` queues no check at all: its
            kernel checks what it reads and stops the same way on a bad fill level or entry;
            an appending one may be checked and written by such a backend in one launch
            (`attnkit.backend.Backend.append_paged`).

    Returns:
        ``out`` ``(B, Hq, Sq, D)``, or ``(out, lse)`` if ``return_lse``.

    Under ``torch.autocast`` nothing is cast: the caches are written in place in their own
    dtype, so q, k_new and v_new must already have it.

    Forward only: raises if gradients are requested. Raises ``ValueError`` before writing
    anything if ``cache_seqlens[b] + S_new > S_max`` or ``cache_seqlens[b] < 0`` for any
    batch (``validate="device"``: stops the stream instead), or, paged, if a sequence's
    positions need more pages than its table row holds, a page they need is negative or
    outside the pool, or two sequences would append into one slot.
    """
    if block_table is not None:
        return attention_paged(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table,
                               causal=causal, scale=scale, window=window, softcap=softcap,
                               return_lse=return_lse, backend=backend, validate=validate)
    if autocast_device(q) is not None:  # no cast (the caches keep their dtype); the backend
        with torch.autocast(q.device.type, enabled=False):  # runs without autocast
            return attention_with_kvcache(
                q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal=causal, scale=scale,
                window=window, softcap=softcap, return_lse=return_lse, backend=backend,
                validate=validate)
    options = (causal, scale, window, softcap, return_lse, validate)
    key = _metadata_key(q, k_cache, v_cache, cache_seqlens, k_new, v_new, options)
    problem = _validated.get(key) if key is not None else None
    if problem is None:
        _check_kvcache_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new, validate)
    s_new = 0 if k_new is None else k_new.shape[2]
    if problem is not None and (s_new > 0 or cache_seqlens.device.type == "cpu"):
        # The metadata was checked before; the fill levels are values, checked every call.
        _check_cache_seqlens(cache_seqlens, q, q.shape[0], k_cache.shape[2], s_new, validate)
    # Kernels only read seqlens_k, so with nothing appended the caller's int32 tensor is
    # passed as is (one launch less per decoding step); otherwise a new tensor.
    seqlens_k = (cache_seqlens if s_new == 0 and cache_seqlens.dtype == torch.int32
                 else cache_seqlens.to(torch.int32) + s_new)
    if problem is None:
        problem = AttentionProblem.from_tensors(
            q, k_cache, v_cache, causal=causal, scale=scale, window=window,
            seqlens_k=seqlens_k, softcap=softcap, return_lse=return_lse, needs_grad=False,
            check_values=False)
        if key is not None:
            if len(_validated) >= _MAX_VALIDATED:
                _validated.clear()
            _validated[key] = problem
    # Refuse (bad options, no backend for this problem) before the caches are written.
    chosen = registry.select(problem, backend)
    if k_new is not None and s_new > 0 and q.shape[0] > 0:
        _append(k_cache, v_cache, cache_seqlens, k_new, v_new)
    return run_problem(problem, chosen, q, k_cache, v_cache, seqlens_k)


#: Problems of recent calls by `_metadata_key`: a decoding loop repeats one call signature
#: every step, and validating it again was a third of a step's host time (docs/tuning.md,
#: "Host time and the launch path").
_validated: dict = {}
_MAX_VALIDATED = 256


def _metadata_key(q, k_cache, v_cache, cache_seqlens, k_new, v_new, options):
    """Everything `_check_kvcache_inputs` and `AttentionProblem.from_tensors` read, except
    the fill levels' values; None for inputs that cannot be keyed (they take the slow path,
    which raises the proper error if they are wrong)."""
    try:
        new = None if k_new is None else (
            type(k_new), k_new.shape, k_new.dtype, k_new.device, k_new.requires_grad,
            type(v_new), v_new.shape, v_new.dtype, v_new.device, v_new.requires_grad)
        key = (type(q), q.shape, q.dtype, q.device, q.requires_grad,
               type(k_cache), k_cache.shape, k_cache.dtype, k_cache.device,
               k_cache.requires_grad,
               type(v_cache), v_cache.shape, v_cache.dtype, v_cache.device,
               v_cache.requires_grad,
               type(cache_seqlens), cache_seqlens.shape, cache_seqlens.dtype,
               cache_seqlens.device, new, options, torch.is_grad_enabled(),
               torch.are_deterministic_algorithms_enabled(),
               # where the caches lie decides whether appending to them is safe
               k_cache.stride(), v_cache.stride(), k_cache.data_ptr(), v_cache.data_ptr())
        hash(key)
    except (AttributeError, TypeError, RuntimeError):  # not tensors (or no storage), or an
        return None  # unhashable option (a list)
    return key


def _append(k_cache, v_cache, cache_seqlens, k_new, v_new) -> None:
    """Write every batch's new positions with one indexed store per cache (no batch loop)."""
    B, _, s_new, _ = k_new.shape
    dev = k_cache.device
    rows = torch.arange(B, device=dev).view(B, 1)
    pos = cache_seqlens.to(device=dev, dtype=torch.long).view(B, 1) + torch.arange(
        s_new, device=dev).view(1, s_new)
    # Advanced indices around a slice: the indexed view is (B, S_new, Hkv, D).
    k_cache[rows, :, pos] = k_new.permute(0, 2, 1, 3)
    v_cache[rows, :, pos] = v_new.permute(0, 2, 1, 3)


def check_call_tensors(q, k_cache, v_cache, k_new, v_new, cache_layout: str,
                       caches: str) -> None:
    """q, the caches (``cache_layout``, called ``caches`` in errors) and the optional new
    keys/values: tensors of 4 dims, one float dtype, one device, none requiring grad."""
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)]
    if (k_new is None) != (v_new is None):
        given = "k_new" if k_new is not None else "v_new"
        raise ValueError(f"k_new and v_new must be given together; only {given} was given")
    if k_new is not None:
        named += [("k_new", k_new), ("v_new", v_new)]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "(B, Hq, Sq, D)" if name == "q" else (
                cache_layout if "cache" in name else "(B, Hkv, S_new, D)")
            raise ValueError(f"{describe_tensor(name, t)} must have 4 dimensions {layout}, "
                             f"got {t.dim()}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{describe_tensor(name, t)}: dtype {t.dtype} is not supported; "
                            "attention takes float16, bfloat16, float32 or float64 inputs")
    if any(t.dtype != q.dtype for _, t in named):
        raise TypeError(f"q, {caches} and the new keys/values must share one dtype: "
                        + ", ".join(describe_tensor(n, t) for n, t in named))
    if any(t.device != q.device for _, t in named):
        raise ValueError(f"q, {caches} and the new keys/values must be on one device: "
                         + ", ".join(describe_tensor(n, t) for n, t in named))
    if torch.is_grad_enabled() and any(t.requires_grad for _, t in named):
        wanting = [n for n, t in named if t.requires_grad]
        raise RuntimeError(
            f"attention_with_kvcache is forward only, but {', '.join(wanting)} require(s) "
            "grad; call it under torch.no_grad() / torch.inference_mode(), or use "
            "attnkit.attention for training")


def check_new_keys(q, k_cache, v_cache, k_new, v_new, heads_kv: int) -> int:
    """``S_new`` of the keys/values to append (0 without), checked against q and the
    caches (or page pools), which must then be writable."""
    if k_new is None:
        return 0
    B, _, Sq, D = q.shape
    if k_new.shape != v_new.shape:
        raise ValueError(f"k_new and v_new must have the same shape (B, Hkv, S_new, D): "
                         f"{describe_tensor('k_new', k_new)}, "
                         f"{describe_tensor('v_new', v_new)}")
    Bn, Hn, s_new, Dn = k_new.shape
    if (Bn, Hn, Dn) != (B, heads_kv, D):
        raise ValueError(f"{describe_tensor('k_new', k_new)} must be (B={B}, Hkv={heads_kv}, "
                         f"S_new, D={D}) to match {describe_tensor('k_cache', k_cache)}")
    if Sq != s_new:
        raise ValueError(f"{describe_tensor('q', q)} has Sq={Sq} queries but "
                         f"{describe_tensor('k_new', k_new)} appends S_new={s_new} "
                         "positions; each new position needs its query (Sq == S_new)")
    if s_new > 0:
        _check_writable_caches(k_cache, v_cache)
    return s_new


def _check_kvcache_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new, validate) -> None:
    if validate not in VALIDATE_MODES:
        raise ValueError(f"validate must be one of {VALIDATE_MODES}, got {validate!r}")
    check_call_tensors(q, k_cache, v_cache, k_new, v_new, "(B, Hkv, S_max, D)", "the caches")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape (B, Hkv, S_max, D): "
                         f"{describe_tensor('k_cache', k_cache)}, "
                         f"{describe_tensor('v_cache', v_cache)}")
    B, Hq, Sq, D = q.shape
    Bc, Hkv, S_max, Dc = k_cache.shape
    if Bc != B or Dc != D:
        raise ValueError(f"{describe_tensor('k_cache', k_cache)} must be (B={B}, Hkv, S_max, "
                         f"D={D}) to match {describe_tensor('q', q)}")
    check_heads(q, "k_cache", k_cache, Hq, Hkv, D)
    s_new = check_new_keys(q, k_cache, v_cache, k_new, v_new, Hkv)
    if s_new > S_max:
        raise ValueError(f"KV cache overflow: {describe_tensor('k_new', k_new)} appends "
                         f"{s_new} positions to caches of S_max={S_max}; nothing was written")
    _check_cache_seqlens(cache_seqlens, q, B, S_max, s_new, validate)


def _check_writable_caches(k_cache, v_cache) -> None:
    """Refuse caches an in-place append would corrupt: one tensor passed as both, a stride-0
    (expanded) dimension that maps many positions to one element, or k and v sharing memory.
    Interleaved layouts that share a buffer without sharing an element (``kv[:, :, 0]`` and
    ``kv[:, :, 1]`` of a ``(B, S, 2, H, D)`` buffer) are fine."""
    if k_cache is v_cache:
        raise ValueError(f"k_cache and v_cache are the same tensor "
                         f"({describe_tensor('k_cache', k_cache)}); appending would write the "
                         "new values over the new keys; pass two buffers")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        for d, (n, st) in enumerate(zip(t.shape, t.stride())):
            if st == 0 and n > 1:
                raise ValueError(
                    f"{describe_tensor(name, t)} has stride 0 in dimension {d} (an expanded "
                    f"tensor): its {n} positions there are one element, so an append would "
                    "write them all; pass a materialized cache (.contiguous())")
    if _may_share_an_element(k_cache, v_cache):
        raise ValueError(
            f"{describe_tensor('k_cache', k_cache)} with strides {k_cache.stride()} and "
            f"{describe_tensor('v_cache', v_cache)} with strides {v_cache.stride()} overlap in "
            "memory: appending keys would overwrite values (or the reverse); pass caches that "
            "share no element")


def _may_share_an_element(a: torch.Tensor, b: torch.Tensor, budget: int = 100_000) -> bool:
    """Whether two tensors of one dtype, without stride-0 dimensions, have an element in
    common: exact (a bounded search for index vectors ``i``, ``j`` with
    ``addr_a + sum(i * stride_a) == addr_b + sum(j * stride_b)``); True where the search
    gives up, so a layout it cannot decide is refused, not trusted."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    size = a.element_size()
    spans = []
    for t in (a, b):
        start = t.data_ptr()
        spans.append((start, start + size * (1 + sum((n - 1) * st for n, st in
                                                     zip(t.shape, t.stride())))))
    if spans[0][1] <= spans[1][0] or spans[1][1] <= spans[0][0]:
        return False  # disjoint address ranges (always so for separate allocations)
    delta, misaligned = divmod(b.data_ptr() - a.data_ptr(), size)
    if misaligned:
        return True
    dims_a = [(st, n) for n, st in zip(a.shape, a.stride()) if n > 1]
    dims_b = [(st, n) for n, st in zip(b.shape, b.stride()) if n > 1]
    if dims_a == dims_b:  # one layout at two offsets: search the index differences
        digits = [(st, 1 - n, n - 1) for st, n in dims_a]
    else:
        digits = [(st, 0, n - 1) for st, n in dims_a] + [(st, 1 - n, 0) for st, n in dims_b]
    digits.sort(reverse=True)
    try:
        return _has_solution(delta, digits, budget)
    except _SearchTooLong:
        return True


class _SearchTooLong(Exception):
    pass


def _has_solution(target: int, digits: list[tuple[int, int, int]], budget: int) -> bool:
    """Whether ``sum(x_t * s_t) == target`` for integers ``lo_t <= x_t <= hi_t``, digits
    ``(s_t > 0, lo_t, hi_t)`` by decreasing stride; a depth-first search that only tries the
    ``x_t`` leaving a remainder the later digits can reach."""
    n = len(digits)
    rest_lo, rest_hi = [0] * (n + 1), [0] * (n + 1)
    for t in range(n - 1, -1, -1):
        st, lo, hi = digits[t]
        rest_lo[t], rest_hi[t] = rest_lo[t + 1] + lo * st, rest_hi[t + 1] + hi * st
    visited = 0

    def search(t: int, remainder: int) -> bool:
        nonlocal visited
        visited += 1
        if visited > budget:
            raise _SearchTooLong
        if t == n:
            return remainder == 0
        st, lo, hi = digits[t]
        first = max(lo, -((rest_hi[t + 1] - remainder) // st))  # ceil((r - rest_hi) / st)
        last = min(hi, (remainder - rest_lo[t + 1]) // st)
        return any(search(t + 1, remainder - x * st) for x in range(first, last + 1))

    return search(0, target)


def _check_cache_seqlens(s, q, B: int, S_max: int, s_new: int, validate: str = "host") -> None:
    check_lengths_tensor("cache_seqlens", s, q, B)
    if B == 0 or (s_new == 0 and s.device.type != "cpu"):
        # Nothing will be written: no reason to stall the GPU for a host-side check (the
        # kernels clamp fill levels to the cache).
        return
    if validate == "device":  # queued before the write; no synchronisation (S_new <= S_max)
        torch._assert_async(
            (s.clamp(0, S_max - s_new) == s).all(),
            "KV cache: a negative fill level, or one whose appended positions pass S_max "
            "(validate='host' says which)")
        return
    lo, hi = (int(x) for x in torch.aminmax(s))  # one sync, before anything is written
    if lo < 0:
        raise ValueError(f"{describe_tensor('cache_seqlens', s)} values must be >= 0, got "
                         f"min {lo}")
    if hi + s_new > S_max:
        b = int(torch.argmax(s.to(torch.long)))
        raise ValueError(
            f"KV cache overflow: batch {b} holds {hi} positions and {s_new} new ones would "
            f"need {hi + s_new} > S_max={S_max}; nothing was written")


__all__ = ["append_paged", "attention_with_kvcache", "merge_attention"]


def merge_attention(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key sets into attention over their union, exactly.

    Partial ``i`` over key set ``K_i`` is ``out_i = sum_{j in K_i} exp(s_j - lse_i) v_j`` with
    ``lse_i = log sum_{j in K_i} exp(s_j)``. Over the union::

        lse = log sum_i exp(lse_i)                    (computed as m + log sum_i exp(lse_i - m),
                                                        m = max_i lse_i, so nothing overflows)
        out = sum_i exp(lse_i - lse) * out_i

    A partial whose row saw no key has ``lse_i = -inf`` and weight 0, whatever its ``out_i``
    (even NaN); a row no partial saw gets ``out = 0`` and ``lse = -inf``. NaN is never made
    here, and never dropped: a NaN ``lse_i``, or a NaN in the ``out_i`` of a partial with
    weight, makes that row's result NaN (a NaN query row stays NaN through a merge).

    Differentiable with respect to every ``out_i`` and ``lse_i`` (torch ops throughout); the
    gradients are finite where a partial's ``lse_i`` is ``-inf`` (zero for that partial). The
    partials of ``attnkit.attention(..., return_lse=True)`` carry their lse gradient on to q
    and k on backends declaring ``Capabilities.lse_grad``; on others the backward raises.

    Arguments:
        outs: a list or tuple of one or more tensors of one shape ``(..., D)`` (e.g.
            ``(B, Hq, Sq, D)``), one floating dtype, one device.
        lses: a list or tuple of matching natural-log lse tensors of shape ``(...)``, e.g.
            ``(B, Hq, Sq)``, floating, on the same device.

    Returns:
        ``(out, lse)``: out in the partials' dtype, lse float32 (float64 for float64 partials
        or lses). The sums run in float32 (float64 for float64 inputs).

    Raises ``TypeError`` for an argument that is not a list/tuple of tensors or a tensor that is
    not floating point, ``ValueError`` for mismatched counts, shapes, dtypes or devices; each
    names the argument (``outs[2]``, ``lses[0]``) with its shape, dtype and device.
    """
    outs, lses = _merge_inputs(outs, lses)
    dtype = outs[0].dtype
    acc = torch.float64 if torch.float64 in (dtype, *(s.dtype for s in lses)) else torch.float32
    lse_stack = torch.stack([s.to(acc) for s in lses])  # (P, ...)
    # The max only keeps exp() in range; it cancels in the result, so it carries no gradient.
    m = lse_stack.detach().amax(0)  # NaN if any part is NaN: propagates through w below
    m = torch.where(m == float("-inf"), 0.0, m)  # a row no part saw: w = exp(-inf) = 0
    w = torch.exp(lse_stack - m)  # (P, ...); exp(-inf) = 0: empty partials weigh nothing
    total = w.sum(0)
    empty = total == 0  # NaN compares False: a NaN row is not empty, it stays NaN
    safe_total = torch.where(empty, 1.0, total)
    lse = torch.where(empty, float("-inf"), m + torch.log(safe_total))
    w = (w / safe_total).unsqueeze(-1)
    out = None
    for wi, o in zip(w, outs):
        # Select, not multiply, for weightless partials: their out may hold anything (0 * NaN
        # is NaN), and the gradient through the selected-away branch must stay finite too.
        weightless = wi == 0
        term = wi * torch.where(weightless, 0.0, o.to(acc))
        out = term if out is None else out + term
    return out.to(dtype), lse


def _merge_inputs(outs, lses) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Check `merge_attention`'s arguments; the messages name the offending one."""
    for name, seq in (("outs", outs), ("lses", lses)):
        if not isinstance(seq, (list, tuple)):
            what = (f"a tensor of shape {tuple(seq.shape)}" if isinstance(seq, torch.Tensor)
                    else type(seq).__name__)
            raise TypeError(f"{name} must be a list or tuple of tensors (one per partial), got "
                            f"{what}")
        for i, t in enumerate(seq):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{describe_tensor(f'{name}[{i}]', t)} must be floating point")
    if not outs or len(outs) != len(lses):
        raise ValueError(f"merge_attention needs one lse per out and at least one pair; got "
                         f"{len(outs)} outs and {len(lses)} lses")
    first = outs[0]
    if first.dim() == 0:
        raise ValueError(f"{describe_tensor('outs[0]', first)} must have a last dimension "
                         "(the head dim)")
    for i, (o, s) in enumerate(zip(outs, lses)):
        if o.shape != first.shape or o.dtype != first.dtype or o.device != first.device:
            raise ValueError(f"every out must match {describe_tensor('outs[0]', first)}; "
                             f"got {describe_tensor(f'outs[{i}]', o)}")
        if s.shape != first.shape[:-1] or s.device != first.device:
            raise ValueError(f"{describe_tensor(f'lses[{i}]', s)} must have shape "
                             f"{tuple(first.shape[:-1])} (its out's shape without the last "
                             f"dim) and be on {first.device}")
    return list(outs), list(lses)
