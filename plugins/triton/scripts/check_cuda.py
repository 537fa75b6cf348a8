"""Correctness of the Triton backend on a CUDA GPU, against attnkit's float64 reference.

Runs every conformance case generated from the backend's capabilities plus larger shapes
(multi-block, head dims up to 256, GQA + BSHD + window + seqlens_k together), each on both
load paths (tensor descriptors where they apply, and pointers forced with
ATTNKIT_TRITON_TMA=0), then a > 2^31-element problem that needs 64-bit offsets.
Prints one line per failure and a pass count; exits 1 on any failure.

    python plugins/triton/scripts/check_cuda.py [--quick] [--no-large] [--json PATH] [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback

import torch

import attnkit
from attnkit.testing.accuracy import check
from attnkit.testing.cases import Case, generate

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def extra_cases() -> list[Case]:
    out = []
    for dt in (F16, BF16):
        for d in (64, 128, 256, 80):
            for causal in (False, True):
                out.append(Case(batch=2, heads_q=4, heads_kv=4, seqlen_q=700, seqlen_k=700,
                                head_dim=d, dtype=dt, causal=causal))
    out += [
        Case(batch=2, heads_q=8, heads_kv=2, seqlen_q=1000, seqlen_k=1300, head_dim=128,
             dtype=BF16, causal=True, layout="bshd", seqlens_k="random"),
        Case(batch=2, heads_q=8, heads_kv=2, seqlen_q=1300, seqlen_k=1000, head_dim=64,
             dtype=F16, causal=True, layout="bshd", expect_masked_rows=True),
        Case(batch=2, heads_q=4, heads_kv=1, seqlen_q=1024, seqlen_k=1024, head_dim=128,
             dtype=F16, window=(200, 30), layout="bshd"),
        Case(batch=3, heads_q=4, heads_kv=2, seqlen_q=513, seqlen_k=2049, head_dim=64,
             dtype=BF16, window=(100, 0), causal=True, seqlens_k="mixed",
             expect_masked_rows=True),
        Case(batch=2, heads_q=4, heads_kv=4, seqlen_q=800, seqlen_k=800, head_dim=128,
             dtype=BF16, softcap=20.0, magnitude=2.0, causal=True),
        Case(batch=2, heads_q=4, heads_kv=4, seqlen_q=600, seqlen_k=900, head_dim=96,
             dtype=F32, causal=True),
        Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=4096, seqlen_k=4096, head_dim=128,
             dtype=BF16, causal=True, tag="long"),
        Case(batch=1, heads_q=16, heads_kv=16, seqlen_q=1, seqlen_k=3000, head_dim=128,
             dtype=F16, causal=True, tag="decode"),
    ]
    return out


def run_case(case: Case, seed: int) -> list[str]:
    """Failures (empty = pass) of one case on the current load path."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, seqlens_k = case.make_inputs("cuda", gen)
    q, k, v = (t.requires_grad_(case.grad) for t in (q, k, v))
    out, lse = attnkit.attention(q, k, v, **case.options(seqlens_k), return_lse=True,
                                 backend="triton")
    dout = torch.randn(out.shape, generator=gen).to("cuda", q.dtype)
    ref64 = case.reference(q, k, v, seqlens_k, torch.float64, dout)
    ref_lp = case.reference(q, k, v, seqlens_k, q.dtype, dout)
    fails = []
    for name, got, r64, rlp, f in (("out", out, ref64[0], ref_lp[0], 2),
                                   ("lse", lse, ref64[1], ref_lp[1], 2)):
        ok, msg = check(name, got, r64, rlp, q.dtype, f)
        if not ok:
            fails.append(msg)
    masked = case.masked_rows(seqlens_k).to(out.device).expand(out.shape[:3])
    if case.expect_masked_rows and not masked.any():
        fails.append("expected fully-masked rows, found none")
    if masked.any() and not ((out[masked] == 0).all() and (lse[masked] == -float("inf")).all()):
        fails.append("fully-masked rows: out != 0 or lse != -inf")
    if case.grad:
        grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        for name, g, g64, glp in zip(("dq", "dk", "dv"), grads, ref64[2], ref_lp[2]):
            ok, msg = check(name, g, g64, glp, q.dtype, 3)
            if not ok:
                fails.append(msg)
        if masked.any() and not (grads[0][masked] == 0).all():
            fails.append("fully-masked rows: dq != 0")
        # The backward is declared deterministic: a second run must match bitwise.
        again = torch.autograd.grad(out, (q, k, v), dout)
        if not all(torch.equal(a, b) for a, b in zip(grads, again)):
            fails.append("backward not bitwise repeatable")
    out2 = attnkit.attention(q.detach(), k.detach(), v.detach(), **case.options(seqlens_k),
                             backend="triton")
    if not torch.equal(out.detach(), out2):
        fails.append("forward not bitwise repeatable")
    return fails


