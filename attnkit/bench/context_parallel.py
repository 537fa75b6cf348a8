"""``attnkit bench --context-parallel``: how close `attnkit.distributed` comes to ideal
scaling.

The fraction of ideal scaling is ``T1 / (P * T_P)``: ``T1 / P`` is one GPU's time at ``1/P``
of the work (``T1``: the whole sequence in one `attnkit.attention` call), ``T_P`` the
context-parallel time on ``P`` GPUs; forward and forward+backward, per method and layout.

Under ``torchrun --nproc-per-node P -m attnkit.cli bench --context-parallel`` every rank
runs the methods and the slowest rank's time counts (measured). In one process it measures
the same at world size 1 (the whole path through the process group, NCCL on a GPU) and
predicts P = 2, 4, 8 from what one GPU shows: the compute of every ring step of every rank
at the shard sizes of P, timed through the code the ring runs (`RingCall.forward_step`,
`backward_step`), and the transfers at ``link_gbps`` (one direction of NVLink). A ring step
lasts as long as the slower of its compute (slowest rank) and its transfer, which overlap;
all-gather and all-to-all transfers do not overlap compute.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..api import attention
from ..distributed import ring_attention, ulysses_attention
from ..distributed.ring import RingCall
from . import timing
from .environment import device_info, environment
from .grid import DTYPES

METHODS = ("p2p", "allgather", "ulysses")
LAYOUTS = ("headtail", "contiguous")
#: One direction of an H100/H200 SXM's NVLink (18 links x 25 GB/s).
DEFAULT_LINK_GBPS = 450.0
FORMULAS = {
    "fraction": "T1 / (P * T_P); T1: the whole sequence on one GPU, T_P: context parallel",
    "p2p": "sum over steps of max(slowest rank's step compute, K/V transfer); the backward "
           "also passes dK/dV (float32) every step",
    "allgather": "(P-1) shards of K/V gathered, then the slowest rank's compute; the backward "
                 "gathers again and reduce-scatters float32 dK/dV",
    "ulysses": "all-to-all of (P-1)/P of q, k, v and out (backward: dout, dq, dk, dv) plus one "
               "call over the whole sequence for H/P heads",
    "link": "bytes / (link_gbps * 1e9), link_gbps one direction per GPU",
}


def run_context_parallel(*, device="auto", seqlens=(65536, 131072), worlds=(2, 4, 8),
                         head_dim=128, model_dim=2048, heads_kv=None, dtype="bf16",
                         causal=True, backend=None, link_gbps=DEFAULT_LINK_GBPS,
                         warmup_ms=25.0, rep_ms=100.0, reps=10, predict=None) -> dict:
    """Measure the methods on the process group (set up here when it is not), and at world
    size 1 predict ``worlds`` (``predict``: force or skip the prediction). Returns a
    JSON-ready dict; every rank gets the same measured rows."""
    device = _device(device)
    rank, world = _process_group(device)
    heads = model_dim // head_dim
    shape = dict(batch=1, heads=heads, heads_kv=heads_kv or heads, head_dim=head_dim,
                 dtype=DTYPES[dtype], device=device)
    options = dict(causal=causal, backend=backend)
    result = {
        "kind": "context_parallel", "world_size": world, "device": device_info(device),
        "environment": environment(device),
        "config": dict(seqlens=list(seqlens), worlds=list(worlds), head_dim=head_dim,
                       heads=heads, heads_kv=shape["heads_kv"], dtype=dtype, causal=causal,
                       backend=backend, link_gbps=link_gbps),
        "formulas": FORMULAS, "measured": [], "predicted": [],
    }
    single = {S: _single_gpu(S, shape, options, warmup_ms, rep_ms) for S in seqlens}
    for S in seqlens:
        for method in METHODS if heads % world == 0 else METHODS[:2]:
            for layout in (LAYOUTS if method != "ulysses" else ("headtail",)):
                row = dict(seqlen=S, world=world, method=method, layout=layout,
                           **_measure_cp(S, world, method, layout, shape, options, reps))
                row.update(_fractions(row, single[S], world))
                result["measured"].append(row)
    if (world == 1 if predict is None else predict) and rank == 0:
        for S in seqlens:
            for P in worlds:
                for row in _predict(S, P, shape, options, link_gbps, warmup_ms, rep_ms):
                    row.update(_fractions(row, single[S], P))
                    result["predicted"].append(row)
    return result


def _device(device) -> torch.device:
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _process_group(device) -> tuple[int, int]:
    """The running group, torchrun's (``env://``), or a group of one made here."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                    world_size=1)
    return dist.get_rank(), dist.get_world_size()


