"""The Gluon Hopper forward: it compiles for sm_90 with this Triton (no GPU needed), the
dispatch says why it does not apply, and on an sm_90 GPU it matches the tl forward."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attnkit_triton import _hopper

import attnkit
from attnkit import reference
from attnkit.spec import AttentionProblem

SCRIPT = Path(__file__).parents[1] / "scripts" / "compile_gluon.py"


def test_gluon_forward_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "8/8 variants compiled for sm_90" in r.stdout


def _problem(**kw):
    base = dict(batch=2, heads_q=4, heads_kv=2, seqlen_q=256, seqlen_k=256, head_dim=128,
                dtype=torch.bfloat16, device=torch.device("cpu"), causal=True, scale=0.1)
    base.update(kw)
    return AttentionProblem(**base)


def test_gluon_dispatch_explains_refusals(monkeypatch):
    q = torch.empty(2, 4, 256, 128, dtype=torch.bfloat16)
    kv = torch.empty(2, 2, 256, 128, dtype=torch.bfloat16)
    assert not _hopper.use_gluon(_problem(), q, kv, kv)
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON", "1")
    with pytest.raises(ValueError, match="not on a CUDA device") as e:
        _hopper.use_gluon(_problem(head_dim=96, seqlen_k=300, softcap=5.0), q, kv, kv)
    for words in ("head dim 96", "Sq=256, Sk=300", "softcap"):
        assert words in str(e.value)
    sbhd = torch.empty(256, 2, 4, 128, dtype=torch.bfloat16).permute(1, 2, 0, 3)
    with pytest.raises(ValueError, match=r"dense in \(B, H, S, D\) or \(B, S, H, D\) order"):
        _hopper.use_gluon(_problem(), sbhd, kv, kv)


sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0)
    or os.environ.get("TRITON_INTERPRET") == "1", reason="needs an sm_90 GPU")


@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,Hq,Hkv,S,layout", [(1, 2, 2, 128, "bhsd"), (2, 4, 1, 384, "bshd"),
                                                (1, 6, 2, 1024, "bshd"), (2, 2, 2, 256, "bhsd")])
def test_gluon_forward_matches_tl_forward_on_cuda(monkeypatch, dtype, D, causal, B, Hq, Hkv, S,
                                                  layout):
    torch.manual_seed(S + D)

    def make(H):  # (B, H, S, D) view of a tensor held in `layout` order
        if layout == "bshd":
            return torch.randn(B, S, H, D, device="cuda", dtype=dtype).transpose(1, 2)
        return torch.randn(B, H, S, D, device="cuda", dtype=dtype)

    q, k, v = make(Hq), make(Hkv), make(Hkv)
    ref, ref_lse = reference.safe(q.double(), k.double(), v.double(), causal=causal)
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON", "1")  # an error if the Gluon path cannot apply
    out, lse = attnkit.attention(q, k, v, causal=causal, backend="triton", return_lse=True)
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON", "0")
    out_tl, lse_tl = attnkit.attention(q, k, v, causal=causal, backend="triton",
                                       return_lse=True)
    err, err_tl = ((o.double() - ref).abs().max().item() for o in (out, out_tl))
    assert err <= 1.5 * err_tl + 1e-3, (err, err_tl)
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4
    # the training step: backward from the Gluon forward's out and lse
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON", "1")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    o = attnkit.attention(qg, kg, vg, causal=causal, backend="triton")
    o.backward(torch.ones_like(o))
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON", "0")
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    ot = attnkit.attention(qt, kt, vt, causal=causal, backend="triton")
    ot.backward(torch.ones_like(ot))
    for a, b in ((qg, qt), (kg, kt), (vg, vt)):
        tol = 2e-2 * b.grad.abs().max().item() + 1e-2
        assert (a.grad - b.grad).abs().max().item() <= tol