def check_large() -> list[str]:
    """q/k/v of 2^31 elements each (BSHD, fp16): batch offsets past 2^31 need 64-bit math.
    A causal window keeps the work small; the last batch's tail is compared on a slice."""
    B, S, H, D, W = 4, 1 << 19, 16, 64, 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=F16).transpose(1, 2)
               for _ in range(3))
    assert q.numel() >= 1 << 31
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = attnkit.attention(q, k, v, causal=True, window=(W, 0), backend="triton")
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    n = 1024  # last n queries and keys of the last batch: same band within the slice
    sl = (slice(B - 1, B), slice(None), slice(S - n, S))
    case = Case(batch=1, heads_q=H, heads_kv=H, seqlen_q=n, seqlen_k=n, head_dim=D, dtype=F16,
                causal=True, window=(W, 0))
    qs, ks, vs, ds = (t.detach()[sl] for t in (q, k, v, dout))
    ref64 = case.reference(qs, ks, vs, None, torch.float64, ds)
    ref_lp = case.reference(qs, ks, vs, None, F16, ds)
    fails = []
    # Rows whose whole window lies inside the slice, and keys seen only by such rows (a key
    # j is seen by queries j .. j + W, whose windows reach back to j - W): the slice's
    # reference softmax of the first W rows is not the full problem's.
    rows = keys = slice(W, n)
    for name, got, r64, rlp, f in (
        ("large out", out[sl][:, :, rows], ref64[0][:, :, rows], ref_lp[0][:, :, rows], 2),
        ("large dq", dq[sl][:, :, rows], ref64[2][0][:, :, rows], ref_lp[2][0][:, :, rows], 3),
        ("large dk", dk[sl][:, :, keys], ref64[2][1][:, :, keys], ref_lp[2][1][:, :, keys], 3),
        ("large dv", dv[sl][:, :, keys], ref64[2][2][:, :, keys], ref_lp[2][2][:, :, keys], 3),
    ):
        ok, msg = check(name, got, r64, rlp, F16, f)
        if not ok:
            fails.append(msg)
    return fails


def _task(task):
    path, i, case = task
    os.environ["ATTNKIT_TRITON_TMA"] = path
    key = f"tma={path} {case.id}"
    try:
        fails = run_case(case, seed=1000 + i)
    except Exception as e:  # report and go on: one failure must not hide others
        fails = [f"raised {type(e).__name__}: {e}"]
        traceback.print_exc(limit=3)
    return key, fails


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-large", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--subset", choices=("all", "grid", "extra"), default="all")
    ap.add_argument("--paths", default="auto,0", help="ATTNKIT_TRITON_TMA values to run")
    ap.add_argument("--match", default="", help="comma list: keep cases whose id contains one")
    args = ap.parse_args()
    caps = attnkit.backends()["triton"].backend.capabilities
    grid_cases = generate(caps, quick=args.quick)
    cases = {"all": grid_cases + ([] if args.quick else extra_cases()), "grid": grid_cases,
             "extra": extra_cases()}[args.subset]
    if args.match:
        cases = [c for c in cases if any(m in c.id for m in args.match.split(","))]
    results = {}
    n_pass = n_total = 0
    t0 = time.time()
    # Descriptors where they apply, then pointers everywhere; spread over worker processes
    # so the many kernel variants compile in parallel.
    tasks = [(path, i, case) for path in args.paths.split(",") for i, case in enumerate(cases)]
    pool = mp.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else None
    outcomes = pool.imap_unordered(_task, tasks) if pool else map(_task, tasks)
    for key, fails in outcomes:  # as they finish: a timeout still leaves a partial log
        n_total += 1
        n_pass += not fails
        results[key] = fails
        print(("FAIL " if fails else "ok   ") + key + (": " + " | ".join(fails)[:600]
                                                      if fails else ""), flush=True)
    if pool:
        pool.close()
    os.environ["ATTNKIT_TRITON_TMA"] = "auto"
    if not args.no_large:
        try:
            fails = check_large()
        except Exception as e:
            fails = [f"raised {type(e).__name__}: {e}"]
            traceback.print_exc(limit=3)
        n_total += 1
        n_pass += not fails
        results["large (>2^31 elements)"] = fails
        if fails:
            print("FAIL large: " + " | ".join(fails), flush=True)
        torch.cuda.empty_cache()
    print(f"check_cuda: {n_pass}/{n_total} passed on {torch.cuda.get_device_name()} "
          f"in {time.time() - t0:.0f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"passed": n_pass, "total": n_total, "results": results}, f, indent=1)
    return 0 if n_pass == n_total else 1


if __name__ == "__main__":
    sys.exit(main())
