"""fp32 split-KV decode at D=128: the table's launch (`decode.stream_config`) against other
key steps, warps and stages, each checked against float64 (benchmarks/NOTES.md, twentieth
session: on sm_90 ptxas gives the table's kernel 32 registers and 26 KB of spill stores).

    python benchmarks/fp32_decode.py

B=16 Hq=32 Hkv=8, one query, 4k and 16k keys; TB/s of fp32 K+V read, do_bench medians.
"""

import functools

import torch
from attnkit_triton.decode import decode_forward
from triton.testing import do_bench

from attnkit import reference
from attnkit.spec import AttentionProblem

B, HQ, HKV, D = 16, 32, 8, 128
#: (block_n, num_warps, num_stages); None: the table's choice.
LAUNCHES = [(None, 4, None), (64, 8, 3), (64, 8, 2), (32, 4, 2), (32, 4, 3), (32, 8, 3)]


def main() -> None:
    for S in (4096, 16384):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, HQ, 1, D, device="cuda", generator=g)
        k = torch.randn(B, HKV, S, D, device="cuda", generator=g)
        v = torch.randn(B, HKV, S, D, device="cuda", generator=g)
        seq = torch.full((B,), S, dtype=torch.int32, device="cuda")
        p = AttentionProblem.from_tensors(q, k, v, causal=True, seqlens_k=seq, return_lse=True,
                                          needs_grad=False, check_values=False)
        ref = reference.safe(q.double(), k.double(), v.double(), causal=True)[0]
        for bn, w, st in LAUNCHES:
            f = functools.partial(decode_forward, p, q, k, v, seq, block_n=bn, num_warps=w,
                                  num_stages=st)
            err = (f()[0].double() - ref).abs().max().item()
            ms = do_bench(f, warmup=25, rep=200)
            tbps = 2 * B * HKV * S * D * 4 / ms / 1e9
            print(f"S={S} block_n={bn} w{w} s{st}: {ms * 1e3:8.1f} us  {tbps:6.2f} TB/s  "
                  f"err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
