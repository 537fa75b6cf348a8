"""seqlens_k on CUDA is not read by the host: out-of-range values must stay memory-safe.

Runs each GPU backend with seqlens_k values below 0 and above Sk and checks the result equals
the same call with the values clamped to [0, Sk] (what the kernels do), with no CUDA error.
"""

import sys

import torch

import attnkit

q = torch.randn(3, 4, 5, 64, device="cuda", dtype=torch.float16)
k = torch.randn(3, 2, 40, 64, device="cuda", dtype=torch.float16)
bad = torch.tensor([-7, 1000, 17], device="cuda", dtype=torch.int32)
ok = True
for name in ("triton", "cupy"):
    got = attnkit.attention(q, k, k, seqlens_k=bad, causal=True, backend=name)
    want = attnkit.attention(q, k, k, seqlens_k=bad.clamp(0, 40), causal=True, backend=name)
    torch.cuda.synchronize()
    same = torch.equal(got, want)
    ok &= same
    print(f"{name}: out-of-range seqlens_k clamped, no CUDA error, equal to clamped call: {same}")
sys.exit(0 if ok else 1)
