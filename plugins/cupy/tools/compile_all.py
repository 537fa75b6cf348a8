#!/usr/bin/env python
"""Compile every kernel source and every template instance the cupy backend can ask for with
nvcc, for sm_80 and sm_90, so a syntax, template or ptxas error shows without a GPU.

For each (source, dtype, feature set) a translation unit includes the .cu file and takes the
address of each kernel instance (its name expression, exactly as the plugin hands it to
NVRTC), which forces the instantiation; ptxas runs with -v and the compiled entry functions are
counted against the instances. `compile_all` returns one `UnitResult` per unit and arch;
``--registers`` lists every kernel's registers and spills (`UnitResult.kernel_usage`).

    python plugins/cupy/tools/compile_all.py [--arch 80 --arch 90] [--jobs N] [--quick]
        [--registers] [--only forward_bf16_dropout ...]
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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # attnkit_cupy, installed or not

from attnkit_cupy import _compile  # noqa: E402

ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
USAGE = re.compile(r"Used (\d+) registers")
SPILL = re.compile(r"(\d+) bytes spill stores")
#: ptxas -v, per entry: its name, then its stack/spill line, then its register count.
KERNEL_USAGE = re.compile(r"Compiling entry function '([^']+)' for 'sm_\d+'.*?"
                          r"(\d+) bytes spill stores.*?Used (\d+) registers", re.S)
#: Unit name suffix of each feature set (_compile.FEAT_*).
FEATURE_NAMES = {
    0: "", _compile.FEAT_VARLEN: "_varlen", _compile.FEAT_DROPOUT: "_dropout",
    _compile.FEAT_VARLEN | _compile.FEAT_DROPOUT: "_varlen_dropout",
    _compile.FEAT_PAGED: "_paged", _compile.FEAT_PAGED | _compile.FEAT_WHOLE_PAGES: "_paged_whole"}


@dataclass(frozen=True)
class UnitResult:
    """One translation unit (a source and dtype) compiled for sm_``arch``."""

    unit: str  # "forward_bf16"
    arch: str
    returncode: int
    kernels: int  # template instances asked for
    entries: int  # entry functions ptxas compiled for the arch
    max_registers: int
    max_spill_bytes: int
    seconds: float
    command: str
    log: str  # nvcc's output

    @property
    def ok(self) -> bool:
        # Non-template kernels of the source are compiled too, so there may be more entries.
        return self.returncode == 0 and self.entries >= self.kernels

    def kernel_usage(self) -> list[tuple[str, int, int]]:
        """``(kernel, registers, spill store bytes)`` per compiled entry (names demangled
        when c++filt is on PATH)."""
        found = [(m.group(1), int(m.group(3)), int(m.group(2)))
                 for m in KERNEL_USAGE.finditer(self.log)]
        filt = shutil.which("c++filt")
        if filt and found:
            names = subprocess.run([filt], input="\n".join(n for n, _, _ in found),
                                   capture_output=True, text=True).stdout.splitlines()
            if len(names) == len(found):
                found = [(n, r, s) for n, (_, r, s) in zip(names, found)]
        return found

    def describe(self) -> str:
        return (f"{'ok' if self.ok else 'FAILED':6s} {self.unit:24s} sm_{self.arch}: "
                f"{self.entries}/{self.kernels} kernels, max {self.max_registers} registers, "
                f"max spill {self.max_spill_bytes} B, {self.seconds:.1f} s")


def units(quick: bool = False) -> list[tuple[str, str, list[str]]]:
    """``(unit name, source, name expressions)`` per (source, dtype, feature set), e.g.
    ``forward_bf16`` or ``backward_fp16_dropout``; ``quick``: head dims 64 and 256 with two
    of the four mask combinations."""
    groups: dict[tuple[str, str, int], list[str]] = {}
    seen: set[str] = set()  # the delta kernels serve every feature set: listed once
    for var in _compile.all_variants():
        if quick and (var.dp not in (64, 256) or var.band != var.softcap):
            continue
        names = groups.setdefault((var.source, var.dtype, var.feat), [])
        for expr in var.kernels().values():
            if expr not in seen:
                seen.add(expr)
                names.append(expr)
    return [(f"{src}_{dt}{FEATURE_NAMES[feat]}", src, names)
            for (src, dt, feat), names in groups.items()]


def translation_unit(source: str, names: list[str]) -> str:
    lines = [f'#include "{source}.cu"', "", "// Taking each kernel's address instantiates it.",
             "extern void* const attnkit_instances[];",
             "void* const attnkit_instances[] = {"]
    lines += [f"    (void*)&{n}," for n in names]
    lines += ["};", ""]
    return "\n".join(lines)


def compile_unit(nvcc: str, workdir: Path, name: str, source: str, names: list[str],
                 arch: str) -> UnitResult:
    cu = workdir / f"{name}_sm{arch}.cu"
    cu.write_text(translation_unit(source, names))
    cmd = [nvcc, "-std=c++17", f"-arch=sm_{arch}", "-c", "-o", str(cu.with_suffix(".o")),
           f"-I{_compile.KERNEL_DIR}", "-Werror", "all-warnings", "-Xptxas", "-v", str(cu)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    return UnitResult(
        unit=name, arch=arch, returncode=proc.returncode, kernels=len(names),
        entries=sum(m.group(2) == arch for m in ENTRY.finditer(log)),
        max_registers=max(map(int, USAGE.findall(log)), default=0),
        max_spill_bytes=max(map(int, SPILL.findall(log)), default=0),
        seconds=time.time() - t0, command=" ".join(cmd), log=log)


def compile_all(archs=("80", "90"), jobs: int | None = None, quick: bool = False,
                nvcc: str | None = None, only=None) -> list[UnitResult]:
    """Every unit (or those named in ``only``) for every arch, ``jobs`` nvcc processes at a
    time (default: one per CPU). Raises ``FileNotFoundError`` without nvcc (``nvcc`` or on
    PATH), ``ValueError`` for an unknown unit in ``only``."""
    nvcc = nvcc or shutil.which("nvcc")
    if not nvcc:
        raise FileNotFoundError("nvcc not found on PATH")
    chosen = units(quick)
    if only:
        unknown = set(only) - {name for name, _, _ in chosen}
        if unknown:
            raise ValueError(f"no such unit: {sorted(unknown)}; units are "
                             f"{[name for name, _, _ in chosen]}")
        chosen = [u for u in chosen if u[0] in set(only)]
    todo = [(name, src, names, str(arch)) for name, src, names in chosen for arch in archs]
    with tempfile.TemporaryDirectory(prefix="attnkit_cupy_") as tmp, \
            ThreadPoolExecutor(max_workers=max(1, jobs or os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda job: compile_unit(nvcc, Path(tmp), *job), todo))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help="SM arch, e.g. 80 (default: 80 and 90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true",
                    help="a subset (head dims 64 and 256, two mask combinations)")
    ap.add_argument("--nvcc", default=None, help="default: nvcc on PATH")
    ap.add_argument("--registers", action="store_true",
                    help="list every kernel's registers and spill stores")
    ap.add_argument("--only", action="append", help="compile only this unit (repeatable)")
    args = ap.parse_args(argv)
    try:
        results = compile_all(args.arch or ("80", "90"), args.jobs, args.quick, args.nvcc,
                              args.only)
    except (FileNotFoundError, ValueError) as e:
        print(f"compile_all: {e}", file=sys.stderr)
        return 2
    for r in results:
        print("  " + r.describe())
        if args.registers:
            for name, regs, spill in r.kernel_usage():
                print(f"      {regs:3d} registers, {spill:4d} B spill  {name}")
        if not r.ok:
            print(f"    command: {r.command}\n" + "\n".join(
                "    " + line for line in r.log.splitlines()[-60:]))
    failed = sum(not r.ok for r in results)
    print(f"compile_all: {len(results) - failed}/{len(results)} units compiled, "
          f"{sum(r.kernels for r in results)} kernel instances"
          + (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
