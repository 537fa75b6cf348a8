"""A few decoding steps through a split-KV kernel, for compute-sanitizer (CUDA only).

    compute-sanitizer --tool memcheck python benchmarks/sanitize_decode.py [cupy|triton]

Covers bf16 / fp16 / fp32, head dims 128 / 40 / 64, in-place append of 1-3 new positions,
fill levels 0 and full, causal, window and softcap, GQA 4:1.
"""

import sys

import torch

import attnkit

CASES = [
    (torch.bfloat16, 128, 1, dict(causal=True)),
    (torch.float16, 40, 3, dict(causal=True, window=(100, 0), softcap=20.0)),
    (torch.float32, 64, 2, dict(causal=False)),
]


def main(backend: str):
    torch.manual_seed(0)
    B, Hq, Hkv, S = 3, 8, 2, 700
    for dtype, D, s_new, options in CASES:
        def r(*shape, dtype=dtype):
            return torch.randn(*shape, device="cuda", dtype=dtype)

        q = r(B, Hq, s_new, D)
        k_cache, v_cache = r(B, Hkv, S, D), r(B, Hkv, S, D)
        k_new, v_new = r(B, Hkv, s_new, D), r(B, Hkv, s_new, D)
        lens = torch.tensor([0, 333, S - s_new], dtype=torch.int32, device="cuda")
        out = attnkit.attention_with_kvcache(q, k_cache, v_cache, lens, k_new, v_new,
                                             backend=backend, **options)
        torch.cuda.synchronize()
        print(backend, dtype, D, "ok, NaN:", bool(out.isnan().any()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cupy")
