"""Compile one `tl` kernel for sm_90 without a GPU and report its compile time, its shared
memory, and what ptxas says about registers and spills: the offline half of choosing a tile
(fp32's tiles were chosen this way; benchmarks/NOTES.md, seventeenth and eighteenth sessions).

    python plugins/triton/scripts/tl_compile_cost.py --kernel dkdv --head-dim 128 --tile 32,32,4,2

``--tile`` is block_m,block_n,num_warps,num_stages. Each run uses a fresh Triton cache, so
the time is a cold compile. The spill report runs ``$PTXAS`` (default: Triton's bundled
ptxas) with ``-v`` on the kernel's PTX.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles for the GPU")
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="tl_compile_cost_")

import torch  # noqa: E402
import triton  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("compile_gluon",
                                               os.path.join(_HERE, "compile_gluon.py"))
_compile_gluon = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_compile_gluon)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _warmup(kernel: str, dtype, head_dim: int, tile):
    from attnkit_triton import _backward, _forward
    from attnkit_triton._band import dot_precision

    bm, bn, warps, stages = tile
    t = torch.empty(1, 2, 256, head_dim, dtype=dtype)
    stats = torch.empty(2 * 256, dtype=torch.float32)
    strides = list(t.stride())
    shared = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=bm,
                  BLOCK_N=bn, num_warps=warps, num_stages=stages, grid=(1, 1),
                  HAS_SEQLENS=False, HAS_LEFT=False, HAS_RIGHT=False, SOFTCAP=False,
                  USE_TMA=False, PREC=dot_precision(dtype, False))
    # (H, Sq, Sq_pad, Sk, GROUP, scale, qk_scale, cap_in, cap_out, left, right)
    bwd_scalars = (2, 256, 256, 256, 1, 0.1, 0.1, 1.0, 1.0, 0, 0)
    if kernel == "dkdv":
        return _backward._dkdv_kernel.warmup(t, t, t, t, stats, stats, t, t, stats,
                                             *strides * 6, *bwd_scalars, **shared)
    if kernel == "dq":
        return _backward._dq_kernel.warmup(t, t, t, t, stats, stats, t, stats, *strides * 5,
                                           *bwd_scalars, REVERSE_M=False, **shared)
    # (H, Sq, Sk, GROUP, qk_scale, cap_in, unit, left, right)
    return _forward._fwd_kernel.warmup(t, t, t, t, stats, stats, *strides * 4,
                                       2, 256, 256, 1, 0.1, 1.0, 0.1, 0, 0,
                                       REVERSE_M=False, WARP_SPEC=False, FOLD=True, **shared)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", choices=("fwd", "dkdv", "dq"), required=True)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tile", default="32,32,4,2")
    a = ap.parse_args()
    tile = tuple(int(x) for x in a.tile.split(","))
    triton.runtime.driver.set_active(_compile_gluon._Sm90Stub())
    t0 = time.perf_counter()
    compiled = _warmup(a.kernel, DTYPES[a.dtype], a.head_dim, tile)
    seconds = time.perf_counter() - t0
    ptxas = os.environ.get("PTXAS") or os.path.join(os.path.dirname(triton.__file__),
                                                     "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    report = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                            capture_output=True, text=True).stderr
    os.unlink(f.name)
    usage = " | ".join(line.split(":", 1)[-1].strip() for line in report.splitlines()
                       if "spill" in line or "registers" in line)
    print(f"{a.kernel} {a.dtype} D={a.head_dim} tile {a.tile}: compile {seconds:.1f} s; "
          f"shared memory {compiled.metadata.shared} B; {usage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
