"""Tile sizes, warps and pipeline stages per kernel: a tuned table, not a runtime autotune.

A table keeps the first call fast and the choice reproducible (the forward must be bitwise
deterministic run to run, which a timing-driven autotune would not guarantee across
processes). Entries for Hopper were measured by a tile sweep on an H100; other GPUs get the
conservative defaults, and the interpreter small tiles so CPU tests stay quick. Each table's
comment keeps the measurement that chose it in a line; docs/tuning.md has the sweeps.
Varlen calls take the dense entries of their longest lengths (not yet swept on their own).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, replace

import triton


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    block_d: int = 0  # filled by `padded_head_dim`
    #: May this kernel use tensor descriptors where the layout allows (False: pointers).
    tma: bool = True


def launch_options(cfg: KernelConfig) -> dict:
    """Triton's launch options of a `tl` kernel for ``cfg``."""
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def padded_head_dim(head_dim: int) -> int:
    """Tile width for the head dim: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


#: Triton picks interpreter or compiler when a kernel is decorated, so the environment at
#: import is what counts (and reading it on every call costs microseconds).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Tiles replacing the tables' for fp16/bf16 on a GPU, for a sweep through ``attnkit bench
#: --env``: ``KERNEL=BMxBNwWARPSsSTAGES[p]`` joined by ``+``, KERNEL fwd, dkdv or dq, ``p``
#: pointers instead of tensor descriptors (``dkdv=32x64w8s2+dq=128x32w8s2p``). Read at import.
TILES_ENV = "ATTNKIT_TRITON_TILES"
_TILE = re.compile(r"(\d+)x(\d+)w(\d+)s(\d+)(p?)")


def parse_tiles(text: str) -> dict[str, KernelConfig]:
    """`TILES_ENV`'s value as kernel -> config; a malformed one raises ``ValueError``."""
    out: dict[str, KernelConfig] = {}
    for item in filter(None, text.split("+")):
        kernel, _, spec = item.partition("=")
        m = _TILE.fullmatch(spec)
        sizes = [int(x) for x in m.groups()[:3]] if m else []
        if (kernel not in ("fwd", "dkdv", "dq") or kernel in out or not m
                or any(x < 1 or x & (x - 1) for x in sizes) or min(sizes[:2]) < 16
                or int(m.group(4)) < 1):
            raise ValueError(
                f"{TILES_ENV}={text!r}: {item!r} is not KERNEL=BMxBNwWARPSsSTAGES[p] (KERNEL "
                "fwd, dkdv or dq, each once; blocks powers of two >= 16, warps a power of "
                "two, stages >= 1), e.g. dkdv=32x64w8s2+dq=128x32w8s2p")
        out[kernel] = KernelConfig(*sizes, int(m.group(4)), tma=not m.group(5))
    return out


_TILES = parse_tiles(os.environ.get(TILES_ENV, ""))


def interpreting() -> bool:
    return _INTERPRETING


def path_enabled(env: str, what: str, reasons, preferred: bool = True) -> bool:
    """Whether an optional kernel path (TMA, the Gluon kernels) takes this call: when it can
    apply (``reasons()`` empty) and, left to itself, when it is ``preferred`` (measured
    faster here). ``env=0`` turns it off; ``env=1`` takes it wherever it can apply and makes
    a refusal an error."""
    mode = os.environ.get(env, "auto")
    if mode == "0" or (mode != "1" and not preferred):  # auto: no reasons to work out
        return False
    found = reasons()
    if found:
        if mode == "1":
            raise ValueError(f"{env}=1 but {what} cannot apply: {'; '.join(found)}")
        return False
    return True


