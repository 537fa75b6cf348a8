"""The paged call's value checks: the operations a repeated decoding step queues, and every
condition against a plain-Python oracle in both modes, on fresh and repeated signatures,
with nothing written on failure."""

import dataclasses
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit
from attnkit.backend import Backend, Capabilities
from attnkit.registry import registry

NULL = "null-paged-for-validation-tests"


class NullPaged(Backend):
    """Declares paged and does nothing: results made once per shape, the lengths it was
    given kept for the test to read."""

    name = NULL
    capabilities = Capabilities(devices=frozenset({"cpu"}),
                                dtypes=frozenset({torch.float32}), paged=True)

    def __init__(self):
        self.results, self.seen = {}, []

    def forward(self, problem, q, k, v, seqlens_k=None):
        raise AssertionError("the paged call must reach forward_paged")

    def forward_paged(self, problem, q, k_pages, v_pages, block_table, seqlens_k):
        self.seen.append(seqlens_k)
        if q.shape not in self.results:
            self.results[q.shape] = (torch.zeros_like(q),
                                     torch.zeros(q.shape[:3], dtype=torch.float32))
        return self.results[q.shape]

    def backward(self, *args, **kwargs):
        raise NotImplementedError


@pytest.fixture
def null():
    backend = NullPaged()
    registry.register(backend, priority=None, plugin="tests")
    try:
        yield backend
    finally:
        registry.unregister(NULL)


class CountOps(TorchDispatchMode):
    """The aten operations a call queues, views (no kernel) apart."""

    def __init__(self):
        super().__init__()
        self.ops, self.views = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.views if func.is_view else self.ops).append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _decode_inputs(B=16, Hq=8, Hkv=2, D=16, L=256, P=16, s_new=0):
    g = torch.Generator().manual_seed(0)
    n = L // P
    kp = torch.randn(B * n, Hkv, P, D, generator=g)
    vp = torch.randn(B * n, Hkv, P, D, generator=g)
    table = torch.randperm(B * n, generator=g).to(torch.int32).view(B, n).contiguous()
    q = torch.randn(B, Hq, max(s_new, 1), D, generator=g)
    new = [torch.randn(B, Hkv, s_new, D, generator=g) for _ in range(2)] if s_new else [None] * 2
    lens = torch.full((B,), L - 1 - s_new, dtype=torch.int32)
    return q, kp, vp, table, lens, new


def _count(fn):
    with torch.no_grad():
        fn()  # the signature's checks and constants are made once, here
        with CountOps() as c:
            fn()
    return c


@pytest.mark.parametrize("validate, most", [("device", 8), ("host", 8)])
def test_a_repeated_decoding_step_queues_few_operations(null, validate, most):
    """Without an append the check is one range check of one vector: 7 operations, each a
    launch on a GPU (a regression to the ~20 of separate reductions fails)."""
    q, kp, vp, table, lens, _ = _decode_inputs()
    c = _count(lambda: attnkit.attention_with_kvcache(q, kp, vp, lens, block_table=table,
                                                      backend=NULL, validate=validate))
    assert len(c.ops) <= most, c.ops
    assert c.ops.count("_assert_async") == (validate == "device")
    # "device" never reads a value on the host; "host" reads the one boolean.
    assert c.ops.count("_local_scalar_dense") == (validate == "host")
    assert null.seen[-1] is lens  # without an append the caller's int32 lengths, as they are


@pytest.fixture
def self_checking(null):
    """The null backend declaring ``paged_checks`` (it checks nothing: what the core leaves
    to such a backend is what reaches it unchecked)."""
    null.capabilities = dataclasses.replace(null.capabilities, paged_checks=True)
    return null


@pytest.mark.parametrize("window, s_new, validate, checked", [
    (None, 0, "device", False),  # a decoding step: the kernel's own checks alone
    ((4, 0), 0, "device", True),  # a left window: entries it hides are the core's to check
    ((-1, 0), 0, "device", False),  # a right bound alone hides no entry
    (None, 1, "device", True),  # an append: checked before the write
    (None, 0, "host", True),  # "host" always names the culprit itself
])
def test_a_self_checking_backend_takes_the_device_check(self_checking, window, s_new,
                                                        validate, checked):
    """``Capabilities.paged_checks``: under "device", a call that appends nothing and has no
    left window queues no check (no operation at all here); otherwise the core's check runs
    and still refuses a bad entry before the backend sees it."""
    q, kp, vp, table, lens, new = _decode_inputs(s_new=s_new)

    def call(t):
        return attnkit.attention_with_kvcache(q, kp, vp, lens, *new, block_table=t,
                                              backend=NULL, causal=True, window=window,
                                              validate=validate)

    c = _count(lambda: call(table))
    assert (len(c.ops) > 0) == checked, c.ops
    bad = table.clone()
    bad[3, 0] = kp.shape[0]
    seen = len(self_checking.seen)
    if checked:
        with torch.no_grad(), pytest.raises((ValueError, RuntimeError), match="paged KV|entry"):
            call(bad)
        assert len(self_checking.seen) == seen
    else:  # left to the backend: it got the table as it is
        with torch.no_grad():
            call(bad)
        assert len(self_checking.seen) == seen + 1


