"""``attnkit bench --decode --paged``: decoding over paged KV caches beside contiguous ones.

Per cache length, every attnkit backend that declares ``paged`` reads the same keys and values
laid out two ways: contiguous ``(B, Hkv, L, D)`` caches, and page pools of each page size
whose pages are shuffled through the pool (a random permutation, as an engine's allocator
leaves them after a while). Calls, each on full caches with one query token:

- ``contiguous``: the backend's ``forward`` on the caches (kernel time: the problem built once);
- ``paged``: the backend's ``forward_paged`` on the pools (the same);
- ``contiguous-api`` / ``paged-api``: `attnkit.attention_with_kvcache` without and with
  ``block_table`` (``validate="device"``: no host synchronisation), what a caller pays;
- ``contiguous-api-append`` / ``paged-api-append``: the same calls appending one token per
  sequence (a decoding step in FlashAttention's style): the last cached key and value
  written again over themselves (fill levels one short), so every call reads the same keys.

TB/s is K+V bytes of the valid keys over the median time; ``ratio_vs_contiguous`` is a paged
call's throughput over the same backend's contiguous call of the same kind. ``host_us`` is the
host time per call with the GPU held busy (`attnkit.bench.host.host_us`): a call whose host
time exceeds its median time is bound by the host, not by its kernels.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from ..kvcache import attention_with_kvcache
from ..paged import paged_problem
from ..spec import AttentionProblem
from . import timing
from .contenders import Contender, select_declaring
from .grid import DTYPES, DecodeSpec, Rated, kv_bytes
from .host import WaitedForGpu, batch_sizes, host_us
from .progress import Progress
from .runner import _Session, _Unsupported

CALLS = ("contiguous", "paged", "contiguous-api", "paged-api", "contiguous-api-append",
         "paged-api-append")
#: (kind, suffix) of the tables: calls ``contiguous{suffix}`` and ``paged{suffix}``.
KINDS = (("kernel", ""), ("api", "-api"), ("api appending a token", "-api-append"))


@dataclass
class PagedSpec(DecodeSpec):
    """The decoding table's shape, with the page sizes to lay its caches out in."""

    cache_lens: tuple[int, ...] = (1024, 4096, 16384, 65536)
    page_sizes: tuple[int, ...] = (16, 64)


def default_paged(device: str) -> PagedSpec:
    """The issue's table on CUDA (B=16, Hq=32, Hkv=8, D=128, bf16, 1k..64k, pages of 16 and
    64); a tiny fp32 version on a CPU."""
    if device == "cuda":
        return PagedSpec()
    return PagedSpec(cache_lens=(256, 1024), batch=2, heads_q=4, heads_kv=2, head_dim=32,
                     dtype="fp32", warmup_ms=0.0, rep_ms=20.0, max_reps=10)


@dataclass
class PagedCell(Rated):
    call: str = ""
    page_size: int = 0
    ratio_vs_contiguous: float | None = None
    max_abs_diff_vs_contiguous: float | None = None
    host_us: float | None = None


def select(device: torch.device, names: list[str] | None):
    """attnkit backends that declare paged (reference only when named)."""
    return select_declaring(device, names, "paged")


def shuffled_pools(k: torch.Tensor, v: torch.Tensor, page_size: int, gen: torch.Generator):
    """``(k_pages, v_pages, block_table)``: the caches' pages placed at a random permutation
    of a pool of exactly ``B * L / page_size`` pages."""
    B, H, L, D = k.shape
    n = L // page_size
    perm = torch.randperm(B * n, generator=gen).to(k.device)
    pools = []
    for t in (k, v):
        logical = t.view(B, H, n, page_size, D).transpose(1, 2).reshape(B * n, H, page_size, D)
        pool = torch.empty_like(logical)
        pool[perm] = logical
        pools.append(pool)
    return pools[0], pools[1], perm.to(torch.int32).view(B, n).contiguous()


def _blank(spec, contender, cache_len, call, page_size):
    return PagedCell(contender.name, contender.kind, "decode", spec.dtype, spec.batch,
                     spec.heads_q, spec.heads_kv, spec.seqlen_q, cache_len, spec.head_dim, True,
                     call=call, page_size=page_size,
                     bytes=kv_bytes(spec.batch, spec.heads_kv, cache_len, spec.head_dim,
                                    DTYPES[spec.dtype]))


