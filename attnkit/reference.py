"""Reference implementations: the oracle every backend is held to.

Three formulations of the same spec, each in plain PyTorch, in whatever dtype the inputs
have (float64 included), differentiable by autograd:

- `naive`: the textbook formula, ``softmax(S) = exp(S) / sum(exp(S))``, no max-subtraction.
  It overflows in fp16 once a score passes ~11: kept to show why the others exist.
- `safe`: the max-subtracted softmax over the materialized score matrix.
- `online`: the online softmax over key blocks (FlashAttention's recurrence); it never
  holds the whole ``Sq x Sk`` score matrix.

All follow `attnkit.spec` (bottom-right causal, window, seqlens_k, softcap, GQA); a query row
that sees no key gives 0 in ``out`` and ``-inf`` in ``lse``, a NaN query row that sees keys
NaN in both. Keys no query row sees (beyond ``seqlens_k[b]``, or outside every row's band)
are never read, whatever they hold. Each returns ``(out, lse)``.
"""

from __future__ import annotations

import math

import torch

from .dropout import keep_mask
from .spec import UNBOUNDED


def visible_mask(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    seqlens_k: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``(B or 1, 1, Sq, Sk)``: True where query ``i`` sees key ``j``.

    With ``Sk_b`` the valid keys of batch ``b`` (``seqlens_k[b]``, else ``Sk``) and
    ``off = Sk_b - Sq``: visible iff ``j < Sk_b`` and, for causal, ``j <= i + off``; for a
    window ``(left, right)``, ``i + off - left <= j <= i + off + right`` (-1 = unbounded).
    """
    if seqlens_k is not None:
        device = seqlens_k.device
    i = torch.arange(seqlen_q, device=device).view(1, 1, -1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, 1, 1, -1)
    if seqlens_k is None:
        sk_b = torch.full((1, 1, 1, 1), seqlen_k, device=device, dtype=torch.long)
    else:
        sk_b = seqlens_k.to(torch.long).view(-1, 1, 1, 1)
    rel = j - i - (sk_b - seqlen_q)  # key position relative to the query's diagonal
    mask = j < sk_b
    left, right = window if window is not None else (UNBOUNDED, UNBOUNDED)
    if left != UNBOUNDED:
        mask = mask & (rel >= -left)
    if right != UNBOUNDED:
        mask = mask & (rel <= right)
    if causal:
        mask = mask & (rel <= 0)
    return mask


def _expand_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Repeat kv heads for GQA: query head h reads kv head h // (Hq // Hkv)."""
    group = q.shape[1] // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _drop_unseen_keys(k, v, mask):
    """Keys/values that no query row sees (``mask`` from `visible_mask`) replaced by 0: they
    may hold NaN (an uninitialized cache), which a masked score would still multiply in as
    0 * NaN. A selection, so autograd gives them exactly zero gradient."""
    unseen = ~mask.any(-2).unsqueeze(-1)  # (B or 1, 1, Sk, 1)
    return torch.where(unseen, 0, k), torch.where(unseen, 0, v)


def _scores(q, k, scale, softcap):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s


def _defaults(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _visible_inputs(q, k, v, causal, window, seqlens_k):
    """The visibility mask and k, v with unseen keys selected to 0 and kv heads expanded."""
    mask = visible_mask(q.shape[2], k.shape[2], causal=causal, window=window,
                        seqlens_k=seqlens_k, device=q.device)
    k, v = _drop_unseen_keys(k, v, mask)
    return mask, _expand_kv(q, k), _expand_kv(q, v)


def naive(q, k, v, *, causal=False, scale=None, window=None, seqlens_k=None, softcap=None):
    """Textbook attention: ``P = exp(S) / sum(exp(S))``, ``O = P V``. Overflows in fp16."""
    scale = _defaults(q, scale)
    mask, k, v = _visible_inputs(q, k, v, causal, window, seqlens_k)
    s = _scores(q, k, scale, softcap)
    e = torch.where(mask, torch.exp(s), torch.zeros((), dtype=s.dtype, device=s.device))
    denom = e.sum(-1, keepdim=True)
    # Only a row that sees nothing has denom == 0 (a NaN row keeps its NaN).
    p = torch.where(denom == 0, 0, e / torch.where(denom == 0, 1, denom))
    return torch.matmul(p, v), torch.log(denom.squeeze(-1))


def _dropped(p, dropout):
    """``p`` with `attnkit.dropout`'s keep mask applied and the kept entries scaled."""
    if dropout is None:
        return p
    B, H, Sq, Sk = p.shape
    keep = keep_mask(dropout.state, dropout.p, B, H, Sq, Sk, dropout.first_batch).to(p.device)
    return torch.where(keep, p * dropout.scale, 0)


def safe(q, k, v, *, causal=False, scale=None, window=None, seqlens_k=None, softcap=None,
         dropout=None):
    """Max-subtracted softmax over the materialized score matrix; ``dropout`` (an
    `attnkit.dropout.Dropout`) drops probabilities after the softmax (lse unaffected)."""
    scale = _defaults(q, scale)
    mask, k, v = _visible_inputs(q, k, v, causal, window, seqlens_k)
    s = _scores(q, k, scale, softcap)
    s = s.masked_fill(~mask, float("-inf"))
    # Subtracting the row max changes nothing mathematically, so it carries no gradient.
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = _dropped(e / torch.where(denom > 0, denom, 1), dropout)
    return torch.matmul(p, v), (m + torch.log(denom)).squeeze(-1)


def online(q, k, v, *, causal=False, scale=None, window=None, seqlens_k=None, softcap=None,
           block_k: int = 64):
    """FlashAttention's online softmax: one pass over key blocks with a running max ``m``,
    running sum ``l`` and an output rescaled whenever the max grows."""
    scale = _defaults(q, scale)
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    mask, k, v = _visible_inputs(q, k, v, causal, window, seqlens_k)
    m = torch.full((B, H, Sq, 1), float("-inf"), dtype=q.dtype, device=q.device)
    denom = torch.zeros((B, H, Sq, 1), dtype=q.dtype, device=q.device)
    acc = torch.zeros((B, H, Sq, v.shape[-1]), dtype=q.dtype, device=q.device)
    for j0 in range(0, Sk, block_k):
        kb, vb = k[:, :, j0:j0 + block_k], v[:, :, j0:j0 + block_k]
        s = _scores(q, kb, scale, softcap).masked_fill(~mask[..., j0:j0 + block_k],
                                                       float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True)).detach()
        m_safe = torch.where(torch.isfinite(m_new), m_new, 0)
        alpha = torch.exp(m - m_safe)  # 0 while the row has seen nothing (m = -inf)
        p = torch.exp(s - m_safe)
        denom = denom * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + torch.matmul(p, vb)
        m = m_new
    m_safe = torch.where(torch.isfinite(m), m, 0)
    out = acc / torch.where(denom > 0, denom, 1)
    return out, (m_safe + torch.log(denom)).squeeze(-1)


def backward(q, k, v, out, lse, dout, *, causal=False, scale=None, window=None, seqlens_k=None,
             softcap=None, dlse=None, dropout=None):
    """The attention backward from the saved ``out`` and ``lse``, without autograd.

    ``P = exp(S - lse)``, ``dV = P^T dO``, ``dP = dO V^T``, ``D = rowsum(dO * O) - dlse``,
    ``dS = P * (dP - D)`` (times ``1 - tanh^2`` under softcap), ``dQ = scale dS K``,
    ``dK = scale dS^T Q``; kv gradients summed over each GQA group. ``dlse`` (``(B, Hq, Sq)``
    or None for zero) is the gradient reaching ``lse``: ``d lse / dS = P``. With ``dropout``
    (keep mask ``Z``, scale ``c``): ``dV = (c Z P)^T dO`` and ``dP = c Z (dO V^T)``; delta is
    unchanged (``rowsum(P * dP) = rowsum(dO * O)`` still). Returns ``(dq, dk, dv)``.
    """
    scale = _defaults(q, scale)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    mask = visible_mask(Sq, Sk, causal=causal, window=window, seqlens_k=seqlens_k,
                        device=q.device)
    k, v = _drop_unseen_keys(k, v, mask)
    ke, ve = _expand_kv(q, k), _expand_kv(q, v)
    s = _scores(q, ke, scale, softcap)
    lse = lse.to(s.dtype).unsqueeze(-1)
    p = torch.where(mask, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)), 0)
    dv = torch.matmul(_dropped(p, dropout).transpose(-1, -2), dout)
    dp = _dropped(torch.matmul(dout, ve.transpose(-1, -2)), dropout)
    delta = (dout * out).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(delta.dtype).unsqueeze(-1)
    ds = p * (dp - delta)
    if softcap is not None:
        ds = ds * (1 - (s / softcap) ** 2)
    dq = torch.matmul(ds, ke) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    group = Hq // Hkv
    if group > 1:
        dk = dk.view(B, Hkv, group, Sk, D).sum(2)
        dv = dv.view(B, Hkv, group, Sk, D).sum(2)
    return dq, dk, dv


REFERENCES = {"naive": naive, "safe": safe, "online": online}
