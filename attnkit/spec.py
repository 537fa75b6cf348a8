"""What one attention call means: the validated, normalized `AttentionProblem`.

Every entry point (``attention``, ``explain``, the conformance suite) builds one of these
first, so bad input is rejected here, before any backend runs, with a message that names the
tensor, its shape, dtype and device.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .dropout import check_dropout_p

#: Sentinel for an unbounded side of a sliding window.
UNBOUNDED = -1

#: Input dtypes the spec defines. Integer, complex and fp8 inputs are rejected.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe_tensor(name: str, t: torch.Tensor) -> str:
    """``q (shape (2, 8, 128, 64), dtype torch.float16, device cuda:0)``: used in every error."""
    return f"{name} (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device})"


class AttentionProblem(NamedTuple):
    """A normalized description of one attention call: sizes, dtype, device and options.

    It holds no tensors, is hashable, and is what backends are asked about
    (``not_supported_reasons``) and what selection is cached on. (A named tuple rather than
    a frozen dataclass: it is built on every call, and this is several times cheaper.)
    """

    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    causal: bool = False
    scale: float = 1.0
    window: tuple[int, int] = (UNBOUNDED, UNBOUNDED)
    has_seqlens_k: bool = False
    softcap: float | None = None
    return_lse: bool = False
    needs_grad: bool = False
    #: ``torch.are_deterministic_algorithms_enabled()`` when the problem was built.
    deterministic: bool = False
    #: A packed variable-length batch (`attnkit.attention_varlen`): ``batch`` sequences,
    #: ``seqlen_q``/``seqlen_k`` are upper bounds of their lengths.
    varlen: bool = False
    #: Attention dropout probability (0: none); see `attnkit.dropout` for the mask.
    dropout_p: float = 0.0
    #: Keys and values live in page pools of this many positions per page, addressed through
    #: a block table (`Backend.forward_paged`); 0: dense tensors. ``seqlen_k`` is then the
    #: capacity a table row addresses (pages per sequence x page size).
    page_size: int = 0

    @property
    def group_size(self) -> int:
        """Query heads per kv head (1 = MHA, Hq = MQA)."""
        return self.heads_q // self.heads_kv

    @property
    def has_window(self) -> bool:
        return self.window != (UNBOUNDED, UNBOUNDED)

    @property
    def band(self) -> tuple[int | None, int | None]:
        """The visible band ``(left, right)`` with causal folded in; ``None`` = unbounded.

        Query ``i`` of batch ``b`` sees key ``j`` iff ``j < Sk_b`` and
        ``-left <= j - (i + Sk_b - Sq) <= right``. Causal is ``right = 0``.
        """
        left, right = self.window
        lo = None if left == UNBOUNDED else left
        hi = None if right == UNBOUNDED else right
        if self.causal:
            hi = 0 if hi is None else min(hi, 0)
        return lo, hi

    @property
    def is_empty(self) -> bool:
        return 0 in (self.batch, self.heads_q, self.seqlen_q, self.seqlen_k)

    def describe(self) -> str:
        opts = [f"causal={self.causal}", f"scale={self.scale:g}"]
        if self.has_window:
            opts.append(f"window={self.window}")
        if self.has_seqlens_k:
            opts.append("seqlens_k")
        if self.softcap is not None:
            opts.append(f"softcap={self.softcap:g}")
        if self.dropout_p:
            opts.append(f"dropout_p={self.dropout_p:g}")
        if self.needs_grad:
            opts.append("backward")
        if self.deterministic:
            opts.append("deterministic")
        if self.page_size:
            opts.append(f"paged (page size {self.page_size})")
        if self.varlen:
            return (
                f"packed varlen q (B={self.batch} sequences, Hq={self.heads_q}, "
                f"max Sq={self.seqlen_q}, D={self.head_dim}), k/v (Hkv={self.heads_kv}, "
                f"max Sk={self.seqlen_k}), {self.dtype} on {self.device}, " + ", ".join(opts)
            )
        return (
            f"q (B={self.batch}, Hq={self.heads_q}, Sq={self.seqlen_q}, D={self.head_dim}), "
            f"k/v (Hkv={self.heads_kv}, Sk={self.seqlen_k}), {self.dtype} on {self.device}, "
            + ", ".join(opts)
        )

    @classmethod
    def from_tensors(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     causal: bool = False, scale: float | None = None,
                     window: tuple[int, int] | None = None,
                     seqlens_k: torch.Tensor | None = None, softcap: float | None = None,
                     return_lse: bool = False, needs_grad: bool | None = None,
                     check_values: bool = True, dropout_p: float = 0.0) -> AttentionProblem:
        """Validate the inputs of one call and describe it.

        ``needs_grad`` defaults to whether autograd will want gradients of q, k or v.
        ``check_values`` reads ``seqlens_k`` to check its range (one device sync); it is
        off for fake tensors under ``torch.compile``.
        """
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(
                    f"{describe_tensor(name, t)} must have 4 dimensions "
                    f"({'(B, Hq, Sq, D)' if name == 'q' else '(B, Hkv, Sk, D)'}), got {t.dim()}"
                )
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"{describe_tensor(name, t)}: dtype {t.dtype} is not supported; attention "
                    "takes float16, bfloat16, float32 or float64 inputs"
                )
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(
                "q, k and v must share one dtype: "
                + ", ".join(describe_tensor(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
            )
        if not (q.device == k.device == v.device):
            raise ValueError(
                "q, k and v must be on one device: "
                + ", ".join(describe_tensor(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
            )
        B, Hq, Sq, D = q.shape
        if k.shape != v.shape:
            raise ValueError(
                f"k and v must have the same shape (B, Hkv, Sk, D): {describe_tensor('k', k)}, "
                f"{describe_tensor('v', v)}"
            )
        Bk, Hkv, Sk, Dk = k.shape
        if Bk != B:
            raise ValueError(
                f"batch mismatch: {describe_tensor('q', q)} has B={B}, "
                f"{describe_tensor('k', k)} has B={Bk}"
            )
        if Dk != D:
            raise ValueError(
                f"head dim mismatch: {describe_tensor('q', q)} has D={D}, "
                f"{describe_tensor('k', k)} has D={Dk}"
            )
        check_heads(q, "k", k, Hq, Hkv, D)

        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be a bool, got {return_lse!r}")

        scale = check_scale(scale, D)
        window = check_window(window)
        softcap = check_softcap(softcap)
        dropout_p = check_dropout_p(dropout_p)

        if seqlens_k is not None:
            _check_seqlens_k(seqlens_k, q, B, Sk, check_values)

        if needs_grad is None:
            needs_grad = torch.is_grad_enabled() and (
                q.requires_grad or k.requires_grad or v.requires_grad
            )
        return cls(B, Hq, Hkv, Sq, Sk, D, q.dtype, q.device, causal, scale, window,
                   seqlens_k is not None, softcap, return_lse, bool(needs_grad),
                   torch.are_deterministic_algorithms_enabled(), dropout_p=dropout_p)


def check_heads(q: torch.Tensor, kv_name: str, kv: torch.Tensor, heads_q: int, heads_kv: int,
                head_dim: int) -> None:
    """Refuse a head dim of 0, and query heads that are not a multiple of the kv heads."""
    if head_dim == 0:
        raise ValueError(f"{describe_tensor('q', q)}: head dim D must be at least 1")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"query heads must be a multiple of kv heads (GQA): "
                         f"{describe_tensor('q', q)} has Hq={heads_q}, "
                         f"{describe_tensor(kv_name, kv)} has Hkv={heads_kv}")


def _is_real(x) -> bool:
    """A Python or numpy real number (``np.float32(0.1)``, ``np.int64(8)``), not a bool."""
    # The exact-type test first: the ABC check is several times slower, and this runs per call.
    return type(x) in (float, int) or (isinstance(x, numbers.Real) and not isinstance(x, bool))


def _is_int(x) -> bool:
    """A Python or numpy integer (numpy registers its integers as `numbers.Integral`; its
    ``bool_`` is not one), not a bool."""
    return type(x) is int or (isinstance(x, numbers.Integral) and not isinstance(x, bool))


def check_scale(scale, head_dim: int) -> float:
    """``scale`` as a finite float; ``None`` means ``1 / sqrt(head_dim)``."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not _is_real(scale):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def check_window(window) -> tuple[int, int]:
    """``window`` as a pair of Python ints, each ``>= 0`` or ``UNBOUNDED``; ``None`` means
    unbounded on both sides."""
    if window is None:
        return (UNBOUNDED, UNBOUNDED)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a (left, right) pair of ints, got {window!r}")
    for side, w in zip(("left", "right"), window):
        if not _is_int(w):
            raise TypeError(f"window {side} must be an int, got {w!r} in {window!r}")
        if w < UNBOUNDED:
            raise ValueError(
                f"window {side} must be >= 0, or -1 for unbounded; got {w} in {window!r}")
    return (int(window[0]), int(window[1]))