def _tensors(n_q, n_kv, shape, grad=False, heads=None):
    B, D = shape["batch"], shape["head_dim"]
    H, Hkv = heads or (shape["heads"], shape["heads_kv"])
    make = dict(dtype=shape["dtype"], device=shape["device"])
    q = torch.randn(B, H, n_q, D, **make)
    k, v = (torch.randn(B, Hkv, n_kv, D, **make) for _ in range(2))
    if grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v


def _fwd_bwd(fn, q, k, v):
    """A forward, and a forward+backward, of ``fn(q, k, v)``, as callables."""
    dout = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward():
        out = fn(q, k, v)
        torch.autograd.backward(out, dout)
    return forward, forward_backward


def _single_gpu(S, shape, options, warmup_ms, rep_ms) -> dict:
    """T1: the whole sequence in one call on this GPU."""
    q, k, v = _tensors(S, S, shape, grad=True)
    fwd, fwd_bwd = _fwd_bwd(lambda q, k, v: attention(q, k, v, **options), q, k, v)
    return {"fwd": timing.measure(fwd, shape["device"], warmup_ms=warmup_ms,
                                  rep_ms=rep_ms).median_ms,
            "fwd_bwd": timing.measure(fwd_bwd, shape["device"], warmup_ms=warmup_ms,
                                      rep_ms=rep_ms).median_ms}


