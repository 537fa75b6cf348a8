"""Dropout on packed batches compiled for the GPU (``cuda``; run without TRITON_INTERPRET):
a long-tailed packing against the per-sequence reference with each sequence's mask, equal
lengths bit for bit the dense dropout call's, and CUDA-graph replays of a packed call
drawing fresh masks::

    pytest plugins/triton/tests/test_varlen_dropout_gpu.py
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.dropout import Dropout, draw_state
from attnkit.testing.accuracy import GRAD_FACTOR, OUT_FACTOR, assert_close
from attnkit.testing.varlen_cases import VarlenCase

pytestmark = pytest.mark.cuda

P = 0.1
LONG_TAIL = (1500, 700, *([37] * 12), 1, 0, 129, 64)


def _gen(seed):
    return torch.Generator("cuda").manual_seed(seed)


@pytest.mark.parametrize("case", [
    VarlenCase(LONG_TAIL, heads_q=8, heads_kv=2, head_dim=128, dtype=torch.bfloat16,
               causal=True),
    VarlenCase((100, 257, 0, 31, 640), (300, 0, 512, 77, 200), heads_q=4, heads_kv=1,
               head_dim=64, dtype=torch.float16, window=(100, 20), slack=64),
], ids=lambda c: c.id)
def test_long_tail_matches_reference_and_repeats(case):
    q, k, v, cu_q, cu_k = case.make_inputs("cuda", torch.Generator().manual_seed(0))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to("cuda", q.dtype)
    runs = []
    for _ in range(2):
        out = attnkit.attention_varlen(q, k, v, cu_q, cu_k, **case.call_args(), dropout_p=P,
                                       generator=_gen(7), backend="triton")
        runs.append((out, torch.autograd.grad(out, (q, k, v), dout)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    drop = Dropout(P, draw_state(q.device, _gen(7)))
    ref64 = case.reference(q, k, v, torch.float64, dout, dropout=drop)
    ref_lp = case.reference(q, k, v, q.dtype, dout, dropout=drop)
    out, grads = runs[0]
    assert_close(f"{case.id} out", out, ref64[0], ref_lp[0], q.dtype, factor=OUT_FACTOR)
    for name, g, g64, glp in zip("qkv", grads, ref64[2], ref_lp[2]):
        assert_close(f"{case.id} d{name}", g, g64, glp, q.dtype, factor=GRAD_FACTOR)


def test_equal_lengths_match_the_dense_dropout_call_bit_for_bit():
    B, S, Hq, Hkv, D = 4, 513, 4, 1, 64
    g = torch.Generator("cuda").manual_seed(3)
    q = torch.randn(B * S, Hq, D, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B * S, Hkv, D, generator=g, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    cu = torch.arange(0, B * S + 1, S, dtype=torch.int32, device="cuda")
    out = attnkit.attention_varlen(q, k, v, cu, cu, S, S, causal=True, dropout_p=P,
                                   generator=_gen(5), backend="triton")
    dense = attnkit.attention(*(t.view(B, S, t.shape[1], D).transpose(1, 2) for t in (q, k, v)),
                              causal=True, dropout_p=P, generator=_gen(5), backend="triton")
    assert torch.equal(out, dense.transpose(1, 2).reshape(out.shape))


def test_graph_replays_of_a_packed_call_draw_fresh_masks():
    """q = 0, v one-hot: each replay's mask is read back; they differ and keep about 1 - p."""
    S, H = 64, 3
    lens = (40, 64, 7)
    q = torch.zeros(sum(lens), H, S, dtype=torch.float16, device="cuda")
    eye = torch.eye(S, dtype=torch.float16, device="cuda")
    v = torch.cat([eye[:n] for n in lens]).unsqueeze(1).expand(-1, H, -1).contiguous()
    cu = torch.tensor([0, 40, 104, 111], dtype=torch.int32, device="cuda")

    def call():
        return attnkit.attention_varlen(q, v, v, cu, cu, S, S, dropout_p=P, backend="triton")

    call()  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    masks = []
    for _ in range(3):
        graph.replay()
        masks.append((out[40:104] > 0.5 / 64).cpu())  # the 64-key sequence
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    for m in masks:
        assert abs(m.float().mean().item() - (1 - P)) < 0.02