def test_a_self_checking_backend_may_append(self_checking, monkeypatch):
    """Under "device" an append goes to `Backend.append_paged` (checks included), whose fill
    levels reach forward_paged; a backend returning None leaves it to the core."""
    q, kp, vp, table, lens, new = _decode_inputs(s_new=1)
    taken = []

    def append(k_pages, v_pages, block_table, cache_seqlens, k_new, v_new):
        taken.append(block_table)
        return (cache_seqlens + k_new.shape[2]).to(torch.int32)

    self_checking.append_paged = append
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(attnkit.paged, "check_table", lambda *a: pytest.fail("the core checked"))
        attnkit.attention_with_kvcache(q, kp, vp, lens, *new, block_table=table,
                                       backend=NULL, validate="device")
    assert len(taken) == 1 and taken[0] is table
    assert self_checking.seen[-1].tolist() == (lens + 1).tolist()
    self_checking.append_paged = lambda *a: None
    before = kp.clone()
    with torch.no_grad():
        attnkit.attention_with_kvcache(q, kp, vp, lens, *new, block_table=table,
                                       backend=NULL, validate="device")
    assert not torch.equal(kp, before)  # the core wrote the new keys


def test_a_repeated_appending_step_queues_few_operations(null):
    q, kp, vp, table, lens, new = _decode_inputs(s_new=1)
    c = _count(lambda: attnkit.attention_with_kvcache(q, kp, vp, lens, *new, block_table=table,
                                                      backend=NULL, validate="device"))
    assert len(c.ops) <= 21, c.ops
    assert c.ops.count("index_put_") == 2 and "_local_scalar_dense" not in c.ops
    torch.testing.assert_close(null.seen[-1], lens + 1, rtol=0, atol=0)


