"""Compile the Gluon Hopper forward and backward for sm_90 without a GPU: catches Gluon API
changes in a new Triton before a GPU run does.

Triton's CUDA driver is replaced by a stub that reports the target (`worker_pool`), so
``warmup`` runs the whole compiler (Gluon -> TTGIR -> PTX -> cubin with Triton's bundled
ptxas) and launches nothing. `compile_variants` returns one `GluonResult` per variant; a
variant fails if it does not compile or its PTX lacks the warp-specialized register split,
the wgmma instructions or (backward) the TMA reduces of dQ.

    python plugins/triton/tools/compile_gluon.py
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class GluonResult:
    name: str  # "forward bfloat16 D=128 causal=True"
    error: str | None = None  # why it did not compile
    shared: int = 0  # bytes of shared memory
    wgmma: int = 0  # wgmma.mma_async instructions in the PTX
    missing: tuple[str, ...] = ()  # PTX instructions it should have and lacks

    @property
    def ok(self) -> bool:
        return self.error is None and not self.missing


def _stub_driver(arch: int):
    """Triton's CUDA driver for a GPU of compute capability ``arch`` that is not there."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class StubDriver(CudaDriver):
        def __init__(self):  # no libcuda: nothing here touches a device
            self.arch = arch

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    return StubDriver()


def _init_worker(arch: int, cache_dir: str) -> None:
    # Before Triton decorates any kernel: under TRITON_INTERPRET=1 they would be interpreted.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import triton

    triton.runtime.driver.set_active(_stub_driver(arch))


def worker_pool(arch: int, jobs: int, cache_dir: str) -> ProcessPoolExecutor:
    """Fresh processes compiling for ``arch`` into ``cache_dir``: spawned, so that neither this
    process's TRITON_INTERPRET nor its already-decorated kernels reach them, and one target per
    process (Triton's in-memory kernel cache does not key on it)."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(arch, cache_dir))


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {str(e)[-1500:]}"


def _compile_in_worker() -> list[dict] | str:
    """Every variant's `GluonResult` fields, in a `worker_pool` process (plain data crosses
    back); a string if this Triton has no Gluon API."""
    import torch
    from attnkit_triton import _hopper
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    mod = _hopper.kernels()
    if isinstance(mod, str):
        return mod
    results = []
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
                sd = TensorDescriptor(stats, [2 * H, S], [S, 1], [1, 64],
                                      _hopper._stats_layout())
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
                    name = f"{kind} {str(dtype)[6:]} D={D} causal={causal}"
                    try:
                        k = kernel.warmup(*args, num_warps=4, maxnreg=_hopper._MAXNREG,
                                          grid=(blocks, H))
                    except Exception as e:
                        results.append(dict(name=name, error=_root_cause(e)))
                        continue
                    ptx = k.asm["ptx"]
                    wanted = ["setmaxnreg.dec", "wgmma.mma_async"]
                    if kind == "backward":  # dQ's adds are TMA reduces, not per-element atomics
                        wanted.append("cp.reduce.async.bulk.tensor")
                    results.append(dict(
                        name=name, shared=k.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                        missing=tuple(w for w in wanted if w not in ptx)))
    return results


def compile_variants() -> list[GluonResult]:
    """Compile every Gluon variant (two dtypes, head dims 64 and 128, causal or not; the
    forward with and without the folded scale, and the backward) for sm_90. Raises
    ``RuntimeError`` if this Triton has no Gluon Hopper API."""
    with tempfile.TemporaryDirectory(prefix="compile_gluon_") as cache, \
            worker_pool(90, 1, cache) as pool:
        results = pool.submit(_compile_in_worker).result()
    if isinstance(results, str):
        import triton

        raise RuntimeError(f"no Gluon Hopper API in Triton {triton.__version__}: {results}")
    return [GluonResult(**r) for r in results]


def main() -> int:
    import triton

    try:
        results = compile_variants()
    except RuntimeError as e:
        print(e)
        return 1
    for r in results:
        if r.error:
            print(f"{r.name}: FAILED {r.error}")
        else:
            print(f"{r.name}: {'ok' if r.ok else 'PTX lacks ' + ', '.join(r.missing)} "
                  f"(smem {r.shared} B, {r.wgmma} wgmma)")
    good = sum(r.ok for r in results)
    print(f"triton {triton.__version__}: {good}/{len(results)} variants compiled for sm_90")
    return 0 if good == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
