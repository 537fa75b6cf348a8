"""GPU tests of the cupy backend (``cuda``: skipped without a GPU it can use): a few cases
under the accuracy rule, and the side-stream check. The whole grid, and the checks only a
GPU can pose, run with ``attnkit check cupy --device cuda``."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.testing import checks, cuda_checks
from attnkit.testing.cases import Case

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("case", [
    Case(dtype=torch.float16, batch=2, heads_q=4, heads_kv=2, seqlen_q=97, seqlen_k=130,
         head_dim=64, causal=True, seqlens_k="random"),
    Case(dtype=torch.bfloat16, batch=1, heads_q=2, heads_kv=1, seqlen_q=70, seqlen_k=90,
         head_dim=128, window=(16, 8), softcap=15.0, layout="bshd"),
    Case(dtype=torch.float32, batch=2, heads_q=2, heads_kv=1, seqlen_q=50, seqlen_k=37,
         head_dim=40, causal=True, seqlens_k="mixed"),
], ids=lambda c: c.id)
def test_matches_reference(case):
    checks.matches_reference(case, attnkit.backends()["cupy"].backend, "cuda")


def test_side_stream():
    cuda_checks.side_stream("cupy", "cuda")
