"""`example-sdpa`: PyTorch's scaled_dot_product_attention behind the attnkit contract.

It shows the three things a plugin does: declare capabilities honestly (SDPA returns no lse,
so ``lse=False``; no window, seqlens_k or softcap), adapt conventions (attnkit's causal is
bottom-right, SDPA's ``is_causal`` top-left, so a mask is passed when Sq != Sk; SDPA gives NaN
on rows that see no key, attnkit gives 0), and register through the hook.
"""

import torch
import torch.nn.functional as F

import attnkit
from attnkit.reference import visible_mask


class ExampleSDPABackend(attnkit.Backend):
    name = "example-sdpa"
    description = "torch SDPA (example third-party plugin)"
    capabilities = attnkit.Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.float64}),
        head_dim_max=512,
        window=False, seqlens_k=False, softcap=False, lse=False,
    )

    def _out(self, problem, q, k, v):
        group = problem.group_size
        if group > 1:  # kv head h serves query heads h*group .. h*group + group - 1
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        mask = None
        if problem.causal:
            mask = visible_mask(problem.seqlen_q, problem.seqlen_k, causal=True,
                                device=q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=problem.scale)
        if mask is not None:  # rows that see no key: 0, not SDPA's NaN
            out = out.masked_fill(~mask.any(-1, keepdim=True), 0)
        return out

    def forward(self, problem, q, k, v, seqlens_k):
        out = self._out(problem, q, k, v)
        # lse=False: attnkit never hands this to a user; NaN makes any misuse loud.
        lse = torch.full(out.shape[:3], float("nan"), dtype=torch.float32, device=q.device)
        return out, lse

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k):
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            return torch.autograd.grad(self._out(problem, qq, kk, vv), (qq, kk, vv), dout)


@attnkit.hookimpl
def attnkit_register_backends(register):
    register(ExampleSDPABackend(), priority={"cpu": 1})