def run_paged(spec: PagedSpec, contenders: list[Contender], device: torch.device,
              progress: Progress, seed: int = 0) -> list[PagedCell]:
    session = _Session(device, progress)
    timing.prepare(device)
    progress.start(len(contenders) * len(spec.cache_lens) * 3 * (1 + len(spec.page_sizes)))
    cells: list[PagedCell] = []
    t0 = time.perf_counter()
    for contender in contenders:
        for L in sorted(spec.cache_lens):
            if spec.time_limit_s is not None and time.perf_counter() - t0 > spec.time_limit_s:
                session.poisoned = (f"not run: the time limit of {spec.time_limit_s:g}s was "
                                    "reached")
            if session.poisoned is not None:  # skipped without allocating the caches
                for call, P in [(c, 0) for c in CALLS if c.startswith("contiguous")] + [
                        (c, P) for P in spec.page_sizes if L % P == 0
                        for c in CALLS if c.startswith("paged")]:
                    cells.append(session.run(_blank(spec, contender, L, call, P), None))
                continue
            cells += _cache_len(session, spec, contender, L, device, seed, progress)
            timing.release_memory(device, collect=True)
    progress.finish()
    add_paged_ratios(cells)
    return cells


def _cache_len(session, spec, contender, L, device, seed, progress) -> list[PagedCell]:
    """Every call of one backend on caches of ``L`` keys."""
    backend, dtype = contender.backend, DTYPES[spec.dtype]
    g = torch.Generator(device=device).manual_seed(seed + L)
    q = torch.randn(spec.batch, spec.heads_q, spec.seqlen_q, spec.head_dim, generator=g,
                    device=device, dtype=dtype)
    k, v = (torch.randn(spec.batch, spec.heads_kv, L, spec.head_dim, generator=g,
                        device=device, dtype=dtype) for _ in range(2))
    lens = torch.full((spec.batch,), L, dtype=torch.int32, device=device)
    short = lens - 1  # the appending calls write key L - 1 again, from these copies
    k_last, v_last = k[:, :, -1:].clone(), v[:, :, -1:].clone()
    dense = AttentionProblem.from_tensors(q, k, v, causal=True, seqlens_k=lens,
                                          needs_grad=False, check_values=False)
    calls = {
        ("contiguous", 0): lambda: backend.forward(dense, q, k, v, lens),
        ("contiguous-api", 0): lambda: attention_with_kvcache(q, k, v, lens, causal=True,
                                                              backend=contender.name),
        ("contiguous-api-append", 0): lambda: attention_with_kvcache(
            q, k, v, short, k_last, v_last, causal=True, backend=contender.name,
            validate="device"),
    }
    host = torch.Generator().manual_seed(seed + L)
    for P in spec.page_sizes:
        if L % P:
            continue
        kp, vp, table = shuffled_pools(k, v, P, host)
        problem = paged_problem(q, kp, table, causal=True)
        calls[("paged", P)] = functools.partial(backend.forward_paged, problem, q, kp, vp,
                                                table, lens)
        calls[("paged-api", P)] = functools.partial(
            attention_with_kvcache, q, kp, vp, lens, block_table=table, causal=True,
            backend=contender.name, validate="device")
        calls[("paged-api-append", P)] = functools.partial(
            attention_with_kvcache, q, kp, vp, short, k_last, v_last, block_table=table,
            causal=True, backend=contender.name, validate="device")
    first: list = []  # the contiguous call's out, which every other call is compared with
    cells = []
    for (call, P), fn in calls.items():
        progress.step(f"{contender.name} {call} page={P} cache={L}")
        want = dense if P == 0 else dense._replace(page_size=P)
        cells.append(session.run(_blank(spec, contender, L, call, P), functools.partial(
            _time, spec, backend, want, fn, first=first, device=device)))
    return cells


