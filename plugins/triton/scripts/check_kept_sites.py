"""The ``tl`` backward's kept launch sites on a GPU: for each problem, three backward calls
through ``attnkit.attention``: the later calls' gradients must equal the first (keyed)
call's bitwise and the last must be within tolerance of the float64 reference; some ``tl``
backward route must hold kept sites (checked over all routes, so from the second problem on
it is the first problem's that shows the direct path was taken). Exit status 1 if any
problem fails. Run in the sixteenth session on an H200 (benchmarks/NOTES.md): 6 of 6.

    python plugins/triton/scripts/check_kept_sites.py
"""

import sys

import torch
from attnkit_triton import backend as tb

import attnkit
from attnkit import reference

#: (B, Hq, Hkv, Sq, Sk, D, dtype, causal, window, seqlens_k, softcap, (B, S, H, D) views)
CASES = [
    (32, 32, 32, 512, 512, 64, torch.bfloat16, True, None, False, None, True),
    (2, 4, 4, 97, 97, 40, torch.float16, False, None, False, None, False),
    (2, 6, 2, 130, 257, 128, torch.float16, True, None, False, None, True),
    (3, 4, 1, 77, 200, 96, torch.bfloat16, False, (16, 8), False, None, False),
    (4, 2, 2, 64, 300, 64, torch.float16, True, None, True, None, False),
    (2, 2, 2, 97, 97, 256, torch.bfloat16, False, None, False, 5.0, False),
]


def _tensor(B, H, S, D, dtype, bshd):
    t = torch.randn((B, S, H, D) if bshd else (B, H, S, D), device="cuda", dtype=dtype)
    return (t.transpose(1, 2) if bshd else t).requires_grad_()


def check(B, Hq, Hkv, Sq, Sk, D, dtype, causal, window, seqlens, softcap, bshd) -> bool:
    q, k, v = (_tensor(B, H, S, D, dtype, bshd) for H, S in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    seqlens_k = (torch.randint(0, Sk + 1, (B,), device="cuda", dtype=torch.int32)
                 if seqlens else None)
    dout = torch.randn_like(q)
    opts = dict(causal=causal, window=window, seqlens_k=seqlens_k, softcap=softcap)
    grads = []
    for _ in range(3):
        out = attnkit.attention(q, k, v, backend="triton", **opts)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    same = all(torch.equal(a, b) for g in grads[1:] for a, b in zip(grads[0], g))
    kept = any(route[3].sites is not None for key, route in tb._routes.items()
               if key[0] == "backward" and route[0] == "tl")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, _ = reference.safe(q64, k64, v64, **opts)
    ref = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    err = max(float((a.double() - b).abs().max() / max(1.0, float(b.abs().max())))
              for a, b in zip(grads[-1], ref))
    ok = same and kept and err < (2e-5 if dtype == torch.float32 else 3e-2)
    print(f"D={D} {dtype} causal={causal} win={window} seqlens={seqlens} cap={softcap} "
          f"bshd={bshd}: bitwise={same} kept={kept} rel_err={err:.2e} "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    return ok


def main() -> int:
    torch.manual_seed(0)
    bad = sum(not check(*case) for case in CASES)
    print("kept-site cases failing:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
