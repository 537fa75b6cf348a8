"""``attnkit bench --varlen``: packed variable-length batches beside their alternatives.

Each shape is a packing of ``tokens`` tokens into documents (`mix_lengths`: "equal" documents
of ``doc_len`` tokens, or "long-tailed": two documents of a quarter of the tokens each and
many short ones), ``H = model_dim / D`` heads, self-attention per document. FLOPs are summed
per document (`attention_flops` of each, causal halved), so every contender is credited with
the same useful work whatever it computes. Contenders, on the same packed inputs:

- ``varlen``: `attnkit.attention_varlen` on each backend that declares varlen;
- ``dense`` (equal mix only): the same backend's `attnkit.attention` on the same work, the
  packing viewed as ``(B, H, L, D)`` (no copy): what varlen must match;
- ``sdpa-nested``: PyTorch SDPA on nested jagged tensors over the same values (its flash
  kernel pinned on CUDA);
- ``sdpa-flash-padded``: every document padded to the longest, SDPA-flash on the padded
  batch, and the result unpadded, all inside the timed call. Flash takes no mask, so the
  non-causal padded call also attends to the padding: a timing of the padding approach's
  cost, not a correct result.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import api
from ..varlen import attention_varlen, varlen_problem
from . import peers, timing
from .contenders import Contender, select_declaring
from .grid import DTYPES, STANDARD_TOKENS, Rated, Timing, attention_flops
from .progress import Progress
from .runner import _Session, _Unsupported

#: Peers of the varlen table (names for ``--backends``).
VARLEN_PEERS = ("sdpa-nested", "sdpa-flash-padded")
MIXES = ("equal", "long-tailed")
VARLEN_MODES = ("fwd", "fwd_bwd")
#: Lengths of the long-tailed mix's short documents, cycled until the tokens are used up.
SHORT_DOCS = (17, 300, 64, 1000, 5, 130, 700, 33, 2000, 90)


def mix_lengths(mix: str, tokens: int, doc_len: int) -> list[int]:
    """Document lengths summing to ``tokens``. "equal": ``tokens // doc_len`` documents of
    ``doc_len`` (one of ``tokens`` if shorter); "long-tailed": two documents of
    ``tokens // 4`` each, then `SHORT_DOCS` (scaled down for small ``tokens``) cycled, the
    last one cut to fit."""
    if mix == "equal":
        L = min(doc_len, tokens)
        return [L] * (tokens // L)
    if mix != "long-tailed":
        raise ValueError(f"unknown length mix {mix!r}; choose from {list(MIXES)}")
    lens = [tokens // 4, tokens // 4]
    left = tokens - sum(lens)
    shrink = max(1, STANDARD_TOKENS // tokens)  # a tiny configuration keeps many short docs
    for n in itertools.cycle(SHORT_DOCS):
        if left == 0:
            break
        n = min(left, max(1, n // shrink))
        lens.append(n)
        left -= n
    return lens


@dataclass
class VarlenSpec(Timing):
    tokens: tuple[int, ...] = (16384, 65536)
    head_dims: tuple[int, ...] = (64, 128)
    causal: tuple[bool, ...] = (False, True)
    mixes: tuple[str, ...] = MIXES
    modes: tuple[str, ...] = VARLEN_MODES
    dtype: str = "bf16"
    model_dim: int = 2048
    #: Document length of the "equal" mix.
    doc_len: int = 2048
    #: Attention dropout probability of every call (0: none); the SDPA peers drop too.
    dropout_p: float = 0.0


def default_varlen(device: str) -> VarlenSpec:
    """16k and 64k tokens, D 64 and 128, bf16 on CUDA; a tiny fp32 version on a CPU."""
    if device == "cuda":
        return VarlenSpec()
    return VarlenSpec(tokens=(512,), head_dims=(16,), dtype="fp32", model_dim=32, doc_len=128,
                      warmup_ms=0.0, rep_ms=20.0, max_reps=10)


@dataclass
class VarlenCell(Rated):
    """One contender on one packing in one mode. ``backend`` is the attnkit backend (or the
    peer's name), ``call`` what was called: "varlen", "dense", "sdpa-nested" or
    "sdpa-flash-padded"; ``seqlen_q``/``seqlen_k`` the longest document."""

    tokens: int = 0
    mix: str = ""
    call: str = ""
    documents: int = 0
    #: Throughput of this varlen cell over the same backend's dense call (equal mix).
    ratio_vs_dense: float | None = None
    ratio_vs_sdpa_nested: float | None = None
    ratio_vs_sdpa_flash_padded: float | None = None
    max_abs_diff_vs_sdpa: float | None = None


def varlen_flops(lens: list[int], heads: int, head_dim: int, causal: bool, mode: str) -> float:
    """The standard count summed over documents (each a square ``L x L`` problem)."""
    return sum(attention_flops(1, heads, n, n, head_dim, causal, mode) for n in lens if n)


def select(device: torch.device, dtype: torch.dtype, head_dim: int,
           names: list[str] | None) -> tuple[list[Contender], dict[str, str]]:
    """attnkit backends that declare varlen (reference only when named) and the two SDPA
    peers; the others with why they are left out."""
    return select_declaring(device, names, "varlen", VARLEN_PEERS)


def _inputs(lens, heads, head_dim, dtype, device, seed):
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + sum(lens) * 17 + len(lens) * 131 + head_dim) % (1 << 31))
    T = sum(lens)
    leaves = [torch.randn(T, heads, head_dim, generator=g, device=device, dtype=dtype)
              .requires_grad_(True) for _ in range(3)]
    dout = torch.randn(T, heads, head_dim, generator=g, device=device, dtype=dtype)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
    return leaves, dout, cu


def _padded_index(lens, longest, device):
    """Row of each packed token in the ``(B * longest)`` padded layout."""
    return torch.cat([torch.arange(n, device=device) + b * longest
                      for b, n in enumerate(lens)]).long()


def _call_fn(contender: Contender, call: str, leaves, cu, lens, causal: bool,
             dropout_p: float = 0.0):
    """``f(q, k, v) -> out (total, H, D)`` for one contender's way of computing the packing,
    every call with ``dropout_p``."""
    longest, B = max(lens), len(lens)
    if call == "varlen":
        return lambda q, k, v: attention_varlen(q, k, v, cu, cu, longest, longest,
                                                causal=causal, dropout_p=dropout_p,
                                                backend=contender.name)
    if call == "dense":
        L = longest

        def dense(q, k, v):
            q4, k4, v4 = (t.unflatten(0, (B, L)).transpose(1, 2) for t in (q, k, v))
            out = api.attention(q4, k4, v4, causal=causal, dropout_p=dropout_p,
                                backend=contender.name)
            return out.transpose(1, 2).flatten(0, 1)
        return dense
    if call == "sdpa-nested":
        offsets = cu.long()

        def nested(q, k, v):
            qn, kn, vn = (torch.nested.nested_tensor_from_jagged(
                t, offsets=offsets, max_seqlen=longest, min_seqlen=min(lens)).transpose(1, 2)
                for t in (q, k, v))
            return F.scaled_dot_product_attention(qn, kn, vn, is_causal=causal,
                                                  dropout_p=dropout_p
                                                  ).transpose(1, 2).values()
        return nested
    index = _padded_index(lens, longest, cu.device)

    def padded(q, k, v):
        def pad(t):
            p = t.new_zeros(B * longest, *t.shape[1:]).index_copy(0, index, t)
            return p.unflatten(0, (B, longest)).transpose(1, 2)
        out = peers.sdpa(pad(q), pad(k), pad(v), causal=causal, dropout_p=dropout_p)
        return out.transpose(1, 2).flatten(0, 1).index_select(0, index)
    return padded


#: Elements of a padded q past which SDPA's flash kernel is not run: at 2.7e9 (81 documents
#: padded to 16k, 32 heads of 64) it read out of bounds on an H100 (torch 2.11, an illegal
#: memory access that ends the process), consistent with 32-bit element offsets.
PADDED_FLASH_LIMIT = 2**31 - 1


def _padded_skip(lens, heads: int, head_dim: int, device: torch.device) -> str | None:
    """Why the padded peer is not run on this shape, or None."""
    elements = len(lens) * max(lens) * heads * head_dim
    if device.type == "cuda" and elements > PADDED_FLASH_LIMIT:
        return (f"not run: the padded batch has {elements:.3g} elements per tensor, past "
                f"2^31, where SDPA's flash kernel reads out of bounds")
    return None


def _context(call: str, device: torch.device):
    """SDPA's flash kernel pinned on CUDA (the issue's peers); on a CPU SDPA's own choice."""
    if call in VARLEN_PEERS and device.type == "cuda":
        return peers.pinned("sdpa-flash")
    from contextlib import nullcontext

    return nullcontext()


