#!/usr/bin/env python
"""The cupy backend beside PyTorch SDPA (flash) on the standard grid, in one run.

Grid: bf16, batch * seqlen = 16k tokens, H = 2048 / D, D in (64, 128), seqlen 1k..16k,
causal and not. Times are do_bench medians (ms); FLOPs = 4 * B * H * S * S * D (halved for
causal), forward + backward = 3.5x the forward. Writes JSON (--out) and prints a table.

    python plugins/cupy/scripts/perf.py [--out perf.json] [--seqlens 1024 2048 ...]
    python plugins/cupy/scripts/perf.py --sweep     # alternative tile sizes, S = 4096
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnkit_cupy import _compile  # noqa: E402

import attnkit  # noqa: E402
from attnkit.testing.cases import Case  # noqa: E402

_Q, _L, _T2 = _compile.FWD_QREG, _compile.FWD_LAZY, _compile.FWD_TWO_BARRIERS
#: Alternative fp16/bf16 tiles tried by --sweep (the current table entry is tried first).
#: Forward: (warps, slabs, keys per tile, option bits); adding _T2 (the earlier two-barrier
#: pipeline) to the default bits isolates the pipeline change.
SWEEP = {
    "fwd": {64: [(4, 2, 64, 0), (4, 2, 64, _Q | _L), (4, 2, 64, _L), (4, 2, 64, _Q | _T2)],
            128: [(4, 2, 64, 0), (4, 2, 32, _L), (8, 2, 32, _L), (4, 2, 64, _L | _T2)]},
    "dq": {64: [32], 128: [32]},
    "dkdv": {64: [(4, 64), (8, 32)], 128: [(4, 32), (8, 64), (4, 64)]},
}
_TABLES = {"fwd": _compile.FWD_TILES, "dq": _compile.DQ_TILES, "dkdv": _compile.DKV_TILES}


def bench(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, grad_to_none=grad_to_none, return_mode="median")


def sdpa_flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def measure(D, S, causal, dtype=torch.bfloat16) -> dict:
    H, B = 2048 // D, max(1, 16384 // S)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(B, H, S, D, device="cuda", dtype=dtype)
    flops = 4 * B * H * S * S * D / (2 if causal else 1)
    row = dict(D=D, S=S, B=B, H=H, causal=causal, dtype=str(dtype))
    impls = {
        "cupy": lambda: attnkit.attention(q, k, v, causal=causal, backend="cupy"),
        "sdpa_flash": lambda: sdpa_flash(q, k, v, causal),
    }
    for name, f in impls.items():
        with torch.no_grad():
            ms = bench(f)
        row[f"{name}_fwd_ms"] = ms
        row[f"{name}_fwd_tflops"] = flops / ms * 1e-9
        ms = bench(lambda f=f: f().backward(dout), grad_to_none=[q, k, v])
        row[f"{name}_fwdbwd_ms"] = ms
        row[f"{name}_fwdbwd_tflops"] = 3.5 * flops / ms * 1e-9
    row["fwd_ratio"] = row["cupy_fwd_tflops"] / row["sdpa_flash_fwd_tflops"]
    row["fwdbwd_ratio"] = row["cupy_fwdbwd_tflops"] / row["sdpa_flash_fwdbwd_tflops"]
    return row


def run(seqlens, dims, causals):
    rows = []
    for D in dims:
        for S in seqlens:
            for causal in causals:
                row = measure(D, S, causal)
                rows.append(row)
                print(f"D={D:3d} S={S:5d} B={row['B']:2d} H={row['H']:2d} causal={int(causal)}  "
                      f"fwd {row['cupy_fwd_tflops']:6.1f} vs {row['sdpa_flash_fwd_tflops']:6.1f}"
                      f" ({row['fwd_ratio']:.2f}x)  fwd+bwd {row['cupy_fwdbwd_tflops']:6.1f} vs "
                      f"{row['sdpa_flash_fwdbwd_tflops']:6.1f} ({row['fwdbwd_ratio']:.2f}x)",
                      flush=True)
    return rows


def time_cupy(D, S, causal, dtype=torch.bfloat16) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of the cupy backend alone."""
    H, B = 2048 // D, max(1, 16384 // S)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(B, H, S, D, device="cuda", dtype=dtype)

    def f():
        return attnkit.attention(q, k, v, causal=causal, backend="cupy")

    with torch.no_grad():
        fwd = bench(f)
    return fwd, bench(lambda: f().backward(dout), grad_to_none=[q, k, v])


def sweep(S=4096, kinds=tuple(SWEEP)) -> list[dict]:
    """Time alternative tiles for one kernel at a time (others at their table value), and
    check each alternative's results on a masked GQA case against the float64 reference."""
    import check_cuda

    plan = {kind: SWEEP[kind] for kind in kinds}
    variants = set()
    for kind, per_dim in plan.items():
        for D, alts in per_dim.items():
            base = _TABLES[kind][D]
            for alt in alts:
                _TABLES[kind][D] = alt
                variants |= {_compile.variant_for(src, "bf16", D, band, False)
                             for src in _compile.SOURCES for band in (False, True)}
            _TABLES[kind][D] = base
    check_cuda.warm(variants, 16)  # compile every alternative in parallel first
    out = []
    for kind, per_dim in plan.items():
        table = _TABLES[kind]
        for D, alts in per_dim.items():
            base = table[D]
            for alt in [base, *alts]:
                table[D] = alt
                try:
                    case = Case(dtype=torch.bfloat16, batch=2, heads_q=4, heads_kv=2,
                                seqlen_q=300, seqlen_k=333, head_dim=D, causal=True,
                                seqlens_k="random")
                    fails = check_cuda.run_case(case)
                    row = dict(kind=kind, D=D, tiles=alt, S=S, correct=not fails)
                    for causal in (False, True):
                        fwd, fb = time_cupy(D, S, causal)
                        row[f"fwd_ms_causal{int(causal)}"] = fwd
                        row[f"fwdbwd_ms_causal{int(causal)}"] = fb
                except Exception as e:  # a tile that does not compile or launch
                    row = dict(kind=kind, D=D, tiles=alt, S=S, error=f"{type(e).__name__}: {e}")
                out.append(row)
                print("sweep", {k: (round(v, 3) if isinstance(v, float) else v)
                                for k, v in row.items()}, flush=True)
            table[D] = base
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--sweep", action="store_true", help="time alternative tiles instead")
    ap.add_argument("--kinds", nargs="+", choices=sorted(SWEEP), default=sorted(SWEEP),
                    help="the kernels whose alternatives --sweep times")
    args = ap.parse_args(argv)
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    if args.sweep:
        rows = sweep(kinds=tuple(args.kinds))
    else:
        rows = run(args.seqlens, args.dims, causals)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
