"""What torch-blocked may and may not read: keys that exist for no query (beyond
``seqlens_k[b]``, or outside every row's band) never reach a result, whatever they hold, and a
NaN query row is NaN in ``out`` and ``lse``."""

from __future__ import annotations

import pytest
import torch
from attnkit_torch_blocked import blocked
from attnkit_torch_blocked.blocked import BlockSizes, blocked_backward, blocked_forward

import attnkit
from attnkit import reference
from attnkit.spec import AttentionProblem

SMALL = BlockSizes(16, 24)

# (B, Hq, Hkv, Sq, Sk, options, seqlens_k): each has dead keys, most inside visited tiles.
CASES = {
    "decode-seqlens": (2, 1, 1, 1, 16, {}, [4, 16]),
    "causal-seqlens-gqa": (4, 4, 2, 40, 70, dict(causal=True), [9, 64, 3, 41]),
    "window-seqlens": (4, 2, 1, 40, 70, dict(causal=True, window=(5, 0)), [9, 64, 3, 41]),
    "two-sided-window-seqlens": (4, 2, 2, 30, 70, dict(window=(6, 2)), [70, 33, 0, 50]),
    "window-no-seqlens": (2, 2, 2, 20, 90, dict(window=(3, 1)), None),
    "causal-sq-gt-sk-seqlens": (3, 2, 1, 50, 30, dict(causal=True), [30, 12, 25]),
    "softcap-seqlens": (3, 2, 2, 30, 50, dict(causal=True, softcap=5.0), [50, 20, 7]),
}


def _tensors(case, dtype, seed=0):
    B, Hq, Hkv, Sq, Sk, opts, lens = case
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(B, h, s, 16, generator=g).to(dtype)
                     for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk), (Hq, Sq)))
    seq = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    opts = dict(opts, seqlens_k=seq)
    vis = reference.visible_mask(Sq, Sk, causal=opts.get("causal", False),
                                 window=opts.get("window"), seqlens_k=seq)
    dead = ~vis.any(-2).unsqueeze(-1)  # (B or 1, 1, Sk, 1): keys no row of the batch sees
    return q, k, v, dout, opts, dead.expand(B, Hkv, Sk, 16)


def _run(q, k, v, dout, blocks, mixed=None, **opts):
    problem = AttentionProblem.from_tensors(q, k, v, needs_grad=True, **opts)
    kw = dict(scale=problem.scale, band=problem.band, seqlens_k=opts["seqlens_k"],
              softcap=problem.softcap, blocks=blocks, mixed=mixed)
    out, lse = blocked_forward(q, k, v, **kw)
    return (out, lse, *blocked_backward(q, k, v, out, lse, dout, **kw))


def _assert_dead_keys_unread(case, dtype, poison, blocks, mixed=None):
    q, k, v, dout, opts, dead = _tensors(case, dtype)
    assert dead.any()
    clean = _run(q, k, v, dout, blocks, mixed, **opts)
    k2 = k.masked_fill(dead, -poison if poison == float("inf") else poison)
    v2 = v.masked_fill(dead, poison)
    dirty = _run(q, k2, v2, dout, blocks, mixed, **opts)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), clean, dirty):
        assert not torch.isnan(b).any(), name
        assert torch.equal(a, b), f"{name} changed by what dead keys hold"
    for name, g in (("dk", dirty[3]), ("dv", dirty[4])):
        assert (g[dead] == 0).all(), f"{name} of dead keys is not 0"


@pytest.fixture(params=["per-batch", "select"])
def dead_key_path(request, monkeypatch):
    """Both ways of keeping dead keys out of a product: contracting each batch over its seen
    keys (CPU), and one selection pass zeroing them in the tile's K/V (other devices)."""
    if request.param == "select":
        init = blocked._Band.__init__

        def no_per_batch(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.per_batch = False

        monkeypatch.setattr(blocked._Band, "__init__", no_per_batch)
    return request.param


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 3e38])
@pytest.mark.parametrize("name", list(CASES))
def test_dead_keys_are_never_read(name, poison, dead_key_path):
    _assert_dead_keys_unread(CASES[name], torch.float32, poison, SMALL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["decode-seqlens", "window-seqlens"])
