"""What `attnkit.sdpa` costs the host per call, beside `attnkit.attention` and
``torch.nn.functional.scaled_dot_product_attention`` on the same small inputs, where the
host's work (argument checks, mask reading, autograd, launches) is what a call costs.

``attnkit bench --sdpa-overhead [--device cuda]`` prints the table; `sdpa_overhead` returns
its rows. Host time is measured as `attnkit.bench.host` does (on a GPU, the stream held
meanwhile so no call waits for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import attention, sdpa
from .host import batch_sizes, host_us


@dataclass(frozen=True)
class OverheadCase:
    name: str
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int = 64
    #: "causal" (top-left for SDPA, as both agree at Sq == Sk or Sq == 1), or "padding": a
    #: boolean (B, 1, 1, Sk) key-padding mask, a per-batch prefix, which attnkit.sdpa reads.
    mask: str = "causal"
    backward: bool = False


#: Small enough that the arithmetic is a few microseconds on a GPU and not much more on a CPU.
CASES = (
    OverheadCase("causal, S=32", 1, 4, 4, 32, 32),
    OverheadCase("causal, S=32, fwd+bwd", 1, 4, 4, 32, 32, backward=True),
    OverheadCase("key padding, S=32", 2, 4, 4, 32, 32, mask="padding"),
    OverheadCase("decode GQA, 1 query, 128 keys", 1, 8, 2, 1, 128),
)


@dataclass
class OverheadRow:
    case: str
    contender: str
    host_us: float | None = None
    host_us_min: float | None = None
    error: str = ""


def _calls(case: OverheadCase, device: torch.device, dtype: torch.dtype, backend):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(case.batch, case.heads_q, case.seqlen_q, case.head_dim, device=device,
                    dtype=dtype, generator=g)
    k, v = (torch.randn(case.batch, case.heads_kv, case.seqlen_k, case.head_dim,
                        device=device, dtype=dtype, generator=g) for _ in range(2))
    if case.backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    gqa = case.heads_q != case.heads_kv
    if case.mask == "padding":
        lengths = torch.tensor([case.seqlen_k - 7 * b for b in range(case.batch)],
                               device=device, dtype=torch.int32)
        keys = torch.arange(case.seqlen_k, device=device)
        mask = (keys < lengths[:, None])[:, None, None, :]
        options = dict(sdpa=dict(attn_mask=mask), attention=dict(seqlens_k=lengths))
    else:
        causal = case.seqlen_q > 1  # one query sees every key under either alignment
        options = dict(sdpa=dict(is_causal=causal), attention=dict(causal=causal))

    def wrap(fn):
        if not case.backward:
            return fn
        return lambda: fn().sum().backward()

    return {
        "torch sdpa": wrap(lambda: F.scaled_dot_product_attention(
            q, k, v, enable_gqa=gqa, **options["sdpa"])),
        "attnkit.attention": wrap(lambda: attention(q, k, v, backend=backend,
                                                    **options["attention"])),
        "attnkit.sdpa": wrap(lambda: sdpa(q, k, v, enable_gqa=gqa, backend=backend,
                                          **options["sdpa"])),
    }


def sdpa_overhead(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  cases=CASES, calls: int | None = None, batches: int | None = None,
                  backend: str | None = None) -> list[OverheadRow]:
    """Host microseconds per call (median and min over batches) of each contender on each
    case; ``backend`` is attnkit's (None: the one it picks). A contender that raises is a
    row with its error, not the end of the run."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    default_calls, default_batches = batch_sizes(device)
    calls, batches = calls or default_calls, batches or default_batches
    rows = []
    for case in cases:
        for name, fn in _calls(case, device, dtype, backend).items():
            row = OverheadRow(case.name, name)
            try:
                with torch.set_grad_enabled(case.backward):
                    fn()  # first call: selection, caches, compilation
                    row.host_us, row.host_us_min = host_us(fn, device, calls, batches)
            except Exception as e:  # noqa: BLE001 - reported in the row
                row.error = f"{type(e).__name__}: {e}"
            rows.append(row)
    return rows


def format_rows(rows: list[OverheadRow]) -> str:
    contenders = list(dict.fromkeys(r.contender for r in rows))
    lines = ["| case | " + " | ".join(contenders) + " |",
             "|---|" + "---|" * len(contenders)]
    for case in dict.fromkeys(r.case for r in rows):
        cells = []
        for c in contenders:
            r = next(r for r in rows if r.case == case and r.contender == c)
            cells.append(f"{r.host_us:.1f} us (min {r.host_us_min:.1f})"
                         if r.host_us is not None else r.error[:60])
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

