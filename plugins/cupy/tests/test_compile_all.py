"""CI: every kernel source and template instance compiles with nvcc for sm_80 and sm_90."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_all.py"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_every_kernel_instance_compiles_with_nvcc():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "FAILED" not in proc.stdout
