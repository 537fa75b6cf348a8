#!/usr/bin/env python
"""Time the cupy split-KV decode kernel against PyTorch SDPA (flash) on issue 5's workload.

Workload: B=16, Hq=32, Hkv=8, D=128, bf16, one query token over a full KV cache of 1k, 4k, 16k
and 64k keys, through ``attnkit.attention_with_kvcache(..., backend="cupy")`` (causal, the
decoding default; with one query it masks nothing). SDPA baseline:
``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)`` under
``sdpa_kernel([SDPBackend.FLASH_ATTENTION])``. Times are ``triton.testing.do_bench`` medians
(L2 flushed before every call); bandwidth = bytes of K + V read (2 * B * Hkv * Sk * D * 2) /
time. Then a sweep of split counts and tiles (warps, keys per tile, stages) through
`decode_forward`, until ``--budget`` seconds into the run. Writes JSON to ``--out``.

    python plugins/cupy/scripts/decode_perf.py [--out decode.json] [--lengths 1024 4096]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnkit.bench.timing import wall_us

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnkit_cupy import _compile, _decode  # noqa: E402

import attnkit  # noqa: E402
from attnkit import reference  # noqa: E402
from attnkit.spec import AttentionProblem  # noqa: E402
from attnkit.testing.accuracy import check  # noqa: E402

B, HQ, HKV, D = 16, 32, 8, 128
DTYPE = torch.bfloat16
#: Alternative (warps, keys per tile, stages) tried by the sweep, after the table's default.
SWEEP_TILES = [(4, 64, 2), (4, 64, 4), (2, 32, 4), (2, 64, 3), (8, 128, 2)]
SWEEP_SPLITS = [1, 2, 3, 4, 6, 8, 16]
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return run


def inputs(Sk: int, gen):
    q = torch.randn(B, HQ, 1, D, generator=gen, device="cuda").to(DTYPE)
    k = torch.randn(B, HKV, Sk, D, generator=gen, device="cuda").to(DTYPE)
    v = torch.randn(B, HKV, Sk, D, generator=gen, device="cuda").to(DTYPE)
    lens = torch.full((B,), Sk, dtype=torch.int32, device="cuda")
    # The problem attention_with_kvcache builds (nothing appended: seqlens_k = cache_seqlens).
    problem = AttentionProblem.from_tensors(q, k, v, causal=True, seqlens_k=lens,
                                            needs_grad=False, check_values=False)
    return q, k, v, lens, problem


def warm(variants) -> None:
    """Compile the variants in parallel processes (CuPy caches them on disk)."""
    import check_cuda

    check_cuda.warm(variants, max(1, min(len(variants), os.cpu_count() or 1)))


def measure(Sk: int, gen) -> tuple[dict, tuple]:
    q, k, v, lens, problem = inputs(Sk, gen)
    nbytes = 2 * B * HKV * Sk * D * 2
    f_sdpa = sdpa_flash(q, k, v)
    f_ours = functools.partial(attnkit.attention_with_kvcache, q, k, v, lens, backend="cupy")
    f_kernel = functools.partial(_decode.decode_forward, problem, q, k, v, lens)
    with torch.no_grad():
        ref = f_sdpa()
        out = f_ours()
        err = (out.float() - ref.float()).abs().max().item()
        t_sdpa, t_ours, t_kernel = bench(f_sdpa), bench(f_ours), bench(f_kernel)
        w_sdpa, w_ours = wall_us(f_sdpa), wall_us(f_ours)
    sms = _decode.sm_count(q.device)
    row = dict(
        Sk=Sk, bytes=nbytes, use_split_kv=_decode.use_split_kv(problem),
        splits=_decode.num_splits(problem, sms),
        tiles=list(_compile.variant_for("decode", "bf16", D, True, False).tiles),
        sdpa_ms=t_sdpa, sdpa_TBps=nbytes / t_sdpa / 1e9,
        ours_ms=t_ours, ours_TBps=nbytes / t_ours / 1e9, ratio=t_sdpa / t_ours,
        decode_forward_ms=t_kernel, decode_forward_TBps=nbytes / t_kernel / 1e9,
        sdpa_wall_us=w_sdpa, ours_wall_us=w_ours, max_abs_vs_sdpa=err, sweep=[],
    )
    log(f"Sk={Sk:6d}: sdpa {row['sdpa_TBps']:.2f} TB/s, ours {row['ours_TBps']:.2f} TB/s "
        f"({row['ratio']:.2f}x; decode_forward alone {row['decode_forward_TBps']:.2f}), "
        f"use_split_kv {row['use_split_kv']}, splits {row['splits']}, max|ours - sdpa| "
        f"{err:.1e}; wall per call: sdpa {w_sdpa:.0f} us, ours {w_ours:.0f} us")
    return row, (q, k, v, lens, problem)


def accuracy(gen) -> dict:
    """The workload at 1k keys against the float64 reference (the conformance rule)."""
    q, k, v, lens, problem = inputs(1024, gen)
    with torch.no_grad():
        out, lse = attnkit.attention_with_kvcache(q, k, v, lens, backend="cupy",
                                                  return_lse=True)
    ref64 = reference.safe(q.double(), k.double(), v.double(), causal=True, seqlens_k=lens)
    ref_lp = reference.safe(q, k, v, causal=True, seqlens_k=lens)
    ok_o, msg_o = check("out", out, ref64[0], ref_lp[0], DTYPE, 2.0)
    ok_l, msg_l = check("lse", lse, ref64[1], ref_lp[1].float(), DTYPE, 2.0)
    log(f"accuracy at 1k: {'PASS' if ok_o and ok_l else 'FAIL'}: {msg_o}; {msg_l}")
    return dict(ok=ok_o and ok_l, out=msg_o, lse=msg_l)


def sweep(row: dict, tensors, deadline: float) -> None:
    q, k, v, lens, problem = tensors
    best = (row["decode_forward_ms"], "default")
    for tiles in [None, *SWEEP_TILES]:
        for sp in SWEEP_SPLITS:
            if time.time() > deadline or row["Sk"] < sp * 256:
                continue
            try:
                t = bench(functools.partial(_decode.decode_forward, problem, q, k, v, lens,
                                            splits=sp, tiles=tiles))
            except Exception as e:  # a tile that does not compile or launch here
                log(f"  tiles {tiles} splits {sp}: {type(e).__name__}: {e}")
                break
            row["sweep"].append(dict(tiles=list(tiles) if tiles else "default", splits=sp,
                                     ms=t, TBps=row["bytes"] / t / 1e9))
            if t < best[0]:
                best = (t, f"tiles={tiles or 'default'} splits={sp}")
    row["best_ms"], row["best_cfg"] = best
    row["best_TBps"] = row["bytes"] / best[0] / 1e9
    log(f"Sk={row['Sk']:6d}: best {row['best_TBps']:.2f} TB/s with {row['best_cfg']} "
        f"({len(row['sweep'])} timings)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(os.environ.get("OUT", "."))
                                         / "cupy_decode_perf.json"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--budget", type=float, default=100.0,
                    help="seconds into the run after which the sweep stops")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args(argv)
    ok, why = attnkit.backends()["cupy"].availability
    if not ok:
        print(f"cupy backend unavailable: {why}")
        return 2
    log(f"{torch.cuda.get_device_name()}, {_decode.sm_count(torch.device('cuda'))} SMs, "
        f"torch {torch.__version__}")
    base = _compile.variant_for("decode", "bf16", D, True, False)
    variants = {base} | {_compile.Variant("decode", "bf16", base.dp, True, False, t)
                         for t in ([] if args.no_sweep else SWEEP_TILES)}
    warm(variants)
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  workload=dict(B=B, Hq=HQ, Hkv=HKV, D=D, dtype=str(DTYPE), Sq=1, causal=True),
                  accuracy=accuracy(gen), rows=[])
    kept = {}
    for Sk in args.lengths:
        row, tensors = measure(Sk, gen)
        result["rows"].append(row)
        kept[Sk] = tensors if not args.no_sweep else None
    if not args.no_sweep:
        for n, row in enumerate(result["rows"]):
            left = max(args.budget - (time.time() - T0), 0)
            sweep(row, kept.pop(row["Sk"]), time.time() + left / (len(result["rows"]) - n))
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{'Sk':>6} {'sdpa TB/s':>10} {'ours TB/s':>10} {'ratio':>6} {'splits':>6} "
          f"{'best TB/s':>10}  best config")
    for r in result["rows"]:
        print(f"{r['Sk']:>6} {r['sdpa_TBps']:>10.2f} {r['ours_TBps']:>10.2f} {r['ratio']:>6.2f} "
              f"{r['splits']:>6} {r.get('best_TBps', float('nan')):>10.2f}  "
              f"{r.get('best_cfg', '-')}")
    print(f"wrote {args.out}")
    return 0 if result["accuracy"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
