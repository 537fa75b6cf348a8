#!/usr/bin/env python
"""Correctness of the cupy backend on a CUDA GPU, against the float64 reference.

Runs every conformance case generated from the backend's capabilities plus extra cases
(long sequences, every head-dim bucket with masks, GQA with seqlens_k, strided layouts, fp32
features), checks each forward and gradient with the suite's accuracy rule, checks that two
runs are bitwise equal, runs one case on a side stream racing against work that writes its
inputs, and one whose k/v element offsets pass 2^31. Prints a pass count; exits non-zero on
any failure.

    python plugins/cupy/scripts/check_cuda.py [--warm-only] [--jobs 16] [--sanitize]

``--warm-only`` compiles every variant those cases (and perf.py) need in parallel worker
processes, filling CuPy's on-disk kernel cache. ``--sanitize`` runs a few small forward +
backward calls only, for compute-sanitizer.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnkit_cupy import _compile  # noqa: E402
from attnkit_cupy.backend import CupyBackend  # noqa: E402

import attnkit  # noqa: E402
from attnkit import reference  # noqa: E402
from attnkit.testing import cases as _cases  # noqa: E402
from attnkit.testing.accuracy import check  # noqa: E402

Case = _cases.Case
CAPS = CupyBackend.capabilities
DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def extra_cases() -> list[Case]:
    """Beyond the conformance grid: sizes spanning several tiles, every head-dim bucket under
    masks, and fp32 through every feature."""
    out = []
    for dt in ("fp16", "bf16", "fp32"):
        d = DT[dt]
        out += [
            Case(dtype=d, batch=2, heads_q=4, heads_kv=2, seqlen_q=700, seqlen_k=1031,
                 head_dim=128, causal=True),
            Case(dtype=d, batch=1, heads_q=3, heads_kv=1, seqlen_q=333, seqlen_k=333,
                 head_dim=72, window=(50, 20), layout="bshd"),
            Case(dtype=d, batch=3, heads_q=4, heads_kv=4, seqlen_q=260, seqlen_k=515,
                 head_dim=64, seqlens_k="random", causal=True, softcap=20.0),
            Case(dtype=d, batch=2, heads_q=2, heads_kv=2, seqlen_q=1, seqlen_k=2000,
                 head_dim=128, seqlens_k="mixed", tag="decode"),
        ]
    for hd in (8, 24, 40, 80, 96, 111, 160, 200, 256):
        out.append(Case(dtype=torch.bfloat16, batch=2, heads_q=4, heads_kv=1, seqlen_q=190,
                        seqlen_k=211, head_dim=hd, causal=True, window=(64, -1)))
        out.append(Case(dtype=torch.float16, batch=1, heads_q=2, heads_kv=2, seqlen_q=150,
                        seqlen_k=129, head_dim=hd, softcap=10.0, magnitude=2.0,
                        layout="bshd"))
    out.append(Case(dtype=torch.bfloat16, batch=1, heads_q=8, heads_kv=2, seqlen_q=2048,
                    seqlen_k=2048, head_dim=128, causal=True, tag="long"))
    out.append(Case(dtype=torch.float16, batch=2, heads_q=2, heads_kv=2, seqlen_q=1024,
                    seqlen_k=96, head_dim=64, window=(0, 0), tag="diag"))
    return out


def sanitize_cases() -> list[Case]:
    return [
        Case(dtype=torch.float16, batch=2, heads_q=4, heads_kv=2, seqlen_q=97, seqlen_k=130,
             head_dim=64, causal=True, seqlens_k="random"),
        Case(dtype=torch.bfloat16, batch=1, heads_q=2, heads_kv=1, seqlen_q=70, seqlen_k=90,
             head_dim=128, window=(16, 8), softcap=15.0, layout="bshd"),
        Case(dtype=torch.float16, batch=1, heads_q=1, heads_kv=1, seqlen_q=40, seqlen_k=70,
             head_dim=256),
        Case(dtype=torch.float16, batch=1, heads_q=1, heads_kv=1, seqlen_q=33, seqlen_k=45,
             head_dim=36, layout="bshd", tag="scalar-loads"),
        Case(dtype=torch.float32, batch=2, heads_q=2, heads_kv=1, seqlen_q=50, seqlen_k=37,
             head_dim=40, causal=True, seqlens_k="mixed"),
    ]


def conformance_cases() -> list[Case]:
    return _cases.generate(CAPS) + _cases.repeatable(CAPS)


def perf_variants() -> set:
    return {_compile.variant_for(src, "bf16", d, band, False)
            for src in _compile.SOURCES for d in (64, 128) for band in (False, True)}


def case_variants(case: Case) -> set:
    band = case.causal or (case.window is not None and tuple(case.window) != (-1, -1))
    dt = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[case.dtype]
    return {_compile.variant_for(src, dt, case.head_dim, band, case.softcap is not None)
            for src in _compile.SOURCES}


def _warm_one(variant):
    import cupy

    t0 = time.time()
    with cupy.cuda.Device(0):
        for role in variant.kernels():
            _compile.get_kernel(variant, role, 0)
    return variant, time.time() - t0


def warm(variants, jobs: int) -> None:
    variants = sorted(variants, key=lambda v: (v.source != "backward", -v.dp, str(v)))
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(jobs) as pool:
        for var, dt in pool.imap_unordered(_warm_one, variants):
            print(f"  compiled {var.source:8s} {var.dtype} D{var.dp} band={int(var.band)} "
                  f"softcap={int(var.softcap)} in {dt:.1f} s", flush=True)
    print(f"warm: {len(variants)} variants in {time.time() - t0:.1f} s", flush=True)


def run_case(case: Case, device="cuda", seed=None) -> list[str]:
    """Failures (empty list = pass) of one case: accuracy, masked rows, repeatability."""
    seed = random.randrange(2**31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    q, k, v, seqlens = case.make_inputs(device, gen)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    where = f"[seed {seed}] {case.id}"
    fails = []
    out, lse = attnkit.attention(q, k, v, **case.options(seqlens), return_lse=True,
                                 backend="cupy")
    dout = torch.randn(out.shape, generator=gen).to(device, q.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    out2, lse2 = attnkit.attention(q, k, v, **case.options(seqlens), return_lse=True,
                                   backend="cupy")
    grads2 = torch.autograd.grad(out2, (q, k, v), dout)
    if not (torch.equal(out, out2) and torch.equal(lse, lse2)):
        fails.append(f"{where}: forward not bitwise repeatable")
    if not all(torch.equal(a, b) for a, b in zip(grads, grads2)):
        fails.append(f"{where}: backward not bitwise repeatable")
    ref64 = case.reference(q, k, v, seqlens, torch.float64, dout)
    reflp = case.reference(q, k, v, seqlens, q.dtype, dout)
    for name, got, r64, rlp, f in [("out", out, ref64[0], reflp[0], 2),
                                   ("lse", lse, ref64[1], reflp[1], 2)] + [
            (f"d{n}", g, g64, glp, 3) for n, g, g64, glp in zip("qkv", grads, ref64[2],
                                                                  reflp[2])]:
        ok, msg = check(f"{where} {name}", got, r64, rlp, q.dtype, f)
        if not ok:
            fails.append(msg)
    masked = case.masked_rows(seqlens).to(device).expand(out.shape[:3])
    if masked.any():
        if not (out[masked] == 0).all() or not (lse[masked] == float("-inf")).all() \
                or not (grads[0][masked] == 0).all():
            fails.append(f"{where}: fully-masked rows must give out 0, lse -inf, dq 0")
    return fails


def side_stream_test() -> list[str]:
    """Inputs written by slow work queued on a side stream, attention queued right after on
    the same stream: correct only if the kernels run on torch's current stream."""
    torch.manual_seed(0)
    B, H, S, D = 2, 4, 512, 64
    side = torch.cuda.Stream()
    big = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        q = torch.zeros(B, H, S, D, device="cuda", dtype=torch.float16)
        k = torch.zeros_like(q)
        v = torch.zeros_like(q)
        for _ in range(20):  # keep the stream busy for a while
            big = big @ big
            big = big / big.norm()
        src = torch.randn(3, B, H, S, D, device="cuda").to(torch.float16) + big[0, 0] * 0
        q.copy_(src[0])
        k.copy_(src[1])
        v.copy_(src[2])
        q.requires_grad_(True)
        out = attnkit.attention(q, k, v, causal=True, backend="cupy")
        (dq,) = torch.autograd.grad(out, (q,), torch.ones_like(out))
    torch.cuda.synchronize()
    ref = reference.safe(*(t.detach().double() for t in (q, k, v)), causal=True)[0]
    err = (out.double() - ref).abs().max().item()
    fails = []
    if not err < 2e-2:
        fails.append(f"side stream: out error {err:.3e} (kernels not ordered on the stream?)")
    if not torch.isfinite(dq).all() or dq.abs().max() == 0:
        fails.append("side stream: dq is not finite or is all zeros")
    return fails


