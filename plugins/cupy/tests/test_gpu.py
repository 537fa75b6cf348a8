"""GPU tests (skipped without CUDA): accuracy on a few cases, strides, and a side stream.

The full grid runs with ``attnkit check cupy --device cuda`` and scripts/check_cuda.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.testing.cases import Case

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not attnkit.backends()["cupy"].availability[0],
    reason="needs a CUDA GPU usable by the cupy backend")


@pytest.mark.parametrize("case", [
    Case(dtype=torch.float16, batch=2, heads_q=4, heads_kv=2, seqlen_q=97, seqlen_k=130,
         head_dim=64, causal=True, seqlens_k="random"),
    Case(dtype=torch.bfloat16, batch=1, heads_q=2, heads_kv=1, seqlen_q=70, seqlen_k=90,
         head_dim=128, window=(16, 8), softcap=15.0, layout="bshd"),
    Case(dtype=torch.float32, batch=2, heads_q=2, heads_kv=1, seqlen_q=50, seqlen_k=37,
         head_dim=40, causal=True, seqlens_k="mixed"),
], ids=lambda c: c.id)
def test_matches_reference(case):
    import check_cuda

    assert check_cuda.run_case(case) == []


def test_side_stream():
    import check_cuda

    assert check_cuda.side_stream_test() == []
