"""Deliberately wrong backends: the conformance suite must catch each of them."""

import torch

from attnkit import reference
from attnkit.backend import Backend, Capabilities
from attnkit.dropout import Dropout, keep_mask
from attnkit.reference_backend import ReferenceBackend

_CAPS = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                     head_dim_max=256)


class DropsCausalMask(ReferenceBackend):
    """Claims causal but ignores it."""

    name = "wrong-no-causal"
    capabilities = _CAPS

    def forward(self, problem, q, k, v, seqlens_k):
        out, lse = reference.safe(q, k, v, scale=problem.scale, window=problem.window,
                                  seqlens_k=seqlens_k, softcap=problem.softcap)
        return out, lse.float()


class NaNOnMaskedRows(ReferenceBackend):
    """Uses the textbook 0/0 on rows that see no key."""

    name = "wrong-nan-rows"
    capabilities = _CAPS

    def forward(self, problem, q, k, v, seqlens_k):
        out, lse = super().forward(problem, q, k, v, seqlens_k)
        rows = torch.isinf(lse).unsqueeze(-1).expand_as(out)
        return out.masked_fill(rows, float("nan")), lse


class TopLeftCausal(ReferenceBackend):
    """Aligns causal to the top-left corner (SDPA's is_causal), not the bottom-right."""

    name = "wrong-top-left"
    capabilities = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                                window=False, seqlens_k=False, softcap=False)

    def forward(self, problem, q, k, v, seqlens_k):
        if not problem.causal:
            return super().forward(problem, q, k, v, seqlens_k)
        g = problem.group_size
        kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = (q @ kk.transpose(-1, -2)) * problem.scale
        top_left = torch.ones(s.shape[-2:], dtype=torch.bool).tril()  # j <= i
        s = s.masked_fill(~top_left, float("-inf"))
        return torch.softmax(s, -1) @ vv, torch.logsumexp(s, -1).float()


class ClaimsSoftcapIgnoresIt(Backend):
    """Declares softcap and silently skips it."""

    name = "wrong-softcap"
    capabilities = _CAPS

    def forward(self, problem, q, k, v, seqlens_k):
        out, lse = reference.safe(q, k, v, scale=problem.scale, causal=problem.causal,
                                  window=problem.window, seqlens_k=seqlens_k)
        return out, lse.float()

    backward = ReferenceBackend.backward


class NondeterministicForward(ReferenceBackend):
    """Adds run-dependent noise in the last bit."""

    name = "wrong-nondeterministic"
    capabilities = _CAPS
    _n = 0

    def forward(self, problem, q, k, v, seqlens_k):
        out, lse = super().forward(problem, q, k, v, seqlens_k)
        NondeterministicForward._n += 1
        return out * (1 + 1e-7 * (self._n % 2)), lse


class WritesIntoDout(ReferenceBackend):
    """Scales dout in place after using it (a kernel reusing its input as scratch)."""

    name = "wrong-writes-dout"
    capabilities = _CAPS

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k):
        grads = super().backward(problem, q, k, v, out, lse, dout, seqlens_k)
        dout.mul_(0.5)
        return grads


class Float32Gradients(ReferenceBackend):
    """Returns dq in fp32 for fp16/bf16 inputs (autograd would cast it back silently)."""

    name = "wrong-grad-dtype"
    capabilities = Capabilities(devices=frozenset({"cpu"}),
                                dtypes=frozenset({torch.float16, torch.float32}))

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k):
        dq, dk, dv = super().backward(problem, q, k, v, out, lse, dout, seqlens_k)
        return dq.float(), dk, dv


class GQAGradientsNotSummed(ReferenceBackend):
    """Averages dK/dV over each GQA group instead of summing them."""

    name = "wrong-gqa-grads"
    capabilities = _CAPS

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k):
        dq, dk, dv = super().backward(problem, q, k, v, out, lse, dout, seqlens_k)
        g = problem.group_size
        return dq, dk / g, dv / g


def _masked_softmax_times_v(problem, q, k, v, seqlens_k):
    """out = P V over the whole key range, P zero where masked: a masked key's V enters as
    0 * V, which is NaN where V is NaN or inf."""
    mask = reference.visible_mask(q.shape[2], k.shape[2], causal=problem.causal,
                                  window=problem.window, seqlens_k=seqlens_k)
    g = problem.group_size
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ kk.transpose(-1, -2)) * problem.scale
    if problem.softcap is not None:
        s = torch.tanh(s / problem.softcap) * problem.softcap
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(mask, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None]), 0)
    return p @ vv, lse.float()


class MaskedKeysTimesZero(ReferenceBackend):
    """Multiplies the V rows of keys no query sees by zero instead of never reading them."""

    name = "wrong-masked-times-zero"
    capabilities = _CAPS

    def forward(self, problem, q, k, v, seqlens_k):
        return _masked_softmax_times_v(problem, q, k, v, seqlens_k)


