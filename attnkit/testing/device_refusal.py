"""A ``validate="device"`` refusal of a KV-cache call, seen from outside.

The refusal is a ``torch._assert_async`` the core queues, or a trap in a backend's kernel
(``Capabilities.paged_checks``); on CUDA either ends the process's CUDA context. So the call
runs in a child process, which must fail where the same call on intact inputs succeeds. Off
CUDA the call raises in the process itself (`refusing_call`).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import attnkit

from .decode_cases import decode_dtypes, rand
from .paged_cases import small_paged_inputs, spoil_small_table

#: Defects per kind of call: "paged" appends nothing (the kernel may check), "paged_append"
#: one position per sequence (the backend may check and append), "contiguous" two
#: positions (the core checks before writing).
DEFECTS = {"paged": ("negative", "outside", "too_few", "negative_fill"),
           "paged_append": ("negative", "outside", "too_few", "same_slot", "negative_fill"),
           "contiguous": ("overflow", "negative_fill")}


def refusing_call(kind: str, backend, backend_name: str, defect: str, device):
    """A function making the ``kind`` call on inputs with ``defect`` ("none": intact) under
    ``validate="device"``, returning ``out``."""
    caps = backend.capabilities
    if kind in ("paged", "paged_append"):
        q, (kp, vp), table, lens, new = small_paged_inputs(caps, device)
        if defect != "none":
            table, lens = spoil_small_table(table, lens, defect, kp.shape[0])
        new = new if kind == "paged_append" else (None, None)
        return lambda: attnkit.attention_with_kvcache(
            q, kp, vp, lens, *new, block_table=table, causal=caps.causal,
            backend=backend_name, validate="device")
    gen = torch.Generator().manual_seed(7)
    dt, D = decode_dtypes(caps, True)[0], max(caps.head_dim_min, 16)
    k_cache, v_cache = (rand((2, 1, 8, D), dt, device, gen) for _ in range(2))
    q, new = (rand((2, 1, 2, D), dt, device, gen) for _ in range(2))
    levels = {"none": [3, 6], "overflow": [3, 7], "negative_fill": [3, -1]}[defect]
    lens = torch.tensor(levels, dtype=torch.int32, device=device)
    return lambda: attnkit.attention_with_kvcache(
        q, k_cache, v_cache, lens, new, new, causal=caps.causal, backend=backend_name,
        validate="device")


_CHILD = """
import sys
import torch
from attnkit.registry import registry
from attnkit.testing.device_refusal import refusing_call
kind, name, defect, device = sys.argv[1:5]
try:
    backend = registry.get(name)
except Exception:
    print("no-backend")
    sys.exit(3)
with torch.no_grad():
    out = refusing_call(kind, backend, name, defect, device)()
if device.startswith("cuda"):
    torch.cuda.synchronize()
print("finite" if bool(out.isfinite().all()) else "not finite")
"""


def _child(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True,
                          text=True, timeout=600)


def assert_refused(kind: str, backend, backend_name: str, defect: str, device) -> None:
    """The ``kind`` call with ``defect`` under ``validate="device"`` is refused: on CUDA a
    child process fails with a CUDA error where the intact call succeeds (skips where the
    backend is not registered in a fresh process); elsewhere it raises."""
    if not str(device).startswith("cuda"):
        with torch.no_grad(), pytest.raises((ValueError, RuntimeError),
                                            match="KV cache|is needed|must be >= 0|two sequences"):
            refusing_call(kind, backend, backend_name, defect, device)()
        return
    good = _child(kind, backend_name, "none", str(device))
    if good.returncode == 3 and "no-backend" in good.stdout:
        pytest.skip(f"{backend_name!r} is not registered in a fresh process (not an installed "
                    "plugin)")
    assert good.returncode == 0 and "finite" in good.stdout, good.stderr[-3000:]
    bad = _child(kind, backend_name, defect, str(device))
    assert bad.returncode != 0 and "finite" not in bad.stdout, (
        f"a {kind} call with {defect} was not refused: {bad.stdout[-500:]} "
        f"{bad.stderr[-2000:]}")
    assert re.search(r"(?i)launch fail|device-side assert|cuda error|CUDA_ERROR", bad.stderr), (
        bad.stderr[-3000:])
