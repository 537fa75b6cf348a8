"""Compile the `tl` and decode kernels for a GPU that is not here, and check each against
that GPU's shared memory per block: the offline half of choosing a tile.

Two modes:

    python plugins/triton/scripts/compile_tables.py [--arch 86 --arch 90 ...]
    python plugins/triton/scripts/compile_tables.py --arch 90 --kernel dkdv --dtype fp32 \\
        --head-dim 256 --tile 32,32,8,1

The first compiles every configuration the tables in `attnkit_triton._configs` and
`decode.stream_config` give a GPU of that compute capability (every padded head dim, causal
or not, short or long sequences; fp16 shares bf16's tiles and shared memory, so bf16 stands
for both) and exits non-zero if one needs more shared memory than the GPU has per block:
Triton would refuse to launch it there ("out of resource: shared memory"). The second
compiles one kernel with the given block_m,block_n,num_warps,num_stages and reports its
compile time (cold: a fresh Triton cache per run), shared memory, registers and spills, and
fails the same way if it does not fit.

Triton's CUDA driver is replaced by a stub (compile_gluon.py's) that reports the target, so
Triton's whole compiler and its bundled ptxas run (``$PTXAS`` overrides the latter for the
register report) and nothing launches. The Gluon kernels (sm_90 only) are compile_gluon.py's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles for the GPU")
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_tables_")

import torch  # noqa: E402
import triton  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("compile_gluon",
                                               os.path.join(_HERE, "compile_gluon.py"))
_compile_gluon = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_compile_gluon)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Shared memory per block a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin,
#: what Triton checks at launch), by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                120: 101376}
BLOCK_DS = (16, 32, 64, 128, 256)


def _tl_warmup(kernel: str, dtype, head_dim: int, tile, tma: bool, maxnreg=None):
    """Compile one `tl` kernel (no mask flags: they add no shared memory)."""
    from attnkit_triton import _backward, _forward
    from attnkit_triton._band import dot_precision
    from attnkit_triton._configs import KernelConfig, launch_options

    bm, bn, warps, stages = tile
    t = torch.empty(1, 2, 256, head_dim, dtype=dtype)
    stats = torch.empty(2 * 256, dtype=torch.float32)
    strides = list(t.stride())
    shared = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=bm,
                  BLOCK_N=bn, grid=(1, 1), HAS_SEQLENS=False, HAS_LEFT=False, HAS_RIGHT=False,
                  SOFTCAP=False, USE_TMA=tma, PREC=dot_precision(dtype, False),
                  **launch_options(KernelConfig(bm, bn, warps, stages, maxnreg=maxnreg)))
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


def _decode_warmup(dtype, head_dim: int, tile):
    """Compile the split-KV decode kernel with tile = (block_m, block_n, warps, stages)."""
    from attnkit_triton import decode

    bm, bn, warps, stages = tile
    t = torch.empty(1, 2, 256, head_dim, dtype=dtype)
    f32 = torch.empty(1024, dtype=torch.float32)
    i32 = torch.empty(4, dtype=torch.int32)
    # (Hq, Hkv, Sq, Sk, num_splits, qk_scale, cap_log2, left, right)
    return decode._split_kv_kernel.warmup(
        t, t, t, i32, f32, f32, t, f32, i32, *list(t.stride()) * 4, 2, 2, 1, 256, 2, 0.1,
        1.0, 0, 0, GROUP=1, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=triton.next_power_of_2(head_dim), HAS_SEQLENS=False, HAS_LEFT=False,
        HAS_RIGHT=False, HAS_SOFTCAP=False, IEEE_DOT=dtype == torch.float32,
        num_warps=warps, num_stages=stages, grid=(1,))


def table_entries(arch: int) -> list[tuple]:
    """(kernel, dtype name, head dim, tile, tma, maxnreg) for every distinct configuration the
    tables give a GPU of compute capability ``arch``."""
    from attnkit_triton import decode
    from attnkit_triton._configs import table_configs

    from attnkit.spec import AttentionProblem

    entries = []
    for name in ("bf16", "fp32"):
        for bd in BLOCK_DS:
            for causal in (False, True):
                for short in (False, True):
                    cfgs = table_configs(arch, bd, causal, DTYPES[name], short)
                    for kernel, cfg in zip(("fwd", "dkdv", "dq"), cfgs):
                        tile = (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
                        # The backend takes TMA on sm90+ where the config allows it.
                        entries.append((kernel, name, bd, tile, arch >= 90 and cfg.tma,
                                        cfg.maxnreg))
            # Decode: the most query rows a program takes (its largest BLOCK_M).
            p = AttentionProblem(1, 64, 1, 1, 4096, bd, DTYPES[name], torch.device("cuda"))
            block_m, _ = decode._tiles(p)
            block_n, warps, stages = decode.stream_config(p, arch)
            entries.append(("decode", name, bd, (block_m, block_n, warps, stages), False, None))
    return list(dict.fromkeys(entries))


def _triton_ptxas(arch: int) -> str:
    """The ptxas Triton compiles with for ``arch`` (a second one for sm_100+ since 3.5)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError):
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "ptxas")


