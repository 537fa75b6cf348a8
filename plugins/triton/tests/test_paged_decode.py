"""The paged path of the split-KV kernel (`attnkit_triton.decode` with a block table): the
kernel through the Triton interpreter against the float64 reference over the same keys laid
out contiguously (small shapes), the launch checks, and on a GPU a pool past 2^31 elements."""

import pytest
import torch
from attnkit_triton import decode as decode_module

from attnkit import reference
from attnkit.paged import gather_pages, paged_problem
from attnkit.testing.accuracy import assert_close

PAGED_CASES = [
    # page size, B, Hq, Hkv, Sq, D, dtype, fill levels, options, splits
    (1, 2, 4, 2, 1, 16, torch.float32, [0, 9], {}, 2),
    (5, 3, 4, 1, 2, 32, torch.float16, [0, 4, 61], {}, 3),
    (16, 2, 8, 2, 3, 40, torch.bfloat16, [17, 100], {"window": (20, 0), "softcap": 5.0}, 4),
    (64, 2, 2, 2, 1, 16, torch.float32, [63, 130], {"causal": False}, 1),
    (256, 1, 4, 2, 4, 16, torch.float16, [300], {}, 2),
    (3, 2, 4, 4, 20, 16, torch.float32, [40, 25], {}, 2),  # chunked prefill: many row blocks
]