def _cell(session, spec, contender, call, mode, lens, heads, head_dim, causal, mix, tokens,
          leaves, dout, cu, ref, skip: str | None = None) -> VarlenCell:
    longest = max(lens)
    cell = VarlenCell(contender.name, contender.kind, mode, spec.dtype, len(lens), heads,
                      heads, longest, longest, head_dim, causal, tokens=tokens, mix=mix,
                      call=call, documents=len(lens),
                      flops=varlen_flops(lens, heads, head_dim, causal, mode))
    if skip is not None:
        cell.error = skip
        return cell
    q, k, v = leaves

    def body(cell):
        if contender.kind == "attnkit":
            if call == "varlen":
                problem = varlen_problem(q, k, v, cu, cu, longest, longest, causal=causal,
                                         needs_grad=mode != "fwd", check_values=False,
                                         dropout_p=spec.dropout_p)
            else:
                q4 = q.unflatten(0, (len(lens), longest)).transpose(1, 2)
                problem = api.AttentionProblem.from_tensors(q4, q4, q4, causal=causal,
                                                            needs_grad=mode != "fwd",
                                                            dropout_p=spec.dropout_p)
            reasons = contender.reasons(problem)
            if reasons:
                raise _Unsupported("; ".join(reasons))
        attend = _call_fn(contender, call, leaves, cu, lens, causal, spec.dropout_p)
        with _context(call, session.device):
            if mode == "fwd":
                def fn():
                    with torch.no_grad():
                        return attend(q, k, v)
                out = fn()
                if not torch.isfinite(out).all():
                    cell.notes.append("output holds NaN or inf")
                if ref is not None and call != "sdpa-flash-padded":
                    cell.max_abs_diff_vs_sdpa = float((out.float() - ref.float()).abs().max())
            else:
                def fn():
                    return torch.autograd.grad(attend(q, k, v), leaves, dout)
                fn()
            t = timing.time_cell(cell, fn, session.device, spec)
        cell.set_rates(t.median_ms)

    return session.run(cell, body)