def check_softcap(softcap) -> float | None:
    """``softcap`` as a finite positive float, or None."""
    if softcap is None:
        return None
    if not _is_real(softcap):
        raise TypeError(f"softcap must be a positive float or None, got {softcap!r}")
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be finite and > 0 (or None), got {softcap}")
    return softcap


def check_lengths_tensor(name: str, s, q: torch.Tensor, B: int) -> None:
    """Type, dtype, shape ``(B,)`` and device of a per-batch length tensor (``seqlens_k``,
    ``cache_seqlens``). Runs on every call: the description is built only for an error."""
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be an int tensor of shape ({B},), got {type(s).__name__}")
    if s.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{describe_tensor(name, s)} must have dtype torch.int32 or torch.int64")
    if tuple(s.shape) != (B,):
        raise ValueError(f"{describe_tensor(name, s)} must have shape ({B},), one length per "
                         "batch")
    if s.device != q.device:
        raise ValueError(f"{describe_tensor(name, s)} must be on q's device {q.device}")


def _check_seqlens_k(s, q: torch.Tensor, B: int, Sk: int, check_values: bool) -> None:
    check_lengths_tensor("seqlens_k", s, q, B)
    # Reading values on the host would stall every CUDA call (and break CUDA graph capture):
    # only CPU tensors are checked; GPU kernels clamp to [0, Sk] instead.
    if check_values and B > 0 and s.device.type == "cpu":
        lo, hi = (int(x) for x in torch.aminmax(s))
        if lo < 0 or hi > Sk:
            raise ValueError(f"{describe_tensor('seqlens_k', s)} values must lie in [0, Sk={Sk}], "
                             f"got min {lo}, max {hi}")
