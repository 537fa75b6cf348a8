"""``attnkit bench``: every installed backend beside PyTorch SDPA's kernels, on the same inputs.

    from attnkit.bench import run_benchmark
    result = run_benchmark(seqlens=[1024, 4096], head_dims=[128], out="benchmarks/h100")

`run_benchmark` returns a JSON-ready dict (every figure, plus the device, clocks, versions and
date) and with ``out`` writes ``bench.json`` / ``bench.png`` (``decode.json`` / ``decode.png``
with ``decode=True``) there. Modules: `grid` (cells, FLOP and byte formulas), `timing`
(medians, peak memory), `peers` (SDPA kernels), `contenders`, `runner` (the loops),
`report` (table, JSON, plot), `environment`, `progress`, `cli`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import contenders as _contenders
from . import report, runner
from .environment import device_info, environment
from .grid import (
    DTYPES,
    MODES,
    DecodeSpec,
    GridSpec,
    attention_flops,
    default_decode,
    default_grid,
    kv_bytes,
)
from .progress import Progress

__all__ = ["DecodeSpec", "GridSpec", "attention_flops", "kv_bytes", "resolve_device",
           "run_benchmark", "save"]

FORMULAS = {
    "flops": "4*B*H*Sq*Sk*D, halved for causal; bwd = 2.5x fwd, fwd_bwd = 3.5x fwd",
    "tflops": "flops / median time",
    "bytes": "2*B*Hkv*Sk*D*itemsize (K plus V of the cache)",
    "tbps": "bytes / median time",
    "mem_peak_bytes": "torch.cuda.max_memory_allocated during one fwd+bwd, minus what was "
                      "allocated before the inputs were made",
    "mem_extra_bytes": "the same peak minus what was allocated just before the call",
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no CUDA device")
    return device


def _override(spec, **values):
    return dataclasses.replace(spec, **{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in values.items() if v is not None})


def run_benchmark(
    *,
    device: str | torch.device = "auto",
    decode: bool = False,
    seqlens: Sequence[int] | None = None,
    head_dims: Sequence[int] | None = None,
    causal: Sequence[bool] | None = None,
    dtypes: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    backends: Sequence[str] | None = None,
    tokens: int | None = None,
    model_dim: int | None = None,
    layout: str | None = None,
    cache_lens: Sequence[int] | None = None,
    warmup_ms: float | None = None,
    rep_ms: float | None = None,
    slow_call_s: float | None = None,
    time_limit_s: float | None = None,
    seed: int = 0,
    progress: bool | Progress = True,
    out: str | Path | None = None,
    plot: bool = True,
) -> dict:
    """Time every chosen backend on the grid (or the decoding table with ``decode=True``).

    Defaults come from the device (`default_grid` / `default_decode`): FlashAttention's grid
    on CUDA, a small fp32 grid on a CPU. ``backends`` names attnkit backends and SDPA peers
    (``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``, ``sdpa-math``); by default every
    available one except ``reference``. A cell that fails is recorded (status "error", "oom",
    "unsupported" or "skipped", with the message) and the run goes on.
    """
    dev = resolve_device(device)
    if dtypes is not None:
        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            raise ValueError(f"unknown dtype(s) {bad}; choose from {sorted(DTYPES)}")
    if modes is not None:
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    if layout is not None and layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    if not isinstance(progress, Progress):
        progress = Progress(enabled=bool(progress))
    t0 = time.perf_counter()
    env = environment(dev)
    if decode:
        dspec = _override(default_decode(dev.type), cache_lens=cache_lens,
                          warmup_ms=warmup_ms, rep_ms=rep_ms, time_limit_s=time_limit_s)
        if dtypes is not None:
            dspec = dataclasses.replace(dspec, dtype=dtypes[0])
        chosen, left_out = _contenders.select(dev, DTYPES[dspec.dtype], dspec.head_dim,
                                              list(backends) if backends else None)
        cells = runner.run_decode(dspec, chosen, dev, progress, seed)
        config = {"device": str(dev), "decode": dspec.as_dict(), "seed": seed}
    else:
        gspec = _override(default_grid(dev.type), seqlens=seqlens, head_dims=head_dims,
                          causal=causal, dtypes=dtypes, modes=modes, tokens=tokens,
                          model_dim=model_dim, layout=layout, warmup_ms=warmup_ms,
                          rep_ms=rep_ms, slow_call_s=slow_call_s, time_limit_s=time_limit_s)
        chosen, left_out = _contenders.select(dev, DTYPES[gspec.dtypes[0]], gspec.head_dims[0],
                                              list(backends) if backends else None)
        cells = runner.run_grid(gspec, chosen, dev, progress, seed)
        config = {"device": str(dev), "grid": gspec.as_dict(), "seed": seed}
    result = {
        "schema": report.SCHEMA,
        "kind": "decode" if decode else "grid",
        "environment": env,
        "config": config,
        "formulas": FORMULAS,
        "contenders": [{"name": c.name, "kind": c.kind} for c in chosen],
        "left_out": left_out,
        "cells": [c.as_dict() for c in cells],
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    if dev.type == "cuda":
        result["environment"]["clocks_after"] = device_info(dev).get("clocks")
    if out is not None:
        result["files"] = save(result, out, plot=plot)
    return result


def save(result: dict, out: str | Path, plot: bool = True) -> dict:
    """Write ``result`` as ``OUT/bench.json``, ``OUT/bench.png`` and the table as
    ``OUT/bench.txt`` (``decode.*`` for decode).

    Returns the paths written and, if the plot could not be drawn (e.g. no matplotlib), the
    reason under ``"plot_error"``: the JSON is written first and always.
    """
    out = Path(out)
    stem = "decode" if result["kind"] == "decode" else "bench"
    files: dict = {"json": str(out / f"{stem}.json"), "table": str(out / f"{stem}.txt")}
    result["files"] = files
    report.write_json(result, out / f"{stem}.json")
    (out / f"{stem}.txt").write_text(report.table(result) + "\n" + report.summary(result) + "\n")
    if plot:
        try:
            files["png"] = str(report.plot(result, out / f"{stem}.png"))
        except Exception as e:
            files["plot_error"] = f"{type(e).__name__}: {e}"
        report.write_json(result, out / f"{stem}.json")
    return files