class OutOfBandTimesZero(ReferenceBackend):
    """Skips keys past seqlens_k, but multiplies keys outside every query's band by zero."""

    name = "wrong-band-times-zero"
    capabilities = _CAPS

    def forward(self, problem, q, k, v, seqlens_k):
        if seqlens_k is not None:
            gone = torch.arange(k.shape[2]).view(1, 1, -1, 1) >= seqlens_k.view(-1, 1, 1, 1)
            k, v = k.masked_fill(gone, 0), v.masked_fill(gone, 0)
        return _masked_softmax_times_v(problem, q, k, v, seqlens_k)


class ScratchNotZeroed(ReferenceBackend):
    """Accumulates out into torch.empty memory it "clears" by multiplying with zero."""

    name = "wrong-scratch"
    capabilities = _CAPS

    def forward(self, problem, q, k, v, seqlens_k):
        out, lse = super().forward(problem, q, k, v, seqlens_k)
        acc = torch.empty_like(out)
        acc.mul_(0)
        return acc.add_(out), lse


class NaNRowAsMasked(ReferenceBackend):
    """Treats NaN scores as masked: a NaN query row comes out as a row that sees no key."""

    name = "wrong-nan-row-masked"
    capabilities = _CAPS

    def forward(self, problem, q, k, v, seqlens_k):
        out, lse = super().forward(problem, q, k, v, seqlens_k)
        rows = lse.isnan()
        return out.masked_fill(rows[..., None], 0), lse.masked_fill(rows, float("-inf"))


class NoMaxSubtraction(ReferenceBackend):
    """The textbook exp(S) / sum(exp(S)) in fp32: fine up to scores of ~88."""

    name = "wrong-no-max-subtraction"
    capabilities = _CAPS

    def forward(self, problem, q, k, v, seqlens_k):
        out, lse = reference.naive(q, k, v, causal=problem.causal, scale=problem.scale,
                                   window=problem.window, seqlens_k=seqlens_k,
                                   softcap=problem.softcap)
        return out, lse.float()


class LaterCallsDiffer(ReferenceBackend):
    """Keeps per-signature state from the second backward on, and from then on its dQ is
    off in the last bits (a launch path reused with a stale argument)."""

    name = "wrong-later-calls-differ"
    capabilities = _CAPS

    def __init__(self):
        self._seen = {}

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k, **kw):
        dq, dk, dv = super().backward(problem, q, k, v, out, lse, dout, seqlens_k, **kw)
        n = self._seen[problem] = self._seen.get(problem, 0) + 1
        return (dq * (1 + 2.0**-12) if n >= 3 else dq), dk, dv


class IgnoresDlse(ReferenceBackend):
    """Declares lse_grad, and drops the gradient reaching lse."""

    name = "wrong-ignores-dlse"
    capabilities = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                                head_dim_max=256, lse_grad=True)

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k, dlse=None):
        return super().backward(problem, q, k, v, out, lse, dout, seqlens_k)


_VARLEN_CAPS = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                            head_dim_max=256, varlen=True, backward=False)


def _packed_dense(problem, q, k, v, cu_q, cu_k, per_sequence: bool):
    """One dense call over the whole packing (keys of every sequence), the scores of other
    sequences hidden after the softmax by multiplying by 0 (``per_sequence``), or not at
    all."""
    from attnkit.reference import visible_mask

    seen = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool)
    for b in range(cu_q.shape[0] - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        seen[q0:q1, k0:k1] = visible_mask(q1 - q0, k1 - k0, causal=problem.causal,
                                          window=problem.window)[0, 0]
    if not per_sequence:
        seen[:] = True
    g = problem.group_size
    kk, vv = (t.transpose(0, 1).repeat_interleave(g, 0) for t in (k, v))
    s = (q.transpose(0, 1) @ kk.transpose(-1, -2)) * problem.scale
    p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0) * seen
    lse = torch.logsumexp(s.masked_fill(~seen, float("-inf")), -1)
    return (p @ vv).transpose(0, 1).contiguous(), lse.float()


class VarlenOneSequence(ReferenceBackend):
    """Declares varlen and attends over the whole packing as one sequence."""

    name = "wrong-varlen-one-sequence"
    capabilities = _VARLEN_CAPS

    def forward_varlen(self, problem, q, k, v, cu_seqlens_q, cu_seqlens_k):
        return _packed_dense(problem, q, k, v, cu_seqlens_q, cu_seqlens_k, False)


class VarlenOthersTimesZero(ReferenceBackend):
    """Hides the other sequences' keys by multiplying their probabilities by 0: right on
    clean inputs, but a NaN in one sequence's values reaches every other sequence."""

    name = "wrong-varlen-times-zero"
    capabilities = _VARLEN_CAPS

    def forward_varlen(self, problem, q, k, v, cu_seqlens_q, cu_seqlens_k):
        return _packed_dense(problem, q, k, v, cu_seqlens_q, cu_seqlens_k, True)


