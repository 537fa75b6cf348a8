"""The tuned tables against the GPUs they are chosen for, without those GPUs
(scripts/compile_tables.py): every configuration compiles for sm_86 (the default tables on
pointers, 99 KB of shared memory per block), sm_90 (the Hopper tables, TMA) and sm_120 (the
default tables through TMA, 99 KB), and fits that GPU's shared memory; Triton would refuse
to launch one that does not."""

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "compile_tables.py"
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, capture_output=True,
                          text=True, timeout=1800)


def test_every_table_configuration_fits_its_gpu():
    r = _run("--arch", "86", "--arch", "90", "--arch", "120")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    done = re.search(r"(\d+)/(\d+) table configurations compile and fit", r.stdout)
    assert done and done[1] == done[2], r.stdout[-3000:]
    # Every padded head dim, three kernels and the decode kernel, two dtype classes, 3 GPUs.
    assert int(done[2]) >= 3 * 5 * 4 * 2, r.stdout[-3000:]


def test_a_configuration_over_the_limit_fails():
    """fp32's former dQ tile at head dim 256 (32x32, 4 warps) needs 128 KB: over sm_86's 99 KB."""
    r = _run("--arch", "86", "--kernel", "dq", "--dtype", "fp32", "--head-dim", "256",
             "--tile", "32,32,4,1")
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "shared memory 131072 B of 101376 OVER THE LIMIT" in r.stdout, r.stdout
