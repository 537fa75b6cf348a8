"""A backend that takes ``dlse``: the reference's forward, and the backward written out here
(``dS = P * (dP - (delta - dlse))``) so that the core's plumbing of lse gradients is tested
on its own; tests compare it with autograd through the naive formula."""

import dataclasses

import torch

from attnkit import reference
from attnkit.reference_backend import ReferenceBackend


class LseGradReference(ReferenceBackend):
    name = "lse-grad-reference"
    capabilities = dataclasses.replace(ReferenceBackend.capabilities, lse_grad=True)

    def __init__(self):
        self.dlse_seen = []  # what the core passed as dlse, call by call

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k, dlse=None):
        self.dlse_seen.append(dlse)
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        q_, k_, v_, out_, lse_, dout_ = (t.to(ct) for t in (q, k, v, out, lse, dout))
        B, Hq, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        ke, ve = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k_, v_))
        s = q_ @ ke.transpose(-1, -2) * problem.scale
        if problem.softcap is not None:
            s = torch.tanh(s / problem.softcap) * problem.softcap
        mask = reference.visible_mask(Sq, Sk, causal=problem.causal, window=problem.window,
                                      seqlens_k=seqlens_k, device=q.device)
        row = lse_.unsqueeze(-1)
        p = torch.where(mask, torch.exp(s - torch.where(torch.isfinite(row), row, 0)), 0)
        delta = (dout_ * out_).sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - dlse.to(ct).unsqueeze(-1)
        ds = p * (dout_ @ ve.transpose(-1, -2) - delta)
        if problem.softcap is not None:
            ds = ds * (1 - (s / problem.softcap) ** 2)
        dq = ds @ ke * problem.scale
        dk = (ds.transpose(-1, -2) @ q_ * problem.scale).view(B, Hkv, Hq // Hkv, Sk, D).sum(2)
        dv = (p.transpose(-1, -2) @ dout_).view(B, Hkv, Hq // Hkv, Sk, D).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
