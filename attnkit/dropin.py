"""`sdpa`: ``torch.nn.functional.scaled_dot_product_attention``'s signature and meaning, computed
by attnkit's backends.

SDPA's masks become `attention`'s options: ``is_causal`` (top-left) becomes a bottom-right
causal band over the keys a query can reach, and a mask is read back as structure
(`attnkit.masks`) or refused; nothing ``Sq x Sk`` is built.
"""

from __future__ import annotations

import torch

from .api import attention
from .masks import MaskStructure, broadcast_mask, cached_structure
from .spec import describe_tensor

_DENSE = (
    "is not a mask attnkit computes: the masks it runs are boolean (True = visible) or "
    "additive with only 0 and -inf, the same for every head, and allow each query exactly "
    "one band of keys: causal (top-left or bottom-right), a sliding window, a per-batch "
    "prefix of keys (right padding), or a band within such a prefix. No installed backend "
    "declares arbitrary dense masks; run this one with "
    "torch.nn.functional.scaled_dot_product_attention"
)


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """A drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Same arguments, same meaning: ``query (..., Hq, Sq, E)``, ``key``/``value``
    ``(..., Hk, Sk, E)`` (3-D inputs have no head dimension; more than 4 dimensions are
    flattened into the batch); ``is_causal`` is aligned to the **top-left** corner (query ``i``
    sees key ``j`` iff ``j <= i``); ``attn_mask`` is boolean (True = take part) or additive,
    broadcastable to ``(B, Hq, Sq, Sk)``; ``enable_gqa`` lets ``Hq`` be a multiple of ``Hk``
    (query head ``h`` reads kv head ``h // (Hq // Hk)``); ``Hk = 1`` broadcasts as SDPA does,
    and so does a key/value batch of 1.

    What runs fast, and what does not run:

    - no mask, or ``is_causal``: `attention` directly; for ``Sq < Sk`` the keys past ``Sq``
      (which no query sees) are sliced off, for ``Sq > Sk`` the top-left diagonal is a
      window ``(-1, Sq - Sk)`` on attnkit's bottom-right one.
    - ``attn_mask`` that is exactly a band of `attention` (causal either alignment, a sliding
      window, a per-batch key prefix such as right padding, or a band within one), the same
      for all heads: read back as those options. Telling costs a few passes over the mask on
      its device and one device-to-host read of a few numbers (one sync per call).
    - any other mask (left padding, per-head masks, finite additive biases, holes): refused
      with a ``ValueError`` saying which masks run; no backend declares dense masks.
    - ``dropout_p``: attention dropout as SDPA applies it (drop after the softmax, scale the
      kept by ``1 / (1 - p)``), with `attnkit.dropout`'s keep mask, which differs from any
      SDPA kernel's; a backend must declare ``dropout``.
    - ``attn_mask`` together with ``is_causal=True``: refused, as SDPA's documentation says
      (some of torch's kernels combine the two, others raise).
    - a value head dim other than the query's, and a mask that requires grad: refused.

    Under ``torch.compile`` a call without a mask compiles whole (``fullgraph=True``); a
    mask is read on the host, so the graph breaks there.

    A query row that sees no key gives 0 and zero gradients on every device, as
    ``scaled_dot_product_attention`` does on the CPU (torch 2.13; never NaN here).
    ``backend`` is `attention`'s (None = best available).
    """
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)
            and isinstance(value, torch.Tensor)):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return _other_ranks(query, key, value, attn_mask, is_causal, scale, enable_gqa, backend,
                            dropout_p)
    B, Hq, Sq, E = query.shape
    Bk, Hk, Sk, Ek = key.shape
    # One comparison on the common path; the checks that name the problem run only when
    # something differs (this runs on every call of a model's attention).
    if (value.shape != key.shape or Bk != B or Ek != E
            or (Hk != Hq and Hk != 1 and not (enable_gqa and Hq % Hk == 0))):
        key, value = _check_kv(query, key, value, enable_gqa)
    if attn_mask is None and (not is_causal or Sq == Sk):  # the two alignments agree
        return attention(query, key, value, causal=bool(is_causal), scale=scale,
                         dropout_p=dropout_p, backend=backend)
    causal, window, key_limit, seqlens_k = sdpa_band(query, key, attn_mask, is_causal)
    if key_limit < Sk:
        key, value = key.narrow(2, 0, key_limit), value.narrow(2, 0, key_limit)
    return attention(query, key, value, causal=causal, scale=scale, window=window,
                     seqlens_k=seqlens_k, dropout_p=dropout_p, backend=backend)


