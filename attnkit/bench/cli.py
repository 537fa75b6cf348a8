"""The ``attnkit bench`` subcommand: arguments, then `run_benchmark`, then table and files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .grid import DTYPES, MODES


def _ints(text: str) -> list[int]:
    """``"512,1k,16k"`` -> ``[512, 1024, 16384]``."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected integers like 512,1k,16k: {text!r}") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return out


def _names(choices):
    def parse(text: str) -> list[str]:
        names = [p.strip() for p in text.split(",") if p.strip()]
        bad = [n for n in names if choices is not None and n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {list(choices)}")
        return names

    return parse


def _causal(text: str) -> list[bool]:
    table = {"both": [False, True], "true": [True], "false": [False], "causal": [True],
             "noncausal": [False], "non-causal": [False]}
    if text.lower() not in table:
        raise argparse.ArgumentTypeError(f"--causal takes both, true or false, got {text!r}")
    return table[text.lower()]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Time every installed attnkit backend beside PyTorch SDPA's kernels on the same random "
        "inputs. Default grid (CUDA): FlashAttention's, batch*seqlen = 16k tokens, seqlen "
        "512..16k, model dim 2048 (H = 2048/D), D 64 and 128, causal and not, fwd/bwd/fwd_bwd, "
        "fp16 and bf16; on a CPU a small fp32 grid. --decode times the KV-cache decoding table.")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    p.add_argument("--out", default="attnkit-bench", metavar="DIR",
                   help="write DIR/bench.json, DIR/bench.png and the table as DIR/bench.txt "
                        "(decode.* with --decode)")
    p.add_argument("--decode", action="store_true",
                   help="the decoding table: one query token against KV caches (TB/s)")
    p.add_argument("--backends", type=_names(None), metavar="A,B",
                   help="attnkit backends and SDPA peers (sdpa-flash, sdpa-cudnn, "
                        "sdpa-efficient, sdpa-math) to time; default: every available one "
                        "except reference")
    p.add_argument("--seqlens", type=_ints, metavar="N,..", help="e.g. 512,1k,2k")
    p.add_argument("--head-dims", type=_ints, metavar="D,..", help="e.g. 64,128")
    p.add_argument("--causal", type=_causal, metavar="both|true|false")
    p.add_argument("--dtypes", type=_names(DTYPES), metavar="T,..",
                   help=f"from {', '.join(DTYPES)} (decode uses the first)")
    p.add_argument("--modes", type=_names(MODES), metavar="M,..",
                   help=f"from {', '.join(MODES)}")
    p.add_argument("--tokens", type=int, help="batch * seqlen of each grid shape")
    p.add_argument("--model-dim", type=int, help="heads * head dim of each grid shape")
    p.add_argument("--layout", choices=("bshd", "bhsd"),
                   help="bshd (default): q/k/v are (B, S, H, D) passed as .transpose(1, 2)")
    p.add_argument("--cache-lens", type=_ints, metavar="N,..",
                   help="decode cache lengths, e.g. 1k,4k,16k,64k")
    p.add_argument("--warmup-ms", type=float, help="warm-up time per cell")
    p.add_argument("--rep-ms", type=float, help="timed repetitions per cell fill this long")
    p.add_argument("--slow-call-s", type=float,
                   help="a backend whose call takes longer than this is not run at larger "
                        "seqlens of that panel (recorded as skipped; default 1 on CUDA)")
    p.add_argument("--time-limit-s", type=float,
                   help="cells not started after this many seconds are recorded as skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--plot-from", metavar="FILE.json",
                   help="run nothing: print the table of a saved result and draw its PNG "
                        "beside it")


def run(args: argparse.Namespace) -> int:
    from . import report, run_benchmark, save

    if args.plot_from:
        result = report.read_json(args.plot_from)
        print(report.table(result))
        print(report.summary(result))
        src = Path(args.plot_from)
        out = report.plot(result, src.with_suffix(".png"))
        print(f"wrote {out}")
        return 0
    try:
        result = run_benchmark(
            device=args.device, decode=args.decode, seqlens=args.seqlens,
            head_dims=args.head_dims, causal=args.causal, dtypes=args.dtypes,
            modes=args.modes, backends=args.backends, tokens=args.tokens,
            model_dim=args.model_dim, layout=args.layout, cache_lens=args.cache_lens,
            warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, slow_call_s=args.slow_call_s,
            time_limit_s=args.time_limit_s, seed=args.seed,
            progress=not args.quiet)
    except ValueError as e:  # bad options: say so without a traceback
        print(f"attnkit bench: {e}", file=sys.stderr)
        return 2
    files = save(result, args.out, plot=not args.no_plot)
    print(report.table(result))
    print(report.summary(result))
    print(f"wrote {files['json']}, {files['table']}"
          + (f", {files['png']}" if "png" in files else ""))
    if "plot_error" in files:
        print(f"no plot: {files['plot_error']}", file=sys.stderr)
    # Failed cells are results, not failures of the run; a run where nothing ran is one.
    return 0 if any(c["status"] == "ok" for c in result["cells"]) else 1
