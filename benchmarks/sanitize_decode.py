import torch, attnkit
torch.manual_seed(0)
for dt, D, Sq, kw in [(torch.bfloat16, 128, 1, dict(causal=True)), (torch.float16, 40, 3, dict(causal=True, window=(100, 0), softcap=20.0)), (torch.float32, 64, 2, dict(causal=False))]:
    B, Hq, Hkv, S = 3, 8, 2, 700
    q = torch.randn(B, Hq, Sq, D, device="cuda", dtype=dt)
    kc = torch.randn(B, Hkv, S, D, device="cuda", dtype=dt); vc = torch.randn_like(kc)
    lens = torch.tensor([0, 333, S - Sq], dtype=torch.int32, device="cuda")
    kn = torch.randn(B, Hkv, Sq, D, device="cuda", dtype=dt); vn = torch.randn_like(kn)
    out = attnkit.attention_with_kvcache(q, kc, vc, lens, kn, vn, backend="cupy", **kw)
    torch.cuda.synchronize(); print(dt, D, "ok", out.isnan().any().item())