# (block_d, causal) -> config, for sm90 (Hopper): the bf16, S=4k sweep on an H100 picked
# these; `tma=False` where the pointer path measured faster.
_HOPPER_FWD = {
    (16, False): KernelConfig(128, 64, 8, 3), (16, True): KernelConfig(128, 64, 8, 3),
    (32, False): KernelConfig(128, 64, 8, 3), (32, True): KernelConfig(128, 64, 8, 3),
    (64, False): KernelConfig(128, 64, 8, 3), (64, True): KernelConfig(128, 64, 8, 3, tma=False),
    (128, False): KernelConfig(128, 128, 8, 3),
    (128, True): KernelConfig(128, 128, 8, 3, tma=False),
    (256, False): KernelConfig(128, 64, 8, 2), (256, True): KernelConfig(128, 64, 8, 2),
}
# Backward: (dk/dv kernel, dq kernel) per (block_d, causal).
_HOPPER_BWD = {
    (16, False): (KernelConfig(64, 64, 4, 3), KernelConfig(64, 64, 4, 3)),
    (16, True): (KernelConfig(32, 64, 4, 3), KernelConfig(64, 64, 4, 3)),
    (32, False): (KernelConfig(64, 64, 4, 3), KernelConfig(64, 64, 4, 3)),
    (32, True): (KernelConfig(32, 64, 4, 3), KernelConfig(64, 64, 4, 3)),
    (64, False): (KernelConfig(64, 64, 4, 3, tma=False), KernelConfig(64, 64, 4, 3)),
    (64, True): (KernelConfig(32, 64, 4, 3), KernelConfig(64, 64, 4, 3, tma=False)),
    (128, False): (KernelConfig(64, 128, 8, 3), KernelConfig(128, 32, 8, 3)),
    (128, True): (KernelConfig(32, 64, 4, 3), KernelConfig(128, 64, 8, 3)),
    (256, False): (KernelConfig(32, 64, 8, 2), KernelConfig(128, 32, 8, 2)),
    (256, True): (KernelConfig(32, 64, 8, 2), KernelConfig(128, 32, 8, 2)),
}
# D=256 backward: two stages and 128-row dQ tiles, 1.86x the one-stage 32x64 / 64x32 pair
# (H100, fp16/bf16, causal and not, 512..16k); 64x64 dK/dV spills (1.22x).
# D=128 non-causal dK/dV: 3 stages (whole backward, bf16/fp16, S 2k-16k, H100: +1-8% over 2).
# Short sequences (max(Sq, Sk) <= SHORT_SEQLEN): a program walks few key blocks, so smaller
# tiles win. S=512 sweep, H100, 2026-11: D=128 forward 64x64 w4 pointers 333 vs 262 TFLOP/s
# (the same configs win at S=1024, so D=128's short tables reach 1k); D=64 forward 128x64 w8
# pointers 312 vs 258 through TMA. Per-kernel numbers: docs/tuning.md.
SHORT_SEQLEN = {64: 512, 128: 1024}


@functools.cache
def short_seqlen(head_dim: int) -> int:
    """Longest max(Sq, Sk) that takes the short-sequence tables at this head dim."""
    return SHORT_SEQLEN.get(padded_head_dim(head_dim), 0)
_HOPPER_FWD_SHORT = {
    (64, False): KernelConfig(128, 64, 8, 3, tma=False),
    (64, True): KernelConfig(64, 64, 4, 3, tma=False),
    (128, False): KernelConfig(64, 64, 4, 3, tma=False),
    (128, True): KernelConfig(64, 64, 4, 3, tma=False),
}
_HOPPER_BWD_SHORT = {
    (64, False): (KernelConfig(32, 64, 4, 3, tma=False), KernelConfig(64, 64, 4, 3, tma=False)),
    (64, True): (KernelConfig(32, 64, 4, 3, tma=False), KernelConfig(64, 32, 4, 3, tma=False)),
    (128, False): (KernelConfig(32, 64, 4, 3, tma=False), _HOPPER_BWD[(128, False)][1]),
    (128, True): (KernelConfig(32, 64, 4, 2, tma=False), KernelConfig(64, 32, 4, 3, tma=False)),
}
# Everything else (Ampere and newer non-Hopper parts): sizes that fit the 99 KB of shared
# memory per block of sm_86/sm_89/sm_120 (tools/compile_tables.py checks them).
_DEFAULT_FWD = {
    16: KernelConfig(128, 64, 4, 3), 32: KernelConfig(128, 64, 4, 3),
    64: KernelConfig(128, 64, 4, 3), 128: KernelConfig(128, 64, 8, 2),
    256: KernelConfig(64, 32, 4, 1),
}
_DEFAULT_BWD = {
    16: (KernelConfig(32, 64, 4, 2), KernelConfig(64, 32, 4, 2)),
    32: (KernelConfig(32, 64, 4, 2), KernelConfig(64, 32, 4, 2)),
    64: (KernelConfig(32, 64, 4, 2), KernelConfig(64, 32, 4, 2)),
    128: (KernelConfig(32, 64, 4, 2), KernelConfig(64, 32, 4, 2)),
    256: (KernelConfig(16, 32, 4, 1), KernelConfig(32, 16, 4, 1)),
}
# The interpreter: small, unequal tiles (many boundary cases, quick numpy steps), equal in
# all three kernels.
_INTERPRET = KernelConfig(32, 16, 4, 1)


