"""attnkit.attention inside torch.compile(fullgraph=True) on CUDA, forward and backward, with
the triton backend and inductor: the compiled result must match eager (the attention kernels
are the same; inductor may fuse the surrounding ops differently, hence a tolerance)."""

import torch

import attnkit

torch.manual_seed(0)
q, k, v = (torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
lens = torch.tensor([256, 100], device="cuda", dtype=torch.int32)


def step(q, k, v):
    out = attnkit.attention(q, k, v, causal=True, seqlens_k=lens, backend="triton")
    return (out.float() ** 2).sum()


eager = step(q, k, v)
g_eager = torch.autograd.grad(eager, (q, k, v))
compiled = torch.compile(step, fullgraph=True)
loss = compiled(q, k, v)
g = torch.autograd.grad(loss, (q, k, v))
diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip((loss, *g),
                                                                   (eager, *g_eager))]
print(f"torch.compile(fullgraph=True), inductor, triton backend on CUDA: max |compiled - eager|"
      f" loss {diffs[0]:.1e}, dq {diffs[1]:.1e}, dk {diffs[2]:.1e}, dv {diffs[3]:.1e}")
torch.testing.assert_close(loss, eager, rtol=1e-5, atol=0)
for a, b in zip(g, g_eager):
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
