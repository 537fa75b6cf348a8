"""Decode steps captured in CUDA graphs, as serving engines run them.

`attnkit bench --decode` times eager calls, where a short cache's step is dominated by Python
and launch overhead. Here one step (attention over a KV cache, one query per sequence) is
captured in a CUDA graph for attnkit's triton backend and for SDPA-flash, and the replays are
timed: what is left is the kernels. Also checks that capture works at all (no host sync in
attnkit's path) and that the replayed output matches the eager one.

    python benchmarks/decode_graphs.py [--out FILE.json]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnkit

B, HQ, HKV, D = 16, 32, 8, 128


def capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, allocates) outside the graph
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for S in (1024, 4096, 16384, 65536):
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        lens = torch.full((B,), S, device="cuda", dtype=torch.int32)
        kv_bytes = 2 * kc.numel() * kc.element_size()

        def ours(q=q, kc=kc, vc=vc, lens=lens):
            return attnkit.attention_with_kvcache(q, kc, vc, lens, backend="triton")

        def flash(q=q, kc=kc, vc=vc):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)

        row = {"cache_len": S}
        for name, fn in (("triton", ours), ("sdpa-flash", flash)):
            eager = fn()
            graph, out = capture(fn)
            graph.replay()
            torch.cuda.synchronize()
            row[f"{name}_graph_equals_eager"] = bool(torch.equal(out, eager))
            ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100,
                                         return_mode="median")
            ms_eager = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            row[f"{name}_graph_tbps"] = kv_bytes / (ms * 1e-3) / 1e12
            row[f"{name}_eager_tbps"] = kv_bytes / (ms_eager * 1e-3) / 1e12
        ref = F.scaled_dot_product_attention(q.float(), kc.float(), vc.float(), enable_gqa=True)
        row["triton_max_err_vs_fp32"] = float((ours().float() - ref).abs().max())
        rows.append(row)
        print(f"cache {S:>6}: graph TB/s triton {row['triton_graph_tbps']:.2f} "
              f"flash {row['sdpa-flash_graph_tbps']:.2f} "
              f"({row['triton_graph_tbps'] / row['sdpa-flash_graph_tbps']:.2f}x); eager "
              f"triton {row['triton_eager_tbps']:.2f} flash {row['sdpa-flash_eager_tbps']:.2f}; "
              f"replay == eager: {row['triton_graph_equals_eager']}, "
              f"err {row['triton_max_err_vs_fp32']:.1e}", flush=True)
    if args.out:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
                   "shape": dict(B=B, Hq=HQ, Hkv=HKV, D=D, Sq=1, dtype="bf16"), "rows": rows},
                  open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
