"""Attention dropout compiled on a GPU (``cuda``; run without TRITON_INTERPRET): shapes the
Gluon and split-KV kernels take without dropout go to the masked `tl` kernels, the kept
backward launch sites pass the call's state (repeated seeds give the same bits, and the
result stays the reference's with that mask), and CUDA-graph replays draw fresh masks."""

import pytest
import torch

import attnkit
from attnkit import reference
from attnkit.dropout import Dropout, draw_state
from attnkit.testing.accuracy import GRAD_FACTOR, assert_close

pytestmark = pytest.mark.cuda

P = 0.1


def _run(q, k, v, seed, **opts):
    return attnkit.attention(q, k, v, dropout_p=P, backend="triton",
                             generator=torch.Generator("cuda").manual_seed(seed), **opts)


def _against_reference(q, k, v, dout, seed, got, grads, **opts):
    drop = Dropout(P, draw_state(q.device, torch.Generator("cuda").manual_seed(seed)))

    def ref(dt):
        ins = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, _ = reference.safe(*ins, **opts, dropout=drop)
        return o, torch.autograd.grad(o, ins, dout.to(dt))

    (o64, g64), (olp, glp) = ref(torch.float64), ref(q.dtype)
    assert_close("out", got, o64, olp, q.dtype)
    for name, a, b64, blp in zip("qkv", grads, g64, glp):
        assert_close(f"d{name}", a, b64, blp, q.dtype, factor=GRAD_FACTOR)


@pytest.mark.parametrize("causal", [False, True])
def test_training_shape_repeats_and_matches_reference(causal):
    """bf16 at head dim 128 and 1024 tokens: the Gluon kernels' shape on sm_90 without
    dropout. Three calls with one seed (the later two through the kept launch sites) give
    the same bits, and those are the reference's with the materialised mask."""
    g = torch.Generator("cuda").manual_seed(1)
    q, k, v = (torch.randn((2, 4, 1024, 128), generator=g, device="cuda", dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    dout = torch.randn(q.shape, generator=g, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(3):
        out = _run(q, k, v, 7, causal=causal)
        runs.append((out, torch.autograd.grad(out, (q, k, v), dout)))
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))
    _against_reference(q, k, v, dout, 7, *runs[-1], causal=causal)
    other = _run(q, k, v, 8, causal=causal)
    assert not torch.equal(other, runs[0][0])


def test_decode_shape_matches_reference():
    g = torch.Generator("cuda").manual_seed(2)
    q = torch.randn((1, 8, 1, 64), generator=g, device="cuda", dtype=torch.float16)
    k, v = (torch.randn((1, 2, 4096, 64), generator=g, device="cuda", dtype=torch.float16)
            for _ in range(2))
    out = _run(q, k, v, 3)
    drop = Dropout(P, draw_state(q.device, torch.Generator("cuda").manual_seed(3)))
    r64, _ = reference.safe(q.double(), k.double(), v.double(), dropout=drop)
    rlp, _ = reference.safe(q, k, v, dropout=drop)
    assert_close("out", out, r64, rlp, torch.float16)


def test_graph_replays_draw_fresh_masks():
    """A captured call reads its state from device memory: each replay's draw is new, so
    the masks differ, and each keeps about 1 - p."""
    S = 64
    q = torch.zeros(2, 3, 128, S, dtype=torch.float16, device="cuda")
    eye = torch.eye(S, dtype=torch.float16, device="cuda").expand(2, 3, S, S)
    attnkit.attention(q, eye, eye, dropout_p=P, backend="triton")  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attnkit.attention(q, eye, eye, dropout_p=P, backend="triton")
    masks = []
    for _ in range(3):
        graph.replay()
        masks.append((out > 0.5 / S).cpu())
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    for m in masks:
        assert abs(m.float().mean().item() - (1 - P)) < 0.01