def _reference_out(leaves, cu, lens, causal, device):
    """SDPA on the nested tensors (its own kernel choice), for every cell's sanity check."""
    try:
        with torch.no_grad(), _context("none", device):
            return _call_fn(Contender("sdpa-nested", "sdpa"), "sdpa-nested", leaves, cu, lens,
                            causal)(*leaves)
    except Exception:
        return None


def run_varlen(spec: VarlenSpec, contenders: list[Contender], device: torch.device,
               progress: Progress, seed: int = 0) -> list[VarlenCell]:
    session = _Session(device, progress)
    dtype = DTYPES[spec.dtype]
    timing.prepare(device)
    shapes = [(tokens, d, causal, mix) for tokens in spec.tokens for d in spec.head_dims
              for causal in spec.causal for mix in spec.mixes]
    calls = [(c, call) for c in contenders
             for call in (("varlen", "dense") if c.kind == "attnkit" else (c.name,))]
    progress.start(len(shapes) * len(calls) * len(spec.modes))
    t0 = time.perf_counter()
    cells = []
    for tokens, d, causal, mix in shapes:
        if spec.model_dim % d:
            raise ValueError(f"model dim {spec.model_dim} is not a multiple of head dim {d}")
        heads = spec.model_dim // d
        lens = mix_lengths(mix, tokens, spec.doc_len)
        leaves, dout, cu = _inputs(lens, heads, d, dtype, device, seed)
        # Under dropout the masks differ: no output check against SDPA.
        ref = None if spec.dropout_p else _reference_out(leaves, cu, lens, causal, device)
        for contender, call in calls:
            for mode in spec.modes:
                label = (f"{contender.name} {call} {mix} T={tokens} D={d}"
                         f"{' causal' if causal else ''} {mode}")
                progress.step(label)
                if call == "dense" and mix != "equal":
                    continue  # the dense call exists only where every document is as long
                skip = None
                if (spec.time_limit_s is not None
                        and time.perf_counter() - t0 > spec.time_limit_s):
                    skip = f"not run: the time limit of {spec.time_limit_s:g}s was reached"
                elif call == "sdpa-flash-padded":
                    skip = _padded_skip(lens, heads, d, device)
                cell = _cell(session, spec, contender, call, mode, lens, heads, d, causal, mix,
                             tokens, leaves, dout, cu, ref, skip=skip)
                cells.append(cell)
        del leaves, dout, ref
        timing.release_memory(device)
    progress.finish()
    add_varlen_ratios(cells)
    return cells


def add_varlen_ratios(cells: list[VarlenCell]) -> None:
    """Each varlen cell's throughput over the same shape's dense call of its backend and
    over each SDPA peer, where both ran."""
    def key(c):
        return (c.tokens, c.mix, c.head_dim, c.causal, c.mode)

    ok = {(key(c), c.backend, c.call): c for c in cells if c.status == "ok" and c.tflops}
    for c in cells:
        if c.call != "varlen" or c.status != "ok" or not c.tflops:
            continue
        for other, attr in (((c.backend, "dense"), "ratio_vs_dense"),
                            (("sdpa-nested", "sdpa-nested"), "ratio_vs_sdpa_nested"),
                            (("sdpa-flash-padded", "sdpa-flash-padded"),
                             "ratio_vs_sdpa_flash_padded")):
            base = ok.get((key(c), *other))
            if base is not None:
                setattr(c, attr, c.tflops / base.tflops)
