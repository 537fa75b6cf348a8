"""The varlen kernels compiled for the GPU, with the interpreter tests' checks
(`varlen_checks`) at sizes that cross the GPU tables' 64- and 128-row tiles: each case
through the backend's route and, where tensor descriptors can apply (sm_90+, power-of-two
head dims, 16-byte strides), with them forced on and off; and equal lengths bit for bit
against the dense `tl` kernels. Run without TRITON_INTERPRET, in a process of its own::

    pytest plugins/triton/tests/test_varlen_gpu.py
"""

from __future__ import annotations

import pytest
import torch
from varlen_checks import (
    VarlenCase,
    check,
    check_equal_lengths_bitwise,
    through_backend,
    through_descriptors,
)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

pytestmark = pytest.mark.cuda

LONG_TAIL = (1500, 700, *([37] * 12), 1, 0, 129, 64)

CASES = [
    # A long-tailed mix: two long documents, many short ones, a single token and an empty.
    VarlenCase(LONG_TAIL, LONG_TAIL, 8, 2, 128, BF16, causal=True, expect_masked_rows=False),
    VarlenCase(LONG_TAIL, LONG_TAIL, 4, 4, 64, F16),
    # Queries and keys of other lengths, a zero-length key sequence between two others,
    # zero-length queries whose keys nobody sees, bounds above the longest lengths.
    VarlenCase((100, 257, 0, 31, 640), (300, 0, 512, 77, 200), 4, 1, 128, BF16, causal=True,
               slack=64, expect_poison=True, expect_masked_rows=True),
    # A window with softcap, read from one packed qkv projection.
    VarlenCase((333, 1, 900, 64), (333, 1, 900, 64), 8, 2, 128, BF16, window=(100, 20),
               softcap=10.0, layout="qkv"),
    # A causal window over keys longer than the queries: the first keys are seen by none.
    VarlenCase((64, 300, 5), (500, 300, 700), 4, 2, 64, F16, causal=True, window=(50, 0),
               expect_poison=True),
    # fp32 (true fp32 products), an odd head dim through pointers, head-dim strides.
    VarlenCase((513, 2, 0, 300), (513, 2, 0, 300), 2, 2, 64, F32, causal=True),
    VarlenCase((200, 45, 390), (260, 45, 100), 4, 2, 72, BF16, causal=True,
               layout="strided", expect_masked_rows=True),
]


def _descriptors_apply(case: VarlenCase) -> bool:
    return (torch.cuda.get_device_capability() >= (9, 0) and case.layout != "strided"
            and case.head_dim & (case.head_dim - 1) == 0)


@pytest.mark.parametrize("tma", ["auto", "0"], ids=["auto", "pointers"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_varlen_matches_dense_reference_per_sequence(case, tma, monkeypatch):
    monkeypatch.setenv("ATTNKIT_TRITON_TMA", tma)
    check(case, through_backend, "cuda")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_varlen_through_tensor_descriptors(case):
    if not _descriptors_apply(case):
        pytest.skip("tensor descriptors need sm_90+, a power-of-two head dim and unit "
                    "head-dim stride")
    check(case, through_descriptors, "cuda")


@pytest.mark.parametrize("D,causal", [(64, False), (128, True), (128, False)])
def test_equal_lengths_match_the_dense_kernels_bit_for_bit(D, causal, monkeypatch):
    for switch in ("ATTNKIT_TRITON_GLUON", "ATTNKIT_TRITON_GLUON_BWD"):
        monkeypatch.setenv(switch, "0")  # the dense call on the `tl` kernels, as varlen's
    check_equal_lengths_bitwise(3, 640, 8, 2, D, BF16, causal, "cuda")
