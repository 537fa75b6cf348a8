"""Check the split-KV decode kernel on CUDA and time it against PyTorch SDPA (flash; for
fp32, which flash does not take, memory-efficient), then sweep launch configurations.

Writes ``decode_perf.json`` and ``decode_perf.log`` under $OUT
(or the current directory) and prints a short table last.

    python plugins/triton/scripts/decode_perf.py [--quick] [--dtype fp32] [--head-dim 64]
        [--configs "64,8,3 32,4,2"] [--launch N [--launch-keys 4096]]

Workload (issue 5): B=16, Hq=32, Hkv=8, D=128 (or ``--head-dim``), bf16 (or ``--dtype``),
one query token, caches of 1k..64k keys. Bandwidth = bytes of K+V read (B * Hkv * Sk * D *
2 tensors * bytes per element) / time. ``--configs`` replaces the sweep's (block_n,
num_warps, num_stages). ``--launch N`` only launches each of them N times, for a profiler
(benchmarks/gpu_session.sh decode-d256).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import torch
import triton
from triton.testing import do_bench

from attnkit import reference
from attnkit.bench.timing import wall_us
from attnkit.spec import AttentionProblem
from attnkit.testing.accuracy import check

HERE = pathlib.Path(__file__).resolve().parent
OUT = pathlib.Path(os.environ.get("OUT", "."))
T0 = time.time()
LOG = []


def log(msg: str) -> None:
    line = f"[{time.time() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    LOG.append(line)


def load_decode():
    import attnkit_triton.decode as mod

    return mod


def rand_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, bshd=False, gen=None):
    def r(h, s):
        shape = (B, s, h, D) if bshd else (B, h, s, D)
        t = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
        return t.transpose(1, 2) if bshd else t
    return r(Hq, Sq), r(Hkv, Sk), r(Hkv, Sk)


def correctness(dec) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = [
        # B, Hq, Hkv, Sq, Sk, D, dtype, opts, splits
        (4, 8, 2, 1, 3000, 128, torch.bfloat16, {}, None),
        (4, 8, 2, 1, 3000, 128, torch.float16, {"causal": True}, 7),
        (3, 8, 8, 2, 1037, 64, torch.float32, {"causal": True}, None),
        (5, 32, 8, 1, 4096, 128, torch.bfloat16, {"causal": True, "seqlens": "mixed"}, None),
        (2, 4, 1, 3, 777, 40, torch.float16, {"causal": True, "window": (100, 0)}, 5),
        (2, 4, 2, 4, 900, 256, torch.bfloat16, {"softcap": 20.0, "bshd": True}, 3),
        (2, 16, 2, 16, 600, 96, torch.float16, {"causal": True, "seqlens": "random"}, 4),
        (1, 8, 1, 1, 20000, 128, torch.bfloat16, {"window": (3000, -1)}, 100),
        (3, 4, 4, 2, 513, 111, torch.float32, {"window": (7, 7), "softcap": 3.0}, 2),
        (2, 2, 2, 5, 3, 16, torch.float16, {"causal": True}, 1),
    ]
    results = []
    for B, Hq, Hkv, Sq, Sk, D, dtype, opts, splits in cases:
        opts = dict(opts)
        q, k, v = rand_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, opts.pop("bshd", False), gen)
        mode = opts.pop("seqlens", None)
        seqlens = None
        if mode == "mixed":
            seqlens = torch.tensor([(0, Sk, Sk // 2, 1)[b % 4] for b in range(B)],
                                   dtype=torch.int32, device="cuda")
        elif mode == "random":
            seqlens = torch.randint(0, Sk + 1, (B,), generator=gen, device="cuda",
                                    dtype=torch.int32)
        kw = dict(causal=opts.get("causal", False), window=opts.get("window"),
                  softcap=opts.get("softcap"))
        problem = AttentionProblem.from_tensors(q, k, v, seqlens_k=seqlens, **kw)
        out, lse = dec.decode_forward(problem, q, k, v, seqlens, splits=splits)
        out2, lse2 = dec.decode_forward(problem, q, k, v, seqlens, splits=splits)
        ref64 = reference.safe(q.double(), k.double(), v.double(), seqlens_k=seqlens, **kw)
        ref_lp = reference.safe(q, k, v, seqlens_k=seqlens, **kw)
        ok_o, msg_o = check("out", out, ref64[0], ref_lp[0], dtype, 2.0)
        ok_l, msg_l = check("lse", lse, ref64[1], ref_lp[1].float(), dtype, 2.0)
        det = bool(torch.equal(out, out2) and torch.equal(lse, lse2))
        used = splits or dec.num_splits(problem)
        name = (f"{str(dtype)[6:]} B{B} H{Hq}x{Hkv} q{Sq} k{Sk} d{D} {opts} "
                f"seqlens={mode} splits={used}")
        ok = ok_o and ok_l and det
        log(f"{'PASS' if ok else 'FAIL'} {name}: {msg_o}; {msg_l}; deterministic={det}")
        results.append({"case": name, "ok": ok, "out": msg_o, "lse": msg_l,
                        "deterministic": det})
    return results


def sdpa_peer(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    f = torch.nn.functional.scaled_dot_product_attention
    fp32 = q.dtype == torch.float32
    kind = SDPBackend.EFFICIENT_ATTENTION if fp32 else SDPBackend.FLASH_ATTENTION
    name = "efficient" if fp32 else "flash"
    with sdpa_kernel([kind]):
        try:
            f(q, k, v, enable_gqa=True)
            torch.cuda.synchronize()
            return (lambda: f(q, k, v, enable_gqa=True)), f"{name}, enable_gqa=True"
        except RuntimeError as e:
            log(f"SDPA {name} with enable_gqa failed ({e}); timing expanded k/v instead")
    g = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)

    def run():
        with sdpa_kernel([kind]):
            return f(q, ke, ve)
    return run, f"{name} on k/v expanded to Hq heads"


def bench(fn) -> float:
    """GPU time (ms), L2 flushed before each call; the flush also hides launch overhead."""
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


SWEEP = [(64, 4, 3), (64, 4, 2), (64, 4, 4), (128, 8, 3), (128, 4, 3), (64, 8, 4), (32, 4, 4),
         (128, 8, 2)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BATCH, HQ, HKV = 16, 32, 8  # the workload's


def perf(dec, lengths, budget_s, dtype=torch.bfloat16, sweep_cfgs=SWEEP, D=128) -> list[dict]:
    """Default configuration against SDPA for every length first, then a sweep of launch
    configurations with the time left shared evenly between the lengths."""
    rows, inputs = [], {}
    for Sk in lengths:
        q, k, v = rand_inputs(BATCH, HQ, HKV, 1, Sk, D, dtype)
        inputs[Sk] = (q, k, v)
        nbytes = 2 * BATCH * HKV * Sk * D * k.element_size()
        problem = AttentionProblem.from_tensors(q, k, v, causal=True)
        f_sdpa, how = sdpa_peer(q, k, v)
        ref = f_sdpa()
        t_sdpa = bench(f_sdpa)
        out, _ = dec.decode_forward(problem, q, k, v, None)
        err = (out.float() - ref.float()).abs().max().item()
        ours_fn = functools.partial(dec.decode_forward, problem, q, k, v, None)
        t_ours = bench(ours_fn)
        w_sdpa, w_ours = wall_us(f_sdpa) / 1e3, wall_us(ours_fn) / 1e3
        splits = dec.num_splits(problem)
        row = {"sdpa_wall_ms": w_sdpa, "ours_wall_ms": w_ours,
               "Sk": Sk, "bytes": nbytes, "sdpa_ms": t_sdpa, "sdpa_TBps": nbytes / t_sdpa / 1e9,
               "sdpa_how": how, "ours_ms": t_ours, "ours_TBps": nbytes / t_ours / 1e9,
               "splits": splits, "use_split_kv": dec.use_split_kv(problem),
               "max_abs_vs_sdpa": err, "sweep": [], "best_ms": t_ours, "best_cfg": "default",
               "best_TBps": nbytes / t_ours / 1e9}
        log(f"Sk={Sk}: sdpa {row['sdpa_TBps']:.2f} TB/s ({how}), ours {row['ours_TBps']:.2f} "
            f"TB/s (splits {splits}, use_split_kv {row['use_split_kv']}), "
            f"max|ours - sdpa| {err:.2e}; wall per call back to back: sdpa {w_sdpa * 1e3:.1f} us, "
            f"ours {w_ours * 1e3:.1f} us")
        rows.append(row)
        del f_sdpa, ref
    torch.cuda.empty_cache()

    for n, row in enumerate(rows):
        Sk = row["Sk"]
        q, k, v = inputs[Sk]
        problem = AttentionProblem.from_tensors(q, k, v, causal=True)
        deadline = time.time() + max(budget_s - (time.time() - T0), 0) / (len(rows) - n)
        for bn, nw, ns in sweep_cfgs:
            for sp in (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 64):
                if time.time() > deadline or Sk / sp < 2 * bn:
                    continue
                try:
                    t = bench(functools.partial(dec.decode_forward, problem, q, k, v, None,
                                                splits=sp, block_n=bn, num_warps=nw,
                                                num_stages=ns))
                except Exception as e:  # e.g. out of shared memory for one config
                    log(f"  cfg bn={bn} w={nw} st={ns} sp={sp}: {type(e).__name__}: {e}")
                    break
                row["sweep"].append({"block_n": bn, "warps": nw, "stages": ns, "splits": sp,
                                     "ms": t, "TBps": row["bytes"] / t / 1e9})
                if t < row["best_ms"]:
                    row["best_ms"], row["best_cfg"] = t, f"bn={bn} w={nw} st={ns} sp={sp}"
        row["best_TBps"] = row["bytes"] / row["best_ms"] / 1e9
        log(f"Sk={Sk}: best {row['best_TBps']:.2f} TB/s with {row['best_cfg']} "
            f"({len(row['sweep'])} configurations timed)")
    return rows


def launch_only(dec, cfgs, n, Sk, dtype, D) -> int:
    """Each configuration n times back to back and nothing else: a profiler picks one launch
    of the split-KV kernel by name after skipping the first (compiling) ones."""
    q, k, v = rand_inputs(BATCH, HQ, HKV, 1, Sk, D, dtype)
    problem = AttentionProblem.from_tensors(q, k, v, causal=True)
    for block_n, warps, stages in cfgs:
        for _ in range(n):
            dec.decode_forward(problem, q, k, v, None, block_n=block_n, num_warps=warps,
                               num_stages=stages)
        torch.cuda.synchronize()
        log(f"D={D} {dtype} {Sk} keys, splits {dec.num_splits(problem)}: launched "
            f"({block_n}, {warps}, {stages}) {n} times")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", type=float, default=170.0,
                        help="seconds into the run after which the sweep stops")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--configs", default=None,
                        help='the sweep\'s "block_n,num_warps,num_stages ..." (default: SWEEP)')
    parser.add_argument("--launch", type=int, metavar="N",
                        help="only launch each --configs entry N times (no check, no SDPA)")
    parser.add_argument("--launch-keys", type=int, default=4096)
    args = parser.parse_args()
    try:
        cfgs = SWEEP if args.configs is None else [tuple(map(int, c.split(",")))
                                                  for c in args.configs.split()]
        if any(len(c) != 3 for c in cfgs):
            raise ValueError
    except ValueError:
        parser.error(f"--configs {args.configs!r}: give block_n,num_warps,num_stages triples")
    dec = load_decode()
    if args.launch:
        return launch_only(dec, cfgs, args.launch, args.launch_keys, DTYPES[args.dtype],
                           args.head_dim)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    log(f"{torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}, "
        f"triton {triton.__version__}")
    results = {"correctness": correctness(dec)}
    lengths = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
    results["perf"] = perf(dec, lengths, args.budget, DTYPES[args.dtype], cfgs, args.head_dim)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "decode_perf.json").write_text(json.dumps(results, indent=1))
    (OUT / "decode_perf.log").write_text("\n".join(LOG) + "\n")
    n_ok = sum(r["ok"] for r in results["correctness"])
    print(f"\ncorrectness: {n_ok}/{len(results['correctness'])} pass")
    print(f"{'Sk':>6} {'sdpa TB/s':>10} {'ours TB/s':>10} {'ratio':>6} {'splits':>6} "
          f"{'best TB/s':>10}  best cfg")
    for r in results["perf"]:
        print(f"{r['Sk']:>6} {r['sdpa_TBps']:>10.2f} {r['ours_TBps']:>10.2f} "
              f"{r['ours_TBps'] / r['sdpa_TBps']:>6.2f} {r['splits']:>6} "
              f"{r['best_TBps']:>10.2f}  {r['best_cfg']}")
    return 0 if n_ok == len(results["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