class VarlenLseTransposed(ReferenceBackend):
    """Returns lse as (total_q, Hq) instead of the contract's (Hq, total_q)."""

    name = "wrong-varlen-lse-layout"
    capabilities = _VARLEN_CAPS

    def forward_varlen(self, problem, q, k, v, cu_seqlens_q, cu_seqlens_k):
        out, lse = super().forward_varlen(problem, q, k, v, cu_seqlens_q, cu_seqlens_k)
        return out, lse.t().contiguous()


_DROPOUT_CAPS = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                             head_dim_max=256, dropout=True)


class DropoutOtherCounter(ReferenceBackend):
    """Draws its masks one counter word off (offset + 1), forward and backward alike: fine
    masks, but not the ones every other backend draws."""

    name = "wrong-dropout-counter"
    capabilities = _DROPOUT_CAPS

    @staticmethod
    def _shifted(dropout):
        return None if dropout is None else Dropout(dropout.p, dropout.state + torch.tensor(
            [0, 1], device=dropout.state.device))

    def forward(self, problem, q, k, v, seqlens_k, dropout=None):
        return super().forward(problem, q, k, v, seqlens_k, dropout=self._shifted(dropout))

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k, dlse=None, dropout=None):
        return super().backward(problem, q, k, v, out, lse, dout, seqlens_k, dlse=dlse,
                                dropout=self._shifted(dropout))


class DropoutSameSeedEveryCall(ReferenceBackend):
    """Ignores the call's draw and uses a constant state: every call drops the same."""

    name = "wrong-dropout-constant-seed"
    capabilities = _DROPOUT_CAPS

    def forward(self, problem, q, k, v, seqlens_k, dropout=None):
        if dropout is not None:
            dropout = Dropout(dropout.p, torch.zeros_like(dropout.state))
        return super().forward(problem, q, k, v, seqlens_k, dropout=dropout)


class DropoutNotInBackward(ReferenceBackend):
    """Applies the mask in the forward and forgets it in the backward."""

    name = "wrong-dropout-backward"
    capabilities = _DROPOUT_CAPS

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k, dlse=None, dropout=None):
        return super().backward(problem, q, k, v, out, lse, dout, seqlens_k, dlse=dlse)
class VarlenDropoutPackedRows(ReferenceBackend):
    """Draws a packed batch's mask as one sequence's: batch 0, query rows and key columns
    counted in the packed tensors instead of from each sequence's start."""

    name = "wrong-varlen-dropout-packed-rows"
    capabilities = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                                head_dim_max=256, varlen=True, dropout=True, backward=False)

    def forward_varlen(self, problem, q, k, v, cu_seqlens_q, cu_seqlens_k, dropout=None):
        if dropout is None:
            return super().forward_varlen(problem, q, k, v, cu_seqlens_q, cu_seqlens_k)
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"))
        keep = keep_mask(dropout.state, dropout.p, 1, q.shape[1], q.shape[0], k.shape[0])[0]
        g = problem.group_size
        for b in range(cu_seqlens_q.shape[0] - 1):
            q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
            if q1 == q0 or k1 == k0:
                continue
            seen = reference.visible_mask(q1 - q0, k1 - k0, causal=problem.causal,
                                window=problem.window)[0, 0]
            kk, vv = (t[k0:k1].transpose(0, 1).repeat_interleave(g, 0) for t in (k, v))
            s = (q[q0:q1].transpose(0, 1) @ kk.transpose(-1, -2)) * problem.scale
            s = s.masked_fill(~seen, float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)
            p = torch.where(keep[:, q0:q1, k0:k1], p * dropout.scale, 0)
            out[q0:q1] = (p @ vv).transpose(0, 1)
            lse[:, q0:q1] = torch.logsumexp(s, -1)
        return out, lse


class RecomputesSavedState(ReferenceBackend):
    """Its backward recomputes out and lse from the q, k, v it is given instead of taking
    the ones passed: right for a whole call, wrong for a block of a longer key sequence
    (context parallelism passes the global out and lse)."""

    name = "wrong-recomputes-lse"
    capabilities = _CAPS

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k, **kw):
        out, lse = self.forward(problem, q, k, v, seqlens_k)
        return super().backward(problem, q, k, v, out, lse, dout, seqlens_k, **kw)


WRONG = [DropsCausalMask, NaNOnMaskedRows, TopLeftCausal, ClaimsSoftcapIgnoresIt,
         NondeterministicForward, WritesIntoDout, Float32Gradients, GQAGradientsNotSummed,
         MaskedKeysTimesZero, OutOfBandTimesZero, ScratchNotZeroed, NaNRowAsMasked,
         NoMaxSubtraction, LaterCallsDiffer, IgnoresDlse, VarlenOneSequence,
         VarlenOthersTimesZero, VarlenLseTransposed, DropoutOtherCounter,
         DropoutSameSeedEveryCall, DropoutNotInBackward, VarlenDropoutPackedRows,
         RecomputesSavedState]
