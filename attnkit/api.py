"""The public entry points: `attention`, `explain`, `backends`.

A call validates its inputs into an `AttentionProblem`, selects a backend (cached per
problem), and runs it under autograd. Under ``torch.compile`` the call goes through the
``attnkit::attention`` custom op instead, so a compiled graph holds it without a break; under
``torch.vmap`` and ``torch.func`` transforms, through the same op inside a Function that
those transforms accept (the op's vmap rule folds the mapped dimension into the batch).
"""

from __future__ import annotations

import contextlib
import sys

import torch

from .backend import check_backward_result, check_forward_result
from .dropout import Dropout, draw_state, traced_state
from .registry import Explanation, Registration, registry
from .spec import AttentionProblem, check_scale, check_softcap, check_window, describe_tensor


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    seqlens_k: torch.Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
):
    """Exact softmax attention, ``softmax(scale * q @ k^T + mask) @ v``.

    Arguments:
        q: ``(B, Hq, Sq, D)``. k, v: ``(B, Hkv, Sk, D)``, with ``Hq % Hkv == 0``; query head
            ``h`` reads kv head ``h // (Hq // Hkv)`` (GQA/MQA). Any strides: a ``(B, S, H, D)``
            tensor passed as ``.transpose(1, 2)`` is read in place by the fast backends.
            float16, bfloat16, float32 or float64, all three the same dtype and device.
        causal: mask aligned to the **bottom-right** corner. With ``Sk_b`` the number of valid
            keys of batch ``b``, query ``i`` sees key ``j`` iff ``j <= i + Sk_b - Sq``.
            For Sq=2, Sk=5 (``1`` = visible)::

                1 1 1 1 0
                1 1 1 1 1

            and for Sq=5, Sk=2 the first three queries see nothing::

                0 0
                0 0
                0 0
                1 0
                1 1

        scale: applied to ``q @ k^T``; default ``1 / sqrt(D)``.
        window: ``(left, right)`` sliding window, ``-1`` = unbounded on that side: query ``i``
            sees key ``j`` iff ``i + Sk_b - Sq - left <= j <= i + Sk_b - Sq + right``;
            combined with ``causal`` by AND.
        seqlens_k: int32/int64 ``(B,)`` on q's device, each in ``[0, Sk]``: keys at positions
            ``>= seqlens_k[b]`` do not exist for batch ``b`` (padded keys, KV caches of
            different fill). Bottom-right alignment uses ``Sk_b = seqlens_k[b]``.
        softcap: if given (> 0), scores become ``softcap * tanh(scores / softcap)`` before
            the softmax.
        return_lse: also return ``lse``, the natural-log log-sum-exp of the scaled (capped)
            scores, float32 ``(B, Hq, Sq)`` (float64 for float64 inputs). Differentiable on
            backends whose capabilities declare ``lse_grad`` (the reference, and the others
            that say so in ``attnkit backends``): a loss on lse, or `merge_attention` of
            partial results, sends its gradient to q and k. On any other backend a nonzero
            gradient reaching lse raises ``RuntimeError`` naming the backend at backward time
            (detach lse, or pick a backend with ``lse_grad``).
        dropout_p: probability of dropping each attention probability after the softmax
            (the kept ones are scaled by ``1 / (1 - p)``, as SDPA does); ``lse`` is not
            affected. The keep mask is `attnkit.dropout`'s counter-based function of one
            draw from ``generator`` (default: the device's default generator), identical on
            every backend that declares ``dropout``; the backward regenerates it. The draw
            is a device tensor: no host sync, fresh values on each CUDA-graph replay, the
            same mask after ``torch.manual_seed`` or a checkpoint recomputation.
        generator: the ``torch.Generator`` (on q's device) dropout draws from.
        backend: ``None``/``"auto"`` picks the best backend that computes this problem to spec
            (see `explain`); a name forces that backend or raises ``ValueError`` saying why it
            cannot.

    Returns:
        ``out`` ``(B, Hq, Sq, D)`` in q's dtype, or ``(out, lse)`` if ``return_lse``.

    ``scale``, ``softcap`` and the window's sides may be Python or numpy numbers
    (``np.float32(0.1)``, ``np.int64(8)``); inside ``torch.compile(fullgraph=True)`` only
    Python numbers (it traces a numpy scalar as an array; without fullgraph it breaks the
    graph there and the call runs eagerly).

    A query row that sees no key (fully masked) gives 0 in ``out``, ``-inf`` in ``lse`` and
    zero gradients; never NaN. A query row holding NaN gives NaN in its ``out`` and ``lse``
    (never ``-inf``); other rows are unaffected.

    Softmax is max-subtracted with fp32 accumulation for fp16/bf16; fp32 inputs are computed
    to fp32 accuracy. Gradients flow to q, k and v (kv gradients summed over each GQA group)
    through the same backend that ran the forward, which saved only ``out`` and ``lse``.
    Differentiable once: a second derivative (``create_graph=True`` then another backward
    through the gradients) raises ``RuntimeError``. The forward is deterministic; a backend
    whose backward is not is never chosen under ``torch.use_deterministic_algorithms(True)``.

    Under ``torch.autocast`` on q's device, float32/float16/bfloat16 inputs are first cast to
    the autocast dtype, as for ``torch.nn.functional.scaled_dot_product_attention``.

    ``torch.vmap`` (and the other ``torch.func`` transforms but forward-mode AD) works on
    every backend: a mapped dimension is folded into the batch (an unmapped q, k, v or
    seqlens_k is repeated along it) and the backend runs one call over ``N * B`` batches.

    Nested jagged tensors (``layout=torch.jagged``, ``(B, H, j, D)``: a ``(B, j, H, D)``
    nested tensor passed as ``.transpose(1, 2)``, as for SDPA) run as a packed
    variable-length batch (`attnkit.attention_varlen`) on a backend that declares
    ``varlen``; ``out`` is nested with q's offsets, ``lse`` ``(B, Hq, j)`` nested too, and
    ``seqlens_k`` does not apply (each sequence's keys are k's own).

    Raises ``TypeError``/``ValueError`` naming the offending tensor, its shape, dtype and
    device for invalid input, and `attnkit.registry.NoBackendError` (a ``ValueError``)
    listing every backend's reasons when none can run the problem.
    """
    if (getattr(q, "is_nested", False) or getattr(k, "is_nested", False)  # no generator:
            or getattr(v, "is_nested", False)):  # this runs on every call
        from .varlen import attention_jagged  # packed values and offsets: attention_varlen

        return attention_jagged(q, k, v, causal=causal, scale=scale, window=window,
                                seqlens_k=seqlens_k, softcap=softcap, return_lse=return_lse,
                                dropout_p=dropout_p, generator=generator, backend=backend)
    if autocast_device(q) is not None:  # cast as autocast does for SDPA, then run without it
        q, k, v = _autocast_inputs(q, k, v)
        with torch.autocast(q.device.type, enabled=False):
            return attention(q, k, v, causal=causal, scale=scale, window=window,
                             seqlens_k=seqlens_k, softcap=softcap, return_lse=return_lse,
                             dropout_p=dropout_p, generator=generator, backend=backend)
    if torch.compiler.is_compiling():
        return _op_attention(q, k, v, causal, scale, window, seqlens_k, softcap, return_lse,
                             backend, dropout_p=dropout_p, generator=generator)
    if torch._C._are_functorch_transforms_active() and dropout_p:
        raise ValueError("dropout_p > 0 under torch.func transforms (vmap, grad) is not "
                         "supported: each mapped sample would need its own draw")
    if torch._C._are_functorch_transforms_active():  # vmap, torch.func.grad: the custom op
        # validates per sample here, then folds vmap's dimension into the batch (its rule)
        AttentionProblem.from_tensors(q, k, v, causal=causal, scale=scale, window=window,
                                      seqlens_k=seqlens_k, softcap=softcap,
                                      return_lse=return_lse, check_values=False)
        return _op_attention(q, k, v, causal, scale, window, seqlens_k, softcap, return_lse,
                             backend, transformed=True)
    problem = AttentionProblem.from_tensors(
        q, k, v, causal=causal, scale=scale, window=window, seqlens_k=seqlens_k,
        softcap=softcap, return_lse=return_lse, dropout_p=dropout_p,
    )
    chosen = registry.select(problem, backend)
    dropout = _draw_dropout(problem, q, generator)
    return run_problem(problem, chosen, q, k, v, seqlens_k, dropout)


