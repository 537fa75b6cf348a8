"""The attention-dropout variants of the `tl` kernels against the GPUs the tables are chosen
for, without those GPUs (tools/compile_tables.py): the mask's Philox and its expansion add
registers and may add layout conversions through shared memory, so every table tile must
still compile and fit with DROPOUT on."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

import compile_tables  # noqa: E402


def test_every_dropout_variant_fits_its_gpu():
    results = compile_tables.check_tables((86, 90, 120), dropout=True)
    assert all(r.fits for r in results), "\n".join(r.describe() for r in results
                                                     if not r.fits)
    assert len(results) >= 3 * 5 * 3 * 2
    assert all(r.entry.dropout and r.entry.kernel != "decode" for r in results)
    assert all(r.registers > 0 for r in results)
