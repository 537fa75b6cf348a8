"""The measurement loops: every contender on every cell, recording failures instead of raising.

The grid is shape-major: on each shape's inputs (drawn from a generator seeded per shape, so
every contender sees the same numbers) every contender runs its modes before the next shape,
so peers are timed seconds apart, in the same state of the GPU. Run backend-major (each
backend through the whole grid in turn), triton's fwd+bwd cells at causal S=16k read 3-17%
slower than its fwd and bwd cells summed, on an H100 and an H200; shape-major, -7..+4%
(docs/tuning.md; the mechanism, e.g. clocks or temperature, was not measured). A backend that
corrupts the CUDA context costs every cell after it, recorded as skipped with the reason.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from ..spec import AttentionProblem
from . import graphs, peers, timing
from .contenders import Contender
from .grid import DTYPES, Cell, DecodeSpec, GridSpec, Shape
from .progress import Progress

_MAX_ERROR_CHARS = 600


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."


class _Session:
    """State shared by the cells of one run: device, and whether CUDA is still usable."""

    def __init__(self, device: torch.device, progress: Progress):
        self.device = device
        self.progress = progress
        self.poisoned: str | None = None

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def run(self, cell: Cell, body: Callable[[Cell], None]) -> Cell:
        """Run ``body(cell)``; whatever it raises becomes the cell's status and error."""
        if self.poisoned is not None:
            cell.status, cell.error = "skipped", self.poisoned
            return cell
        failed = True
        try:
            body(cell)
            cell.status = "ok"
            failed = False
        except peers.PeerError as e:
            cell.status, cell.error = "unsupported", str(e)
        except _Unsupported as e:
            cell.status, cell.error = "unsupported", str(e)
        except Exception as e:  # record and go on: one failing cell must not end the run
            if timing.is_oom(e):
                cell.status, cell.error = "oom", _error_text(e).splitlines()[0]
            else:
                cell.status, cell.error = "error", _error_text(e)
                if self.device.type == "cuda" and timing.is_sticky_cuda_error(e):
                    self.poisoned = (f"not run: the CUDA context was left unusable by "
                                     f"{cell.backend} ({cell.error.splitlines()[0]})")
        if failed and self.poisoned is None:
            try:
                timing.release_memory(self.device, collect=True)
            except Exception:  # the context may refuse even this
                pass
        return cell


class _Unsupported(Exception):
    """The backend declares it cannot compute this problem."""


def grid_inputs(shape: Shape, layout: str, device: torch.device, seed: int):
    """q, k, v leaves (requires_grad) in ``layout``, their (B, H, S, D) views, and dout."""
    g = torch.Generator(device=device)
    # A per-shape seed that is the same in every process (str hashes are salted).
    g.manual_seed((seed * 1_000_003 + shape.batch * 7919 + shape.heads * 131 + shape.seqlen * 17
                   + shape.head_dim + sorted(DTYPES).index(shape.dtype)) % (1 << 31))
    dtype = DTYPES[shape.dtype]
    B, H, S, D = shape.batch, shape.heads, shape.seqlen, shape.head_dim
    dims = (B, S, H, D) if layout == "bshd" else (B, H, S, D)
    leaves = [torch.randn(dims, generator=g, device=device, dtype=dtype).requires_grad_(True)
              for _ in range(3)]
    views = [t.transpose(1, 2) if layout == "bshd" else t for t in leaves]
    dout_store = torch.randn(dims, generator=g, device=device, dtype=dtype)
    dout = dout_store.transpose(1, 2) if layout == "bshd" else dout_store
    return leaves, views, dout


def _check_output(cell: Cell, out: torch.Tensor, ref: torch.Tensor | None) -> None:
    """Record how far the output is from SDPA's, and say so if it is not finite (a fast wrong
    answer should not pass for a fast one)."""
    out = out.detach()
    if not torch.isfinite(out).all():
        cell.notes.append("output holds NaN or inf")
    if ref is not None:
        diff = float((out.float() - ref.float()).abs().max())
        cell.max_abs_diff_vs_sdpa = diff if diff == diff else None


def _sdpa_reference(views, causal: bool) -> torch.Tensor | None:
    """SDPA with its own kernel choice, for a sanity check of every contender's output."""
    q, k, v = views
    try:
        with torch.no_grad():
            return peers.sdpa(q, k, v, causal=causal, gqa=q.shape[1] != k.shape[1])
    except Exception:
        return None


def mode_call(attention: Callable, mode: str, leaves, views, dout, causal: bool):
    """The call a grid cell times: ``fwd`` the forward without grad, ``bwd`` the backward of
    one forward made here (kept), ``fwd_bwd`` both; ``attention(q, k, v, causal=...)``."""
    q, k, v = views
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return attention(q, k, v, causal=causal)
    elif mode == "bwd":
        out = attention(q, k, v, causal=causal)

        def fn():
            return torch.autograd.grad(out, leaves, dout, retain_graph=True)
    else:
        def fn():
            return torch.autograd.grad(attention(q, k, v, causal=causal), leaves, dout)
    return fn


