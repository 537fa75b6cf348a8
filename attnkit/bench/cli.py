"""The ``attnkit bench`` subcommand: arguments, then one run (or one per ``--env`` value), its
table and files, the comparison asked for.

A mistake of the user's (a bad value, an unwritable ``--out``, a missing ``--compare``
result) is one line on stderr and exit code 2, before anything is timed where it can be.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .grid import DTYPES, MODES

DEFAULT_OUT = "attnkit-bench"


class UsageError(ValueError):
    """A mistake in the command line: reported in one line, exit code 2."""


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


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds: {text!r}")
    return value


def _env(text: str):
    from .abtest import parse_env

    try:
        return parse_env(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _one_line_error(message: str):
    print(f"attnkit bench: {message} (attnkit bench --help)", file=sys.stderr)
    sys.exit(2)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.error = _one_line_error  # argparse's usage block would bury the one line that matters
    p.description = (
        "Time every installed attnkit backend beside PyTorch SDPA's kernels on the same random "
        "inputs. Default grid (CUDA): FlashAttention's, batch*seqlen = 16k tokens, seqlen "
        "512..16k, model dim 2048 (H = 2048/D), D 64, 128 and 256, causal and not, "
        "fwd/bwd/fwd_bwd, fp16 and bf16; on a CPU a small fp32 grid. Other modes: --decode, "
        "--graphs, --host-overhead, --sustained, --varlen, --model-step. --label/--compare "
        "keep and compare runs; --env A/Bs environment switches; --report prints the README's "
        "tables from committed results.")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    p.add_argument("--out", metavar="DIR",
                   help=f"write DIR/bench.json, DIR/bench.png and the table as DIR/bench.txt "
                        f"(decode.*, graphs.*, host.*, sustained.* in the other modes; one "
                        f"DIR/NAME=VALUE/ per --env run); default {DEFAULT_OUT}, or none "
                        "with --label")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--decode", action="store_true",
                      help="the decoding table: one query token against KV caches (TB/s)")
    mode.add_argument("--graphs", action="store_true",
                      help="the decoding table timed as eager calls and as replays of a CUDA "
                           "graph that captured each step (CUDA only)")
    mode.add_argument("--host-overhead", action="store_true",
                      help="host time per call (the GPU kept busy) and GPU time, on the "
                           "grid's shortest shape and the decoding table's shortest cache")
    mode.add_argument("--sustained", type=_positive, metavar="SECONDS",
                      help="each contender back to back for SECONDS per shape (default "
                           "S=4k D=128 non-causal fwd), SM clock, power and temperature read "
                           "meanwhile, in order then reversed")
    mode.add_argument("--varlen", action="store_true",
                      help="packed variable-length batches: attention_varlen on 16k and 64k "
                           "tokens in equal and long-tailed document mixes, beside the same "
                           "backend's dense call, SDPA on nested tensors and SDPA-flash on "
                           "the padded batch (FLOPs summed per document)")
    p.add_argument("--paged", action="store_true",
                   help="with --decode: paged KV caches (block_table) beside contiguous ones, "
                        "pages shuffled through the pool, each backend that declares paged")
    p.add_argument("--page-sizes", type=_ints, metavar="N,..",
                   help="--paged page sizes (default 16,64)")
    mode.add_argument("--sdpa-overhead", action="store_true",
                      help="host microseconds per call of attnkit.sdpa beside attnkit.attention "
                           "and torch's SDPA on small shapes (--device, first of --backends)")
    mode.add_argument("--model-step", action="store_true",
                      help="a random LlamaForCausalLM's training step and decode step with "
                           "attn_implementation='attnkit' (first of --backends, or auto) "
                           "beside 'sdpa' in Hugging Face transformers (needs transformers; "
                           "--seqlens, --tokens, --cache-lens, --dtypes narrow it); writes "
                           "model_step.{json,txt}")
    mode.add_argument("--context-parallel", action="store_true",
                      help="attnkit.distributed's fraction of ideal scaling per method and "
                           "layout (default 64k,128k tokens, bf16, D=128, causal): measured on "
                           "the process group (torchrun -m attnkit.cli bench ...), and at world "
                           "size 1 predicted for --cp-worlds from each ring step's compute")
    mode.add_argument("--report", nargs="+", metavar="DIR",
                      help="run nothing: print the README's markdown tables of the results in "
                           "each DIR (e.g. benchmarks/results/h200)")
    mode.add_argument("--plot-from", metavar="FILE.json",
                      help="run nothing: print the table of a saved result and draw its PNG "
                           "beside it")
    p.add_argument("--label", metavar="NAME",
                   help="also keep the run in the cache ($ATTNKIT_BENCH_CACHE, default "
                        "~/.cache/attnkit/bench) as NAME, for a later --compare NAME")
    p.add_argument("--compare", metavar="NAME_OR_PATH",
                   help="print each cell's ratio of this run over a result: a label, a result "
                        "file or a results directory (e.g. benchmarks/results/h100)")
    p.add_argument("--env", type=_env, action="append", metavar="NAME=A,B",
                   help="run once per value of environment variable NAME, each in a fresh "
                        "process, and compare the runs in one table (repeatable: every "
                        "combination; the value 'unset' removes the variable)")
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
    p.add_argument("--tokens", type=int,
                   help="batch * seqlen of each grid shape (--varlen: the total tokens)")
    p.add_argument("--mixes", type=_names(("equal", "long-tailed")), metavar="M,..",
                   help="--varlen length mixes: equal, long-tailed")
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
    p.add_argument("--dropout", type=float, metavar="P", dest="dropout_p",
                   help="the grid (or --varlen's table) with attention dropout P (compare "
                        "with a run without it through --label/--compare)")
    p.add_argument("--cp-worlds", type=_ints, metavar="P,..",
                   help="--context-parallel: world sizes to predict (default 2,4,8)")
    p.add_argument("--link-gbps", type=float, default=450.0, metavar="GB/s",
                   help="--context-parallel: one direction of the GPU link (default 450, "
                        "H100/H200 NVLink)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_kwargs(args: argparse.Namespace) -> dict:
    """`run_benchmark`'s arguments (JSON-ready: an ``--env`` child gets them as a file)."""
    return dict(device=args.device, decode=args.decode, graphs=args.graphs,
                host_overhead=args.host_overhead, sustained_s=args.sustained,
                varlen=args.varlen, mixes=args.mixes, paged=args.paged,
                page_sizes=args.page_sizes,
                seqlens=args.seqlens, head_dims=args.head_dims, causal=args.causal,
                dtypes=args.dtypes, modes=args.modes, backends=args.backends,
                tokens=args.tokens, model_dim=args.model_dim, layout=args.layout,
                cache_lens=args.cache_lens, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                slow_call_s=args.slow_call_s, time_limit_s=args.time_limit_s,
                dropout_p=args.dropout_p, seed=args.seed, progress=not args.quiet)


