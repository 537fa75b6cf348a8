#!/usr/bin/env python
"""Compile every kernel source and every template instance the cupy backend can ask for with
nvcc, for sm_80 and sm_90, so a syntax, template or ptxas error fails CI without a GPU.

For each (source, dtype) a translation unit includes the .cu file and takes the address of
each kernel instance (its name expression, exactly as the plugin hands it to NVRTC), which
forces the instantiation; ptxas is run with -v and the number of compiled entry functions is
checked against the number of instances. Exits non-zero on any error.

    python plugins/cupy/scripts/compile_all.py [--arch 80 --arch 90] [--jobs N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnkit_cupy import _compile  # noqa: E402

ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
USAGE = re.compile(r"Used (\d+) registers")
SPILL = re.compile(r"(\d+) bytes spill stores")


def units(quick: bool) -> list[tuple[str, list[str]]]:
    """(name, [source, name expressions...]) per (source, dtype)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for var in _compile.all_variants():
        if quick and (var.dp not in (64, 256) or var.band != var.softcap):
            continue
        names = groups.setdefault((var.source, var.dtype), [])
        for expr in var.kernels().values():
            if expr not in names:
                names.append(expr)
    return [(f"{src}_{dt}", [src, *names]) for (src, dt), names in groups.items()]


def translation_unit(source: str, names: list[str]) -> str:
    lines = [f'#include "{source}.cu"', "", "// Taking each kernel's address instantiates it.",
             "extern void* const attnkit_instances[];",
             "void* const attnkit_instances[] = {"]
    lines += [f"    (void*)&{n}," for n in names]
    lines += ["};", ""]
    return "\n".join(lines)


def compile_one(nvcc: str, workdir: Path, name: str, source: str, names: list[str], arch: str):
    cu = workdir / f"{name}_sm{arch}.cu"
    cu.write_text(translation_unit(source, names))
    cmd = [nvcc, "-std=c++17", f"-arch=sm_{arch}", "-c", "-o", str(cu.with_suffix(".o")),
           f"-I{_compile.KERNEL_DIR}", "-Werror", "all-warnings", "-Xptxas", "-v", str(cu)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    entries = [m.group(1) for m in ENTRY.finditer(log) if m.group(2) == arch]
    regs = [int(x) for x in USAGE.findall(log)]
    spills = [int(x) for x in SPILL.findall(log)]
    # Non-template kernels of the source are compiled too, so there may be more entries.
    ok = proc.returncode == 0 and len(entries) >= len(names)
    return dict(unit=name, arch=arch, ok=ok, returncode=proc.returncode, kernels=len(names),
                entries=len(entries), max_regs=max(regs, default=0),
                max_spill=max(spills, default=0), seconds=time.time() - t0,
                log=log if not ok else "", cmd=" ".join(cmd))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help="SM arch, e.g. 80 (default: 80 and 90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true",
                    help="a subset (head dims 64 and 256, two mask combinations)")
    ap.add_argument("--nvcc", default=shutil.which("nvcc"))
    args = ap.parse_args(argv)
    if not args.nvcc:
        print("compile_all: nvcc not found on PATH", file=sys.stderr)
        return 2
    archs = args.arch or ["80", "90"]
    jobs = [(name, src_names[0], src_names[1:], arch)
            for name, src_names in units(args.quick) for arch in archs]
    print(f"compile_all: {len(jobs)} translation units, "
          f"{sum(len(j[2]) for j in jobs)} kernel instances, archs {archs}, "
          f"{args.jobs} jobs", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="attnkit_cupy_") as tmp, \
            ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(compile_one, args.nvcc, Path(tmp), *j) for j in jobs]
        for fut in futures:
            r = fut.result()
            status = "ok" if r["ok"] else "FAILED"
            print(f"  {status:6s} {r['unit']:16s} sm_{r['arch']}: {r['entries']}/{r['kernels']} "
                  f"kernels, max {r['max_regs']} registers, max spill {r['max_spill']} B, "
                  f"{r['seconds']:.1f} s", flush=True)
            if not r["ok"]:
                failed += 1
                print(f"    command: {r['cmd']}\n" + "\n".join(
                    "    " + line for line in r["log"].splitlines()[-60:]), flush=True)
    print(f"compile_all: {len(jobs) - failed}/{len(jobs)} units compiled"
          + (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
