"""The CuPy backend: hand-written CUDA kernels compiled by NVRTC through CuPy.

CuPy is imported lazily: without it (or without a usable GPU) the backend reports itself
unavailable with the reason, and nothing else changes.
"""

from __future__ import annotations

import torch

from attnkit.backend import Backend, Capabilities

from . import _compile

#: Tensor cores (mma.sync bf16, cp.async) need compute capability 8.0.
MIN_COMPUTE_CAPABILITY = 80


def _compute_capability(device_index: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_index).compute_capability)


class CupyBackend(Backend):
    name = "cupy"
    description = ("CUDA C++ kernels through CuPy/NVRTC: mma.sync tensor cores for fp16/bf16, "
                   "exact fp32 path, deterministic backward")
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        head_dim_min=1,
        head_dim_max=_compile.MAX_HEAD_DIM,
        causal=True, gqa=True, window=True, seqlens_k=True, softcap=True, lse=True,
        backward=True, deterministic=True,
    )

    def __init__(self):
        self._cc: dict[int, int] = {}

    def availability(self) -> tuple[bool, str]:
        try:
            import cupy
        except Exception as e:  # ImportError, or a broken CUDA library underneath
            return False, (f"cupy is not importable ({type(e).__name__}: {e}); install "
                           "attnkit-cupy[cuda12] or [cuda13]")
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:
            return False, f"cupy cannot see a CUDA device ({type(e).__name__}: {e})"
        if n == 0:
            return False, "cupy sees no CUDA device"
        if not torch.cuda.is_available():
            return False, "torch has no CUDA support here; the kernels run on torch's tensors"
        try:
            ccs = [_compute_capability(i) for i in range(n)]
        except Exception as e:
            return False, f"cannot read the compute capability ({type(e).__name__}: {e})"
        if max(ccs) < MIN_COMPUTE_CAPABILITY:
            return False, (f"compute capability {max(ccs) / 10:.1f} < 8.0 (the kernels need "
                           "sm_80 or newer)")
        return True, ""

    def not_supported_reasons(self, problem):
        reasons = super().not_supported_reasons(problem)
        if problem.device.type == "cuda" and not reasons:
            idx = problem.device.index
            idx = torch.cuda.current_device() if idx is None else idx
            cc = self._cc.get(idx)
            if cc is None:
                try:
                    cc = self._cc[idx] = _compute_capability(idx)
                except Exception as e:  # no cupy / no driver: say so instead of raising
                    reasons.append(f"cannot read the compute capability of {problem.device} "
                                   f"({type(e).__name__}: {e})")
                    return reasons
            if cc < MIN_COMPUTE_CAPABILITY:
                reasons.append(f"{problem.device} has compute capability {cc / 10:.1f} < 8.0")
        return reasons

    def forward(self, problem, q, k, v, seqlens_k):
        from . import _decode, _launch

        # Decoding shapes (Sq <= 16, a long key range, too few blocks to fill the GPU) split
        # the keys across blocks and merge (kernels/decode.cu).
        if _decode.use_split_kv(problem):
            return _decode.decode_forward(problem, q, k, v, seqlens_k)
        return _launch.forward(problem, q, k, v, seqlens_k)

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k):
        from . import _launch

        return _launch.backward(problem, q, k, v, out, lse, dout, seqlens_k)
