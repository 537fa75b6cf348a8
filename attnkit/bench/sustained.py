"""``--sustained SECONDS``: each contender back to back for seconds at a shape, with the SM
clock, power draw and temperature sampled by ``nvidia-smi`` meanwhile.

A grid cell lasts ~0.1 s, before a GPU at its power limit lowers its clock; run for seconds,
every contender draws the limit and the gap between two kernels can shrink or grow. The
segments run in order and then reversed (passes 0 and 1), so a drift of temperature shows as
a difference between passes rather than between contenders.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

from . import timing
from .contenders import Contender
from .environment import nvidia_smi
from .grid import Cell, GridSpec, tera_per_s
from .progress import Progress
from .runner import _Session, _Unsupported, add_ratios, grid_inputs, mode_call

_SAMPLED = ("clocks.sm", "power.draw", "temperature.gpu")
_NAMES = ("sm_mhz", "power_w", "temp_c")


class _Sampler(threading.Thread):
    """Polls nvidia-smi every ``period`` seconds, filing each sample under the label set when
    it was taken (None: not kept)."""

    def __init__(self, index: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.index, self.period = index, period
        self.label: str | None = None
        self.samples: dict[str, list[list[float]]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            label = self.label
            got = nvidia_smi(self.index, _SAMPLED)
            if label is not None and label == self.label and "error" not in got:
                try:
                    self.samples.setdefault(label, []).append([float(got[f]) for f in _SAMPLED])
                except ValueError:  # "[N/A]" on GPUs that do not report a field
                    pass
            self.done.wait(self.period)


def _segment(fn, device: torch.device, seconds: float) -> float:
    """Milliseconds per call of ``fn`` called back to back for ``seconds``."""
    cuda = device.type == "cuda"
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(8):
            fn()
        n += 8
        if cuda:  # keeps the host at most 8 calls ahead, so the clock above means GPU time
            torch.cuda.synchronize(device)
    if not cuda:
        return (time.perf_counter() - t0) * 1e3 / n
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / n


def run_sustained(spec: GridSpec, contenders: list[Contender], device: torch.device,
                  seconds: float, progress: Progress, seed: int = 0) -> list[dict]:
    """One cell per contender, shape and mode, its figures the mean of the two passes, each
    pass (with clock, power, temperature medians and how many samples) under ``passes``."""
    order = [(shape, mode, c) for shape in spec.shapes() for mode in spec.modes
             for c in contenders]
    session = _Session(device, progress)
    sampler = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if "error" not in nvidia_smi(index, _SAMPLED):
            sampler = _Sampler(index)
            sampler.start()
    cells = {}
    passes: dict[tuple, list[dict]] = {}
    progress.start(2 * len(order))
    try:
        for n, segments in enumerate((order, order[::-1])):
            for shape, mode, contender in segments:
                key = (shape, mode, contender.name)
                progress.step(f"pass {n}: {contender.name} {shape.dtype} D={shape.head_dim} "
                              f"S={shape.seqlen} {mode}")
                cell = Cell(contender.name, contender.kind, mode, shape.dtype, shape.batch,
                            shape.heads, shape.heads, shape.seqlen, shape.seqlen,
                            shape.head_dim, shape.causal, flops=shape.flops(mode))
                label = f"{n}:{contender.name}:{shape}:{mode}"

                def body(cell: Cell, shape=shape, mode=mode, contender=contender,
                         label=label) -> None:
                    from ..spec import AttentionProblem

                    leaves, views, dout = grid_inputs(shape, spec.layout, device, seed)
                    problem = AttentionProblem.from_tensors(*views, causal=shape.causal,
                                                            needs_grad=mode != "fwd")
                    if contender.reasons(problem):
                        raise _Unsupported("; ".join(contender.reasons(problem)))
                    with contender.context():
                        fn = mode_call(contender.attention, mode, leaves, views, dout,
                                       shape.causal)
                        if sampler is not None:
                            sampler.label = label
                        try:
                            cell.ms = _segment(fn, device, seconds)
                        finally:
                            if sampler is not None:
                                sampler.label = None

                session.run(cell, body)
                timing.release_memory(device)
                if cell.status != "ok":  # a pass that failed fails the cell
                    cells[key] = cell
                    continue
                samples = sampler.samples.get(label, []) if sampler is not None else []
                med = [statistics.median(s[i] for s in samples) if samples else None
                       for i in range(len(_SAMPLED))]
                passes.setdefault(key, []).append({
                    "pass": n, "ms": cell.ms, "tflops": tera_per_s(cell.flops, cell.ms),
                    **dict(zip(_NAMES, med)), "samples": len(samples)})
                cells.setdefault(key, cell)
    finally:
        if sampler is not None:
            sampler.done.set()
    progress.finish()
    out = []
    for key, cell in cells.items():
        mine = passes.get(key, [])
        if mine and cell.status == "ok":
            cell.ms = statistics.fmean(p["ms"] for p in mine)
            cell.set_rates(cell.ms)
            cell.reps = len(mine)
        out.append(cell)
    add_ratios(out)
    return [dict(c.as_dict(), passes=passes.get(k, [])) for k, c in zip(cells, out)]

