"""A forward kernel (Gluon, or ``tl`` with ``--kernel tl``) with one switch off and on, beside
SDPA's flash and cuDNN kernels, on the grid's shapes.

Per cell (B*S = 16k tokens, H*D = 2048, (B, S, H, D) views, fp16 and bf16, head dim 64 and
128, causal and not, S = 512..16k): the variants' out and lse are compared (largest absolute
difference; 0 means bitwise equal), then the four contenders are timed in ``--rounds``
interleaved rounds (`attnkit.bench.timing.measure`, L2 flushed before each call); TFLOP/s of
the median over rounds of each round's median. Run in the fifteenth session on an H200 for
ping-pong turns (`h200/fwd-pingpong.json`, by this script's first version, commit f9b804c,
whose columns are ``gluon``/``pingpong``; the switch is removed) and the folded scale
(`h200/fwd-fold.json`); in the sixteenth for the folded scale in the ``tl`` forward
(`h200/fwd-fold-tl.json`, with the Gluon forward as a fifth contender).

    python benchmarks/fwd_variant.py --switch _FOLD --out fwd-fold.json   # needs an sm_90 GPU
    python benchmarks/fwd_variant.py --kernel tl --switch fold --out fwd-fold-tl.json
    python benchmarks/fwd_variant.py --plot fwd-fold.json                 # fwd-fold.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch
import torch.nn.functional as F
from _gpu_profile import record  # benchmarks/, beside this script
from attnkit_triton import _hopper
from attnkit_triton import backend as triton_backend
from attnkit_triton._configs import forward_config
from attnkit_triton._forward import launch_forward
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.bench import runner, timing
from attnkit.bench.grid import Shape
from attnkit.spec import AttentionProblem

SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
PEERS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def _contenders(problem, q, k, v, causal, switch, kernel):
    """name -> call: the chosen forward with ``switch`` off and on (plans built here, outside
    the backend's caches), then SDPA's kernels on the (B, H, S, D) views; for ``tl`` also
    the Gluon forward as the backend would launch it (where the two meet decides
    `_hopper._MIN_SEQLEN`)."""
    calls = {}
    for name, on in (("off", False), ("on", True)):
        calls[name] = (_gluon_call if kernel == "gluon" else _tl_call)(problem, q, k, v,
                                                                        switch, on)
    if kernel == "tl":
        plan = _hopper.forward_plan(problem, q, k, v)
        calls["gluon"] = lambda: _hopper.launch_forward(problem, q, k, v, plan)
    for name, backend in PEERS.items():
        def peer(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        calls[name] = peer
    return calls


def _gluon_call(problem, q, k, v, switch, on):
    """The Gluon forward with ``_hopper.<switch>[head dim]`` set to ``on``."""
    views = _hopper._layout(q, k, v)[0]
    table = getattr(_hopper, switch)
    saved = table[problem.head_dim]
    table[problem.head_dim] = on
    try:
        plan = _hopper._forward_plan.__wrapped__(problem, views)
    finally:
        table[problem.head_dim] = saved
    return lambda: _hopper.launch_forward(problem, q, k, v, plan)


def _tl_call(problem, q, k, v, switch, on):
    """The ``tl`` forward with its config's field ``switch`` set to ``on`` (the config and
    load path the backend would pick for this problem)."""
    cfg = forward_config(problem.head_dim, problem.causal, q.dtype, q.device,
                         triton_backend._short(problem))
    cfg = dataclasses.replace(cfg, **{switch: on})
    tma = cfg.tma and triton_backend.use_tma(problem, q, k, v)
    return lambda: launch_forward(problem, q, k, v, None, cfg, tma)


def _plot(path: str) -> None:
    """TFLOP/s against seqlen, one panel per (dtype, head dim, causal), beside the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    rows = data["rows"]
    groups = sorted({(r["dtype"], r["D"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(2, (len(groups) + 1) // 2, figsize=(4 * len(groups) // 2 + 2, 7),
                             squeeze=False)
    for ax, (dtype, D, causal) in zip(axes.flat, groups):
        cell = [r for r in rows if (r["dtype"], r["D"], r["causal"]) == (dtype, D, causal)]
        for name, style in (("on", "o-"), ("off", "o--"), ("gluon", "d-."), ("cudnn", "s:"),
                            ("flash", "^:")):
            if name not in cell[0]:
                continue
            ax.plot([r["S"] for r in cell], [r[name] for r in cell], style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dtype} D={D} {'causal' if causal else 'non-causal'}", fontsize=9)
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
    axes.flat[0].legend(fontsize=8)
    env = data["environment"]
    fig.suptitle(f"{data.get('kernel', 'gluon')} forward, {data.get('switch', '')} off/on, "
                 f"{env['device']['name']}, torch "
                 f"{env['versions']['torch']}, Triton {env['versions']['triton']}, "
                 f"{env['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path.rsplit(".", 1)[0] + ".png", dpi=90)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plot", metavar="JSON", help="draw a run's JSON (no GPU needed) and exit")
    p.add_argument("--kernel", choices=("gluon", "tl"), default="gluon")
    p.add_argument("--switch", help="gluon: a dict in _hopper keyed by head dim; tl: a "
                   "boolean field of its KernelConfig")
    p.add_argument("--out", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--head-dims", default="128,64")
    p.add_argument("--seqlens", default=",".join(map(str, SEQLENS)))
    args = p.parse_args()
    if args.plot:
        _plot(args.plot)
        return 0
    if not args.switch:
        p.error("--switch is needed to time (or --plot JSON)")
    return record(args.out, _rows(args), kernel=args.kernel, switch=args.switch)


def _rows(args):
    for dtype in args.dtypes.split(","):
        for D in (int(d) for d in args.head_dims.split(",")):
            for causal in (False, True):
                for S in (int(x) for x in args.seqlens.split(",")):
                    shape = Shape(16384 // S, 2048 // D, S, D, causal, dtype)
                    _, (q, k, v), _ = runner.grid_inputs(shape, "bshd", torch.device("cuda"), 0)
                    q, k, v = (t.detach() for t in (q, k, v))
                    problem = AttentionProblem.from_tensors(q, k, v, causal=causal)
                    calls = _contenders(problem, q, k, v, causal, args.switch, args.kernel)
                    (o0, l0), (o1, l1) = calls["off"](), calls["on"]()
                    diffs = [float((a.float() - b.float()).abs().max())
                             for a, b in ((o0, o1), (l0, l1))]
                    times = {name: [] for name in calls}
                    for _ in range(args.rounds):
                        for name, call in calls.items():
                            t = timing.measure(call, "cuda", rep_ms=40)
                            times[name].append(t.median_ms)
                    flops = 4 * shape.batch * shape.heads * S * S * D / (2 if causal else 1)
                    row = {"dtype": dtype, "D": D, "causal": causal, "S": S,
                           "out_diff": diffs[0], "lse_diff": diffs[1]}
                    for name, ms in times.items():
                        row[name] = round(flops / statistics.median(ms) / 1e9, 1)
                    pairs = [("on", "off"), ("on", "cudnn"), ("off", "cudnn"), ("on", "flash")]
                    if "gluon" in row:
                        pairs.append(("on", "gluon"))
                    for a, b in pairs:
                        row[f"{a}/{b}"] = round(row[a] / row[b], 3)
                    yield row


if __name__ == "__main__":
    raise SystemExit(main())
