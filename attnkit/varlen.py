"""Packed variable-length batches: `attention_varlen`, `explain_varlen`, and nested jagged
tensors through `attnkit.attention`.

The layout is FlashAttention's "THD": ``q (total_q, Hq, D)``, ``k``/``v (total_k, Hkv, D)``;
sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and the same rows of
``cu_seqlens_k`` of k and v. A call validates tensors and offsets, selects a backend that
declares ``varlen`` (the problem's ``batch`` is B, its ``seqlen_q``/``seqlen_k`` the
``max_seqlen`` bounds) and runs its ``forward_varlen``/``backward_varlen`` under autograd, or,
under ``torch.compile``, through the ``attnkit::attention_varlen`` custom op.
"""

from __future__ import annotations

import contextlib
import numbers

import torch

from .api import (
    _autocast_inputs,
    _autograd_dispatch,
    _draw_dropout,
    _dropout_kwargs,
    _OnceDifferentiable,
    autocast_device,
    backward_gradients,
)
from .backend import check_backward_result, check_forward_result
from .dropout import check_dropout_p, traced_state
from .registry import Explanation, registry
from .spec import (
    FLOAT_DTYPES,
    AttentionProblem,
    check_heads,
    check_scale,
    check_softcap,
    check_window,
    describe_tensor,
)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
):
    """Exact attention over a packed batch of sequences of different lengths.

    Arguments:
        q: ``(total_q, Hq, D)``; k, v: ``(total_k, Hkv, D)``, ``Hq % Hkv == 0``. Any strides
            on every axis: a slice of a packed qkv projection is read in place.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B + 1,)`` offsets on q's device: 0 first,
            non-decreasing, the tensor's number of rows last. Sequence ``b`` is rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b
            + 1]`` of k and v. Zero-length sequences are allowed anywhere.
        max_seqlen_q, max_seqlen_k: Python ints, upper bounds of the sequence lengths (a
            bound larger than the longest sequence is accepted: a CUDA graph captured with
            one bound replays with any offsets within it), or None: then computed from the
            offsets, which costs one device-to-host copy of both offset tensors (a sync).
        causal, scale, window, softcap: as in `attnkit.attention`, applied per sequence
            (causal aligned to the bottom-right corner of each sequence's own lengths).
        return_lse: also return ``lse``, float32 ``(Hq, total_q)`` (float64 for float64
            inputs), natural log (FlashAttention's and PyTorch's layout).
        dropout_p, generator: as in `attnkit.attention`. The keep mask is the one the dense
            call over the batch of these sequences draws: sequence ``b`` is batch ``b``, its
            query rows and key columns counted from its own first rows (so padding the
            sequences into a dense batch draws the same bits). The backend must declare
            ``varlen`` and ``dropout``.
        backend: as in `attnkit.attention`; the backend must declare ``varlen``.

    Returns:
        ``out`` ``(total_q, Hq, D)`` in q's dtype, or ``(out, lse)`` if ``return_lse``.

    A query row that sees no key (its key sequence is empty, or causal with more queries
    than keys) gives 0 / ``-inf`` / zero gradients. Gradients flow to q, k and v.

    Offsets are checked before any kernel runs (dtype, shape, device, and their values: 0
    first, non-decreasing, the tensor's length last, the lengths within ``max_seqlen``),
    naming the tensor and the offending position. Their values are read on the host only
    when that costs nothing extra: always on CPU, and on a GPU when a ``max_seqlen`` is None
    (the one sync above). With both bounds given on a GPU nothing is read (so the call can be
    captured in a CUDA graph) and the caller vouches for the offsets.
    """
    if autocast_device(q) is not None:  # cast as `attention` does, then run without it
        q, k, v = _autocast_inputs(q, k, v)
        with torch.autocast(q.device.type, enabled=False):
            return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, causal=causal, scale=scale, window=window,
                                    softcap=softcap, return_lse=return_lse,
                                    dropout_p=dropout_p, generator=generator, backend=backend)
    if torch.compiler.is_compiling():
        return _op_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          causal, scale, window, softcap, return_lse, backend, dropout_p,
                          generator)
    problem = varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal=causal, scale=scale, window=window, softcap=softcap,
                             return_lse=return_lse, dropout_p=dropout_p)
    chosen = registry.select(problem, backend)
    # The generator is checked either way; a packing no backend runs draws nothing.
    dropout = _draw_dropout(problem._replace(dropout_p=0.0) if is_empty(problem, q, k)
                            else problem, q, generator)
    out, lse = run_varlen(problem, chosen, q, k, v, cu_seqlens_q, cu_seqlens_k, dropout)
    return (out, lse) if return_lse else out