def _paged(P, B, Hkv, D, dtype, levels, g, layout="nhpd"):
    """Pools with each sequence's pages shuffled, every slot that holds no key NaN."""
    need = [-(-L // P) for L in levels]
    M = max(need) + 1
    n_pages = sum(need) + 2
    order = torch.randperm(n_pages, generator=g)
    table = torch.full((B, M), -1, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        table[b, :n] = order[i:i + n].to(torch.int32)
        i += n
    shape = (n_pages, P, Hkv, D) if layout == "nphd" else (n_pages, Hkv, P, D)
    pools = []
    for _ in range(2):
        pool = torch.full(shape, float("nan"), dtype=dtype)
        pool = pool.transpose(1, 2) if layout == "nphd" else pool
        for b, L in enumerate(levels):
            for p in range(L):
                pool[int(table[b, p // P]), :, p % P] = torch.randn(Hkv, D, generator=g)
        pools.append(pool)
    return pools[0], pools[1], table


@pytest.mark.interpreter
@pytest.mark.parametrize("case", PAGED_CASES,
                         ids=[f"page{c[0]}-{str(c[6])[6:]}-B{c[1]}H{c[2]}x{c[3]}-q{c[4]}"
                              f"-splits{c[9]}" for c in PAGED_CASES])
def test_paged_split_kv(case):
    P, B, Hq, Hkv, Sq, D, dtype, levels, opts, splits = case
    g = torch.Generator().manual_seed(5)
    kp, vp, table = _paged(P, B, Hkv, D, dtype, levels, g, "nphd" if P == 5 else "nhpd")
    q = torch.randn((B, Hq, Sq, D), generator=g).to(dtype)
    seqlens = torch.tensor(levels, dtype=torch.int32)
    problem = paged_problem(q, kp, table, causal=opts.get("causal", True),
                            window=opts.get("window"), softcap=opts.get("softcap"))
    out, lse = decode_module.decode_forward(problem, q, kp, vp, seqlens, splits=splits,
                                            block_table=table)
    n = max(levels)
    k, v = (gather_pages(p, table, seqlens, n) for p in (kp, vp))
    ref_opts = dict(causal=problem.causal, window=opts.get("window"),
                    softcap=opts.get("softcap"), seqlens_k=seqlens)
    r64 = reference.safe(q.double(), k.double(), v.double(), **ref_opts)
    rlp = reference.safe(q, k, v, **ref_opts)
    assert_close("out", out, r64[0], rlp[0], dtype, 2.0)
    assert_close("lse", lse, r64[1], rlp[1], dtype, 2.0)


@pytest.mark.interpreter
def test_paged_launch_checks():
    g = torch.Generator().manual_seed(0)
    kp, vp, table = _paged(4, 2, 1, 16, torch.float32, [3, 5], g)
    q = torch.randn(2, 2, 1, 16)
    problem = paged_problem(q, kp, table)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_table is given exactly when"):
        decode_module.decode_forward(problem, q, kp, vp, lens, splits=1)
    with pytest.raises(ValueError, match="int32, contiguous"):
        decode_module.decode_forward(problem, q, kp, vp, lens, splits=1,
                                     block_table=table.long())
    with pytest.raises(ValueError, match="needs seqlens_k"):
        decode_module.decode_forward(problem, q, kp, vp, None, splits=1, block_table=table)


@pytest.mark.cuda
def test_paged_pool_past_2_to_31_elements():
    """A page past element 2^31 of the pool: its address needs 64-bit arithmetic."""
    P, D = 16, 128
    n_pages = (1 << 31) // (P * D) + 8  # 2^31 + 8 pages' worth of fp16 elements
    dev = torch.device("cuda")
    try:
        kp = torch.empty((n_pages, 1, P, D), dtype=torch.float16, device=dev)
        vp = torch.empty_like(kp)
    except torch.OutOfMemoryError:
        pytest.skip("two 4 GiB pools do not fit this GPU")
    g = torch.Generator(device=dev).manual_seed(0)
    table = torch.tensor([[n_pages - 1, 3, n_pages - 5]], dtype=torch.int32, device=dev)
    for page in table[0].tolist():  # only the pages that hold keys are written
        kp[page].normal_(generator=g)
        vp[page].normal_(generator=g)
    lens = torch.tensor([2 * P + 5], dtype=torch.int32, device=dev)
    q = torch.randn((1, 4, 1, D), generator=g, device=dev, dtype=torch.float16)
    problem = paged_problem(q, kp, table)
    out, lse = decode_module.decode_forward(problem, q, kp, vp, lens, splits=2,
                                            block_table=table)
    k, v = (gather_pages(p, table, lens, int(lens[0])).cpu() for p in (kp, vp))
    r64 = reference.safe(q.cpu().double(), k.double(), v.double())
    rlp = reference.safe(q.cpu(), k, v)
    assert_close("out", out, r64[0], rlp[0], torch.float16, 2.0)
    assert_close("lse", lse, r64[1], rlp[1], torch.float16, 2.0)


@pytest.mark.cuda
def test_paged_steps_replayed_from_a_cuda_graph():
    """A decoding step (append into pages, attend) captured with validate="device" (no host
    synchronisation) and replayed with new tokens and fill levels: each replay's output and
    pools equal the eager call's on copies of the pools, bit for bit."""
    import attnkit

    dev, P, D = torch.device("cuda"), 16, 64
    g = torch.Generator().manual_seed(1)
    kp, vp, table = _paged(P, 3, 2, D, torch.bfloat16, [5, 40, 17], g)
    table = torch.cat([table, torch.full((3, 2), -1, dtype=torch.int32)], 1)  # room to grow
    spare = kp.shape[0]
    kp, vp = (torch.cat([p, torch.zeros((6,) + p.shape[1:], dtype=p.dtype)]) for p in (kp, vp))
    for b in range(3):  # a fresh page each, for positions the steps reach
        table[b, int((table[b] >= 0).sum())] = spare + b
    kp, vp, table = kp.to(dev), vp.to(dev), table.to(dev)
    lens = torch.tensor([5, 40, 17], dtype=torch.int32, device=dev)
    q = torch.randn((3, 8, 1, D), device=dev, dtype=torch.bfloat16)
    kn, vn = (torch.randn((3, 2, 1, D), device=dev, dtype=torch.bfloat16) for _ in range(2))

    def step(k_pages, v_pages, validate):
        return attnkit.attention_with_kvcache(q, k_pages, v_pages, lens, kn, vn,
                                              block_table=table, backend="triton",
                                              validate=validate)

    _replays_equal_eager(step, (kp, vp), (q, kn, vn), lens)


@pytest.mark.cuda
def test_contiguous_steps_replayed_from_a_cuda_graph():
    """The same with a contiguous cache: an appending step reads no fill level on the host
    under validate="device", so it is captured, and each replay equals the eager call."""
    import attnkit

    dev, D = torch.device("cuda"), 64
    kc, vc = (torch.randn((3, 2, 64, D), device=dev, dtype=torch.bfloat16) for _ in range(2))
    lens = torch.tensor([5, 40, 17], dtype=torch.int32, device=dev)
    q = torch.randn((3, 8, 1, D), device=dev, dtype=torch.bfloat16)
    kn, vn = (torch.randn((3, 2, 1, D), device=dev, dtype=torch.bfloat16) for _ in range(2))

    def step(k_cache, v_cache, validate):
        return attnkit.attention_with_kvcache(q, k_cache, v_cache, lens, kn, vn,
                                              backend="triton", validate=validate)

    _replays_equal_eager(step, (kc, vc), (q, kn, vn), lens)


def _replays_equal_eager(step, caches, inputs, lens):
    """``step(k, v, validate)`` captured in a CUDA graph with ``validate="device"`` (compiled
    first on a side stream, on copies) and replayed three times with new ``inputs`` and fill
    levels one longer each time: each replay's output and caches equal the eager ``"host"``
    call's on copies of the caches, bit for bit."""
    copies = tuple(c.clone() for c in caches)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and cache outside the capture, on copies
        step(*(c.clone() for c in caches), "device")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = step(*caches, "device")
    for _ in range(3):
        for t in inputs:
            t.copy_(torch.randn(t.shape, device=t.device, dtype=t.dtype))
        graph.replay()
        with torch.no_grad():
            expected = step(*copies, "host")
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
        for c, r in zip(caches, copies):
            assert torch.equal(c.view(torch.int16), r.view(torch.int16))
        lens += 1
