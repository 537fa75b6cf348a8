"""``--host-overhead``: what one call of each contender costs the CPU, on shapes whose GPU work
is short enough for that cost to matter (the grid's shortest training shape, the decoding
table's shortest cache).

On a GPU the calls of a batch are queued while the stream is held by ``torch.cuda._sleep``,
so no call waits for the GPU and the clock reads the host's work alone: Python, argument
checks, autograd, launches. The GPU time of one call (L2 flushed) is measured beside it: a
case whose host time exceeds its GPU time is host-bound. On a CPU the two are the same thing
and only the host time is recorded.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from . import peers, timing
from .contenders import Contender
from .grid import IDENTITY, DecodeSpec, GridSpec, Row
from .progress import Progress
from .runner import _decode_inputs, _error_text, _Unsupported, grid_inputs, mode_call

#: Clock cycles per second assumed when sizing the GPU hold (above any current SM clock, so
#: the hold lasts at least as long as asked).
_CYCLES_PER_S = 2.0e9
_MAX_HOLD_S = 2.0


def batch_sizes(device: torch.device) -> tuple[int, int]:
    """Calls per timed batch and batches per row: fewer on a CPU, whose calls are slower."""
    return (40, 7) if device.type == "cuda" else (10, 3)


@dataclass
class HostRow(Row):
    host_us: float | None = None
    host_us_min: float | None = None
    gpu_us: float | None = None
    host_vs_sdpa_flash: float | None = None
    notes: list[str] = field(default_factory=list)


class WaitedForGpu(RuntimeError):
    """A timed batch outlasted the GPU hold: its calls synchronize with the GPU (or their host
    time exceeded the hold), so the clock read GPU time too and is not reported."""


def host_us(fn, device: torch.device, calls: int, batches: int) -> tuple[float, float]:
    """``(median, min)`` over ``batches`` of the host microseconds per call of ``calls``
    calls in a row (the GPU held meanwhile). Raises `WaitedForGpu` where the hold ran out
    before a batch's calls were all queued."""
    cuda = device.type == "cuda"

    def batch(hold_s: float) -> float:
        held = None
        if cuda:
            torch.cuda.synchronize(device)
            if hold_s:
                torch.cuda._sleep(int(hold_s * _CYCLES_PER_S))
                held = torch.cuda.Event()
                held.record()  # completes when the hold does: queued calls run after it
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t = (time.perf_counter() - t0) / calls
        if held is not None and held.query():
            raise WaitedForGpu(
                f"the GPU hold of {hold_s:.3g} s ran out before {calls} calls were queued "
                f"({t * 1e6:.0f} us each): the call synchronizes with the GPU, so its host "
                "time cannot be told apart from GPU time")
        if cuda:
            torch.cuda.synchronize(device)
        return t

    # Unheld, a batch's time bounds its host time: hold three times that, so the queue
    # never drains while the host works.
    hold = min(_MAX_HOLD_S, 3 * calls * batch(0.0)) if cuda else 0.0
    times = [batch(hold) * 1e6 for _ in range(batches)]
    return statistics.median(times), min(times)


def run_host(gspec: GridSpec, dspec: DecodeSpec, contenders: list[Contender],
             device: torch.device, progress: Progress, seed: int = 0) -> list[HostRow]:
    calls, batches = batch_sizes(device)
    cases = [(shape, mode) for shape in gspec.shapes() for mode in gspec.modes]
    cases += [(cache_len, "decode") for cache_len in sorted(dspec.cache_lens)]
    timing.prepare(device)
    progress.start(len(cases) * len(contenders))
    rows: list[HostRow] = []
    for case, mode in cases:
        if mode == "decode":
            inputs = _decode_inputs(dspec, case, device, seed)
        else:
            inputs = grid_inputs(case, gspec.layout, device, seed)
        for contender in contenders:
            progress.step(f"{contender.name} {mode} host")
            if mode == "decode":
                row = HostRow(contender.name, contender.kind, mode, dspec.dtype, dspec.batch,
                              dspec.heads_q, dspec.heads_kv, dspec.seqlen_q, case,
                              dspec.head_dim, True)
            else:
                row = HostRow(contender.name, contender.kind, mode, case.dtype, case.batch,
                              case.heads, case.heads, case.seqlen, case.seqlen, case.head_dim,
                              case.causal)
            try:
                with torch.no_grad() if mode == "decode" else torch.enable_grad(), \
                        contender.context():
                    fn = _call(contender, mode, inputs, case)
                    fn()
                    row.host_us, row.host_us_min = host_us(fn, device, calls, batches)
                    if device.type == "cuda":
                        row.gpu_us = timing.measure(fn, device, warmup_ms=10, rep_ms=50,
                                                    first_call_done=True).median_ms * 1e3
                row.status = "ok"
            except (peers.PeerError, _Unsupported) as e:
                row.status, row.error = "unsupported", str(e)
            except Exception as e:  # a failing contender is a row, not the end of the run
                row.status = "oom" if timing.is_oom(e) else "error"
                row.error = _error_text(e)
                timing.release_memory(device, collect=True)
            rows.append(row)
        del inputs
        timing.release_memory(device)
    progress.finish()
    def problem(r: HostRow) -> tuple:
        return tuple(getattr(r, f) for f in IDENTITY if f != "backend")

    base = {problem(r): r for r in rows if r.backend == peers.BASELINE and r.status == "ok"}
    for r in rows:
        b = base.get(problem(r))
        if r.status == "ok" and b is not None:
            r.host_vs_sdpa_flash = r.host_us / b.host_us
    return rows


def _call(contender: Contender, mode: str, inputs, case):
    from ..spec import AttentionProblem

    if mode == "decode":
        q, k, v, seqlens = inputs
        problem = AttentionProblem.from_tensors(q, k, v, causal=True, seqlens_k=seqlens,
                                                needs_grad=False)
        reasons = contender.reasons(problem)
        if reasons:
            raise _Unsupported("; ".join(reasons))
        if contender.kind == "sdpa" and q.shape[2] != 1:
            raise _Unsupported("bottom-right causal with Sq > 1 needs an explicit mask")
        return lambda: contender.decode(q, k, v, seqlens)
    leaves, views, dout = inputs
    problem = AttentionProblem.from_tensors(*views, causal=case.causal,
                                            needs_grad=mode != "fwd")
    reasons = contender.reasons(problem)
    if reasons:
        raise _Unsupported("; ".join(reasons))
    return mode_call(contender.attention, mode, leaves, views, dout, case.causal)