def _oracle(table, lens, s_new, N, P):
    """The first violated condition, in the host check's order, with the regex its
    ``ValueError`` must match; None if the call is valid."""
    table, lens = table.tolist(), lens.tolist()
    B, M = len(table), len(table[0]) if table else 0
    if B and min(lens) < 0:
        b = lens.index(min(lens))
        return f"values must be >= 0; sequence {b} has {lens[b]}; nothing was written"
    if B and max(lens) + s_new > M * P:
        b = lens.index(max(lens))
        return f"paged KV cache overflow: sequence {b} holds {lens[b]} positions"
    for b in range(B):
        for j in range(M):
            if j * P < lens[b] + s_new and not 0 <= table[b][j] < N:
                return f"entry \\[{b}, {j}\\] = {table[b][j]} is needed.*nothing was written"
    if s_new and B > 1:
        slots = [(table[b][p // P], p % P) for b in range(B)
                 for p in range(lens[b], lens[b] + s_new)]
        if len(set(slots)) < len(slots):
            return "appended to by two sequences.*nothing was written"
    return None


def _expected_pools(kp, vp, table, lens, new, P):
    kp, vp = kp.clone(), vp.clone()
    for b, row in enumerate(table.tolist()):
        for i in range(new[0].shape[2]):
            p = int(lens[b]) + i
            kp[row[p // P], :, p % P] = new[0][b, :, i]
            vp[row[p // P], :, p % P] = new[1][b, :, i]
    return kp, vp


def _random_case(rng):
    B, M, P, N, s_new = (rng.randint(1, 4), rng.randint(0, 4), rng.randint(1, 5),
                         rng.randint(0, 7), rng.randint(0, 3))
    cap = M * P
    lens = [rng.randint(0, max(cap - s_new, 0)) for _ in range(B)]
    # Distinct pages where the pool has enough, so that most cases are valid.
    pages = rng.sample(range(N), B * M) if N >= B * M else [rng.randrange(max(N, 1))
                                                             for _ in range(B * M)]
    table = [pages[b * M:(b + 1) * M] for b in range(B)]
    for _ in range(rng.choice((0, 0, 1, 2))):
        what, b = rng.choice(("fill", "entry", "share")), rng.randrange(B)
        if what == "fill":
            lens[b] = rng.choice((-1, -3, cap - s_new + 1, cap + 4))
        elif what == "entry" and M:
            table[b][rng.randrange(M)] = rng.choice((-1, N, N + 3, -(2**31)))
        elif what == "share" and B > 1:
            table[b] = list(table[(b + 1) % B])
            lens[b] = lens[(b + 1) % B]
    dtype = rng.choice((torch.int32, torch.int64))
    return (torch.tensor(table, dtype=torch.int32).view(B, M), torch.tensor(lens, dtype=dtype),
            s_new, N, P)


def _run(call, kp, vp, table, lens, new, s_new, q, validate):
    if call == "append":
        attnkit.append_paged(kp, vp, table, lens, *new, validate=validate)
    else:
        attnkit.attention_with_kvcache(q, kp, vp, lens, *(new if s_new else [None, None]),
                                       block_table=table, backend=NULL, validate=validate)


@pytest.mark.parametrize("validate", ["host", "device"])
def test_every_condition_against_an_oracle(null, validate):
    """Random tables, fill levels and appends, a quarter with defects: the call passes
    exactly when the oracle finds nothing wrong; "host" names what it finds first, "device"
    raises its assertion (at once on CPU); a refused call writes nothing, a valid one
    writes exactly the appended slots, and the backend gets ``cache_seqlens + S_new``."""
    rng = random.Random(7)
    seen = {"valid": 0, "refused": 0}
    for _ in range(400):
        table, lens, s_new, N, P = _random_case(rng)
        B, M = table.shape
        Hkv, D = 2, 4
        kp, vp = torch.randn(N, Hkv, P, D), torch.randn(N, Hkv, P, D)
        new = [torch.randn(B, Hkv, s_new, D) for _ in range(2)]
        q = torch.randn(B, 2, max(s_new, 1), D)
        want = _oracle(table, lens, s_new, N, P)
        expected = _expected_pools(kp, vp, table, lens, new, P) if want is None else (
            kp.clone(), vp.clone())
        for call in ("attend", "attend again", "append"):  # the second on a kept signature
            k2, v2 = kp.clone(), vp.clone()
            args = (k2, v2, table, lens, new, s_new, q, validate)
            calls = len(null.seen)
            if want is None:
                _run(call, *args)
                if len(null.seen) > calls:  # (a table of no pages is answered without it)
                    got = null.seen[-1]
                    assert got.dtype == torch.int32 and got.is_contiguous()
                    assert got.tolist() == (lens + s_new).tolist()
            else:
                error, match = ((ValueError, want) if validate == "host"
                                else (RuntimeError, "paged KV cache"))
                with pytest.raises(error, match=match):
                    _run(call, *args)
            assert torch.equal(k2, expected[0]) and torch.equal(v2, expected[1]), (
                call, table, lens, s_new, N, P)
        seen["valid" if want is None else "refused"] += 1
    assert min(seen.values()) > 50, seen  # both outcomes drawn often


@pytest.mark.parametrize("validate", ["host", "device"])
def test_no_page_can_hold_the_append(null, validate):
    """A table whose rows hold fewer positions than one step appends is refused whatever
    the values (no vector to check), before writing."""
    kp, vp = torch.randn(4, 1, 2, 4), torch.randn(4, 1, 2, 4)
    before = kp.clone()
    table = torch.tensor([[0], [1]], dtype=torch.int32)
    new = [torch.randn(2, 1, 3, 4) for _ in range(2)]
    error, match = ((ValueError, "overflow: sequence 0 holds 0 positions and 3 new ones need "
                     "3 > 1 pages x page size 2") if validate == "host"
                    else (RuntimeError, "paged KV cache"))
    with pytest.raises(error, match=match):
        attnkit.append_paged(kp, vp, table, torch.zeros(2, dtype=torch.int32), *new,
                             validate=validate)
    assert torch.equal(kp, before)


def test_strided_int64_lengths_reach_the_backend_as_int32(null):
    q, kp, vp, table, _, _ = _decode_inputs(B=2)
    lens = torch.tensor([[5, 0], [9, 0]], dtype=torch.int64)[:, 0]  # stride 2
    for _ in range(2):
        attnkit.attention_with_kvcache(q, kp, vp, lens, block_table=table, backend=NULL,
                                       validate="device")
        got = null.seen[-1]
        assert got.dtype == torch.int32 and got.is_contiguous() and got.tolist() == [5, 9]


@pytest.mark.parametrize("validate", ["host", "device"])
def test_a_column_major_table_is_checked(null, validate):
    """A table of any strides: its needed entries are found in their own places."""
    q, kp, vp, table, lens, _ = _decode_inputs(B=3, L=64, P=16)
    t = table.t().contiguous().t()
    attnkit.attention_with_kvcache(q, kp, vp, lens, block_table=t, backend=NULL,
                                   validate=validate)
    t[2, 3] = kp.shape[0]
    error, match = ((ValueError, "entry \\[2, 3\\] = 12 is needed") if validate == "host"
                    else (RuntimeError, "paged KV cache"))
    with pytest.raises(error, match=match):
        attnkit.attention_with_kvcache(q, kp, vp, lens, block_table=t, backend=NULL,
                                       validate=validate)
