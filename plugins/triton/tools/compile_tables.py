"""Compile the `tl` and decode kernels for a GPU that is not here, and check each against
that GPU's shared memory per block: the offline half of choosing a tile.

`check_tables` compiles every configuration the tables in `attnkit_triton._configs` and
`decode.stream_config` give a GPU of each compute capability (every padded head dim, causal
or not, short or long sequences; fp16 shares bf16's tiles and shared memory, so bf16 stands
for both); a configuration that needs more shared memory than the GPU has per block would be
refused there at launch ("out of resource: shared memory"). `compile_tile` compiles one
kernel with a given tile and reports its compile time (cold: a fresh Triton cache per call),
shared memory, registers and spills. Both return `TileResult`s.

    python plugins/triton/tools/compile_tables.py [--arch 86 --arch 90 ...]
    python plugins/triton/tools/compile_tables.py --arch 90 --kernel dkdv --dtype fp32 \\
        --head-dim 256 --tile 32,32,8,1

Compiling runs in fresh processes whose Triton CUDA driver is a stub reporting the target
(`compile_gluon.worker_pool`), so Triton's whole compiler and its bundled ptxas run (``$PTXAS``
overrides the latter for the register report) and nothing launches. The Gluon kernels (sm_90
only) are compile_gluon.py's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from compile_gluon import worker_pool

DTYPES = ("fp32", "fp16", "bf16")
#: Shared memory per block a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin,
#: what Triton checks at launch), by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                120: 101376}
BLOCK_DS = (16, 32, 64, 128, 256)
KERNELS = ("fwd", "dkdv", "dq", "decode", "paged16", "paged64")
#: The paged decode kernel (`decode` with a block table) at these page sizes: 16 looks a
#: page up per key, 64 (a multiple of the key tile) per tile.
PAGED_KERNELS = {"paged16": 16, "paged64": 64}


@dataclass(frozen=True)
class Entry:
    """One kernel configuration: tile = (block_m, block_n, num_warps, num_stages)."""

    kernel: str  # one of KERNELS
    dtype: str  # one of DTYPES
    head_dim: int
    tile: tuple[int, int, int, int]
    tma: bool = False
    maxnreg: int | None = None
    varlen: bool = False  # the packed variable-length variant
    dropout: bool = False  # the attention-dropout variant (DROPOUT)

    def describe(self) -> str:
        return (f"{self.kernel:6} {self.dtype} D={self.head_dim:<3} "
                "{}x{} w{} s{}".format(*self.tile) + f" {'tma' if self.tma else 'ptr'}"
                + (" varlen" if self.varlen else "") + (" dropout" if self.dropout else "")
                + (f" maxnreg {self.maxnreg}" if self.maxnreg else ""))


@dataclass(frozen=True)
class TileResult:
    """One entry compiled for sm_``arch``."""

    arch: int
    entry: Entry
    error: str | None = None  # why it did not compile, or no register report
    shared: int = 0  # bytes of shared memory per block
    registers: int = 0
    spill_bytes: int = 0
    seconds: float = 0.0  # compile time

    @property
    def limit(self) -> int:
        return SHARED_LIMIT[self.arch]

    @property
    def fits(self) -> bool:
        """Compiled, and within the GPU's shared memory per block."""
        return self.error is None and self.shared <= self.limit

    def describe(self) -> str:
        name = f"sm_{self.arch} {self.entry.describe()}"
        if self.error is not None:
            return f"{name}: FAILED {self.error}"
        return (f"{name}: shared {self.shared:6} B of {self.limit}"
                f"{'' if self.fits else ' OVER THE LIMIT'}; {self.registers} registers, "
                f"{self.spill_bytes} B spill stores; compile {self.seconds:.1f} s")


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _tl_warmup(kernel: str, dtype, head_dim: int, tile, tma: bool, maxnreg=None,
               varlen: bool = False, dropout: bool = False):
    """Compile one `tl` kernel (no mask flags: they add no shared memory); ``varlen``: its
    packed variable-length variant; ``dropout``: its attention-dropout variant."""
    import torch
    import triton
    from attnkit_triton import _backward, _forward
    from attnkit_triton._band import dot_precision
    from attnkit_triton._configs import KernelConfig, launch_options

    bm, bn, warps, stages = tile
    t = torch.empty(1, 2, 256, head_dim, dtype=dtype)
    stats = torch.empty(2 * 256, dtype=torch.float32)
    i32 = torch.empty(4, dtype=torch.int32)  # seqlens_k / cu_seqlens, unread by the dense kernels
    state = torch.empty(2, dtype=torch.int64)  # the dropout state
    strides = list(t.stride())
    shared = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=bm,
                  BLOCK_N=bn, grid=(1, 1), HAS_SEQLENS=False, HAS_LEFT=False, HAS_RIGHT=False,
                  SOFTCAP=False, USE_TMA=tma, PREC=dot_precision(dtype, False), VARLEN=varlen,
                  DROPOUT=dropout,
                  **launch_options(KernelConfig(bm, bn, warps, stages)),
                  **({} if maxnreg is None else {"maxnreg": maxnreg}))
    # (H, Sq, Sq_pad, Sk, GROUP, scale, qk_scale, cap_in, cap_out, left, right, threshold,
    # drop_scale)
    bwd_scalars = (2, 256, 256, 256, 1, 0.1, 0.1, 1.0, 1.0, 0, 0, 6553, 1.0 / 0.9)
    if kernel == "dkdv":
        return _backward._dkdv_kernel.warmup(t, t, t, t, stats, stats, t, t, i32, i32, state,
                                             *strides * 6, *bwd_scalars, **shared)
    if kernel == "dq":
        return _backward._dq_kernel.warmup(t, t, t, t, stats, stats, t, i32, i32, state,
                                           *strides * 5, *bwd_scalars, REVERSE_M=False,
                                           **shared)
    # (H, Sq, Sk, GROUP, qk_scale, cap_in, unit, left, right, threshold, drop_scale)
    return _forward._fwd_kernel.warmup(t, t, t, t, stats, i32, i32, state, *strides * 4,
                                       2, 256, 256, 1, 0.1, 1.0, 0.1, 0, 0, 6553, 1.0 / 0.9,
                                       REVERSE_M=False, FOLD=True, **shared)