# fp32: (forward, dK/dV, dQ) per block_d. The ieee dot is FMA code unrolled over the tile, so
# the tile sets compile time and spills; each score is a sequential FMA sum over the head dim
# whatever the tiling, so the backward's recomputed scores match the forward's with different
# tiles in each kernel. Per-kernel times, H200, B=4 H=8 S=2048:
# D=128 forward 64x32 w4 6.1 ms vs 9.4 at 32x32, dK/dV 32x32 w8 29 ms vs 101 at w4 (which
# spilled 1.6 KB), dQ 16x32 22 ms vs 57; D=64 forward 32x64 3.0 ms vs 3.4, dK/dV 32x32 w8
# 11 ms vs 20, dQ 64x64 w8 6.1 ms vs 15.7. Other head dims take 32x32 (129..256:
# _FP32_HOPPER_256, _FP32_SMALL_256). All but the D=128 forward read through pointers: with
# tensor descriptors ptxas gives the fp32 backward far fewer registers, and it spills (H200,
# D=128 dK/dV 28.9 ms with TMA, 20.7 with pointers); the D=128 forward keeps TMA (6.1 ms
# against 13.8). Details: docs/tuning.md.
_FP32 = {
    64: (KernelConfig(32, 64, 4, 2, tma=False), KernelConfig(32, 32, 8, 2, tma=False),
         KernelConfig(64, 64, 8, 2, tma=False)),
    128: (KernelConfig(64, 32, 4, 2), KernelConfig(32, 32, 8, 2, tma=False),
          KernelConfig(16, 32, 4, 2, tma=False)),
}


# fp32 at head dims 129..256 off Hopper: 32x32 tiles need 128-136 KB of shared memory in
# the backward, over the 99 KB per block of sm_86/sm_89/sm_120, and spill on sm_86 in the
# forward; these fit (64-96 KB, no spills; tools/compile_tables.py checks every table
# entry against each arch's limit). Not timed: no such GPU has been lent.
_FP32_SMALL_256 = (KernelConfig(32, 16, 8, 1), KernelConfig(16, 16, 4, 1),
                   KernelConfig(32, 16, 8, 1))


# fp32 at head dims 129..256 on Hopper: 32x32 tiles through pointers, dK/dV with 8 warps
# (H200, B=4 H=8 S=2048, ms with TMA / pointers: forward 88 / 21, dQ 185 / 32, dK/dV w4 244 /
# 333, w8 174 / 40).
_FP32_HOPPER_256 = (KernelConfig(32, 32, 4, 1, tma=False), KernelConfig(32, 32, 8, 1, tma=False),
                    KernelConfig(32, 32, 4, 1, tma=False))


def _fp32_configs(block_d: int, arch: int) -> tuple[KernelConfig, KernelConfig, KernelConfig]:
    """(forward, dK/dV, dQ) tiles for fp32 (see _FP32); head dims 16 and 32 take one small
    tile through pointers (H200, D=32 forward and backward: 7.48 ms against 8.06 with TMA)."""
    if block_d in _FP32:
        return _FP32[block_d]
    if block_d > 128:
        return _FP32_HOPPER_256 if arch == 90 else _FP32_SMALL_256
    cfg = KernelConfig(32, 32, 4, 2, tma=False)
    return cfg, cfg, cfg