def _check_kv(query, key, value, enable_gqa):
    """key and value against query, raising with what is wrong; a key/value batch of 1 is
    expanded (a view) to the query's, as SDPA broadcasts it."""
    B, Hq, _, E = query.shape
    Bk, Hk, _, _ = key.shape
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"{describe_tensor('value', value)} must match "
                         f"{describe_tensor('key', key)} in all but the last dimension")
    if value.shape[-1] != E or key.shape[-1] != E:
        raise ValueError(
            f"attnkit.sdpa needs one head dim for query, key and value: "
            f"{describe_tensor('query', query)}, {describe_tensor('key', key)}, "
            f"{describe_tensor('value', value)}")
    if Hk != Hq and Hk != 1 and not (enable_gqa and Hq % Hk == 0):
        raise ValueError(
            f"query heads {Hq} and key/value heads {Hk} "
            + ("are not a multiple of each other" if enable_gqa else
               "differ; pass enable_gqa=True for grouped-query attention")
            + f": {describe_tensor('query', query)}, {describe_tensor('key', key)}")
    if Bk != B:
        if Bk != 1:
            raise ValueError(f"batch sizes do not broadcast: {describe_tensor('query', query)}, "
                             f"{describe_tensor('key', key)}")
        key, value = key.expand(B, -1, -1, -1), value.expand(B, -1, -1, -1)
    return key, value


def _other_ranks(query, key, value, attn_mask, is_causal, scale, enable_gqa, backend,
                 dropout_p=0.0):
    """3-D inputs (no head dimension) and inputs with several batch dimensions."""
    if not (query.dim() == key.dim() == value.dim()) or query.dim() < 3:
        raise ValueError(
            "query, key and value must have the same number of dimensions, at least 3: "
            + ", ".join(describe_tensor(n, t) for n, t in
                        (("query", query), ("key", key), ("value", value))))
    if query.dim() == 3:  # (N, L, E): one head
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
        return sdpa(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), attn_mask,
                    dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                    backend=backend).squeeze(1)
    return _flattened(query, key, value, attn_mask, is_causal, scale, enable_gqa, backend,
                      dropout_p)


def sdpa_band(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None,
              is_causal: bool) -> MaskStructure:
    """SDPA's ``attn_mask``/``is_causal`` for 4-D ``query`` and ``key`` as `attention`'s
    options (``window`` None when unbounded), or a ``ValueError`` when no options express
    them. Keys at or past ``key_limit`` are seen by no query: the caller slices them off."""
    B, Hq, Sq, _ = query.shape
    Sk = key.shape[2]
    if attn_mask is not None:
        if is_causal:
            raise ValueError("attnkit.sdpa: pass attn_mask or is_causal=True, not both (as "
                             "scaled_dot_product_attention documents)")
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{describe_tensor('attn_mask', attn_mask)} requires grad; "
                             "attnkit reads a mask as structure and gives it no gradient")
        if not (B and Sq and Sk):  # an empty problem reads no mask, only checks it
            broadcast_mask(attn_mask, B, Hq, Sq, Sk, query.dtype)
            return MaskStructure(False, None, Sk, None)
        found = cached_structure(attn_mask, B, Hq, Sq, Sk, query.dtype)
        if found is None:
            raise ValueError(f"{describe_tensor('attn_mask', attn_mask)} {_DENSE}")
        return found
    if not is_causal:
        return MaskStructure(False, None, Sk, None)
    if Sq <= Sk:  # keys past Sq are seen by no query; then the two alignments agree
        return MaskStructure(True, None, Sq, None)
    return MaskStructure(False, (-1, Sq - Sk), Sk, None)  # j <= i: the diagonal + (Sq - Sk)


def _flattened(query, key, value, attn_mask, is_causal, scale, enable_gqa, backend,
               dropout_p=0.0):
    """Inputs with several batch dimensions: flattened into one (the same ones for all three;
    a mask broadcasts over them)."""
    lead = query.shape[:-3]
    if key.shape[:-3] != lead or value.shape[:-3] != lead:
        raise ValueError(
            "attnkit.sdpa flattens leading dimensions, which must be the same for query, key "
            f"and value: {describe_tensor('query', query)}, {describe_tensor('key', key)}, "
            f"{describe_tensor('value', value)}")
    if attn_mask is not None and attn_mask.dim() > 3:
        raise ValueError(f"{describe_tensor('attn_mask', attn_mask)}: with more than 4-D "
                         "inputs, attnkit.sdpa takes a mask of at most 3 dimensions (Hq, Sq, "
                         "Sk) that broadcasts over the leading ones")
    q, k, v = (t.reshape(-1, *t.shape[-3:]) for t in (query, key, value))
    out = sdpa(q, k, v, attn_mask, dropout_p, is_causal=is_causal, scale=scale,
               enable_gqa=enable_gqa, backend=backend)
    return out.reshape(*lead, *out.shape[1:])
