"""``attnkit bench``: every installed backend beside PyTorch SDPA's kernels, on the same inputs.

    from attnkit.bench import run_benchmark
    result = run_benchmark(seqlens=[1024, 4096], head_dims=[128], out="results/h100")

`run_benchmark` returns a JSON-ready dict (every figure, plus the device, clocks, versions,
source commit and date) and with ``out`` writes ``bench.json`` / ``bench.txt`` / ``bench.png``
there (``decode.*``, ``graphs.*``, ``host.*``, ``sustained.*`` for the other modes). Modules:
`grid` (the standard grid, cells, FLOP and byte formulas), `timing` (medians, peak memory),
`peers` (SDPA kernels), `contenders`, `runner` (the loops), `graphs` (CUDA-graph capture),
`host` (host overhead), `sustained` (long runs with clocks and power), `varlen` (packed
variable-length batches), `model_step` (a transformers model's training and decode step with
attn_implementation "attnkit" beside "sdpa"), `tables`, `plot`,
`report` (JSON, README tables), `compare` (ratios between runs), `cache` (labelled runs),
`abtest` (environment A/B in subprocesses), `environment`, `progress`, `cli`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import contenders as _contenders
from . import plot as _plot
from . import report, runner, tables
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
    standard_shape,
)
from .progress import Progress

__all__ = ["DecodeSpec", "GridSpec", "attention_flops", "kv_bytes", "resolve_device",
           "run_benchmark", "save", "standard_shape"]

FORMULAS = {
    "flops": "4*B*H*Sq*Sk*D, halved for causal; bwd = 2.5x fwd, fwd_bwd = 3.5x fwd",
    "tflops": "flops / median time",
    "bytes": "2*B*Hkv*Sk*D*itemsize (K plus V of the cache)",
    "tbps": "bytes / median time",
    "mem_peak_bytes": "torch.cuda.max_memory_allocated during one fwd+bwd, minus what was "
                      "allocated before the inputs were made",
    "mem_extra_bytes": "the same peak minus what was allocated just before the call",
    "host_us": "host time per call: calls queued back to back while the GPU is held busy",
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


#: Narrower defaults of the host-overhead and sustained modes (the rest as the grid's).
HOST_DEFAULTS = {"modes": ("fwd", "fwd_bwd"), "causal": (True,)}
SUSTAINED_DEFAULTS = {"seqlens": (4096,), "head_dims": (128,), "causal": (False,),
                      "modes": ("fwd",)}


def run_benchmark(
    *,
    device: str | torch.device = "auto",
    decode: bool = False,
    graphs: bool = False,
    host_overhead: bool = False,
    sustained_s: float | None = None,
    varlen: bool = False,
    paged: bool = False,
    page_sizes: Sequence[int] | None = None,
    mixes: Sequence[str] | None = None,
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
    dropout_p: float | None = None,
    seed: int = 0,
    progress: bool | Progress = True,
    out: str | Path | None = None,
    plot: bool = True,
) -> dict:
    """Time every chosen backend on the grid, or in one of the other modes:

    - ``decode``: the decoding table (one query against KV caches, TB/s);
    - ``graphs``: the same, each step also timed as the replay of a CUDA graph;
    - ``host_overhead``: host time per call on the grid's shortest shape (its largest head
      dim, causal, fwd and fwd_bwd unless narrowed) and the decoding table's shortest cache;
    - ``sustained_s``: each contender back to back for that many seconds per shape (default
      S=4096, D=128, non-causal, fwd), with clocks and power read meanwhile;
    - ``varlen``: packed variable-length batches (`attnkit.bench.varlen`): total tokens 16k
      and 64k (``tokens`` picks one), D 64 and 128, bf16 (the first of ``dtypes``), causal
      and not, length ``mixes`` "equal" and "long-tailed", fwd and fwd_bwd; each backend
      that declares varlen beside its own dense call, SDPA on nested tensors and SDPA-flash
      on the padded batch.
    - ``decode`` with ``paged``: decoding over paged KV caches (`attnkit.bench.paged`): each
      backend that declares paged on the decoding table's shapes, contiguous caches beside
      page pools of ``page_sizes`` (default 16 and 64) with shuffled pages.

    ``dropout_p`` runs the grid (or ``varlen``'s table) with attention dropout (attnkit
    backends that declare it and the SDPA peers; the output check against SDPA is left out,
    the masks differ).

    Defaults come from the device (`default_grid` / `default_decode`): FlashAttention's grid
    on CUDA, a small fp32 grid on a CPU. ``backends`` names attnkit backends and SDPA peers
    (``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``, ``sdpa-math``); by default every
    available one except ``reference``. A cell that fails is recorded (status "error", "oom",
    "unsupported" or "skipped", with the message) and the run goes on.
    """
    if sum(map(bool, (decode or graphs, host_overhead, sustained_s is not None,
                      varlen))) > 1:
        raise ValueError("choose one of decode/graphs, host overhead, sustained and varlen")
    if sustained_s is not None and not sustained_s > 0:
        raise ValueError(f"the sustained time must be positive, got {sustained_s}")
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
    if graphs and dev.type != "cuda":
        raise ValueError(f"--graphs captures CUDA graphs: it needs a CUDA device, not {dev}")
    if not isinstance(progress, Progress):
        progress = Progress(enabled=bool(progress))
    t0 = time.perf_counter()
    env = environment(dev)
    grid_values = dict(seqlens=seqlens, head_dims=head_dims, causal=causal, dtypes=dtypes,
                       modes=modes, tokens=tokens, model_dim=model_dim, layout=layout,
                       warmup_ms=warmup_ms, rep_ms=rep_ms, slow_call_s=slow_call_s,
                       time_limit_s=time_limit_s, dropout_p=dropout_p)
    gspec = default_grid(dev.type)
    if host_overhead:
        gspec = dataclasses.replace(gspec, seqlens=(min(gspec.seqlens),),
                                    head_dims=(max(gspec.head_dims),),
                                    dtypes=gspec.dtypes[-1:], **HOST_DEFAULTS)
    elif sustained_s is not None:
        gspec = dataclasses.replace(gspec, **SUSTAINED_DEFAULTS)
        if dev.type != "cuda":
            gspec = dataclasses.replace(gspec, seqlens=(min(gspec.seqlens),), head_dims=(64,))
    gspec = _override(gspec, **grid_values)
    dspec = _override(default_decode(dev.type), cache_lens=cache_lens, warmup_ms=warmup_ms,
                      rep_ms=rep_ms, time_limit_s=time_limit_s, graphs=graphs or None)
    if host_overhead and cache_lens is None:
        dspec = dataclasses.replace(dspec, cache_lens=(min(dspec.cache_lens),))
    if dtypes is not None:
        dspec = dataclasses.replace(dspec, dtype=dtypes[0])
    names = list(backends) if backends else None
    if paged and not decode:
        raise ValueError("--paged is a variant of the decoding table: use --decode --paged")
    if paged:
        from . import paged as _paged

        kind = "paged"
        pspec = _override(_paged.default_paged(dev.type), cache_lens=cache_lens,
                          page_sizes=page_sizes, warmup_ms=warmup_ms, rep_ms=rep_ms,
                          time_limit_s=time_limit_s,
                          dtype=None if dtypes is None else dtypes[0])
        chosen, left_out = _paged.select(dev, names)
        cells = [c.as_dict() for c in _paged.run_paged(pspec, chosen, dev, progress, seed)]
        config = {"device": str(dev), "paged": dataclasses.asdict(pspec), "seed": seed}
    elif varlen:
        from . import varlen as _varlen

        kind = "varlen"
        vspec = _override(_varlen.default_varlen(dev.type), head_dims=head_dims, causal=causal,
                          modes=modes, model_dim=model_dim, warmup_ms=warmup_ms, rep_ms=rep_ms,
                          time_limit_s=time_limit_s, mixes=mixes,
                          tokens=None if tokens is None else [tokens],
                          dtype=None if dtypes is None else dtypes[0], dropout_p=dropout_p)
        bad = [m for m in vspec.mixes if m not in _varlen.MIXES]
        if bad:
            raise ValueError(f"unknown length mix(es) {bad}; choose from {list(_varlen.MIXES)}")
        chosen, left_out = _varlen.select(dev, DTYPES[vspec.dtype], vspec.head_dims[0], names)
        cells = [c.as_dict() for c in _varlen.run_varlen(vspec, chosen, dev, progress, seed)]
        config = {"device": str(dev), "varlen": vspec.as_dict(), "seed": seed}
    elif decode or graphs:
        kind = "graphs" if graphs else "decode"
        chosen, left_out = _contenders.select(dev, DTYPES[dspec.dtype], dspec.head_dim, names)
        cells = [c.as_dict() for c in runner.run_decode(dspec, chosen, dev, progress, seed)]
        config = {"device": str(dev), "decode": dspec.as_dict(), "seed": seed}
    else:
        chosen, left_out = _contenders.select(dev, DTYPES[gspec.dtypes[0]], gspec.head_dims[0],
                                              names)
        config = {"device": str(dev), "grid": gspec.as_dict(), "seed": seed}
        if host_overhead:
            from .host import batch_sizes, run_host

            kind = "host"
            cells = [r.as_dict() for r in run_host(gspec, dspec, chosen, dev, progress, seed)]
            calls, batches = batch_sizes(dev)
            config.update(decode=dspec.as_dict(), host={"calls": calls, "batches": batches})
        elif sustained_s is not None:
            from .sustained import run_sustained

            kind = "sustained"
            cells = run_sustained(gspec, chosen, dev, sustained_s, progress, seed)
            config["sustained_s"] = sustained_s
        else:
            kind = "grid"
            cells = [c.as_dict() for c in runner.run_grid(gspec, chosen, dev, progress, seed)]
    result = {
        "schema": report.SCHEMA,
        "kind": kind,
        "environment": env,
        "config": config,
        "formulas": FORMULAS,
        "contenders": [{"name": c.name, "kind": c.kind} for c in chosen],
        "left_out": left_out,
        "cells": cells,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    if dev.type == "cuda":
        result["environment"]["clocks_after"] = device_info(dev).get("clocks")
    if out is not None:
        result["files"] = save(result, out, plot=plot)
    return result


def save(result: dict, out: str | Path, plot: bool = True) -> dict:
    """Write ``result`` as ``OUT/STEM.json``, its table as ``OUT/STEM.txt`` and, for the grid
    and decode kinds, ``OUT/STEM.png`` (``STEM`` is ``bench`` for the grid, else the kind's
    name: `report.STEMS`).

    Returns the paths written and, if the plot could not be drawn (e.g. no matplotlib), the
    reason under ``"plot_error"``: the JSON is written first and always.
    """
    out = Path(out)
    stem = report.STEMS[result["kind"]]
    files: dict = {"json": str(out / f"{stem}.json"), "table": str(out / f"{stem}.txt")}
    # Where this machine wrote the files is not the result's: the JSON holds no paths.
    result.pop("files", None)
    report.write_json(result, out / f"{stem}.json")
    result["files"] = files
    (out / f"{stem}.txt").write_text(tables.table(result) + "\n" + tables.summary(result)
                                     + "\n")
    if plot and result["kind"] in _plot.PLOTTED:
        try:
            files["png"] = str(_plot.plot(result, out / f"{stem}.png"))
        except Exception as e:
            files["plot_error"] = f"{type(e).__name__}: {e}"
        report.write_json(result, out / f"{stem}.json")
    return files