def _time(spec, backend, problem, fn, cell, *, first, device) -> None:
    reasons = backend.not_supported_reasons(problem)
    if reasons:
        raise _Unsupported("; ".join(reasons))
    with torch.no_grad():
        out = fn()
        out = (out[0] if isinstance(out, tuple) else out).float()
        if not first:
            first.append(out)
        cell.max_abs_diff_vs_contiguous = float((out - first[0]).abs().max())
        t = timing.time_cell(cell, fn, device, spec)
        try:
            cell.host_us = host_us(fn, device, *batch_sizes(device))[0]
        except WaitedForGpu:  # a call that synchronizes: its host time is not separable
            cell.host_us = None
    cell.set_rates(t.median_ms)


def add_paged_ratios(cells: list[PagedCell]) -> None:
    base = {(c.backend, c.seqlen_k, c.call.replace("paged", "contiguous")): c for c in cells
            if c.call.startswith("contiguous") and c.status == "ok"}
    for c in cells:
        b = base.get((c.backend, c.seqlen_k, c.call.replace("paged", "contiguous")))
        if c.call.startswith("paged") and c.status == "ok" and b is not None and b.tbps:
            c.ratio_vs_contiguous = c.tbps / b.tbps


def paged_table(result: dict) -> str:
    """Per backend and kind of call (kernel, api): TB/s by cache length, contiguous and each
    page size, with each paged cell's throughput over the contiguous one."""
    from .tables import _Notes, backends_in_order, fmt_table, num, seq_label

    cells, spec = result["cells"], result["config"]["paged"]
    notes = _Notes()
    out = [f"attnkit bench --decode --paged on {result['config']['device']}: "
           f"B={spec['batch']} Hq={spec['heads_q']} Hkv={spec['heads_kv']} "
           f"D={spec['head_dim']} {spec['dtype']} Sq={spec['seqlen_q']}, pages shuffled",
           "TB/s of K+V read (median; Nx = over the same backend's contiguous call)"]
    for backend in backends_in_order(cells):
        for kind, suffix in KINDS:
            mine = [c for c in cells if c["backend"] == backend
                    and c["call"] in (f"contiguous{suffix}", f"paged{suffix}")]
            if not mine:
                continue

            def column(c):
                return "contiguous" if c["call"].startswith("contiguous") else \
                    f"page {c['page_size']}"

            values = {}
            for c in mine:
                text = num(c["tbps"]) if c["status"] == "ok" else notes.mark(c)
                if c.get("ratio_vs_contiguous"):
                    text += f" {c['ratio_vs_contiguous']:.2f}x"
                values[(seq_label(c["seqlen_k"]), column(c))] = text
            rows = list(dict.fromkeys(seq_label(c["seqlen_k"]) for c in mine))
            columns = list(dict.fromkeys(column(c) for c in mine))
            title = (f"\n{backend}, {kind} " + ("(backend.forward / forward_paged)"
                     if kind == "kernel" else "(attention_with_kvcache, validate='device')"))
            out += fmt_table(title, "cache", rows, columns, values)
            host = {(seq_label(c["seqlen_k"]), column(c)):
                    f"{c['host_us']:.1f} / {1e3 * c['ms']:.1f}"
                    for c in mine if c["status"] == "ok" and c.get("host_us") is not None}
            if host:
                out += fmt_table("host us per call / median us per call", "cache", rows,
                                 columns, host)
    out += [f"  {line}" for line in notes.lines()]
    out.append(f"({len(cells)} cells in {result['elapsed_s']}s)")
    return "\n".join(out)


def paged_summary(result: dict) -> str:
    """The smallest paged-over-contiguous ratio per backend, call and page size."""
    from .tables import fmt_table

    worst: dict = {}
    for c in result["cells"]:
        r = c.get("ratio_vs_contiguous")
        if r:
            key = (f"{c['backend']} {c['call']}", f"page {c['page_size']}")
            worst[key] = min(worst.get(key, r), r)
    rows = list(dict.fromkeys(k[0] for k in worst))
    columns = list(dict.fromkeys(k[1] for k in worst))
    values = {k: f"{r:.2f}x" for k, r in worst.items()}
    return "\n".join(fmt_table("\nSummary: lowest paged / contiguous throughput over the cache "
                               "lengths", "call", rows, columns, values))