def explain_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                   **options) -> Explanation:
    """Every backend's verdict on this `attention_varlen` call, without running it."""
    options.pop("backend", None)
    return registry.explain(varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, **options))


# -- validation ----------------------------------------------------------------------------

def _check_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:
            raise TypeError(f"{describe_tensor(name, t)} is a nested tensor; attention_varlen "
                            "takes packed (total, H, D) tensors and offsets (attnkit.attention "
                            "takes nested jagged tensors)")
        if t.dim() != 3:
            raise ValueError(
                f"{describe_tensor(name, t)} must have 3 dimensions "
                f"({'(total_q, Hq, D)' if name == 'q' else '(total_k, Hkv, D)'}), got {t.dim()}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{describe_tensor(name, t)}: dtype {t.dtype} is not supported; "
                            "attention takes float16, bfloat16, float32 or float64 inputs")
    tensors = ", ".join(describe_tensor(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype: {tensors}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device: {tensors}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (total_k, Hkv, D): "
                         f"{describe_tensor('k', k)}, {describe_tensor('v', v)}")
    _, Hq, D = q.shape
    _, Hkv, Dk = k.shape
    if Dk != D:
        raise ValueError(f"head dim mismatch: {describe_tensor('q', q)} has D={D}, "
                         f"{describe_tensor('k', k)} has D={Dk}")
    check_heads(q, "k", k, Hq, Hkv, D)


def _check_offsets_tensor(name: str, cu, q: torch.Tensor, of: str) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor of shape (B + 1,), got "
                        f"{type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{describe_tensor(name, cu)} must have dtype torch.int32 (the "
                        f"offsets kernels read; cast with .to(torch.int32))")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{describe_tensor(name, cu)} must have shape (B + 1,): B + 1 "
                         f"offsets into the rows of {of}, 0 first")
    if cu.device != q.device:
        raise ValueError(f"{describe_tensor(name, cu)} must be on q's device {q.device}")


def check_offset_values(name: str, host: torch.Tensor, length: int, of: str) -> int:
    """The longest sequence of a CPU offsets tensor, after checking it starts at 0, never
    decreases and ends at ``length`` (the rows of ``of``); else ``ValueError`` naming the
    tensor and the offending position."""
    first = int(host[0])
    if first != 0:
        raise ValueError(f"{name}[0] is {first}: offsets must start at 0")
    lengths = host[1:] - host[:-1]
    if lengths.numel() and bool((lengths < 0).any()):
        i = int((lengths < 0).nonzero()[0])
        raise ValueError(f"{name} decreases at position {i + 1}: {name}[{i}] = "
                         f"{int(host[i])} > {name}[{i + 1}] = {int(host[i + 1])}; offsets "
                         "must be non-decreasing")
    last = int(host[-1])
    if last != length:
        raise ValueError(f"{name}[{host.shape[0] - 1}] (the last offset) is {last}, but {of} "
                         f"has {length} rows; the last offset must equal the tensor's length")
    return int(lengths.max()) if lengths.numel() else 0


def _check_max(name: str, given, longest: int | None, cu_name: str, lengths=None) -> int:
    if given is None:
        return longest
    if isinstance(given, torch.SymInt):  # traced by torch.compile: checked in the op's body
        return given
    if isinstance(given, bool) or not isinstance(given, numbers.Integral) or given < 0:
        raise TypeError(f"{name} must be a non-negative int or None, got {given!r}")
    given = int(given)
    if longest is not None and longest > given:
        b = int((lengths == longest).nonzero()[0])
        raise ValueError(f"{name}={given} is smaller than sequence {b}'s length {longest} "
                         f"({cu_name}[{b + 1}] - {cu_name}[{b}]); it must be an upper bound")
    return given


def varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                   *, causal=False, scale=None, window=None, softcap=None, return_lse=False,
                   needs_grad=None, check_values=True, dropout_p=0.0) -> AttentionProblem:
    """Validate one `attention_varlen` call and describe it (``varlen=True``, ``batch`` B,
    ``seqlen_q``/``seqlen_k`` the max_seqlen bounds). ``check_values`` off (fake tensors
    under torch.compile) reads no offset; a max_seqlen left None is then 0."""
    _check_tensors(q, k, v)
    _check_offsets_tensor("cu_seqlens_q", cu_seqlens_q, q, "q")
    _check_offsets_tensor("cu_seqlens_k", cu_seqlens_k, q, "k")
    B = cu_seqlens_q.shape[0] - 1
    if cu_seqlens_k.shape[0] - 1 != B:
        raise ValueError(f"batch mismatch: {describe_tensor('cu_seqlens_q', cu_seqlens_q)} "
                         f"holds B={B} sequences, "
                         f"{describe_tensor('cu_seqlens_k', cu_seqlens_k)} holds "
                         f"B={cu_seqlens_k.shape[0] - 1}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    total_q, Hq, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    scale = check_scale(scale, D)
    window = check_window(window)
    softcap = check_softcap(softcap)
    dropout_p = check_dropout_p(dropout_p)

    longest_q = longest_k = lengths_q = lengths_k = None
    read = check_values and (q.device.type == "cpu" or max_seqlen_q is None
                             or max_seqlen_k is None)
    if read:  # one device-to-host copy for both tensors (the documented sync)
        host = torch.cat([cu_seqlens_q, cu_seqlens_k]).cpu()
        host_q, host_k = host[:B + 1], host[B + 1:]
        longest_q = check_offset_values("cu_seqlens_q", host_q, total_q, "q")
        longest_k = check_offset_values("cu_seqlens_k", host_k, total_k, "k")
        lengths_q, lengths_k = host_q.diff(), host_k.diff()
    max_q = _check_max("max_seqlen_q", max_seqlen_q, longest_q, "cu_seqlens_q", lengths_q)
    max_k = _check_max("max_seqlen_k", max_seqlen_k, longest_k, "cu_seqlens_k", lengths_k)
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                  or v.requires_grad)
    return AttentionProblem(B, Hq, Hkv, max_q or 0, max_k or 0, D, q.dtype, q.device, causal,
                            scale, window, False, softcap, return_lse, bool(needs_grad),
                            torch.are_deterministic_algorithms_enabled(), True, dropout_p)


# -- running -------------------------------------------------------------------------------

def is_empty(problem: AttentionProblem, q, k) -> bool:
    """Nothing for a backend to do: no query row, or no key anywhere (every row sees none)."""
    return problem.is_empty or q.shape[0] == 0 or k.shape[0] == 0


def empty_result(problem: AttentionProblem, q):
    """0 / -inf for every query row, in the varlen shapes."""
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype, device=q.device)
    return out, lse


def lse_shape(q) -> tuple[int, int]:
    return (q.shape[1], q.shape[0])


def run_varlen(problem, chosen, q, k, v, cu_q, cu_k, dropout=None):
    """``(out, lse)`` of a validated varlen problem on the backend selected for it;
    ``dropout`` (an `attnkit.dropout.Dropout`) exactly when ``problem.dropout_p > 0``."""
    if is_empty(problem, q, k):
        out, lse = empty_result(problem, q)
        if problem.needs_grad:  # keep the graph: zero gradients
            out = out + 0 * (q.sum() + k.sum() + v.sum())
        return out, lse
    if problem.needs_grad:
        return _VarlenFunction.apply(q, k, v, cu_q, cu_k, problem, chosen, dropout)
    kw = {} if dropout is None else {"dropout": dropout}
    return check_forward_result(chosen, q, chosen.forward_varlen(problem, q, k, v, cu_q, cu_k,
                                                                 **kw),
                                lse_shape(q), "forward_varlen")