def _collective_ms(fn, device, reps) -> float:
    """Mean time of repeated calls that communicate, the slowest rank's: every rank makes the
    same number of calls (the adaptive repetitions of `timing.measure` would not agree), up
    to ``reps``, fewer for calls over about 0.2 s."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(n) -> float:
        sync()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        elapsed = torch.tensor([(time.perf_counter() - start) * 1e3 / n], dtype=torch.float64,
                               device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed)

    fn()  # compilation, communicators
    estimate = timed(1)
    return timed(max(3, min(reps, int(2000 / max(estimate, 1e-3)))))


def _measure_cp(S, world, method, layout, shape, options, reps) -> dict:
    if S % (2 * world):
        raise ValueError(f"sequence length {S} is not divisible by 2 x {world} ranks")
    q, k, v = _tensors(S // world, S // world, shape, grad=True)
    if method == "ulysses":
        def fn(q, k, v):
            return ulysses_attention(q, k, v, layout=layout, **options)
    else:
        def fn(q, k, v):
            return ring_attention(q, k, v, layout=layout, comm=method, **options)
    fwd, fwd_bwd = _fwd_bwd(fn, q, k, v)
    return {"fwd_ms": _collective_ms(fwd, shape["device"], reps),
            "fwd_bwd_ms": _collective_ms(fwd_bwd, shape["device"], reps)}


def _fractions(row, single, world) -> dict:
    return {"t1_fwd_ms": single["fwd"], "t1_fwd_bwd_ms": single["fwd_bwd"],
            "fraction_fwd": single["fwd"] / (world * row["fwd_ms"]),
            "fraction_fwd_bwd": single["fwd_bwd"] / (world * row["fwd_bwd_ms"])}


# -- prediction from one GPU ----------------------------------------------------------------

def _predict(S, P, shape, options, link_gbps, warmup_ms, rep_ms) -> list[dict]:
    """Rows for P ranks at total length S, from per-step compute timed here."""
    if S % (2 * P):
        raise ValueError(f"sequence length {S} is not divisible by 2 x {P} ranks")
    local = S // P
    item = torch.empty((), dtype=shape["dtype"]).element_size()
    B, Hkv, D = shape["batch"], shape["heads_kv"], shape["head_dim"]
    kv_bytes = 2 * B * Hkv * local * D * item
    dkv_bytes = 2 * B * Hkv * local * D * 4  # dK/dV travel in float32

    def link_ms(n_bytes):
        return n_bytes / (link_gbps * 1e9) * 1e3

    def measure(fn):
        return timing.measure(fn, shape["device"], warmup_ms=warmup_ms, rep_ms=rep_ms).median_ms

    rows = []
    for layout in LAYOUTS:
        p2p = _ring_steps(S, P, "p2p", layout, shape, options, measure)
        fwd = sum(max(c, link_ms(kv_bytes) if t < P - 1 else 0.0)
                  for t, c in enumerate(p2p["fwd"]))
        bwd = sum(max(c, (link_ms(kv_bytes) if t < P - 1 else 0.0) + link_ms(dkv_bytes))
                  for t, c in enumerate(p2p["bwd"]))
        rows.append(dict(seqlen=S, world=P, method="p2p", layout=layout, fwd_ms=fwd,
                         fwd_bwd_ms=fwd + bwd, step_compute_fwd_ms=p2p["fwd"],
                         step_compute_bwd_ms=p2p["bwd"], step_link_kv_ms=link_ms(kv_bytes),
                         step_link_dkv_ms=link_ms(dkv_bytes)))
        gathered = _ring_steps(S, P, "allgather", layout, shape, options, measure)
        gather = link_ms((P - 1) * kv_bytes)
        fwd = gather + gathered["fwd"][0]
        bwd = gather + gathered["bwd"][0] + link_ms((P - 1) * dkv_bytes)
        rows.append(dict(seqlen=S, world=P, method="allgather", layout=layout, fwd_ms=fwd,
                         fwd_bwd_ms=fwd + bwd, compute_fwd_ms=gathered["fwd"][0],
                         compute_bwd_ms=gathered["bwd"][0], link_gather_ms=gather))
    if shape["heads"] % P == 0:  # else ulysses_attention refuses
        rows.append(_ulysses_row(S, P, shape, options, link_ms, measure, item))
    return rows


def _ring_steps(S, P, comm, layout, shape, options, measure) -> dict:
    """Per step, the slowest rank's compute (ms), forward and backward; steps whose blocks
    have the same shapes are timed once."""
    local = S // P
    q, k, v = _tensors(local, local, shape)
    kv = torch.stack([k, v]) if comm == "p2p" else torch.randn(
        2, *k.shape[:2], S, k.shape[3], dtype=k.dtype, device=k.device)
    out, lse = attention(q, k, v, return_lse=True, **options)
    dout = torch.randn_like(out)
    timed: dict = {}
    steps = {"fwd": [], "bwd": []}
    for rank in range(P):
        call = RingCall(q, k, v, None, rank, P, options["causal"], None, None, None, layout,
                        comm, True, options["backend"])
        for t, blocks in enumerate(call.steps):
            key = tuple((b.q1 - b.q0, b.k1 - b.k0, b.left, b.right) for b in blocks)
            if key not in timed:
                timed[key] = _step_times(call, blocks, comm, q, kv, out, lse, dout, measure)
            for name, value in zip(("fwd", "bwd"), timed[key]):
                if rank == 0:
                    steps[name].append(value)
                else:
                    steps[name][t] = max(steps[name][t], value)
    return steps


def _step_times(call, blocks, comm, q, kv, out, lse, dout, measure) -> tuple[float, float]:
    """Forward and backward compute (ms) of one step's blocks, through the ring's own code."""
    if not blocks:  # a step this rank skips (contiguous layout, causal)
        return 0.0, 0.0
    if comm == "p2p":
        acc, acc_lse = call.accumulators(q)
        fwd = measure(lambda: call.forward_step(blocks, q, kv, acc, acc_lse))
    else:
        fwd = measure(lambda: call.gathered_forward(q, kv))
    dq = torch.zeros(q.shape, dtype=torch.float64 if q.dtype == torch.float64
                     else torch.float32, device=q.device)
    bwd = measure(lambda: call.backward_step(blocks, q, kv, out, lse, dout, None, dq))
    return fwd, bwd


def _ulysses_row(S, P, shape, options, link_ms, measure, item) -> dict:
    B, H, Hkv, D = shape["batch"], shape["heads"], shape["heads_kv"], shape["head_dim"]
    # kv heads that do not split over P are repeated to lcm(Hkv, P) (ulysses_attention)
    hkv_moved = Hkv if Hkv % P == 0 else Hkv * P // math.gcd(Hkv, P)
    q, k, v = _tensors(S, S, shape, grad=True, heads=(H // P, hkv_moved // P))
    fwd_fn, fwd_bwd_fn = _fwd_bwd(lambda q, k, v: attention(q, k, v, **options), q, k, v)
    compute_fwd, compute_fwd_bwd = measure(fwd_fn), measure(fwd_bwd_fn)
    local = S // P
    moved = (P - 1) / P * B * local * D * item * (2 * H + 2 * hkv_moved)  # q, out, k, v
    return dict(seqlen=S, world=P, method="ulysses", layout="headtail",
                fwd_ms=compute_fwd + link_ms(moved),
                fwd_bwd_ms=compute_fwd_bwd + 2 * link_ms(moved),
                compute_fwd_ms=compute_fwd, compute_fwd_bwd_ms=compute_fwd_bwd,
                link_all_to_all_ms=link_ms(moved))


# -- output ---------------------------------------------------------------------------------

def table(result: dict) -> str:
    c = result["config"]
    lines = [f"context parallel: {result['device'].get('name')}, {c['dtype']}, "
             f"H={c['heads']} (kv {c['heads_kv']}), D={c['head_dim']}, causal={c['causal']}, "
             f"backend={c['backend'] or 'auto'}",
             f"fraction of ideal scaling = {FORMULAS['fraction']}", ""]
    for title, rows in (("measured", result["measured"]),
                        (f"predicted (link {c['link_gbps']:g} GB/s)", result["predicted"])):
        if not rows:
            continue
        lines.append(f"{title}:")
        lines.append(f"{'tokens':>8} {'P':>2} {'method':>9} {'layout':>10} {'fwd ms':>9} "
                     f"{'T1 fwd':>9} {'frac':>5} {'f+b ms':>9} {'T1 f+b':>9} {'frac':>5}")
        for r in rows:
            lines.append(f"{r['seqlen']:>8} {r['world']:>2} {r['method']:>9} {r['layout']:>10} "
                         f"{r['fwd_ms']:>9.3f} {r['t1_fwd_ms']:>9.3f} {r['fraction_fwd']:>5.2f} "
                         f"{r['fwd_bwd_ms']:>9.3f} {r['t1_fwd_bwd_ms']:>9.3f} "
                         f"{r['fraction_fwd_bwd']:>5.2f}")
        lines.append("")
    return "\n".join(lines)


def run_cli(args) -> int:
    """``attnkit bench --context-parallel``: run, print the table and (rank 0) write
    ``context_parallel.json``/``.txt`` to ``--out``."""
    from .cli import DEFAULT_OUT, UsageError

    for flag in ("compare", "env", "label"):
        if getattr(args, flag, None):
            raise UsageError(f"--{flag} does not apply to --context-parallel")
    if not args.link_gbps > 0:
        raise UsageError(f"--link-gbps must be positive, got {args.link_gbps}")
    backends = args.backends or [None]
    if len(backends) > 1:
        raise UsageError("--context-parallel times one backend (or auto); got "
                         f"{args.backends}")
    kwargs = dict(device=args.device, worlds=args.cp_worlds or (2, 4, 8),
                  link_gbps=args.link_gbps, backend=backends[0])
    for key, value in (("seqlens", args.seqlens), ("model_dim", args.model_dim),
                       ("warmup_ms", args.warmup_ms), ("rep_ms", args.rep_ms)):
        if value is not None:
            kwargs[key] = value
    if args.head_dims:
        kwargs["head_dim"] = args.head_dims[0]
    if args.dtypes:
        kwargs["dtype"] = args.dtypes[0]
    if args.causal:
        kwargs["causal"] = args.causal[0]
    result = run_context_parallel(**kwargs)
    if dist.get_rank() == 0:
        text = table(result)
        print(text)
        out = Path(args.out or DEFAULT_OUT)
        out.mkdir(parents=True, exist_ok=True)
        (out / "context_parallel.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "context_parallel.txt").write_text(text + "\n")
        print(f"wrote {out / 'context_parallel.json'}, {out / 'context_parallel.txt'}")
    dist.destroy_process_group()
    return 0