#: Device types whose autocast state can be asked (others raise when asked).
_AUTOCAST_DEVICES = frozenset(t for t in ("cpu", "cuda", "xpu", "mps", "hpu")
                              if torch.amp.is_autocast_available(t))
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64


def autocast_device(t) -> str | None:
    """The device type of ``t`` if ``torch.autocast`` is on for it, else None. Backends run
    with autocast off: it would round the fp32 matmuls inside the torch backends (and the
    reference) to the autocast dtype."""
    if not isinstance(t, torch.Tensor):
        return None
    kind = "cuda" if t.is_cuda else t.device.type  # is_cuda: the hot path's cheap question
    if kind not in _AUTOCAST_DEVICES:
        return None
    return kind if torch.is_autocast_enabled(kind) else None


def _autocast_inputs(q, k, v):
    """q, k and v in the autocast dtype, as autocast casts them for
    ``scaled_dot_product_attention``: a model's fp32 activations (say, after an fp32 rotary
    embedding) run at the precision the user asked autocast for."""
    dtype = torch.get_autocast_dtype(q.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_DTYPES
                 else t for t in (q, k, v))


def _lengths_for_backends(seqlens_k):
    """``seqlens_k`` as the backend contract promises it: int32 and contiguous."""
    if seqlens_k is not None and (seqlens_k.dtype != torch.int32
                                  or not seqlens_k.is_contiguous()):
        seqlens_k = seqlens_k.to(torch.int32).contiguous()
    return seqlens_k


