"""examples/context_parallel_training.py: a sharded run trains like the whole sequence."""

import os
import subprocess
import sys
from pathlib import Path

from test_distributed import fast_backend

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "context_parallel_training.py"


def test_sharded_training_matches_the_whole_sequence():
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(EXAMPLE), "--world", "2", "--method",
                           "allgather", "--layout", "contiguous", "--steps", "2",
                           "--backend", fast_backend()],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("largest relative gradient difference") == 2, done.stdout
