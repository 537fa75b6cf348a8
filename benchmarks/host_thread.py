"""Host time of a short causal training step, split between the caller's thread and the
autograd engine's device thread.

bf16 D=128 causal S=512 (B=32, H=16, (B, S, H, D) views: the grid's host-bound cell), the
GPU held by ``torch.cuda._sleep`` so no call waits on it. Host microseconds per call (minimum
and median over 7 batches of 40, or over single calls):
- fwd+grad of ours and SDPA-flash's (what the bench's fwd+bwd cell queues per call);
- ``autograd.grad`` of ours split at our Function's backward: engine before it (hand-off to
  the device thread), inside it, engine after it (the hand-back); the same split for a
  trivial Python Function, the engine's floor;
- the Gluon backward's launcher (allocations, the prep, Gluon and cast launches) called on
  the main thread and, the same code, inside autograd on the device thread.
Also the CPU affinity and frequency governor, since the split depends on them.

    python benchmarks/host_thread.py [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from attnkit_triton import _hopper
from attnkit_triton import backend as tb
from host_segments import N, held, step_rows, training_cell  # beside this script

from attnkit.api import _AttentionFunction
from attnkit.registry import registry
from attnkit.spec import AttentionProblem

_now = time.perf_counter


def _medians(rows):
    """Per column, ``(min, median)`` in us of a list of equal-length tuples of seconds."""
    return [(min(c) * 1e6, statistics.median(c) * 1e6) for c in zip(*rows)]


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _held_iterations(n):
    """``range(n)``, the GPU held again (``torch.cuda._sleep``) every `N` calls so no call
    waits on it; synchronized at the end."""
    for i in range(n):
        if i % N == 0:
            torch.cuda.synchronize()
            torch.cuda._sleep(100_000_000)
        yield i
    torch.cuda.synchronize()


def per_call(fn, n=N * 7):
    """``(median, mean, 90th percentile)`` host us of single calls of ``fn``, the GPU kept
    busy: the mean over a batch (`held`) also counts the rare slow call."""
    times = []
    for _ in _held_iterations(n):
        t0 = _now()
        fn()
        times.append((_now() - t0) * 1e6)
    times.sort()
    return statistics.median(times), statistics.fmean(times), times[int(0.9 * len(times))]


def grad_split(function, forward, inputs, grad, n=N * 7):
    """``(before, inside, after)`` of ``autograd.grad(forward(), inputs, grad)`` (through
    ``function``), the forward untimed, timed around ``function.backward``."""
    orig, marks, rows = function.backward, [], []

    def backward(ctx, *grads):
        marks.append(_now())
        try:
            return orig(ctx, *grads)
        finally:
            marks.append(_now())

    function.backward = staticmethod(backward)
    try:
        for _ in _held_iterations(n):
            marks.clear()
            y = forward()
            t0 = _now()
            torch.autograd.grad(y, inputs, grad)
            t3 = _now()
            rows.append((marks[0] - t0, marks[1] - marks[0], t3 - marks[1]))
    finally:
        function.backward = staticmethod(orig)
    return _medians(rows)


def _timed(fn, marks):
    """``fn`` recording its duration in ``marks``."""
    def timed(*args):
        t0 = _now()
        try:
            return fn(*args)
        finally:
            marks.append((_now() - t0,))
    return timed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    D, S, causal, dtype = 128, 512, True, torch.bfloat16
    leaves, (q, k, v), dout, ours, flash = training_cell(D, S, causal, dtype)
    lines = [f"affinity {sorted(os.sched_getaffinity(0))}"]
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") as f:
            lines.append(f"governor {f.read().strip()}")
    except OSError:
        lines.append("governor: not readable")
    rows = {}
    for name, f in (("triton", ours), ("flash", flash)):
        step_rows(rows, name, f, leaves, dout)
        md, mean, p90 = per_call(lambda f=f: torch.autograd.grad(f(), leaves, dout))
        rows[f"{name} fwd+grad single calls: median, mean"] = (md, mean)
        rows[f"{name} fwd+grad single calls: p90"] = (p90, p90)
    for label, pair in zip(("before", "inside", "after"), grad_split(
            _AttentionFunction, ours, leaves, dout)):
        rows[f"triton grad split: {label}"] = pair
    x = torch.randn(4, device="cuda", requires_grad=True)
    g = torch.ones(4, device="cuda")
    for label, pair in zip(("before", "inside", "after"), grad_split(
            _Identity, lambda: _Identity.apply(x), x, g)):
        rows[f"trivial grad split: {label}"] = pair

    problem = AttentionProblem.from_tensors(q, k, v, causal=causal, needs_grad=True)
    be = registry.select(problem, "triton")
    route = tb._routes.get(next(key for key in tb._routes if key[0] == "backward"
                                and key[1] == problem))
    lines.append(f"backward route {route[0]}, direct launch "
                 f"{type(getattr(route[1], 'direct', None)).__name__}, steps kept "
                 f"{getattr(route[1], 'steps', None) is not None}")
    if route[0] == "gluon":  # the same launcher on the main thread and on the engine's
        marks: list = []
        timed = _timed(_hopper.launch_backward, marks)
        with torch.no_grad():
            out, lse = be.forward(problem, q, k, v, None)
        held(lambda: timed(problem, q, k, v, out, lse, dout, route[1]))
        main_thread = _medians(marks)[0]
        marks.clear()
        orig = tb.launch_backward_hopper
        tb.launch_backward_hopper = timed
        try:
            held(lambda: torch.autograd.grad(ours(), leaves, dout))
        finally:
            tb.launch_backward_hopper = orig
        rows["Gluon launch_backward, main thread"] = main_thread
        rows["Gluon launch_backward, engine thread"] = _medians(marks)[0]
    text = "\n".join(lines + [f"{k:<42} {a:8.1f} {b:8.1f}" for k, (a, b) in rows.items()])
    text += "\n(columns: min, median us; single calls: median, mean)\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