def _kind(args: argparse.Namespace) -> str:
    if args.graphs:
        return "graphs"
    if args.decode:
        return "paged" if args.paged else "decode"
    if args.host_overhead:
        return "host"
    if args.varlen:
        return "varlen"
    return "sustained" if args.sustained is not None else "grid"


def _writable(directory: Path) -> None:
    """Fail now, not after the run, if ``directory`` cannot take the result files."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".attnkit-bench-"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write results to {directory}: "
                         f"{e.strerror or type(e).__name__}") from None


def _check(args: argparse.Namespace):
    """Everything that can be checked before timing: ``(out, label dir, (name, result) to
    compare with or None)``."""
    from . import cache, contenders, report

    for flag, value in (("--tokens", args.tokens), ("--model-dim", args.model_dim),
                        ("--warmup-ms", args.warmup_ms), ("--rep-ms", args.rep_ms),
                        ("--slow-call-s", args.slow_call_s),
                        ("--time-limit-s", args.time_limit_s)):
        if value is not None and not value >= 0:
            raise UsageError(f"{flag} must not be negative, got {value}")
    if args.paged and (args.compare or args.env):
        raise UsageError("--paged results have their own table: --compare and --env do not "
                         "take them")
    if args.backends:
        known = contenders.known_names()
        if args.varlen:
            from .varlen import VARLEN_PEERS

            known += list(VARLEN_PEERS)
        unknown = [n for n in args.backends if n not in known]
        if unknown:
            raise UsageError(f"unknown backend(s) {unknown}; known: {known}")
    label = None
    if args.label is not None:
        label = cache.label_dir(args.label)
        _writable(label)
    out = Path(args.out) if args.out else (None if label else Path(DEFAULT_OUT))
    if out is not None:
        _writable(out)
    reference = None
    if args.compare is not None:
        path = cache.resolve(args.compare, report.STEMS[_kind(args)])
        # Read now: a --label of the same name would overwrite it.
        reference = report.read_json(path)
        if reference["kind"] != _kind(args):
            raise UsageError(f"--compare {args.compare}: {path} holds a {reference['kind']} "
                             f"result, this run is {_kind(args)}")
        name = str(path) if Path(args.compare).expanduser().exists() else f"label {args.compare}"
        reference = (name, reference)
    return out, label, reference


def _report(result: dict) -> None:
    from . import tables

    print(tables.table(result))
    print(tables.summary(result))


def _save(result: dict, where: list[Path], plot: bool) -> None:
    from . import save

    for directory in where:
        files = save(result, directory, plot=plot)
        print(f"wrote {files['json']}, {files['table']}"
              + (f", {files['png']}" if "png" in files else ""))
        if "plot_error" in files:
            print(f"no plot: {files['plot_error']}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as e:  # UsageError and run_benchmark's checks: no traceback
        print(f"attnkit bench: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a result file that cannot be written after all
        print(f"attnkit bench: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from . import compare, plot, report, run_benchmark, tables

    if args.report:
        print(report.readme_tables(args.report), end="")
        return 0
    if args.plot_from:
        result = report.read_json(args.plot_from)
        _report(result)
        print(f"wrote {plot.plot(result, Path(args.plot_from).with_suffix('.png'))}")
        return 0
    if args.context_parallel:
        from .context_parallel import run_cli

        return run_cli(args)
    if args.model_step:
        from .model_step import run_cli

        return run_cli(args)
    if args.sdpa_overhead:
        from . import resolve_device
        from .dropin import format_rows, sdpa_overhead

        rows = sdpa_overhead(resolve_device(args.device), backend=(args.backends or [None])[0])
        print(format_rows(rows))
        return 0
    out, label, reference = _check(args)
    if args.env:
        from . import abtest

        assigns = abtest.assignments(args.env)
        results, failures = abtest.run_all(_run_kwargs(args), assigns)
        for name, result in results.items():
            print(f"\n== {name}")
            print(tables.summary(result).lstrip("\n"))
            _save(result, [d / name for d in (out, label) if d is not None],
                  not args.no_plot)
        runs = dict(results)
        base = next(iter(runs), None)
        if reference:
            runs = {reference[0]: reference[1], **runs}
            base = reference[0]
        if len(runs) >= 2:
            unit = compare.METRICS[_kind(args)][1]
            print(f"\nAgainst {base}: {unit} of each run over it, per cell (above 1: faster)")
            print(compare.compare_table(runs, base, title=""))
        for line in failures:
            print(f"attnkit bench: {line}", file=sys.stderr)
        return 1 if failures or not results else 0
    result = run_benchmark(**_run_kwargs(args))
    _report(result)
    _save(result, [d for d in (out, label) if d is not None], not args.no_plot)
    if reference:
        name, ref = reference
        unit = compare.METRICS[result["kind"]][1]
        print(f"\nAgainst {name}: {unit} of this run over it, per cell (above 1: faster)")
        print(compare.compare_table({name: ref, "this run": result}, name, title=""))
    # Failed cells are results, not failures of the run; a run where nothing ran is one.
    return 0 if any(c["status"] == "ok" for c in result["cells"]) else 1

