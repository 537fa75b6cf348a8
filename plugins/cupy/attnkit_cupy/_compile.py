"""Kernel variants, their launch geometry, and the lazy NVRTC module cache.

A `Variant` is one compiled configuration: a kernel source (forward, backward or the split-KV
decode), an element type, a padded head dim, the two masking flags and, for the forward and
backward, the feature bits (packed sequences, dropout or both; FEAT_*), for the decode the
paged bits (FEAT_PAGED, FEAT_WHOLE_PAGES). Each is compiled once
per device through ``cupy.RawModule(code=..., options=..., name_expressions=[...])``; CuPy
adds ``-arch=sm_XY`` for the current device and caches the cubin on disk, so a configuration
is built once per machine. `all_variants` lists every configuration the backend can ask for:
CI compiles that list with nvcc (tools/compile_all.py).

The fp16/bf16 tile sizes are chosen here (``*_TILES``) and passed as template arguments, so
the launch geometry below and the kernels cannot disagree; the fp32 kernels' fixed tiles are
mirrored from their ``*Cfg`` structs.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCES = ("forward", "backward", "decode")

#: Padded head dims: D is rounded up to the next bucket, the extra columns are zeros.
HEAD_DIM_BUCKETS = (32, 64, 96, 128, 192, 256)
MAX_HEAD_DIM = HEAD_DIM_BUCKETS[-1]
DTYPES = ("fp16", "bf16", "fp32")
_ELEM = {"fp16": "Half", "bf16": "BF16"}

#: fp16/bf16 tiles per padded head dim (tuned on an H100; docs/tuning.md):
#: forward (warps, 16-row slabs per warp, keys per tile, option bits FWD_*), dq (keys per tile)
#: and dkdv (warps, queries per tile). Register budget: accumulators must stay under 255 per
#: thread.
FWD_TILES = {32: (4, 2, 64, 0), 64: (4, 2, 64, 1), 96: (4, 2, 64, 0), 128: (4, 2, 64, 2),
             192: (4, 1, 64, 0), 256: (4, 1, 32, 0)}
#: Forward option bits (the FWD_* macros of forward.cu): Q fragments kept in registers across
#: key tiles (DP <= 64), the accumulator rescale skipped when no row max of a warp grew, and
#: the older two-barrier pipeline (kept for A/B sweeps).
FWD_QREG, FWD_LAZY, FWD_TWO_BARRIERS = 1, 2, 4
DQ_TILES = {32: 64, 64: 64, 96: 64, 128: 64, 192: 32, 256: 32}
DKV_TILES = {32: (8, 64), 64: (4, 64), 96: (8, 32), 128: (4, 64), 192: (4, 32), 256: (4, 32)}
#: Split-KV decode, fp16/bf16: (warps, keys per streamed tile, pipeline stages). Each warp takes
#: tile / warps keys (a multiple of 16); stages - 1 tiles are in flight per block.
DECODE_TILES = {32: (4, 64, 4), 64: (4, 64, 4), 96: (4, 64, 3), 128: (4, 64, 3),
                192: (4, 64, 2), 256: (4, 64, 2)}
#: Query rows per decode split block (DEC_ROWS in decode.cu), for every dtype.
DECODE_ROWS = 16
#: The fp32 decode kernel's fixed tiles (DecF32Cfg): warps, keys per tile, stages.
DECODE_F32 = (4, 32, 2)

#: Feature bits of the forward/backward kernels (ATTN_VARLEN / ATTN_DROPOUT of common.cuh): the
#: template argument FEAT. 0 is the plain kernel; both bits: dropout on packed sequences.
FEAT_VARLEN, FEAT_DROPOUT = 1, 2
FEATURES = (0, FEAT_VARLEN, FEAT_DROPOUT, FEAT_VARLEN | FEAT_DROPOUT)
#: The decode kernels' features: page pools read through a block table (PAGED of decode.cu),
#: with a page looked up once per tile where pages hold whole tiles (fp16/bf16 only).
FEAT_PAGED, FEAT_WHOLE_PAGES = 4, 8
#: Each decode feature set and the fp16/bf16 kernel's PAGED template argument for it
#: (PAGED_NONE, _ROWS, _WHOLE of decode.cu).
PAGED_MODE = {0: 0, FEAT_PAGED: 1, FEAT_PAGED | FEAT_WHOLE_PAGES: 2}
DECODE_FEATURES = tuple(PAGED_MODE)
#: The feature bits only the fp16/bf16 decode has (the fp32 kernel reads pages row by row).
FEAT_HALF_ONLY = FEAT_WHOLE_PAGES
#: Block-table entries a paged decode block keeps in shared memory (PAGE_WINDOW of decode.cu).
PAGE_WINDOW = 512

#: NVRTC options. CuPy appends -arch=sm_XY for the current device (and caches per arch).
OPTIONS = ("-std=c++17",)


def head_dim_bucket(head_dim: int) -> int:
    for b in HEAD_DIM_BUCKETS:
        if head_dim <= b:
            return b
    raise ValueError(f"head dim {head_dim} exceeds the largest supported, {MAX_HEAD_DIM}")


def _b(x: bool) -> str:
    return "true" if x else "false"


@dataclass(frozen=True)
class Variant:
    source: str  # "forward", "backward" or "decode"
    dtype: str  # "fp16", "bf16" or "fp32"
    dp: int  # padded head dim
    band: bool  # causal / sliding-window mask code
    softcap: bool
    #: fp16/bf16 tile sizes, (forward tile), (dq tile, dkdv tile) or (decode tile): part of
    #: the cache key.
    tiles: tuple = ()
    #: FEAT_* bits: FEATURES for the forward and backward, DECODE_FEATURES for the decode.
    feat: int = 0

    def kernels(self) -> dict[str, str]:
        """Role -> C++ name expression of every kernel of this variant."""
        dp = self.dp
        if self.source != "decode":
            if self.feat not in FEATURES:
                raise ValueError(f"feature bits {self.feat} are not a forward/backward "
                                 f"feature set {FEATURES}")
            flags = f"{_b(self.band)}, {_b(self.softcap)}, {self.feat}>"
        else:
            if self.feat not in DECODE_FEATURES or (self.dtype == "fp32"
                                                    and self.feat & FEAT_HALF_ONLY):
                raise ValueError(f"the split-KV decode kernels take feature bits "
                                 f"{DECODE_FEATURES} (fp32 without FEAT_WHOLE_PAGES), got "
                                 f"{self.feat} for {self.dtype}")
            paged = (_b(bool(self.feat)) if self.dtype == "fp32"
                     else PAGED_MODE[self.feat])
            flags = f"{_b(self.band)}, {_b(self.softcap)}, {paged}>"
        if self.source == "decode":
            if self.dtype == "fp32":
                return {"split": f"decode_split_f32_kernel<{dp}, {flags}",
                        "merge": "decode_merge_kernel<float>"}
            nw, bn, st = self.tiles
            t = _ELEM[self.dtype]
            return {"split": f"decode_split_kernel<{t}, {dp}, {nw}, {bn}, {st}, {flags}",
                    "merge": f"decode_merge_kernel<{t}>"}
        if self.dtype == "fp32":
            if self.source == "forward":
                return {"fwd": f"fwd_f32_kernel<{dp}, {flags}"}
            return {"delta": "bwd_delta_f32_kernel", "dq": f"bwd_dq_f32_kernel<{dp}, {flags}",
                    "dkdv": f"bwd_dkdv_f32_kernel<{dp}, {flags}"}
        t = _ELEM[self.dtype]
        if self.source == "forward":
            nw, mt, bn, opt = self.tiles
            return {"fwd": f"fwd_kernel<{t}, {dp}, {nw}, {mt}, {bn}, {opt}, {flags}"}
        bn, (nw, bq) = self.tiles
        return {"delta": f"bwd_delta_kernel<{t}>",
                "dq": f"bwd_dq_kernel<{t}, {dp}, {bn}, {flags}",
                "dkdv": f"bwd_dkdv_kernel<{t}, {dp}, {nw}, {bq}, {flags}"}

    # -- launch geometry (mirrors FwdCfg / F32Cfg / DqCfg / DkvCfg / BwdF32Cfg / DecCfg) -----

    def geometry(self, role: str) -> tuple[int, int, int]:
        """``(rows per block, threads per block, dynamic shared memory bytes)`` of a kernel.

        Rows are queries for fwd/dq/delta, keys for dkdv, query rows (of one kv head's group)
        for split and merge; for a column-chunked dkdv the grid has ``chunks()`` blocks per key
        tile.
        """
        dp = self.dp
        if role in ("delta", "merge"):
            return 4, 128, 0
        if role == "split":
            return (DECODE_ROWS,) + _decode_split_geometry(self.dtype, dp, self.tiles,
                                                           bool(self.feat))
        if self.dtype == "fp32":
            if role == "fwd":
                bm, bn, ldk = 16, 32, dp + 1
                return bm, 128, (bm * dp + 2 * bn * ldk) * 4
            br, bc, ldc = 16, 32, dp + 1
            return br, 128, (2 * br * dp + 2 * bc * ldc + 2 * bc) * 4
        lds = dp + 8
        if role == "fwd":
            nw, mt, bn, _ = self.tiles
            bm = nw * 16 * mt
            return bm, nw * 32, (bm + 4 * bn) * lds * 2
        if role == "dq":
            bm, bn = 64, self.tiles[0]
            return bm, 128, (2 * bm + 4 * bn) * lds * 2
        if role == "dkdv":
            nw, bq = self.tiles[1]
            bk = nw * 16
            return bk, nw * 32, 2 * bk * lds * 2 + 4 * bq * lds * 2 + 4 * bq * 4
        raise ValueError(f"unknown kernel role {role!r}")

    def chunks(self) -> int:
        """dK/dV column chunks per key tile (the fp16/bf16 kernel splits DP > 128 in two)."""
        return 2 if self.dtype != "fp32" and self.dp > 128 else 1


def _decode_split_geometry(dtype: str, dp: int, tiles: tuple,
                           paged: bool) -> tuple[int, int]:
    """(threads, shared memory bytes) of a decode split kernel (DecCfg / DecF32Cfg; paged:
    the table window after the pipeline)."""
    window = PAGE_WINDOW * 4 if paged else 0
    if dtype == "fp32":
        nw, bn, st = DECODE_F32
        return nw * 32, (DECODE_ROWS * dp + st * bn * (2 * dp + 1)) * 4 + window
    nw, bn, st = tiles
    lds = dp + 8
    pipe = (DECODE_ROWS + 2 * st * bn) * lds * 2
    merge = (nw * DECODE_ROWS * (dp + 8) + 3 * nw * DECODE_ROWS) * 4
    return nw * 32, max(pipe + window, merge)


def _tiles(source: str, dtype: str, dp: int) -> tuple:
    if dtype == "fp32":
        return ()
    if source == "decode":
        return DECODE_TILES[dp]
    return FWD_TILES[dp] if source == "forward" else (DQ_TILES[dp], DKV_TILES[dp])


def variant_for(source: str, dtype: str, head_dim: int, band: bool, softcap: bool,
                feat: int = 0) -> Variant:
    dp = head_dim_bucket(head_dim)
    return Variant(source, dtype, dp, bool(band), bool(softcap), _tiles(source, dtype, dp), feat)


def all_variants() -> list[Variant]:
    """Every configuration the backend can ask for."""
    return [Variant(src, dt, dp, band, cap, _tiles(src, dt, dp), feat)
            for src in SOURCES for dt in DTYPES for dp in HEAD_DIM_BUCKETS
            for band in (False, True) for cap in (False, True)
            for feat in (FEATURES if src != "decode" else DECODE_FEATURES)
            if not (dt == "fp32" and feat & FEAT_HALF_ONLY)]


_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_.]+)"\s*$', re.M)


def kernel_source(source: str) -> str:
    """The .cu text with local includes inlined: NVRTC then needs no include path, and CuPy's
    cache key (a hash of this text) changes whenever any included file does."""
    path = KERNEL_DIR / f"{source}.cu"
    seen: set[str] = set()

    def expand(text: str) -> str:
        def repl(m):
            name = m.group(1)
            if name in seen:
                return ""
            seen.add(name)
            return expand((KERNEL_DIR / name).read_text())
        return _INCLUDE.sub(repl, text)

    return expand(path.read_text())


_lock = threading.Lock()
_modules: dict[tuple[Variant, int], object] = {}
_kernels: dict[tuple[Variant, int, str], object] = {}


def get_kernel(variant: Variant, role: str, device_index: int):
    """The compiled `cupy.RawKernel` of one role of a variant on a device (compiled on first
    use; call inside ``cupy.cuda.Device(device_index)``)."""
    key = (variant, device_index, role)
    kern = _kernels.get(key)
    if kern is not None:
        return kern
    import cupy

    with _lock:
        kern = _kernels.get(key)
        if kern is not None:
            return kern
        names = variant.kernels()
        mod = _modules.get((variant, device_index))
        if mod is None:
            mod = cupy.RawModule(code=kernel_source(variant.source), options=OPTIONS,
                                 name_expressions=sorted(names.values()))
            _modules[(variant, device_index)] = mod
        kern = mod.get_function(names[role])
        smem = variant.geometry(role)[2]
        if smem > 48 * 1024:
            # Above 48 KiB a kernel must opt in to the larger dynamic shared memory.
            kern.max_dynamic_shared_size_bytes = smem
        _kernels[key] = kern
        return kern
