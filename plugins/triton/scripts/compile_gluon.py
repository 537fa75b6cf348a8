"""Compile the Gluon Hopper forward and backward for sm_90 without a GPU (CI: catches Gluon
API changes in a new Triton before a GPU run does).

Triton's CUDA driver is replaced by a stub that reports an sm_90 target, so ``warmup`` runs
the whole compiler (Gluon -> TTGIR -> PTX -> cubin with Triton's bundled ptxas) and launches
nothing. Prints one line per variant; exits non-zero if a variant fails or its PTX lacks the
warp-specialized register split or the wgmma instructions.

    python plugins/triton/scripts/compile_gluon.py
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles for the GPU")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402


class _StubDriver(CudaDriver):
    """Triton's CUDA driver for a GPU of compute capability ``arch`` that is not there."""

    def __init__(self, arch: int = 90):  # no libcuda: nothing here touches a device
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def main() -> int:
    triton.runtime.driver.set_active(_StubDriver())
    from attnkit_triton import _hopper
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    mod = _hopper.kernels()
    if isinstance(mod, str):
        print(f"no Gluon Hopper API in Triton {triton.__version__}: {mod}")
        return 1
    failed = total = 0
    S, H = 1024, 2
    for dtype in (torch.bfloat16, torch.float16):
        for D in (64, 128):
            for causal in (False, True):
                t = torch.empty(H * S, D, dtype=dtype)
                f32 = torch.empty(H * S, D, dtype=torch.float32)
                lse = torch.empty(H * S, dtype=torch.float32)
                q_l, kv_l = _hopper._smem_layouts(dtype, D)
                qd = TensorDescriptor(t, [H * S, D], [D, 1], [64, D], q_l)
                kd = TensorDescriptor(t, [H * S, D], [D, 1], [_hopper.BLOCK_N, D], kv_l)
                dqd = TensorDescriptor(f32, [H * S, D], [D, 1], [64, 64], _hopper._dq_layout())
                stats = torch.empty(2 * H * S, dtype=torch.float32)  # delta, lse2 rows
                sd = TensorDescriptor(stats, [2 * H, S], [S, 1], [1, 64], _hopper._stats_layout())
                views = (H * S, S, 0)  # (rb, rh, ch) of a (1, H, S, D) tensor
                # The forward folds the scale into exp2 only for a positive scale: both forms.
                runs = tuple(
                    (f"forward{'' if fold else ' (scale <= 0)'}", mod.fwd._fwd_kernel,
                     S // _hopper.BLOCK_M, (qd, kd, kd, qd, lse, S, H, 1, 0.1, *views, *views,
                                            causal, _hopper.BLOCK_N, 2, fold))
                    for fold in (True, False)) + (
                    ("backward", mod.bwd._bwd_kernel, S // _hopper.BLOCK_N,
                     (qd, kd, kd, qd, dqd, sd, t, t, S, H, 1, 0.1, 0.1, *views, *views,
                      *views, D, causal, 2, _hopper._DQ_LAG[D, causal])),
                )
                for kind, kernel, blocks, args in runs:
                    total += 1
                    name = f"{kind} {str(dtype)[6:]} D={D} causal={causal}"
                    try:
                        k = kernel.warmup(*args, num_warps=4, maxnreg=_hopper._MAXNREG,
                                          grid=(blocks, H))
                    except Exception as e:
                        failed += 1
                        root = e
                        while root.__cause__ is not None:
                            root = root.__cause__
                        print(f"{name}: FAILED {type(root).__name__}: {str(root)[-1500:]}")
                        continue
                    ptx = k.asm["ptx"]
                    ok = "setmaxnreg.dec" in ptx and "wgmma.mma_async" in ptx
                    if kind == "backward":  # dQ's adds are TMA reduces, not per-element atomics
                        ok = ok and "cp.reduce.async.bulk.tensor" in ptx
                    failed += not ok
                    print(f"{name}: {'ok' if ok else 'PTX lacks setmaxnreg/wgmma/bulk reduce'} "
                          f"(smem {k.metadata.shared} B, {ptx.count('wgmma.mma_async')} wgmma)")
    print(f"triton {triton.__version__}: {total - failed}/{total} variants compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