def _draw_dropout(problem, q, generator) -> Dropout | None:
    """The call's `attnkit.dropout.Dropout` (one draw from the generator), or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not problem.dropout_p or problem.is_empty:
        return None
    if generator is not None and generator.device.type != q.device.type:
        raise ValueError(f"generator is on {generator.device}; dropout draws on q's device "
                         f"({describe_tensor('q', q)})")
    return Dropout(problem.dropout_p, draw_state(q.device, generator))


def run_problem(problem: AttentionProblem, chosen, q, k, v, seqlens_k, dropout=None):
    """Run a validated problem on the backend selected for it (eager path of `attention`,
    shared with `attention_with_kvcache`, which validates and selects before writing)."""
    return_lse = problem.return_lse
    seqlens_k = _lengths_for_backends(seqlens_k)
    if problem.is_empty:
        out, lse = _empty_result(problem, q)
        if problem.needs_grad:  # keep the graph: zero gradients, same as a backend would give
            out = out + 0 * (q.sum() + k.sum() + v.sum())
    elif problem.needs_grad:
        out, lse = _AttentionFunction.apply(q, k, v, seqlens_k, problem, chosen, dropout)
    else:
        kw = {} if dropout is None else {"dropout": dropout}
        out, lse = check_forward_result(chosen, q, chosen.forward(problem, q, k, v, seqlens_k,
                                                                  **kw))
    return (out, lse) if return_lse else out


def explain(q, k, v, **options) -> Explanation:
    """Every backend's verdict on this call, without running it.

    Takes `attention`'s arguments; ``str()`` of the result is a readable table, and its
    ``chosen`` attribute names the backend ``backend="auto"`` would use.
    """
    options.pop("backend", None)
    problem = AttentionProblem.from_tensors(q, k, v, **options)
    return registry.explain(problem)


def backends() -> dict[str, Registration]:
    """The registered backends by name (see also `attnkit.registry.registry.failures`)."""
    return registry.registrations()


def _empty_result(problem: AttentionProblem, q: torch.Tensor):
    B, H, Sq, D = problem.batch, problem.heads_q, problem.seqlen_q, problem.head_dim
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros((B, H, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=lse_dtype, device=q.device)
    return out, lse


class _AttentionFunction(torch.autograd.Function):
    """Forward and backward on one backend; saves q, k, v, out and lse (nothing S x S)."""

    @staticmethod
    def forward(ctx, q, k, v, seqlens_k, problem, backend, dropout):
        ctx.kw = {} if dropout is None else {"dropout": dropout}
        out, lse = check_forward_result(backend, q, backend.forward(problem, q, k, v,
                                                                    seqlens_k, **ctx.kw))
        ctx.save_for_backward(q, k, v, out, lse, seqlens_k)
        ctx.problem, ctx.backend = problem, backend
        # A gradient that does not reach the loss stays None: without this, autograd fills a
        # zeros tensor for lse on every backward (an allocation and a launch on its thread).
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, seqlens_k = ctx.saved_tensors
        dout, dlse = backward_gradients(ctx.backend, out, lse, dout, dlse)
        if dout is None:  # neither out nor lse reached the loss: no gradient flows
            return (None,) * 7
        args = (ctx.problem, q, k, v, out, lse, dout, seqlens_k)
        kwargs = dict(ctx.kw) if dlse is None else {"dlse": dlse, **ctx.kw}
        autocast = autocast_device(q)  # loss.backward() called inside torch.autocast
        if not torch.is_grad_enabled() and autocast is None:  # the usual case
            grads = ctx.backend.backward(*args, **kwargs)
            return *check_backward_result(ctx.backend, q, k, v, grads), None, None, None, None
        off = torch.autocast(autocast, enabled=False) if autocast else contextlib.nullcontext()
        with torch.no_grad(), off:
            grads = check_backward_result(ctx.backend, q, k, v,
                                          ctx.backend.backward(*args, **kwargs))
        if torch.is_grad_enabled():  # create_graph=True: the gradients get a node that
            grads = _OnceDifferentiable.apply(*grads, q, k, v, dout)  # refuses, saying why
        return *grads, None, None, None, None


def backward_gradients(backend, out, lse, dout, dlse):
    """``(dout, dlse)`` as the backend's backward takes them, or ``(None, None)`` when no
    gradient flows. ``dlse`` stays None unless the backend declares ``lse_grad`` and the loss
    reached lse; a nonzero lse gradient for a backend without ``lse_grad`` raises."""
    if dlse is not None:
        if backend.capabilities.lse_grad:
            if dlse.dtype != lse.dtype or not dlse.is_contiguous():  # lse.sum() sends an
                dlse = dlse.to(lse.dtype).contiguous()  # expanded (stride 0) gradient
        elif bool((dlse != 0).any()):  # one sync, only when the loss used lse (NaN counts)
            raise RuntimeError(
                f"backend {backend.name!r} cannot differentiate through lse (its "
                "Capabilities do not declare lse_grad), but the loss depends on the lse this "
                "call returned (a loss on lse, or merge_attention of it); detach lse, or use a "
                "backend that declares lse_grad (see `attnkit backends`)")
        else:
            dlse = None
    if dout is None:
        if dlse is None:
            return None, None
        dout = torch.zeros_like(out)  # only lse reached the loss
    # Backends get dout contiguous or in out's own layout: a (B, S, H, D) model's dout
    # arrives in out's layout, and copying it cost a launch and a pass over dout.
    elif dout.stride() != out.stride():
        dout = dout.contiguous()
    return dout, dlse


class _OnceDifferentiable(torch.autograd.Function):
    """Passes the gradients through; differentiating them raises. A backend's backward is
    kernels (or, for the reference, ops that treat ``lse`` as a constant), so a derivative
    taken through it would be missing terms: an error, not a wrong number."""

    generate_vmap_rule = True  # usable under torch.func transforms, too

    @staticmethod
    def forward(dq, dk, dv, *_inputs):
        return dq.view_as(dq), dk.view_as(dk), dv.view_as(dv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_grads):
        raise RuntimeError(
            "attnkit.attention is differentiable once: its backward has no derivative of its "
            "own, so a second derivative (create_graph=True, then differentiating the "
            "gradients) is not supported")


# -- torch.compile: a custom op with a fake implementation ---------------------------------

def _problem_from_op_args(q, k, v, seqlens_k, causal, scale, wl, wr, softcap, return_lse,
                          needs_grad, check_values, dropout_p=0.0):
    # The op always returns lse (autograd saves it for the backward); ``return_lse`` says
    # whether the caller asked for it, so selection is eager's (a backend without the lse
    # feature runs calls that do not ask).
    return AttentionProblem.from_tensors(
        q, k, v, causal=causal, scale=scale, window=(wl, wr), seqlens_k=seqlens_k,
        softcap=softcap if softcap > 0 else None, return_lse=return_lse, needs_grad=needs_grad,
        check_values=check_values, dropout_p=dropout_p,
    )


@torch.library.custom_op("attnkit::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens_k: torch.Tensor | None,
    causal: bool, scale: float, window_left: int, window_right: int, softcap: float,
    return_lse: bool, needs_grad: bool, backend: str, dropout_p: float = 0.0,
    dropout_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    problem = _problem_from_op_args(q, k, v, seqlens_k, causal, scale, window_left,
                                    window_right, softcap, return_lse, needs_grad, True,
                                    dropout_p)
    chosen = registry.select(problem, backend)
    if problem.is_empty:
        return _empty_result(problem, q)
    kw = _dropout_kwargs(dropout_p, dropout_state)
    return check_forward_result(chosen, q, chosen.forward(problem, q, k, v, seqlens_k, **kw))


def _dropout_kwargs(dropout_p, dropout_state) -> dict:
    return {"dropout": Dropout(dropout_p, dropout_state)} if dropout_p else {}


@_attention_op.register_fake
def _(q, k, v, seqlens_k, causal, scale, window_left, window_right, softcap, return_lse,
      needs_grad, backend, dropout_p=0.0, dropout_state=None):
    problem = _problem_from_op_args(q, k, v, seqlens_k, causal, scale, window_left,
                                    window_right, softcap, return_lse, needs_grad, False,
                                    dropout_p)
    return _empty_result(problem, q)


@torch.library.custom_op("attnkit::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, seqlens_k: torch.Tensor | None, dlse: torch.Tensor | None, causal: bool,
    scale: float, window_left: int, window_right: int, softcap: float, return_lse: bool,
    backend: str, dropout_p: float = 0.0, dropout_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    problem = _problem_from_op_args(q, k, v, seqlens_k, causal, scale, window_left,
                                    window_right, softcap, return_lse, True, False, dropout_p)
    if problem.is_empty:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # Same problem, same cache entry: the backend that ran the forward.
    chosen = registry.select(problem, backend)
    dout, dlse = backward_gradients(chosen, out, lse, dout.contiguous(), dlse)
    kwargs = _dropout_kwargs(dropout_p, dropout_state)
    if dlse is not None:
        kwargs["dlse"] = dlse
    with _autograd_dispatch():
        grads = chosen.backward(problem, q, k, v, out, lse, dout, seqlens_k, **kwargs)
    return check_backward_result(chosen, q, k, v, grads)


def _autograd_dispatch():
    """Autograd on again inside a custom op's body (the dispatcher runs it below autograd):
    a backend may compute its backward with torch's autograd, as it may in eager calls."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    return torch._C._ForceDispatchKeyGuard(
        torch._C._dispatch_tls_local_include_set(),
        exclude.remove(torch._C.DispatchKey.AutogradFunctionality))


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, seqlens_k, dlse, causal, scale, window_left, window_right,
      softcap, return_lse, backend, dropout_p=0.0, dropout_state=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _op_setup_context(ctx, inputs, output):
    (q, k, v, seqlens_k, causal, scale, wl, wr, softcap, return_lse, _needs_grad, backend,
     dropout_p, dropout_state) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seqlens_k, dropout_state)
    ctx.options = (causal, scale, wl, wr, softcap, return_lse, backend, dropout_p)
    ctx.set_materialize_grads(False)  # lse's gradient stays None unless the loss used it


