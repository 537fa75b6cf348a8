"""PyTorch SDPA's backends as benchmark peers, each pinned with ``sdpa_kernel``.

Causal convention: SDPA's ``is_causal`` mask is aligned to the TOP-LEFT corner, attnkit's to
the bottom-right. They coincide when ``Sq == Sk``, which is every shape of the training grid.
For decoding (one query against a full cache) bottom-right causal means "sees every key", so
the SDPA peer runs that problem with ``is_causal=False``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None

#: Peer name -> SDPBackend member name.
PEERS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-math": "MATH",
}
#: The peer every ratio is taken against.
BASELINE = "sdpa-flash"


class PeerError(RuntimeError):
    """SDPA refused the problem with the backend pinned; the message holds its reasons."""


@contextmanager
def pinned(name: str):
    """Run SDPA with only peer ``name``'s kernel enabled; turn "no kernel" into `PeerError`
    carrying the warnings in which SDPA says why it refused."""
    if sdpa_kernel is None:
        raise PeerError("torch.nn.attention.sdpa_kernel is unavailable (torch < 2.3)")
    member = getattr(SDPBackend, PEERS[name], None)
    if member is None:
        raise PeerError(f"this torch has no SDPBackend.{PEERS[name]}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(member):
                yield
        except RuntimeError as e:
            msg = str(e)
            if "No available kernel" in msg or "No viable backend" in msg:
                why = "; ".join(dict.fromkeys(str(w.message).strip() for w in caught))
                raise PeerError(f"{name} cannot run this problem: "
                                f"{why or msg.splitlines()[0]}") from None
            raise


def sdpa(q, k, v, *, causal: bool, gqa: bool = False, dropout_p: float = 0.0):
    """One SDPA call; ``enable_gqa`` is passed only when the heads differ (older torch lacks
    the argument)."""
    kw = {"enable_gqa": True} if gqa else {}
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, **kw)


def probe(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if peer ``name`` runs a tiny problem on ``device`` in ``dtype``, else why not."""
    try:
        q = torch.randn(1, 2, 64, head_dim, device=device, dtype=dtype)
        with pinned(name):
            sdpa(q, q, q, causal=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None