def _grid_cell(session: _Session, spec: GridSpec, contender: Contender, shape: Shape,
               mode: str, leaves, views, dout, ref, baseline: int) -> Cell:
    cell = Cell(contender.name, contender.kind, mode, shape.dtype, shape.batch, shape.heads,
                shape.heads, shape.seqlen, shape.seqlen, shape.head_dim, shape.causal,
                flops=shape.flops(mode))
    q, k, v = views

    def body(cell: Cell) -> None:
        problem = AttentionProblem.from_tensors(q, k, v, causal=shape.causal,
                                                needs_grad=mode != "fwd",
                                                dropout_p=spec.dropout_p)
        reasons = contender.reasons(problem)
        if reasons:
            raise _Unsupported("; ".join(reasons))
        with contender.context():
            attention = functools.partial(contender.attention, dropout_p=spec.dropout_p)
            fn = mode_call(attention, mode, leaves, views, dout, shape.causal)
            if mode == "fwd":
                _check_output(cell, fn(), ref)
            elif mode == "fwd_bwd":
                # Measured on the second call: the first may autotune (extra buffers).
                fn()
                mem = timing.peak_memory(fn, session.device, baseline)
                if mem is not None:
                    cell.mem_peak_bytes, cell.mem_extra_bytes = mem
            t = timing.time_cell(cell, fn, session.device, spec, first_call_done=mode != "bwd")
        cell.set_rates(t.median_ms)

    return session.run(cell, body)


def _blank(contender: Contender, shape: Shape, mode: str) -> Cell:
    return Cell(contender.name, contender.kind, mode, shape.dtype, shape.batch, shape.heads,
                shape.heads, shape.seqlen, shape.seqlen, shape.head_dim, shape.causal,
                flops=shape.flops(mode))


def run_grid(spec: GridSpec, contenders: list[Contender], device: torch.device,
             progress: Progress, seed: int = 0) -> list[Cell]:
    session = _Session(device, progress)
    shapes = spec.shapes()
    timing.prepare(device)
    t0 = time.perf_counter()
    progress.start(len(contenders) * len(shapes) * len(spec.modes))
    cells: list[Cell] = []
    # (contender, dtype, D, causal, mode) -> why larger seqlens are not run: a call was too slow.
    too_slow: dict[tuple, str] = {}
    for shape in shapes:
        todo: list[tuple[Contender, str, str]] = []  # (contender, mode, progress label)
        for contender in contenders:
            label = (f"{contender.name} {shape.dtype} D={shape.head_dim} S={shape.seqlen}"
                     f"{' causal' if shape.causal else ''}")
            for mode in spec.modes:
                why = too_slow.get((contender.name, shape.dtype, shape.head_dim, shape.causal,
                                    mode))
                if spec.time_limit_s is not None and time.perf_counter() - t0 > spec.time_limit_s:
                    why = f"not run: the time limit of {spec.time_limit_s:g}s was reached"
                why = why or session.poisoned
                if why:
                    cell = _blank(contender, shape, mode)
                    cell.error = why
                    progress.step(f"{label} {mode} (skipped)")
                    cells.append(cell)
                else:
                    todo.append((contender, mode, label))
        if not todo:
            continue
        baseline = session.allocated()
        try:
            leaves, views, dout = grid_inputs(shape, spec.layout, device, seed)
        except Exception as e:
            for contender, mode, label in todo:
                progress.step(f"{label} {mode}")
                cell = _blank(contender, shape, mode)
                cell.status = "oom" if timing.is_oom(e) else "error"
                cell.error = "making the inputs failed: " + _error_text(e)
                cells.append(cell)
            timing.release_memory(device, collect=True)
            continue
        held = session.allocated()
        ref = (_sdpa_reference(views, shape.causal)  # under dropout the masks differ
               if not spec.dropout_p and any(mode == "fwd" for _, mode, _ in todo) else None)
        baseline += session.allocated() - held  # a cell's peak counts inputs, not ref
        for contender, mode, label in todo:
            progress.step(f"{label} {mode}")
            cell = _grid_cell(session, spec, contender, shape, mode, leaves, views, dout,
                              ref if mode == "fwd" else None, baseline)
            cells.append(cell)
            if cell.ms is not None and cell.ms > spec.slow_call_s * 1e3:
                too_slow[(contender.name, shape.dtype, shape.head_dim, shape.causal, mode)] = (
                    f"not run: a call at seqlen {shape.seqlen} already took "
                    f"{cell.ms:.0f} ms (> slow_call_s={spec.slow_call_s:g}s)")
        del leaves, views, dout, ref
        if session.poisoned is None:
            timing.release_memory(device)
    progress.finish()
    add_ratios(cells)
    return cells


def _decode_inputs(spec: DecodeSpec, cache_len: int, device: torch.device, seed: int):
    g = torch.Generator(device=device)
    g.manual_seed(seed + cache_len)
    dtype = DTYPES[spec.dtype]
    q = torch.randn(spec.batch, spec.heads_q, spec.seqlen_q, spec.head_dim, generator=g,
                    device=device, dtype=dtype)
    k, v = (torch.randn(spec.batch, spec.heads_kv, cache_len, spec.head_dim, generator=g,
                        device=device, dtype=dtype) for _ in range(2))
    seqlens = torch.full((spec.batch,), cache_len, dtype=torch.int32, device=device)
    return q, k, v, seqlens


