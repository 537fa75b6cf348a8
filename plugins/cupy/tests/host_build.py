"""Pieces of the CUDA sources compiled for the host, for tests that need no GPU."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from attnkit_cupy import _compile


def kernel_text(file: str, pattern: str, what: str) -> str:
    """The text of ``file`` (under the kernel directory) that ``pattern`` matches, multi-line."""
    m = re.search(pattern, (_compile.KERNEL_DIR / file).read_text(), re.S | re.M)
    assert m, f"{what} not found in {file}"
    return m.group(0)


def build_host(directory: Path, name: str, source: str, *flags: str) -> Path:
    """``source`` compiled by the host's C++ compiler into ``directory/name``."""
    cxx = shutil.which("c++") or shutil.which("g++")
    assert cxx, "no host C++ compiler"
    src = directory / f"{name}.cpp"
    src.write_text(source)
    exe = directory / name
    proc = subprocess.run([cxx, *flags, "-Wno-unknown-pragmas", "-o", str(exe), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe
