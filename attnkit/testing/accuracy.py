"""The accuracy rule every backend is held to (DESIGN.md):

    max|got - ref64| <= factor * max|ref_lp - ref64| + floor(dtype)

``ref64`` is the reference computed in float64 from the same inputs, ``ref_lp`` the plain
PyTorch math in the input dtype; factor is 2 for outputs and 3 for gradients. NaN never passes.
In the attention cases the plain math runs in three orders of summing each score (the head
dim as given, reversed, permuted: `Case.low_precision_references`) and the largest error
counts: a near one-hot row follows the rounding of its top two scores, and at scores near 1e4
in fp32 one order's error can be a tenth of another's (4e-5 against 5e-4 in the suite's
scores-1e4 case), so a single order failed correct kernels one run in ten.
Gradients have a second low-precision reference, and the larger error of the two counts:
the contract's own backward in float32 from the state the backend saved, its out (in the
input dtype) and lse (`Case.saved_state_grads`): ``P = exp(S - lse)``,
``delta = rowsum(dout * out)``. The plain math differentiates the softmax instead, and where
large q and k make rows nearly one-hot it cancels exactly what ``dP - delta`` leaves from
rounding and from out's own error (one bf16 ulp passes the forward's rule), which ``|K|``
then magnifies into dQ: at scores near 1e4, ~1e-4 in fp32 and ~1 in bf16 against autograd's
~1e-12, an error every backend that follows the contract can make.
The floor is relative: ``FLOORS[dtype] * max(1, max|ref64|)``, since rounding errors scale
with the values (gradients of large-score inputs reach tens; an absolute fp32 floor of 2e-5
there would demand more than fp32 can give).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    ref_lp: torch.Tensor | Sequence[torch.Tensor | None],
    dtype: torch.dtype,
    factor: float = OUT_FACTOR,
) -> tuple[bool, str]:
    """Apply the rule; returns ``(ok, message)`` where the message explains the numbers.
    ``ref_lp`` may be several low-precision references (None entries ignored): the largest
    of their errors counts."""
    if tuple(got.shape) != tuple(ref64.shape):
        return False, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref64.shape)}"
    if torch.isnan(got).any():
        n = int(torch.isnan(got).sum())
        return False, f"{name}: {n} NaN value(s) of {got.numel()}"
    err = max_abs(got, ref64)
    lps = [ref_lp] if isinstance(ref_lp, torch.Tensor) else [r for r in ref_lp if r is not None]
    lp_err = max(max_abs(r, ref64) for r in lps)
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


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_difference(name: str, got: torch.Tensor, want: torch.Tensor) -> str:
    """``""`` if ``got`` and ``want`` are the same bits (NaN payloads and the sign of zero
    included), else what differs: how many elements, and the first one."""
    if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
        return (f"{name}: {got.dtype} {tuple(got.shape)}, expected {want.dtype} "
                f"{tuple(want.shape)}")
    a, b = got.detach().cpu().contiguous(), want.detach().cpu().contiguous()
    if a.is_floating_point():
        width = _SAME_WIDTH_INT[a.element_size()]
        a, b = a.view(width), b.view(width)
    differs = a != b
    if not differs.any():
        return ""
    first = tuple(int(i) for i in differs.nonzero()[0])
    return (f"{name}: {int(differs.sum())} of {differs.numel()} element(s) differ bit for bit; "
            f"first at {first}: got {got.detach()[first].item()!r}, expected "
            f"{want.detach()[first].item()!r}")
