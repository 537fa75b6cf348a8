"""The backend contract: capabilities as data, plus forward and backward.

A backend states what it can compute in a `Capabilities` record; the base class turns that
record into the reasons it cannot run a given `AttentionProblem`, so selection, ``explain``,
``attnkit backends`` and the conformance suite all read the same data.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .spec import AttentionProblem

#: Every feature flag a backend may declare, with what a problem needs it for.
FEATURES = {
    "causal": "causal=True",
    "gqa": "Hq != Hkv (GQA/MQA)",
    "window": "a sliding window",
    "seqlens_k": "seqlens_k",
    "softcap": "softcap",
    "lse": "return_lse=True",
    "backward": "gradients",
    "varlen": "packed variable-length batches (attention_varlen)",
    "dropout": "dropout_p > 0",
    "paged": "paged KV caches (block_table)",
}


class BackendContractError(RuntimeError):
    """A backend returned something other than what the contract promises (a bug in it)."""


@functools.lru_cache(maxsize=64)  # selection asks on every call; the answer never changes
def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    return torch.cuda.get_device_capability(device)


@dataclass(frozen=True)
class Capabilities:
    """What a backend computes to spec. Everything not declared here is refused."""

    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    head_dim_min: int = 1
    head_dim_max: int = 256
    causal: bool = True
    gqa: bool = True
    window: bool = True
    seqlens_k: bool = True
    softcap: bool = True
    lse: bool = True
    backward: bool = True
    #: The backward is bitwise deterministic under ``torch.use_deterministic_algorithms(True)``
    #: (the forward always must be). A backend may take a faster, non-repeatable backward
    #: otherwise, if it says so; with False it is never chosen in deterministic mode.
    deterministic: bool = True
    #: Oldest CUDA GPU the kernels run on, as (major, minor) compute capability; None: any.
    cuda_capability_min: tuple[int, int] | None = None
    #: ``backward`` takes ``dlse``, the gradient flowing into ``lse`` (a loss on lse, or
    #: `attnkit.merge_attention` of partial results). Without it a nonzero lse gradient raises.
    lse_grad: bool = False
    #: ``forward_varlen`` and ``backward_varlen`` run packed variable-length batches.
    varlen: bool = False
    #: ``forward`` and ``backward`` take ``dropout`` (an `attnkit.dropout.Dropout`) and apply
    #: the keep mask `attnkit.dropout` defines, bit for bit; with ``varlen``,
    #: ``forward_varlen`` and ``backward_varlen`` too.
    dropout: bool = False
    #: ``forward_paged`` attends over page pools through a block table (paged KV caches).
    paged: bool = False
    #: ``forward_paged`` checks what it reads, where the core's ``validate="device"`` check
    #: would (`Backend.forward_paged`): the core then queues no check of its own for a call
    #: that appends nothing and has no left window (no operation but the kernel's); and
    #: under ``validate="device"`` the core offers appends to `Backend.append_paged`.
    paged_checks: bool = False

    def as_dict(self) -> dict:
        d = asdict(self)
        d["devices"] = sorted(self.devices)
        d["dtypes"] = sorted(str(t).replace("torch.", "") for t in self.dtypes)
        return d


class Backend:
    """Base class of every backend. Subclasses set `name` and `capabilities` and implement
    `forward` and `backward`; most override `availability` and nothing else.

    Tensors a backend receives: ``q (B, Hq, Sq, D)``, ``k``/``v (B, Hkv, Sk, D)`` with any
    strides, ``seqlens_k`` ``None`` or int32 contiguous ``(B,)`` on the same device. It returns
    ``out`` in q's dtype with q's shape and ``lse`` float32 ``(B, Hq, Sq)`` (float64 allowed
    for float64 inputs), both on q's device; gradients in their input's dtype and shape (kv
    gradients summed over each GQA group). The core checks these shapes, dtypes and devices
    on every call (`check_forward_result`, `check_backward_result`) and raises
    `BackendContractError` naming the backend. Empty problems (B, Hq, Sq or Sk = 0) are
    answered by the core and never reach a backend.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities]
    #: Short description shown by ``attnkit backends``.
    description: ClassVar[str] = ""

    def availability(self) -> tuple[bool, str]:
        """``(ok, reason)``: can this backend run on this machine at all. Cheap, never raises."""
        return True, ""

    def not_supported_reasons(self, problem: AttentionProblem) -> list[str]:
        """Why this backend cannot compute `problem` to spec; empty means it can."""
        caps = self.capabilities
        reasons = []
        if problem.device.type not in caps.devices:
            reasons.append(
                f"device {problem.device.type!r} not in supported {sorted(caps.devices)}"
            )
        if problem.dtype not in caps.dtypes:
            names = sorted(str(d) for d in caps.dtypes)
            reasons.append(f"dtype {problem.dtype} not in supported {names}")
        if not caps.head_dim_min <= problem.head_dim <= caps.head_dim_max:
            reasons.append(
                f"head dim {problem.head_dim} outside supported "
                f"[{caps.head_dim_min}, {caps.head_dim_max}]"
            )
        for flag, used in (
            ("causal", problem.causal),
            ("gqa", problem.heads_q != problem.heads_kv),
            ("window", problem.has_window),
            ("seqlens_k", problem.has_seqlens_k),
            ("softcap", problem.softcap is not None),
            ("lse", problem.return_lse),
            ("backward", problem.needs_grad),
            ("varlen", problem.varlen),
            ("dropout", problem.dropout_p > 0),
            ("paged", problem.page_size > 0),
        ):
            if used and not getattr(caps, flag):
                reasons.append(f"{FEATURES[flag]} not supported")
        if problem.needs_grad and problem.deterministic and not caps.deterministic:
            reasons.append(
                "backward is not deterministic and torch.use_deterministic_algorithms(True) is set"
            )
        if caps.cuda_capability_min and problem.device.type == "cuda":
            try:
                cc = cuda_capability(problem.device)
            except Exception as e:  # no driver or no such device: say so, do not raise
                reasons.append(f"cannot read the compute capability of {problem.device} "
                               f"({type(e).__name__}: {e})")
            else:
                if cc < caps.cuda_capability_min:
                    reasons.append(
                        f"{problem.device} has compute capability {cc[0]}.{cc[1]}; the "
                        f"{self.name} backend needs {'.'.join(map(str, caps.cuda_capability_min))}"
                        " or newer")
        return reasons

    def forward(self, problem: AttentionProblem, q: Tensor, k: Tensor, v: Tensor,
                seqlens_k: Tensor | None) -> tuple[Tensor, Tensor]:
        """Return ``(out, lse)``."""
        raise NotImplementedError

    def backward(self, problem: AttentionProblem, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                 lse: Tensor, dout: Tensor, seqlens_k: Tensor | None,
                 dlse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(dq, dk, dv)`` from the saved ``out`` and ``lse``.

        ``dout`` is contiguous or has exactly ``out``'s strides (the core copies it otherwise).
        ``dlse`` is the gradient flowing into ``lse``: float32 ``(B, Hq, Sq)`` (float64 for
        float64 inputs), contiguous. The core passes it, as a keyword, only to a backend
        whose `Capabilities` declare ``lse_grad`` and only when the loss reaches lse; a
        backend without ``lse_grad`` never sees the keyword. With ``P = exp(S - lse)`` and
        ``delta = rowsum(dout * out)`` the score gradient becomes
        ``dS = P * (dP - (delta - dlse))``: ``d lse / dS = P``, so dlse enters as a per-row
        offset of delta. Rows that saw no key (``lse = -inf``) have ``P = 0`` and zero
        gradients whatever ``dlse`` holds there.
        """
        raise NotImplementedError

    def forward_varlen(self, problem: AttentionProblem, q: Tensor, k: Tensor, v: Tensor,
                       cu_seqlens_q: Tensor, cu_seqlens_k: Tensor) -> tuple[Tensor, Tensor]:
        """Packed variable-length batch (only for backends declaring ``varlen``).

        ``q (total_q, Hq, D)``, ``k``/``v (total_k, Hkv, D)`` with any strides;
        ``cu_seqlens_q``/``cu_seqlens_k`` validated int32 contiguous ``(B + 1,)`` offsets on
        q's device (0 first, non-decreasing, the tensor's length last). Sequence ``b`` is rows
        ``cu[b]:cu[b + 1]`` and is computed exactly as `forward` computes one dense batch of
        those lengths (bottom-right causal per sequence). ``problem.batch`` is B,
        ``problem.seqlen_q``/``seqlen_k`` are upper bounds of the sequence lengths
        (max_seqlen), ``problem.varlen`` is True. Returns ``out (total_q, Hq, D)`` in q's
        dtype and ``lse (Hq, total_q)`` float32.

        A backend declaring ``dropout`` too takes ``dropout=None`` (keyword; an
        `attnkit.dropout.Dropout` when ``dropout_p > 0``): sequence ``b`` draws the mask of
        batch ``b``, its rows and columns counted from its own first rows.
        """
        raise NotImplementedError

    def backward_varlen(self, problem: AttentionProblem, q: Tensor, k: Tensor, v: Tensor,
                        out: Tensor, lse: Tensor, dout: Tensor, cu_seqlens_q: Tensor,
                        cu_seqlens_k: Tensor,
                        dlse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(dq, dk, dv)`` of `forward_varlen`, in the inputs' shapes and dtypes; ``dlse``
        ``(Hq, total_q)`` as in `backward`; ``dropout=`` the forward's, as there."""
        raise NotImplementedError

    def forward_paged(
        self,
        problem: AttentionProblem,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        seqlens_k: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over paged KV caches (only for backends declaring ``paged``).

        ``q (B, Hq, Sq, D)`` with any strides; ``k_pages``/``v_pages`` page pools
        ``(num_pages, Hkv, page_size, D)`` with any strides; ``block_table`` int32 contiguous
        ``(B, max_pages)``; ``seqlens_k`` int32 contiguous ``(B,)``, always given: sequence
        ``b`` has ``seqlens_k[b]`` keys, key ``p`` at offset ``p % page_size`` of page
        ``block_table[b, p // page_size]``. The core has checked every entry a key needs
        (``p < seqlens_k[b]``) to lie in ``[0, num_pages)``, and each ``seqlens_k[b]`` to lie
        in ``[0, problem.seqlen_k]``, except where the backend declares ``paged_checks``
        and the call appends nothing and has no left window: then this method checks them
        itself, on CUDA in the kernel as it reads them (a bad one stops the kernel with a
        device-side trap before it is used to address anything; the CUDA context is
        unusable afterwards, as after the core's ``torch._assert_async``), elsewhere by
        raising ``ValueError`` before reading. The entries past the keys may hold
        anything (-1, stale indices) and must not be read. Pages may repeat within and
        across rows (shared prefixes). ``problem.page_size`` is the page size and
        ``problem.seqlen_k`` the capacity of a row (``max_pages * page_size``); masks are
        bottom-right per sequence over ``seqlens_k[b]`` keys, exactly as `forward` computes
        the same keys laid out contiguously. Returns ``(out, lse)`` as `forward` does.
        Address arithmetic must be 64-bit: pools may exceed 2^31 elements.
        """
        raise NotImplementedError

    def append_paged(
        self,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
    ) -> torch.Tensor | None:
        """The append of a ``validate="device"`` paged call, checks included (only asked of
        backends declaring ``paged_checks``; None, the default, leaves it to the core).

        Pools and ``k_new``/``v_new`` ``(B, Hkv, S_new >= 1, D)`` of any strides,
        ``block_table`` int32 contiguous ``(B, max_pages)``, ``cache_seqlens`` int32 or
        int64 contiguous ``(B,)``: exactly the core's `attnkit.paged.check_table` (fill
        levels in ``[0, max_pages * page_size - S_new]``, every entry a position below
        ``cache_seqlens[b] + S_new`` needs in ``[0, num_pages)``, no slot appended to by two
        sequences), then the write of position ``cache_seqlens[b] + i`` of each sequence,
        nothing else. A violation writes nothing: on CUDA it stops the kernel with a trap
        (the context is unusable afterwards, as after the core's assertion), elsewhere it
        raises ``ValueError``. Returns the int32 ``(B,)`` fill levels after the append
        (``cache_seqlens + S_new``), queued on the stream like the write."""
        return None

    def conformance_modules(self) -> tuple[str, ...]:
        """Importable names of pytest modules ``attnkit check`` runs for this backend after
        the core's suite, with the same fixtures (see `attnkit.testing`)."""
        return ()

    @property
    def version(self) -> str:
        """The version of the distribution that ships this backend."""
        return getattr(self, "_version", "") or ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _lse_dtype_ok(lse: torch.Tensor, q: torch.Tensor) -> bool:
    return lse.dtype == torch.float32 or (lse.dtype == q.dtype == torch.float64)


def check_forward_result(backend: Backend, q: torch.Tensor, result, lse_shape=None,
                         method: str = "forward") -> tuple:
    """``result`` as ``(out, lse)`` if it keeps the contract (shapes, dtypes, devices: a few
    attribute reads), else `BackendContractError` naming the backend. ``lse_shape`` is
    ``q.shape[:3]`` unless given (``(Hq, total_q)`` for `Backend.forward_varlen`)."""
    if not isinstance(result, (tuple, list)) or len(result) != 2:  # a tensor unpacks, too
        raise BackendContractError(
            f"backend {backend.name!r} {method} returned {type(result).__name__}; the "
            "contract is a pair (out, lse)")
    out, lse = result
    if lse_shape is None:
        lse_shape = q.shape[:3]
    if (isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
            and out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
            and lse.shape == lse_shape and _lse_dtype_ok(lse, q) and lse.device == q.device):
        return out, lse
    raise BackendContractError(
        f"backend {backend.name!r} {method} broke the contract: "
        + "; ".join(_mismatches(q, ((out, "out", q.shape, "q's dtype", q.dtype),
                                    (lse, "lse", lse_shape, "float32", torch.float32)))))


def check_backward_result(backend: Backend, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, result, method: str = "backward") -> tuple:
    """``result`` as ``(dq, dk, dv)`` if each has its input's shape, dtype and device (autograd
    would cast a wrong dtype silently), else `BackendContractError` naming the backend."""
    if not isinstance(result, (tuple, list)) or len(result) != 3:
        raise BackendContractError(
            f"backend {backend.name!r} {method} returned {type(result).__name__}; the "
            "contract is a triple (dq, dk, dv)")
    dq, dk, dv = result
    ok = True
    for g, t in ((dq, q), (dk, k), (dv, v)):
        ok = (ok and isinstance(g, torch.Tensor) and g.shape == t.shape and g.dtype == t.dtype
              and g.device == t.device)
    if ok:
        return dq, dk, dv
    raise BackendContractError(
        f"backend {backend.name!r} {method} broke the contract: "
        + "; ".join(_mismatches(q, ((g, n, t.shape, f"{n[1:]}'s dtype", t.dtype)
                                    for g, n, t in ((dq, "dq", q), (dk, "dk", k),
                                                    (dv, "dv", v))))))


def _mismatches(q, expected) -> list[str]:
    """What differs from the contract, one phrase per tensor (built only for an error)."""
    found = []
    for t, name, shape, dtype_name, dtype in expected:
        if not isinstance(t, torch.Tensor):
            found.append(f"{name} is {type(t).__name__}, not a tensor")
            continue
        lse_ok = name == "lse" and _lse_dtype_ok(t, q)
        if t.shape != shape:
            found.append(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.dtype != dtype and not lse_ok:
            found.append(f"{name} has dtype {t.dtype}, expected {dtype_name} {dtype}")
        if t.device != q.device:
            found.append(f"{name} is on {t.device}, expected {q.device}")
    return found