#: Largest BLOCK_M x BLOCK_N of a kernel with dropout. The mask's reshape to the tile's
#: layout goes through BLOCK_M x BLOCK_N bytes of shared memory and its Philox words hold
#: about 60 more registers: sm_90's 128x128 bf16 forward at D=128 would need 241 KB (over
#: 227); its 128x64 needs 137 KB, 212 registers, no spill. The 64x128 dK/dV (at the limit)
#: keeps its tile: 255 registers and 124 B of spills (tools/compile_tables.py --dropout).
#: Not yet timed on a GPU.
DROPOUT_TILE = 8192


def _dropout_tile(cfg: KernelConfig) -> KernelConfig:
    """``cfg`` for a kernel with dropout: key blocks halved until the tile is at most
    `DROPOUT_TILE` elements."""
    while cfg.block_m * cfg.block_n > DROPOUT_TILE and cfg.block_n > 16:
        cfg = replace(cfg, block_n=cfg.block_n // 2)
    return cfg


def table_configs(arch: int | None, block_d: int, causal: bool, dtype,
                  short: bool = False, dropout: bool = False,
                  ) -> tuple[KernelConfig, KernelConfig, KernelConfig]:
    """(forward, dK/dV, dQ) configs from the tables for a GPU of compute capability ``arch``
    (major*10+minor; None: the interpreter), ``block_d`` = `padded_head_dim`; ``dropout``:
    those of the kernels with dropout (`DROPOUT_TILE`). block_d is not filled in. A pure
    function of its arguments, so scripts can ask for any GPU's choice."""
    cfgs = _table_configs(arch, block_d, causal, dtype, short)
    return tuple(_dropout_tile(c) for c in cfgs) if dropout else cfgs


def _table_configs(arch, block_d, causal, dtype, short):
    import torch

    if arch is None:
        return _INTERPRET, _INTERPRET, _INTERPRET
    if dtype == torch.float32:
        return _fp32_configs(block_d, arch)
    if arch == 90:
        fwd = (_HOPPER_FWD_SHORT.get((block_d, causal)) if short else None) or \
            _HOPPER_FWD[(block_d, causal)]
        bwd = (_HOPPER_BWD_SHORT.get((block_d, causal)) if short else None) or \
            _HOPPER_BWD[(block_d, causal)]
        return fwd, *bwd
    return _DEFAULT_FWD[block_d], *_DEFAULT_BWD[block_d]


def _arch(device) -> int:
    from attnkit.backend import cuda_capability

    major, minor = cuda_capability(device)
    return major * 10 + minor


def forward_config(head_dim: int, causal: bool, dtype, device,
                   short: bool = False, dropout: bool = False) -> KernelConfig:
    """``short``: max(Sq, Sk) <= short_seqlen(head_dim) (see _HOPPER_FWD_SHORT);
    ``dropout``: the kernel with dropout's tile."""
    return _forward_config(head_dim, causal, dtype, device, interpreting(), short, dropout)


@functools.lru_cache(maxsize=256)  # a table lookup, but on every call: keep it off the clock
def _forward_config(head_dim, causal, dtype, device, interpret, short, dropout) -> KernelConfig:
    return _chosen(head_dim, causal, dtype, device, interpret, short, dropout)[0]


def _chosen(head_dim, causal, dtype, device, interpret, short, dropout):
    """The tables' (forward, dK/dV, dQ) for this call, `TILES_ENV`'s where it gives them,
    with ``block_d`` filled."""
    import torch

    bd = padded_head_dim(head_dim)
    cfgs = table_configs(None if interpret else _arch(device), bd, causal, dtype, short)
    if _TILES and not interpret and dtype != torch.float32:
        cfgs = tuple(_TILES.get(k, c) for k, c in zip(("fwd", "dkdv", "dq"), cfgs))
    return tuple(replace(_dropout_tile(c) if dropout else c, block_d=bd) for c in cfgs)


def backward_configs(head_dim: int, causal: bool, dtype, device,
                     short: bool = False, dropout: bool = False,
                     ) -> tuple[KernelConfig, KernelConfig]:
    return _backward_configs(head_dim, causal, dtype, device, interpreting(), short, dropout)


@functools.lru_cache(maxsize=256)
def _backward_configs(head_dim, causal, dtype, device, interpret, short, dropout):
    return _chosen(head_dim, causal, dtype, device, interpret, short, dropout)[1:]
