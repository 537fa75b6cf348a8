"""The accuracy rule every backend is held to (DESIGN.md):

    max|got - ref64| <= factor * max|ref_lp - ref64| + floor(dtype)

``ref64`` is the reference computed in float64 from the same inputs, ``ref_lp`` the plain
PyTorch math in the input dtype; factor is 2 for outputs and 3 for gradients. NaN never passes.
The floor is relative: ``FLOORS[dtype] * max(1, max|ref64|)``, since rounding errors scale
with the values (gradients of large-score inputs reach tens; an absolute fp32 floor of 2e-5
there would demand more than fp32 can give).
"""

from __future__ import annotations

import torch

#: Absolute slack for errors the low-precision reference happens not to make.
FLOORS = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

#: The factor for outputs (out, lse) and for gradients.
OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| in float64, with -inf == -inf counting as equal."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(same_inf, torch.zeros_like(a), (a - b).abs())
    if diff.numel() == 0:
        return 0.0
    return float(diff.max())


def check(
    name: str,
    got: torch.Tensor,
    ref64: torch.Tensor,
    ref_lp: torch.Tensor,
    dtype: torch.dtype,
    factor: float = OUT_FACTOR,
) -> tuple[bool, str]:
    """Apply the rule; returns ``(ok, message)`` where the message explains the numbers."""
    if tuple(got.shape) != tuple(ref64.shape):
        return False, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref64.shape)}"
    if torch.isnan(got).any():
        n = int(torch.isnan(got).sum())
        return False, f"{name}: {n} NaN value(s) of {got.numel()}"
    err = max_abs(got, ref64)
    lp_err = max_abs(ref_lp, ref64)
    finite = ref64[torch.isfinite(ref64)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    floor = FLOORS[dtype] * scale
    bound = factor * lp_err + floor
    msg = (f"{name}: max|got - ref64| = {err:.3e}, bound {bound:.3e} "
           f"(= {factor:g} x ref_lp error {lp_err:.3e} + floor {FLOORS[dtype]:.0e} x "
           f"{scale:.3g})")
    return err <= bound, msg


def assert_close(name, got, ref64, ref_lp, dtype, factor=OUT_FACTOR) -> float:
    """`check`, raising ``AssertionError`` with the explanation; returns the error."""
    ok, msg = check(name, got, ref64, ref_lp, dtype, factor)
    assert ok, msg
    return max_abs(got, ref64)