def offset64_test() -> list[str]:
    """k/v views whose second batch starts past 2^31 elements (64-bit offset arithmetic)."""
    B, H, S, D = 2, 2, 128, 64
    stride_b = (1 << 31) + 4096
    try:
        buf = torch.randn(stride_b + H * S * D + 4096, device="cuda", dtype=torch.float16)
    except torch.OutOfMemoryError:
        return ["offset64: could not allocate the 4 GiB buffer"]
    k = buf.as_strided((B, H, S, D), (stride_b, S * D, D, 1))
    v = buf.as_strided((B, H, S, D), (stride_b, S * D, D, 1), storage_offset=2048)
    q = torch.randn(B, H, S, D, device="cuda", dtype=torch.float16, requires_grad=True)
    out = attnkit.attention(q, k, v, causal=True, backend="cupy")
    (dq,) = torch.autograd.grad(out, (q,), torch.ones_like(out))
    ref = reference.safe(q.detach().double(), k.double(), v.double(), causal=True)[0]
    err = (out.double() - ref).abs().max().item()
    del buf
    torch.cuda.empty_cache()
    return [] if err < 1e-2 and torch.isfinite(dq).all() else [f"offset64: error {err:.3e}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warm-only", action="store_true")
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("-k", default="", help="only cases whose id contains this")
    args = ap.parse_args(argv)

    ok, why = attnkit.backends()["cupy"].availability
    if not ok:
        print(f"cupy backend unavailable: {why}")
        return 2
    if args.warm_only:
        vs = set(perf_variants())
        for c in conformance_cases() + extra_cases() + sanitize_cases():
            vs |= case_variants(c)
        warm(vs, args.jobs)
        return 0
    if args.sanitize:
        for c in sanitize_cases():
            fails = run_case(replace(c), seed=1)
            print(f"{'ok  ' if not fails else 'FAIL'} {c.id}", *fails, sep="\n  ")
        torch.cuda.synchronize()
        return 0

    cases = [c for c in conformance_cases() + extra_cases() if args.k in c.id]
    n_pass, failures, t0 = 0, [], time.time()
    for c in cases:
        try:
            fails = run_case(c)
        except Exception as e:  # report and go on: one crash should not hide the rest
            fails = [f"{c.id}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"]
        if fails:
            failures += fails
            print(f"FAIL {c.id}", *fails, sep="\n  ", flush=True)
        else:
            n_pass += 1
    for name, test in (("side_stream", side_stream_test), ("offset64", offset64_test)):
        try:
            fails = test()
        except Exception as e:
            fails = [f"{name}: {type(e).__name__}: {e}"]
        print(f"{'ok  ' if not fails else 'FAIL'} {name}", *fails, sep="\n  ", flush=True)
        n_pass += not fails
        failures += fails
    total = len(cases) + 2
    print(f"check_cuda: {n_pass}/{total} passed in {time.time() - t0:.1f} s on "
          f"{torch.cuda.get_device_name()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
