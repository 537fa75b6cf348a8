"""The tuned tables against the GPUs they are chosen for, without those GPUs
(tools/compile_tables.py): every configuration compiles for sm_86 (the default tables on
pointers, 99 KB of shared memory per block), sm_90 (the Hopper tables, TMA) and sm_120 (the
default tables through TMA, 99 KB), and fits that GPU's shared memory; Triton would refuse
to launch one that does not."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

import compile_tables  # noqa: E402


def test_every_table_configuration_fits_its_gpu():
    results = compile_tables.check_tables((86, 90, 120))
    assert all(r.fits for r in results), "\n".join(r.describe() for r in results
                                                     if not r.fits)
    # Every padded head dim, three kernels and the decode kernel, two dtype classes, 3 GPUs.
    assert len(results) >= 3 * 5 * 4 * 2
    assert {r.entry.kernel for r in results} == set(compile_tables.KERNELS)
    assert all(r.registers > 0 for r in results)


def test_every_varlen_variant_fits_its_gpu():
    """The varlen kernels take the same tiles and load paths (one more pointer and a few
    scalars live): they must compile and fit too."""
    results = compile_tables.check_tables((86, 90, 120), varlen=True)
    assert all(r.fits for r in results), "\n".join(r.describe() for r in results
                                                     if not r.fits)
    assert len(results) >= 3 * 5 * 3 * 2
    assert all(r.entry.varlen and r.entry.kernel != "decode" for r in results)
    assert any(r.entry.tma for r in results) and not all(r.entry.tma for r in results)


def test_a_configuration_over_the_limit_fails():
    """fp32's former dQ tile at head dim 256 (32x32, 4 warps) needs 128 KB: over sm_86's 99 KB."""
    r = compile_tables.compile_tile("dq", "fp32", 256, (32, 32, 4, 1), arch=86)
    assert r.error is None, r.error
    assert (r.shared, r.limit, r.fits) == (131072, 101376, False), r.describe()
    assert "shared 131072 B of 101376 OVER THE LIMIT" in r.describe()
