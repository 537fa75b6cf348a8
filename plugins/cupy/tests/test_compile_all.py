"""Every kernel source and template instance compiles with nvcc for sm_80 and sm_90
(tools/compile_all.py): what the plugin can ask NVRTC for is checked without a GPU."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import compile_all  # noqa: E402


def test_units_name_every_kernel_instance_once():
    from attnkit_cupy import _compile

    found = [expr for _, _, names in compile_all.units() for expr in names]
    assert len(found) == len(set(found))
    assert set(found) == {e for v in _compile.all_variants() for e in v.kernels().values()}
    quick = compile_all.units(quick=True)
    assert {name for name, _, _ in quick} == {name for name, _, _ in compile_all.units()}
    assert sum(len(n) for _, _, n in quick) < len(found)


@pytest.mark.nvcc
def test_every_kernel_instance_compiles_with_nvcc():
    results = compile_all.compile_all(("80", "90"))
    assert len(results) == 2 * len(compile_all.units())
    failed = [f"{r.describe()}\n{r.command}\n{r.log[-3000:]}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)


@pytest.mark.nvcc
def test_a_broken_instance_fails(tmp_path):
    """A name expression with no such kernel makes its unit fail: the check can fail."""
    r = compile_all.compile_unit(shutil.which("nvcc"), tmp_path, "forward_fp32", "forward",
                                 ["fwd_f32_kernel<64, false, false>", "no_such_kernel<1>"],
                                 "80")
    assert not r.ok and r.returncode != 0 and "no_such_kernel" in r.log
