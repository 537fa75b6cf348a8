"""The ``tl`` backward's kept launch sites on a GPU: for each problem, three backward calls
through ``attnkit.attention``: the later calls' gradients must equal the first (keyed)
call's bitwise and the last must pass the suite's accuracy rule (`Case.judge`); some ``tl``
backward route must hold kept sites (checked over all routes, so from the second problem on
it is the first problem's that shows the direct path was taken). The problems are
conformance `Case`s. Exit status 1 if any problem fails. Run on an H200 in the sixteenth
and eighteenth sessions (benchmarks/NOTES.md): 6 of 6.

    python plugins/triton/scripts/check_kept_sites.py
"""

import sys

import torch
from attnkit_triton import backend as tb

import attnkit
from attnkit.testing.cases import Case

DEVICE = "cuda"
F16, BF16 = torch.float16, torch.bfloat16
CASES = [
    Case(32, 32, 32, 512, 512, 64, BF16, causal=True, layout="bshd"),
    Case(2, 4, 4, 97, 97, 40, F16),
    Case(2, 6, 2, 130, 257, 128, F16, causal=True, layout="bshd"),
    Case(3, 4, 1, 77, 200, 96, BF16, window=(16, 8)),
    Case(4, 2, 2, 64, 300, 64, F16, causal=True, seqlens_k="random"),
    Case(2, 2, 2, 97, 97, 256, BF16, softcap=5.0),
]


def check(case: Case, gen: torch.Generator) -> bool:
    q, k, v, seqlens_k = case.make_inputs(DEVICE, gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(q.shape, generator=gen).to(DEVICE, case.dtype)
    grads = []
    for _ in range(3):
        out = attnkit.attention(q, k, v, backend="triton", **case.options(seqlens_k))
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    same = all(torch.equal(a, b) for g in grads[1:] for a, b in zip(grads[0], g))
    kept = any(route[3].sites is not None for key, route in tb._routes.items()
               if key[0] == "backward" and route[0] == "tl")
    verdicts = case.judge(q, k, v, seqlens_k, dout, grads=grads[-1])
    accurate = all(good for good, _ in verdicts)
    ok = same and kept and accurate
    print(f"{case.id}: bitwise={same} kept={kept} accurate={accurate} "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    for good, msg in verdicts:
        if not good:
            print("   ", msg)
    return ok


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    bad = sum(not check(case, gen) for case in CASES)
    print("kept-site cases failing:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