def _decode_warmup(dtype, head_dim: int, tile, page_size: int = 0):
    """Compile the split-KV decode kernel with tile = (block_m, block_n, warps, stages); with
    ``page_size``, its paged form."""
    import torch
    import triton
    from attnkit_triton import decode

    bm, bn, warps, stages = tile
    t = torch.empty(1, 2, 256, head_dim, dtype=dtype)
    f32 = torch.empty(1024, dtype=torch.float32)
    i32 = torch.empty(4, dtype=torch.int32)
    # (Hq, Hkv, Sq, Sk, num_splits, qk_scale, cap_log2, left, right, n_pages)
    return decode._split_kv_kernel.warmup(
        t, t, t, i32, f32, f32, t, f32, i32, i32, *list(t.stride()) * 4, 2, 2, 1, 256, 2, 0.1,
        1.0, 0, 0, 37, GROUP=1, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=triton.next_power_of_2(head_dim), HAS_SEQLENS=page_size > 0, HAS_LEFT=False,
        HAS_RIGHT=False, HAS_SOFTCAP=False, IEEE_DOT=dtype == torch.float32,
        PAGED=page_size > 0, PAGE_SIZE=max(page_size, 1),
        TILE_IN_PAGE=page_size > 0 and page_size % bn == 0,
        CHECK_PAGES=page_size > 0,
        num_warps=warps, num_stages=stages, grid=(1,))


def table_entries(arch: int, varlen: bool = False, dropout: bool = False) -> list[Entry]:
    """Every distinct configuration the tables give a GPU of compute capability ``arch``;
    ``varlen``: instead, the varlen variants of its `tl` kernels (the same tiles and load
    paths), which a varlen call launches where the dense call would take these tiles;
    ``dropout``: instead, the dropout variants of its `tl` kernels (dense)."""
    import torch
    from attnkit_triton import decode
    from attnkit_triton._configs import table_configs

    from attnkit.spec import AttentionProblem

    entries = []
    for name in ("bf16", "fp32"):
        dtype = _torch_dtype(name)
        for bd in BLOCK_DS:
            for causal in (False, True):
                for short in (False, True):
                    cfgs = table_configs(arch, bd, causal, dtype, short, dropout)
                    for kernel, cfg in zip(("fwd", "dkdv", "dq"), cfgs):
                        tile = (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
                        # The backend takes TMA on sm90+ where the config allows it.
                        entries.append(Entry(kernel, name, bd, tile, arch >= 90 and cfg.tma,
                                             varlen=varlen, dropout=dropout))
            if varlen or dropout:
                continue
            # Decode: the most query rows a program takes (its largest BLOCK_M).
            p = AttentionProblem(1, 64, 1, 1, 4096, bd, dtype, torch.device("cuda"))
            block_m, _ = decode._tiles(p)
            block_n, warps, stages = decode.stream_config(p, arch)
            entries.append(Entry("decode", name, bd, (block_m, block_n, warps, stages)))
            if name == "bf16" and bd in (64, 128):  # the paged form at the serving shapes
                for k, page_size in PAGED_KERNELS.items():
                    block_n, warps, stages = decode.stream_config(
                        p._replace(page_size=page_size), arch)
                    entries.append(Entry(k, name, bd, (block_m, block_n, warps, stages)))
    return list(dict.fromkeys(entries))


def _triton_ptxas(arch: int) -> str:
    """The ptxas Triton compiles with for ``arch`` (a second one for sm_100+ since 3.5)."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError):
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "ptxas")


def _compile_in_worker(entry: Entry, arch: int) -> dict:
    """`TileResult`'s fields for one entry, in a `worker_pool` process for ``arch``."""
    t0 = time.perf_counter()
    try:
        if entry.kernel == "decode" or entry.kernel in PAGED_KERNELS:
            compiled = _decode_warmup(_torch_dtype(entry.dtype), entry.head_dim, entry.tile,
                                      PAGED_KERNELS.get(entry.kernel, 0))
        else:
            compiled = _tl_warmup(entry.kernel, _torch_dtype(entry.dtype), entry.head_dim,
                                  entry.tile, entry.tma, entry.maxnreg, entry.varlen,
                                  entry.dropout)
    except Exception as e:  # reported with the entry, not as a traceback from the pool
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


def compile_entries(entries: list[Entry], arch: int, jobs: int | None = None,
                    ) -> list[TileResult]:
    """Compile ``entries`` for sm_``arch`` with ``jobs`` processes (default: one per CPU), in
    a fresh Triton cache."""
    if arch not in SHARED_LIMIT:
        raise ValueError(f"arch {arch}: the shared memory limit is known for "
                         f"{sorted(SHARED_LIMIT)}")
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(entries)))
    with tempfile.TemporaryDirectory(prefix="compile_tables_") as cache, \
            worker_pool(arch, jobs, cache) as pool:
        fields = list(pool.map(_compile_in_worker, entries, [arch] * len(entries)))
    return [TileResult(arch, e, **f) for e, f in zip(entries, fields)]


