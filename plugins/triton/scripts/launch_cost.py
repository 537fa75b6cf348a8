"""Host cost of one Triton launch, piece by piece (CUDA only).

Times, per launch of the forward kernel on a tiny problem: Triton's normal path
(``kernel[grid](...)``), its argument binder alone, the compiled kernel's launcher called
directly, and that plus a Python specialization key. Checks that the direct launch writes
the same bytes as the normal one. Tells whether a launcher that skips Triton's per-call
binding is worth having (benchmarks/NOTES.md, host overhead section).
"""

from __future__ import annotations

import time

import torch
from attnkit_triton import _forward
from attnkit_triton._configs import forward_config
from triton.runtime.driver import driver

import attnkit


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return best


def spec_key(args):
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() & 15 == 0))
        elif isinstance(a, bool) or a is None:
            key.append(a)
        elif isinstance(a, int):
            key.append((a == 1, a & 15 == 0, -(1 << 31) <= a < (1 << 31)))
        else:
            key.append(type(a))
    return tuple(key)


def main():
    q, k, v = (torch.randn(1, 1, 1, 16, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    problem = attnkit.AttentionProblem.from_tensors(q, k, v, causal=True)
    cfg = forward_config(16, True, q.dtype, q.device)
    captured = {}
    orig = _forward._fwd_kernel.run

    def spy(*args, grid, warmup, **kwargs):
        captured.update(args=args, grid=grid, kwargs=kwargs)
        return orig(*args, grid=grid, warmup=warmup, **kwargs)

    _forward._fwd_kernel.run = spy
    out_ref, _ = _forward.launch_forward(problem, q, k, v, None, cfg, False)
    _forward._fwd_kernel.run = orig
    args, grid, kwargs = captured["args"], captured["grid"], captured["kwargs"]
    fn = _forward._fwd_kernel
    compiled = fn[grid](*args, **kwargs)
    device = driver.active.get_current_device()
    binder = fn.device_caches[device][4]
    bound, _, _ = binder(*args, **kwargs)
    all_args = list(bound.values())
    g = (grid[0], grid[1], 1)

    def direct():
        stream = driver.active.get_current_stream(device)
        compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata,
                     None, None, None, *all_args)

    def direct_keyed():
        spec_key(args)
        direct()

    out_q = args[3]
    out_q.zero_()
    direct()
    torch.cuda.synchronize()
    same = torch.equal(out_q, out_ref)
    rows = {
        "attnkit.attention (tiny, triton)": per_call_us(
            lambda: attnkit.attention(q, k, v, causal=True, backend="triton")),
        "backend launch_forward": per_call_us(
            lambda: _forward.launch_forward(problem, q, k, v, None, cfg, False)),
        "kernel[grid](...) (Triton's path)": per_call_us(lambda: fn[grid](*args, **kwargs)),
        "binder alone": per_call_us(lambda: binder(*args, **kwargs)),
        "compiled.run direct": per_call_us(direct),
        "direct + python spec key": per_call_us(direct_keyed),
        "torch.empty x2": per_call_us(lambda: (torch.empty_like(q), torch.empty(
            1, 1, 1, device="cuda"))),
    }
    from attnkit_triton import _launcher

    for enabled in (False, True):
        _launcher.ENABLED = enabled
        rows[f"attnkit.attention, fast launch {'on' if enabled else 'off'}"] = per_call_us(
            lambda: attnkit.attention(q, k, v, causal=True, backend="triton"))
    print(f"fast launch probe passed: {_launcher._probe_state}; hooks set: "
          f"{_launcher._hooks_set()}")
    print(f"direct launch output equals Triton's: {same}; {len(all_args)} bound args")
    for name, us in rows.items():
        print(f"{name:<40} {us:7.2f} us")


if __name__ == "__main__":
    main()