def test_dead_keys_are_never_read_in_every_dtype(name, dtype):
    _assert_dead_keys_unread(CASES[name], dtype, float("nan"), SMALL)


@pytest.mark.parametrize("name", list(CASES))
def test_dead_keys_with_default_blocks(name):
    _assert_dead_keys_unread(CASES[name], torch.float32, float("nan"), None)


def test_dead_keys_on_the_mixed_path(monkeypatch, dead_key_path):
    """Half GEMM operands with fp32 results (the CUDA path), emulated on CPU."""
    monkeypatch.setattr(blocked, "_bmm_fp32_out", lambda a, b: torch.bmm(a.float(), b.float()))
    for name in ("decode-seqlens", "two-sided-window-seqlens"):
        _assert_dead_keys_unread(CASES[name], torch.float16, float("nan"), SMALL, mixed=True)


def test_dead_keys_through_the_api():
    q = torch.randn(2, 1, 1, 8)
    k, v = torch.randn(2, 1, 16, 8), torch.randn(2, 1, 16, 8)
    lens = torch.tensor([4, 16], dtype=torch.int32)
    want = attnkit.attention(q, k, v, seqlens_k=lens, backend="torch-blocked")
    k[0, :, 4:] = v[0, :, 4:] = float("nan")
    got = attnkit.attention(q, k, v, seqlens_k=lens, backend="torch-blocked")
    assert torch.equal(got, want)


def test_only_tiles_with_dead_keys_select():
    cpu = torch.device("cpu")
    geo = blocked._Band(40, 70, (5, 0), torch.tensor([9, 64, 3, 41]), cpu)
    # Batch 1 sees keys [19, 63], batch 2 [0, 2]: every key of [0, 70) is dead somewhere.
    assert geo.has_dead_keys(0, 10) and geo.has_dead_keys(20, 30)
    assert geo.seen_columns(10, 30) == [(0, 0), (9, 20), (0, 0), (0, 20)]
    dead = geo.drop_dead_keys(torch.ones(4, 1, 20, 1), 10, 30)[:, 0, :, 0] == 0
    assert dead.tolist() == [[True] * 20, [True] * 9 + [False] * 11, [True] * 20,
                             [False] * 20]
    assert not blocked._Band(40, 70, (None, 0), None, cpu).has_dead_keys(0, 70)
    window = blocked._Band(20, 90, (3, 1), None, cpu)  # rows see keys [67, 90)
    assert not window.has_dead_keys(67, 90) and window.has_dead_keys(66, 90)
    assert window.seen_columns(60, 90) == [(7, 30)]


@pytest.mark.parametrize("name", ["causal-seqlens-gqa", "window-seqlens", "decode-seqlens"])
def test_nan_query_row_is_nan(name):
    q, k, v, dout, opts, _ = _tensors(CASES[name], torch.float32)
    vis = reference.visible_mask(q.shape[2], k.shape[2], causal=opts.get("causal", False),
                                 window=opts.get("window"), seqlens_k=opts["seqlens_k"])
    seen = vis.any(-1).expand(q.shape[:3])  # rows that see a key
    nan_rows = torch.zeros(q.shape[:3], dtype=torch.bool)
    nan_rows[0, 0, -1] = nan_rows[1, -1, 0] = True
    nan_rows &= seen
    assert nan_rows.any()
    q2 = q.clone()
    q2[nan_rows] = float("nan")
    for blocks in (SMALL, None):
        out, lse = _run(q, k, v, dout, blocks, **opts)[:2]
        out2, lse2 = _run(q2, k, v, dout, blocks, **opts)[:2]
        assert out2[nan_rows].isnan().all() and lse2[nan_rows].isnan().all()
        assert torch.equal(out2[~nan_rows], out[~nan_rows])
        assert torch.equal(lse2[~nan_rows], lse[~nan_rows])