def _op_backward(ctx, dout, dlse):
    if dout is None and dlse is None:
        return (None,) * 14
    q, k, v, out, lse, seqlens_k, dropout_state = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_backward_op(dout, q, k, v, out, lse, seqlens_k, dlse, *ctx.options,
                                        dropout_state)
    return dq, dk, dv, *(None,) * 11


_attention_op.register_autograd(_op_backward, setup_context=_op_setup_context)


class _TransformedAttention(torch.autograd.Function):
    """`attention` under torch.func transforms (vmap, grad, jacrev): the custom op's own
    autograd cannot be transformed, this Function can; its vmap rule is generated from the
    two custom ops' rules, which fold vmap's dimension into the batch."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, seqlens_k, options):
        return _attention_op(q, k, v, seqlens_k, *options, 0.0, None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, seqlens_k, (causal, scale, wl, wr, softcap, return_lse, _, backend) = inputs
        ctx.save_for_backward(q, k, v, *output, seqlens_k, None)
        ctx.options = (causal, scale, wl, wr, softcap, return_lse, backend, 0.0)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dout, dlse):
        with torch.no_grad():  # the backward op has no derivative to record
            grads = _op_backward(ctx, dout, dlse)[:3]
        if torch.is_grad_enabled() and grads[0] is not None:  # torch.func.grad records the
            q, k, v = ctx.saved_tensors[:3]  # backward: a second derivative must refuse
            grads = _OnceDifferentiable.apply(*grads, q, k, v, *(t for t in (dout, dlse)
                                                                  if t is not None))
        return *grads, None, None

    @staticmethod
    def jvp(ctx, *_tangents):
        raise NotImplementedError(
            "attnkit.attention has no forward-mode derivative (torch.func.jvp, jacfwd); use "
            "reverse mode (torch.func.grad, vjp, jacrev)")


# -- torch.vmap: the mapped dimension folded into the batch --------------------------------

def _fold(t, dim, n):
    """``t`` with vmap's dimension ``dim`` (None: unmapped, repeated) merged into dim 0."""
    if t is None:
        return None
    t = t.expand(n, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(n * t.shape[1], *t.shape[2:])


def _unfold(t, n):
    return t.reshape(n, t.shape[0] // n, *t.shape[1:])


@_attention_op.register_vmap
def _(info, in_dims, q, k, v, seqlens_k, *options):
    n = info.batch_size
    folded = (_fold(t, d, n) for t, d in zip((q, k, v, seqlens_k), in_dims))
    out, lse = _attention_op(*folded, *options)
    return (_unfold(out, n), _unfold(lse, n)), (0, 0)


@_attention_backward_op.register_vmap
def _(info, in_dims, *args):
    n = info.batch_size
    folded = [_fold(t, d, n) if isinstance(t, torch.Tensor) else t
              for t, d in zip(args[:8], in_dims)]
    grads = _attention_backward_op(*folded, *args[8:])
    return tuple(_unfold(g, n) for g in grads), (0, 0, 0)


# Looked up once: torch imports numpy where it is installed, and reading sys.modules while
# tracing makes dynamo wrap a dict that imports change under it.
_NDARRAY = getattr(sys.modules.get("numpy"), "ndarray", ())


def _refuse_traced_numpy(name, x) -> None:
    """torch.compile traces a numpy scalar as a 0-d array holding data, not as a constant:
    say so, instead of failing on a guard deep inside the checks."""
    if isinstance(x, _NDARRAY):
        raise TypeError(
            f"{name} is a numpy value inside torch.compile, which traces it as an array, not "
            f"a number; pass a Python number there "
            f"({name}={'int' if name == 'window' else 'float'}(x))")


def _op_attention(q, k, v, causal, scale, window, seqlens_k, softcap, return_lse, backend,
                  transformed=False, dropout_p=0.0, generator=None):
    """`attention` through the custom op: under torch.compile, and (``transformed``) under
    torch.func transforms, through `_TransformedAttention`."""
    if not transformed:
        for name, x in (("scale", scale), ("softcap", softcap),
                        *(("window", w) for w in (window or ()))):
            _refuse_traced_numpy(name, x)
    wl, wr = check_window(window)
    seqlens_k = _lengths_for_backends(seqlens_k)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                              or v.requires_grad)
    options = (causal, check_scale(scale, q.shape[-1]), wl, wr, check_softcap(softcap) or 0.0,
               bool(return_lse), needs_grad, backend or "auto")
    if transformed:
        out, lse = _TransformedAttention.apply(q, k, v, seqlens_k, options)
    else:
        state = traced_state(dropout_p, generator, q.device)
        out, lse = _attention_op(q, k, v, seqlens_k, *options, float(dropout_p), state)
    return (out, lse) if return_lse else out