def _decode_blank(spec: DecodeSpec, contender: Contender, cache_len: int, mode: str) -> Cell:
    return Cell(contender.name, contender.kind, mode, spec.dtype, spec.batch, spec.heads_q,
                spec.heads_kv, spec.seqlen_q, cache_len, spec.head_dim, True,
                bytes=spec.bytes(cache_len))


def _decode_cell(session: _Session, spec: DecodeSpec, contender: Contender, cache_len: int,
                 inputs, ref, mode: str = "decode") -> Cell:
    """One decoding step timed as an eager call (``decode``) or as the replay of a CUDA graph
    that captured it (``decode_graph``)."""
    q, k, v, seqlens = inputs
    cell = _decode_blank(spec, contender, cache_len, mode)

    def body(cell: Cell) -> None:
        problem = AttentionProblem.from_tensors(q, k, v, causal=True, seqlens_k=seqlens,
                                                needs_grad=False)
        if contender.reasons(problem):
            raise _Unsupported("; ".join(contender.reasons(problem)))
        kk, vv = k, v
        if contender.kind == "sdpa" and spec.seqlen_q != 1:
            raise _Unsupported("bottom-right causal with Sq > 1 needs an explicit mask, "
                               "which SDPA's fused kernels do not take")
        if contender.kind == "sdpa" and spec.heads_q != spec.heads_kv:
            try:
                with torch.no_grad(), contender.context():
                    contender.decode(q, kk, vv, seqlens)
            except Exception as e:
                if timing.is_oom(e):
                    raise
                # Same logical problem with K/V materialized per query head, outside the
                # timed calls; bytes (and TB/s) stay those of the logical Hkv-head cache.
                group = spec.heads_q // spec.heads_kv
                kk, vv = (t.repeat_interleave(group, dim=1) for t in (k, v))
                cell.notes.append("enable_gqa refused, K/V expanded to Hq heads before "
                                  f"timing ({str(e).splitlines()[0][:200]})")
        with torch.no_grad(), contender.context():
            def fn():
                return contender.decode(q, kk, vv, seqlens)

            out = fn()
            if mode == "decode_graph":
                graph, graph_out = graphs.capture(fn, session.device)
                graph.replay()
                if not torch.equal(graph_out, out):
                    cell.notes.append("the graph's replay differs from the eager call")
                out, fn = graph_out, graph.replay
            _check_output(cell, out, ref)
            t = timing.time_cell(cell, fn, session.device, spec)
        cell.set_rates(t.median_ms)

    return session.run(cell, body)


def run_decode(spec: DecodeSpec, contenders: list[Contender], device: torch.device,
               progress: Progress, seed: int = 0) -> list[Cell]:
    if spec.graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; this run is on {device}")
    session = _Session(device, progress)
    timing.prepare(device)
    t0 = time.perf_counter()
    modes = ("decode", "decode_graph") if spec.graphs else ("decode",)
    progress.start(len(contenders) * len(spec.cache_lens) * len(modes))
    cells: list[Cell] = []
    for contender in contenders:
        for cache_len in sorted(spec.cache_lens):
            why = session.poisoned
            if spec.time_limit_s is not None and time.perf_counter() - t0 > spec.time_limit_s:
                why = f"not run: the time limit of {spec.time_limit_s:g}s was reached"
            inputs = None
            if why is None:
                try:
                    inputs = _decode_inputs(spec, cache_len, device, seed)
                except Exception as e:
                    why = "making the inputs failed: " + _error_text(e)
                    status = "oom" if timing.is_oom(e) else "error"
                    timing.release_memory(device, collect=True)
            ref = None
            if inputs is not None and spec.seqlen_q == 1:
                ref = _sdpa_reference(inputs[:3], causal=False)
            for mode in modes:
                progress.step(f"{contender.name} {mode} cache={cache_len}")
                if inputs is None:
                    cell = _decode_blank(spec, contender, cache_len, mode)
                    cell.error = why
                    if why.startswith("making"):
                        cell.status = status
                    cells.append(cell)
                else:
                    cells.append(_decode_cell(session, spec, contender, cache_len, inputs,
                                              ref, mode))
            del inputs, ref
    progress.finish()
    add_ratios(cells)
    return cells


def add_ratios(cells: list[Cell]) -> None:
    """Each cell's throughput over SDPA-flash's on the same problem, where both ran."""
    def key(c: Cell):
        return (c.mode, c.dtype, c.batch, c.heads_q, c.heads_kv, c.seqlen_q, c.seqlen_k,
                c.head_dim, c.causal)

    base = {key(c): c for c in cells if c.backend == peers.BASELINE and c.status == "ok"}
    for c in cells:
        b = base.get(key(c))
        if c.status != "ok" or b is None:
            continue
        if c.tflops is not None and b.tflops:
            c.ratio_vs_sdpa_flash = c.tflops / b.tflops
        elif c.tbps is not None and b.tbps:
            c.ratio_vs_sdpa_flash = c.tbps / b.tbps
