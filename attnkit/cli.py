"""``attnkit backends | check | demo | bench``.

A user's mistake (an unknown backend, a bad option value, a device this machine lacks, a
plugin failing under ``ATTNKIT_STRICT_PLUGINS=1``) ends the command with one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys


class UsageError(Exception):
    """A command cannot run as asked; its message is the one line the user sees."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (it prints the usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_backends(args) -> int:
    from .registry import registry

    regs = registry.registrations()
    rows = []
    for name, reg in regs.items():
        ok, why = reg.availability
        rows.append({
            "name": name,
            "description": reg.backend.description,
            "plugin": reg.plugin,
            "distribution": reg.distribution,
            "version": reg.version,
            "available": ok,
            "reason": why,
            "priority": reg.priority,
            "capabilities": reg.backend.capabilities.as_dict(),
        })
    failures = [{"plugin": f.plugin, "distribution": f.distribution, "error": f.error}
                for f in registry.failures]
    if args.json:
        json.dump({"backends": rows, "failed_plugins": failures}, sys.stdout, indent=2)
        print()
        return 0
    for r in rows:
        status = "available" if r["available"] else f"unavailable: {r['reason']}"
        prio = "by name only" if r["priority"] is None else f"priority {r['priority']}"
        caps = r["capabilities"]
        feats = [f for f in ("causal", "gqa", "window", "seqlens_k", "softcap", "lse",
                             "backward", "lse_grad", "varlen", "dropout", "paged",
                             "deterministic")
                 if caps.get(f)]
        print(f"{r['name']}  ({r['distribution']}, plugin {r['plugin']}, {prio})")
        print(f"    {status}")
        if r["description"]:
            print(f"    {r['description']}")
        cc = caps["cuda_capability_min"]
        gpus = f" (CUDA {cc[0]}.{cc[1]}+)" if cc else ""
        print(f"    devices {', '.join(caps['devices'])}{gpus}; dtypes "
              f"{', '.join(caps['dtypes'])}; head dim {caps['head_dim_min']}.."
              f"{caps['head_dim_max']}")
        print(f"    features: {', '.join(feats)}")
    for f in failures:
        print(f"FAILED plugin {f['plugin']} ({f['distribution']}): {f['error']}")
    return 0


def _part(text: str) -> str:
    """argparse's check of ``--part K/N``."""
    from .testing.plugin import parse_part

    try:
        parse_part(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _cmd_check(args) -> int:
    from .testing.runner import run_check

    return run_check(args.backend, device=args.device, quick=args.quick,
                     pytest_args=args.pytest_args, part=args.part)


def _cmd_demo(args) -> int:
    import time

    import torch

    from . import api, reference

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    if args.seqlen < 1:
        raise UsageError(f"--seqlen must be at least 1, got {args.seqlen}")
    dtype = getattr(torch, args.dtype)
    B, H, S, D = 2, 8, args.seqlen, 64
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))
    chosen = api.explain(q, k, v, causal=True).chosen if args.backend is None else args.backend
    run = lambda: api.attention(q, k, v, causal=True, backend=args.backend)  # noqa: E731
    out = run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ref, _ = reference.safe(q.double(), k.double(), v.double(), causal=True)
    err = (out.double() - ref).abs().max().item()
    ms = sorted(times)[len(times) // 2] * 1e3
    print(f"backend {chosen} on {device}: causal attention B={B} H={H} S={S} D={D} {args.dtype}")
    print(f"  max |out - float64 reference| = {err:.2e}")
    print(f"  forward median {ms:.2f} ms "
          f"({2 * B * H * S * S * D / (ms * 1e-3) / 1e12:.3f} TFLOP/s)")
    return 0


def _check_device(device: str) -> None:
    """Refuse a device string torch cannot parse, or a device this machine does not have."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {device!r} is not a device torch knows: {e}") from None
    module = getattr(torch, dev.type, None)
    if dev.type == "cpu" or module is None or not hasattr(module, "is_available"):
        return
    if not module.is_available():
        build = (" (this torch build has no CUDA)" if dev.type == "cuda"
                 and torch.version.cuda is None else "")
        raise UsageError(f"--device {device}: torch sees no {dev.type} device{build}")
    count = module.device_count() if hasattr(module, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise UsageError(f"--device {device}: this machine has {count} {dev.type} "
                         f"device(s), numbered from 0")


def _cmd_bench(args) -> int:
    from .bench.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnkit", description="Exact softmax attention through pluggable backends.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backends", help="list registered backends and failed plugins")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_backends)

    p = sub.add_parser("check", help="run the conformance suite against a backend",
                       epilog="Arguments after -- go to pytest, e.g. -- -x -k causal")
    p.add_argument("backend", help="backend name, e.g. torch-blocked, triton, cupy, reference")
    p.add_argument("--device", default="cpu", help="device to test on (cpu, cuda)")
    p.add_argument("--quick", action="store_true", help="a small grid (for interpreters, CI)")
    p.add_argument("--part", metavar="K/N", default=None, type=_part,
                   help="only the K-th of N consecutive slices of the suite (1/2, then 2/2: "
                   "every test once, in two runs)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("demo", help="run one attention call on the automatically chosen "
                       "backend: which backend, its error against float64, its time")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--backend", default=None, help="default: automatic selection")
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--seqlen", type=int, default=1024)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="benchmark backends beside PyTorch SDPA")
    try:
        from .bench.cli import configure_parser
    except ImportError as e:  # keep `backends` and `check` working if bench cannot import
        p.set_defaults(func=lambda _a, e=e: sys.exit(f"attnkit bench unavailable: {e}"))
    else:
        configure_parser(p)
        p.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # everything after -- is for pytest (attnkit check)
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.pytest_args = extra
    from .registry import NoBackendError, PluginLoadError

    try:
        return args.func(args)
    except (UsageError, NoBackendError, PluginLoadError) as e:
        print(f"attnkit {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2


def _one_line(message: str) -> str:
    """A multi-line message (every backend's reasons, every failed plugin) joined, not cut."""
    text = ""
    for line in filter(None, (part.strip() for part in message.splitlines())):
        text += line if not text else (" " if text.endswith(":") else "; ") + line
    return text


if __name__ == "__main__":
    sys.exit(main())