def _init_worker(arch: int) -> None:
    triton.runtime.driver.set_active(_compile_gluon._StubDriver(arch))


def compile_one(kernel: str, dtype: str, head_dim: int, tile, tma: bool, arch: int,
                maxnreg=None) -> dict:
    """Compile one kernel for ``arch`` (in a worker whose driver stub targets it)."""
    t0 = time.perf_counter()
    try:
        if kernel == "decode":
            compiled = _decode_warmup(DTYPES[dtype], head_dim, tile)
        else:
            compiled = _tl_warmup(kernel, DTYPES[dtype], head_dim, tile, tma, maxnreg)
    except Exception as e:  # report it with the entry, not as a traceback from the pool
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        return dict(error=f"{type(root).__name__}: {str(root)[-500:]}")
    seconds = time.perf_counter() - t0
    ptxas = os.environ.get("PTXAS") or _triton_ptxas(arch)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    report = subprocess.run([ptxas, f"-arch={sm}", "-v", f.name, "-o", os.devnull],
                            capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    if regs is None or spills is None:
        return dict(error=f"no register report from {ptxas}: {report[-500:]}")
    return dict(shared=compiled.metadata.shared, seconds=seconds, registers=int(regs[1]),
                spill_bytes=int(spills[1]))


def _tag(tile) -> str:
    return "{}x{} w{} s{}".format(*tile)


def sweep(archs, jobs: int) -> int:
    failed = total = 0
    for arch in archs:
        limit = SHARED_LIMIT[arch]
        entries = table_entries(arch)
        with ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(arch,)) as pool:
            results = pool.map(compile_one, *zip(*(e[:5] + (arch, e[5]) for e in entries)))
            for (kernel, dtype, bd, tile, tma, maxnreg), r in zip(entries, results):
                total += 1
                name = (f"sm_{arch} {kernel:6} {dtype} D={bd:<3} {_tag(tile):13} "
                        f"{'tma' if tma else 'ptr'}{f' maxnreg {maxnreg}' if maxnreg else ''}")
                if "error" in r:
                    failed += 1
                    print(f"{name}: FAILED {r['error']}", flush=True)
                    continue
                over = r["shared"] > limit
                failed += over
                print(f"{name}: shared {r['shared']:6} B of {limit}"
                      f"{' OVER THE LIMIT' if over else ''}; {r['registers']} registers, "
                      f"{r['spill_bytes']} B spill stores; {r['seconds']:.1f} s", flush=True)
    print(f"triton {triton.__version__}: {total - failed}/{total} table configurations "
          f"compile and fit for sm_{', sm_'.join(map(str, archs))}")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                    help="compute capability, major*10+minor (repeatable; default: 80 86 90 "
                         "100 120 for the sweep, 90 for one --tile)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--kernel", choices=("fwd", "dkdv", "dq", "decode"))
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tile", help="block_m,block_n,num_warps,num_stages (one kernel)")
    ap.add_argument("--tma", action="store_true", help="with --tile: the descriptor path")
    ap.add_argument("--maxnreg", type=int, help="with --tile: Triton's register cap (ptxas "
                    "otherwise picks its own under the kernel's 32*num_warps threads)")
    a = ap.parse_args()
    if a.tile is None:
        if a.kernel:
            ap.error("--kernel needs --tile (without both: the tables' sweep)")
        return sweep(a.arch or [80, 86, 90, 100, 120], a.jobs)
    if a.kernel is None:
        ap.error("--tile needs --kernel")
    try:
        tile = tuple(int(x) for x in a.tile.split(","))
    except ValueError:
        tile = ()
    if len(tile) != 4:
        ap.error(f"--tile {a.tile!r}: give block_m,block_n,num_warps,num_stages")
    for arch in a.arch or [90]:
        # A process per target: Triton's in-memory kernel cache does not key on it.
        with ProcessPoolExecutor(1, initializer=_init_worker, initargs=(arch,)) as pool:
            r = pool.submit(compile_one, a.kernel, a.dtype, a.head_dim, tile, a.tma,
                            arch, a.maxnreg).result()
        name = f"{a.kernel} {a.dtype} D={a.head_dim} tile {a.tile} sm_{arch}"
        if "error" in r:
            print(f"{name}: FAILED {r['error']}")
            return 1
        over = r["shared"] > SHARED_LIMIT[arch]
        print(f"{name}: compile {r['seconds']:.1f} s; shared memory {r['shared']} B of "
              f"{SHARED_LIMIT[arch]}{' OVER THE LIMIT' if over else ''}; {r['registers']} "
              f"registers, {r['spill_bytes']} B spill stores")
        if over:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
