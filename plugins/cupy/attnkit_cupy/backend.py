"""The CuPy backend: hand-written CUDA kernels compiled by NVRTC through CuPy.

CuPy is imported lazily: without it (or without a usable GPU) the backend reports itself
unavailable with the reason, and nothing else changes.
"""

from __future__ import annotations

import functools

import torch

from attnkit import backend as _core
from attnkit.backend import Backend, Capabilities
from attnkit.backend_utils import band_args

from . import _compile

#: Tensor cores (mma.sync bf16, cp.async) need compute capability 8.0.
MIN_COMPUTE_CAPABILITY = (8, 0)


def _compute_capability(device_index: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_index).compute_capability)


@functools.lru_cache(maxsize=64)  # selection asks on every new problem; it never changes
def _shared_memory_limit(device_index: int) -> int:
    """Dynamic shared memory a block may opt in to: 163 KB on A100, 99 KB on sm_86/sm_89,
    227 KB on H100."""
    import cupy

    return int(cupy.cuda.Device(device_index).attributes["MaxSharedMemoryPerBlockOptin"])


@functools.lru_cache(maxsize=1024)  # selection asks on every call
def shared_memory_needed(problem) -> tuple[int, str]:
    """(bytes, which kernel): the most dynamic shared memory per block among the kernels a
    call of ``problem`` launches (forward or split-KV decode, and the backward's if it needs
    gradients)."""
    from . import _decode

    dtype = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[problem.dtype]
    band, softcap = band_args(problem).bounded, problem.softcap is not None
    fwd = "decode" if _decode.use_split_kv(problem) else "forward"
    roles = [(fwd, "split" if fwd == "decode" else "fwd")]
    if problem.needs_grad:
        roles += [("backward", "dq"), ("backward", "dkdv")]
    return max((_compile.variant_for(source, dtype, problem.head_dim, band, softcap)
                .geometry(role)[2], f"{source} {role}") for source, role in roles)


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
        backward=True, deterministic=True, cuda_capability_min=MIN_COMPUTE_CAPABILITY,
        lse_grad=True,
        # Fused in the forward/backward kernels (FEAT bits of kernels/common.cuh), together
        # too; decoding shapes with either run those kernels instead of the split-KV decode.
        varlen=True, dropout=True,
        # The split-KV kernel reads page pools through the block table (kernels/decode.cu)
        # and checks each entry and fill level it reads (a trap).
        paged=True, paged_checks=True,
    )

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
        if max(ccs) < 10 * MIN_COMPUTE_CAPABILITY[0] + MIN_COMPUTE_CAPABILITY[1]:
            return False, (f"compute capability {max(ccs) / 10:.1f} < 8.0 (the kernels need "
                           "sm_80 or newer)")
        return True, ""

    def not_supported_reasons(self, problem):
        from . import _launch

        # The base class refuses GPUs below MIN_COMPUTE_CAPABILITY (Capabilities).
        reasons = super().not_supported_reasons(problem) + _launch.limit_reasons(problem)
        if problem.page_size:
            from . import _decode

            reasons += _decode.grid_reasons(problem)
        if problem.device.type == "cuda" and not reasons:
            idx = problem.device.index
            try:
                limit = _shared_memory_limit(torch.cuda.current_device() if idx is None else idx)
            except Exception as e:  # no cupy / no driver: say so instead of raising
                return [f"cannot read the shared memory per block of {problem.device} "
                        f"({type(e).__name__}: {e})"]
            need, kernel = shared_memory_needed(problem)
            if need > limit:  # the tiles are sized for A100/H100; sm_86/sm_89 have 99 KB
                major, minor = _core.cuda_capability(problem.device)
                reasons.append(f"the {kernel} kernel at head dim {problem.head_dim} "
                               f"({str(problem.dtype)[6:]}) needs {need} bytes of shared "
                               f"memory per block; {problem.device} (sm_{major}{minor}) "
                               f"allows {limit}")
        return reasons

    def forward(self, problem, q, k, v, seqlens_k, dropout=None):
        from . import _decode, _launch

        # Decoding shapes (Sq <= 16, a long key range, too few blocks to fill the GPU) split
        # the keys across blocks and merge (kernels/decode.cu).
        if _decode.use_split_kv(problem):
            return _decode.decode_forward(problem, q, k, v, seqlens_k)
        return _launch.forward(problem, q, k, v, seqlens_k, dropout)

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k, dlse=None, dropout=None):
        from . import _launch

        return _launch.backward(problem, q, k, v, out, lse, dout, seqlens_k, dlse, dropout)

    def forward_varlen(self, problem, q, k, v, cu_seqlens_q, cu_seqlens_k, dropout=None):
        from . import _launch

        return _launch.forward_varlen(problem, q, k, v, cu_seqlens_q, cu_seqlens_k, dropout)

    def backward_varlen(self, problem, q, k, v, out, lse, dout, cu_seqlens_q, cu_seqlens_k,
                        dlse=None, dropout=None):
        from . import _launch

        return _launch.backward_varlen(problem, q, k, v, out, lse, dout, cu_seqlens_q,
                                       cu_seqlens_k, dlse, dropout)

    def forward_paged(self, problem, q, k_pages, v_pages, block_table, seqlens_k):
        from . import _decode

        # Every paged call, decoding or several queries, takes the split-KV kernel: row
        # blocks of 16 cover any query count, and it looks pages up as it loads each tile.
        return _decode.decode_forward(problem, q, k_pages, v_pages, seqlens_k,
                                      block_table=block_table)
