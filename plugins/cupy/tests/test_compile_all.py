"""Every kernel source and template instance compiles with nvcc for sm_80 and sm_90
(tools/compile_all.py): what the plugin can ask NVRTC for is checked without a GPU."""

from __future__ import annotations

import os
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
    """Every unit for sm_80 and sm_90; each unit's head dims 64 and 256 only (the sample CI
    compiles) unless ATTNKIT_CUPY_COMPILE_ALL=1 asks for every instance."""
    quick = os.environ.get("ATTNKIT_CUPY_COMPILE_ALL") != "1"
    results = compile_all.compile_all(("80", "90"), quick=quick)
    assert len(results) == 2 * len(compile_all.units(quick))
    failed = [f"{r.describe()}\n{r.command}\n{r.log[-3000:]}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)


@pytest.mark.nvcc
def test_a_broken_instance_fails(tmp_path):
    """A name expression with no such kernel makes its unit fail: the check can fail."""
    r = compile_all.compile_unit(shutil.which("nvcc"), tmp_path, "forward_fp32", "forward",
                                 ["fwd_f32_kernel<64, false, false, 0>", "no_such_kernel<1>"],
                                 "80")
    assert not r.ok and r.returncode != 0 and "no_such_kernel" in r.log


def test_units_per_feature_set():
    """Packed, dropout, packed-with-dropout and paged kernels compile in their own units
    (their registers are reported apart from the plain kernels'), and a unit can be picked by
    name."""
    names = {name for name, _, _ in compile_all.units()}
    for src in ("forward", "backward"):
        for dt in ("fp16", "bf16", "fp32"):
            assert {f"{src}_{dt}", f"{src}_{dt}_varlen", f"{src}_{dt}_dropout",
                    f"{src}_{dt}_varlen_dropout"} <= names
    for dt in ("fp16", "bf16", "fp32"):
        assert {f"decode_{dt}", f"decode_{dt}_paged"} <= names
    assert {"decode_fp16_paged_whole", "decode_bf16_paged_whole"} <= names
    # fp32 reads pages row by row
    assert "decode_fp32_paged_whole" not in names and not any("chunks" in n for n in names)
    assert "decode_bf16_dropout" not in names and "forward_bf16_paged" not in names
    units = {name: exprs for name, _, exprs in compile_all.units()}
    assert all(e.endswith(", 1>") for e in units["decode_bf16_paged"] if "split" in e)
    assert all(e.endswith(", 2>") for e in units["decode_bf16_paged_whole"] if "split" in e)
    assert any(e.endswith("3>") for e in units["backward_fp32_varlen_dropout"])
    with pytest.raises(ValueError, match="no such unit"):
        compile_all.compile_all(("80",), only=["forward_bf16_nothing"], nvcc=sys.executable)


def test_kernel_usage_is_read_from_ptxas_output():
    log = ("ptxas info    : Compiling entry function '_Z3fooILi1EEvv' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooILi1EEvv\n"
           "    16 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n"
           "ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3barv\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 40 registers\n")
    r = compile_all.UnitResult("u", "90", 0, 2, 2, 255, 12, 0.0, "", log)
    usage = r.kernel_usage()
    assert [(regs, spill) for _, regs, spill in usage] == [(255, 12), (40, 0)]
    if shutil.which("c++filt"):
        assert usage[1][0] == "bar()"