class _VarlenFunction(torch.autograd.Function):
    """forward_varlen and backward_varlen on one backend; saves q, k, v, out and lse (and
    the dropout state: the backward regenerates the mask)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, problem, backend, dropout):
        ctx.kw = {} if dropout is None else {"dropout": dropout}
        out, lse = check_forward_result(
            backend, q, backend.forward_varlen(problem, q, k, v, cu_q, cu_k, **ctx.kw),
            lse_shape(q), "forward_varlen")
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.problem, ctx.backend = problem, backend
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dout, dlse = backward_gradients(ctx.backend, out, lse, dout, dlse)
        if dout is None:
            return (None,) * 8
        kwargs = dict(ctx.kw) if dlse is None else {"dlse": dlse, **ctx.kw}
        autocast = autocast_device(q)
        off = torch.autocast(autocast, enabled=False) if autocast else contextlib.nullcontext()
        with torch.no_grad(), off:
            grads = ctx.backend.backward_varlen(ctx.problem, q, k, v, out, lse, dout, cu_q,
                                                cu_k, **kwargs)
        grads = check_backward_result(ctx.backend, q, k, v, grads, "backward_varlen")
        if torch.is_grad_enabled():
            grads = _OnceDifferentiable.apply(*grads, q, k, v, dout)
        return *grads, None, None, None, None, None


# -- torch.compile: a custom op with a fake implementation ---------------------------------

def _op_problem(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, wl, wr, softcap, return_lse,
                needs_grad, check_values, dropout_p=0.0):
    # Fake tensors: shapes only (a traced max_seqlen may be symbolic; the body checks it).
    if not check_values:
        max_q = max_k = -1
    return varlen_problem(q, k, v, cu_q, cu_k, None if max_q < 0 else max_q,
                          None if max_k < 0 else max_k, causal=causal, scale=scale,
                          window=(wl, wr), softcap=softcap if softcap > 0 else None,
                          return_lse=return_lse, needs_grad=needs_grad,
                          check_values=check_values, dropout_p=dropout_p)


@torch.library.custom_op("attnkit::attention_varlen", mutates_args=())
def _varlen_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
    scale: float, window_left: int, window_right: int, softcap: float, return_lse: bool,
    needs_grad: bool, backend: str, dropout_p: float = 0.0,
    dropout_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    problem = _op_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          causal, scale, window_left, window_right, softcap, return_lse,
                          needs_grad, True, dropout_p)
    chosen = registry.select(problem, backend)
    if is_empty(problem, q, k):
        return empty_result(problem, q)
    kw = _dropout_kwargs(dropout_p, dropout_state)
    return check_forward_result(
        chosen, q, chosen.forward_varlen(problem, q, k, v, cu_seqlens_q, cu_seqlens_k, **kw),
        lse_shape(q), "forward_varlen")


@_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
      window_left, window_right, softcap, return_lse, needs_grad, backend, dropout_p=0.0,
      dropout_state=None):
    problem = _op_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          causal, scale, window_left, window_right, softcap, return_lse,
                          needs_grad, False, dropout_p)
    return empty_result(problem, q)


@torch.library.custom_op("attnkit::attention_varlen_backward", mutates_args=())
def _varlen_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    dlse: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
    scale: float, window_left: int, window_right: int, softcap: float, return_lse: bool,
    backend: str, dropout_p: float = 0.0, dropout_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    problem = _op_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          causal, scale, window_left, window_right, softcap, return_lse, True,
                          True, dropout_p)
    if is_empty(problem, q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    chosen = registry.select(problem, backend)  # the forward's problem: its backend
    dout, dlse = backward_gradients(chosen, out, lse, dout.contiguous(), dlse)
    kwargs = _dropout_kwargs(dropout_p, dropout_state)
    if dlse is not None:
        kwargs["dlse"] = dlse
    with _autograd_dispatch():
        grads = chosen.backward_varlen(problem, q, k, v, out, lse, dout, cu_seqlens_q,
                                       cu_seqlens_k, **kwargs)
    return check_backward_result(chosen, q, k, v, grads, "backward_varlen")


@_varlen_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, dlse, max_seqlen_q, max_seqlen_k,
      causal, scale, window_left, window_right, softcap, return_lse, backend, dropout_p=0.0,
      dropout_state=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _op_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, wl, wr, softcap, return_lse, _, be,
     dropout_p, dropout_state) = inputs
    ctx.save_for_backward(q, k, v, *output, cu_q, cu_k, dropout_state)
    ctx.options = (max_q, max_k, causal, scale, wl, wr, softcap, return_lse, be, dropout_p)
    ctx.set_materialize_grads(False)


def _op_backward(ctx, dout, dlse):
    if dout is None and dlse is None:
        return (None,) * 17
    q, k, v, out, lse, cu_q, cu_k, dropout_state = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _varlen_backward_op(dout, q, k, v, out, lse, cu_q, cu_k, dlse, *ctx.options,
                                     dropout_state)
    return dq, dk, dv, *(None,) * 14


_varlen_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _op_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, return_lse,
               backend, dropout_p=0.0, generator=None):
    """`attention_varlen` through the custom op (under torch.compile). A max_seqlen left
    None is computed inside the op, from the real offsets; dropout's state is drawn in the
    graph, from the device's default generator, as `attention`'s."""
    wl, wr = check_window(window)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                              or v.requires_grad)
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        _check_max(name, m, None, "")
    dropout_p = check_dropout_p(dropout_p)
    state = traced_state(dropout_p, generator, q.device)
    out, lse = _varlen_op(q, k, v, cu_q, cu_k, -1 if max_q is None else max_q,
                          -1 if max_k is None else max_k, causal,
                          check_scale(scale, q.shape[-1]), wl, wr,
                          check_softcap(softcap) or 0.0, bool(return_lse), needs_grad,
                          backend or "auto", dropout_p, state)
    return (out, lse) if return_lse else out


# -- for backends --------------------------------------------------------------------------

def host_sequences(problem: AttentionProblem, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   total_q: int, total_k: int) -> list[tuple[int, int, int, int]]:
    """``(q0, q1, k0, k1)`` row ranges of every sequence, read on the host (one sync) and
    checked as the core checks them, the lengths against ``problem``'s max_seqlen bounds
    too: for backends that loop over sequences on the host, whose offsets on a GPU the core
    may not have read."""
    B = problem.batch
    host = torch.cat([cu_q, cu_k]).cpu()
    host_q, host_k = host[:B + 1], host[B + 1:]
    longest_q = check_offset_values("cu_seqlens_q", host_q, total_q, "q")
    longest_k = check_offset_values("cu_seqlens_k", host_k, total_k, "k")
    _check_max("max_seqlen_q", problem.seqlen_q, longest_q, "cu_seqlens_q", host_q.diff())
    _check_max("max_seqlen_k", problem.seqlen_k, longest_k, "cu_seqlens_k", host_k.diff())
    q_off, k_off = host_q.tolist(), host_k.tolist()
    return [(q_off[b], q_off[b + 1], k_off[b], k_off[b + 1]) for b in range(B)]


def as_dense(t: torch.Tensor, r0: int, r1: int, n: int = 1) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a packed ``(total, H, D)`` tensor, ``n`` sequences of equal
    length, as a dense ``(n, H, L, D)`` view (no copy)."""
    return t[r0:r1].unflatten(0, (n, (r1 - r0) // n)).transpose(1, 2)


# -- nested jagged tensors -----------------------------------------------------------------

def _jagged_parts(name: str, t) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """``(values (total, H, D), offsets int64 (B + 1,), cached max length or None)`` of a
    ``(B, H, j, D)`` nested jagged tensor."""
    if not (isinstance(t, torch.Tensor) and t.is_nested and t.layout == torch.jagged):
        kind = (f"a nested tensor of layout {t.layout}" if isinstance(t, torch.Tensor)
                and t.is_nested else type(t).__name__ if not isinstance(t, torch.Tensor)
                else f"a dense tensor of shape {tuple(t.shape)}")
        raise TypeError(f"{name} is {kind}; with nested inputs, q, k and v must all be nested "
                        "tensors of layout torch.jagged, shape (B, H, j, D)")
    if t.dim() != 4 or getattr(t, "_ragged_idx", None) != 2:
        raise ValueError(f"{name}: nested jagged tensor of shape {tuple(t.shape)} must have "
                         "shape (B, H, j, D), ragged in dim 2 (a (B, j, H, D) nested tensor "
                         "passed as .transpose(1, 2))")
    packed = t.transpose(1, 2)
    if packed.lengths() is not None:
        raise ValueError(f"{name}: a nested jagged tensor with lengths (holes between its "
                         "sequences) is not supported; make it contiguous first")
    return packed.values(), packed.offsets(), getattr(packed, "_maybe_max_seqlen", None)


def attention_jagged(q, k, v, *, causal=False, scale=None, window=None, seqlens_k=None,
                     softcap=None, return_lse=False, dropout_p=0.0, generator=None,
                     backend=None):
    """`attnkit.attention` on nested jagged tensors ``(B, H, j, D)``: the packed values and
    offsets through `attention_varlen`; ``out`` (and ``lse``, ``(B, Hq, j)``) nested with
    q's offsets."""
    if seqlens_k is not None:
        raise ValueError("seqlens_k does not apply to nested jagged inputs: the key lengths "
                         "are k's own")
    qv, q_off, max_q = _jagged_parts("q", q)
    kv, k_off, max_k = _jagged_parts("k", k)
    vv, v_off, _ = _jagged_parts("v", v)
    if v_off is not k_off and (v_off.shape != k_off.shape or not torch.equal(v_off, k_off)):
        raise ValueError(f"k and v must have the same sequence lengths: k's offsets "
                         f"{k_off.tolist()}, v's {v_off.tolist()}")
    res = attention_varlen(qv, kv, vv, q_off.to(torch.int32), k_off.to(torch.int32), max_q,
                           max_k, causal=causal, scale=scale, window=window, softcap=softcap,
                           return_lse=return_lse, dropout_p=dropout_p, generator=generator,
                           backend=backend)
    out, lse = res if return_lse else (res, None)
    out = torch.nested.nested_tensor_from_jagged(out, offsets=q_off).transpose(1, 2)
    if not return_lse:
        return out
    lse = torch.nested.nested_tensor_from_jagged(lse.transpose(0, 1).contiguous(),
                                                 offsets=q_off).transpose(1, 2)
    return out, lse