def check_tables(archs=(80, 86, 90, 100, 120), jobs: int | None = None,
                 varlen: bool = False, dropout: bool = False) -> list[TileResult]:
    """Every table configuration compiled for each of ``archs`` (``varlen``, ``dropout``:
    those variants instead); see `TileResult.fits`."""
    return [r for arch in archs
            for r in compile_entries(table_entries(arch, varlen, dropout), arch, jobs)]


def compile_tile(kernel: str, dtype: str, head_dim: int, tile, arch: int = 90,
                 tma: bool = False, maxnreg: int | None = None,
                 varlen: bool = False, dropout: bool = False) -> TileResult:
    """One kernel with ``tile = (block_m, block_n, num_warps, num_stages)`` for sm_``arch``."""
    if kernel not in KERNELS or dtype not in DTYPES:
        raise ValueError(f"kernel must be one of {KERNELS} and dtype one of {DTYPES}; got "
                         f"{kernel!r}, {dtype!r}")
    if (varlen or dropout) and kernel == "decode":
        raise ValueError("varlen and dropout kernels are the tl forward, dkdv and dq")
    entry = Entry(kernel, dtype, head_dim, tuple(tile), tma, maxnreg, varlen, dropout)
    return compile_entries([entry], arch, 1)[0]


def main() -> int:
    import triton

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                    help="compute capability, major*10+minor (repeatable; default: 80 86 90 "
                         "100 120 for the tables, 90 for one --tile)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--kernel", choices=KERNELS)
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tile", help="block_m,block_n,num_warps,num_stages (one kernel)")
    ap.add_argument("--tma", action="store_true", help="with --tile: the descriptor path")
    ap.add_argument("--varlen", action="store_true",
                    help="the varlen variants of the tl kernels (tables or one --tile)")
    ap.add_argument("--dropout", action="store_true",
                    help="the attention-dropout variants of the tl kernels (tables or one "
                         "--tile)")
    ap.add_argument("--maxnreg", type=int, help="with --tile: Triton's register cap (ptxas "
                    "otherwise picks its own under the kernel's 32*num_warps threads)")
    a = ap.parse_args()
    if a.tile is None:
        if a.kernel:
            ap.error("--kernel needs --tile (without both: the tables)")
        archs = a.arch or [80, 86, 90, 100, 120]
        results = check_tables(archs, a.jobs, a.varlen, a.dropout)
        for r in results:
            print(r.describe())
        good = sum(r.fits for r in results)
        print(f"triton {triton.__version__}: {good}/{len(results)} table configurations "
              f"{'(varlen) ' if a.varlen else ''}{'(dropout) ' if a.dropout else ''}"
              f"compile and fit for "
              f"sm_{', sm_'.join(map(str, archs))}")
        return 0 if good == len(results) else 1
    if a.kernel is None:
        ap.error("--tile needs --kernel")
    try:
        tile = tuple(int(x) for x in a.tile.split(","))
    except ValueError:
        tile = ()
    if len(tile) != 4:
        ap.error(f"--tile {a.tile!r}: give block_m,block_n,num_warps,num_stages")
    failed = 0
    for arch in a.arch or [90]:
        r = compile_tile(a.kernel, a.dtype, a.head_dim, tile, arch, a.tma, a.maxnreg, a.varlen,
                         a.dropout)
        print(r.describe())
        failed += not r.fits
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
