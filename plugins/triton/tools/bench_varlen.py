"""Time the triton backend's varlen kernels on one GPU: against its own dense call on the
same work (equal lengths), and against PyTorch SDPA on nested jagged tensors and on batches
padded to the longest sequence (long-tailed lengths).

FLOPs are summed per sequence over the visible (query, key) pairs: 4 * pairs * D * Hq for
the forward, 3.5x that for forward and backward. Equal lengths are 8 sequences of
tokens / 8; long-tailed ones put half the tokens in one sequence, a quarter in another and
the rest in sequences of 32..1024 tokens. The dense call is the backend's own route for
(8, Hq, tokens / 8, D) read in place from the packed tensors (the Gluon kernels where they
apply), so the ratio is the varlen cost of the same work.

    python plugins/triton/tools/bench_varlen.py [--tokens 16384 65536] [--head-dim 64 128]
"""

from __future__ import annotations

import argparse
import itertools
import random

import torch


def lengths(mix: str, tokens: int) -> list[int]:
    if mix == "equal":
        return [tokens // 8] * 8
    rng = random.Random(0)
    out = [tokens // 2, tokens // 4]
    left = tokens - sum(out)
    while left > 0:
        n = min(left, rng.randint(min(32, left), min(1024, max(32, tokens // 16))))
        out.append(n)
        left -= n
    rng.shuffle(out)
    return out


def pairs(lens, causal: bool) -> int:
    return sum(s * (s + 1) // 2 if causal else s * s for s in lens)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--model-dim", type=int, default=2048, help="Hq = model dim / head dim")
    ap.add_argument("--kv-heads", type=int, default=0, help="Hkv (0: Hq)")
    ap.add_argument("--mix", nargs="+", default=["equal", "longtail"])
    ap.add_argument("--device", default="cuda",
                    help="cpu: a smoke test under TRITON_INTERPRET=1 (tiny sizes only)")
    a = ap.parse_args()

    import attnkit
    from attnkit.bench.timing import measure
    from attnkit.spec import AttentionProblem

    backend = attnkit.backends()["triton"].backend
    dev = torch.device(a.device)
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{name}; bf16; TFLOP/s (ms); ratio = varlen / other "
          "throughput")
    print(f"{'mix':8} {'tokens':>6} {'D':>3} {'causal':6} {'pass':7} {'varlen':>15} "
          f"{'dense':>15} {'sdpa-nested':>15} {'sdpa-padded':>15}  ratios")
    for mix, tokens, D, causal in itertools.product(a.mix, a.tokens, a.head_dim,
                                                    (False, True)):
        Hq = a.model_dim // D
        Hkv = a.kv_heads or Hq
        lens = lengths(mix, tokens)
        B, S = len(lens), max(lens)
        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=dev)
        q = torch.randn(tokens, Hq, D, device=dev, dtype=dtype)
        k, v = (torch.randn(tokens, Hkv, D, device=dev, dtype=dtype) for _ in range(2))
        dout = torch.randn_like(q)
        problem = AttentionProblem(B, Hq, Hkv, S, S, D, dtype, dev, causal=causal,
                                   scale=D ** -0.5, return_lse=True, needs_grad=True,
                                   varlen=True)
        flops = 4 * pairs(lens, causal) * D * Hq

        runs = _attnkit_runs(backend, problem, q, k, v, dout, cu, mix == "equal")
        runs.update(_sdpa_runs(q, k, v, dout, cu, lens, causal))

        for name, fwd_bwd_factor in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            cells, tput = [], {}
            for key in ("varlen", "dense", "sdpa-nested", "sdpa-padded"):
                fns = runs.get(key)
                if fns is None or isinstance(fns, str):
                    cells.append(f"{'-' if fns is None else 'n/a':>15}")
                    continue
                fn = fns[0] if name == "fwd" else fns[1]
                try:
                    ms = measure(fn, dev).median_ms
                except Exception as e:  # a peer that cannot run this shape: say why once
                    runs[key] = f"{type(e).__name__}: {str(e)[:80]}"
                    cells.append(f"{'n/a':>15}")
                    continue
                tput[key] = flops * fwd_bwd_factor / ms / 1e9
                cells.append(f"{tput[key]:7.1f} ({ms:5.2f})")
            ratios = ", ".join(f"/{k} {tput['varlen'] / t:.2f}" for k, t in tput.items()
                               if k != "varlen" and "varlen" in tput)
            print(f"{mix:8} {tokens:6} {D:3} {causal!s:6} {name:7} {' '.join(cells)}  "
                  f"{ratios}")
        for key, why in runs.items():
            if isinstance(why, str):
                print(f"    {key}: {why}")
    return 0


def _attnkit_runs(backend, problem, q, k, v, dout, cu, equal: bool):
    """The backend's varlen calls and, for equal lengths, its dense calls on the same
    tensors, each as (fwd, fwd+bwd)."""
    def varlen_fwd():
        return backend.forward_varlen(problem, q, k, v, cu, cu)

    def varlen_fwd_bwd():
        out, lse = backend.forward_varlen(problem, q, k, v, cu, cu)
        return backend.backward_varlen(problem, q, k, v, out, lse, dout, cu, cu)

    runs = {"varlen": (varlen_fwd, varlen_fwd_bwd)}
    if not equal:
        return runs
    B, S, D = problem.batch, problem.seqlen_q, problem.head_dim

    def dense(t):  # (B * S, H, D) -> (B, H, S, D), in place
        return t.view(B, S, t.shape[1], D).transpose(1, 2)

    qd, kd, vd, dod = dense(q), dense(k), dense(v), dense(dout)
    pd = problem._replace(varlen=False)

    def dense_fwd():
        return backend.forward(pd, qd, kd, vd, None)

    def dense_fwd_bwd():
        out, lse = backend.forward(pd, qd, kd, vd, None)
        return backend.backward(pd, qd, kd, vd, out, lse, dod, None)

    runs["dense"] = (dense_fwd, dense_fwd_bwd)
    return runs


def _sdpa_runs(q, k, v, dout, cu, lens, causal):
    """SDPA's flash path on nested jagged tensors and on a batch padded to the longest
    sequence (padding rows are computed and thrown away), each as (fwd, fwd+bwd)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    runs = {}
    offsets = cu.long()
    try:
        def nested(t, grad=False):
            nt = torch.nested.nested_tensor_from_jagged(t.detach(), offsets)
            return nt.requires_grad_(grad).transpose(1, 2)

        qn, kn, vn = nested(q), nested(k), nested(v)
        qg, kg, vg = nested(q, True), nested(k, True), nested(v, True)
        don = nested(dout)

        def nested_fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qn, kn, vn, is_causal=causal,
                                                      enable_gqa=q.shape[1] != k.shape[1])

        def nested_fwd_bwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal,
                                                     enable_gqa=q.shape[1] != k.shape[1])
            return torch.autograd.grad(out, (qg, kg, vg), don)

        nested_fwd()
        runs["sdpa-nested"] = (nested_fwd, nested_fwd_bwd)
    except Exception as e:
        runs["sdpa-nested"] = f"{type(e).__name__}: {str(e)[:80]}"
    B, S = len(lens), max(lens)

    def padded(t, grad=False):
        p = t.new_zeros(B, S, *t.shape[1:])
        for b, (start, n) in enumerate(zip(cu.tolist(), lens)):
            p[b, :n] = t[start:start + n]
        return p.transpose(1, 2).requires_grad_(grad)

    qp, kp, vp, dop = padded(q), padded(k), padded(v), padded(dout)
    qpg, kpg, vpg = (t.detach().requires_grad_() for t in (qp, kp, vp))
    gqa = q.shape[1] != k.shape[1]

    def padded_fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qp, kp, vp, is_causal=causal, enable_gqa=gqa)

    def padded_fwd_bwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(qpg, kpg, vpg, is_causal=causal,
                                                 enable_gqa=gqa)
        return torch.autograd.grad(out, (qpg, kpg, vpg), dop)

    runs["sdpa-padded"] = (padded_fwd, padded_fwd_bwd)
    return runs


if __name__ == "__main__":
    raise SystemExit(main())
